"""A host's side of a live migration: QEMU's migration driven over QMP, watched pass by pass.

Source side (:class:`Outgoing`): set capabilities and parameters, ``migrate`` to the destination's
migration address, poll ``query-migrate`` and record one sample per pre-copy pass; at
``pre-switchover`` (the guest is stunned) do the last checks and ``migrate-continue``. After success
the source QEMU sits in ``postmigrate`` until the center says finish (end it) or abort (resume it).
Once post-copy started it never runs the guest again: the destination does.

Destination side: :mod:`kvmotion.host.incoming`.

Reading a migration never acts: the agent answers with ``Outgoing.view`` or ``Incoming.view`` as
they are; only the watch loops and the center's requests (continue, abort, finish, post-copy's
steps) change them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from qemu.qmp import EventListener

from kvmotion import faults
from kvmotion.errors import Conflict, QemuError
from kvmotion.host import switchover
from kvmotion.host.incoming import Incoming
from kvmotion.host.migrationview import (
    FINAL,
    POSTCOPY_PAUSED,
    POSTCOPY_SHARE,
    MigrationMode,
    MigrationStats,
    MigrationView,
    PassSample,
    capabilities_arg,
    require_phase,
    throttle_params,
    uri_host,
)
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05
# QEMU's own auto-converge defaults, set again (a VM migrated before may keep other values).
QEMU_THROTTLE = {
    "cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
    "throttle-trigger-threshold": 50,
}  # fmt: skip


class Outgoing:
    """The source side of one migration of one VM."""

    def __init__(
        self,
        qmp: QmpSession,
        name: str,
        before_switchover: Callable[[], Awaitable[None]] | None = None,
        notify: Callable[[], None] = lambda: None,
        on_stunned: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.qmp = qmp
        # The moment the guest stops here: the destination takes its traffic (switchover.py).
        self.on_stunned = on_stunned
        self._telling: asyncio.Task[None] | None = None
        # Called when a step changes (phase, pass, marks, error, knobs): wakes the VM's
        # watchers; bytes sent alone are seen by their periodic look.
        self.notify = notify
        self._told: tuple[Any, ...] = ()
        # With the guest stunned at pre-switchover, before memory's last pass: the disk copies
        # of a "change both" end here. If it fails, the migration is cancelled.
        self.before_switchover = before_switchover
        self.view = MigrationView(side="source", phase="setup")
        self.log = log.getChild(name)
        self._task: asyncio.Task[None] | None = None
        self._events: EventListener | None = None
        self._started = 0.0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _tell(self) -> None:
        view = self.view
        step = (view.phase, len(view.samples), view.error, len(view.marks), str(view.knobs))
        if step != self._told:
            self._told = step
            self.notify()

    async def start(
        self,
        uri: str,
        max_bandwidth_bps: int,
        downtime_limit_ms: int,
        *,
        brake: bool = False,
        mode: MigrationMode = MigrationMode(),
        tls_creds: str | None = None,
        auto_converge: bool = False,
    ) -> None:
        """Configure and start ``migrate``; the watcher runs until a final state.

        ``brake`` enables QEMU's CPU throttle (auto-converge) held at its floor until
        :meth:`tune` asks for a depth; ``auto_converge`` instead lets QEMU throttle as it does
        by default (another manager's strategy); ``mode`` must be the destination's: with
        ``postcopy``, :meth:`start_postcopy` may be asked later.
        """
        capabilities = [("events", True), ("pause-before-switchover", True)]
        capabilities += [("auto-converge", brake or auto_converge), *mode.capabilities()]
        await self.qmp.execute("migrate-set-capabilities", capabilities_arg(capabilities))
        params: dict[str, Any] = {
            "max-bandwidth": max_bandwidth_bps,
            "downtime-limit": downtime_limit_ms,
            # TLS, checking that the destination's certificate names the address sent to.
            "tls-creds": tls_creds or "",
            "tls-hostname": uri_host(uri) if tls_creds else "",
        } | mode.parameters()
        if brake:
            # The brake is steered through its cap: QEMU raises the throttle towards
            # max-cpu-throttle at each pass where the guest dirties fast (threshold 1 %).
            params |= throttle_params(0) | {"throttle-trigger-threshold": 1}
        elif auto_converge:
            params |= QEMU_THROTTLE
        await self.qmp.execute("migrate-set-parameters", params)
        self.view.knobs = {
            "downtime_limit_ms": downtime_limit_ms,
            "max_bandwidth_bps": max_bandwidth_bps,
            "throttle_pct": 0,
            "brake": brake,
            "postcopy_allowed": mode.postcopy,
            "streams": mode.streams,
        }
        self.view.uri = uri
        self._started = time.monotonic()
        self.view.marks["migrate_started"] = time.time()
        # Events wake us the moment QEMU stops the guest at pre-switchover: every millisecond
        # between that and migrate-continue is downtime the user sees.
        self._events = self.qmp.listener(["MIGRATION"])
        try:
            await self.qmp.execute("migrate", {"uri": uri})
        except BaseException:
            self.qmp.remove_listener(self._events)
            raise
        self._task = asyncio.create_task(self._watch(), name="outgoing-migration")
        self._tell()

    async def _next_status(self) -> str | None:
        """The status of the next MIGRATION event, or None after a poll interval without one."""
        assert self._events is not None
        # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that arrives as the
        # event does, and close() could not stop this watcher.
        try:
            async with asyncio.timeout(POLL_INTERVAL):
                event = await self._events.get()
        except TimeoutError:
            return None
        data: Any = event.get("data") or {}  # type: ignore[attr-defined]
        return str(data.get("status"))

    async def _watch(self) -> None:
        last_pass = -1
        continued = False
        try:
            while True:
                if await self._next_status() == "pre-switchover" and not continued:
                    await self._switchover()
                    continued = True
                stats = MigrationStats.parse(await self.qmp.execute("query-migrate"))
                if stats.status == "completed":
                    stats = await self._final_stats(stats)  # before anyone reads "completed"
                self.view.stats = stats
                self.view.phase = stats.status
                if stats.passes != last_pass and stats.status in ("active", "pre-switchover"):
                    last_pass = stats.passes
                    self.view.samples.append(self._sample(stats))
                if stats.transferred_bytes and "first_byte" not in self.view.marks:
                    self.view.marks["first_byte"] = time.time()
                self._tell()
                if stats.status == "pre-switchover" and not continued:
                    await self._switchover()
                    continued = True
                if stats.status in FINAL:
                    if stats.status == "completed":
                        self.view.samples.append(self._sample(stats))  # the series' last point
                    self.view.marks[stats.status] = time.time()
                    self.view.error = stats.error or self.view.error
                    if stats.status != "completed" and self.postcopy_started:
                        # The destination ran the guest: the memory here is stale.
                        self.log.error("post-copy ended %s: not resuming here", stats.status)
                    elif stats.status != "completed":
                        await self._resume_if_paused()
                    self.log.info("migration %s: %s", stats.status, stats.error or "")
                    return
        except QemuError as exc:
            self.view.phase = "failed"
            self.view.error = exc.message
            self.log.error("migration watcher: %s", exc.message)
        finally:
            self._tell()
            if self._events is not None:
                self.qmp.remove_listener(self._events)

    async def _switchover(self) -> None:
        """The guest is stunned: end what must end first, then let QEMU send the rest."""
        self.view.marks["stunned"] = time.time()
        if self.on_stunned is not None:  # not awaited: it must not lengthen the stun
            self._telling = asyncio.create_task(self.on_stunned())
        if self.before_switchover is not None:
            try:
                await self.before_switchover()
            except (QemuError, Conflict) as exc:
                self.view.error = f"at switchover: {exc.message}"
                self.log.error("cancelling the migration: %s", self.view.error)
                await self.qmp.execute("migrate_cancel")
                return
            self.view.marks["disks_completed"] = time.time()
        await faults.hold("pre-switchover")
        await self.qmp.execute("migrate-continue", {"state": "pre-switchover"})

    async def _final_stats(self, stats: MigrationStats) -> MigrationStats:
        """QEMU says ``completed`` a moment before it fills in total-time and downtime."""
        for _ in range(20):
            if stats.total_time_ms:
                return stats
            await asyncio.sleep(0.01)
            stats = MigrationStats.parse(await self.qmp.execute("query-migrate"))
        return stats

    def _sample(self, stats: MigrationStats) -> PassSample:
        return PassSample(
            t=round(time.monotonic() - self._started, 3),
            pass_no=stats.passes,
            transferred_bytes=stats.transferred_bytes,
            remaining_bytes=stats.remaining_bytes,
            dirty_rate_bps=stats.dirty_rate_bps,
            throughput_bps=stats.mbps * 1e6 / 8,
            expected_downtime_ms=stats.expected_downtime_ms,
            throttle_pct=stats.throttle_pct,
        )

    async def _resume_if_paused(self) -> None:
        status = await self.qmp.query_status()
        if not status.running and status.status in ("paused", "finish-migrate", "postmigrate"):
            await self._resume_here()

    async def _resume_here(self) -> None:
        await switchover.resume_here(self.qmp)
        self.view.marks["source_resumed"] = time.time()

    @property
    def postcopy_started(self) -> bool:
        """Post-copy began: the guest ran on the destination, so this copy must never run again."""
        return "postcopy" in self.view.marks or self.view.phase in (
            "postcopy-active",
            *POSTCOPY_PAUSED,
        )

    async def cancel(self) -> None:
        """Cancel before switchover; the source keeps (or resumes) running. Idempotent."""
        if self.view.phase == "completed":
            raise Conflict("migration already completed: it cannot be cancelled", code="too_late")
        if self.postcopy_started:
            raise Conflict(
                "post-copy has started: the guest runs on the destination, which still needs "
                "memory from here; it cannot be cancelled",
                code="too_late",
            )
        with contextlib.suppress(QemuError):
            await self.qmp.execute("migrate_cancel")
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 30)
        with contextlib.suppress(QemuError):
            await self._resume_if_paused()
        self._tell()

    async def tune(
        self,
        downtime_limit_ms: int | None = None,
        max_bandwidth_bps: int | None = None,
        throttle_pct: int | None = None,
    ) -> None:
        """Change the knobs of the running migration (the convergence engine's actions)."""
        if self.view.phase in FINAL:
            raise Conflict(f"the migration is {self.view.phase}", code="not_running")
        params: dict[str, Any] = {}
        if downtime_limit_ms is not None:
            params["downtime-limit"] = downtime_limit_ms
        if max_bandwidth_bps is not None:
            params["max-bandwidth"] = max_bandwidth_bps
        if throttle_pct is not None:
            if not self.view.knobs.get("brake"):
                raise Conflict("this migration was started without the CPU brake", code="no_brake")
            params |= throttle_params(throttle_pct)
        if params:
            await self.qmp.execute("migrate-set-parameters", params)
        for key, value in (
            ("downtime_limit_ms", downtime_limit_ms),
            ("max_bandwidth_bps", max_bandwidth_bps),
            ("throttle_pct", throttle_pct),
        ):
            if value is not None:
                self.view.knobs[key] = value
        self._tell()

    async def start_postcopy(self) -> None:
        if not self.view.knobs.get("postcopy_allowed"):
            raise Conflict("this migration was started without post-copy", code="no_postcopy")
        # The background copy leaves part of the link free: the pages the running guest faults on
        # would otherwise queue behind it (in the link's queue, which both streams share).
        cap = self.view.knobs.get("max_bandwidth_bps")
        if cap:
            share = {"max-postcopy-bandwidth": int(cap * POSTCOPY_SHARE)}
            await self.qmp.execute("migrate-set-parameters", share)
        await self.qmp.execute("migrate-start-postcopy")
        self.view.marks["postcopy"] = time.time()
        self._tell()

    async def pause_postcopy(self) -> None:
        """Break a post-copy stream that stalled (a cut link leaves TCP waiting for minutes), so
        that it can be recovered: QEMU moves to ``postcopy-paused``."""
        require_phase(self.view, ("postcopy-active",), "in post-copy")
        await self.qmp.execute("migrate-pause", oob=True)

    async def resume_postcopy(self, uri: str) -> None:
        """Reconnect a paused post-copy to the destination's recovery ``uri``; the copy goes on
        from where it broke."""
        require_phase(self.view, ("postcopy-paused",), "paused")
        await self.qmp.execute("migrate", {"uri": uri, "resume": True})
        self.view.marks["postcopy_resumed"] = time.time()
        self._tell()

    async def resume_after_completion(self) -> None:
        """Run the guest here again after a completed migration whose destination died."""
        status = await self.qmp.query_status()
        if not status.running:
            await self._resume_here()
        self.view.phase = "aborted"
        self._tell()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def postcopy_step(
    migration: Outgoing | Incoming | None, step: str, *, uri: str | None, address: str | None
) -> str | None:
    """One step of post-copy on this host: ``start`` (source), ``pause`` (either side),
    ``recover`` (destination: listen again at ``address``; returns the URI), ``resume``
    (source: reconnect to ``uri``)."""
    if isinstance(migration, Outgoing) and step == "start":
        await migration.start_postcopy()
    elif isinstance(migration, Outgoing | Incoming) and step == "pause":
        await migration.pause_postcopy()
    elif isinstance(migration, Incoming) and step == "recover" and address:
        return await migration.recover(address)
    elif isinstance(migration, Outgoing) and step == "resume" and uri:
        await migration.resume_postcopy(uri)
    else:
        raise Conflict(f"no post-copy migration here to {step}", code="wrong_state")
    return None
