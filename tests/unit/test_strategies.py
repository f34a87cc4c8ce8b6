"""Other managers' strategies, as kvmotion runs them for comparisons (migration/strategies.py)."""

from __future__ import annotations

import pytest

from kvmotion.migration.convergence import Convergence
from kvmotion.migration.policy import ConvergenceRequest, Knobs, Observation
from kvmotion.migration.strategies import (
    OVIRT_DOWNTIMES_MS,
    STRATEGIES,
    UNLIMITED_BPS,
    decide,
    nova_downtime_ms,
    stalled_passes,
    start,
)

MiB, GiB = 2**20, 2**30


def history(remaining_mib: list[int]) -> list[Observation]:
    """One observation a pass, then one more into the next pass (so each pass has ended)."""
    out = [
        Observation(float(i), i + 1, 0, mib * MiB, GiB, 0.0, 1e8, None, 0)
        for i, mib in enumerate(remaining_mib)
    ]
    last = out[-1]
    return [*out, Observation(last.t_s + 0.5, last.pass_no + 1, 0, 0, GiB, 0.0, 1e8, None, 0)]


def test_libvirt_lifts_qemus_bandwidth_cap_and_keeps_its_downtime() -> None:
    assert (
        start("libvirt").knobs == Knobs(300, UNLIMITED_BPS) and not start("libvirt").auto_converge
    )
    assert start("auto-converge").auto_converge
    assert start("qemu-defaults").knobs == Knobs(300, 128 * MiB)
    with pytest.raises(ValueError):
        start("kvmotion")


def test_novas_downtime_climbs_to_500_ms_in_ten_steps_75_s_per_gib_apart() -> None:
    assert nova_downtime_ms(0.0, GiB) == 50
    assert nova_downtime_ms(74.9, GiB) == 50
    assert nova_downtime_ms(75.0, GiB) == 95
    assert nova_downtime_ms(37.0, GiB // 2) == 95  # half a GiB: steps twice as often
    assert nova_downtime_ms(10_000.0, GiB) == 500


def test_novas_completion_timeout_is_800_s_per_gib() -> None:
    knobs = start("nova").knobs
    assert decide("nova", 799.0, 10_000.0, GiB, history([10]), knobs).action == "continue"
    assert decide("nova", 800.0, 10_000.0, GiB, history([10]), knobs).action == "abort"


def test_a_stall_counts_the_passes_in_a_row_that_did_not_shrink() -> None:
    assert stalled_passes(history([100, 50, 25])) == 0
    assert stalled_passes(history([100, 50, 60, 60])) == 2
    assert stalled_passes(history([100, 50, 60, 40])) == 0


def test_ovirt_raises_the_downtime_as_the_copy_stalls_then_aborts() -> None:
    knobs = start("ovirt").knobs
    assert knobs.downtime_limit_ms == 100 and start("ovirt").auto_converge
    seen = []
    for stalls in range(8):
        d = decide("ovirt", 1.0, 60.0, GiB, history([100] * (stalls + 1)), knobs)
        if d.action == "abort":
            seen.append("abort")
            break
        knobs = d.knobs
        seen.append(knobs.downtime_limit_ms)
    assert seen == [100, 150, 200, 300, 400, 400, 500, "abort"]
    # Progress again does not lower it.
    d = decide("ovirt", 2.0, 60.0, GiB, history([100, 50]), knobs)
    assert d.knobs.downtime_limit_ms == OVIRT_DOWNTIMES_MS[-1]


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "kvmotion"])
def test_every_strategy_is_aborted_at_the_same_deadline(strategy: str) -> None:
    conv = Convergence(ConvergenceRequest(deadline_s=30.0), 1e8, GiB, strategy=strategy)  # type: ignore[arg-type]
    assert not conv.brake
    before = conv.observe(29.0, {"passes": 1, "remaining_bytes": GiB})
    assert before is None or before.action == "continue"
    decision = conv.observe(30.0, {"passes": 2, "remaining_bytes": GiB})
    assert decision is not None and decision.action == "abort"
