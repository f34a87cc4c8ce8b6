"""The convergence policy: from what the source host measures each pass to migration knobs.

Pure: no I/O, no clock. The center calls :func:`decide` on every poll with the request, the
migration link's bandwidth, the observations so far (one per pre-copy pass, as the source host
samples them; the last one may be a fresh poll of the running pass, which tells the policy the
time) and the knobs in force. It applies the returned :class:`Decision` and records it on the task
when it differs from the previous one.

The brake is SDPS-like but driven by our measurements instead of QEMU's fixed auto-converge steps:
when the guest dirties memory faster than the link carries it (so the remaining bytes stop
shrinking), throttle the vCPUs just deep enough that ``dirty_rate x (1 - throttle)`` falls to
``target_ratio x throughput`` (0.7 for normal priority, 0.5 for high). The rule itself is
:func:`brake_pct`; :mod:`kvmotion.migration.predictor` uses the same function. See
docs/convergence.md for the reasoning behind every constant.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvmotion.errors import InvalidInput

Priority = Literal["high", "normal"]
Action = Literal["continue", "start_postcopy", "abort"]

MIB = 1 << 20
GIB = 1 << 30

# QEMU 7.2 defaults, as `virsh migrate --live` leaves them: the strategy kvmotion must beat.
QEMU_DEFAULT_BANDWIDTH_BPS = 128 * MIB
QEMU_DEFAULT_DOWNTIME_MS = 300

# Default deadline: long enough for the bulk pass plus the worst case of the whole RAM being hot
# (a brake at ratio 0.7 needs 1 / (1 - 0.7) = 3.3 more RAM-sized passes, plus two or three passes
# of ramp), with about a factor 2 to spare. Nova's 800 s/GiB equals this at about 86 Mbit/s.
DEADLINE_FLOOR_S = 60.0
DEADLINE_RAM_PASSES = 8.0

STALL_RATIO = 0.9  # a pass whose excess over the switchover threshold kept 90 % has stalled
FAST_SHRINK_RATIO = 0.5  # the excess halves per pass: the brake may ease
DEEPEN_HYSTERESIS = 1.15  # deepen only if the guest keeps at least 15 % less of its speed
EASE_HYSTERESIS = 1.5  # ease only if the guest would get at least 50 % more of its speed
SATURATION_FACTOR = 2.0  # when a pass stalled, the measured rate is a lower bound: assume twice
PROJECTION_SHARE = 0.5  # brake when pre-copy would need more than half the time left
POSTCOPY_MARGIN_S = 5.0  # post-copy starts when the deadline is this close after its own time
# Where post-copy is allowed, a brake this deep is not applied: the guest would lose more than
# half its speed until the end, so post-copy ends the migration instead (issue 15).
POSTCOPY_BRAKE_PCT = 50
# Post-copy starts only once the first pass has sent all of memory: before it, the destination
# would fault on every page the guest touches (measured: tests/lab/test_postcopy.py, a switch at
# 0.03 s left the guest answering nothing for seconds), which QEMU's documentation warns of too.
POSTCOPY_AFTER_PASS = 2
HISTORY_PASSES = 32  # the policy looks at the last passes only
DOWNTIME_MARGIN_MS = 20.0  # left under the requested downtime for what QEMU sends after RAM
# QEMU closes a dirty-rate period at the first bitmap sync at least a second after the last one,
# so a pass that lasted longer ends with a fresh measurement, even when the value repeats (a count
# saturated at the working set over passes of equal length does). The margin covers the host's
# sampling (it polls every 50 ms) and keeps the test models' 100 ms grid off the boundary.
DIRTY_RATE_PERIOD_S = 1.0
SAMPLE_MARGIN_S = 0.05


@dataclass(frozen=True)
class BrakeProfile:
    """How hard a priority may brake and how much of the link it may use."""

    target_ratio: float  # dirty rate under the brake / throughput
    max_pct: int  # deepest throttle
    bandwidth_factor: float  # max-bandwidth = link x this


PROFILES: dict[str, BrakeProfile] = {
    # Normal: leave the guest 70 % of the link as its dirtying budget; each pass shrinks by 30 %
    # even if the measured rate is 30 % too low (QEMU's rate lags by up to a second).
    "normal": BrakeProfile(target_ratio=0.7, max_pct=95, bandwidth_factor=1.0),
    # High: the migration matters more than the guest's speed for a while (evacuating a host).
    # 1.25 x the link: QEMU's rate limiter never holds the stream below what the wire carries,
    # even if the link was measured low.
    "high": BrakeProfile(target_ratio=0.5, max_pct=99, bandwidth_factor=1.25),
}


@dataclass(frozen=True)
class ConvergenceRequest:
    """What the user asked of a migration's convergence. Raises InvalidInput when impossible."""

    max_downtime_ms: int = 100
    deadline_s: float | None = None  # None: default_deadline_s(RAM, link)
    priority: Priority = "normal"
    allow_postcopy: bool = False

    def __post_init__(self) -> None:
        if self.max_downtime_ms < 1:
            raise InvalidInput(f"max downtime must be at least 1 ms, not {self.max_downtime_ms}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise InvalidInput(f"the deadline must be positive, not {self.deadline_s} s")
        if self.priority not in PROFILES:
            raise InvalidInput(f"priority must be 'high' or 'normal', not {self.priority!r}")


@dataclass(frozen=True)
class Observation:
    """One poll of ``query-migrate`` on the source (bytes, bytes/s, seconds since start)."""

    t_s: float
    pass_no: int  # dirty-sync-count
    transferred_bytes: int
    remaining_bytes: int
    total_ram_bytes: int
    dirty_rate_bps: float  # dirty-pages-rate x page size; 0 until QEMU measured one
    throughput_bps: float  # what was actually sent (QEMU's mbps); 0 if unknown
    expected_downtime_ms: float | None
    # cpu-throttle-percentage as QEMU applies it. With auto-converge QEMU changes it only at a
    # bitmap sync, so a pass runs under the throttle its own sample reports.
    throttle_pct: int
    status: str = "active"


@dataclass(frozen=True)
class Knobs:
    """What the policy controls. ``postcopy``: the postcopy-ram capability is on (set before
    ``migrate``, on both sides); it is what makes ``start_postcopy`` possible."""

    downtime_limit_ms: int
    max_bandwidth_bps: int
    throttle_pct: int = 0  # 0..99; 0 = no brake
    postcopy: bool = False


@dataclass(frozen=True)
class Decision:
    knobs: Knobs
    action: Action
    reason: str


QEMU_DEFAULT_KNOBS = Knobs(QEMU_DEFAULT_DOWNTIME_MS, QEMU_DEFAULT_BANDWIDTH_BPS, 0, False)


def default_deadline_s(ram_bytes: int, link_bps: float) -> float:
    """``60 s + 8 x RAM / link``: the bulk pass and a hot whole RAM under the brake, twice over."""
    return DEADLINE_FLOOR_S + DEADLINE_RAM_PASSES * ram_bytes / max(link_bps, 1.0)


def deadline_for(req: ConvergenceRequest, ram_bytes: int, link_bps: float) -> float:
    return req.deadline_s if req.deadline_s is not None else default_deadline_s(ram_bytes, link_bps)


def brake_pct(dirty_rate_bps: float, throughput_bps: float, priority: Priority = "normal") -> int:
    """The brake rule: the smallest throttle (whole percent, at most the priority's maximum) with
    ``dirty_rate x (1 - throttle) <= target_ratio x throughput``. 0 when no brake is needed.

    Monotone: never shallower for a higher dirty rate or a lower throughput.
    """
    profile = PROFILES[priority]
    budget = profile.target_ratio * max(throughput_bps, 1.0)
    if dirty_rate_bps <= budget:
        return 0
    pct = math.ceil(100.0 * (1.0 - budget / dirty_rate_bps) - 1e-9)
    return max(0, min(profile.max_pct, pct))


def bandwidth_for(req: ConvergenceRequest, link_bps: float) -> int:
    return int(link_bps * PROFILES[req.priority].bandwidth_factor)


def downtime_limit_for(req: ConvergenceRequest) -> int:
    """QEMU's downtime-limit for a request: a little under it. QEMU switches over when the RAM
    left fits the limit at its measured bandwidth, then also sends device state and finishes
    the stream, so its measured downtime overshoots the limit: by 10 to 14 ms in 3 of 12 heavy
    lab runs at a 100 ms limit (bench/results/convergence.md). The margin is a fifth of the
    request, at most ``DOWNTIME_MARGIN_MS``."""
    margin = min(DOWNTIME_MARGIN_MS, req.max_downtime_ms * 0.2)
    return max(1, round(req.max_downtime_ms - margin))


def initial_knobs(req: ConvergenceRequest, link_bps: float) -> Knobs:
    """The link's bandwidth (never QEMU's 128 MiB/s), a downtime limit just under the request,
    no brake."""
    return Knobs(
        downtime_limit_ms=downtime_limit_for(req),
        max_bandwidth_bps=bandwidth_for(req, link_bps),
        throttle_pct=0,
        postcopy=req.allow_postcopy,
    )


@dataclass(frozen=True)
class _Assessment:
    throughput: float  # bytes/s the link carries, smoothed
    dirty_raw: float | None  # the unbraked dirty rate, smoothed; None until measured
    dirty_measured: float | None  # the same without the stall lower bound
    dirty_for_easing: float | None  # a trusted measurement (with the bound), or None: never ease
    excess: float  # remaining now above the switchover threshold (bytes)
    pass_excess: float  # the same when this pass began
    prev_excess: float | None  # the same when the previous pass began
    stalled: bool
    shrinking_fast: bool
    eased_this_pass: bool
    pass_throttle: int  # the throttle in force during the pass that just ended


def _per_pass(history: Sequence[Observation]) -> list[Observation]:
    """The host's samples: the first observation of each pass, the last few passes."""
    out: list[Observation] = []
    for obs in reversed(history):
        if out and obs.pass_no == out[-1].pass_no:
            out[-1] = obs  # an earlier poll of the same pass: the first one wins
            continue
        if len(out) == HISTORY_PASSES:
            break
        out.append(obs)
    out.reverse()
    return out


def _dirty_estimates(passes: Sequence[Observation], threshold: float) -> list[tuple[float, bool]]:
    """Unbraked dirty rates, one per fresh QEMU measurement, each with whether it can be
    trusted. QEMU updates dirty-pages-rate at the first bitmap sync at least a second after its
    last update, so a value is fresh when it changed, or when the pass it ends lasted more than a
    second: then a repeated value is a new measurement of that pass (a count saturated at the
    working set repeats over passes of equal length), and taking it for the old one would
    stretch the next measurement back over passes under a lighter brake and divide it by too
    large a keep. Otherwise an unchanged value is the old measurement. A measurement covers the
    passes since the previous one, each under its own throttle (the one its sample reported when
    it began), so it is divided by their time-weighted keep. QEMU counts pages, not writes: once
    a pass lasts long enough for the guest to rewrite its whole working set, the count saturates
    and the rate is too low. It is trusted only if every pass it covers shrank (so none
    saturated), under one throttle, after the bulk pass."""
    estimates: list[tuple[float, bool]] = []
    last_value = 0.0
    kept = span = 0.0
    trusted = True
    for before, obs in itertools.pairwise(passes):
        keep = 1.0 - before.throttle_pct / 100.0
        dt = max(obs.t_s - before.t_s, 0.0)
        kept, span = kept + keep * dt, span + dt
        shrank = obs.remaining_bytes - threshold < STALL_RATIO * (
            before.remaining_bytes - threshold
        )
        trusted = trusted and shrank and before.pass_no >= 2
        trusted = trusted and obs.throttle_pct == before.throttle_pct
        closed = dt >= DIRTY_RATE_PERIOD_S + SAMPLE_MARGIN_S
        if obs.dirty_rate_bps > 0 and (obs.dirty_rate_bps != last_value or closed):
            average = kept / span if span > 0 else keep
            estimates.append((obs.dirty_rate_bps / max(average, 0.01), trusted))
            last_value = obs.dirty_rate_bps
            kept = span = 0.0
            trusted = True
    return estimates


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _assess(link_bps: float, history: Sequence[Observation], planned: Knobs) -> _Assessment:
    """What the passes say, judged against the planned bandwidth and downtime limit (not the
    ones in force: a decision fed back must not change its own premises)."""
    passes = _per_pass(history)
    now = history[-1]
    rates = [o.throughput_bps for o in [*passes, now] if o.throughput_bps > 0][-3:]
    throughput = _median(rates) if rates else min(link_bps, float(planned.max_bandwidth_bps))
    threshold = throughput * planned.downtime_limit_ms / 1000.0
    excess = now.remaining_bytes - threshold
    prev_excess = passes[-2].remaining_bytes - threshold if len(passes) >= 2 else None
    # The running pass is judged by its sample (its remaining when it began), not by the poll.
    pass_excess = passes[-1].remaining_bytes - threshold
    stalled = (
        prev_excess is not None and pass_excess > 0 and pass_excess >= STALL_RATIO * prev_excess
    )
    shrinking_fast = (
        prev_excess is not None
        and prev_excess > 0
        and pass_excess <= FAST_SHRINK_RATIO * prev_excess
    )
    found = _dirty_estimates(passes, threshold)[-3:]
    estimates = [rate for rate, _ in found]
    measured = max(estimates[-1], sum(estimates) / len(estimates)) if estimates else None
    trusted = next((rate for rate, ok in reversed(found) if ok), None)
    # A pass that did not shrink proves the guest dirtied at least what the link sent, under the
    # throttle of that pass: a lower bound on the unbraked rate that QEMU's count (saturated at
    # the working set) may miss. It is remembered for the whole window: easing below it would
    # only stall again.
    bound = 0.0
    for before, after in itertools.pairwise(passes):
        e0, e1 = before.remaining_bytes - threshold, after.remaining_bytes - threshold
        if e1 > 0 and e1 >= STALL_RATIO * e0:
            bound = max(bound, throughput / max(1.0 - before.throttle_pct / 100.0, 0.01))
    dirty_for_easing = max(trusted, bound) if trusted is not None else None
    if stalled:
        # Stalled right now: the true rate may be far above the bound; assume twice.
        bound *= SATURATION_FACTOR
    dirty = max(measured, bound) if measured is not None else (bound or None)
    return _Assessment(
        throughput=throughput,
        dirty_raw=dirty,
        dirty_measured=measured,
        dirty_for_easing=dirty_for_easing,
        excess=excess,
        pass_excess=pass_excess,
        prev_excess=prev_excess,
        stalled=stalled,
        shrinking_fast=shrinking_fast,
        # Eased already this pass: the plan is lighter than what QEMU applied when it began
        # (QEMU applies a new depth only at its next bitmap sync, so lagging counts the same).
        eased_this_pass=planned.throttle_pct < passes[-1].throttle_pct,
        pass_throttle=passes[-2].throttle_pct if len(passes) >= 2 else 0,
    )


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.1f} MiB"


