"""Before migrating: how long will it take, what downtime, will it need the brake?

Pure. Inputs are what the center can know beforehand: the guest's RAM and non-zero RAM, its dirty
rate sampled with QEMU's ``calc-dirty-rate``, its working set (the distinct memory it writes; the
sampled dirty rate over one second is a fair stand-in when nothing better is known), the link's
bandwidth, and the request.

The model is pre-copy's geometric series, evaluated pass by pass: the first pass sends the
non-zero RAM at ``x = min(link, max-bandwidth)``; each later pass sends what the guest dirtied
during the previous one, ``v[k+1] = min(working_set, d x v[k] / x)`` with ``d`` the dirty rate
under the brake; QEMU switches over once the pending bytes fit ``x x downtime-limit``, and the
stopped guest's last bytes go at the link's speed. QEMU checks that every 100 ms, also in the
middle of a pass (its unsent bytes plus those dirtied since it began). Between passes the real
policy (:func:`kvmotion.migration.policy.decide`) is asked, with the observations QEMU would
report, so the prediction brakes, ramps, starts post-copy or gives up as the migration would.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

from kvmotion.errors import InvalidInput
from kvmotion.migration.history import PairHistory
from kvmotion.migration.policy import (
    SATURATION_FACTOR,
    ConvergenceRequest,
    Observation,
    deadline_for,
    decide,
    initial_knobs,
)

CHECK_S = 0.1  # QEMU measures bandwidth (and so knows a threshold) every 100 ms
SLICE_S = 0.01  # the shortest pass: QEMU's loop around an empty bitmap
MAX_PASSES = 5000
_ABORTS = "the policy aborts then, and the VM keeps running on the source"
PAGE = 4096
SATURATED_SHARE = 0.85  # a 1 s sample this close to the working set is only a lower bound


def auto_converge(
    applied: int, target: int, high_periods: int, dirtied: float, sent: float
) -> tuple[int, int]:
    """QEMU 7.2's migration_trigger_throttle at the close of a dirty-rate period (a bitmap sync
    at least a second after the last), with auto-converge set up as the agent does it
    (throttle-trigger-threshold 1, cpu-throttle-initial = max-cpu-throttle = the target,
    increment 99): after two periods in a row in which the guest dirtied more than 1 % of what
    was sent, the throttle jumps to the target, at least 1 % (QEMU never turns it off during a
    migration). Returns the applied throttle and the count of such periods."""
    if dirtied <= 0.01 * sent:
        return applied, high_periods
    if high_periods + 1 >= 2:
        return max(1, target), 0
    return applied, high_periods + 1


@dataclass(frozen=True)
class Prediction:
    converges: bool
    total_s: float  # until the guest runs on the destination (or until the policy gives up)
    downtime_ms: float | None
    passes: int
    brake_pct: int  # the deepest brake the policy will use; 0 if none needed
    needs_brake: bool
    reason: str


def predict(
    ram_bytes: int,
    nonzero_bytes: int,
    dirty_rate_bps: float,
    working_set_bytes: int,
    link_bps: float,
    req: ConvergenceRequest,
    setup_s: float = 0.0,
) -> Prediction:
    """Predict a migration under kvmotion's policy. ``setup_s``: QEMU's setup before the first
    page moves (its first bitmap sync; learned from earlier migrations), counted in the total.
    Raises InvalidInput for impossible sizes."""
    if not 0 < nonzero_bytes <= ram_bytes or not 0 <= working_set_bytes <= ram_bytes:
        raise InvalidInput("need 0 < non-zero RAM <= RAM and 0 <= working set <= RAM")
    if link_bps <= 0 or dirty_rate_bps < 0:
        raise InvalidInput("the link bandwidth must be positive and the dirty rate not negative")
    working_set = min(working_set_bytes, nonzero_bytes)
    knobs = initial_knobs(req, link_bps)
    deadline = deadline_for(req, ram_bytes, link_bps)
    physical = nonzero_bytes / link_bps

    def done(t: float, payload: float, passes: int, deepest: int) -> Prediction:
        downtime = 1000.0 * payload / link_bps
        total = setup_s + t + payload / link_bps
        brake = f", with a brake of up to {deepest} %" if deepest else " without a brake"
        return Prediction(
            converges=True,
            total_s=total,
            downtime_ms=downtime,
            passes=passes,
            brake_pct=deepest,
            needs_brake=deepest > 0,
            reason=(
                f"Converges in about {total:.1f} s over {passes} passes{brake}; downtime about "
                f"{downtime:.0f} ms (limit {req.max_downtime_ms} ms); the physical limit "
                f"(non-zero RAM over the link) is {physical:.1f} s"
            ),
        )

    t = 0.0
    sent = 0.0
    bitmap = _Bitmap(bulk=float(ram_bytes), scale=nonzero_bytes / ram_bytes, dirty=0.0)
    deepest = 0
    rate = rate_bytes = rate_since = rate_sent = 0.0
    applied = high = 0  # the throttle QEMU applies, and its count of fast-dirtying periods
    history: list[Observation] = [
        Observation(0.0, 1, 0, ram_bytes, ram_bytes, 0.0, 0.0, None, 0, "active")
    ]
    for passes in range(2, MAX_PASSES):
        x = min(link_bps, knobs.max_bandwidth_bps)
        threshold = x * knobs.downtime_limit_ms / 1000.0
        pass_ = _Pass(bitmap, x, dirty_rate_bps * (1 - applied / 100), working_set)
        if bitmap.counted <= 0:  # nothing left: QEMU completes whatever the threshold
            return done(t, 0.0, passes, deepest)
        at = pass_.switch_at(t, threshold)
        if at is not None:
            return done(t + at, pass_.payload(at), passes, deepest)
        if pass_.dirty_bps <= 0 or working_set <= 0:
            return done(t + pass_.end, 0.0, passes, deepest)  # nothing dirtied: the end
        # The pass ends at the first check that finds the bitmap below the threshold (QEMU syncs
        # then and carries the rest over), or when the bitmap is empty: then QEMU syncs at once,
        # but its loop takes a slice, and before its first bandwidth measurement it knows no
        # threshold and keeps sending.
        crossing = _tick_after(t, pass_.time_to(threshold))
        duration = crossing if crossing < pass_.end else max(pass_.end, CHECK_S - t, SLICE_S)
        left = pass_.left(duration)
        sent += bitmap.payload - left.payload
        bitmap = pass_.synced(duration)
        t += duration
        # QEMU's dirty-pages-rate: pages newly set by the syncs, over at least a second.
        rate_bytes += bitmap.dirty - left.dirty
        if t - rate_since >= 1.0:
            applied, high = auto_converge(
                applied, knobs.throttle_pct, high, rate_bytes, sent - rate_sent
            )
            rate, rate_bytes, rate_since, rate_sent = rate_bytes / (t - rate_since), 0.0, t, sent
        if bitmap.counted < threshold:  # the sync at the end of the pass: switch over
            return done(t, bitmap.payload, passes, deepest)
        history.append(
            Observation(
                t_s=t,
                pass_no=passes,
                transferred_bytes=int(sent),
                remaining_bytes=int(bitmap.counted),
                total_ram_bytes=ram_bytes,
                dirty_rate_bps=float(int(rate / PAGE) * PAGE),
                throughput_bps=x,
                expected_downtime_ms=1000.0 * bitmap.counted / x,
                throttle_pct=applied,
            )
        )
        decision = decide(req, link_bps, history[-40:], knobs)
        if decision.action == "abort":
            return _gives_up(t, passes, deepest, deadline, _ABORTS)
        if decision.action == "start_postcopy":
            return _postcopy(t, bitmap.payload, passes, deepest, link_bps, ram_bytes)
        knobs = decision.knobs
        deepest = max(deepest, knobs.throttle_pct)
    return _gives_up(t, MAX_PASSES, deepest, deadline, "the passes never shrink")


@dataclass(frozen=True)
class _Bitmap:
    """QEMU's migration bitmap: pages of the bulk pass not yet sent (``scale`` wire bytes per
    counted byte: zero pages are free) and re-dirtied pages (all non-zero)."""

    bulk: float
    scale: float
    dirty: float

    @property
    def counted(self) -> float:  # what QEMU reports as remaining
        return self.bulk + self.dirty

    @property
    def payload(self) -> float:
        return self.bulk * self.scale + self.dirty


@dataclass(frozen=True)
class _Pass:
    """One pass: the bitmap drains at ``x`` wire bytes/s, bulk pages first, while the guest
    dirties ``dirty_bps`` into its working set."""

    start: _Bitmap
    x: float
    dirty_bps: float
    working_set: float

    @property
    def bulk_end(self) -> float:
        return self.start.bulk * self.start.scale / self.x

    @property
    def end(self) -> float:
        return self.start.payload / self.x

    def left(self, tau: float) -> _Bitmap:
        """The bitmap ``tau`` seconds in, before any sync."""
        b = self.start
        if tau <= self.bulk_end:
            return _Bitmap(max(0.0, b.bulk - tau * self.x / b.scale), b.scale, b.dirty)
        return _Bitmap(0.0, b.scale, max(0.0, b.dirty - (tau - self.bulk_end) * self.x))

    def dirtied(self, tau: float) -> float:
        return min(self.working_set, self.dirty_bps * tau)

    def synced(self, tau: float) -> _Bitmap:
        """The bitmap after a sync ``tau`` seconds in: the written pages join the re-dirtied
        ones; together they never exceed the working set."""
        b = self.left(tau)
        merged = max(b.dirty, min(self.working_set, b.dirty + self.dirtied(tau)))
        return _Bitmap(b.bulk, b.scale, merged)

    def pending(self, tau: float) -> float:
        return self.synced(tau).counted

    def payload(self, tau: float) -> float:
        return self.synced(tau).payload

    def time_to(self, level: float) -> float:
        """Seconds until the bitmap (without a sync) counts ``level`` bytes or fewer."""
        b = self.start
        need = b.counted - level
        if need <= 0:
            return 0.0
        from_bulk = min(need, b.bulk)
        return (from_bulk * b.scale + (need - from_bulk)) / self.x

    def switch_at(self, t: float, threshold: float) -> float | None:
        """Seconds into the pass (which began at ``t``) until a QEMU check, on the 100 ms grid,
        finds the pending bytes (the bitmap plus what the guest wrote since the pass began)
        below the threshold; None if not before the pass ends. Pending is piecewise linear in
        time, with kinks where the bulk pages run out and where the working set is all dirty:
        on each piece, the earliest grid point is checked."""
        if threshold <= 0:
            return None
        kinks = {0.0, self.bulk_end, self.end}
        b = self.start
        if self.dirty_bps > 0:
            kinks.add((self.working_set - b.dirty) / self.dirty_bps)  # saturates during bulk
            if self.dirty_bps != self.x:  # or while the re-dirtied pages drain
                kinks.add(
                    (self.working_set - b.dirty - self.bulk_end * self.x)
                    / (self.dirty_bps - self.x)
                )
        points = sorted(k for k in kinks if 0.0 <= k <= self.end)
        for a, z in itertools.pairwise(points):
            fa, fz = self.pending(a) - threshold, self.pending(z) - threshold
            if fa < 0:
                tau = a
            elif fz < 0:
                tau = a + (z - a) * fa / (fa - fz)
            else:
                continue
            tick = _tick_after(t, tau)
            if tick <= self.end and self.pending(tick) < threshold:
                return tick
        return None


def _tick_after(t: float, tau: float) -> float:
    """Seconds from ``t`` to the first QEMU check at or after ``t + tau`` (never before 100 ms)."""
    if not math.isfinite(tau):
        return math.inf
    return max(CHECK_S, math.ceil((t + tau) / CHECK_S - 1e-9) * CHECK_S) - t


def _postcopy(
    t: float, pending: float, passes: int, deepest: int, link_bps: float, ram_bytes: int
) -> Prediction:
    downtime_s = ram_bytes / PAGE / 8 / link_bps  # device state ignored, the dirty bitmap counted
    total = t + downtime_s + pending / link_bps
    return Prediction(
        converges=True,
        total_s=total,
        downtime_ms=1000.0 * downtime_s,
        passes=passes,
        brake_pct=deepest,
        needs_brake=deepest > 0,
        reason=(
            f"Pre-copy does not converge; post-copy ends it in about {total:.1f} s (the guest "
            f"runs on the destination after {t:.1f} s and pulls the last "
            f"{pending / 2**20:,.0f} MiB)"
        ),
    )


def _gives_up(t: float, passes: int, deepest: int, deadline: float, why: str) -> Prediction:
    brake = f" even with a brake of {deepest} %" if deepest else ""
    return Prediction(
        converges=False,
        total_s=min(t, deadline),
        downtime_ms=None,
        passes=passes,
        brake_pct=deepest,
        needs_brake=deepest > 0,
        reason=f"Does not converge within the deadline of {deadline:.0f} s{brake}: {why}.",
    )


def predict_sampled(
    ram_bytes: int,
    nonzero_bytes: int,
    sampled_dirty_bps: float,
    working_set_bytes: int,
    link_bps: float,
    history: PairHistory,
    req: ConvergenceRequest,
) -> dict[str, Any]:
    """A prediction from a sample of the guest's memory (the agent's memory profile) and what
    the host pair's earlier migrations measured, with its inputs and a reason a user can read.
    Raises InvalidInput for impossible sizes."""
    nonzero = min(ram_bytes, max(1, nonzero_bytes))
    working_set = min(nonzero, working_set_bytes)
    # QEMU counts the pages that changed in its 1 s window: a guest that rewrites its whole
    # working set within it shows only a lower bound, taken at the policy's own factor.
    saturated = sampled_dirty_bps > 0 and sampled_dirty_bps * 1.0 >= SATURATED_SHARE * working_set
    dirty = sampled_dirty_bps * SATURATION_FACTOR if saturated else sampled_dirty_bps
    link = min(link_bps, history.throughput_bps or link_bps)
    setup_s = history.setup_s_per_gib * ram_bytes / 2**30 if history.setup_s_per_gib else 0.0
    prediction = predict(ram_bytes, nonzero, dirty, working_set, link, req, setup_s)
    notes = [prediction.reason.rstrip(".") + "."]
    if saturated:
        notes.append(
            f"The guest rewrote its whole working set ({working_set / 2**20:.0f} MiB) within "
            f"the 1 s sample, so it dirties at least {sampled_dirty_bps / 2**20:.0f} MiB/s; "
            f"predicted with {dirty / 2**20:.0f} MiB/s."
        )
    if history.count:
        notes.append(
            f"From this host pair's last {history.count} migrations: QEMU copies at "
            f"{link * 8 / 1e6:.0f} Mbit/s (the link: {link_bps * 8 / 1e6:.0f}), "
            f"and its setup takes {setup_s:.2f} s for this VM's RAM."
        )
    prediction = dataclasses.replace(prediction, reason=" ".join(notes))
    return asdict(prediction) | {
        "sampled_dirty_bps": sampled_dirty_bps,
        "dirty_rate_saturated": saturated,
        "nonzero_bytes": nonzero,
        "working_set_bytes": working_set,
        "link_bps": link_bps,
        "effective_link_bps": link,
        "setup_s": setup_s,
        "history_migrations": history.count,
    }
