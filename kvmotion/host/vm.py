"""One VM as its host runs it: power state, QEMU process, QMP session, taps.

The power state is an enum with guarded transitions; every operation takes the VM's lock. A VM's
QEMU outlives the agent: :meth:`VirtualMachine.detach` lets go of it, :meth:`attach` finds it
again. A watcher task notices when QEMU ends (guest powered off, crash, kill) and cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kvmotion import faults
from kvmotion.errors import Conflict, InvalidInput, NotFound, QemuError
from kvmotion.host import guestmem, taps
from kvmotion.host.cpu import VmCpu
from kvmotion.host.datastores import Datastores
from kvmotion.host.migration import (
    ACTIVE,
    ANNOUNCE,
    Incoming,
    MigrationStats,
    MigrationView,
    Outgoing,
)
from kvmotion.host.storage import (
    ColdCopy,
    DiskMirror,
    StorageView,
    delete_node,
    disk_files,
    disk_nodes,
    export_disks,
    local_target,
    nbd_target,
    stop_exports,
    yank,
)
from kvmotion.host.tls import MigrationTls
from kvmotion.host.vmconfig import VmConfig
from kvmotion.host.vmfiles import create_vm_files, remove_folders, remove_vm_files, write_record
from kvmotion.qemu.cmdline import DiskLaunch, NicLaunch, QemuLaunch
from kvmotion.qemu.process import QemuHandle
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

BASE_KERNEL_ARGS = "console=ttyS0 panic=-1"


# Pages per GiB that QEMU's calc-dirty-rate hashes (its maximum; the default, 512, is one page per
# 2 MiB): a guest dirtying 12 MiB/s over 24 MiB of 256 MiB measured 4-20 MiB/s (stdev 4.2) with
# 512, and 8-15 (stdev 1.8) with 4096, 30 samples each; a low sample made a prediction say "no
# brake needed" for a guest that needed one (issue 13).
DIRTY_SAMPLE_PAGES = 4096


class PowerState(StrEnum):
    POWERED_OFF = "poweredOff"
    POWERING_ON = "poweringOn"
    POWERED_ON = "poweredOn"
    POWERING_OFF = "poweringOff"
    # Destination of a live migration: QEMU runs paused, receiving; not yet the VM's owner.
    INCOMING = "incoming"


_TRANSITIONS: dict[PowerState, set[PowerState]] = {
    # POWERED_ON from POWERED_OFF: an agent (re)started and found the VM's QEMU running.
    PowerState.POWERED_OFF: {PowerState.POWERING_ON, PowerState.INCOMING, PowerState.POWERED_ON},
    PowerState.INCOMING: {PowerState.POWERED_ON, PowerState.POWERED_OFF},
    PowerState.POWERING_ON: {PowerState.POWERED_ON, PowerState.POWERED_OFF},
    PowerState.POWERED_ON: {PowerState.POWERING_OFF, PowerState.POWERED_OFF},
    PowerState.POWERING_OFF: {PowerState.POWERED_OFF, PowerState.POWERED_ON},
}


@dataclass(frozen=True)
class VmEnvironment:
    """What a host gives its VMs.

    The last four act on the host itself (they need root or a real QEMU): the agent passes
    ``QemuProcess.start``/``find`` and ``taps.create_tap``/``delete_tap``; unit tests pass fakes.
    """

    datastores: Datastores
    bridges: dict[str, str]  # network name -> bridge
    image_dir: Path | None
    accel: str
    tls: MigrationTls  # how streams to and from other hosts are encrypted
    start_qemu: Callable[[QemuLaunch], Awaitable[QemuHandle]]  # raises QemuError
    find_qemu: Callable[[Path, str], QemuHandle | None]  # by pidfile and the VM's uuid
    create_tap: Callable[[str, str], Awaitable[None]]  # tap name, bridge
    delete_tap: Callable[[str], Awaitable[None]]  # tap name; one that is gone is fine


@dataclass(frozen=True)
class VmInfo:
    uuid: str
    name: str
    power_state: str
    qemu_status: str | None
    pid: int | None
    config_path: str
    config: VmConfig
    migration: MigrationView | None
    cpu: VmCpu | None  # the CPU it runs (or last ran) with on this host
    storage: StorageView | None  # its disks' copy, while one runs (or how the last ended)
    incoming: bool  # registered as a migration's destination, not (yet) the VM's owner


class VirtualMachine:
    def __init__(self, config: VmConfig, config_path: Path, run_dir: Path, env: VmEnvironment):
        self.config = config
        self.config_path = config_path
        self.run_dir = run_dir
        self.env = env
        self.state = PowerState.POWERED_OFF
        self.process: QemuHandle | None = None
        self.qmp: QmpSession | None = None
        self.lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.migration: Outgoing | Incoming | None = None
        self.incoming = False  # registered as a migration's destination, not yet the owner
        self.cpu: VmCpu | None = None  # chosen at power-on (or given by the migration source)
        self.storage: DiskMirror | ColdCopy | None = None
        # Folders made on this host for this VM's new copy (a "change both" destination, or a
        # storage move's target): removed if the copy does not become the VM's.
        self.created: list[Path] = []
        self.moving_to: Path | None = None  # a storage move's new record, until it pivots
        self.log = log.getChild(config.name)

    # -- paths and launch description --------------------------------------------------------
    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    def _set_state(self, new: PowerState) -> None:
        if new is not self.state and new not in _TRANSITIONS[self.state]:
            raise Conflict(
                f"VM {self.config.name} is {self.state}; cannot go to {new}", code="wrong_state"
            )
        self.state = new

    def launch(self, *, incoming: bool = False) -> QemuLaunch:
        cfg = self.config
        kernel = initrd = None
        if cfg.boot_image is not None:
            if self.env.image_dir is None:
                raise NotFound("this host has no image directory", code="image_not_found")
            kernel = self.env.image_dir / cfg.boot_image / "vmlinuz"
            initrd = self.env.image_dir / cfg.boot_image / "initrd.img"
            if not kernel.exists() or not initrd.exists():
                raise NotFound(
                    f"boot image {cfg.boot_image!r} is not in {self.env.image_dir} on this host "
                    "(run `kvmotion image build` and install it there)",
                    code="image_not_found",
                )
        disks = tuple(
            DiskLaunch(f"disk{i}", self.env.datastores.resolve(d.datastore, d.path), d.format)
            for i, d in enumerate(cfg.disks)
        )
        nics = []
        for i, nic in enumerate(cfg.nics):
            if nic.network not in self.env.bridges:
                raise NotFound(
                    f"network {nic.network!r} does not exist on this host", code="network_not_found"
                )
            nics.append(NicLaunch(f"net{i}", taps.tap_name(cfg.uuid, i), nic.mac))
        return QemuLaunch(
            name=cfg.name,
            uuid=cfg.uuid,
            vcpus=cfg.vcpus,
            memory_mib=cfg.memory_mib,
            machine_type=cfg.machine_type,
            accel=self.env.accel,
            cpu_model=self.cpu.model if self.cpu is not None else cfg.cpu_model,
            qmp_socket=self.qmp_socket,
            pidfile=self.pidfile,
            console_log=self.console_log,
            kernel=kernel,
            initrd=initrd,
            append=f"{BASE_KERNEL_ARGS} {cfg.kernel_args}".strip(),
            disks=disks,
            nics=tuple(nics),
            incoming=incoming,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    async def power_on(self) -> None:
        """Start QEMU and let the guest run. Raises Conflict unless powered off."""
        if self.state is not PowerState.POWERED_OFF:
            raise Conflict(f"VM {self.config.name} is already {self.state}", code="wrong_state")
        if self.storage is not None and self.storage.running:
            raise Conflict(
                f"VM {self.config.name}'s disks are being copied: power it on after the copy",
                code="wrong_state",
            )
        await self._start(incoming=False)
        self._set_state(PowerState.POWERED_ON)

    async def prepare_incoming(
        self, migration_address: str, *, postcopy: bool = False, export: bool = False
    ) -> tuple[str, int | None]:
        """Start QEMU paused, receiving on ``migration_address``; return the URI to send to,
        and with ``export`` the port where its (new, empty) disks are served over NBD.

        When the stream completes the guest resumes here at once and the VM is powered on.
        """
        if self.state is not PowerState.POWERED_OFF:
            raise Conflict(
                f"VM {self.config.name} is already {self.state} here", code="wrong_state"
            )
        await self._start(incoming=True)
        assert self.qmp is not None
        qmp = self.qmp
        incoming = Incoming(
            qmp,
            self.config.name,
            on_resumed=self._resumed_here,
            before_resume=(lambda: stop_exports(qmp)) if export else None,
        )
        self.migration = incoming
        try:
            creds = await self.env.tls.creds(qmp, "server")
            port = None
            if export:
                nodes = [f"disk{i}" for i in range(len(self.config.disks))]
                port = await export_disks(qmp, migration_address, nodes, tls_creds=creds)
            uri = await incoming.listen(migration_address, postcopy=postcopy, tls_creds=creds)
            await faults.hold("prepare")
            return uri, port
        except BaseException:
            await self._cleanup_after_exit(kill=True)
            raise

    def _resumed_here(self) -> None:
        self._set_state(PowerState.POWERED_ON)
        self.created = []  # the new copy is the VM's own now
        self.write_registration(incoming=False)

    async def _start(self, *, incoming: bool) -> None:
        if self.env.find_qemu(self.pidfile, self.config.uuid) is not None:
            raise Conflict(f"VM {self.config.name} already has a QEMU running", code="wrong_state")
        launch = self.launch(incoming=incoming)
        for disk in launch.disks:
            if not disk.path.exists():
                raise NotFound(
                    f"disk {disk.path} of {self.config.name} is missing", code="disk_missing"
                )
        self._set_state(PowerState.INCOMING if incoming else PowerState.POWERING_ON)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.console_log.unlink(missing_ok=True)
            for i, nic in enumerate(self.config.nics):
                await self.env.create_tap(
                    taps.tap_name(self.config.uuid, i), self.env.bridges[nic.network]
                )
            self.process = await self.env.start_qemu(launch)
            await self._connect()
        except BaseException:
            await self._cleanup_after_exit(kill=True)
            raise

    def write_registration(self, *, incoming: bool) -> None:
        """Record on this host that the VM is registered here (``incoming``: not yet owned)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        body = {
            "config_path": str(self.config_path),
            "incoming": incoming,
            "cpu": dataclasses.asdict(self.cpu) if self.cpu is not None else None,
            "created": [str(p) for p in self.created],
            "moving_to": str(self.moving_to) if self.moving_to else None,
        }
        # The registration is a commit point (a storage move's switch): write it atomically.
        path = self.run_dir / "registration.json"
        tmp = path.with_name(".registration.json.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(body))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        self.incoming = incoming

    async def attach(self) -> bool:
        """Find this VM's QEMU left running by an earlier agent. True if it runs.

        A destination whose agent died mid-migration: if the stream had completed, the guest is
        resumed here now (the source stays in postmigrate and never resumes by itself, so
        this copy is the only one); if it had not, the VM stays incoming until the center aborts.
        """
        process = self.env.find_qemu(self.pidfile, self.config.uuid)
        if process is None:
            await self._remove_taps()
            return False
        self.process = process
        try:
            await self._connect()
        except QemuError:
            self.log.warning("QEMU pid %d runs but QMP does not answer", process.pid)
        still_incoming = False
        if self.incoming and self.qmp is not None:
            still_incoming = await self._recover_incoming(self.qmp)
        self._set_state(PowerState.INCOMING if still_incoming else PowerState.POWERED_ON)
        if self.moving_to is not None:
            await self._recover_storage_move()
        elif self.qmp is not None and not self.incoming:
            # A "change both" source whose agent stopped mid-copy: end its copy, close its nodes.
            try:
                await self._end_copy_jobs(self.qmp)
                done = await self._recover_outgoing(self.qmp)
                if done:
                    self.log.warning("after an agent restart: %s", done)
            except QemuError as exc:
                self.log.error("could not end a migration left in QEMU: %s", exc.message)
        self.log.info("re-attached to QEMU pid %d (%s)", process.pid, self.state)
        return True

    async def _recover_outgoing(
        self, qmp: QmpSession, *, destination_gone: bool = False
    ) -> str | None:
        """An outgoing migration that outlived its agent's watch. QEMU waits at pre-switchover
        for a ``migrate-continue`` nobody will send (the guest stunned), or streams on unwatched:
        cancel it; the guest runs here again and the center sees the migration fail. One that
        completed is left as it is (the destination owns the guest) unless the caller has seen
        the destination's copy end (``destination_gone``): then the guest resumes here. Returns
        what it did, or None when QEMU had no migration to recover."""
        stats = MigrationStats.parse(await qmp.execute("query-migrate"))
        if stats.status in ("setup", "active", "pre-switchover", "cancelling"):
            with contextlib.suppress(QemuError):
                await qmp.execute("migrate_cancel")
            for _ in range(100):  # QEMU cancels within a moment; bounded at 10 s
                stats = MigrationStats.parse(await qmp.execute("query-migrate"))
                if stats.status not in ACTIVE:
                    break
                await asyncio.sleep(0.1)
            status = await qmp.query_status()
            if not status.running and status.status in ("paused", "finish-migrate"):
                await qmp.execute("cont")
            return "the migration left in QEMU was cancelled and the guest runs here"
        if stats.status == "completed" and destination_gone:
            status = await qmp.query_status()
            if not status.running:
                await qmp.execute("cont")
                return "source resumed (the destination's copy had ended)"
        return None

    async def _recover_incoming(self, qmp: QmpSession) -> bool:
        """A destination's copy whose agent restarted: resume a completed stream (this copy is
        the VM now); True if the stream is still incomplete (the copy stays incoming)."""
        stats = MigrationStats.parse(await qmp.execute("query-migrate"))
        status = await qmp.query_status()
        if stats.status == "completed" and not status.running:
            await stop_exports(qmp)  # harmless without exports; never leave disks served
            await qmp.execute("cont")
            await qmp.execute("announce-self", ANNOUNCE)
            self.created = []
            self.write_registration(incoming=False)
            self.log.warning("resumed after an agent restart: the incoming stream had completed")
            return False
        if status.running:
            self.created = []
            self.write_registration(incoming=False)
            return False
        return True

    async def _recover_storage_move(self) -> None:
        """The agent stopped during a storage move (QEMU's jobs outlive it): end the jobs left,
        then look at what each device uses. All copies: the move is recorded; none: the copies
        go; some: recorded as they are. If QEMU cannot be asked, nothing is touched."""
        assert self.moving_to is not None
        if self.qmp is None:
            self.log.error("a storage move was interrupted and QMP does not answer: kept as is")
            return
        try:
            new = VmConfig.model_validate_json(self.moving_to.read_text())
            await self._end_copy_jobs(self.qmp)
            used = await self._copies_in_use(new)
        except (OSError, ValueError, QemuError, Conflict) as exc:
            self.log.error("cannot settle an interrupted storage move: %s (kept as is)", exc)
            return
        if used == "all":
            await self._switch_to_copies(new, self.moving_to, [])
            self.log.warning("completed a storage move interrupted by an agent restart")
        elif used == "none":
            self.drop_copies()
            self.log.warning("cancelled a storage move interrupted by an agent restart")

    async def _end_copy_jobs(self, qmp: QmpSession, timeout: float = 60.0) -> None:
        """Cancel the disk-copy jobs a stopped agent left in QEMU (yanking NBD connections
        first) and wait until QEMU reports none; closes stale NBD client nodes."""
        jobs = [
            j for j in await qmp.execute("query-block-jobs") if j["device"].startswith("mirror-")
        ]
        stale_nbd = [
            str(n["node-name"])
            for n in await qmp.execute("query-named-block-nodes", {"flat": True})
            if str(n.get("node-name", "")).startswith("nbd-disk")
        ]
        if stale_nbd:
            await yank(qmp, stale_nbd)
        for job in jobs:
            if job.get("status") not in ("pending", "concluded", "waiting"):
                with contextlib.suppress(QemuError):
                    await qmp.execute("block-job-cancel", {"device": job["device"], "force": True})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [
                j
                for j in await qmp.execute("query-block-jobs")
                if j["device"].startswith("mirror-")
            ]
            if not left:
                break
            await asyncio.sleep(0.2)
        else:
            raise QemuError("disk-copy jobs left by a stopped agent did not end")
        for node in stale_nbd:
            await delete_node(qmp, node)

    async def _connect(self) -> None:
        assert self.process is not None
        self.qmp = QmpSession(self.qmp_socket, self.config.name)
        await self.qmp.connect(timeout=10)
        self._watcher = asyncio.create_task(
            self._watch(self.process), name=f"watch-{self.config.name}"
        )

    async def _watch(self, process: QemuHandle) -> None:
        await process.wait_exit(None)
        self.log.info("QEMU pid %d ended", process.pid)
        if self.process is process:
            await self._cleanup_after_exit(kill=False)  # POWERED_OFF

    async def _cleanup_after_exit(self, *, kill: bool) -> None:
        if self.migration is not None:
            # Keep the view (a center may still read how it ended); stop watching QEMU.
            await self.migration.close()
        if self.storage is not None:
            await self.storage.close()
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        if kill and self.process is not None:
            await self.process.kill()
        self.process = None
        await self._remove_taps()
        self.pidfile.unlink(missing_ok=True)
        self._set_state(PowerState.POWERED_OFF)  # allowed from every state

    async def _remove_taps(self) -> None:
        for i in range(len(self.config.nics)):
            await self.env.delete_tap(taps.tap_name(self.config.uuid, i))

    async def shutdown(self, timeout: float = 60.0) -> str:
        """Ask the guest to power off (ACPI); past ``timeout``, power off hard. Says which."""
        if self.state is not PowerState.POWERED_ON or self.process is None:
            raise Conflict(f"VM {self.config.name} is {self.state}", code="wrong_state")
        if timeout < 0:
            raise InvalidInput("timeout must be >= 0")
        self._set_state(PowerState.POWERING_OFF)
        process = self.process
        with contextlib.suppress(QemuError):
            if self.qmp is not None:
                await self.qmp.execute("system_powerdown")
        if await process.wait_exit(timeout):
            await self._stopped(process)
            return "guest"
        self.log.warning("guest did not power off in %.0f s: powering off hard", timeout)
        await self._hard_stop(process)
        return "hard"

    async def power_off(self) -> None:
        """Power off at once (pull the plug): QMP quit, then SIGKILL."""
        if self.state is not PowerState.POWERED_ON or self.process is None:
            raise Conflict(f"VM {self.config.name} is {self.state}", code="wrong_state")
        self._set_state(PowerState.POWERING_OFF)
        await self._hard_stop(self.process)

    async def _hard_stop(self, process: QemuHandle) -> None:
        with contextlib.suppress(QemuError):
            if self.qmp is not None:
                await self.qmp.execute("quit", timeout=5)
        if not await process.wait_exit(5):
            await process.kill()
        await self._stopped(process)

    async def _stopped(self, process: QemuHandle) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        # The watcher may have been cancelled halfway through its own cleanup: finish it here
        # (cleanup is idempotent), unless a new QEMU of this VM already runs.
        if self.process is process or self.process is None:
            await self._cleanup_after_exit(kill=False)

    async def reset(self) -> None:
        if self.state is not PowerState.POWERED_ON or self.qmp is None:
            raise Conflict(f"VM {self.config.name} is {self.state}", code="wrong_state")
        await self.qmp.execute("system_reset")

    async def detach(self) -> None:
        """Let go of QEMU without stopping it (the agent is stopping)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.qmp is not None:
            await self.qmp.close()

    # -- live migration --------------------------------------------------------------------------
    async def migrate_out(
        self,
        uri: str,
        max_bandwidth_bps: int,
        downtime_limit_ms: int,
        *,
        brake: bool = False,
        postcopy: bool = False,
    ) -> None:
        """Start sending this running VM to ``uri``. Raises Conflict if it cannot migrate now."""
        if self.state is not PowerState.POWERED_ON or self.qmp is None:
            raise Conflict(f"VM {self.config.name} is {self.state}: only a running VM migrates")
        if isinstance(self.migration, Outgoing) and self.migration.running:
            raise Conflict(f"VM {self.config.name} is already migrating", code="already_migrating")
        status = await self.qmp.query_status()
        if not status.running:
            raise Conflict(f"VM {self.config.name} is {status.status} in QEMU, not running")
        mirror = self.storage if isinstance(self.storage, DiskMirror) else None
        if mirror is not None and mirror.running:
            if mirror.view.mode != "nbd" or mirror.view.phase != "ready":
                raise Conflict(
                    f"VM {self.config.name}'s disks are being copied ({mirror.view.phase}): "
                    "memory follows only once every disk copy is ready",
                    code="storage_not_ready",
                )
            if postcopy:
                raise Conflict(
                    "post-copy cannot be combined with a disk copy: the disks must be "
                    "consistent at switchover",
                    code="no_postcopy",
                )
        outgoing = Outgoing(
            self.qmp,
            self.config.name,
            before_switchover=mirror.complete_at_switchover
            if mirror is not None and mirror.running
            else None,
        )
        creds = await self.env.tls.creds(self.qmp, "client")
        self.migration = outgoing
        await outgoing.start(
            uri, max_bandwidth_bps, downtime_limit_ms, brake=brake, postcopy=postcopy,
            tls_creds=creds,
        )  # fmt: skip

    async def measure_dirty_rate(self, seconds: int) -> float:
        """The guest's dirty rate in bytes/s, measured by QEMU over ``seconds`` (1-60)."""
        if self.state is not PowerState.POWERED_ON or self.qmp is None:
            raise Conflict(f"VM {self.config.name} is {self.state}: only a running VM dirties")
        await self.qmp.execute(
            "calc-dirty-rate", {"calc-time": seconds, "sample-pages": DIRTY_SAMPLE_PAGES}
        )
        deadline = asyncio.get_running_loop().time() + seconds + 10
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            info = await self.qmp.execute("query-dirty-rate")
            if info.get("status") == "measured":
                return float(info.get("dirty-rate", 0)) * 2**20
        raise QemuError(f"QEMU did not finish measuring {self.config.name}'s dirty rate")

    async def memory_profile(self) -> guestmem.MemoryProfile:
        """The inputs of a prediction: non-zero RAM, dirty rate and working set (about 4.5 s)."""
        ram = self.config.memory_mib * 2**20
        pid = self.process.pid if self.process is not None else None
        nonzero = None if pid is None else await asyncio.to_thread(guestmem.nonzero_bytes, pid, ram)
        short = await self.measure_dirty_rate(guestmem.SHORT_WINDOW_S)
        long = await self.measure_dirty_rate(guestmem.LONG_WINDOW_S)
        nonzero = nonzero or ram
        working_set = guestmem.working_set_bytes(
            short, guestmem.SHORT_WINDOW_S, long, guestmem.LONG_WINDOW_S, nonzero
        )
        return guestmem.MemoryProfile(ram, nonzero, short, working_set)

    # -- storage ---------------------------------------------------------------------------------
    def _check_can_copy_disks(self) -> QmpSession:
        if self.state is not PowerState.POWERED_ON or self.qmp is None:
            raise Conflict(
                f"VM {self.config.name} is {self.state}: only a running VM's disks are copied "
                "live", code="wrong_state",
            )  # fmt: skip
        if self.storage is not None and self.storage.running:
            raise Conflict(
                f"VM {self.config.name}'s disks are already being copied", code="already_migrating"
            )
        if isinstance(self.migration, Outgoing) and self.migration.running:
            raise Conflict(f"VM {self.config.name} is migrating", code="already_migrating")
        return self.qmp

    async def disk_sizes(self, nodes: list[str]) -> list[int]:
        """The virtual size in bytes of each of ``nodes``, as QEMU has it open."""
        assert self.qmp is not None
        sizes = {
            str(n.get("node-name")): int(n["image"]["virtual-size"])
            for n in await self.qmp.execute("query-named-block-nodes", {"flat": True})
        }
        return [sizes[node] for node in nodes]

    async def move_storage(self, datastore: str, speed_bps: int | None = None) -> None:
        """Storage vMotion on this host: copy every disk to ``datastore`` while the VM runs,
        pivot to the copies when all are ready, then move the record and remove the old files.
        A powered-off VM's files are copied as they are (cold), then switched the same way.

        Raises Conflict (busy, same datastore, folder taken), NotFound.
        """
        if all(d.datastore == datastore for d in self.config.disks):
            raise Conflict(
                f"VM {self.config.name}'s disks are on {datastore!r} already",
                code="same_datastore",
            )
        if self.state is PowerState.POWERED_OFF:
            await self._move_cold(datastore)
            return
        qmp = self._check_can_copy_disks()
        new = self.config.moved_to(datastore)
        sources = await disk_nodes(qmp, len(self.config.disks))
        sizes = await self.disk_sizes(sources)
        record, created = await create_vm_files(new, self.env.datastores, sizes)
        self.created, self.moving_to = created, record
        self.write_registration(incoming=False)
        token = uuidlib.uuid4().hex[:6]
        targets = [
            local_target(
                i, f"disk{i}-{token}", str(self.env.datastores.resolve(d.datastore, d.path))
            )
            for i, d in enumerate(new.disks)
        ]

        async def pivot() -> None:
            if self.storage is mirror:  # not a later copy's
                await self._pivot_storage(new, record)

        mirror = DiskMirror(qmp, self.config.name, "local", datastore, on_ready=pivot)
        self.storage = mirror
        try:
            await mirror.start(sources, targets, speed_bps)
        except BaseException:
            self.drop_copies()
            raise

    async def _move_cold(self, datastore: str) -> None:
        if self.storage is not None and self.storage.running:
            raise Conflict(
                f"VM {self.config.name}'s disks are already being copied", code="already_migrating"
            )
        new = self.config.moved_to(datastore)
        sources = [self.env.datastores.resolve(d.datastore, d.path) for d in self.config.disks]
        sizes = [p.stat().st_size for p in sources]
        record, created = await create_vm_files(new, self.env.datastores)
        self.created, self.moving_to = created, record
        self.write_registration(incoming=False)
        targets = [self.env.datastores.resolve(d.datastore, d.path) for d in new.disks]

        async def switch() -> None:
            async with self.lock:
                await self._switch_to_copies(new, record, old_nodes=[])

        copy = ColdCopy(self.config.name, datastore, on_done=switch)
        self.storage = copy
        copy.start([(str(s), str(t), n) for s, t, n in zip(sources, targets, sizes, strict=True)])

    async def _pivot_storage(self, new: VmConfig, record: Path) -> None:
        """Every copy is ready: switch to them, then make the new record the VM's."""
        assert isinstance(self.storage, DiskMirror)
        async with self.lock:
            old_nodes = [d.source_node for d in self.storage.view.disks]
            try:
                await self.storage.pivot()
            except (QemuError, Conflict):
                # What counts is what QEMU uses now, whatever the jobs said; with QEMU gone,
                # the jobs' own reports (every one completed: every device switched).
                used = await self._copies_in_use(new)
                switched = all(d.status == "completed" for d in self.storage.view.disks)
                if used == "none" or (used == "unknown" and not switched):
                    raise
            await self._switch_to_copies(new, record, old_nodes)

    async def _copies_in_use(self, new: VmConfig) -> str:
        """Which of the VM's devices use the copies at ``new``'s paths: "all", "none" or "some".

        "some" (a pivot that failed halfway) is recorded as QEMU has it, every file kept: the
        record names each disk where it is, and nothing the VM uses is ever deleted.
        """
        if self.qmp is None:
            return "unknown"
        files = await disk_files(self.qmp, len(self.config.disks))
        paths = [str(self.env.datastores.resolve(d.datastore, d.path)) for d in new.disks]
        uses = [f == p for f, p in zip(files, paths, strict=True)]
        if all(uses):
            return "all"
        if not any(uses):
            return "none"
        disks = tuple(
            n if u else o for n, o, u in zip(new.disks, self.config.disks, uses, strict=True)
        )
        self.config = self.config.model_copy(update={"disks": disks})
        write_record(self.config_path, self.config)
        self.created, self.moving_to = [], None
        self.write_registration(incoming=False)
        self.log.error("a pivot failed halfway: disks recorded where QEMU uses them, files kept")
        raise QemuError(
            f"the switch to the copies failed halfway: VM {self.config.name}'s disks are now "
            "split between datastores (recorded as they are; no file was removed); move them again"
        )

    async def _switch_to_copies(self, new: VmConfig, record: Path, old_nodes: list[str]) -> None:
        """The copies are the VM's disks now: record it first, then remove the old files."""
        assert self.storage is not None
        old, old_record = self.config, self.config_path
        self.config, self.config_path = new, record
        self.created, self.moving_to = [], None
        self.write_registration(incoming=False)
        if self.qmp is not None:
            for node in old_nodes:
                await delete_node(self.qmp, node)
        problems = remove_vm_files(old, self.env.datastores, old_record)
        self.storage.view.error = "; ".join(problems) or None
        self.storage.view.marks["completed"] = time.time()
        self.storage.view.phase = "completed"
        self.log.info("disks moved to datastore %s", new.datastore)

    def drop_copies(self) -> None:
        """A storage move that will not happen: remove its copies and forget it."""
        remove_folders(self.created)
        self.created, self.moving_to = [], None
        self.write_registration(incoming=False)

    async def cancel_storage(self) -> str:
        """Cancel a disk copy before it pivots; the VM keeps its disks. Idempotent."""
        if self.storage is None:
            raise Conflict(f"VM {self.config.name} has no disk copy", code="no_migration")
        if self.storage.view.phase in ("completed", "pivoting", "pivoted"):
            raise Conflict("the disks have switched to their copies: too late", code="too_late")
        await self.storage.abort()
        if self.storage.view.mode == "local" and self.moving_to is not None:
            # Never remove a file the VM uses: if QEMU switched to the copies after all,
            # they are the VM's now; if QEMU cannot say, both sets of files stay.
            new = VmConfig.model_validate_json(self.moving_to.read_text())
            used = await self._copies_in_use(new)
            if used == "all":
                await self._switch_to_copies(new, self.moving_to, [])
                raise Conflict("the disks had switched to their copies: too late", code="too_late")
            if used == "unknown" or (self.qmp is not None and await self._copy_jobs_left()):
                return "disk copy cancelled; its files are kept (QEMU could not confirm it let go)"
        if self.storage.view.mode in ("local", "cold"):
            self.drop_copies()
        return "disk copy cancelled; the VM keeps its disks"

    async def _copy_jobs_left(self) -> bool:
        assert self.qmp is not None
        jobs = await self.qmp.execute("query-block-jobs")
        return any(j["device"].startswith("mirror-") for j in jobs)

    async def mirror_to(
        self, host: str, port: int, datastore: str, speed_bps: int | None = None
    ) -> None:
        """ "Change both", source side: copy every disk into the destination's NBD exports."""
        qmp = self._check_can_copy_disks()
        sources = await disk_nodes(qmp, len(self.config.disks))
        token = uuidlib.uuid4().hex[:6]
        count = len(self.config.disks)
        creds = await self.env.tls.creds(qmp, "client")
        targets = [nbd_target(i, host, port, f"disk{i}", token, creds) for i in range(count)]
        mirror = DiskMirror(qmp, self.config.name, "nbd", datastore)
        self.storage = mirror
        await mirror.start(sources, targets, speed_bps)

    def outgoing(self) -> Outgoing:
        if not isinstance(self.migration, Outgoing):
            raise Conflict(f"VM {self.config.name} has no outgoing migration", code="no_migration")
        return self.migration

    async def cancel_migration(self) -> None:
        """Cancel an outgoing migration before switchover; the VM keeps running here."""
        await self.outgoing().cancel()

    async def finish_outgoing(self, *, remove_files: bool = False) -> list[str]:
        """After a completed migration: end the source QEMU (the guest runs elsewhere now).

        ``remove_files``: the disks were copied too ("change both"): delete the source's disks
        and record. Returns what could not be removed.
        """
        if self.migration is None and self.qmp is not None:  # this agent restarted since
            phase = MigrationStats.parse(await self.qmp.execute("query-migrate")).status
        else:
            phase = self.outgoing().view.phase
        if phase != "completed":
            raise Conflict(
                f"migration of {self.config.name} is {phase}, not completed",
                code="not_completed",
            )
        if self.process is not None:
            self._set_state(PowerState.POWERING_OFF)
            await self._hard_stop(self.process)
        if not remove_files:
            return []
        if self.storage is None or self.storage.view.phase != "completed":
            raise Conflict(
                f"VM {self.config.name}'s disks were not copied: its files stay",
                code="no_disk_copy",
            )
        return remove_vm_files(self.config, self.env.datastores, self.config_path)

    async def abort_migration(self, *, destination_gone: bool = False) -> str:
        """Undo this host's side of a migration. Idempotent. Says what it did.

        Source: cancel and keep running. A VM whose migration completed is resumed here only
        when the caller has seen the destination's copy ended (``destination_gone``): otherwise
        the destination may own it, and two running copies must never exist.
        Destination: end the receiving QEMU.
        """
        incoming = isinstance(self.migration, Incoming) and self.migration.view.phase != "resumed"
        if self.incoming or (incoming and self.state is not PowerState.POWERED_ON):
            if self.process is not None:
                await self._hard_stop(self.process)
            if self.created:
                remove_folders(self.created)
                self.created = []
                return "destination ended, its partial disk copies removed"
            return "destination ended"
        storage = ""
        if self.storage is not None and self.storage.view.phase != "completed":
            # Even a copy that failed by itself still has target nodes to close.
            with contextlib.suppress(Conflict):
                await self.storage.abort()
            storage = ", its disk copy cancelled"
        if isinstance(self.migration, Incoming) and not storage:
            raise Conflict(
                f"VM {self.config.name} already resumed on this host: it is the owner now",
                code="too_late",
            )
        if isinstance(self.migration, Outgoing) and self.migration.view.phase != "completed":
            await self.migration.cancel()
            return "source kept running" + storage
        if isinstance(self.migration, Outgoing):  # completed
            if not destination_gone:
                raise self._destination_may_own()
            await self.migration.resume_after_completion()
            return "source resumed (the destination's copy had ended)"
        if storage:
            return "source kept running" + storage
        if self.migration is None and self.qmp is not None:  # this agent restarted since
            stats = MigrationStats.parse(await self.qmp.execute("query-migrate"))
            if stats.status == "completed" and (await self.qmp.query_status()).running:
                # A stream completed and the guest runs here: this host received it (or a
                # source resumed it): either way it is the owner now.
                raise Conflict(
                    f"VM {self.config.name} runs on this host after a completed migration: "
                    "it is the owner now",
                    code="too_late",
                )
            done = await self._recover_outgoing(self.qmp, destination_gone=destination_gone)
            if done:
                return done
            if stats.status == "completed":  # kept paused, as without the restart
                raise self._destination_may_own()
        return "nothing to abort"

    def _destination_may_own(self) -> Conflict:
        """A completed stream, and nobody has seen the destination's copy end."""
        return Conflict(
            f"migration of {self.config.name} completed: the destination owns the VM",
            code="too_late",
        )

    async def info(self) -> VmInfo:
        status = None
        if self.state is PowerState.POWERED_ON and self.qmp is not None:
            with contextlib.suppress(QemuError):
                status = (await self.qmp.query_status()).status
        return VmInfo(
            uuid=self.config.uuid,
            name=self.config.name,
            power_state=str(self.state),
            qemu_status=status,
            pid=self.process.pid if self.process else None,
            config_path=str(self.config_path),
            config=self.config,
            migration=self.migration.view if self.migration is not None else None,
            cpu=self.cpu,
            storage=self.storage.view if self.storage is not None else None,
            incoming=self.incoming,
        )
