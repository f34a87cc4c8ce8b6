"""The convergence policy, the predictor and the simulator: properties over parameter grids.

Grid: RAM 256 MiB..8 GiB, non-zero RAM 10..100 % of it, working set up to all of it, dirty rate
0..4 x the link, link 100 Mbit..10 Gbit, max downtime 20..1000 ms, both priorities.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvmotion.errors import InvalidInput
from kvmotion.migration.convergence import Convergence
from kvmotion.migration.policy import (
    POSTCOPY_AFTER_PASS,
    POSTCOPY_BRAKE_PCT,
    PROFILES,
    QEMU_DEFAULT_BANDWIDTH_BPS,
    ConvergenceRequest,
    Knobs,
    Observation,
    brake_pct,
    deadline_for,
    decide,
    default_deadline_s,
    initial_knobs,
)
from kvmotion.migration.predictor import predict
from kvmotion.migration.simulator import Guest, Link, SimResult, simulate

MiB = 2**20
GiB = 2**30
# Derandomized: the same examples every run, so CI is reproducible. A guest random exploration
# found (issue 6) is pinned below: test_the_counterexample_random_exploration_found.
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
SIM = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

rams = st.sampled_from([256 * MiB, 512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB])
links = st.sampled_from([100, 250, 1000, 2500, 10_000]).map(lambda mbit: mbit * 1e6 / 8)
downtimes = st.integers(20, 1000)
priorities = st.sampled_from(["normal", "high"])
requests = st.builds(
    ConvergenceRequest,
    max_downtime_ms=downtimes,
    deadline_s=st.none() | st.floats(1.0, 10_000.0),
    priority=priorities,
    allow_postcopy=st.booleans(),
)


@st.composite
def guests(draw: st.DrawFn, link_bps: float, dirty: tuple[float, float]) -> Guest:
    ram = draw(rams)
    nonzero = int(ram * draw(st.floats(0.1, 1.0)))
    working_set = int(nonzero * draw(st.floats(0.0, 1.0)))
    return Guest(ram, nonzero, link_bps * draw(st.floats(*dirty)), working_set)


def run(guest: Guest, link_bps: float, req: ConvergenceRequest, policy: bool) -> SimResult:
    deadline = deadline_for(req, guest.ram_bytes, link_bps)
    return simulate(guest, Link(link_bps), req, decide if policy else None, deadline, poll_s=1.0)


def max_throttle(result: SimResult) -> int:
    return max((d.knobs.throttle_pct for _, d in result.decisions), default=0)


# -- the policy alone ------------------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[Observation]:
    n = draw(st.integers(1, 12))
    ram = draw(rams)
    t = 0.0
    out = []
    for i in range(n):
        t += draw(st.floats(0.0, 30.0))
        out.append(
            Observation(
                t_s=t,
                pass_no=i + 1,
                transferred_bytes=draw(st.integers(0, 4 * ram)),
                remaining_bytes=draw(st.integers(0, ram)),
                total_ram_bytes=ram,
                dirty_rate_bps=draw(st.floats(0.0, 5e9)),
                throughput_bps=draw(st.floats(0.0, 2e9)),
                expected_downtime_ms=draw(st.none() | st.floats(0.0, 1e5)),
                throttle_pct=draw(st.integers(0, 99)),
                status=draw(st.sampled_from(["active", "active", "postcopy-active", "device"])),
            )
        )
    return out


knobs = st.builds(
    Knobs,
    downtime_limit_ms=st.integers(1, 5000),
    max_bandwidth_bps=st.integers(1, 2 * 10**9),
    throttle_pct=st.integers(0, 99),
    postcopy=st.booleans(),
)


@FAST
@given(req=requests, link=links, history=histories(), current=knobs)
def test_decide_never_plans_a_downtime_above_the_request(
    req: ConvergenceRequest, link: float, history: list[Observation], current: Knobs
) -> None:
    d = decide(req, link, history, current)
    if history[-1].status == "postcopy-active":
        assert d.knobs == current and d.action == "continue"  # nothing left to plan
        return
    assert d.knobs.downtime_limit_ms <= req.max_downtime_ms
    assert 0 <= d.knobs.throttle_pct <= PROFILES[req.priority].max_pct
    assert d.knobs.max_bandwidth_bps >= int(link)  # never QEMU's 128 MiB/s on a faster link
    assert d.reason


@FAST
@given(req=requests, link=links, history=histories(), current=knobs)
def test_decisions_are_stable_when_fed_back(
    req: ConvergenceRequest, link: float, history: list[Observation], current: Knobs
) -> None:
    """Polling again with the decided knobs and no new pass changes nothing (hysteresis)."""
    first = decide(req, link, history, current)
    again = decide(req, link, history, first.knobs)
    assert again.knobs == first.knobs
    assert again.action == first.action


@FAST
@given(d1=st.floats(0.0, 1e10), d2=st.floats(0.0, 1e10), x=st.floats(1e6, 2e9), prio=priorities)
def test_the_brake_rule_is_monotone_and_just_deep_enough(
    d1: float, d2: float, x: float, prio: str
) -> None:
    lo, hi = sorted((d1, d2))
    assert brake_pct(lo, x, prio) <= brake_pct(hi, x, prio)  # type: ignore[arg-type]
    p = brake_pct(hi, x, prio)  # type: ignore[arg-type]
    profile = PROFILES[prio]
    if p < profile.max_pct:
        assert hi * (1 - p / 100) <= profile.target_ratio * x * 1.0001
    if p > 0:  # one percent less would not be enough
        assert hi * (1 - (p - 1) / 100) > profile.target_ratio * x * 0.9999


def shaped_history(
    deficit: float, x: float, remaining: list[int], throttle: int, ram: int
) -> list[Observation]:
    """Passes at throughput x whose guest dirties ``deficit x x`` (QEMU's report, under the
    throttle in force), with the given remaining at each pass start."""
    return [
        Observation(
            t_s=1.0 + 2.0 * i,
            pass_no=i + 1,
            transferred_bytes=ram + i * x,
            remaining_bytes=r,
            total_ram_bytes=ram,
            dirty_rate_bps=0.0 if i == 0 else deficit * x * (1 - throttle / 100),
            throughput_bps=x,
            expected_downtime_ms=None,
            throttle_pct=throttle,
        )
        for i, r in enumerate(remaining)
    ]


@FAST
@given(
    d1=st.floats(0.0, 8.0),
    d2=st.floats(0.0, 8.0),
    x=links,
    remaining=st.lists(st.integers(0, 4 * GiB), min_size=2, max_size=6),
    throttle=st.integers(0, 99),
    req=requests,
)
def test_the_brake_deepens_weakly_as_the_deficit_grows(
    d1: float,
    d2: float,
    x: float,
    remaining: list[int],
    throttle: int,
    req: ConvergenceRequest,
) -> None:
    ram = 8 * GiB
    current = Knobs(req.max_downtime_ms, int(x), throttle, False)
    lo, hi = sorted((d1, d2))
    a = decide(req, x, shaped_history(lo, x, remaining, throttle, ram), current)
    b = decide(req, x, shaped_history(hi, x, remaining, throttle, ram), current)
    assert a.knobs.throttle_pct <= b.knobs.throttle_pct


@FAST
@given(
    req=requests,
    link=links,
    ram=rams,
    offset=st.floats(-1.0, 1.0),
    history=histories(),
)
def test_abort_exactly_at_the_deadline_never_before(
    req: ConvergenceRequest, link: float, ram: int, offset: float, history: list[Observation]
) -> None:
    req = ConvergenceRequest(req.max_downtime_ms, req.deadline_s, req.priority, False)
    deadline = deadline_for(req, ram, link)
    last = history[-1]
    t = max(0.0, deadline + offset * min(deadline, 50.0))
    now = Observation(
        t, last.pass_no, last.transferred_bytes, last.remaining_bytes, ram,
        last.dirty_rate_bps, last.throughput_bps, None, last.throttle_pct, "active",
    )  # fmt: skip
    d = decide(req, link, [*history[:-1], now], initial_knobs(req, link))
    assert (d.action == "abort") == (t >= deadline)
    if d.action == "abort":
        assert "deadline" in d.reason


def test_default_deadline_scales_with_ram_and_link() -> None:
    assert default_deadline_s(GiB, 1e9 / 8) == pytest.approx(60 + 8 * GiB / 125e6)
    assert default_deadline_s(8 * GiB, 100e6 / 8) > default_deadline_s(8 * GiB, 10e9 / 8)
    with pytest.raises(InvalidInput):
        ConvergenceRequest(max_downtime_ms=0)


def test_initial_knobs_use_the_link_not_qemus_default() -> None:
    k = initial_knobs(ConvergenceRequest(), 10e9 / 8)
    assert k == Knobs(80, int(10e9 / 8), 0, False)  # 100 ms asked: 20 ms left for device state
    assert k.max_bandwidth_bps > QEMU_DEFAULT_BANDWIDTH_BPS
    assert initial_knobs(ConvergenceRequest(max_downtime_ms=20), 1e9).downtime_limit_ms == 16
    assert initial_knobs(ConvergenceRequest(max_downtime_ms=1000), 1e9).downtime_limit_ms == 980


# -- the policy against the simulator ---------------------------------------------------------


@SIM
@given(data=st.data(), link=links, req=requests)
def test_the_policy_converges_within_the_downtime_asked(
    data: st.DataObject, link: float, req: ConvergenceRequest
) -> None:
    req = ConvergenceRequest(req.max_downtime_ms, None, req.priority, False)
    guest = data.draw(guests(link, (0.0, 4.0)))
    assert guest.dirty_rate_bps * (1 - 0.99) < link  # braking can work
    result = run(guest, link, req, policy=True)
    assert result.converged, result.decisions[-1][1].reason
    assert result.downtime_ms is not None and result.downtime_ms <= req.max_downtime_ms
    assert result.total_s <= deadline_for(req, guest.ram_bytes, link)


@SIM
@given(data=st.data(), link=links, req=requests)
def test_qemu_defaults_fail_heavy_guests_where_the_policy_converges(
    data: st.DataObject, link: float, req: ConvergenceRequest
) -> None:
    req = ConvergenceRequest(req.max_downtime_ms, None, req.priority, False)
    guest = data.draw(guests(link, (2.0, 4.0)))
    # Heavy: dirtying at least twice the link over more than QEMU's default 300 ms can carry.
    assume(guest.working_set_bytes >= max(32 * MiB, 0.5 * min(link, 128 * MiB)))
    defaults = run(guest, link, req, policy=False)
    ours = run(guest, link, req, policy=True)
    assert not defaults.converged
    assert ours.converged
    assert ours.downtime_ms is not None and ours.downtime_ms <= req.max_downtime_ms


@SIM
@given(data=st.data(), link=links, req=requests)
def test_the_brake_does_not_oscillate(
    data: st.DataObject, link: float, req: ConvergenceRequest
) -> None:
    """Once the brake eased it never deepens again."""
    req = ConvergenceRequest(req.max_downtime_ms, None, req.priority, False)
    guest = data.draw(guests(link, (0.5, 4.0)))
    throttles = [d.knobs.throttle_pct for _, d in run(guest, link, req, policy=True).decisions]
    steps = [b - a for a, b in itertools.pairwise(throttles) if b != a]
    first_ease = next((i for i, step in enumerate(steps) if step < 0), len(steps))
    assert all(step < 0 for step in steps[first_ease:]), throttles


# -- the predictor against the simulator ------------------------------------------------------


@SIM
@given(data=st.data(), link=links, req=requests)
def test_the_prediction_matches_the_simulator_without_a_brake(
    data: st.DataObject, link: float, req: ConvergenceRequest
) -> None:
    req = ConvergenceRequest(req.max_downtime_ms, None, req.priority, False)
    g = data.draw(guests(link, (0.0, 0.9)))
    result = run(g, link, req, policy=True)
    assume(result.converged and max_throttle(result) == 0)
    p = predict(g.ram_bytes, g.nonzero_bytes, g.dirty_rate_bps, g.working_set_bytes, link, req)
    assert p.converges and not p.needs_brake
    # 20 %, or one QEMU check period (100 ms) for sub-second migrations.
    assert abs(p.total_s - result.total_s) <= max(0.2 * result.total_s, 0.1)
    assert p.downtime_ms is not None and p.downtime_ms <= req.max_downtime_ms


@SIM
@given(data=st.data(), link=links, req=requests)
def test_the_prediction_with_a_brake(
    data: st.DataObject, link: float, req: ConvergenceRequest
) -> None:
    req = ConvergenceRequest(req.max_downtime_ms, None, req.priority, False)
    g = data.draw(guests(link, (1.0, 4.0)))
    result = run(g, link, req, policy=True)
    p = predict(g.ram_bytes, g.nonzero_bytes, g.dirty_rate_bps, g.working_set_bytes, link, req)
    assert p.converges == result.converged
    # The same bound as without a brake; docs/convergence.md has the distribution.
    assert abs(p.total_s - result.total_s) <= max(0.2 * result.total_s, 0.1)
    assert p.needs_brake == (max_throttle(result) > 0), (p, result.total_s, max_throttle(result), g)


@FAST
@given(ram=rams, fraction=st.floats(0.1, 1.0), link=links, req=requests)
def test_idle_guests_take_about_nonzero_ram_over_the_link(
    ram: int, fraction: float, link: float, req: ConvergenceRequest
) -> None:
    req = ConvergenceRequest(req.max_downtime_ms, None, req.priority, False)
    g = Guest(ram, int(ram * fraction), 0.0, 0)
    physical = g.nonzero_bytes / link
    result = run(g, link, req, policy=True)
    p = predict(g.ram_bytes, g.nonzero_bytes, 0.0, 0, link, req)
    for total in (result.total_s, p.total_s):
        assert physical * 0.999 <= total <= physical * 1.2 + 0.1
    assert result.passes <= 3 and max_throttle(result) == 0 and not p.needs_brake


def test_the_issues_measurement_dd_over_64_mib_on_32_mib_s() -> None:
    """QEMU-NOTES: a 1 GiB guest looping dd over 64 MiB, capped at 32 MiB/s: not converged after
    60 s. The simulator agrees; the policy converges it within 100 ms of downtime."""
    link = 32 * MiB
    guest = Guest(GiB, 256 * MiB, 200 * MiB, 64 * MiB)
    req = ConvergenceRequest()
    stuck = simulate(guest, Link(link), req, None, 60.0)
    assert not stuck.converged and stuck.passes > 20
    ours = simulate(guest, Link(link), req, decide, 60.0)
    assert ours.converged and ours.downtime_ms is not None and ours.downtime_ms <= 100
    assert max_throttle(ours) > 80 and math.isfinite(ours.total_s)


def test_the_counterexample_random_exploration_found() -> None:
    """Issue 6: 256 MiB, 225 MiB working set dirtied at 44.5 MB/s (42.5 MiB/s) over 100 Mbit.
    Passes last about 19 s and QEMU's count saturates at the working set, so dirty-pages-rate
    repeated exactly from one pass to the next; the policy took the repeat for the old value and
    divided the next one by the keep of a 26 % and a 75 % pass together: 21 MiB/s, half the
    truth, so the brake held at 75 % and pre-copy crawled into the deadline."""
    link = 12.5e6
    guest = Guest(268435456, 251658240, 44531250.0, 235929600)
    req = ConvergenceRequest(max_downtime_ms=100, priority="normal")
    deadline = deadline_for(req, guest.ram_bytes, link)
    result = run(guest, link, req, policy=True)
    assert result.converged, result.decisions[-1][1].reason
    assert result.outcome == "completed" and result.total_s <= deadline
    assert result.downtime_ms is not None and result.downtime_ms <= req.max_downtime_ms
    assert all(d.knobs.downtime_limit_ms <= req.max_downtime_ms for _, d in result.decisions)
    assert max_throttle(result) >= 80  # 42.5 MiB/s x (1 - 0.8) is 70 % of the link
    p = predict(guest.ram_bytes, guest.nonzero_bytes, 44531250.0, 235929600, link, req)
    assert p.converges and p.brake_pct == max_throttle(result)
    assert abs(p.total_s - result.total_s) <= 0.2 * result.total_s


# -- post-copy --------------------------------------------------------------------------------


@FAST
@given(req=requests, link=links, history=histories(), current=knobs)
def test_post_copy_never_starts_before_the_first_pass_has_sent_all_memory(
    req: ConvergenceRequest, link: float, history: list[Observation], current: Knobs
) -> None:
    """Before it the destination would fault on every page the guest touches."""
    req = ConvergenceRequest(req.max_downtime_ms, req.deadline_s, req.priority, True)
    d = decide(req, link, history, Knobs(*astuple_knobs(current)[:3], postcopy=True))
    if d.action == "start_postcopy":
        assert history[-1].pass_no >= POSTCOPY_AFTER_PASS and history[-1].status == "active"


def astuple_knobs(k: Knobs) -> tuple[int, int, int, bool]:
    return (k.downtime_limit_ms, k.max_bandwidth_bps, k.throttle_pct, k.postcopy)


@SIM
@given(data=st.data(), link=links, req=requests)
def test_with_post_copy_allowed_the_guest_is_never_braked_past_half_its_speed(
    data: st.DataObject, link: float, req: ConvergenceRequest
) -> None:
    """A heavy guest that would need a deep brake moves by post-copy instead, within the
    downtime asked and before the deadline."""
    req = ConvergenceRequest(req.max_downtime_ms, None, req.priority, True)
    guest = data.draw(guests(link, (2.0, 4.0)))
    assume(guest.working_set_bytes >= max(32 * MiB, 0.5 * min(link, 128 * MiB)))
    result = run(guest, link, req, policy=True)
    assert result.converged, result.decisions[-1][1].reason
    assert max_throttle(result) < POSTCOPY_BRAKE_PCT, [d for _, d in result.decisions]
    assert result.total_s <= deadline_for(req, guest.ram_bytes, link)


def test_post_copy_is_asked_for_once() -> None:
    conv = Convergence(ConvergenceRequest(allow_postcopy=True, deadline_s=10.0), 5e6, 256 * MiB)
    stats = {"passes": 3, "remaining_bytes": 200 * MiB, "total_bytes": 256 * MiB, "mbps": 40.0}
    first = conv.observe(9.0, stats | {"status": "active"})
    assert first is not None and first.action == "start_postcopy", first
    assert conv.observe(9.1, stats | {"status": "active"}) is None  # QEMU has not switched yet
    assert [d["action"] for d in conv.decisions] == ["start_postcopy"]
