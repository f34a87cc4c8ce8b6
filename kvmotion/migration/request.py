"""What a user asks of a migration: the VM, where it goes, and the knobs of how."""

from __future__ import annotations

from dataclasses import dataclass

from kvmotion.migration.convergence import Strategy
from kvmotion.migration.policy import ConvergenceRequest, Priority

KINDS = ("compute", "storage", "both")


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
    strategy: Strategy = "kvmotion"  # or "qemu-defaults" (for comparisons)
    predict: bool = False  # sample the guest's memory first (about 4.5 s) and predict
    datastore: str | None = None  # storage and both: where the disks go
    # The destination takes the VM's traffic the moment the source stops it (host/switchover.py);
    # False leaves it to QEMU's announce after the resume (for comparisons).
    handover: bool = True

    def convergence(self) -> ConvergenceRequest:
        return ConvergenceRequest(
            max_downtime_ms=self.downtime_ms,
            deadline_s=self.deadline_s,
            priority=self.priority,
            allow_postcopy=self.allow_postcopy,
        )
