"""What a user asks of a migration: the VM, where it goes, and the knobs of how."""

from __future__ import annotations

from dataclasses import dataclass

from kvmotion.migration.convergence import Strategy
from kvmotion.migration.policy import ConvergenceRequest, Priority

KINDS = ("compute", "storage", "both")
# Memory's TCP streams when the user names none, measured side by side in
# bench/results/streams.md (TCG, 2 cores): one stream carried about 2 Gbit/s, so it fills a
# 1 Gbit/s link (two streams gained nothing there) but not a 10 Gbit/s one, where two (QEMU's
# multifd with its default channel count) cut the copy by about 40 %; four did no better on two
# cores. Several streams lengthen the switchover a little (the guest stopped about 10 ms longer),
# so they are used only where one stream cannot fill the link.
DEFAULT_STREAMS = 2
ONE_STREAM_BPS = 2e9 / 8


@dataclass(frozen=True)
class MigrationRequest:
    vm: str
    dest: str
    kind: str = "compute"
    downtime_ms: int = 100
    max_bandwidth_bps: int | None = None
    deadline_s: float | None = None  # None: the policy's default for the VM's RAM and link
    priority: Priority = "normal"
    allow_postcopy: bool = False
    strategy: Strategy = "kvmotion"  # or another manager's (migration/strategies.py)
    predict: bool = False  # sample the guest's memory first (about 4.5 s) and predict
    datastore: str | None = None  # storage and both: where the disks go
    # The destination takes the VM's traffic the moment the source stops it (host/switchover.py);
    # False leaves it to QEMU's announce after the resume (for comparisons).
    handover: bool = True
    # TCP streams for memory (QEMU's multifd); None: chosen by memory_streams.
    streams: int | None = None

    def memory_streams(self, link_bps: float) -> int:
        """The streams asked for; else one where post-copy is allowed (QEMU cannot combine the
        two), for other managers' strategies (none of them turns multifd on by default) and where
        one fills the link (``link_bps``, bytes/s); else DEFAULT_STREAMS."""
        if self.streams is not None:
            return self.streams
        if self.allow_postcopy or self.strategy != "kvmotion" or link_bps <= ONE_STREAM_BPS:
            return 1
        return DEFAULT_STREAMS

    def convergence(self) -> ConvergenceRequest:
        return ConvergenceRequest(
            max_downtime_ms=self.downtime_ms,
            deadline_s=self.deadline_s,
            priority=self.priority,
            allow_postcopy=self.allow_postcopy,
        )
