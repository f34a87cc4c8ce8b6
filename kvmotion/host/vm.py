"""One VM as its host runs it: power state, QEMU process, QMP session, taps, live migration.

Every power change goes through the transition table of :mod:`kvmotion.host.vmstate`; every
operation takes the VM's lock. A VM's QEMU outlives the agent: :meth:`VirtualMachine.detach`
lets go of it, :meth:`attach` finds it again and settles what it was left doing
(:mod:`kvmotion.host.recovery`). A watcher task notices when QEMU ends (guest powered off, crash,
kill) and cleans up. Disk copies are the VM's :class:`~kvmotion.host.storage_move.StorageMove`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from kvmotion import faults
from kvmotion.errors import Conflict, InvalidInput, NotFound, QemuError
from kvmotion.host import recovery, taps
from kvmotion.host.addresses import watch_addresses
from kvmotion.host.cpu import VmCpu
from kvmotion.host.guesttime import correct_clock
from kvmotion.host.incoming import Incoming
from kvmotion.host.migration import Outgoing
from kvmotion.host.migrationview import POSTCOPY_PAUSED, MigrationMode, MigrationStats
from kvmotion.host.recovery import IncomingLeft
from kvmotion.host.storage import DiskMirror, export_disks, stop_exports
from kvmotion.host.storage_move import ColdCopy, StorageMove
from kvmotion.host.vmconfig import VmConfig
from kvmotion.host.vmfiles import Registration, remove_folders, remove_vm_files
from kvmotion.host.vmstate import (
    TRANSITIONS,
    MigrationRole,
    PowerState,
    RunFiles,
    VmEnvironment,
    VmInfo,
    qemu_launch,
)
from kvmotion.pulse import Pulse
from kvmotion.qemu.process import QemuHandle
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT = 10.0  # QEMU makes its QMP socket early in start-up


class VirtualMachine:
    def __init__(self, config: VmConfig, config_path: Path, run_dir: Path, env: VmEnvironment):
        self.config = config
        self.config_path = config_path
        self.run_dir = run_dir
        self.files = RunFiles(run_dir)
        self.env = env
        self.state = PowerState.POWERED_OFF
        self.process: QemuHandle | None = None
        self.qmp: QmpSession | None = None
        self.lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.migration: Outgoing | Incoming | None = None
        self.incoming = False  # registered as a migration's destination, not yet the owner
        self.cpu: VmCpu | None = None  # chosen at power-on (or given by the migration source)
        self.ram_pad_kib = env.ram_pad_kib  # likewise (qemu.cmdline.ram_pad_kib)
        self.storage: DiskMirror | ColdCopy | None = None  # the last disk copy's mechanism
        self.storage_move = StorageMove(self)
        # Folders made on this host for this VM's new copy (a "change both" destination, or a
        # storage move's target): removed if the copy does not become the VM's.
        self.created: list[Path] = []
        self.moving_to: Path | None = None  # a storage move's new record, until it pivots
        self.log = log.getChild(config.name)
        self.changed = Pulse()  # beats at each power change and migration step (watch.py)
        self.addresses = watch_addresses(config, env, self.files)
        self._clock: asyncio.Task[None] | None = None  # setting the guest's clock after a move

    def _set_state(self, new: PowerState) -> None:
        if new is not self.state and new not in TRANSITIONS[self.state]:
            raise Conflict(
                f"VM {self.config.name} is {self.state}; cannot go to {new}", code="wrong_state"
            )
        if new is not self.state:
            self.state = new
            self.changed.beat()
            if new is PowerState.POWERED_ON:
                self.addresses.start()
            else:
                self.addresses.stop()

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
        self.write_registration(incoming=False)  # its CPU and RAM pad, for a restarted agent
        self._set_state(PowerState.POWERED_ON)

    async def prepare_incoming(
        self,
        migration_address: str,
        *,
        mode: MigrationMode = MigrationMode(),
        export: bool = False,
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
        nics = [(taps.tap_name(self.config.uuid, 0), n.mac) for n in self.config.nics[:1]]
        incoming = Incoming(
            qmp, self.config.name, notify=self.changed.beat, on_resumed=self._resumed_here,
            before_resume=(lambda: stop_exports(qmp)) if export else None,
            learned=partial(self.env.learned, *nics[0]) if nics else None,
        )  # fmt: skip
        self.migration = incoming
        try:
            creds = await self.env.tls.creds(qmp, "server")
            port = None
            if export:
                nodes = [f"disk{i}" for i in range(len(self.config.disks))]
                port = await export_disks(qmp, migration_address, nodes, tls_creds=creds)
            uri = await incoming.listen(migration_address, mode=mode, tls_creds=creds)
            await faults.hold("prepare")
            return uri, port
        except BaseException:
            await self._cleanup_after_exit(kill=True)
            raise

    def _resumed_here(self) -> None:
        self._set_state(PowerState.POWERED_ON)
        if self.config.guest_agent and isinstance(self.migration, Incoming):
            self._clock = asyncio.create_task(correct_clock(self.migration, self.files))
        self.created = []  # the new copy is the VM's own now
        self.write_registration(incoming=False)

    async def _start(self, *, incoming: bool) -> None:
        if self.env.find_qemu(self.files.pidfile, self.config.uuid) is not None:
            raise Conflict(f"VM {self.config.name} already has a QEMU running", code="wrong_state")
        cpu_model = self.cpu.model if self.cpu is not None else self.config.cpu_model
        pad = self.ram_pad_kib = self.ram_pad_kib if incoming else self.env.ram_pad_kib
        launch = qemu_launch(self.config, self.env, self.files, cpu_model, pad, incoming)
        for disk in launch.disks:
            if not disk.path.exists():
                raise NotFound(
                    f"disk {disk.path} of {self.config.name} is missing", code="disk_missing"
                )
        self._set_state(PowerState.INCOMING if incoming else PowerState.POWERING_ON)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.files.console_log.unlink(missing_ok=True)
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
        created = tuple(self.created)
        Registration(
            self.config_path, incoming, self.cpu, created, self.moving_to, self.ram_pad_kib
        ).write(self.run_dir)
        self.incoming = incoming

    def restore(self, registration: Registration) -> None:
        """Take up what an earlier agent registered (before :meth:`attach`)."""
        self.incoming = registration.incoming
        self.cpu = registration.cpu
        self.ram_pad_kib = registration.pad_kib(self.env.accel)
        self.created = list(registration.created)
        self.moving_to = registration.moving_to

    async def attach(self) -> bool:
        """Find this VM's QEMU left running by an earlier agent. True if it runs.

        A destination whose agent died mid-migration: if the stream had completed, the guest is
        resumed here now (the source stays in postmigrate and never resumes by itself, so
        this copy is the only one); if it had not, the VM stays incoming until the center aborts.
        """
        process = self.env.find_qemu(self.files.pidfile, self.config.uuid)
        if process is None:
            await self._remove_taps()
            return False
        self.process = process
        try:
            await self._connect()
        except QemuError:
            self.log.warning("QEMU pid %d runs but QMP does not answer", process.pid)
        left = IncomingLeft.RUNNING
        if self.incoming and self.qmp is not None:
            left = await recovery.recover_incoming(self.qmp)
            if left is not IncomingLeft.INCOMPLETE:
                self.created = []  # this copy is the VM now
                self.write_registration(incoming=False)
            if left is IncomingLeft.RESUMED:
                self.log.warning(
                    "resumed after an agent restart: the incoming stream had completed"
                )
        self._set_state(
            PowerState.INCOMING if left is IncomingLeft.INCOMPLETE else PowerState.POWERED_ON
        )
        if self.moving_to is not None:
            await self.storage_move.recover()
        elif self.qmp is not None and not self.incoming:
            # A "change both" source whose agent stopped mid-copy: end its copy, close its nodes.
            try:
                await recovery.end_copy_jobs(self.qmp)
                done = await recovery.recover_outgoing(self.qmp)
                if done:
                    self.log.warning("after an agent restart: %s", done)
            except QemuError as exc:
                self.log.error("could not end a migration left in QEMU: %s", exc.message)
        self.log.info("re-attached to QEMU pid %d (%s)", process.pid, self.state)
        return True

    async def _connect(self) -> None:
        assert self.process is not None
        qmp = QmpSession(self.files.qmp_socket, self.config.name)
        await qmp.connect(QMP_CONNECT_TIMEOUT)  # raises QemuError; self.qmp stays None then
        self.qmp = qmp
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
        self.files.pidfile.unlink(missing_ok=True)
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
        mode: MigrationMode = MigrationMode(),
        on_stunned: Callable[[], Coroutine[Any, Any, None]] | None = None,
        auto_converge: bool = False,
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
            mirror.check_memory_may_follow(self.config.name, postcopy=mode.postcopy)
        disks_end = mirror.complete_at_switchover if mirror is not None and mirror.running else None
        outgoing = Outgoing(
            self.qmp, self.config.name, before_switchover=disks_end, notify=self.changed.beat,
            on_stunned=on_stunned,
        )  # fmt: skip
        creds = await self.env.tls.creds(self.qmp, "client")
        self.migration = outgoing
        await outgoing.start(
            uri, max_bandwidth_bps, downtime_limit_ms, brake=brake, mode=mode, tls_creds=creds,
            auto_converge=auto_converge,
        )  # fmt: skip

    def running_qmp(self) -> QmpSession:
        if self.state is not PowerState.POWERED_ON or self.qmp is None:
            raise Conflict(f"VM {self.config.name} is {self.state}: only a running VM dirties")
        return self.qmp

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
        restarted = self.migration is None  # this agent restarted since: QEMU is asked
        if restarted and self.qmp is not None:
            phase = MigrationStats.parse(await self.qmp.execute("query-migrate")).status
        else:
            phase = self.outgoing().view.phase
        # A broken post-copy the center gave up on: this copy is stale, the VM is lost.
        if phase != "completed" and phase not in POSTCOPY_PAUSED:
            raise Conflict(
                f"migration of {self.config.name} is {phase}, not completed",
                code="not_completed",
            )
        if self.process is not None:
            self._set_state(PowerState.POWERING_OFF)
            await self._hard_stop(self.process)
        if not remove_files:
            return []
        if self.storage is not None and self.storage.view.phase == "completed":
            return remove_vm_files(self.config, self.env.datastores, self.config_path)
        if restarted:
            # The copy's record went with the agent that watched it: keep every file.
            return [
                f"{self.config_path.parent}: kept (this host's agent restarted during the "
                "migration and cannot confirm the disks were copied; remove it by hand once "
                "the VM runs from its new datastore)"
            ]
        raise Conflict(
            f"VM {self.config.name}'s disks were not copied: its files stay", code="no_disk_copy"
        )

    @property
    def role(self) -> MigrationRole:
        """This host's part in the VM's migration, from what this agent watches."""
        migration = self.migration
        if self.incoming or (
            isinstance(migration, Incoming)
            and migration.view.phase != "resumed"
            and self.state is not PowerState.POWERED_ON
        ):
            return MigrationRole.DESTINATION
        if isinstance(migration, Incoming):
            return MigrationRole.RECEIVED
        if isinstance(migration, Outgoing):
            return MigrationRole.SOURCE
        return MigrationRole.NONE if self.process is None else MigrationRole.UNWATCHED

    async def abort_migration(self, *, destination_gone: bool = False) -> str:
        """Undo this host's side of a migration, decided by its :attr:`role`. Idempotent. Says
        what it did.

        Destination: end the receiving QEMU (and its partial disk copies). Anything else: cancel
        a disk copy that has not completed, then by role: a source cancels its stream and keeps
        running; a VM whose stream completed is resumed here only when the caller has seen the
        destination's copy end (``destination_gone``): otherwise the destination may own it, and
        two running copies must never exist.
        """
        role = self.role
        if role is MigrationRole.DESTINATION:
            return await self._end_destination()
        storage = ""
        if self.storage is not None and self.storage.view.phase != "completed":
            # Even a copy that failed by itself still has target nodes to close.
            with contextlib.suppress(Conflict):
                await self.storage.abort()
            storage = ", its disk copy cancelled"
        if role is MigrationRole.SOURCE:
            return await self._abort_outgoing(storage, destination_gone=destination_gone)
        if storage:
            return "source kept running" + storage
        if role is MigrationRole.RECEIVED:
            raise Conflict(
                f"VM {self.config.name} already resumed on this host: it is the owner now",
                code="too_late",
            )
        if role is MigrationRole.UNWATCHED:
            if self.qmp is None:
                raise QemuError(
                    f"VM {self.config.name}'s QEMU runs but its QMP does not answer: "
                    "what its migration did cannot be told"
                )
            return await recovery.abort_unwatched(
                self.qmp, self.config.name, destination_gone=destination_gone
            )
        return "nothing to abort"

    async def _end_destination(self) -> str:
        if self.process is not None:
            await self._hard_stop(self.process)
        if self.created:
            remove_folders(self.created)
            self.created = []
            return "destination ended, its partial disk copies removed"
        return "destination ended"

    async def _abort_outgoing(self, storage: str, *, destination_gone: bool) -> str:
        outgoing = self.outgoing()
        if outgoing.view.phase != "completed":
            await outgoing.cancel()
            return "source kept running" + storage
        if not destination_gone:
            raise recovery.destination_may_own(self.config.name)
        await outgoing.resume_after_completion()
        return "source resumed (the destination's copy had ended)"

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
            ram_pad_kib=self.ram_pad_kib,
            storage=self.storage.view if self.storage is not None else None,
            incoming=self.incoming,
            addresses=self.addresses.addresses,
            addresses_source=self.addresses.source,
        )
