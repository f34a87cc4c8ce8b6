"""The center's inventory: hosts, datastores, networks and VMs, kept in line with the agents.

Agents are the truth about what runs; the inventory is the center's memory of it. Each refresh
reconciles the two, and never accepts silently what must not be: a VM found running on two hosts
raises an alarm and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import load_only, raiseload, selectinload

from kvmotion.center.db import (
    Base,
    Cluster,
    Database,
    Datacenter,
    Datastore,
    Host,
    HostDatastore,
    Network,
    Vm,
)
from kvmotion.center.poller import Agents, Poller, PollerStopped
from kvmotion.center.tasks import record_event
from kvmotion.errors import Conflict, HostUnreachable, KvmotionError, NotFound
from kvmotion.host.client import AgentClient
from kvmotion.host.protocol import facts_json, vm_json
from kvmotion.mgmttls import agent_url
from kvmotion.migration.precheck import HostView, ModeView, VmView

T = TypeVar("T")
log = logging.getLogger(__name__)

ENDED = ("failed", "cancelled")  # a migration phase after which nothing follows

# Hosts refreshed at once: enough to hide the agents' round trips (most rounds, most hosts
# need nothing of the database: 8 at once left a 1,000-host round waiting on the agents for
# 6.4 s, 32 took 2.5 s)...
REFRESH_CONCURRENCY = 32
# ...and of them, those writing or comparing at once: few enough to leave most of the database
# pool (db.py: 10 + 10) to the API and the migrations.
REFRESH_DB_CONCURRENCY = 8
# More VMs written at once than this (a bulk change): every host compares its VMs again,
# rather than look up whose they are.
UNSETTLE_LOOKUP_MAX = 500

DEFAULT_DATACENTER = "Datacenter"
DEFAULT_CLUSTER = "Cluster"


def host_view(host: Host) -> HostView:
    facts = host.facts or {}
    models = facts.get("runnable_cpu_models")
    cpu = facts.get("cpu_model") or {}
    features = cpu.get("features")
    return HostView(
        name=host.name,
        connected=host.connection == "connected",
        migration_address=facts.get("migration_address"),
        datastores=frozenset(d["name"] for d in facts.get("datastores", []) if d.get("accessible")),
        datastore_free_bytes={
            d["name"]: int(d.get("free_bytes", 0))
            for d in facts.get("datastores", [])
            if d.get("accessible")
        },
        networks=frozenset(n["name"] for n in facts.get("networks", []) if n.get("present")),
        available_memory_bytes=int(facts.get("memory", {}).get("available_bytes", 0)),
        accel=str(facts.get("accel", "unknown")),
        qemu_version=str(facts.get("qemu_version", "unknown")),
        machine_types=frozenset(types) if (types := facts.get("machine_types")) else None,
        ram_pad_kib=int(facts.get("ram_pad_kib") or 0),
        cpu_vendor=str(facts.get("cpu", {}).get("vendor", "unknown")),
        runnable_cpu_models=frozenset(models) if models is not None else None,
        cpu_features=frozenset(features) if features else None,
        cpu_family=cpu.get("vendor"),
        evc_modes=tuple(
            ModeView(m["key"], m["label"], len(m.get("features", [])))
            for m in cpu.get("evc_modes", [])
            if m.get("supported")
        ),
        migration_tls=(str(tls["mode"]), bool(tls.get("ready")))
        if (tls := facts.get("migration_tls"))
        else None,
        maintenance=host.maintenance is not None,
    )


def vm_view(vm: Vm, migrating: bool) -> VmView:
    cfg = vm.config
    return VmView(
        name=vm.name,
        host=vm.host.name if vm.host else None,
        power_state=vm.power_state,
        disk_datastores=tuple(d["datastore"] for d in cfg.get("disks", [])),
        networks=tuple(n["network"] for n in cfg.get("nics", [])),
        memory_mib=int(cfg.get("memory_mib", 0)),
        vcpus=int(cfg.get("vcpus", 1)),
        cpu_model=str(cfg.get("cpu_model", "")),
        machine_type=str(cfg.get("machine_type", "")),
        ram_pad_kib=vm.ram_pad_kib,
        migrating=migrating,
        cpu_features=tuple((vm.cpu or {}).get("features", ())),
        disk_bytes=sum(int(d.get("size_mib", 0)) for d in cfg.get("disks", [])) * 2**20,
    )


def vm_dict(vm: Vm) -> dict[str, Any]:
    """A VM as the API shows it."""
    return vm_fields(vm, vm.host.name if vm.host else None)


def vm_fields(vm: Vm, host: str | None) -> dict[str, Any]:
    """A VM as the API shows it, on ``host`` (its record read without its host's)."""
    return {
        "uuid": vm.uuid,
        "name": vm.name,
        "host": host,
        "power_state": vm.power_state,
        "config": vm.config,
        "config_path": vm.config_path,
        "cpu": vm.cpu,
        "evc_mode": vm.evc_mode,
        "addresses": vm.addresses or [],
        "addresses_source": vm.addresses_source,
        "ha_priority": vm.ha_priority or "medium",
    }


class Kept(Generic[T]):
    """Records of one table kept between reads, each read again only after it is written
    (db.Changes): for the lists every web client asks for every 5 s. The active center is the
    inventory's only writer (standbys refuse requests; center/leader.py), so what this process
    wrote is all that changed. ``read(ids)`` reads the records of ``ids`` (None: all) as (id,
    sort key, what to keep)."""

    def __init__(
        self,
        db: Database,
        table: type[Base],
        read: Callable[[set[int] | None], Awaitable[list[tuple[int, str, T]]]],
    ) -> None:
        self.changes = db.watch(table)
        self.read = read
        self.kept: dict[int, tuple[str, T]] = {}
        self.sorted: list[T] | None = None
        self._lock = asyncio.Lock()  # one reader at a time: the others get what it read

    async def values(self) -> list[T]:
        """Every record, by sort key (the same list object until one changes)."""
        async with self._lock:
            everything, ids = self.changes.take()
            if self.sorted is not None and not everything and not ids:
                return self.sorted
            try:
                read = await self.read(None if everything else ids)
            except BaseException:
                self.changes.add({None})  # read them all next time
                raise
            if everything:
                self.kept = {}
            for i in ids:
                self.kept.pop(i, None)  # deleted, unless read again
            self.kept.update((i, (key, value)) for i, key, value in read)
            self.sorted = [value for _, value in sorted(self.kept.values(), key=itemgetter(0))]
            return self.sorted


class VmList:
    """GET /v1/vms's answer: at 10,000 VMs reading and encoding every record takes about 0.7 s
    of the center's CPU, while migrations write a few records a second."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.records: Kept[bytes] = Kept(db, Vm, lambda ids: self._read(ids))
        self._body: tuple[list[bytes], bytes] | None = None

    async def json(self) -> bytes:
        records = await self.records.values()
        if self._body is None or self._body[0] is not records:
            self._body = records, b"[" + b",".join(records) + b"]"
        return self._body[1]

    async def _read(self, ids: set[int] | None) -> list[tuple[int, str, bytes]]:
        """VMs (all, or those of ``ids``) with their host's name (not the host's record)."""
        query = select(Vm, Host.name).outerjoin(Host, Vm.host_id == Host.id)
        query = query.options(raiseload(Vm.host))
        if ids is not None:
            query = query.where(Vm.id.in_(list(ids)))
        async with self.db.session() as s:
            rows = list(await s.execute(query))
        return [(vm.id, vm.name, compact_json(vm_fields(vm, host))) for vm, host in rows]


@dataclass(frozen=True)
class KeptHost:
    """A host as the lists read it: the API's record, encoded (its facts would take most of
    GET /v1/hosts' time to encode again per request) in two parts around its last-seen time,
    which is spliced in at answer time (``Inventory.host_json``: the refresh keeps it in
    memory), and its cluster and EVC modes for a cluster's description."""

    id: int
    name: str
    cluster_id: int | None
    evc_modes: list[dict[str, Any]]
    last_seen: datetime | None  # as the record was read
    head: bytes  # the record's object up to its last-seen time's value
    tail: bytes  # the rest of it, from the key after last_seen


