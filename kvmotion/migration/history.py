"""What finished migrations tell: a host pair's measured copy rate and setup time (inputs of a
prediction), and the durations between a task's timeline steps.

Pure: the center reads its finished tasks and passes their request and summary here.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HISTORY_SCAN, HISTORY_USED = 200, 10  # tasks looked at, measurements used (the newest)
MIN_COPY_MS = 200  # shorter copies are mostly QEMU's first 100 ms bandwidth measurement


@dataclass(frozen=True)
class PairHistory:
    """A host pair's recent migrations: what QEMU achieved while copying (bytes/s; on TCG, or a
    busy host, far below the link) and its setup time per GiB of RAM (the first bitmap sync)."""

    throughput_bps: float | None
    setup_s_per_gib: float | None
    count: int


def pair_history(
    finished: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
    pair: set[str],
    link_bps: float,
) -> PairHistory:
    """What this host pair's latest successful migrations measured (either direction; the copy
    rate only over the link as it is now). ``finished`` holds each successful migration task's
    request and summary, newest first."""
    rates: list[float] = []
    setups: list[float] = []
    for request, summary in finished:
        if request.get("type") == "storage":
            continue
        if {request.get("source"), request.get("dest")} != pair:
            continue
        total, setup = summary.get("total_time_ms"), summary.get("setup_time_ms")
        copy_ms = (total or 0) - (setup or 0) - (summary.get("downtime_ms") or 0)
        sent = summary.get("transferred_bytes") or 0
        # Over the link as shaped now, with QEMU's rate set to it (not capped by a strategy).
        same_link = summary.get("link_bps") == link_bps
        uncapped = summary.get("strategy", "kvmotion") == "kvmotion"
        usable = sent and same_link and uncapped and copy_ms >= MIN_COPY_MS
        if usable and len(rates) < HISTORY_USED:
            rates.append(sent * 1000 / copy_ms)
        ram_total = summary.get("ram_total_bytes") or 0
        if setup is not None and ram_total and len(setups) < HISTORY_USED:
            setups.append(setup / 1000 / (ram_total / 2**30))
    return PairHistory(
        statistics.median(rates) if rates else None,
        statistics.median(setups) if setups else None,
        max(len(rates), len(setups)),
    )


def timeline_summary(times: dict[str, float]) -> dict[str, int]:
    """Durations between the seed's steps, in ms (those whose steps are known)."""
    spans = {
        "task_time_ms": ("requested", "source_removed"),
        "stun_to_resume_ms": ("stunned", "resumed"),
        "request_to_first_byte_ms": ("requested", "precopy"),
        "resume_to_done_ms": ("resumed", "source_removed"),
        # The VM network learned the VM at its new place (its destination's bridge saw a frame).
        "resume_to_mac_learned_ms": ("resumed", "mac_learned"),
    }
    return {
        name: round((times[b] - times[a]) * 1000)
        for name, (a, b) in spans.items()
        if a in times and b in times
    }