def _rate(bps: float) -> str:
    return f"{bps / MIB:,.0f} MiB/s" if bps >= 10 * MIB else f"{bps / MIB:.1f} MiB/s"


def _projected_s(a: _Assessment, keep: float) -> float:
    """Seconds pre-copy still needs at the current brake: the excess shrinks by the ratio
    rho = dirty / throughput a pass (the worse of the measured rate and the measured shrink), so
    sending it takes excess / throughput / (1 - rho)."""
    rho = (a.dirty_raw or 0.0) * keep / a.throughput
    if a.prev_excess is not None and a.prev_excess > 0:
        rho = max(rho, a.pass_excess / a.prev_excess)
    return math.inf if rho >= 1.0 else a.excess / a.throughput / (1.0 - rho)


def _sentence(*parts: str) -> str:
    text = " ".join(p for p in parts if p).strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _target(
    req: ConvergenceRequest, a: _Assessment, current: Knobs, time_left: float
) -> tuple[int, str, str]:
    """The throttle to apply, the facts behind it and the verdict. Hysteresis: deepen when the
    target is clearly deeper; ease (halfway, once a pass) only when remaining shrinks fast, on a
    trusted measurement, and the target is clearly lighter; otherwise hold. Deepening goes to the
    brake rule's target, easing never below it: no oscillation."""
    profile = PROFILES[req.priority]
    cur = min(current.throttle_pct, profile.max_pct)
    keep_cur = 1.0 - cur / 100.0
    if a.dirty_raw is None and not a.stalled:
        verdict = f"hold the brake at {cur} %" if cur else "no brake"
        return cur, "no dirty rate is measured yet (the first pass sends all RAM)", verdict
    if a.excess <= 0:
        fits = _mib(a.excess + a.throughput * req.max_downtime_ms / 1000)
        return cur, f"the remaining {fits} fits in the downtime limit", "switchover is imminent"
    dirty = a.dirty_raw or 0.0
    late = _projected_s(a, keep_cur) > PROJECTION_SHARE * time_left
    need = dirty >= a.throughput or a.stalled or late
    target = brake_pct(dirty, a.throughput, req.priority) if need else 0
    keep_target = 1.0 - target / 100.0
    facts = (
        f"the guest dirties about {_rate(dirty)} unbraked and the link carries "
        f"{_rate(a.throughput)}"
    )
    if a.stalled:
        facts += (
            f"; remaining stopped shrinking ({_mib(a.prev_excess or 0)} -> "
            f"{_mib(a.pass_excess)} above the switchover threshold)"
        )
    elif late:
        facts += (
            f"; at this pace pre-copy would need more than half of the {time_left:.0f} s left "
            f"before the deadline"
        )
    if target > cur and (cur == 0 or keep_target * DEEPEN_HYSTERESIS <= keep_cur):
        cap = " (the maximum for this priority)" if target >= profile.max_pct else ""
        return (
            target,
            facts,
            (
                f"brake the vCPUs {target} %{cap} so the guest dirties at most "
                f"{profile.target_ratio * 100:.0f} % of what the link carries"
            ),
        )
    # Ease only on a trusted measurement: a saturated count would ease into another stall.
    floor = (
        brake_pct(a.dirty_for_easing, a.throughput, req.priority)
        if a.dirty_for_easing is not None
        else cur
    )
    floor = max(floor, target)
    keep_floor = 1.0 - floor / 100.0
    if (
        floor < cur
        and a.shrinking_fast
        and not a.eased_this_pass
        and keep_floor >= keep_cur * EASE_HYSTERESIS
    ):
        eased = math.ceil(100.0 * (1.0 - math.sqrt(keep_cur * keep_floor)) - 1e-9)
        eased = max(floor, min(eased, cur - 1))
        return (
            eased,
            (
                f"remaining shrinks fast ({_mib(a.prev_excess or 0)} -> "
                f"{_mib(a.pass_excess)} above the threshold) and the guest dirties about "
                f"{_rate(a.dirty_for_easing or 0)} unbraked"
            ),
            f"ease the brake from {cur} % to {eased} %",
        )
    if cur:
        return cur, facts, f"keep the brake at {cur} %"
    return 0, facts, "pre-copy converges without a brake"


