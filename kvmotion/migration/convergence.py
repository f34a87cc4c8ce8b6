"""The convergence engine as one migration sees it: observations in, knob changes out.

Pure and stateful only in memory: it turns each poll of the source's stats into an
:class:`~kvmotion.migration.policy.Observation`, asks the policy what to do, and says which knob
changes to apply and why (the executor applies them through the source agent and records each
decision on the task). Any other strategy follows that manager's schedule instead
(:mod:`kvmotion.migration.strategies`: QEMU's defaults, libvirt, auto-converge, oVirt, Nova), for
side-by-side comparisons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvmotion.migration import strategies
from kvmotion.migration.policy import (
    ConvergenceRequest,
    Decision,
    Knobs,
    Observation,
    deadline_for,
    decide,
    initial_knobs,
)

Strategy = strategies.Strategy


@dataclass
class Convergence:
    req: ConvergenceRequest
    link_bps: float
    ram_bytes: int
    strategy: Strategy = "kvmotion"
    history: list[Observation] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    knobs: Knobs = field(init=False)
    postcopy_started: bool = field(default=False, init=False)  # start_postcopy was decided

    def __post_init__(self) -> None:
        if self.strategy == "kvmotion":
            self.knobs = initial_knobs(self.req, self.link_bps)
        else:
            self.knobs = strategies.start(self.strategy).knobs

    @property
    def deadline_s(self) -> float:
        return deadline_for(self.req, self.ram_bytes, self.link_bps)

    @property
    def brake(self) -> bool:
        """Whether the source must be started with the CPU brake available."""
        return self.strategy == "kvmotion"

    @property
    def auto_converge(self) -> bool:
        """Whether the source runs QEMU's own auto-converge (another manager's strategy)."""
        return self.strategy != "kvmotion" and strategies.start(self.strategy).auto_converge

    def observe(self, t_s: float, stats: dict[str, Any]) -> Decision | None:
        """Record one poll; return a decision when knobs or the action change."""
        self.history.append(
            Observation(
                t_s=t_s,
                pass_no=int(stats.get("passes") or 0),
                transferred_bytes=int(stats.get("transferred_bytes") or 0),
                remaining_bytes=int(stats.get("remaining_bytes") or 0),
                total_ram_bytes=int(stats.get("total_bytes") or self.ram_bytes),
                dirty_rate_bps=float(stats.get("dirty_pages_rate") or 0)
                * float(stats.get("page_size") or 4096),
                throughput_bps=float(stats.get("mbps") or 0) * 1e6 / 8,
                expected_downtime_ms=stats.get("expected_downtime_ms"),
                throttle_pct=int(stats.get("throttle_pct") or 0),
                status=str(stats.get("status") or "active"),
            )
        )
        if self.strategy == "kvmotion":
            decision = decide(self.req, self.link_bps, self.history, self.knobs)
        else:
            decision = strategies.decide(
                self.strategy, t_s, self.deadline_s, self.ram_bytes, self.history, self.knobs
            )
        if decision.action == "start_postcopy" and self.postcopy_started:
            return None  # asked once: QEMU switches at its next step
        if decision.knobs == self.knobs and decision.action == "continue":
            return None
        self.postcopy_started |= decision.action == "start_postcopy"
        self.knobs = decision.knobs
        self.decisions.append(
            {"t_s": round(t_s, 3), "action": decision.action, "reason": decision.reason}
            | asdict(decision.knobs)
        )
        return decision
