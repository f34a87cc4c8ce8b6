"""What other managers do to make a live migration end, as schedules the benchmark runs side by
side with kvmotion's policy (``strategy`` in a migration request; pure, no I/O).

Each is what its manager does by default, in its own terms, over the same QEMU:

- ``qemu-defaults``: QEMU's own knobs (128 MiB/s, 300 ms downtime, no throttle), nothing changed.
- ``libvirt``: ``virsh migrate --live`` without ``--bandwidth``: libvirt lifts QEMU's bandwidth
  cap (to its maximum, ``QEMU_DOMAIN_MIG_BANDWIDTH_MAX``), leaves QEMU's 300 ms downtime, no
  throttle, and waits for as long as it takes.
- ``auto-converge``: the same plus QEMU's auto-converge with its defaults (throttle 20 % after
  the passes that dirty faster than they send, +10 % each time, up to 99 %): what Proxmox VE, Nova
  (``live_migration_permit_auto_converge``) and KubeVirt (``allowAutoConverge``) turn on.
- ``ovirt``: oVirt's "Minimal downtime" migration policy: auto-converge on; downtime 100 ms, then
  150, 200, 300, 400, 500 ms as the copy stalls (1, 2, 3, 4 and 6 passes in a row without the
  remaining memory shrinking), and abort when it stalls on past that.
- ``nova``: OpenStack Nova's libvirt driver: bandwidth unlimited, the downtime raised in 10 steps
  to 500 ms (``live_migration_downtime`` 500, ``_steps`` 10, ``_delay`` 75 s per GiB of RAM
  between steps), aborted after 800 s per GiB (``live_migration_completion_timeout``).

Every strategy is also aborted at the request's deadline (the benchmark's, the same for all).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvmotion.migration.policy import (
    QEMU_DEFAULT_BANDWIDTH_BPS,
    QEMU_DEFAULT_DOWNTIME_MS,
    Decision,
    Knobs,
    Observation,
)

Strategy = Literal["kvmotion", "qemu-defaults", "libvirt", "auto-converge", "ovirt", "nova"]
STRATEGIES: tuple[Strategy, ...] = (
    "kvmotion", "qemu-defaults", "libvirt", "auto-converge", "ovirt", "nova",
)  # fmt: skip

GIB = 1 << 30
# libvirt's "unlimited" (QEMU_DOMAIN_MIG_BANDWIDTH_MAX is 8 PiB/s): any rate no link reaches.
UNLIMITED_BPS = 1 << 40
OVIRT_DOWNTIMES_MS = (100, 150, 200, 300, 400, 500)
OVIRT_STALL_LIMITS = (0, 1, 2, 3, 4, 6)  # passes stalled in a row before each downtime
NOVA_DOWNTIME_MS, NOVA_STEPS, NOVA_DELAY_S_PER_GIB = 500, 10, 75.0
NOVA_TIMEOUT_S_PER_GIB = 800.0


@dataclass(frozen=True)
class Start:
    """How a strategy starts a migration: its knobs, and whether QEMU's own auto-converge runs."""

    knobs: Knobs
    auto_converge: bool = False


def start(strategy: Strategy) -> Start:
    if strategy == "qemu-defaults":
        return Start(Knobs(QEMU_DEFAULT_DOWNTIME_MS, QEMU_DEFAULT_BANDWIDTH_BPS))
    if strategy in ("libvirt", "auto-converge"):
        return Start(Knobs(QEMU_DEFAULT_DOWNTIME_MS, UNLIMITED_BPS), strategy == "auto-converge")
    if strategy == "ovirt":
        return Start(Knobs(OVIRT_DOWNTIMES_MS[0], UNLIMITED_BPS), auto_converge=True)
    if strategy == "nova":
        return Start(Knobs(nova_downtime_ms(0.0, GIB), UNLIMITED_BPS))
    raise ValueError(f"{strategy!r} is kvmotion's policy, not a schedule")


def nova_downtime_ms(t_s: float, ram_bytes: int) -> int:
    """Nova's downtime at ``t_s`` (``libvirt.migration.downtime_steps``)."""
    delay = int(NOVA_DELAY_S_PER_GIB * ram_bytes / GIB)
    base = NOVA_DOWNTIME_MS / NOVA_STEPS
    offset = (NOVA_DOWNTIME_MS - base) / NOVA_STEPS
    step = NOVA_STEPS if delay <= 0 else min(NOVA_STEPS, int(t_s // delay))
    return int(base + offset * step)


def stalled_passes(history: Sequence[Observation]) -> int:
    """Passes in a row, ending now, after which the remaining memory was no smaller than after
    the pass before (oVirt's "stalling" count)."""
    ends: list[int] = []  # remaining at the end of each pass (its last observation)
    for before, after in itertools.pairwise(history):
        if after.pass_no != before.pass_no:
            ends.append(before.remaining_bytes)
    count = 0
    for prev, cur in zip(reversed(ends[:-1]), reversed(ends[1:]), strict=True):
        if cur < prev:
            break
        count += 1
    return count


def decide(
    strategy: Strategy,
    t_s: float,
    deadline_s: float,
    ram_bytes: int,
    history: Sequence[Observation],
    current: Knobs,
) -> Decision:
    """The strategy's knobs and action at ``t_s``."""
    if t_s >= deadline_s:
        return Decision(current, "abort", f"the deadline of {deadline_s:.0f} s passed")
    if strategy == "nova":
        if t_s >= NOVA_TIMEOUT_S_PER_GIB * ram_bytes / GIB:
            return Decision(current, "abort", "Nova's completion timeout passed")
        downtime = nova_downtime_ms(t_s, ram_bytes)
        knobs = Knobs(downtime, current.max_bandwidth_bps, 0, current.postcopy)
        return Decision(knobs, "continue", f"Nova's downtime step: {downtime} ms")
    if strategy == "ovirt":
        stalls = stalled_passes(history)
        if stalls > OVIRT_STALL_LIMITS[-1]:
            return Decision(current, "abort", f"oVirt: stalled {stalls} passes at 500 ms")
        level = max(i for i, limit in enumerate(OVIRT_STALL_LIMITS) if stalls >= limit)
        downtime = max(OVIRT_DOWNTIMES_MS[level], current.downtime_limit_ms)  # steps up only
        knobs = Knobs(downtime, current.max_bandwidth_bps, 0, current.postcopy)
        return Decision(knobs, "continue", f"oVirt: {stalls} stalled passes, {downtime} ms")
    return Decision(current, "continue", "QEMU's knobs as they were set")
