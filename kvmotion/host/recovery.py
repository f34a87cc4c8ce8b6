"""Restart recovery: what a VM's QEMU was left doing by an agent that stopped.

A VM's QEMU outlives its agent, and so do the migration and disk-copy jobs it runs. When an agent
starts again it asks each QEMU it finds what it is doing and settles what nobody watches any
more, always keeping "never two running copies": a source whose stream completed stays paused
until someone has seen the destination's copy end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from enum import StrEnum

from kvmotion.errors import Conflict, QemuError
from kvmotion.host.migrationview import ACTIVE, MigrationStats
from kvmotion.host.storage import delete_node, stop_exports, yank
from kvmotion.host.switchover import resume_here
from kvmotion.qemu.qmp import QmpSession

# The migration states in which an outgoing stream is still under way in QEMU.
UNDER_WAY = ("setup", "active", "pre-switchover", "cancelling")
CANCEL_POLLS, CANCEL_POLL_S = 100, 0.1  # how long a cancel is waited for: 10 s


class IncomingLeft(StrEnum):
    """How a destination's copy was left by its stopped agent."""

    RESUMED = "resumed"  # the stream had completed: resumed now, this copy is the VM
    RUNNING = "running"  # it runs already: this copy is the VM
    INCOMPLETE = "incomplete"  # still receiving (or failed): it stays a destination


async def recover_outgoing(qmp: QmpSession, *, destination_gone: bool = False) -> str | None:
    """An outgoing migration that outlived its agent's watch. QEMU waits at pre-switchover for
    a ``migrate-continue`` nobody will send (the guest stunned), or streams on unwatched: cancel
    it; the guest runs here again and the center sees the migration fail. One that completed is
    left as it is (the destination owns the guest) unless the caller has seen the destination's
    copy end (``destination_gone``): then the guest resumes here. Returns what it did, or None
    when QEMU had no migration to recover."""
    stats = MigrationStats.parse(await qmp.execute("query-migrate"))
    if stats.status in UNDER_WAY:
        with contextlib.suppress(QemuError):
            await qmp.execute("migrate_cancel")
        for _ in range(CANCEL_POLLS):  # QEMU cancels within a moment
            stats = MigrationStats.parse(await qmp.execute("query-migrate"))
            if stats.status not in ACTIVE:
                break
            await asyncio.sleep(CANCEL_POLL_S)
        else:
            raise QemuError(f"QEMU did not cancel the migration left in it: still {stats.status}")
        status = await qmp.query_status()
        if not status.running and status.status in ("paused", "finish-migrate"):
            await resume_here(qmp)
        return "the migration left in QEMU was cancelled and the guest runs here"
    if stats.status == "completed" and destination_gone:
        await resume_here(qmp)  # (a guest already running stays so)
        return "source resumed (the destination's copy had ended)"
    return None


async def abort_unwatched(qmp: QmpSession, name: str, *, destination_gone: bool) -> str:
    """The center aborts a migration of VM ``name`` that this agent does not watch: there was
    none, or an earlier agent started it. QEMU says which; see :func:`recover_outgoing`."""
    stats = MigrationStats.parse(await qmp.execute("query-migrate"))
    if stats.status == "completed" and (await qmp.query_status()).running:
        # A stream completed and the guest runs here: this host received it (or a source
        # resumed it): either way it is the owner now.
        raise Conflict(
            f"VM {name} runs on this host after a completed migration: it is the owner now",
            code="too_late",
        )
    done = await recover_outgoing(qmp, destination_gone=destination_gone)
    if done:
        return done
    if stats.status == "completed":  # kept paused, as without the restart
        raise destination_may_own(name)
    return "nothing to abort"


def destination_may_own(name: str) -> Conflict:
    """A completed stream, and nobody has seen the destination's copy end."""
    return Conflict(f"migration of {name} completed: the destination owns the VM", code="too_late")


async def recover_incoming(qmp: QmpSession) -> IncomingLeft:
    """A destination's copy whose agent stopped: resume a completed stream (this copy is the
    VM now: nothing else will ever resume it, the source stays in postmigrate)."""
    stats = MigrationStats.parse(await qmp.execute("query-migrate"))
    status = await qmp.query_status()
    if stats.status == "completed" and not status.running:
        await stop_exports(qmp)  # harmless without exports; never leave disks served
        await resume_here(qmp)
        return IncomingLeft.RESUMED
    return IncomingLeft.RUNNING if status.running else IncomingLeft.INCOMPLETE


async def end_copy_jobs(qmp: QmpSession, timeout: float = 60.0) -> None:
    """Cancel the disk-copy jobs a stopped agent left in QEMU (yanking NBD connections first)
    and wait until QEMU reports none; closes stale NBD client nodes. Raises QemuError if the
    jobs do not end in ``timeout``."""
    jobs = [j for j in await qmp.execute("query-block-jobs") if j["device"].startswith("mirror-")]
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
    while await copy_jobs_left(qmp):
        if time.monotonic() >= deadline:
            raise QemuError("disk-copy jobs left by a stopped agent did not end")
        await asyncio.sleep(0.2)
    for node in stale_nbd:
        await delete_node(qmp, node)


async def copy_jobs_left(qmp: QmpSession) -> bool:
    """Whether QEMU still runs a disk-copy job of this VM."""
    return any(j["device"].startswith("mirror-") for j in await qmp.execute("query-block-jobs"))