LAST_SEEN = b'"last_seen":'


def _kept_host(h: Host) -> KeptHost:
    record = compact_json(host_dict(h))
    cut = record.index(LAST_SEEN) + len(LAST_SEEN)  # "name" and "url" come first: JSON strings
    end = record.index(b',"maintenance":', cut)  # the next key, after an ISO time or null
    return KeptHost(h.id, h.name, h.cluster_id, cpu_facts(h).get("evc_modes", []), h.last_seen,
                    record[:cut], record[end:])  # fmt: skip


async def _read_hosts(db: Database, ids: set[int] | None) -> list[tuple[int, str, KeptHost]]:
    query = select(Host) if ids is None else select(Host).where(Host.id.in_(list(ids)))
    async with db.session() as s:
        hosts = list(await s.scalars(query))
    return [(h.id, h.name, _kept_host(h)) for h in hosts]


async def _read_vm_places(
    db: Database, ids: set[int] | None
) -> list[tuple[int, str, tuple[str, int | None]]]:
    query = select(Vm.id, Vm.name, Vm.host_id)
    if ids is not None:
        query = query.where(Vm.id.in_(list(ids)))
    async with db.session() as s:
        return [(i, name, (name, host)) for i, name, host in await s.execute(query)]


class DatastoreList:
    """GET /v1/datastores' answer, encoded, kept until a datastore or a host is written (a
    host's datastores are its record's): a fleet has a local datastore per host, and a refresh
    that finds nothing new writes none."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.changes = (inventory.db.watch(Datastore), inventory.db.watch(Host))
        self._body: bytes | None = None
        self._lock = asyncio.Lock()  # one reader at a time: the others get what it read

    async def json(self) -> bytes:
        async with self._lock:
            taken = [c.take() for c in self.changes]
            if self._body is not None and not any(e or ids for e, ids in taken):
                return self._body
            try:
                self._body = compact_json(await self.inventory.datastore_list())
            except BaseException:
                for c in self.changes:
                    c.add({None})  # read again next time
                raise
            return self._body


def cpu_facts(host: Host) -> dict[str, Any]:
    """The host's CPU as its agent reports it (model, vendor, features, EVC modes)."""
    cpu: dict[str, Any] = (host.facts or {}).get("cpu_model") or {}
    return cpu


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def record_fields(info: dict[str, Any]) -> dict[str, Any]:
    """What the inventory keeps of an agent's VM record (the columns ``upsert_vm`` sets)."""
    running = info["power_state"] != "poweredOff"
    return {
        "power_state": info["power_state"],
        "config": info["config"],
        "config_path": info["config_path"],
        "cpu": info.get("cpu") if running else None,
        "ram_pad_kib": info.get("ram_pad_kib") if running else None,
        "addresses": list(info.get("addresses") or []) if running else None,
        "addresses_source": info.get("addresses_source") if running else None,
    }


