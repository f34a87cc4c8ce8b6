"""A simulated fleet of host agents: the real agent's API over in-memory VMs, for scale tests.

SIMULATION. Nothing here runs QEMU, copies a byte or touches a disk: each host is a record of
facts and VMs in memory, and a migration is a clock that moves figures the way QEMU's
``query-migrate`` moves them (passes over a link of ``SimSpeed.link_bps``, pages dirtied at
``dirty_bps`` while the guest runs, a switchover once the rest fits in the downtime limit),
then the destination resumes the VM and the source keeps a paused copy until the center
finishes it. What the center reads is what the real agent answers: every reply is one of
:mod:`kvmotion.host.protocol`'s shapes (``Fleet.validate`` checks each one, as the unit tests'
fake does), errors are the real agent's codes and statuses, a ``GET /v1/vms/{vm}?after=TAG&wait=S``
is a long-poll answered at once on a step and at most every ``RECHECK_S`` on progress alone. So
the real center (inventory refresh, precheck, compute, storage and "change both" migrations,
power) runs against it unmodified. What it does not simulate: post-copy (refused), consoles,
image imports (an empty list), HA's heartbeat files (a host that sees no peers).

One process serves thousands of hosts (:mod:`kvmotion.lab.simserve` gives each a port on
127.0.0.1); every host's migration address is a loopback address no one listens on: nothing is
ever sent there. This module is the state and its behaviour, free of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from kvmotion.errors import Conflict, InvalidInput, NotFound
from kvmotion.host.protocol import (
    HOST_FACTS,
    VM_INFO,
    VM_LIST,
    AbortResult,
    DiskMirrorRequest,
    FinishResult,
    HaReportOut,
    HostLoadOut,
    IncomingRequest,
    IncomingResult,
    MemoryProfileOut,
    MigrateRequest,
    ShutdownResult,
    StorageMoveRequest,
    TuneRequest,
    VmCreateRequest,
)
from kvmotion.pulse import Pulse

GiB = 2**30
MiB = 2**20
ACTIVE = ("setup", "active", "pre-switchover", "device")
RECHECK_S = 0.2  # progress alone is answered to a long-poll at most this often (as host/watch.py)
MAX_WAIT_S = 30.0


@dataclass(frozen=True)
class SimSpeed:
    """The simulated hardware: a migration of a 512 MiB guest takes about 4.5 s."""

    link_bps: float = 125e6  # 1 Gbit/s migration link, bytes/s
    disk_bps: float = 250e6  # a disk copy, bytes/s
    dirty_bps: float = 8 * MiB  # what a running guest dirties, bytes/s
    tick_s: float = 0.1  # the simulated QEMU's figures move this often
    downtime_ms: int = 30  # the stun at switchover


@dataclass
class SimVm:
    config: dict[str, Any]
    config_path: str
    power_state: str = "poweredOff"
    qemu_status: str | None = None
    migration: dict[str, Any] | None = None
    storage: dict[str, Any] | None = None
    created: bool = False  # a destination made new disks for it (change both)
    steps: int = 0  # bumped on a step (power, phase, marks): a long-poll answers at once
    figures: int = 0  # bumped on progress alone
    changed: Pulse = field(default_factory=Pulse)
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def uuid(self) -> str:
        return str(self.config["uuid"])

    @property
    def tag(self) -> str:
        """``STEPS-ALL`` as the real agent's ETag: the first half changes on a step only."""
        return f"{self.uuid[:8]}{self.steps}-{self.steps}.{self.figures}"

    def step(self) -> None:
        self.steps += 1
        self.changed.beat()

    def progress(self) -> None:
        self.figures += 1
        self.changed.beat()

    def info(self) -> dict[str, Any]:
        running = self.power_state in ("poweredOn", "incoming")
        return {
            "uuid": self.uuid,
            "name": self.name,
            "power_state": self.power_state,
            "qemu_status": self.qemu_status,
            "pid": 4242 if running else None,
            "config_path": self.config_path,
            "config": self.config,
            "migration": self.migration,
            "cpu": None,
            "storage": self.storage,
            "incoming": self.power_state == "incoming",
            "ram_pad_kib": 0 if running else None,
        }


