"""A fake host agent: several hosts behind one ``httpx`` transport, for the center's unit tests.

It serves the routes the center uses (facts, VMs, the migration endpoints) from in-memory state,
routed by the request's host (``http://172.16.0.172:8700`` and ``.173`` are two agents), answers
in the real agent's shapes (every reply passes through its type in kvmotion/host/protocol.py, so
a fake that drifts from the agent fails the test; errors as ``{"error": {"code", "message"}}``
with the real status codes) and records every call.

A migration is scripted per VM (:class:`Script`): each GET of the source VM is one poll, and the
source's QEMU phase moves one step along ``Script.phases`` per poll (the last one repeats). What the
destination does when the stream completes is ``Script.dest``. Any host can "die" (raise
``httpx.ConnectError``) before or after a given route, or answer a route with an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
from pydantic import TypeAdapter

from kvmotion.host.protocol import (
    HOST_FACTS,
    VM_INFO,
    VM_LIST,
    AbortResult,
    FinishResult,
    HaReportOut,
    HostLoadOut,
    IncomingResult,
    MemoryProfileOut,
)
from kvmotion.lab.simagent import migration_view, moved, vm_config
from kvmotion.lab.simserve import ROUTES as AGENT_ROUTES
from kvmotion.lab.simserve import match_route

PORT = 8700
LONG_POLL_STEP_S = 0.01  # a long-poll of an unchanged VM polls again this often
TOKEN = "secret"
GiB = 2**30
ACTIVE = ("setup", "active", "pre-switchover", "device")

# What each route answers, as the real agent does (kvmotion/host/protocol.py).
REPLIES: dict[str, TypeAdapter[Any]] = {
    "facts": HOST_FACTS,
    "list": VM_LIST,
    **dict.fromkeys(
        (
            "create",
            "register",
            "get",
            "power_on",
            "power_off",
            "migrate",
            "cancel",
            "storage_move",
            "storage_mirror",
        ),
        VM_INFO,
    ),
    "incoming": TypeAdapter(IncomingResult),
    "memory_profile": TypeAdapter(MemoryProfileOut),
    "load": TypeAdapter(HostLoadOut),
    "ha": TypeAdapter(HaReportOut),
    "finish": TypeAdapter(FinishResult),
    "storage_cancel": TypeAdapter(AbortResult),
    "abort": TypeAdapter(AbortResult),
}


# The real agent's routes this fake serves; the others are 404, as on an older agent.
ROUTES = tuple(r for r in AGENT_ROUTES if r[0] in {*REPLIES, "unregister", "delete"})


def etag(content: Any) -> str:
    """The tag of a VM record (the real agent hashes its JSON too)."""
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=10).hexdigest()


class AgentError(Exception):
    """Answered as the real agent's error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Call:
    host: str
    route: str
    method: str
    path: str
    vm: str | None
    query: dict[str, str]
    body: Any
    status: int | None = None  # None: the host was dead and the connection failed


