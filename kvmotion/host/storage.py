"""A running VM's disks copied while it runs: QEMU mirror jobs, to local files or NBD exports.

Storage only (same host): each disk is mirrored (``blockdev-mirror sync=full``) into a new
image on the target datastore; when every copy is ``READY`` (it tracks the guest's writes),
``block-job-complete`` pivots the device onto the copy, and the old nodes are closed.

Change both (to another host): the destination exports its new, empty images over NBD on its
migration address (:func:`export_disks`); the source mirrors into them, then migrates memory.
At pre-switchover, with the guest stunned, each READY mirror is cancelled (not forced): QEMU
flushes what is left and ends the job with the target a consistent copy, never pivoting. The
destination stops its NBD server before it resumes the guest on its copy.

A copy that fails or is cancelled never touches the source disks: mirrors only read them.
Cancelling first *yanks* NBD connections, so a cut migration link cannot leave QEMU waiting
for requests that will never be answered (a stuck drain would freeze the guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kvmotion.errors import Conflict, QemuError
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2
JOB_EVENTS = ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"]
# A job ends in one of these, and so does a copy ("pivoted" is not one: the devices use the
# copies, but the VM's record does not say so yet).
TERMINAL = ("completed", "cancelled", "failed")
END_TIMEOUT = 30.0
PIVOT_TIMEOUT = 600.0  # once QEMU was told to switch, wait for it rather than guess
SWITCHOVER_TIMEOUT = 10.0  # the guest is stunned meanwhile: past this, cancel and resume
NBD_OPEN_TIMEOUT = 15


def device_id(index: int) -> str:
    """The virtio-blk device of disk ``index`` (see :mod:`kvmotion.qemu.cmdline`)."""
    return f"virtio-disk{index}"


def file_node(node: str) -> str:
    """Every format node we create has its protocol node beside it, named so."""
    return f"{node}-file"


@dataclass
class DiskCopy:
    """One disk's mirror job and what it has copied."""

    index: int
    source_node: str
    target_node: str
    target: str  # a path on the target datastore, or nbd://host:port/export
    job: str
    length: int = 0
    offset: int = 0
    status: str = "copying"  # copying, ready, completed, cancelled, failed
    error: str | None = None


@dataclass
class StorageView:
    """What a host reports about a VM's disk copy."""

    mode: str  # "local": pivot to copies here; "nbd": copies for another host's VM
    # copying, ready; then pivoting, pivoted (devices on the copies, record not yet), completed
    # (storage move) or switching, completed (change both); or failed, cancelled
    phase: str
    datastore: str
    disks: list[DiskCopy] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def copied_bytes(self) -> int:
        return sum(d.offset for d in self.disks)

    @property
    def total_bytes(self) -> int:
        return sum(d.length for d in self.disks)


@dataclass(frozen=True)
class MirrorTarget:
    """A disk's target, as ``blockdev-add`` arguments and the node to mirror into."""

    index: int
    node: str
    blockdev: dict[str, Any]
    where: str


def local_target(index: int, node: str, path: str) -> MirrorTarget:
    blockdev = {
        "driver": "qcow2",
        "node-name": node,
        "file": {
            "driver": "file",
            "node-name": file_node(node),
            "filename": path,
            "cache": {"direct": False},
            "aio": "threads",
        },
    }
    return MirrorTarget(index, node, blockdev, path)


def nbd_target(
    index: int, host: str, port: int, export: str, token: str, tls_creds: str | None = None
) -> MirrorTarget:
    """A disk's copy on another host, over NBD (TLS with ``tls_creds``, checking that the
    server's certificate names ``host``)."""
    node = f"nbd-disk{index}-{token}"
    blockdev: dict[str, Any] = {
        "driver": "nbd",
        "node-name": node,
        "server": {"type": "inet", "host": host, "port": str(port)},
        "export": export,
        # A destination that never answers must not hold QMP (and the guest) in connect().
        "open-timeout": NBD_OPEN_TIMEOUT,
    }
    if tls_creds is not None:
        blockdev |= {"tls-creds": tls_creds, "tls-hostname": host}
    return MirrorTarget(index, node, blockdev, f"nbd://{host}:{port}/{export}")