def decide(
    req: ConvergenceRequest,
    link_bps: float,
    history: Sequence[Observation],
    current: Knobs,
) -> Decision:
    """The knobs and action for now. Deterministic and idempotent: the same history and knobs
    give the same decision, and feeding back the decided knobs changes nothing until a new pass
    or the clock says otherwise. Never plans a downtime limit above ``req.max_downtime_ms``;
    aborts exactly when ``history[-1].t_s >= deadline``, never before; never aborts a running
    post-copy (the destination already runs the guest)."""
    profile = PROFILES[req.priority]
    base = Knobs(
        downtime_limit_ms=downtime_limit_for(req),
        max_bandwidth_bps=bandwidth_for(req, link_bps),
        throttle_pct=min(current.throttle_pct, profile.max_pct),
        postcopy=current.postcopy,
    )
    if not history:
        return Decision(base, "continue", "No measurement yet: the link's bandwidth, no brake.")
    now = history[-1]
    if now.status == "postcopy-active":
        return Decision(
            current,
            "continue",
            "Post-copy is running: the guest runs on the destination, so the migration can only "
            "complete, not be aborted.",
        )
    deadline = deadline_for(req, now.total_ram_bytes, link_bps)
    if now.t_s >= deadline:
        postcopy_note = "" if req.allow_postcopy else " (post-copy not allowed)"
        return Decision(
            base,
            "abort",
            f"The deadline of {deadline:.0f} s is reached ({now.t_s:.1f} s) with "
            f"{_mib(now.remaining_bytes)} still to send{postcopy_note}: abort; the VM keeps "
            f"running on the source.",
        )
    a = _assess(link_bps, history, base)
    throttle, facts, verdict = _target(req, a, current, deadline - now.t_s)
    knobs = Knobs(base.downtime_limit_ms, base.max_bandwidth_bps, throttle, base.postcopy)
    postcopy_ready = now.status == "active" and now.pass_no >= POSTCOPY_AFTER_PASS
    if req.allow_postcopy and current.postcopy and postcopy_ready:
        left = deadline - now.t_s
        needed = now.remaining_bytes / max(a.throughput, 1.0) + POSTCOPY_MARGIN_S
        hopeless = (
            a.dirty_measured is not None
            and a.dirty_measured * (1.0 - profile.max_pct / 100.0) >= a.throughput
        )
        at_max = a.stalled and a.pass_throttle >= profile.max_pct
        if a.excess > 0 and throttle >= POSTCOPY_BRAKE_PCT:
            return Decision(
                base,  # the brake applied now: a switch keeps it
                "start_postcopy",
                _sentence(
                    f"{facts}: pre-copy would need a brake of {throttle} %, more than half the "
                    f"guest's speed, so switch to post-copy instead"
                ),
            )
        if a.excess > 0 and (at_max or hopeless):
            return Decision(
                knobs,
                "start_postcopy",
                _sentence(
                    f"{facts}: pre-copy cannot converge even at the maximum brake of "
                    f"{profile.max_pct} %, so switch to post-copy"
                ),
            )
        if left <= needed:
            return Decision(
                knobs,
                "start_postcopy",
                _sentence(
                    f"the deadline is {left:.0f} s away and post-copy needs about {needed:.0f} s "
                    f"for the remaining {_mib(now.remaining_bytes)}: switch to post-copy to end "
                    f"in time"
                ),
            )
    return Decision(
        knobs,
        "continue",
        _sentence(
            f"{facts}: {verdict}; downtime limit {knobs.downtime_limit_ms} ms, bandwidth "
            f"{knobs.max_bandwidth_bps * 8 / 1e6:,.0f} Mbit/s"
        ),
    )
