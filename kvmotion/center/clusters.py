"""Clusters and their EVC mode, as vCenter has them.

A cluster's EVC mode is the CPU baseline every VM powered on in it gets, so that any VM can move
to any host of the cluster. Setting a mode is refused when a member host cannot support it (named,
with the features it lacks) or when a powered-on VM uses features beyond it (named: it needs a
power cycle). Adding a host that cannot support the cluster's mode is refused. Per-VM EVC is set
while the VM is powered off and never above its cluster's mode. The decisions are the pure
functions of :mod:`kvmotion.cpu.compat`; this module gathers their inputs from hosts' facts.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from kvmotion.center.db import Cluster, Database, Host, Vm
from kvmotion.center.inventory import Inventory, compact_json, cpu_facts
from kvmotion.center.tasks import record_event
from kvmotion.cpu import compat
from kvmotion.cpu.catalog import EvcMode, get_mode
from kvmotion.errors import Conflict, NotFound, PreconditionError


def host_cpu(host: Host) -> compat.HostCpu:
    cpu = cpu_facts(host)
    return compat.HostCpu(frozenset(cpu.get("features", ())), cpu.get("vendor"))


def mode_baseline(mode: EvcMode, hosts: list[Host]) -> compat.Baseline:
    """The mode's features as the hosts' QEMU reports them (any host that knows the mode)."""
    for host in hosts:
        for entry in cpu_facts(host).get("evc_modes", []):
            if entry["key"] == mode.key and entry.get("features"):
                return compat.Baseline(mode, frozenset(entry["features"]))
    others = sorted(h.name for h in hosts if cpu_facts(h).get("vendor") not in (None, mode.vendor))
    if others:
        theirs = compat.vendor_name(cpu_facts(hosts[0]).get("vendor"))
        raise Conflict(
            f"host {', '.join(others)} has {theirs} CPUs; EVC mode {mode.label} is for "
            f"{compat.vendor_name(mode.vendor)} hosts "
            "(Intel and AMD never mix)",
            code="evc_mode_refused",
        )
    raise PreconditionError(
        f"no host reports the features of EVC mode {mode.label}: their QEMU lacks model "
        f"{mode.qemu_model} (the mode needs QEMU {mode.min_qemu} or newer)",
        code="evc_mode_unavailable",
    )


def _refuse(refusals: list[compat.Refusal], code: str) -> None:
    if refusals:
        raise Conflict(
            "; ".join(r.message for r in refusals),
            code=code,
            refusals=[
                {"kind": str(r.kind), "subject": r.subject, "missing": list(r.missing)}
                for r in refusals
            ],
        )


class Clusters:
    def __init__(self, db: Database, inventory: Inventory) -> None:
        self.db = db
        self.inventory = inventory
        # GET /v1/clusters' answer and what it was made from (``list_json``)
        self._listed: tuple[list[tuple[int, str, str | None]], list[Any], list[Any], bytes] | None
        self._listed = None

    async def all(self) -> list[Cluster]:
        async with self.db.session() as s:
            return list(await s.scalars(select(Cluster).order_by(Cluster.name)))

    async def get(self, name: str) -> Cluster:
        async with self.db.session() as s:
            cluster = await s.scalar(select(Cluster).where(Cluster.name == name))
            if cluster is None:
                raise NotFound(f"no cluster {name[:80]!r}", code="cluster_not_found")
            return cluster

    async def create(self, name: str) -> Cluster:
        async with self.db.session() as s:
            if await s.scalar(select(Cluster).where(Cluster.name == name)) is not None:
                raise Conflict(f"cluster {name!r} already exists", code="cluster_exists")
            dc_id = await s.scalar(select(Cluster.datacenter_id).limit(1))
            cluster = Cluster(name=name, datacenter_id=dc_id or 1)
            s.add(cluster)
            await s.commit()
            return cluster

    async def members(self, cluster: Cluster) -> list[Host]:
        async with self.db.session() as s:
            query = select(Host).where(Host.cluster_id == cluster.id).order_by(Host.name)
            return list(await s.scalars(query))

    async def describe(self, name: str) -> dict[str, Any]:
        """The cluster, its hosts, its VMs, and for each EVC mode which hosts support it."""
        return await self.describe_record(await self.get(name))

    async def list_json(self) -> bytes:
        """Every cluster described (``describe``), encoded: GET /v1/clusters, which every web
        client asks for every 5 s. Kept while the clusters' rows and the kept hosts and VM
        places (inventory.Kept: the same list objects until a record is written) are the
        same."""
        clusters = await self.all()
        key = [(c.id, c.name, c.evc_mode) for c in clusters]
        hosts = await self.inventory.kept_hosts.values()
        places = await self.inventory.kept_vm_places.values()
        kept = self._listed
        if kept is not None and kept[0] == key and kept[1] is hosts and kept[2] is places:
            return kept[3]
        body = compact_json([await self.describe_record(c) for c in clusters])
        self._listed = key, hosts, places, body
        return body

    async def describe_record(self, cluster: Cluster) -> dict[str, Any]:
        hosts = [h for h in await self.inventory.kept_hosts.values() if h.cluster_id == cluster.id]
        names = {h.name for h in hosts}
        modes: dict[str, dict[str, Any]] = {}
        for host in hosts:
            for entry in host.evc_modes:
                row = modes.setdefault(
                    entry["key"],
                    {"key": entry["key"], "label": entry["label"], "vendor": entry["vendor"],
                     "feature_count": len(entry.get("features", [])), "hosts": {}},
                )  # fmt: skip
                row["hosts"][host.name] = {
                    "supported": entry["supported"],
                    "missing": entry.get("missing", []),
                }
        return {
            "name": cluster.name,
            "evc_mode": cluster.evc_mode,
            "hosts": sorted(names),
            "vms": await self.inventory.vm_names_on([h.id for h in hosts]),
            "evc_modes": list(modes.values()),
        }

    async def add_host(self, name: str, host_name: str) -> Cluster:
        """Move a host into the cluster; refused if it cannot support the cluster's mode."""
        cluster = await self.get(name)
        host = await self.inventory.refresh_host(host_name)
        if cluster.evc_mode is not None:
            mode = get_mode(cluster.evc_mode)
            baseline = mode_baseline(mode, [host, *await self.members(cluster)])
            refusals = compat.check_cluster_mode(baseline, {host.name: host_cpu(host)}, {})
            _refuse(refusals, "host_cannot_join")
            await self._check_running_vms(host, baseline)
        async with self.db.session() as s:
            row = await s.get(Host, host.id)
            assert row is not None
            row.cluster_id = cluster.id
            await s.commit()
        await record_event(self.db, f"host {host.name} moved into cluster {name}", host=host.name)
        return cluster

    async def _check_running_vms(self, host: Host, baseline: compat.Baseline) -> None:
        vms = {
            v.name: frozenset((v.cpu or {}).get("features", ()))
            for v in await self.inventory.vms()
            if v.host and v.host.name == host.name and v.power_state == "poweredOn"
        }
        _refuse(compat.check_cluster_mode(baseline, {}, vms), "vm_needs_power_cycle")

    async def set_evc(self, name: str, mode_key: str | None) -> Cluster:
        """Set (or clear, with None) the cluster's EVC mode, as vCenter checks it."""
        cluster = await self.get(name)
        if mode_key is not None:
            mode = get_mode(mode_key)
            hosts = [await self.inventory.refresh_host(h.name) for h in await self.members(cluster)]
            if not hosts:
                raise PreconditionError(
                    f"cluster {name} has no hosts: add hosts before choosing an EVC mode",
                    code="cluster_empty",
                )
            baseline = mode_baseline(mode, hosts)
            names = {h.name for h in hosts}
            running = {
                v.name: frozenset((v.cpu or {}).get("features", ()))
                for v in await self.inventory.vms()
                if v.host and v.host.name in names and v.power_state == "poweredOn"
            }
            refusals = compat.check_cluster_mode(
                baseline, {h.name: host_cpu(h) for h in hosts}, running
            )
            _refuse(refusals, "evc_mode_refused")
        async with self.db.session() as s:
            row = await s.get(Cluster, cluster.id)
            assert row is not None
            row.evc_mode = mode_key
            await s.commit()
        await record_event(self.db, f"cluster {name}: EVC mode set to {mode_key or 'disabled'}")
        return await self.get(name)

    async def cluster_of(self, vm: Vm) -> Cluster | None:
        if vm.host is None or vm.host.cluster_id is None:
            return None
        async with self.db.session() as s:
            return await s.get(Cluster, vm.host.cluster_id)

    async def effective_mode(self, vm: Vm) -> str | None:
        """The EVC mode a VM powered on now gets: its own, else its cluster's."""
        if vm.evc_mode is not None:
            return vm.evc_mode
        cluster = await self.cluster_of(vm)
        return cluster.evc_mode if cluster else None

    async def set_vm_evc(self, vm_ref: str, mode_key: str | None) -> Vm:
        """Per-VM EVC: only while powered off, never above the cluster's mode."""
        vm = await self.inventory.vm(vm_ref)
        if vm.power_state != "poweredOff":
            raise Conflict(
                f"VM {vm.name} is {vm.power_state}: set its EVC mode while it is powered off",
                code="wrong_state",
            )
        if mode_key is not None:
            mode = get_mode(mode_key)
            cluster = await self.cluster_of(vm)
            hosts = await self.members(cluster) if cluster else ([vm.host] if vm.host else [])
            vm_base = mode_baseline(mode, hosts)
            if cluster is not None and cluster.evc_mode is not None:
                cluster_base = mode_baseline(get_mode(cluster.evc_mode), hosts)
                if not compat.vm_mode_allowed(vm_base, cluster_base):
                    raise Conflict(
                        f"EVC mode {mode.label} is above cluster {cluster.name}'s mode "
                        f"{cluster_base.mode.label}: choose that mode or a lower one",
                        code="vm_evc_above_cluster",
                    )
        await self.inventory.set_vm(vm.uuid, evc_mode=mode_key)
        return await self.inventory.vm(vm.uuid)