async def _disks_inserted(qmp: QmpSession, count: int) -> list[dict[str, Any]]:
    by_device: dict[str, dict[str, Any]] = {}
    for block in await qmp.execute("query-block"):
        qdev = str(block.get("qdev", ""))
        for i in range(count):
            if qdev in (device_id(i), f"/machine/peripheral/{device_id(i)}/virtio-backend"):
                by_device[device_id(i)] = block.get("inserted") or {}
    missing = [device_id(i) for i in range(count) if not by_device.get(device_id(i))]
    if missing:
        raise QemuError(f"QEMU reports no block node for {', '.join(missing)}")
    return [by_device[device_id(i)] for i in range(count)]


async def yank(qmp: QmpSession, nodes: list[str]) -> None:
    """Shut the NBD connections of ``nodes`` at once: out of band (QEMU answers even with its
    main loop stuck in a drain), else in band. Errors are ignored: a gone node needs nothing."""
    instances = {"instances": [{"type": "block-node", "node-name": n} for n in nodes]}
    try:
        await qmp.execute("yank", instances, timeout=5, oob=True)
    except QemuError:
        with contextlib.suppress(QemuError):
            await qmp.execute("yank", instances, timeout=5)


async def disk_nodes(qmp: QmpSession, count: int) -> list[str]:
    """The block node each of the VM's disk devices uses now (a pivot changes it)."""
    return [str(i["node-name"]) for i in await _disks_inserted(qmp, count)]


async def disk_files(qmp: QmpSession, count: int) -> list[str]:
    """The image file each of the VM's disk devices uses now."""
    return [str(i.get("file", "")) for i in await _disks_inserted(qmp, count)]


async def delete_node(qmp: QmpSession, node: str) -> None:
    """Close a format node and its protocol node (either may be gone already)."""
    for name in (node, file_node(node)):
        with contextlib.suppress(QemuError):
            await qmp.execute("blockdev-del", {"node-name": name})


