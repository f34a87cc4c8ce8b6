"""A VM's disks moved to another datastore: Storage vMotion on one host, and the source side of
"change both". :class:`StorageMove` decides when copies start, when the VM switches to them
and what happens to each set of files; :class:`~kvmotion.host.storage.DiskMirror` (a running
VM) and :class:`ColdCopy` (a powered-off one) do the copying.

The VM's registration on this host records a move under way (the new record, ``moving_to``, and
the folders made for it, ``created``) before any copy starts, so that an agent that stops
halfway can settle it when it starts again (:meth:`StorageMove.recover`). Nothing the VM uses is
ever deleted: when QEMU cannot say which files a device uses, both sets stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kvmotion.errors import Conflict, QemuError
from kvmotion.host.firmware import switch_vars
from kvmotion.host.migration import Outgoing
from kvmotion.host.recovery import copy_jobs_left, end_copy_jobs
from kvmotion.host.storage import (
    TERMINAL,
    DiskCopy,
    DiskMirror,
    StorageView,
    delete_node,
    disk_files,
    disk_nodes,
    local_target,
    nbd_target,
)
from kvmotion.host.vmconfig import VmConfig
from kvmotion.host.vmfiles import create_vm_files, remove_folders, remove_vm_files, write_record
from kvmotion.host.vmstate import PowerState
from kvmotion.qemu.qmp import QmpSession

if TYPE_CHECKING:
    from kvmotion.host.vm import VirtualMachine

log = logging.getLogger(__name__)


class StorageMove:
    """The disk copies of one VM (its ``storage_move``). Every call is made under the VM's lock,
    except the switch a finished copy makes, which takes it."""

    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm

    def _check_can_copy(self) -> QmpSession:
        vm = self.vm
        if vm.state is not PowerState.POWERED_ON or vm.qmp is None:
            raise Conflict(
                f"VM {vm.config.name} is {vm.state}: only a running VM's disks are copied live",
                code="wrong_state",
            )
        if vm.storage is not None and vm.storage.running:
            raise Conflict(
                f"VM {vm.config.name}'s disks are already being copied", code="already_migrating"
            )
        if isinstance(vm.migration, Outgoing) and vm.migration.running:
            raise Conflict(f"VM {vm.config.name} is migrating", code="already_migrating")
        return vm.qmp

    async def _disk_sizes(self, qmp: QmpSession, nodes: list[str]) -> list[int]:
        """The virtual size in bytes of each of ``nodes``, as QEMU has it open."""
        sizes = {
            str(n.get("node-name")): int(n["image"]["virtual-size"])
            for n in await qmp.execute("query-named-block-nodes", {"flat": True})
        }
        return [sizes[node] for node in nodes]

    def _register(self, created: list[Path], moving_to: Path | None) -> None:
        """Record on this host the move under way (None: none), before any copy starts."""
        self.vm.created, self.vm.moving_to = created, moving_to
        self.vm.write_registration(incoming=False)

    async def move(self, datastore: str, speed_bps: int | None = None) -> None:
        """Storage vMotion on this host: copy every disk to ``datastore`` while the VM runs,
        pivot to the copies when all are ready, then move the record and remove the old files.
        A powered-off VM's files are copied as they are (cold), then switched the same way.

        Raises Conflict (busy, same datastore, folder taken), NotFound.
        """
        vm = self.vm
        if all(d.datastore == datastore for d in vm.config.disks):
            raise Conflict(
                f"VM {vm.config.name}'s disks are on {datastore!r} already", code="same_datastore"
            )
        if vm.state is PowerState.POWERED_OFF:
            await self._move_cold(datastore)
            return
        qmp = self._check_can_copy()
        new = vm.config.moved_to(datastore)
        sources = await disk_nodes(qmp, len(vm.config.disks))
        sizes = await self._disk_sizes(qmp, sources)
        record, created = await create_vm_files(new, vm.env.datastores, sizes)
        self._register(created, record)
        token = uuidlib.uuid4().hex[:6]
        targets = [
            local_target(i, f"disk{i}-{token}", str(vm.env.datastores.resolve(d.datastore, d.path)))
            for i, d in enumerate(new.disks)
        ]

        async def pivot() -> None:
            if vm.storage is mirror:  # not a later copy's
                await self._pivot(new, record)

        mirror = DiskMirror(qmp, vm.config.name, "local", datastore, on_ready=pivot)
        vm.storage = mirror
        try:
            await mirror.start(sources, targets, speed_bps)
        except BaseException:
            self.drop_copies()
            raise

    async def _move_cold(self, datastore: str) -> None:
        vm = self.vm
        if vm.storage is not None and vm.storage.running:
            raise Conflict(
                f"VM {vm.config.name}'s disks are already being copied", code="already_migrating"
            )
        new = vm.config.moved_to(datastore)
        sources = [vm.env.datastores.resolve(d.datastore, d.path) for d in vm.config.disks]
        sizes = [p.stat().st_size for p in sources]
        stores = self._vars_paths(new)
        record, created = await create_vm_files(
            new, vm.env.datastores, vars_from=stores[0] if stores else None
        )
        self._register(created, record)
        targets = [vm.env.datastores.resolve(d.datastore, d.path) for d in new.disks]

        async def switch() -> None:
            async with vm.lock:
                await self._switch_to_copies(new, record, old_nodes=[])

        copy = ColdCopy(vm.config.name, datastore, on_done=switch)
        vm.storage = copy
        copy.start([(str(s), str(t), n) for s, t, n in zip(sources, targets, sizes, strict=True)])

    async def _pivot(self, new: VmConfig, record: Path) -> None:
        """Every copy is ready: switch to them, then make the new record the VM's."""
        vm = self.vm
        assert isinstance(vm.storage, DiskMirror)
        async with vm.lock:
            old_nodes = [d.source_node for d in vm.storage.view.disks]
            stores = self._vars_paths(new)
            if stores is not None and vm.qmp is not None:
                await switch_vars(vm.qmp, *stores)  # first: if it fails, nothing has moved
            try:
                await vm.storage.pivot()
            except (QemuError, Conflict):
                # What counts is what QEMU uses now, whatever the jobs said; with QEMU gone,
                # the jobs' own reports (every one completed: every device switched).
                used = await self._copies_in_use(new)
                switched = all(d.status == "completed" for d in vm.storage.view.disks)
                if used == "none" or (used == "unknown" and not switched):
                    if stores is not None and vm.qmp is not None:
                        await switch_vars(vm.qmp, stores[1], stores[0])  # back with the disks
                    raise
            await self._switch_to_copies(new, record, old_nodes)

    def _vars_paths(self, new: VmConfig) -> tuple[Path, Path] | None:
        """A UEFI VM's variable store now and in ``new``'s folder."""
        vm = self.vm
        if vm.config.vars_path is None or new.vars_path is None:
            return None
        resolve = vm.env.datastores.resolve
        return resolve(vm.config.datastore, vm.config.vars_path), resolve(
            new.datastore, new.vars_path
        )

    async def _copies_in_use(self, new: VmConfig) -> str:
        """Which of the VM's devices use the copies at ``new``'s paths: "all", "none", or
        "unknown" (QEMU is gone).

        Some but not all (a pivot that failed halfway) is recorded as QEMU has it, every file
        kept, and raised: the record names each disk where it is, nothing the VM uses is ever
        deleted.
        """
        vm = self.vm
        if vm.qmp is None:
            return "unknown"
        files = await disk_files(vm.qmp, len(vm.config.disks))
        paths = [str(vm.env.datastores.resolve(d.datastore, d.path)) for d in new.disks]
        uses = [f == p for f, p in zip(files, paths, strict=True)]
        if all(uses):
            return "all"
        if not any(uses):
            return "none"
        disks = tuple(
            n if u else o for n, o, u in zip(new.disks, vm.config.disks, uses, strict=True)
        )
        vm.config = vm.config.model_copy(update={"disks": disks})
        write_record(vm.config_path, vm.config)
        self._register([], None)
        vm.log.error("a pivot failed halfway: disks recorded where QEMU uses them, files kept")
        raise QemuError(
            f"the switch to the copies failed halfway: VM {vm.config.name}'s disks are now "
            "split between datastores (recorded as they are; no file was removed); move them again"
        )

    async def _switch_to_copies(self, new: VmConfig, record: Path, old_nodes: list[str]) -> None:
        """The copies are the VM's disks now: record it first, then remove the old files."""
        vm = self.vm
        old, old_record = vm.config, vm.config_path
        vm.config, vm.config_path = new, record
        self._register([], None)
        if vm.qmp is not None:
            for node in old_nodes:
                await delete_node(vm.qmp, node)
        problems = remove_vm_files(old, vm.env.datastores, old_record)
        if vm.storage is not None:  # None: settled by restart recovery, no copy watched
            vm.storage.view.error = "; ".join(problems) or None
            vm.storage.view.marks["completed"] = time.time()
            vm.storage.view.phase = "completed"
        vm.log.info("disks moved to datastore %s", new.datastore)

    def drop_copies(self) -> None:
        """A storage move that will not happen: remove its copies and forget it."""
        remove_folders(self.vm.created)
        self._register([], None)

    async def cancel(self) -> str:
        """Cancel a disk copy before it pivots; the VM keeps its disks. Idempotent."""
        vm = self.vm
        if vm.storage is None:
            raise Conflict(f"VM {vm.config.name} has no disk copy", code="no_migration")
        if vm.storage.view.phase in ("completed", "pivoting", "pivoted"):
            raise Conflict("the disks have switched to their copies: too late", code="too_late")
        await vm.storage.abort()
        if vm.storage.view.mode == "local" and vm.moving_to is not None:
            # Never remove a file the VM uses: if QEMU switched to the copies after all,
            # they are the VM's now; if QEMU cannot say, both sets of files stay.
            new = VmConfig.model_validate_json(vm.moving_to.read_text())
            used = await self._copies_in_use(new)
            if used == "all":
                await self._switch_to_copies(new, vm.moving_to, [])
                raise Conflict("the disks had switched to their copies: too late", code="too_late")
            if used == "unknown" or (vm.qmp is not None and await copy_jobs_left(vm.qmp)):
                return "disk copy cancelled; its files are kept (QEMU could not confirm it let go)"
        if vm.storage.view.mode in ("local", "cold"):
            self.drop_copies()
        return "disk copy cancelled; the VM keeps its disks"

    async def mirror_to(
        self, host: str, port: int, datastore: str, speed_bps: int | None = None
    ) -> None:
        """ "Change both", source side: copy every disk into the destination's NBD exports."""
        vm = self.vm
        qmp = self._check_can_copy()
        sources = await disk_nodes(qmp, len(vm.config.disks))
        token = uuidlib.uuid4().hex[:6]
        creds = await vm.env.tls.creds(qmp, "client")
        targets = [
            nbd_target(i, host, port, f"disk{i}", token, creds) for i in range(len(vm.config.disks))
        ]
        mirror = DiskMirror(qmp, vm.config.name, "nbd", datastore)
        vm.storage = mirror
        await mirror.start(sources, targets, speed_bps)

    async def recover(self) -> None:
        """The agent stopped during a storage move (QEMU's jobs outlive it): end the jobs left,
        then look at what each device uses. All copies: the move is recorded; none: the copies
        go; some: recorded as they are. If QEMU cannot be asked, nothing is touched."""
        vm = self.vm
        assert vm.moving_to is not None
        if vm.qmp is None:
            vm.log.error("a storage move was interrupted and QMP does not answer: kept as is")
            return
        try:
            new = VmConfig.model_validate_json(vm.moving_to.read_text())
            await end_copy_jobs(vm.qmp)
            used = await self._copies_in_use(new)
        except (OSError, ValueError, QemuError, Conflict) as exc:
            vm.log.error("cannot settle an interrupted storage move: %s (kept as is)", exc)
            return
        if used == "all":
            await self._switch_to_copies(new, vm.moving_to, [])
            vm.log.warning("completed a storage move interrupted by an agent restart")
        elif used == "none":
            self.drop_copies()
            vm.log.warning("cancelled a storage move interrupted by an agent restart")