@dataclass
class Script:
    """How one VM's outgoing migration goes, poll by poll."""

    phases: tuple[str, ...] = ("active", "active", "device", "completed")
    error: str = "Unable to write to socket: Connection reset by peer"
    dest: str = "resume"  # on completion the destination: "resume", "hang" or "fail"
    # When the source fails or is cancelled, the destination's QEMU sees the stream end and
    # fails too (as real QEMU does); False: the center looks before the destination noticed.
    dest_notices_failure: bool = True
    # Awaited at each poll of the source, with the poll number and the phase about to be shown.
    on_poll: Callable[[int, str], Awaitable[None]] | None = None
    # A disk copy (storage or both), poll by poll: phases and the bytes copied at each.
    disk_phases: tuple[str, ...] = ("copying", "copying", "ready", "completed")
    disk_offsets: tuple[int, ...] = (GiB // 4, GiB // 2, GiB, GiB)


@dataclass
class FakeVm:
    config: dict[str, Any]
    config_path: str
    power_state: str = "poweredOff"
    qemu_status: str | None = None
    migration: dict[str, Any] | None = None
    polls: int = 0
    peer: str | None = None  # source side: the destination host's name
    storage: dict[str, Any] | None = None  # the disk copy's view
    disk_polls: int = 0
    moving_to: str | None = None  # the datastore a local copy goes to
    created: bool = False  # a destination made new disks for it (change both)
    cpu: float = 0.05  # what /v1/load says it uses (cores), while it runs

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def uuid(self) -> str:
        return str(self.config["uuid"])

    def info(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "power_state": self.power_state,
            "qemu_status": self.qemu_status,
            "pid": 4242 if self.power_state in ("poweredOn", "incoming") else None,
            "config_path": self.config_path,
            "config": self.config,
            "migration": self.migration,
            "cpu": None,
            "storage": self.storage,
            "incoming": self.power_state == "incoming",
        }


@dataclass
class FakeHost:
    name: str
    token: str = TOKEN
    facts: dict[str, Any] = field(default_factory=dict)
    vms: dict[str, FakeVm] = field(default_factory=dict)  # by name
    dead: bool = False
    die_before: set[str] = field(default_factory=set)
    die_after: dict[str, int] = field(default_factory=dict)  # route -> calls until death
    errors: dict[str, AgentError] = field(default_factory=dict)  # route -> answered error
    # What /v1/ha answers: the others' heartbeat files on "shared" as this host reads them
    # (host -> HaPeerOut's fields), and the VMs its isolation response released.
    ha_peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    ha_released: list[str] = field(default_factory=list)
    ha_fenced: list[dict[str, Any]] = field(default_factory=list)
    ha_settings: dict[str, Any] | None = None  # the last the center sent
    # What /memory-profile answers for its VMs (bytes, bytes/s; ram_bytes is the VM's).
    profile: dict[str, float] = field(
        default_factory=lambda: {
            "nonzero_bytes": 64 * 2**20, "dirty_rate_bps": 2**20, "working_set_bytes": 8 * 2**20
        }
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.facts:
            last = self.name.rsplit(".", 1)[-1]
            self.facts = {
                "name": self.name,
                "hostname": f"esx-{last}",
                "management_address": self.name,
                "migration_address": f"10.99.0.{last}",
                "cpu": {
                    "vendor": "GenuineIntel",
                    "model_name": "Intel(R) Xeon(R) CPU",
                    "count": 8,
                    "flags": ["sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2"],
                },
                "cpu_model": {},
                "migration_link_bps": None,  # unknown
                "migration_tls": {"mode": "off", "ready": True},
                "memory": {"total_bytes": 16 * GiB, "available_bytes": 12 * GiB},
                "accel": "tcg",
                "accel_reason": "fake",
                "qemu_version": "8.2.2",
                "machine_type": "pc-q35-8.2",
                "default_cpu_model": "qemu64",
                "datastores": [
                    {
                        "name": "shared",
                        "accessible": True,
                        "shared": True,
                        "capacity_bytes": 100 * GiB,
                        "free_bytes": 60 * GiB,
                        "path": "/srv/kvmotion/shared",
                    },
                    {
                        "name": f"local-{last}",
                        "accessible": True,
                        "shared": False,
                        "capacity_bytes": 100 * GiB,
                        "free_bytes": 50 * GiB,
                        "path": f"/srv/kvmotion/local-{last}",
                    },
                ],
                "networks": [{"name": "vm-network", "bridge": "kvbr-vm", "present": True}],
                "vms": 0,
                "vms_powered_on": 0,
            }

    @property
    def migration_address(self) -> str:
        return str(self.facts["migration_address"])

    def kill_before(self, route: str) -> None:
        """The next call of ``route`` (and everything after it) finds the agent dead."""
        self.die_before.add(route)

    def kill_after(self, route: str, times: int = 1) -> None:
        """The agent answers the ``times``-th call of ``route``, then dies."""
        self.die_after[route] = times

    def fail(self, route: str, status: int, code: str, message: str) -> None:
        """Answer every call of ``route`` with this error."""
        self.errors[route] = AgentError(status, code, message)

    def find(self, ref: str) -> FakeVm:
        for vm in self.vms.values():
            if ref in (vm.name, vm.uuid):
                return vm
        raise AgentError(404, "vm_not_found", f"no VM {ref!r} on host {self.name}")


class FakeAgents(httpx.AsyncBaseTransport):
    """Fake agents for any number of hosts, one transport; ``calls`` records every request."""

    def __init__(self, *names: str) -> None:
        self.hosts: dict[str, FakeHost] = {}
        self.scripts: dict[str, Script] = {}  # by VM name
        self.calls: list[Call] = []
        # Awaited at the start of every call (after it is recorded), e.g. to look at the center.
        self.on_call: Callable[[Call], Awaitable[None]] | None = None
        self._ports = itertools.count(49152)
        for name in names:
            self.add_host(name)

    # -- set-up and inspection ------------------------------------------------------------------
    def add_host(self, name: str, **kw: Any) -> FakeHost:
        self.hosts[name] = FakeHost(name, **kw)
        return self.hosts[name]

    def host(self, name: str) -> FakeHost:
        return self.hosts[name]

    def add_vm(self, host: str, name: str, *, power_state: str = "poweredOn", **kw: Any) -> FakeVm:
        config = vm_config(name, **kw)
        vm = FakeVm(
            config,
            f"/srv/kvmotion/{config['datastore']}/{name}/vm.json",
            power_state=power_state,
            qemu_status="running" if power_state == "poweredOn" else None,
        )
        self.hosts[host].vms[name] = vm
        return vm

    def vm(self, host: str, name: str) -> FakeVm | None:
        return self.hosts[host].vms.get(name)

    def script(self, vm: str, **kw: Any) -> Script:
        self.scripts[vm] = Script(**kw)
        return self.scripts[vm]

    def called(self, host: str | None = None, route: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if (host is None or c.host == host) and (route is None or c.route == route)
        ]

    def routes(self, host: str) -> list[str]:
        return [c.route for c in self.calls if c.host == host]

    # -- the transport ----------------------------------------------------------------------------
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        host = self.hosts.get(request.url.host)
        if host is None or request.url.port != PORT:
            raise httpx.ConnectError(f"no route to {request.url.host}", request=request)
        route, vm_ref = self._route(request)
        body = json.loads(request.content) if request.content else None
        query = {k: v[-1] for k, v in parse_qs(request.url.query.decode()).items()}
        call = Call(host.name, route, request.method, request.url.path, vm_ref, query, body)
        self.calls.append(call)
        if route in host.die_before:
            host.dead = True
        if host.dead:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if self.on_call is not None:
            await self.on_call(call)
        try:
            if request.headers.get("authorization") != f"Bearer {host.token}":
                raise AgentError(401, "unauthorized", "this host accepts only its center")
            if route in host.errors:
                raise host.errors[route]
            status, content = await self._answer(host, route, vm_ref, body, query)
            # A long-poll (``after`` a tag, ``wait`` seconds): more polls while nothing changes.
            deadline = time.monotonic() + float(query.get("wait", 0))
            while route == "get" and etag(content) == query.get("after"):
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(LONG_POLL_STEP_S)
                if host.dead:
                    raise httpx.ReadError("connection reset by peer", request=request)
                status, content = await self._answer(host, route, vm_ref, body, query)
        except AgentError as exc:
            status, content = exc.status, {"error": {"code": exc.code, "message": exc.message}}
        call.status = status
        if route in host.die_after:
            host.die_after[route] -= 1
            if host.die_after[route] <= 0:
                del host.die_after[route]
                host.dead = True
        if status == 204:
            return httpx.Response(204, request=request)
        headers = {"ETag": f'"{etag(content)}"'} if route == "get" and status == 200 else {}
        return httpx.Response(status, json=content, request=request, headers=headers)

    async def _answer(
        self, host: FakeHost, route: str, ref: str | None, body: Any, query: dict[str, str]
    ) -> tuple[int, Any]:
        status, content = await self._serve(host, route, ref, body, query)
        if route in REPLIES:  # answered in the protocol's shape, or the test fails here
            content = REPLIES[route].dump_python(
                REPLIES[route].validate_python(content), mode="json"
            )
        return status, content

    def _route(self, request: httpx.Request) -> tuple[str, str | None]:
        return match_route(request.method, request.url.path, ROUTES)

    async def _serve(
        self, host: FakeHost, route: str, ref: str | None, body: Any, query: dict[str, str]
    ) -> tuple[int, Any]:
        if route == "facts":
            host.facts["vms"] = len(host.vms)
            host.facts["vms_powered_on"] = sum(
                vm.power_state == "poweredOn" for vm in host.vms.values()
            )
            return 200, host.facts
        if route == "list":
            return 200, [vm.info() for vm in host.vms.values()]
        if route == "create":
            return 201, self._create(host, body).info()
        if route == "incoming":
            return 201, self._incoming(host, body)
        if route == "register":
            config = body["config"]
            if config["name"] in host.vms:
                raise AgentError(409, "wrong_state", f"VM {config['name']} is registered here")
            seen = {d["name"] for d in host.facts["datastores"]}
            for disk in config["disks"]:
                if disk["datastore"] not in seen:
                    raise AgentError(404, "disk_not_visible", f"{disk['path']} is not visible")
            vm = FakeVm(config, body["config_path"], power_state="poweredOff")
            host.vms[vm.name] = vm
            return 201, vm.info()
        if route == "load":
            running = [v for v in host.vms.values() if v.power_state == "poweredOn"]
            return 200, {
                "window_s": float(query.get("window", 300)), "interval_s": 5.0,
                "cpus": host.facts["cpu"]["count"], "host_cpu_busy": None,
                "memory_available_mib": host.facts["memory"]["available_bytes"] // 2**20,
                "vms": {v.name: {"cpu": v.cpu, "memory_mib": 100.0, "seconds": 60.0, "samples": 13}
                        for v in running},
            }  # fmt: skip
        if route == "ha":
            host.ha_settings = body["settings"]
            done = set(body["released_done"])
            host.ha_released = [u for u in host.ha_released if u not in done]
            return 200, {
                "host": host.name, "incarnation": "fake", "enabled": True, "isolated": False,
                "datastores": {"shared": {"written_age_s": 0.5, "watching_s": 600.0,
                                          "peers": host.ha_peers}},
                "fenced": host.ha_fenced, "released": host.ha_released,
            }  # fmt: skip
        if route == "memory_profile" and ref is not None:
            ram = int(host.find(ref).config["memory_mib"]) * 2**20
            return 200, {"ram_bytes": ram, **host.profile}
        if route == "unknown":
            raise AgentError(404, "not_found", "no such route")
        assert ref is not None
        vm = host.find(ref)
        if route == "get":
            await self._poll(host, vm)
            return 200, vm.info()
        if route == "power_on":
            if vm.power_state != "poweredOff":
                raise AgentError(409, "wrong_state", f"VM {vm.name} is {vm.power_state}")
            vm.power_state, vm.qemu_status = "poweredOn", "running"
            return 200, vm.info()
        if route == "power_off":
            if vm.power_state != "poweredOn":
                raise AgentError(409, "wrong_state", f"VM {vm.name} is {vm.power_state}")
            vm.power_state, vm.qemu_status = "poweredOff", None
            return 200, vm.info()
        if route == "delete":
            if vm.power_state != "poweredOff":
                raise AgentError(
                    409, "wrong_state", f"VM {vm.name} is {vm.power_state}: shut it down first"
                )
            del host.vms[vm.name]
            return 204, None
        if route == "unregister":
            if vm.power_state != "poweredOff":
                raise AgentError(409, "wrong_state", f"VM {vm.name} is {vm.power_state}")
            del host.vms[vm.name]
            return 204, None
        if route == "migrate":
            return 202, self._migrate(host, vm, body)
        if route == "cancel":
            self._cancel(vm)
            return 200, vm.info()
        if route == "finish":
            self._finish(host, vm)
            return 200, {"problems": []}
        if route == "storage_move":
            return 202, self._start_copy(host, vm, "local", body["datastore"])
        if route == "storage_mirror":
            return 202, self._start_copy(host, vm, "nbd", body["datastore"])
        if route == "storage_cancel":
            return 200, {"done": self._cancel_copy(vm)}
        if route == "abort":
            return 200, {"done": self._abort(host, vm, query.get("destination_gone") == "true")}
        raise AssertionError(route)

    # -- what a real agent does -------------------------------------------------------------------
    def _create(self, host: FakeHost, spec: dict[str, Any]) -> FakeVm:
        name = spec["name"]
        if name in host.vms:
            raise AgentError(409, "vm_exists", f"VM {name} already exists")
        nets = tuple(n["network"] for n in spec.get("nics", []))
        return self.add_vm(
            host.name,
            name,
            power_state="poweredOff",
            memory_mib=spec.get("memory_mib", 256),
            datastore=spec["datastore"],
            networks=nets,
        )

    def _incoming(self, host: FakeHost, body: dict[str, Any]) -> dict[str, Any]:
        config = body["config"]
        existing = host.vms.get(config["name"])
        if existing is not None and existing.power_state != "poweredOff":
            raise AgentError(
                409, "conflict", f"VM {config['name']} is already {existing.power_state} here"
            )
        uri = f"tcp:{host.migration_address}:{next(self._ports)}"
        path = body["config_path"]
        datastore = body.get("datastore")
        if datastore is not None:
            self._check_datastore(host, datastore)
            config = moved(config, datastore)
            path = f"/srv/kvmotion/{datastore}/{config['name']}/vm.json"
        vm = FakeVm(config, path, power_state="incoming", created=datastore is not None)
        vm.migration = migration_view("destination", "listening", uri, {"listening": time.time()})
        host.vms[vm.name] = vm
        port = next(self._ports) if datastore is not None else None
        nbd_host = host.migration_address if port else None
        return {"vm": vm.info(), "uri": uri, "nbd_host": nbd_host, "nbd_port": port}

    def _check_datastore(self, host: FakeHost, datastore: str) -> None:
        if datastore not in {d["name"] for d in host.facts["datastores"]}:
            raise AgentError(404, "datastore_not_found", f"datastore {datastore!r} is not here")

    def _start_copy(self, host: FakeHost, vm: FakeVm, mode: str, datastore: str) -> dict[str, Any]:
        if vm.power_state != "poweredOn":
            raise AgentError(409, "wrong_state", f"VM {vm.name} is {vm.power_state}")
        if vm.storage is not None and vm.storage["phase"] in ("copying", "ready"):
            raise AgentError(409, "already_migrating", f"VM {vm.name}'s disks are being copied")
        if mode == "local":
            self._check_datastore(host, datastore)
        vm.disk_polls, vm.moving_to = 0, datastore
        vm.storage = {
            "mode": mode,
            "phase": "copying",
            "datastore": datastore,
            "disks": [
                {"index": 0, "source_node": "disk0", "target_node": "t0", "target": "x",
                 "job": "mirror-disk0", "length": GiB, "offset": 0, "status": "copying",
                 "error": None}
            ],
            "marks": {"started": time.time()},
            "error": None,
        }  # fmt: skip
        return vm.info()

    def _copy_poll(self, vm: FakeVm) -> None:
        """A GET of a VM whose disks are being copied: the copy moves one step."""
        view = vm.storage
        if view is None or view["phase"] not in ("copying", "ready"):
            return
        script = self.scripts.get(vm.name, Script())
        i = min(vm.disk_polls, len(script.disk_phases) - 1)
        vm.disk_polls += 1
        phase = script.disk_phases[i]
        if phase == "completed" and view["mode"] == "nbd":
            phase = "ready"  # a copy for another host completes only at switchover
        view["disks"][0]["offset"] = script.disk_offsets[min(i, len(script.disk_offsets) - 1)]
        if phase == "ready":
            view["marks"].setdefault("ready", time.time())
        if phase == "completed":
            assert vm.moving_to is not None
            view["marks"]["completed"] = time.time()
            vm.config = moved(vm.config, vm.moving_to)
            vm.config_path = f"/srv/kvmotion/{vm.moving_to}/{vm.name}/vm.json"
        if phase == "failed":
            view["error"] = "write error on the copy"
        view["phase"] = phase

    def _cancel_copy(self, vm: FakeVm) -> str:
        view = vm.storage
        if view is None:
            raise AgentError(409, "no_migration", f"VM {vm.name} has no disk copy")
        if view["phase"] == "completed":
            raise AgentError(409, "too_late", "the disks have switched to their copies")
        view["phase"] = "cancelled"
        return "disk copy cancelled; the VM keeps its disks"

    def _migrate(self, host: FakeHost, vm: FakeVm, body: dict[str, Any]) -> dict[str, Any]:
        if vm.power_state != "poweredOn" or vm.qemu_status != "running":
            raise AgentError(409, "conflict", f"VM {vm.name} is {vm.power_state}: cannot migrate")
        if vm.migration is not None and vm.migration["phase"] in ACTIVE:
            raise AgentError(409, "already_migrating", f"VM {vm.name} is already migrating")
        address = body["uri"].split(":")[1]
        peers = [h.name for h in self.hosts.values() if h.migration_address == address]
        vm.peer = peers[0] if peers else None
        vm.polls = 0
        vm.migration = migration_view(
            "source", "setup", body["uri"], {"migrate_started": time.time()}
        )
        vm.migration["stats"] = _stats(vm, "setup", 0, 1)
        return vm.info()

    async def _poll(self, host: FakeHost, vm: FakeVm) -> None:
        """A GET of a migrating source VM: QEMU moves one step along the script."""
        self._copy_poll(vm)
        view = vm.migration
        if view is None or view["side"] != "source" or view["phase"] not in ACTIVE:
            return
        script = self.scripts.get(vm.name, Script())
        phase = script.phases[min(vm.polls, len(script.phases) - 1)]
        vm.polls += 1
        if script.on_poll is not None:
            await script.on_poll(vm.polls, phase)
        if view["phase"] not in ACTIVE:  # the hook may have cancelled it
            return
        now = time.time()
        view["phase"] = phase
        view["stats"] = _stats(vm, phase, vm.polls, len(script.phases))
        if phase in ("active", "pre-switchover", "device", "completed"):
            view["marks"].setdefault("first_byte", now)
        if phase == "active":
            view["samples"].append(
                {
                    "t": round(vm.polls * 0.1, 3),
                    "pass_no": vm.polls,
                    "transferred_bytes": view["stats"]["transferred_bytes"],
                    "remaining_bytes": view["stats"]["remaining_bytes"],
                    "dirty_rate_bps": 1_000_000,
                    "throughput_bps": 12_500_000.0,
                    "expected_downtime_ms": 30,
                    "throttle_pct": 0,
                }
            )
        if phase in ("pre-switchover", "device"):
            view["marks"].setdefault("stunned", now)
            vm.qemu_status = "finish-migrate"
            if vm.storage is not None and vm.storage["phase"] == "ready":
                vm.storage["phase"] = "completed"  # the copies end consistent at switchover
        elif phase == "completed":
            view["marks"].setdefault("stunned", now)
            view["marks"]["completed"] = now
            vm.qemu_status = "postmigrate"
            self._destination_completes(vm, script)
        elif phase in ("failed", "cancelled"):
            view["error"] = script.error if phase == "failed" else None
            view["marks"][phase] = now
            vm.qemu_status = "running"
            if script.dest_notices_failure:
                self._destination_fails(vm, "load of migration failed: Input/output error")

    def _peer(self, vm: FakeVm) -> FakeVm | None:
        if vm.peer is None or vm.peer not in self.hosts:
            return None
        peer = self.hosts[vm.peer].vms.get(vm.name)
        if peer is None or peer.migration is None or peer.migration["side"] != "destination":
            return None
        return peer

    def _destination_completes(self, vm: FakeVm, script: Script) -> None:
        dest = self._peer(vm)
        if dest is None or dest.power_state != "incoming":
            return
        assert dest.migration is not None
        if script.dest == "resume":
            dest.power_state, dest.qemu_status = "poweredOn", "running"
            dest.migration["phase"] = "resumed"
            dest.migration["marks"]["resumed"] = time.time()
            dest.migration["stats"] = _stats(dest, "completed", 1, 1)
        elif script.dest == "fail":
            self._destination_fails(vm, "error while loading state for instance 0x0 of device")
        else:  # "hang": still paused, never resumed
            dest.migration["phase"] = "active"

    def _destination_fails(self, vm: FakeVm, error: str) -> None:
        dest = self._peer(vm)
        if dest is None or dest.power_state != "incoming":
            return
        assert dest.migration is not None
        dest.migration["phase"] = "failed"
        dest.migration["error"] = error
        dest.power_state, dest.qemu_status = "poweredOff", None

    def _cancel(self, vm: FakeVm) -> None:
        view = vm.migration
        if view is None or view["side"] != "source":
            raise AgentError(409, "no_migration", f"VM {vm.name} has no outgoing migration")
        if view["phase"] == "completed":
            raise AgentError(409, "too_late", "migration already completed: it cannot be cancelled")
        if view["phase"] in ACTIVE:
            view["phase"] = "cancelled"
            view["marks"]["cancelled"] = time.time()
            self._destination_fails(vm, "cancelled by the source")
        vm.qemu_status = "running"

    def _finish(self, host: FakeHost, vm: FakeVm) -> None:
        view = vm.migration
        if view is None or view["side"] != "source":
            raise AgentError(409, "no_migration", f"VM {vm.name} has no outgoing migration")
        if view["phase"] != "completed":
            raise AgentError(
                409, "not_completed", f"migration of {vm.name} is {view['phase']}, not completed"
            )
        del host.vms[vm.name]

    def _abort(self, host: FakeHost, vm: FakeVm, destination_gone: bool) -> str:
        view = vm.migration
        if vm.storage is not None and vm.storage["phase"] in ("copying", "ready"):
            vm.storage["phase"] = "cancelled"
            if view is None or view["phase"] not in ACTIVE:
                return "source kept running, its disk copy cancelled"
        if (view is not None and view["side"] == "destination") or vm.power_state == "incoming":
            if vm.power_state == "poweredOn":
                raise AgentError(
                    409, "too_late", f"VM {vm.name} already resumed on this host: it is the owner"
                )
            del host.vms[vm.name]
            if vm.created:
                return "destination ended, its partial disk copies removed"
            return "destination ended"
        if view is not None and view["side"] == "source":
            if view["phase"] == "completed":
                if not destination_gone:
                    raise AgentError(
                        409,
                        "too_late",
                        f"migration of {vm.name} completed: the destination owns it",
                    )
                vm.qemu_status = "running"
                view["phase"] = "aborted"
                view["marks"]["source_resumed"] = time.time()
                return "source resumed (the destination's copy had ended)"
            self._cancel(vm)
            return "source kept running"
        return "nothing to abort"


def _stats(vm: FakeVm, phase: str, poll: int, polls: int) -> dict[str, Any]:
    total = int(vm.config["memory_mib"]) * 2**20
    done = phase == "completed"
    transferred = total if done else total * poll // (polls + 1)
    return {
        "status": phase,
        "total_time_ms": 100 * poll,
        "setup_time_ms": 3,
        "downtime_ms": 42 if done else None,
        "expected_downtime_ms": 30,
        "transferred_bytes": transferred,
        "remaining_bytes": total - transferred,
        "total_bytes": total,
        "dirty_pages_rate": 250,
        "page_size": 4096,
        "mbps": 100.0,
        "passes": poll,
        "throttle_pct": 0,
        "error": None,
    }


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` (the event loop keeps running) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {predicate}")
        await asyncio.sleep(0.002)