class DiskMirror:
    """The mirror jobs copying one VM's disks, watched until each ends."""

    def __init__(
        self,
        qmp: QmpSession,
        name: str,
        mode: str,
        datastore: str,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.qmp = qmp
        self.view = StorageView(mode=mode, phase="copying", datastore=datastore)
        self.on_ready = on_ready  # called once, when every copy tracks the guest's writes
        self.log = log.getChild(name)
        self._events = qmp.listener(JOB_EVENTS)
        self._task: asyncio.Task[None] | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._targets: list[MirrorTarget] = []

    def check_memory_may_follow(self, vm: str, *, postcopy: bool) -> None:
        """Raises Conflict unless ``vm``'s memory may move now ("change both"): every disk
        copy ready, and no post-copy (the disks must be consistent at switchover)."""
        if self.view.mode != "nbd" or self.view.phase != "ready":
            raise Conflict(
                f"VM {vm}'s disks are being copied ({self.view.phase}): memory follows only "
                "once every disk copy is ready",
                code="storage_not_ready",
            )
        if postcopy:
            raise Conflict(
                "post-copy cannot be combined with a disk copy: the disks must be consistent "
                "at switchover",
                code="no_postcopy",
            )

    @property
    def running(self) -> bool:
        return self.view.phase not in TERMINAL

    async def start(
        self, sources: list[str], targets: list[MirrorTarget], speed_bps: int | None = None
    ) -> None:
        """Open the targets and start one mirror per disk (each capped at ``speed_bps`` if
        given: the guest's own I/O competes with the copy); on error, undo what was started."""
        self.view.marks["started"] = time.time()
        try:
            for source, target in zip(sources, targets, strict=True):
                await self.qmp.execute("blockdev-add", target.blockdev)
                self._targets.append(target)
                job = f"mirror-disk{target.index}"
                copy = DiskCopy(target.index, source, target.node, target.where, job)
                self.view.disks.append(copy)
                args: dict[str, Any] = {
                    "job-id": job,
                    "device": source,
                    "target": target.node,
                    "sync": "full",
                }
                if speed_bps:
                    args["speed"] = speed_bps
                await self.qmp.execute("blockdev-mirror", args)
        except BaseException as exc:
            self.view.error = getattr(exc, "message", str(exc))
            await self.abort()
            self.qmp.remove_listener(self._events)
            raise
        self._task = asyncio.create_task(self._watch(), name="disk-mirror")

    # -- watching ----------------------------------------------------------------------------------
    def _copy(self, job: str) -> DiskCopy | None:
        return next((d for d in self.view.disks if d.job == job), None)

    async def _watch(self) -> None:
        try:
            while any(d.status not in TERMINAL for d in self.view.disks):
                with contextlib.suppress(TimeoutError):
                    event = await asyncio.wait_for(self._events.get(), POLL_INTERVAL)
                    self._on_event(event)
                    while not self._events.empty():
                        self._on_event(await self._events.get())
                await self._poll()
                if self.view.phase == "copying" and all(
                    d.status == "ready" for d in self.view.disks
                ):
                    self.view.phase = "ready"
                    self.view.marks["ready"] = time.time()
                    if self.on_ready is not None:
                        self._ready_task = asyncio.create_task(
                            self._run_on_ready(), name="disk-mirror-ready"
                        )
            self._settle()
        except QemuError as exc:
            self._fail(exc.message)
        finally:
            self.qmp.remove_listener(self._events)

    async def _run_on_ready(self) -> None:
        assert self.on_ready is not None
        try:
            await self.on_ready()
        except Exception as exc:  # recorded on the view; the center reads it there
            self.log.exception("after the copies were ready")
            self._fail(getattr(exc, "message", repr(exc)))

    def _on_event(self, event: Any) -> None:
        data = event.get("data") or {}
        copy = self._copy(str(data.get("device", "")))
        if copy is None:
            return
        name = event.get("event")
        if name == "BLOCK_JOB_READY":
            copy.status = "ready" if copy.status == "copying" else copy.status
            copy.offset, copy.length = int(data.get("offset", 0)), int(data.get("len", 0))
        elif name == "BLOCK_JOB_COMPLETED":
            copy.offset, copy.length = int(data.get("offset", 0)), int(data.get("len", 0))
            if data.get("error"):
                copy.status, copy.error = "failed", str(data["error"])
            else:
                copy.status = "completed"
        elif name == "BLOCK_JOB_CANCELLED":
            copy.status = "cancelled"
        elif name == "BLOCK_JOB_ERROR":
            copy.error = f"{data.get('operation', 'I/O')} error on the copy"

    async def _poll(self) -> None:
        jobs = {j["device"]: j for j in await self.qmp.execute("query-block-jobs")}
        for copy in self.view.disks:
            job = jobs.get(copy.job)
            if job is not None:
                copy.offset, copy.length = int(job["offset"]), int(job["len"])

    def _settle(self) -> None:
        """Every job ended: the phase says how, unless a caller already decided it."""
        failed = [d for d in self.view.disks if d.status == "failed"]
        if failed and self.view.phase not in ("cancelled",):
            self._fail(f"copy of disk {failed[0].index} failed: {failed[0].error}")
        elif all(d.status == "completed" for d in self.view.disks):
            # A pivot is complete only once the VM's record says so (the VM sets "completed").
            if self.view.phase == "pivoting":
                self.view.phase = "pivoted"
            elif self.view.phase == "switching":
                self.view.phase = "completed"
                self.view.marks["completed"] = time.time()
            else:
                self._fail("the copy jobs ended by themselves")
        elif self.view.phase not in TERMINAL:
            self.view.phase = "cancelled"

    def _fail(self, why: str) -> None:
        if self.view.phase in ("completed", "cancelled"):
            return
        self.view.phase = "failed"
        self.view.error = self.view.error or why
        self.view.marks.setdefault("failed", time.time())
        self.log.error("disk copy failed: %s", self.view.error)

    async def _wait_ended(self, timeout: float) -> bool:
        """Wait until the watcher saw every job end and settled the phase (False: ``timeout``
        passed first). Waiting for the watcher itself, not for the jobs' states, is what makes
        the phase final when this returns."""
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            return False
        return True

    # -- ending ----------------------------------------------------------------------------------
    async def pivot(self) -> None:
        """Local copies: switch every device to its copy (every copy must be READY)."""
        if self.view.phase != "ready":
            raise Conflict(f"the disk copies are {self.view.phase}, not ready", code="not_ready")
        self.view.phase = "pivoting"
        for copy in self.view.disks:
            await self.qmp.execute("block-job-complete", {"device": copy.job})
        await self._finish("pivot", "pivoted", PIVOT_TIMEOUT)

    async def complete_at_switchover(self) -> None:
        """NBD copies, with the guest stunned: flush and end each mirror, never pivoting.

        Afterwards each target holds exactly what the source disk holds, and the source's
        NBD client nodes are closed (the destination can stop its server and resume).
        """
        if self.view.phase != "ready":
            raise Conflict(f"the disk copies are {self.view.phase}, not ready", code="not_ready")
        self.view.phase = "switching"
        for copy in self.view.disks:
            await self.qmp.execute("block-job-cancel", {"device": copy.job})
        await self._finish("switchover", "completed", SWITCHOVER_TIMEOUT)
        for target in self._targets:
            await delete_node(self.qmp, target.node)

    async def _finish(self, what: str, phase: str, timeout: float) -> None:
        if self._task is None or not await self._wait_ended(timeout):
            raise QemuError(f"the disk copies did not end at {what} in {timeout:.0f} s")
        if self.view.phase != phase:
            raise QemuError(f"the disk copies ended {self.view.phase} at {what}: {self.view.error}")

    async def abort(self) -> None:
        """End every copy now, keeping the source disks; close the targets. Idempotent.

        NBD connections are yanked first: over a cut link their requests would never end,
        and QEMU would wait for them with its main loop held.
        """
        if self.view.phase == "completed":
            raise Conflict("the disk copies completed: too late to cancel", code="too_late")
        if self.view.phase not in TERMINAL:
            self.view.phase = "cancelled"
            self.view.marks["cancelled"] = time.time()
        nbd = [t.node for t in self._targets if t.blockdev["driver"] == "nbd"]
        if nbd:
            await yank(self.qmp, nbd)
        for copy in self.view.disks:
            if copy.status not in TERMINAL:
                with contextlib.suppress(QemuError):
                    await self.qmp.execute("block-job-cancel", {"device": copy.job, "force": True})
        if self._task is not None and not await self._wait_ended(END_TIMEOUT):
            self.log.error("disk copy jobs did not end in %.0f s after cancel", END_TIMEOUT)
        for target in self._targets:
            await delete_node(self.qmp, target.node)
        self._targets.clear()

    async def close(self) -> None:
        """Stop watching (QEMU ended): a copy still running has failed with it."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.running:
            self._fail("the VM's QEMU ended during the copy")
        self.qmp.remove_listener(self._events)


async def export_disks(
    qmp: QmpSession, address: str, nodes: list[str], *, tls_creds: str | None = None
) -> int:
    """Destination: serve ``nodes`` writable over NBD on ``address`` (TLS only, with
    ``tls_creds``); return the port.

    The agent opens the listening socket itself (any free port on the migration address) and
    hands it to QEMU, so there is no port to guess and no race for it.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, 0))
        listener.listen(16)
        port = int(listener.getsockname()[1])
        await qmp.pass_fd(listener.fileno(), "nbd-listener")
    server: dict[str, Any] = {"addr": {"type": "fd", "data": {"str": "nbd-listener"}}}
    if tls_creds is not None:
        server["tls-creds"] = tls_creds
    await qmp.execute("nbd-server-start", server)
    for node in nodes:
        await qmp.execute(
            "block-export-add",
            {"type": "nbd", "id": f"export-{node}", "node-name": node, "name": node,
             "writable": True},
        )  # fmt: skip
    return port


async def stop_exports(qmp: QmpSession) -> None:
    """Destination, before it resumes the guest: no one writes into its disks but the guest."""
    with contextlib.suppress(QemuError):  # never started, or stopped already
        await qmp.execute("nbd-server-stop")