def same_record(vm: Vm, info: dict[str, Any], host: Host) -> bool:
    """Does the inventory already hold this record of ``host``'s, as it is?"""
    fields = record_fields(info)
    return vm.host_id == host.id and all(getattr(vm, k) == v for k, v in fields.items())


def _disk_places(info: dict[str, Any]) -> list[tuple[str, str]]:
    disks = (info.get("config") or {}).get("disks") or []
    return [(str(d.get("datastore")), str(d.get("path"))) for d in disks]


def host_dict(host: Host) -> dict[str, Any]:
    return {
        "name": host.name,
        "url": host.url,
        "connection": host.connection,
        "last_seen": host.last_seen.isoformat() if host.last_seen else None,
        "maintenance": host.maintenance,  # None, "entering" or "in"
        "facts": host.facts,
    }


class Inventory:
    def __init__(
        self,
        db: Database,
        migrating: Callable[[str], bool],
        transport: httpx.AsyncBaseTransport | None = None,
        tls: ssl.SSLContext | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        self.db = db
        self.migrating = migrating  # is a migration of this VM (by name) in flight?
        self.transport = transport  # None: real HTTP; tests plug fake agents in here
        self.tls = tls  # the cluster CA and the center's client certificate; None: plaintext
        self._refresh_locks: dict[str, asyncio.Lock] = {}
        self._catalog_lock = asyncio.Lock()  # datastores and networks are made one at a time
        self._agents = Agents(transport, tls)
        # A refresh's questions to the agents, asked by a process of its own (poller.py), which
        # trusts the agents as this center does (``tls_dir``: the same CA and certificate);
        # with a transport (tests' fake agents), in this process.
        self.poller = Poller(
            tls_dir if tls is not None else None, self._agents if transport is not None else None
        )
        # When each VM's record was last written (monotonic, by uuid): a refresh whose list was
        # read before that is older than the record, and must not undo it.
        self._written: dict[str, float] = {}
        self.rounds = 0  # refreshes of every host done
        # When each host (by id) last answered a refresh: kept here, not written per host per
        # round (a write would make every kept host record stale: ``kept_hosts``); written to
        # the database in one statement per round (``_write_seen``), and spliced into the
        # API's host records (``host_json``, ``host_record``). Only the active center refreshes
        # (center/leader.py), so only its memory is newer than the database, by a round.
        self.seen: dict[int, datetime] = {}
        self._seen_json: dict[int, bytes] = {}  # each encoded, as the kept records splice it
        self._seen_unwritten: set[int] = set()
        # The facts each host (by id) answered with, as this process last wrote them with its
        # datastores and its connected state: a host that answers the same is not written again
        # (most rounds change nothing). Forgotten when this process marks it disconnected.
        self._written_facts: dict[int, dict[str, Any]] = {}
        self._written_stores: dict[int, tuple[Any, Any]] = {}  # its datastores and networks
        # Each host's (by id) VM list as it was when the inventory last agreed with it (its
        # digest: poller.digest), and the VM records (ids) compared then: the same list, with none
        # of those records written since and none written onto the host, needs no comparison.
        # A VM written unsettles only the hosts it concerns (_take_vm_changes): during 50
        # migrations, the fleet's other hosts stay settled.
        self._settled: dict[int, tuple[str, frozenset[int]]] = {}
        self._settled_by_vm: dict[int, set[int]] = {}  # VM id -> settled hosts that compared it
        self._vm_changes = db.watch(Vm)
        self._vm_changes_lock = asyncio.Lock()
        self._vm_batches = 0  # VM writes taken (_take_vm_changes) so far
        self._db_gate = asyncio.Semaphore(REFRESH_DB_CONCURRENCY)  # refreshes at the database
        # Every host, kept until it is written: read by every web client every 5 s (the host
        # list, each cluster's description), while each refresh round writes every host.
        self.kept_hosts: Kept[KeptHost] = Kept(db, Host, lambda ids: _read_hosts(db, ids))
        # Each VM's name and host (by id), kept until the VM is written: the names of a
        # cluster's VMs, which every web client asks for every 5 s.
        self.kept_vm_places: Kept[tuple[str, int | None]] = Kept(
            db, Vm, lambda ids: _read_vm_places(db, ids)
        )

    async def ensure_defaults(self) -> None:
        async with self.db.session() as s:
            dc = await s.scalar(select(Datacenter).where(Datacenter.name == DEFAULT_DATACENTER))
            if dc is None:
                dc = Datacenter(name=DEFAULT_DATACENTER)
                s.add(dc)
                await s.flush()
                s.add(Cluster(name=DEFAULT_CLUSTER, datacenter_id=dc.id))
            await s.commit()

    def agent_url(self, host: Host) -> str:
        """Where the center reaches ``host``'s agent (https when the center has TLS)."""
        return agent_url(host.url, self.tls)

    def agent(self, host: Host) -> AgentClient:
        """The center's one client of ``host``'s agent (connections reused across calls)."""
        return self._agents.get(self.agent_url(host), host.token)

    async def close(self) -> None:
        await self.poller.close()
        await self._agents.close()

    # -- hosts ---------------------------------------------------------------------------------
    async def add_host(self, address: str, token: str, port: int) -> Host:
        """Connect to a host's agent and add it (and its datastores, networks and VMs)."""
        scheme = "http" if self.tls is None else "https"
        url = f"{scheme}://[{address}]:{port}" if ":" in address else f"{scheme}://{address}:{port}"
        async with AgentClient(
            url, token, timeout=10, transport=self.transport, verify=self.tls
        ) as agent:
            facts = facts_json(await agent.facts())
        async with self.db.session() as s:
            if await s.scalar(select(Host).where(Host.name == facts["name"])) is not None:
                raise Conflict(
                    f"host {facts['name']} is already in the inventory", code="host_exists"
                )
            cluster = await s.scalar(select(Cluster).where(Cluster.name == DEFAULT_CLUSTER))
            host = Host(name=facts["name"], url=url, token=token, facts=facts)
            host.cluster_id = cluster.id if cluster else None
            s.add(host)
            await s.commit()
        await record_event(self.db, f"host {host.name} added", host=host.name)
        return await self.refresh_host(host.name)

    async def hosts(self) -> list[Host]:
        async with self.db.session() as s:
            return list(await s.scalars(select(Host).order_by(Host.name)))

    async def host(self, name: str) -> Host:
        async with self.db.session() as s:
            host = await s.scalar(select(Host).where(Host.name == name))
            if host is None:
                known = ", ".join(h.name for h in await s.scalars(select(Host))) or "none"
                raise NotFound(f"no host {name[:80]!r} (known: {known})", code="host_not_found")
            return host

    def last_seen(self, host: Host) -> datetime | None:
        """When the host last answered: this center's memory, else the database's record."""
        seen = self.seen.get(host.id)
        if seen is None or (host.last_seen is not None and host.last_seen > seen):
            return host.last_seen
        return seen

    def host_record(self, host: Host) -> dict[str, Any]:
        """The host as the API shows it (``host_dict``), seen as of now."""
        record = host_dict(host)
        seen = self.last_seen(host)
        record["last_seen"] = seen.isoformat() if seen else None
        return record

    def host_json(self, kept: KeptHost) -> bytes:
        """A kept host's encoded record (``host_record``, encoded), seen as of now."""
        seen = self._seen_json.get(kept.id)
        mine = self.seen.get(kept.id)
        if seen is None or mine is None or (kept.last_seen is not None and kept.last_seen > mine):
            seen = compact_json(kept.last_seen.isoformat() if kept.last_seen else None)
        return kept.head + seen + kept.tail

    def _saw(self, host_id: int, when: datetime) -> None:
        self.seen[host_id] = when
        self._seen_json[host_id] = compact_json(when.isoformat())
        self._seen_unwritten.add(host_id)

    async def _write_seen(self) -> None:
        """Write the hosts' last-seen times, one statement for all, outside the ORM's session:
        the kept host records stay valid (their last-seen time is spliced in from memory)."""
        ids, self._seen_unwritten = self._seen_unwritten, set()
        if not ids:
            return
        table = Host.__table__
        assert isinstance(table, Table)
        statement = (
            update(table)
            .where(table.c.id == bindparam("host_id"))
            .values(last_seen=bindparam("seen"))
        )
        rows = [{"host_id": i, "seen": self.seen[i]} for i in sorted(ids) if i in self.seen]
        try:
            async with self.db.engine.begin() as conn:
                await conn.execute(statement, rows)
        except BaseException:
            self._seen_unwritten |= ids  # with the next round's
            raise

    # -- datastores ----------------------------------------------------------------------------
    async def datastores(self) -> list[Datastore]:
        async with self.db.session() as s:
            hosts = selectinload(Datastore.hosts).load_only(Host.name)  # names, not facts
            query = select(Datastore).options(hosts)
            return list(await s.scalars(query.order_by(Datastore.name)))

    async def datastore_list(self) -> list[dict[str, Any]]:
        """Every datastore as the API shows it, with the hosts that see it; read as plain rows:
        a fleet has a local datastore per host, too many to load as records per request."""
        stores = select(
            Datastore.id, Datastore.name, Datastore.shared, Datastore.capacity_bytes,
            Datastore.free_bytes,
        ).order_by(Datastore.name)  # fmt: skip
        seen_by = select(HostDatastore.datastore_id, Host.name).join(
            Host, Host.id == HostDatastore.host_id
        )
        async with self.db.session() as s:
            hosts: dict[int, list[str]] = {}
            for ds_id, host in await s.execute(seen_by):
                hosts.setdefault(ds_id, []).append(host)
            return [
                {"name": name, "shared": shared, "capacity_bytes": capacity,
                 "free_bytes": free, "hosts": sorted(hosts.get(ds_id, []))}
                for ds_id, name, shared, capacity, free in await s.execute(stores)
            ]  # fmt: skip

    async def datastore(self, name: str) -> Datastore:
        async with self.db.session() as s:
            ds = await s.scalar(select(Datastore).where(Datastore.name == name))
            if ds is None:
                known = ", ".join(d.name for d in await s.scalars(select(Datastore))) or "none"
                raise NotFound(
                    f"no datastore {name[:80]!r} on any host (known: {known})",
                    code="datastore_not_found",
                )
            return ds

    async def refresh_all(self) -> None:
        """Refresh every host, ``REFRESH_CONCURRENCY`` at a time (``REFRESH_DB_CONCURRENCY``
        of them at the database): one after another, a fleet's round is the sum of its hosts'
        round trips and writes (1,000 hosts: minutes)."""
        started, failed = time.monotonic(), 0
        # What a refresh needs of each host, not its facts: 1,000 hosts' facts, decoded and
        # made into records at once, hold the event loop (and every request) for about 0.1 s.
        async with self.db.session() as s:
            query = select(Host).options(
                load_only(Host.id, Host.name, Host.url, Host.token, Host.connection)
            )
            hosts = list(await s.scalars(query.order_by(Host.name)))
        gate = asyncio.Semaphore(REFRESH_CONCURRENCY)

        unasked: list[str] = []

        async def one(host: Host) -> None:
            nonlocal failed
            async with gate:
                try:
                    lock = self._refresh_locks.setdefault(host.name, asyncio.Lock())
                    async with lock:
                        await self._refresh_host(host)
                except PollerStopped as exc:  # said once for the round, below
                    failed += 1
                    unasked.append(exc.message)
                except KvmotionError as exc:
                    failed += 1
                    log.warning("refresh of %s failed: %s", host.name, exc.message)

        await asyncio.gather(*(one(h) for h in hosts))
        await self._write_seen()
        self.rounds += 1
        if unasked:
            log.warning("%d hosts were not asked this round: %s", len(unasked), unasked[-1])
        log.info("refreshed %d hosts in %.2f s (%d failed)", len(hosts),
                 time.monotonic() - started, failed)  # fmt: skip

    async def refresh_host(self, name: str) -> Host:
        """Fetch facts and VMs from one agent; reconcile. A silent agent is marked disconnected.
        One refresh per host at a time: two at once would both insert a newly found VM."""
        lock = self._refresh_locks.setdefault(name, asyncio.Lock())
        async with lock:
            host = await self._refresh_host(await self.host(name))
        await self._write_seen()
        return host

    async def _refresh_host(self, host: Host) -> Host:
        """Refresh ``host`` (as read at most a round ago, perhaps without its facts: a round
        reads every host at once)."""
        name = host.name
        url = self.agent_url(host)
        try:
            # The poller sends the list only if it is not the one last agreed with.
            await self._take_vm_changes()
            polled = await self.poller.poll(url, host.token, self._settled_digest(host.id))
            if polled.vms is None:
                await self._take_vm_changes()
                if self._settled_digest(host.id) != polled.vms_digest:
                    polled = await self.poller.poll(url, host.token)  # unsettled meanwhile
        except HostUnreachable:
            async with self._db_gate:
                if host.connection != "disconnected":
                    await record_event(
                        self.db, f"host {name} stopped answering", severity="warning", host=name
                    )
                await self._set_host(name, connection="disconnected")
            raise
        async with self._db_gate:
            host = await self._answered(host, polled.facts)
            # The same list as when the inventory last agreed with it, and no VM written
            # since: nothing to compare (most rounds).
            await self._take_vm_changes()
            listed, vms = polled.vms_digest, polled.vms
            if self._settled_digest(host.id) == listed or vms is None:
                return host  # (no list: unsettled this instant; compared next round)
            self._unsettle(host.id)
            batches = self._vm_batches
            compared = await self._reconcile(host, vms, polled.listed_at)
            # Settled only if no VM was written meanwhile (by anyone: a write taken by
            # another host's refresh would not have unsettled this host, not yet settled).
            unwritten = self._vm_batches == batches and not self._vm_changes.pending()
            if compared is not None and unwritten:
                self._settle(host.id, listed, compared)
        return host

    def _settled_digest(self, host_id: int) -> str | None:
        settled = self._settled.get(host_id)
        return settled[0] if settled is not None else None

    def _settle(self, host_id: int, listed: str, compared: frozenset[int]) -> None:
        self._settled[host_id] = (listed, compared)
        for vm_id in compared:
            self._settled_by_vm.setdefault(vm_id, set()).add(host_id)

    def _unsettle(self, host_id: int) -> None:
        settled = self._settled.pop(host_id, None)
        if settled is None:
            return
        for vm_id in settled[1]:
            hosts = self._settled_by_vm.get(vm_id)
            if hosts is not None:
                hosts.discard(host_id)
                if not hosts:
                    del self._settled_by_vm[vm_id]

    def _unsettle_all(self) -> None:
        self._settled.clear()
        self._settled_by_vm.clear()

    async def _take_vm_changes(self) -> None:
        """Unsettle the hosts that the VM records written since the last look concern (db.Changes:
        the active center is the inventory's only writer): those that compared a written
        record, and those a written record now places on them."""
        async with self._vm_changes_lock:
            everything, ids = self._vm_changes.take()
            if not everything and not ids:
                return
            self._vm_batches += 1
            if everything or len(ids) > UNSETTLE_LOOKUP_MAX:
                self._unsettle_all()
                return
            try:
                hosts: set[int] = set()
                for vm_id in ids:
                    hosts |= self._settled_by_vm.get(vm_id, set())
                async with self.db.session() as s:
                    query = select(Vm.host_id).where(Vm.id.in_(ids), Vm.host_id.is_not(None))
                    hosts |= {h for h in await s.scalars(query) if h is not None}
            except BaseException:
                self._unsettle_all()  # the changes are taken: rather than lose them
                raise
            for host_id in hosts:
                self._unsettle(host_id)

    async def _answered(self, host: Host, facts: dict[str, Any], *, sync: bool = True) -> Host:
        """``host`` answered with ``facts``: it is seen now (in memory: ``seen``), and its
        record, datastores and networks are written only if they changed. The record read
        may be a round old: it is trusted only if this process wrote these facts last and has
        not marked the host disconnected since (``_written_facts``). Without ``sync`` (a
        precheck, outside the host's refresh lock) the datastores wait for the next refresh."""
        self._saw(host.id, datetime.now(UTC))
        # (This process wrote the record's facts last: the active center is its only writer.)
        unchanged = host.connection == "connected" and self._written_facts.get(host.id) == facts
        if unchanged:
            return host
        host = await self._set_host(
            host.name, connection="connected", facts=facts, last_seen=self.seen[host.id]
        )
        if sync:
            # Most changes are of the host's memory: its datastores and networks are written
            # only if what it says of them changed since this process last wrote them.
            stores = (facts.get("datastores"), facts.get("networks"))
            if self._written_stores.get(host.id) != stores:
                await self._sync_datastores(host, facts)
                self._written_stores[host.id] = stores
            self._written_facts[host.id] = facts
        return host

    async def fresh_facts(self, name: str, *, unreachable_ok: bool = False) -> Host:
        """Ask one agent for its facts now (no reconciliation): the precheck's input. A host
        that does not answer is marked disconnected (and returned so, if ``unreachable_ok``)."""
        host = await self.host(name)
        try:
            async with self.agent(host) as agent:
                facts = facts_json(await agent.facts())
        except HostUnreachable:
            host = await self._set_host(name, connection="disconnected")
            if unreachable_ok:
                return host
            raise
        host = await self._answered(host, facts, sync=False)
        await self._write_seen()
        return host

    async def mark_disconnected(self, name: str) -> None:
        """HA found the host failed or isolated: no placement chooses it until it answers."""
        await self._set_host(name, connection="disconnected")

    async def fresh_vm(self, vm: Vm) -> Vm:
        """Ask the VM's host for its state now."""
        assert vm.host is not None
        async with self.agent(vm.host) as agent:
            info = await agent.get_vm(vm.uuid)
        return await self.upsert_vm(vm_json(info), vm.host)

    async def _set_host(self, name: str, **fields: Any) -> Host:
        async with self.db.session() as s:
            host = await s.scalar(select(Host).where(Host.name == name))
            assert host is not None
            if fields.get("connection", "connected") != "connected" or "facts" in fields:
                self._written_facts.pop(host.id, None)  # written again at its next answer
            for key, value in fields.items():
                setattr(host, key, value)
            await s.commit()
            return host

    async def _sync_datastores(self, host: Host, facts: dict[str, Any]) -> None:
        """The host's datastores and networks as it reports them."""
        reported = sorted(facts.get("datastores", []), key=lambda info: str(info["name"]))
        nets = {str(n["name"]) for n in facts.get("networks", [])}
        new = await self._write_datastores(host, reported, nets)
        if new is not None:  # rarely: a datastore or network new to the inventory
            await self._add_to_catalog(*new)
            await self._write_datastores(host, reported, nets)

    async def _write_datastores(
        self, host: Host, reported: list[dict[str, Any]], nets: set[str]
    ) -> tuple[set[str], set[str]] | None:
        """Write what ``reported`` says of the host's datastores; or, if one of them or of
        ``nets`` is new to the inventory, write nothing and return the new names."""
        names = [str(info["name"]) for info in reported]
        async with self.db.session() as s:
            known = {d.name: d for d in await s.scalars(
                select(Datastore).where(Datastore.name.in_(names)))}  # fmt: skip
            have_nets = await s.scalars(select(Network.name).where(Network.name.in_(nets)))
            new_stores, new_nets = set(names) - known.keys(), nets - set(have_nets)
            if new_stores or new_nets:
                return new_stores, new_nets
            h = await s.get(Host, host.id, options=[selectinload(Host.datastores)])
            assert h is not None
            seen = []
            for info in reported:  # by name: hosts refreshed at once update shared rows in order
                ds = known[str(info["name"])]
                ds.shared = bool(info.get("shared"))
                ds.capacity_bytes = int(info.get("capacity_bytes", 0))
                ds.free_bytes = int(info.get("free_bytes", 0))
                if info.get("accessible"):
                    seen.append(ds)
            if {d.name for d in h.datastores} != {d.name for d in seen}:
                h.datastores = seen
            await s.commit()
        return None

    async def _add_to_catalog(self, stores: set[str], nets: set[str]) -> None:
        """New datastores and networks, made one at a time: hosts refreshed at once that share
        a datastore new to the inventory would both insert it. (Only then: under one lock, a
        fleet's refresh would write its hosts' datastores one host after another.)"""
        async with self._catalog_lock, self.db.session() as s:
            have = set(await s.scalars(select(Datastore.name).where(Datastore.name.in_(stores))))
            s.add_all(Datastore(name=n) for n in sorted(stores - have))
            have = set(await s.scalars(select(Network.name).where(Network.name.in_(nets))))
            s.add_all(Network(name=n) for n in sorted(nets - have))
            await s.commit()

    # -- VMs -----------------------------------------------------------------------------------
    async def vms(self, hosts: Collection[str] | None = None) -> list[Vm]:
        """Every VM, or those on ``hosts`` (by name)."""
        query = select(Vm).order_by(Vm.name)
        if hosts is not None:
            query = query.join(Host, Vm.host_id == Host.id).where(Host.name.in_(list(hosts)))
        async with self.db.session() as s:
            return list(await s.scalars(query))

    async def running_on(self) -> dict[str, str]:
        """The host of each powered-on VM, by name (names only: no record is read)."""
        query = (
            select(Vm.name, Host.name)
            .join(Host, Vm.host_id == Host.id)
            .where(Vm.power_state == "poweredOn")
        )
        async with self.db.session() as s:
            return {vm: host for vm, host in await s.execute(query)}

    async def vm_names_on(self, host_ids: Collection[int]) -> list[str]:
        """The names of the VMs on the hosts of ``host_ids``, sorted (kept: no read unless a VM
        was written)."""
        ids = set(host_ids)
        return [vm for vm, host in await self.kept_vm_places.values() if host in ids]

    async def vm_names(self, hosts: Collection[str]) -> list[str]:
        """The names of the VMs on ``hosts``, sorted (no records read)."""
        query = (
            select(Vm.name)
            .join(Host, Vm.host_id == Host.id)
            .where(Host.name.in_(list(hosts)))
            .order_by(Vm.name)
        )
        async with self.db.session() as s:
            return list(await s.scalars(query))

    async def vm(self, ref: str) -> Vm:
        async with self.db.session() as s:
            vm = await s.scalar(select(Vm).where((Vm.name == ref) | (Vm.uuid == ref)))
            if vm is None:
                raise NotFound(f"no VM {ref[:80]!r} in the inventory", code="vm_not_found")
            return vm

    def _newer_than(self, uuid: str, listed_at: float) -> bool:
        """Was this VM's record written after a list read at ``listed_at``?"""
        return self._written.get(uuid, 0.0) > listed_at

    async def upsert_vm(self, info: dict[str, Any], host: Host) -> Vm:
        self._written[info["uuid"]] = time.monotonic()
        async with self.db.session() as s:
            vm = await s.scalar(select(Vm).where(Vm.uuid == info["uuid"]))
            if vm is None:
                vm = Vm(uuid=info["uuid"], name=info["name"])
                s.add(vm)
            vm.host_id = host.id
            for key, value in record_fields(info).items():
                setattr(vm, key, value)
            await s.commit()
        return await self.vm(info["uuid"])

    async def set_vm(self, uuid: str, **fields: Any) -> None:
        self._written[uuid] = time.monotonic()
        async with self.db.session() as s:
            vm = await s.scalar(select(Vm).where(Vm.uuid == uuid))
            if vm is not None:
                for key, value in fields.items():
                    setattr(vm, key, value)
                await s.commit()

    async def remove_vm(self, uuid: str) -> None:
        async with self.db.session() as s:
            vm = await s.scalar(select(Vm).where(Vm.uuid == uuid))
            if vm is not None:
                await s.delete(vm)
                await s.commit()

    async def _reconcile(
        self, host: Host, reported: list[dict[str, Any]], listed_at: float
    ) -> frozenset[int] | None:
        """Agents are the truth about what runs where; alarms where the truth is impossible.
        A record written after the list was read (a power-on, a create) is newer: left as is.
        If the inventory agreed with ``reported`` on every VM, and nothing was done or left
        for later: the ids of the records compared (else None)."""
        settled = True
        # Every record this refresh may compare, in one read (not one per VM): those reported
        # and those the inventory places here; without their hosts' records (``host_id`` tells
        # whose; the rare case that needs another host's record reads the VM again).
        async with self.db.session() as s:
            uuids = [info["uuid"] for info in reported]
            query = select(Vm).where(Vm.uuid.in_(uuids) | (Vm.host_id == host.id))
            records = {vm.uuid: vm for vm in await s.scalars(query.options(raiseload(Vm.host)))}
        for info in reported:
            if self.migrating(info["name"]):
                settled = False
                continue  # the executor owns this VM's record until its migration ends
            if self._newer_than(info["uuid"], listed_at):
                settled = False
                continue
            if info["power_state"] == "incoming" or info.get("incoming"):
                settled = False
                await self._end_orphan_incoming(host, info)
                continue
            known = records.get(info["uuid"])
            if known is None:
                settled = False
                await self.upsert_vm(info, host)
                continue
            runs_here = info["power_state"] == "poweredOn" and info.get("qemu_status") == "running"
            if known.host_id is not None and known.host_id != host.id:
                settled = False
                try:
                    known = await self.vm(known.uuid)  # with its host's record
                except NotFound:
                    continue  # removed meanwhile: the next refresh finds it new
            if known.host_id is None or known.host_id == host.id:
                if not same_record(known, info, host):  # most refreshes change nothing
                    settled = False
                    await self.upsert_vm(info, host)
                continue
            assert known.host is not None
            if runs_here and known.power_state == "poweredOn":
                await self._resolve_two_reports(known, host, info)
            elif runs_here:
                await record_event(
                    self.db,
                    f"VM {known.name} found running on {host.name}, not on {known.host.name}: "
                    "inventory updated",
                    severity="warning",
                    vm=known.name,
                    host=host.name,
                )
                await self.upsert_vm(info, host)
            elif info["power_state"] == "poweredOff" and known.power_state == "poweredOn":
                await self._drop_stale_registration(host, known)
        names = {info["uuid"] for info in reported}
        for vm in records.values():
            gone = vm.host_id == host.id and vm.uuid not in names
            if gone and self._newer_than(vm.uuid, listed_at):
                settled = False
                continue  # created (or moved here) after the list was read
            if gone and self.migrating(vm.name):
                settled = False
            elif gone and vm.power_state != "missing":
                settled = False
                await record_event(
                    self.db,
                    f"VM {vm.name} is no longer registered on its host {host.name}",
                    severity="warning",
                    vm=vm.name,
                    host=host.name,
                )
                await self.set_vm(vm.uuid, power_state="missing")
        return frozenset(vm.id for vm in records.values()) if settled else None

    async def _drop_stale_registration(self, host: Host, vm: Vm) -> None:
        """``host`` still registers, powered off, a VM that runs on another host (HA restarted
        it there while ``host`` was failed or isolated): forget it there; its files stay."""
        assert vm.host is not None
        try:
            async with self.agent(host) as agent:
                await agent.unregister_vm(vm.uuid)
        except KvmotionError as exc:
            log.warning("could not drop the stale registration of %s on %s: %s", vm.name,
                        host.name, exc.message)  # fmt: skip
            return
        await record_event(
            self.db,
            f"VM {vm.name} runs on {vm.host.name}: its old registration on {host.name} "
            "(powered off) was removed",
            severity="warning", vm=vm.name, host=host.name,
        )  # fmt: skip

    async def _end_orphan_incoming(self, host: Host, info: dict[str, Any]) -> None:
        """A paused, receiving copy no migration feeds (its migration was aborted while this
        host's agent was down): end it, and the partial disk copies made for it. Not while the
        VM's own host still migrates it, or completed that (a center restarted mid-migration:
        the destination is about to resume)."""
        try:
            known = await self.vm(info["uuid"])
        except NotFound:
            known = None
        if known is not None and known.host is not None and known.host.name != host.name:
            try:
                async with self.agent(known.host) as agent:
                    theirs = await agent.get_vm(known.uuid)
            except NotFound:
                theirs = None
            except KvmotionError:
                return  # cannot tell: ask again at the next refresh
            view = theirs.migration if theirs is not None else None
            if view is not None and view.side == "source" and view.phase not in ENDED:
                return
        try:
            async with self.agent(host) as agent:
                done = await agent.abort_migration(info["uuid"])
        except KvmotionError as exc:
            log.warning("could not end the orphaned incoming %s on %s: %s", info["name"],
                        host.name, exc.message)  # fmt: skip
            return
        await record_event(
            self.db,
            f"ended an incoming copy of VM {info['name']} on {host.name} that no migration "
            f"fed any more ({done})",
            severity="warning",
            vm=info["name"],
            host=host.name,
        )

    async def _resolve_two_reports(self, vm: Vm, other: Host, info: dict[str, Any]) -> None:
        """``other`` runs ``vm``, which the inventory places on another host. Ask that host: a
        copy left paused after a completed migration is finished there and ``other`` owns the
        VM; two running copies are an alarm, and nothing changes."""
        assert vm.host is not None
        try:
            async with self.agent(vm.host) as agent:
                theirs = await agent.get_vm(vm.uuid)
        except NotFound:
            theirs = None
        except HostUnreachable:
            return  # cannot tell yet; the next refresh asks again
        if theirs is not None and theirs.qemu_status == "running":
            await self._alarm_two_copies(vm, other)
            return
        phase = theirs.migration.phase if theirs is not None and theirs.migration else None
        if theirs is not None and phase == "completed":
            # A "change both" leaves the source's old disks to remove: only if the copy that
            # runs now uses other files.
            copied = _disk_places(vm_json(theirs)) != _disk_places(info)
            async with self.agent(vm.host) as agent:
                await agent.finish_migration(vm.uuid, remove_files=copied)
        await record_event(
            self.db,
            f"VM {vm.name} runs on {other.name} after a migration the center did not finish; "
            f"inventory updated (the copy on {vm.host.name} was {phase or 'gone'})",
            severity="warning",
            vm=vm.name,
            host=other.name,
        )
        await self.upsert_vm(info, other)

    async def _alarm_two_copies(self, vm: Vm, other: Host) -> None:
        assert vm.host is not None
        message = (
            f"VM {vm.name} reported running on both {vm.host.name} and {other.name}: "
            "not accepted; check both hosts"
        )
        log.error(message)
        await record_event(self.db, message, severity="alarm", vm=vm.name, host=other.name)
