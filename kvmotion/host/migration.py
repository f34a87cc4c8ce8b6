"""A host's side of a live migration: QEMU's migration driven over QMP, watched pass by pass.

Source side (:class:`Outgoing`): set capabilities and parameters, ``migrate`` to the destination's
migration address, poll ``query-migrate`` and record one sample per pre-copy pass; at
``pre-switchover`` (the guest is stunned) do the last checks and ``migrate-continue``. After success
the source QEMU sits in ``postmigrate`` until the center says finish (end it) or abort (resume it).

Destination side (:class:`Incoming`): QEMU was started paused with ``-incoming defer``; listen on
the migration address; when the stream completes, ``cont`` at once (the guest resumes here) and
``announce-self`` so the VM network learns the VM's new place.

Reading a migration never acts: the agent answers with ``Outgoing.view`` or ``Incoming.view`` as
they are; only the watch loops and the center's requests (continue, abort, finish) change them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from qemu.qmp import EventListener

from kvmotion import faults
from kvmotion.errors import Conflict, QemuError
from kvmotion.host import switchover
from kvmotion.host.migrationview import (
    ACTIVE,
    ANNOUNCE,
    FINAL,
    MigrationStats,
    MigrationView,
    PassSample,
    throttle_params,
    uri_host,
)
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05


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
        postcopy: bool = False,
        tls_creds: str | None = None,
    ) -> None:
        """Configure and start ``migrate``; the watcher runs until a final state.

        ``brake`` enables QEMU's CPU throttle (auto-converge) held at its floor until
        :meth:`tune` asks for a depth; ``postcopy`` allows :meth:`start_postcopy` later (the
        destination must have been told too).
        """
        capabilities = [("events", True), ("pause-before-switchover", True)]
        capabilities += [("auto-converge", brake), ("postcopy-ram", postcopy)]
        await self.qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": c, "state": on} for c, on in capabilities]},
        )
        params: dict[str, Any] = {
            "max-bandwidth": max_bandwidth_bps,
            "downtime-limit": downtime_limit_ms,
            # TLS, checking that the destination's certificate names the address sent to.
            "tls-creds": tls_creds or "",
            "tls-hostname": uri_host(uri) if tls_creds else "",
        }
        if brake:
            # The brake is steered through its cap: QEMU raises the throttle towards
            # max-cpu-throttle at each pass where the guest dirties fast (threshold 1 %).
            params |= throttle_params(0) | {"throttle-trigger-threshold": 1}
        await self.qmp.execute("migrate-set-parameters", params)
        self.view.knobs = {
            "downtime_limit_ms": downtime_limit_ms,
            "max_bandwidth_bps": max_bandwidth_bps,
            "throttle_pct": 0,
            "brake": brake,
            "postcopy_allowed": postcopy,
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
                    if stats.status != "completed":
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

    async def cancel(self) -> None:
        """Cancel before switchover; the source keeps (or resumes) running. Idempotent."""
        if self.view.phase == "completed":
            raise Conflict("migration already completed: it cannot be cancelled", code="too_late")
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
        await self.qmp.execute("migrate-start-postcopy")
        self.view.marks["postcopy"] = time.time()
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


class Incoming:
    """The destination side: listen, and resume the guest the moment the stream completes."""

    def __init__(
        self,
        qmp: QmpSession,
        name: str,
        on_resumed: Callable[[], None],
        before_resume: Callable[[], Awaitable[None]] | None = None,
        notify: Callable[[], None] = lambda: None,
        learned: Callable[[], Awaitable[float | None]] | None = None,
    ) -> None:
        self.qmp = qmp
        # When the VM network learned the VM here after it resumed (host/taps.py wait_learned):
        # the user's traffic reaches it from then on.
        self.learned = learned
        self._learning: asyncio.Task[None] | None = None
        # Lets the source's agent say the guest stopped there (host/switchover.py).
        self.switchover_token = secrets.token_urlsafe(24)
        self.notify = notify  # called at each change of phase
        self.on_resumed = on_resumed
        self.before_resume = before_resume  # e.g. stop serving the disks over NBD
        self.view = MigrationView(side="destination", phase="setup")
        self.log = log.getChild(name)
        self._task: asyncio.Task[None] | None = None
        self._events: EventListener | None = None

    async def listen(
        self, address: str, *, postcopy: bool = False, tls_creds: str | None = None
    ) -> str:
        """Start listening on ``address`` (the migration network), accepting only TLS streams
        from a certified host with ``tls_creds``; return the URI to send to."""
        await self.qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [
                {"capability": "events", "state": True},
                {"capability": "late-block-activate", "state": True},
                {"capability": "postcopy-ram", "state": postcopy},
            ]},
        )  # fmt: skip
        await self.qmp.execute("migrate-set-parameters", {"tls-creds": tls_creds or ""})
        # Listen for MIGRATION events before the stream can start, so none is missed.
        self._events = self.qmp.listener(["MIGRATION"])
        await self.qmp.execute("migrate-incoming", {"uri": f"tcp:{address}:0"})
        info = await self.qmp.execute("query-migrate")
        ports = [a["port"] for a in info.get("socket-address", []) if "port" in a]
        if not ports:
            raise QemuError(f"destination QEMU did not report its listening port: {info}")
        uri = f"tcp:{address}:{ports[0]}"
        self.view.uri = uri
        self.view.phase = "listening"
        self.view.marks["listening"] = time.time()
        self._task = asyncio.create_task(self._watch(), name="incoming-migration")
        return uri

    async def _watch(self) -> None:
        """Resume on the MIGRATION event ``completed`` (no polling delay in the downtime)."""
        assert self._events is not None
        try:
            while True:
                status = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # not wait_for: see Outgoing._next_status
                        event = await self._events.get()
                    data: Any = event.get("data") or {}  # type: ignore[attr-defined]
                    status = str(data.get("status"))
                if status is None:  # no event for a while: look, in case one was missed
                    status = MigrationStats.parse(await self.qmp.execute("query-migrate")).status
                if status == "completed":
                    if self.before_resume is not None:
                        await self.before_resume()
                    await faults.hold("resume")
                    await self.qmp.execute("cont")
                    self.view.marks["resumed"] = time.time()
                    self.view.phase = "resumed"
                    self.notify()
                    try:  # announce first: the VM network learns the new place at once
                        await self.qmp.execute("announce-self", ANNOUNCE)
                    finally:  # then record that the guest runs here (a registration fsync)
                        self.on_resumed()
                    if self.learned is not None:
                        self._learning = asyncio.create_task(self._note_learned(self.learned))
                    self.view.stats = MigrationStats.parse(await self.qmp.execute("query-migrate"))
                    self.log.info("resumed on this host and announced")
                    return
                if status in ("failed", "cancelled"):
                    self.view.phase = status
                    return
                if status in ACTIVE and status != self.view.phase:
                    self.view.phase = status
                    self.notify()
        except QemuError as exc:
            # A failed incoming migration makes the destination QEMU exit.
            self.view.phase = "failed"
            self.view.error = exc.message
        finally:
            self.notify()
            self.qmp.remove_listener(self._events)

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is this migration's switchover token, before the resume."""
        waiting = self.view.phase in ("listening", *ACTIVE)
        return waiting and hmac.compare_digest(token, self.switchover_token)

    async def take_traffic(self, bridges: dict[str, list[tuple[str, str]]]) -> None:
        """The guest stopped on the source: its frames come here now, queued for the resume."""
        if "traffic_taken" not in self.view.marks and await switchover.take_traffic(bridges):
            self.view.marks["traffic_taken"] = time.time()
            self.notify()

    async def _note_learned(self, learned: Callable[[], Awaitable[float | None]]) -> None:
        when = await learned()
        if when is not None:
            self.view.marks["mac_learned"] = when
            self.notify()

    async def close(self) -> None:
        for task in (self._task, self._learning):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