def vm_config(
    name: str,
    datastore: str = "shared",
    *,
    memory_mib: int = 256,
    disk_mib: int = 64,
    networks: tuple[str, ...] = ("vm-network",),
    cpu_model: str = "qemu64",
    boot_image: str | None = "kvmotion-guest",
) -> dict[str, Any]:
    """A VM's config as the agent stores it (kvmotion/host/vmconfig.py), one disk per VM."""
    vm_uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{name}.kvmotion.test"))
    return {
        "uuid": vm_uuid,
        "name": name,
        "datastore": datastore,
        "vcpus": 1,
        "memory_mib": memory_mib,
        "disks": [
            {"datastore": datastore, "path": f"{name}/{name}.qcow2", "size_mib": disk_mib,
             "format": "qcow2"}
        ],
        "nics": [{"network": net, "mac": _mac(vm_uuid, i)} for i, net in enumerate(networks)],
        "cpu_model": cpu_model,
        "machine_type": "pc-q35-8.2",
        "boot_image": boot_image,
        "kernel_args": "",
        "created_at": "2024-01-01T00:00:00+00:00",
    }  # fmt: skip


def _mac(vm_uuid: str, index: int) -> str:
    return f"52:54:00:{vm_uuid[:2]}:{vm_uuid[2:4]}:{index:02x}"


def moved(config: dict[str, Any], datastore: str) -> dict[str, Any]:
    """A VM config with its record and disks on ``datastore`` (as VmConfig.moved_to)."""
    disks = [d | {"datastore": datastore} for d in config["disks"]]
    return config | {"datastore": datastore, "disks": disks}


@dataclass
class SimHost:
    index: int
    port: int
    token: str
    shared: str  # the shared datastore of its group
    vms: dict[str, SimVm] = field(default_factory=dict)  # by name
    version: int = 0  # bumped when its VM list or facts change (cached answers)

    @property
    def name(self) -> str:
        return f"sim-{self.index:04d}"

    @property
    def local(self) -> str:
        return f"local-{self.index:04d}"

    @property
    def migration_address(self) -> str:
        # Loopback, and no one listens there: the sim never sends to it.
        return f"127.1.{self.index // 250}.{self.index % 250 + 1}"

    def touch(self) -> None:
        self.version += 1

    def find(self, ref: str) -> SimVm:
        vm = self.vms.get(ref)
        if vm is not None:
            return vm
        for vm in self.vms.values():
            if vm.uuid == ref:
                return vm
        raise NotFound(f"no VM {ref[:80]!r} on host {self.name}", code="vm_not_found")

    def facts(self) -> dict[str, Any]:
        used = sum(int(v.config["memory_mib"]) * MiB for v in self.vms.values()
                   if v.power_state != "poweredOff")  # fmt: skip
        total = 512 * GiB
        return {
            "name": self.name,
            "hostname": self.name,
            "management_address": "127.0.0.1",
            "migration_address": self.migration_address,
            "cpu": {
                "vendor": "GenuineIntel",
                "model_name": "Simulated Xeon",
                "count": 64,
                "flags": ["sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2"],
            },
            "cpu_model": {},
            "migration_link_bps": 125_000_000,
            "migration_tls": {"mode": "off", "ready": True},
            "memory": {"total_bytes": total, "available_bytes": total - used},
            "accel": "kvm",
            "accel_reason": "simulated",
            "qemu_version": "8.2.2",
            "machine_type": "pc-q35-8.2",
            "machine_types": ["pc-q35-8.2"],
            "default_cpu_model": "qemu64",
            "datastores": [
                {"name": self.shared, "accessible": True, "shared": True,
                 "capacity_bytes": 100 * 1024 * GiB, "free_bytes": 60 * 1024 * GiB,
                 "path": f"/srv/kvmotion/{self.shared}"},
                {"name": self.local, "accessible": True, "shared": False,
                 "capacity_bytes": 4096 * GiB, "free_bytes": 3072 * GiB,
                 "path": f"/srv/kvmotion/{self.local}"},
            ],
            "networks": [{"name": "vm-network", "bridge": "kvbr-vm", "present": True}],
            "vms": len(self.vms),
            "vms_powered_on": sum(v.power_state == "poweredOn" for v in self.vms.values()),
        }  # fmt: skip


