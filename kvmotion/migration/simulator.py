"""A deterministic simulation of QEMU 7.2's pre-copy over one link, for testing the policy.

Pure: no clock, no randomness. The guest has ``ram_bytes`` of RAM of which ``nonzero_bytes`` are
not zero pages, and writes ``dirty_rate_bps`` bytes/s that all land in a ``working_set_bytes``
region (like a loop over a buffer: the pages dirtied since the last bitmap sync are
``min(working_set, written)``); a throttle of p % cuts the dirty rate by p %.

QEMU, as modelled (migration/ram.c, migration/migration.c in 7.2):

- The first bitmap sync marks all RAM dirty (pass 1, the bulk pass). Zero pages cost nothing on
  the wire, but count 4 KiB each in ``remaining``; non-zero pages are spread evenly over RAM.
- Pages stream at ``min(link, max-bandwidth)``. Every 100 ms QEMU measures the bandwidth and sets
  ``threshold = bandwidth x downtime-limit`` (0 before the first measurement).
- When remaining < threshold, or the bitmap is empty, QEMU syncs the dirty bitmap (a new pass,
  ``dirty-sync-count`` + 1) and switches over if the pending bytes are now below the threshold.
  The stopped guest's last bytes go at the link's full speed: ``downtime = pending / link``
  (device state is ignored: real downtime is a few tens of ms more).
- ``dirty-pages-rate`` counts newly dirty pages found by syncs, reported at most once a second.

Observations are recorded at each sync, as the source host samples them (one per pass), and the
policy is consulted at each sync and every ``poll_s``. A new bandwidth applies at once and enters
the threshold, with a new downtime limit, at the next 100 ms measurement. The throttle is applied
as QEMU 7.2's auto-converge applies it (:func:`~kvmotion.migration.predictor.auto_converge`):
late, and only while the guest dirties memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmotion.errors import InvalidInput
from kvmotion.migration.policy import (
    QEMU_DEFAULT_KNOBS,
    ConvergenceRequest,
    Decision,
    Knobs,
    Observation,
    initial_knobs,
)
from kvmotion.migration.predictor import auto_converge

Policy = Callable[[ConvergenceRequest, float, Sequence[Observation], Knobs], Decision]

CHECK_S = 0.1  # QEMU's bandwidth measurement period (BUFFER_DELAY)
SLICE_S = 0.01  # at most one sync per slice when the bitmap runs empty
RATE_PERIOD_S = 1.0  # dirty-pages-rate is updated at most this often
PAGE = 4096
MAX_EVENTS = 2_000_000


@dataclass(frozen=True)
class Guest:
    ram_bytes: int
    nonzero_bytes: int
    dirty_rate_bps: float
    working_set_bytes: int

    def __post_init__(self) -> None:
        if not 0 < self.nonzero_bytes <= self.ram_bytes:
            raise InvalidInput("a guest needs 0 < non-zero RAM <= RAM")
        if not 0 <= self.working_set_bytes <= self.nonzero_bytes:
            raise InvalidInput("a guest's working set must fit in its non-zero RAM")
        if self.dirty_rate_bps < 0:
            raise InvalidInput("a dirty rate cannot be negative")


@dataclass(frozen=True)
class Link:
    bandwidth_bps: float  # bytes/s the wire carries; latency is ignored


@dataclass(frozen=True)
class SimResult:
    converged: bool  # pre-copy switched over, or post-copy completed
    total_s: float
    downtime_ms: float | None
    passes: int
    bytes_sent: int
    decisions: tuple[tuple[float, Decision], ...]  # (time, decision) whenever one changed
    observations: tuple[Observation, ...]  # one per pass, as the source host records them
    outcome: str = "completed"  # completed | postcopy | aborted | timeout


class _Run:
    def __init__(
        self,
        guest: Guest,
        link: Link,
        req: ConvergenceRequest,
        policy: Policy | None,
        max_time_s: float,
        poll_s: float,
    ) -> None:
        self.g, self.link, self.req, self.policy = guest, link, req, policy
        self.max_time, self.poll_s = max_time_s, poll_s
        self.knobs = initial_knobs(req, link.bandwidth_bps) if policy else QEMU_DEFAULT_KNOBS
        self.zero_scale = guest.nonzero_bytes / guest.ram_bytes  # wire bytes per bulk byte
        self.t = 0.0
        self.rem_bulk = float(guest.ram_bytes)  # pages of the bulk pass still in the bitmap
        self.rem_dirty = 0.0  # re-dirtied pages in the bitmap (all non-zero)
        self.written = 0.0  # bytes written by the guest since the last sync
        self.sent = 0.0
        self.passes = 1
        self.threshold = 0.0
        self.measured_bps = 0.0
        self.tick = 0  # index of the last processed 100 ms measurement
        self.window_bytes = 0.0
        self.steady_after = 1  # ticks up to this index are processed one by one
        self.last_sync = 0.0
        self.rate_t = 0.0
        self.rate_pages = 0.0
        self.rate_sent = 0.0  # bytes sent since the last rate period closed
        self.throttle = 0  # what QEMU applies (the knobs hold the target)
        self.high_periods = 0
        self.dirty_rate = 0.0
        self.next_poll = poll_s
        self.observations: list[Observation] = []
        self.decisions: list[tuple[float, Decision]] = []
        self.result: SimResult | None = None

    # -- the guest and the stream ------------------------------------------------------------

    @property
    def rate(self) -> float:
        return min(self.link.bandwidth_bps, float(self.knobs.max_bandwidth_bps))

    @property
    def dirty_bps(self) -> float:
        return self.g.dirty_rate_bps * (1.0 - self.throttle / 100.0)

    @property
    def remaining(self) -> float:
        return self.rem_bulk + self.rem_dirty

    def _payload(self, bulk: float, dirty: float) -> float:
        return bulk * self.zero_scale + dirty

    def _time_to_level(self, level: float) -> float:
        """Seconds of streaming until remaining falls to ``level`` (inf if it never does)."""
        need = self.remaining - level
        if need <= 0:
            return 0.0
        from_bulk = min(need, self.rem_bulk)
        return (self._payload(from_bulk, need - from_bulk)) / self.rate

    def _advance(self, until: float, sending: bool = True) -> None:
        dt = until - self.t
        if dt <= 0:
            return
        self.written += self.dirty_bps * dt
        if sending:
            budget = self.rate * dt
            bulk_payload = self.rem_bulk * self.zero_scale
            if budget <= bulk_payload:
                self.rem_bulk -= budget / self.zero_scale
                sent = budget
            else:
                self.rem_bulk = 0.0
                from_dirty = min(self.rem_dirty, budget - bulk_payload)
                self.rem_dirty -= from_dirty
                sent = bulk_payload + from_dirty
            self.sent += sent
            self.window_bytes += sent
            # Float dust must not leave a page-less bitmap that never empties.
            if self.rem_bulk < 1.0:
                self.rem_bulk = 0.0
            if self.rem_dirty < 1.0:
                self.rem_dirty = 0.0
        self.t = until

    # -- QEMU --------------------------------------------------------------------------------

    def _measure(self, tick: int) -> None:
        """QEMU's 100 ms bookkeeping: bandwidth since the last measurement, new threshold."""
        span = (tick - self.tick) * CHECK_S
        if span > 0:  # (never above what the wire carries, float dust included)
            self.measured_bps = min(self.window_bytes / span, self.link.bandwidth_bps)
        self.threshold = self.measured_bps * self.knobs.downtime_limit_ms / 1000.0
        self.window_bytes = 0.0
        self.tick = tick

    def _sync(self) -> None:
        """migration_bitmap_sync: merge the pages written since the last sync; maybe switch."""
        ws = float(self.g.working_set_bytes)
        merged = max(self.rem_dirty, min(ws, self.rem_dirty + min(ws, self.written)))
        self.rate_pages += merged - self.rem_dirty
        self.rem_dirty = merged
        self.written = 0.0
        self.passes += 1
        self.last_sync = self.t
        if self.t - self.rate_t >= RATE_PERIOD_S:
            self.throttle, self.high_periods = auto_converge(
                self.throttle,
                self.knobs.throttle_pct,
                self.high_periods,
                self.rate_pages,
                self.sent - self.rate_sent,
            )
            self.dirty_rate = self.rate_pages / (self.t - self.rate_t)
            self.rate_t, self.rate_pages, self.rate_sent = self.t, 0.0, self.sent
        self.observations.append(self._observe())
        pending = self.remaining
        if pending <= 0 or (self.threshold > 0 and pending < self.threshold):
            payload = self._payload(self.rem_bulk, self.rem_dirty)
            downtime = payload / self.link.bandwidth_bps
            self.sent += payload
            self._finish(True, self.t + downtime, downtime * 1000.0, "completed")
            return
        self._consult()

    def _observe(self) -> Observation:
        expected = None
        if self.dirty_rate > 0 and self.measured_bps > 0:
            expected = 1000.0 * self.remaining / self.measured_bps
        return Observation(
            t_s=round(self.t, 6),
            pass_no=self.passes,
            transferred_bytes=int(self.sent),
            remaining_bytes=int(self.remaining),
            total_ram_bytes=self.g.ram_bytes,
            dirty_rate_bps=float(int(self.dirty_rate / PAGE) * PAGE),
            throughput_bps=self.measured_bps,
            expected_downtime_ms=expected,
            throttle_pct=self.throttle,
            status="active",
        )

    # -- the manager -------------------------------------------------------------------------

    def _consult(self) -> None:
        if self.policy is None or self.result is not None:
            return
        history: list[Observation] = list(self.observations[-40:])
        if history[-1].t_s != round(self.t, 6):
            history.append(self._observe())
        decision = self.policy(self.req, self.link.bandwidth_bps, history, self.knobs)
        last = self.decisions[-1][1] if self.decisions else None
        if last is None or (last.knobs, last.action) != (decision.knobs, decision.action):
            self.decisions.append((self.t, decision))
        if decision.action == "abort":
            self._finish(False, self.t, None, "aborted")
            return
        if decision.action == "start_postcopy" and self.knobs.postcopy:
            # The source stops, sends device state and the dirty bitmap; the destination runs
            # the guest and pulls the remaining pages at the link's speed.
            downtime = (self.g.ram_bytes / PAGE / 8) / self.link.bandwidth_bps
            payload = self._payload(self.rem_bulk, self.rem_dirty)
            self.sent += payload
            total = self.t + downtime + payload / self.link.bandwidth_bps
            self._finish(True, total, downtime * 1000.0, "postcopy")
            return
        if decision.knobs != self.knobs:
            changed_rate = (decision.knobs.max_bandwidth_bps, decision.knobs.downtime_limit_ms) != (
                self.knobs.max_bandwidth_bps,
                self.knobs.downtime_limit_ms,
            )
            self.knobs = decision.knobs
            if changed_rate:
                self.steady_after = self.tick + 2

    def _finish(self, converged: bool, total: float, downtime_ms: float | None, how: str) -> None:
        self.result = SimResult(
            converged=converged,
            total_s=total,
            downtime_ms=downtime_ms,
            passes=self.passes,
            bytes_sent=int(self.sent),
            decisions=tuple(self.decisions),
            observations=tuple(self.observations),
            outcome=how,
        )

    # -- the event loop ----------------------------------------------------------------------

    def run(self) -> SimResult:
        self.observations.append(self._observe())  # pass 1, as the host's first sample
        self._consult()
        events = 0
        while self.result is None:
            events += 1
            if self.t >= self.max_time or events > MAX_EVENTS:
                self._finish(False, self.t, None, "timeout")
                break
            # The next 100 ms measurement that matters: every one while the rate settles, else
            # the first after remaining crosses the threshold.
            tick = self.tick + 1
            if tick > self.steady_after and self.threshold > 0:
                cross = self.t + self._time_to_level(self.threshold)
                tick = max(tick, math.ceil(cross / CHECK_S - 1e-9))
            t_tick = tick * CHECK_S
            t_empty = self.t + self._time_to_level(0.0)
            t_poll = self.next_poll if self.policy else math.inf
            t_next = min(t_tick, t_empty, t_poll, self.max_time)
            self._advance(t_next)
            if t_next == t_empty and t_next < t_tick:
                if self.t < self.last_sync + SLICE_S:
                    # QEMU would spin on an empty bitmap; one sync per slice is enough.
                    self._advance(min(self.last_sync + SLICE_S, t_tick), sending=False)
                    self.steady_after = max(self.steady_after, self.tick + 2)
                    if self.t < self.last_sync + SLICE_S:
                        continue
                self._sync()
            elif t_next == t_tick:
                self._measure(tick)
                if self.remaining < self.threshold:
                    self._sync()
            if self.result is None and self.policy and self.t >= self.next_poll:
                self.next_poll = self.t + self.poll_s
                self._consult()
        assert self.result is not None
        return self.result


def simulate(
    guest: Guest,
    link: Link,
    req: ConvergenceRequest,
    policy: Policy | None,
    max_time_s: float,
    poll_s: float = 0.5,
) -> SimResult:
    """Migrate ``guest`` over ``link``. ``policy=None`` keeps QEMU's defaults (128 MiB/s, 300 ms,
    no brake), as ``virsh migrate --live`` would; otherwise the policy starts from
    :func:`~kvmotion.migration.policy.initial_knobs` and is consulted at each pass and every
    ``poll_s``. Stops unconverged at ``max_time_s`` (outcome ``timeout``)."""
    return _Run(guest, link, req, policy, max_time_s, poll_s).run()