class ColdCopy:
    """A powered-off VM's disks copied file by file (``qemu-img convert``), with progress."""

    def __init__(self, name: str, datastore: str, on_done: Callable[[], Awaitable[None]]) -> None:
        self.view = StorageView(mode="cold", phase="copying", datastore=datastore)
        self.on_done = on_done  # called once every copy is whole: makes the copies the VM's
        self.log = log.getChild(name)
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.view.phase not in TERMINAL

    def start(self, copies: list[tuple[str, str, int]]) -> None:
        """Copy each (source, target, size) in turn, in the background."""
        self.view.marks["started"] = time.time()
        for i, (source, target, size) in enumerate(copies):
            self.view.disks.append(DiskCopy(i, source, "", target, f"copy-disk{i}", length=size))
        self._task = asyncio.create_task(self._run(), name="cold-copy")

    async def _run(self) -> None:
        try:
            for copy in self.view.disks:
                await self._convert(copy)
                copy.status = "completed"
            self.view.marks["ready"] = time.time()
            self.view.phase = "pivoting"
            await self.on_done()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # recorded on the view; the center reads it there
            self.view.phase, self.view.error = "failed", getattr(exc, "message", str(exc))
            self.log.error("cold copy failed: %s", self.view.error)

    async def _convert(self, copy: DiskCopy) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-p", "-O", "qcow2", copy.source_node, copy.target,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self._proc.stdout is not None
        tail = b""
        while chunk := await self._proc.stdout.read(256):
            tail = (tail + chunk)[-512:]
            for part in reversed(chunk.replace(b"\r", b"\n").split(b"\n")):
                if b"/100%)" in part:
                    with contextlib.suppress(ValueError):
                        pct = float(part.strip().lstrip(b"(").split(b"/")[0])
                        copy.offset = int(copy.length * pct / 100)
                    break
        if await self._proc.wait() != 0:
            raise QemuError(f"qemu-img convert failed: {tail.decode(errors='replace').strip()}")
        copy.offset = copy.length

    async def abort(self) -> None:
        if self.view.phase == "completed":
            raise Conflict("the disks were copied already: too late to cancel", code="too_late")
        if self.view.phase == "pivoting":
            raise Conflict("the copies are becoming the VM's disks: too late", code="too_late")
        await self.close()
        if self.view.phase not in TERMINAL:
            self.view.phase = "cancelled"
            self.view.marks["cancelled"] = time.time()

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