# What each reply is, in the protocol (checked when ``Fleet.validate``).
REPLIES: dict[str, TypeAdapter[Any]] = {
    "facts": HOST_FACTS,
    "list": VM_LIST,
    "vm": VM_INFO,
    "incoming": TypeAdapter(IncomingResult),
    "memory_profile": TypeAdapter(MemoryProfileOut),
    "load": TypeAdapter(HostLoadOut),
    "ha": TypeAdapter(HaReportOut),
    "finish": TypeAdapter(FinishResult),
    "abort": TypeAdapter(AbortResult),
    "shutdown": TypeAdapter(ShutdownResult),
}


class Fleet:
    """Every simulated host, by port; the migrations between them run as asyncio tasks."""

    def __init__(self, token: str, speed: SimSpeed | None = None, validate: bool = False) -> None:
        self.token = token
        self.speed = speed or SimSpeed()
        self.validate = validate
        self.hosts: dict[int, SimHost] = {}  # by port
        self._by_address: dict[str, SimHost] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ports = 20000  # the simulated listening ports handed out (never opened)
        self.requests: dict[str, int] = {}  # route -> count

    # -- the fleet ------------------------------------------------------------------------------
    def add_host(self, index: int, port: int, group: int, vms: int) -> SimHost:
        host = SimHost(index, port, self.token, shared=f"shared-{group:03d}")
        self.hosts[port] = host
        self._by_address[host.migration_address] = host
        for j in range(vms):
            config = vm_config(
                f"vm-{index:04d}-{j:02d}", host.shared, memory_mib=512, disk_mib=1024,
                boot_image=None,
            )  # fmt: skip
            vm = SimVm(config, _record(config), "poweredOn", "running")
            host.vms[vm.name] = vm
        return host

    def checked(self, route: str, content: Any) -> Any:
        if self.validate and route in REPLIES:
            REPLIES[route].validate_python(content)
        return content

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reads ----------------------------------------------------------------------------------
    async def watch(self, host: SimHost, ref: str, after: str | None, wait_s: float) -> SimVm:
        """The long-poll of host/watch.py: at once on a step (or with no ``after``), at most
        every RECHECK_S on progress alone, else after ``wait_s``."""
        started = time.monotonic()
        deadline = started + min(max(wait_s, 0.0), MAX_WAIT_S)
        after_steps = (after or "").partition("-")[0]
        while True:
            vm = host.find(ref)
            beat = vm.changed.next()
            tag, now = vm.tag, time.monotonic()
            if after is None or now >= deadline or tag.partition("-")[0] != after_steps:
                return vm
            if tag != after:
                if now >= started + RECHECK_S:
                    return vm
                timeout = started + RECHECK_S - now
            else:
                timeout = min(RECHECK_S, deadline - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await beat.wait()

    def load(self, host: SimHost, window: float) -> dict[str, Any]:
        running = [v for v in host.vms.values() if v.power_state == "poweredOn"]
        return {
            "window_s": window, "interval_s": 5.0, "cpus": 64, "host_cpu_busy": 0.1,
            "memory_available_mib": host.facts()["memory"]["available_bytes"] // MiB,
            "vms": {v.name: {"cpu": 0.05, "memory_mib": float(v.config["memory_mib"]),
                             "seconds": window, "samples": int(window // 5)} for v in running},
        }  # fmt: skip

    def ha(self, host: SimHost) -> dict[str, Any]:
        return {"host": host.name, "incarnation": "sim", "enabled": False, "isolated": False,
                "datastores": {}, "fenced": [], "released": []}  # fmt: skip

    # -- power and registration -----------------------------------------------------------------
    def create(self, host: SimHost, body: dict[str, Any]) -> SimVm:
        req = VmCreateRequest.model_validate(body)
        if req.name in host.vms:
            raise Conflict(f"VM {req.name} already exists", code="vm_exists")
        self._check_datastore(host, req.datastore)
        disk_mib = (req.disks[0].size_mib or 64) if req.disks else 64
        config = vm_config(
            req.name, req.datastore, memory_mib=req.memory_mib, disk_mib=disk_mib,
            boot_image=req.boot_image,
        )  # fmt: skip
        config["vcpus"] = req.vcpus
        config["nics"] = [{"network": n.network, "mac": n.mac or _mac(config["uuid"], i)}
                          for i, n in enumerate(req.nics)]  # fmt: skip
        vm = SimVm(config, _record(config))
        host.vms[vm.name] = vm
        host.touch()
        return vm

    def power(self, host: SimHost, ref: str, action: str) -> SimVm:
        vm = host.find(ref)
        want = "poweredOff" if action == "power_on" else "poweredOn"
        if vm.power_state != want or (vm.migration and vm.migration["phase"] in ACTIVE):
            raise Conflict(f"VM {vm.name} is {vm.power_state}", code="wrong_state")
        if action == "power_on":
            vm.power_state, vm.qemu_status = "poweredOn", "running"
        elif action == "reset":
            vm.power_state = "poweredOn"
        else:
            vm.power_state, vm.qemu_status = "poweredOff", None
        vm.migration = None
        vm.step()
        host.touch()
        return vm

    def remove(self, host: SimHost, ref: str) -> None:
        """Delete or unregister: only a powered-off VM."""
        vm = host.find(ref)
        if vm.power_state != "poweredOff":
            raise Conflict(f"VM {vm.name} is {vm.power_state}: shut it down first",
                           code="wrong_state")  # fmt: skip
        del host.vms[vm.name]
        vm.step()
        host.touch()

    def register(self, host: SimHost, body: dict[str, Any]) -> SimVm:
        config = body["config"]
        if config["name"] in host.vms:
            raise Conflict(f"VM {config['name']} is registered here", code="wrong_state")
        for disk in config["disks"]:
            self._check_datastore(host, disk["datastore"])
        vm = SimVm(config, body["config_path"])
        host.vms[vm.name] = vm
        host.touch()
        return vm

    def _check_datastore(self, host: SimHost, datastore: str) -> None:
        if datastore not in (host.shared, host.local):
            raise NotFound(f"datastore {datastore!r} is not on {host.name}",
                           code="datastore_not_found")  # fmt: skip

    # -- a migration's destination --------------------------------------------------------------
    def incoming(self, host: SimHost, body: dict[str, Any]) -> dict[str, Any]:
        req = IncomingRequest.model_validate(body)
        config = req.config.model_dump(mode="json")
        existing = host.vms.get(config["name"])
        if existing is not None and existing.power_state != "poweredOff":
            raise Conflict(f"VM {config['name']} is already {existing.power_state} here",
                           code="conflict")  # fmt: skip
        path = req.config_path
        if req.datastore is not None:
            self._check_datastore(host, req.datastore)
            config = moved(config, req.datastore)
            path = _record(config)
        vm = SimVm(config, path, "incoming", "inmigrate", created=req.datastore is not None)
        uri = f"tcp:{host.migration_address}:{self._port()}"
        vm.migration = migration_view("destination", "listening", uri, {"listening": time.time()})
        host.vms[vm.name] = vm
        host.touch()
        nbd = self._port() if req.datastore is not None else None
        return {"vm": vm.info(), "uri": uri, "switchover_token": f"sim{self._port()}",
                "nbd_host": host.migration_address if nbd else None, "nbd_port": nbd}  # fmt: skip

    def _port(self) -> int:
        self._ports = 20000 + (self._ports - 19999) % 40000
        return self._ports

    # -- a migration's source -------------------------------------------------------------------
    def migrate(self, host: SimHost, ref: str, body: dict[str, Any]) -> SimVm:
        req = MigrateRequest.model_validate(body)
        vm = host.find(ref)
        if vm.power_state != "poweredOn" or vm.qemu_status != "running":
            raise Conflict(f"VM {vm.name} is {vm.power_state}: cannot migrate", code="conflict")
        if vm.migration is not None and vm.migration["phase"] in ACTIVE:
            raise Conflict(f"VM {vm.name} is already migrating", code="already_migrating")
        if req.postcopy:
            raise InvalidInput("the simulated agent does not simulate post-copy")
        dest = self._by_address.get(req.uri.split(":")[1])
        if dest is None:
            raise Conflict(f"no simulated host listens at {req.uri}", code="conflict")
        vm.knobs = {"downtime_limit_ms": req.downtime_limit_ms,
                    "max_bandwidth_bps": req.max_bandwidth_bps, "throttle_pct": 0}  # fmt: skip
        vm.migration = migration_view("source", "setup", req.uri, {"migrate_started": time.time()})
        vm.migration["knobs"] = dict(vm.knobs)
        vm.migration["stats"] = _stats("setup", 0, int(vm.config["memory_mib"]) * MiB, 0, 0, 0, 0)
        vm.step()
        handover = req.switchover_token is not None
        self._spawn(self._memory(host, vm, dest, handover), f"sim-migrate-{vm.name}")
        return vm

    def tune(self, host: SimHost, ref: str, body: dict[str, Any]) -> SimVm:
        req = TuneRequest.model_validate(body)
        vm = host.find(ref)
        if vm.migration is None or vm.migration["side"] != "source":
            raise Conflict(f"VM {vm.name} has no outgoing migration", code="no_migration")
        for key in ("downtime_limit_ms", "max_bandwidth_bps", "throttle_pct"):
            if getattr(req, key) is not None:
                vm.knobs[key] = getattr(req, key)
        vm.migration["knobs"] = dict(vm.knobs)
        vm.step()
        return vm

    async def _memory(self, host: SimHost, vm: SimVm, dest: SimHost, handover: bool) -> None:
        """QEMU's pre-copy, simulated: pass after pass until the rest fits in the downtime
        limit, then the stun, the last pages, and the destination resumes."""
        sp = self.speed
        view = vm.migration
        assert view is not None
        ram = int(vm.config["memory_mib"]) * MiB
        started = time.monotonic()
        sent, remaining, dirty, passes = 0, ram, 0.0, 1
        await asyncio.sleep(sp.tick_s)
        while view["phase"] in ("setup", "active"):
            target = self._peer(dest, vm)
            if target is None:  # the destination's copy ended: the stream breaks
                self._end_source(vm, "failed", "Unable to write to socket: Connection reset")
                return
            bw = min(sp.link_bps, vm.knobs.get("max_bandwidth_bps") or sp.link_bps)
            if view["phase"] == "setup":
                view["phase"] = "active"
                view["marks"]["first_byte"] = time.time()
                vm.step()
            step = min(remaining, int(bw * sp.tick_s))
            sent, remaining = sent + step, remaining - step
            throttle = int(vm.knobs.get("throttle_pct") or 0)
            dirty = min(ram / 4, dirty + sp.dirty_bps * (1 - throttle / 100) * sp.tick_s)
            limit_ms = int(vm.knobs.get("downtime_limit_ms") or 300)
            expected = int((remaining + dirty) / bw * 1000)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            view["stats"] = _stats("active", elapsed_ms, ram, sent, remaining + int(dirty),
                                   passes, expected, throttle, bw)  # fmt: skip
            if remaining <= 0:
                view["samples"].append({
                    "t": round(elapsed_ms / 1000, 3), "pass_no": passes,
                    "transferred_bytes": sent, "remaining_bytes": int(dirty),
                    "dirty_rate_bps": int(sp.dirty_bps), "throughput_bps": bw,
                    "expected_downtime_ms": expected, "throttle_pct": throttle,
                })  # fmt: skip
                if expected <= limit_ms:
                    await self._switchover(host, vm, target, ram, sent + int(dirty), started,
                                           handover)  # fmt: skip
                    return
                remaining, dirty, passes = int(dirty), 0.0, passes + 1
                vm.step()  # a new pass is a step
            else:
                vm.progress()
            await asyncio.sleep(sp.tick_s)

    async def _switchover(
        self, host: SimHost, vm: SimVm, dest: SimVm, ram: int, sent: int, started: float,
        handover: bool,
    ) -> None:  # fmt: skip
        sp, view = self.speed, vm.migration
        assert view is not None
        now = time.time()
        view["phase"], vm.qemu_status = "pre-switchover", "finish-migrate"
        view["marks"]["stunned"] = now
        if vm.storage is not None and vm.storage["phase"] == "ready":
            _copy_done(vm.storage)  # the disk mirrors end consistent with the guest stunned
        if handover and dest.migration is not None:
            dest.migration["marks"]["traffic_taken"] = now
        vm.step()
        await asyncio.sleep(sp.downtime_ms / 2000)
        view["phase"] = "device"
        vm.step()
        await asyncio.sleep(sp.downtime_ms / 2000)
        elapsed = int((time.monotonic() - started) * 1000)
        view["phase"], vm.qemu_status = "completed", "postmigrate"
        view["marks"]["completed"] = time.time()
        view["stats"] = _stats("completed", elapsed, ram, sent, 0, len(view["samples"]), 0,
                               int(vm.knobs.get("throttle_pct") or 0), sp.link_bps)  # fmt: skip
        view["stats"]["downtime_ms"] = sp.downtime_ms
        vm.step()
        # The destination resumes the guest itself on completion (as the real agent does).
        if dest.power_state == "incoming" and dest.migration is not None:
            dest.power_state, dest.qemu_status = "poweredOn", "running"
            dest.migration["phase"] = "resumed"
            dest.migration["marks"]["resumed"] = time.time()
            dest.migration["stats"] = _stats("completed", elapsed, ram, sent, 0, 1, 0)
            dest.step()
        for h in (host, self._by_address.get(view["uri"].split(":")[1])):
            if h is not None:
                h.touch()

    def _peer(self, dest: SimHost, vm: SimVm) -> SimVm | None:
        peer = dest.vms.get(vm.name)
        if peer is None or peer.power_state != "incoming" or peer.migration is None:
            return None
        return peer if peer.migration["phase"] not in ("failed", "cancelled") else None

    def _end_source(self, vm: SimVm, phase: str, error: str | None) -> None:
        view = vm.migration
        assert view is not None
        view["phase"], view["error"] = phase, error
        view["marks"][phase] = time.time()
        vm.qemu_status = "running"
        if view.get("stats"):
            view["stats"]["status"] = phase
        vm.step()
        dest = self._by_address.get(view["uri"].split(":")[1])
        peer = self._peer(dest, vm) if dest is not None else None
        if peer is not None and peer.migration is not None:  # QEMU there sees the stream end
            peer.migration["phase"], peer.migration["error"] = "failed", "load of migration failed"
            peer.power_state, peer.qemu_status = "poweredOff", None
            peer.step()

    def cancel(self, host: SimHost, ref: str) -> SimVm:
        vm = host.find(ref)
        view = vm.migration
        if view is None or view["side"] != "source":
            raise Conflict(f"VM {vm.name} has no outgoing migration", code="no_migration")
        if view["phase"] == "completed":
            raise Conflict("migration already completed: it cannot be cancelled", code="too_late")
        if view["phase"] in ACTIVE:
            self._end_source(vm, "cancelled", None)
        return vm

    def finish(self, host: SimHost, ref: str) -> dict[str, Any]:
        vm = host.find(ref)
        view = vm.migration
        if view is None or view["side"] != "source":
            raise Conflict(f"VM {vm.name} has no outgoing migration", code="no_migration")
        if view["phase"] != "completed":
            raise Conflict(f"migration of {vm.name} is {view['phase']}, not completed",
                           code="not_completed")  # fmt: skip
        del host.vms[vm.name]
        vm.step()
        host.touch()
        return {"problems": []}

    def abort(self, host: SimHost, ref: str, destination_gone: bool) -> str:
        vm = host.find(ref)
        view = vm.migration
        if vm.storage is not None and vm.storage["phase"] in ("copying", "ready"):
            vm.storage["phase"] = "cancelled"
            vm.step()
            if view is None or view["phase"] not in ACTIVE:
                return "source kept running, its disk copy cancelled"
        if (view is not None and view["side"] == "destination") or vm.power_state == "incoming":
            if vm.power_state == "poweredOn":
                raise Conflict(f"VM {vm.name} already resumed on this host: it is the owner",
                               code="too_late")  # fmt: skip
            del host.vms[vm.name]
            vm.step()
            host.touch()
            return "destination ended" + (", its partial disk copies removed" if vm.created else "")
        if view is not None and view["side"] == "source":
            if view["phase"] == "completed":
                if not destination_gone:
                    raise Conflict(f"migration of {vm.name} completed: the destination owns it",
                                   code="too_late")  # fmt: skip
                vm.qemu_status, view["phase"] = "running", "aborted"
                vm.step()
                return "source resumed (the destination's copy had ended)"
            if view["phase"] in ACTIVE:
                self._end_source(vm, "cancelled", None)
            return "source kept running"
        return "nothing to abort"

    # -- disk copies: Storage vMotion (local) and the disk side of "change both" (nbd) ----------
    def move_storage(self, host: SimHost, ref: str, body: dict[str, Any]) -> SimVm:
        req = StorageMoveRequest.model_validate(body)
        self._check_datastore(host, req.datastore)
        return self._start_copy(host, host.find(ref), "local", req.datastore)

    def mirror(self, host: SimHost, ref: str, body: dict[str, Any]) -> SimVm:
        req = DiskMirrorRequest.model_validate(body)
        return self._start_copy(host, host.find(ref), "nbd", req.datastore)

    def _start_copy(self, host: SimHost, vm: SimVm, mode: str, datastore: str) -> SimVm:
        if vm.power_state != "poweredOn":
            raise Conflict(f"VM {vm.name} is {vm.power_state}", code="wrong_state")
        if vm.storage is not None and vm.storage["phase"] in ("copying", "ready"):
            raise Conflict(f"VM {vm.name}'s disks are being copied", code="already_migrating")
        disks = [
            {"index": i, "source_node": f"disk{i}", "target_node": f"copy{i}",
             "target": f"{datastore}/{d['path']}", "job": f"mirror-disk{i}",
             "length": int(d["size_mib"]) * MiB, "offset": 0, "status": "copying", "error": None}
            for i, d in enumerate(vm.config["disks"])
        ]  # fmt: skip
        vm.storage = {"mode": mode, "phase": "copying", "datastore": datastore, "disks": disks,
                      "marks": {"started": time.time()}, "error": None}  # fmt: skip
        vm.step()
        self._spawn(self._copy(host, vm, vm.storage), f"sim-copy-{vm.name}")
        return vm

    async def _copy(self, host: SimHost, vm: SimVm, view: dict[str, Any]) -> None:
        sp = self.speed
        while view["phase"] == "copying":
            await asyncio.sleep(sp.tick_s)
            if view["phase"] != "copying":
                return
            for disk in view["disks"]:
                disk["offset"] = min(disk["length"], disk["offset"] + int(sp.disk_bps * sp.tick_s))
            if all(d["offset"] >= d["length"] for d in view["disks"]):
                for disk in view["disks"]:
                    disk["status"] = "ready"
                view["phase"] = "ready"
                view["marks"]["ready"] = time.time()
                vm.step()
            else:
                vm.progress()
        if view["mode"] == "local" and view["phase"] == "ready":
            # Every copy ready: the agent pivots by itself, and the record follows.
            await asyncio.sleep(sp.tick_s)
            if view["phase"] == "ready":
                vm.config = moved(vm.config, view["datastore"])
                vm.config_path = _record(vm.config)
                _copy_done(view)
                vm.step()
                host.touch()

    def cancel_storage(self, host: SimHost, ref: str) -> str:
        vm = host.find(ref)
        view = vm.storage
        if view is None:
            raise Conflict(f"VM {vm.name} has no disk copy", code="no_migration")
        if view["phase"] == "completed":
            raise Conflict("the disks have switched to their copies", code="too_late")
        view["phase"] = "cancelled"
        vm.step()
        return "disk copy cancelled; the VM keeps its disks"


def _copy_done(view: dict[str, Any]) -> None:
    view["phase"] = "completed"
    view["marks"]["completed"] = time.time()
    for disk in view["disks"]:
        disk["status"] = "completed"


def _record(config: dict[str, Any]) -> str:
    return f"/srv/kvmotion/{config['datastore']}/{config['name']}/vm.json"


def migration_view(side: str, phase: str, uri: str, marks: dict[str, float]) -> dict[str, Any]:
    """A migration's view as the agent reports it, at its start (kvmotion/host/protocol.py)."""
    return {"side": side, "phase": phase, "uri": uri, "stats": None, "samples": [],
            "marks": marks, "error": None, "knobs": {}}  # fmt: skip


def _stats(
    status: str, elapsed_ms: int, total: int, sent: int, remaining: int, passes: int,
    expected_ms: int, throttle: int = 0, bps: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    return {
        "status": status, "total_time_ms": elapsed_ms, "setup_time_ms": 3,
        "downtime_ms": None, "expected_downtime_ms": expected_ms,
        "transferred_bytes": sent, "remaining_bytes": remaining, "total_bytes": total,
        "dirty_pages_rate": 2048, "page_size": 4096, "mbps": round(bps * 8 / 1e6, 1),
        "passes": passes, "throttle_pct": throttle, "error": None,
    }  # fmt: skip
