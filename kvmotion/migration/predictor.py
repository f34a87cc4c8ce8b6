"""Before migrating: how long will it take, what downtime, will it need the brake?

Pure. Inputs are what the center can know beforehand: the guest's RAM and non-zero RAM, its dirty
rate sampled with QEMU's ``calc-dirty-rate``, its working set (the distinct memory it writes; the
sampled dirty rate over one second is a fair stand-in when nothing better is known), the link's
bandwidth, and the request.

The model is pre-copy's geometric series, evaluated pass by pass: the first pass sends the
non-zero RAM at ``x = min(link, max-bandwidth)``; each later pass sends what the guest dirtied
during the previous one, ``v[k+1] = min(working_set, d x v[k] / x)`` with ``d`` the dirty rate
under the brake; QEMU switches over once the pending bytes fit ``x x downtime-limit``, and the
stopped guest's last bytes go at the link's speed. Between passes the real policy
(:func:`kvmotion.migration.policy.decide`) is asked, with the observations QEMU would report, so
the prediction brakes, ramps, starts post-copy or gives up exactly as the migration would.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmotion.errors import InvalidInput
from kvmotion.migration.policy import (
    ConvergenceRequest,
    Knobs,
    Observation,
    deadline_for,
    decide,
    initial_knobs,
)

CHECK_S = 0.1  # QEMU measures bandwidth (and so knows a threshold) after 100 ms
MAX_PASSES = 5000
PAGE = 4096


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
) -> Prediction:
    """Predict a migration under kvmotion's policy. Raises InvalidInput for impossible sizes."""
    if not 0 < nonzero_bytes <= ram_bytes or not 0 <= working_set_bytes <= ram_bytes:
        raise InvalidInput("need 0 < non-zero RAM <= RAM and 0 <= working set <= RAM")
    if link_bps <= 0 or dirty_rate_bps < 0:
        raise InvalidInput("the link bandwidth must be positive and the dirty rate not negative")
    working_set = min(working_set_bytes, nonzero_bytes)
    knobs = initial_knobs(req, link_bps)
    deadline = deadline_for(req, ram_bytes, link_bps)
    physical = nonzero_bytes / link_bps

    def fits(pending: float) -> bool:
        x = min(link_bps, knobs.max_bandwidth_bps)
        return pending < x * knobs.downtime_limit_ms / 1000.0

    def done(total: float, pending: float, passes: int, deepest: int, how: str) -> Prediction:
        downtime = 1000.0 * pending / link_bps
        brake = f", with a brake of up to {deepest} %" if deepest else " without a brake"
        return Prediction(
            converges=True,
            total_s=total + pending / link_bps,
            downtime_ms=downtime,
            passes=passes,
            brake_pct=deepest,
            needs_brake=deepest > 0,
            reason=(
                f"{how} in about {total + pending / link_bps:.1f} s over {passes} passes{brake}; "
                f"downtime about {downtime:.0f} ms (limit {req.max_downtime_ms} ms); the "
                f"physical limit (non-zero RAM over the link) is {physical:.1f} s"
            ),
        )

    # A RAM that fits the threshold at QEMU's first measurement switches over in the bulk pass.
    x = min(link_bps, knobs.max_bandwidth_bps)
    scale = nonzero_bytes / ram_bytes
    if nonzero_bytes / x > CHECK_S and fits(ram_bytes - CHECK_S * x / scale):
        pending = nonzero_bytes - CHECK_S * x + min(working_set, dirty_rate_bps * CHECK_S)
        return done(CHECK_S, pending, 2, 0, "Converges")

    t = 0.0
    sent = 0.0
    send = float(nonzero_bytes)  # bytes this pass puts on the wire
    deepest = 0
    history: list[Observation] = [
        Observation(0.0, 1, 0, ram_bytes, ram_bytes, 0.0, 0.0, None, 0, "active")
    ]
    for passes in range(2, MAX_PASSES):
        x = min(link_bps, knobs.max_bandwidth_bps)
        duration = send / x
        dirty = dirty_rate_bps * (1.0 - knobs.throttle_pct / 100.0)
        dirtied = min(float(working_set), dirty * duration)
        t += duration
        sent += send
        if fits(dirtied):
            return done(t, dirtied, passes, deepest, "Converges")
        history.append(
            Observation(
                t_s=t,
                pass_no=passes,
                transferred_bytes=int(sent),
                remaining_bytes=int(dirtied),
                total_ram_bytes=ram_bytes,
                dirty_rate_bps=dirtied / duration if t >= 1.0 else 0.0,
                throughput_bps=x,
                expected_downtime_ms=1000.0 * dirtied / x,
                throttle_pct=knobs.throttle_pct,
            )
        )
        decision = decide(req, link_bps, history[-40:], knobs)
        if decision.action == "abort":
            return _gives_up(t, passes, deepest, deadline, decision.reason)
        if decision.action == "start_postcopy":
            return _postcopy(t, dirtied, passes, deepest, link_bps, ram_bytes)
        knobs = decision.knobs
        deepest = max(deepest, knobs.throttle_pct)
        send = dirtied
    return _gives_up(t, MAX_PASSES, deepest, deadline, "the passes never shrink")


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
            f"pre-copy does not converge; post-copy ends it in about {total:.1f} s (the guest "
            f"runs on the destination after {t:.1f} s and pulls the last "
            f"{pending / 2**20:,.0f} MiB)"
        ),
    )


def _gives_up(t: float, passes: int, deepest: int, deadline: float, why: str) -> Prediction:
    brake = f" even with a brake of {deepest} %" if deepest else ""
    return Prediction(
        converges=False,
        total_s=t,
        downtime_ms=None,
        passes=passes,
        brake_pct=deepest,
        needs_brake=deepest > 0,
        reason=f"does not converge within the deadline of {deadline:.0f} s{brake}: {why}",
    )
