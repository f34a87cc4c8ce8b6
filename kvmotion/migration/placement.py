"""Where a VM should run: hard filters, then a score; the winner and each loser's reason said.

Used by maintenance mode (each running VM of a host that empties), and meant for balancing and
for `vm create/start` without a host. Pure, like the precheck it builds on: the caller gathers
each host's :class:`HostView` (the precheck's), its :class:`Capacity` (CPUs and memory, and what
the VMs on it already commit) and the VMs.

- **Filters** (any one rules a host out, with its reason and what to do): the VM's own host; a
  disconnected host; a host in (or entering) maintenance; the compute precheck's errors (shared
  storage, migration network, networks, CPU and EVC, machine type, RAM pad, free memory, TLS);
  capacity: the memory and vCPUs the host's VMs commit, plus this VM's, within the host's
  memory and CPUs times the overcommit allowed.
- **Rules** (migration/rules.py): a host where the VM would break a must rule is ruled out, naming
  the rule; one where it would break a should rule is scored down (taken only if no other fits).
- **Score**: the host's fuller share (memory or vCPUs) once the VM is there; the lowest wins, so
  VMs spread where there is most room (oVirt's "evenly distributed", vSphere's initial placement
  by headroom). Ties go to the host with fewer VMs, then by name, so a plan is reproducible.

:func:`plan` places several VMs one after the other, each seeing the ones placed before it, the
largest first (first-fit decreasing: the big ones find room while there is some).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kvmotion.migration.precheck import Finding, HostView, VmView, precheck_compute
from kvmotion.migration.rules import Rule, findings


@dataclass(frozen=True)
class Overcommit:
    """How far the VMs on a host may commit its resources (1.0: exactly what it has)."""

    memory: float = 1.0  # RAM is not overcommitted by default, as vSphere admission does
    vcpus: float = 4.0  # vCPUs per physical CPU


@dataclass(frozen=True)
class Capacity:
    """A host's resources and what its VMs commit (powered on, or arriving)."""

    cpus: int
    memory_mib: int
    committed_vcpus: int = 0
    committed_memory_mib: int = 0
    vms: int = 0

    def plus(self, vcpus: int, memory_mib: int) -> Capacity:
        return replace(
            self,
            committed_vcpus=self.committed_vcpus + vcpus,
            committed_memory_mib=self.committed_memory_mib + memory_mib,
            vms=self.vms + 1,
        )

    def share(self, overcommit: Overcommit) -> float:
        """The fuller of memory and vCPUs, as a share of what may be committed."""
        memory = self.committed_memory_mib / max(self.memory_mib * overcommit.memory, 1)
        vcpus = self.committed_vcpus / max(self.cpus * overcommit.vcpus, 1)
        return max(memory, vcpus)


@dataclass(frozen=True)
class Candidate:
    host: str
    score: float | None  # None: ruled out; +1 per should-rule broken
    reasons: tuple[Finding, ...] = ()  # why it is ruled out
    broken: tuple[Finding, ...] = ()  # the should-rules placing it there breaks

    @property
    def fits(self) -> bool:
        return self.score is not None


@dataclass(frozen=True)
class Placement:
    vm: str
    host: str | None  # None: no host fits
    candidates: tuple[Candidate, ...] = ()  # those that fit, best first, then the others

    def explain(self) -> str:
        """One line: the winner and its score, or why each host was ruled out."""
        if self.host is not None:
            best = self.candidates[0]
            assert best.score is not None
            others = len([c for c in self.candidates if c.fits]) - 1
            broken = "".join(f"; breaks {f.message}" for f in best.broken)
            share = best.score - len(best.broken)
            return f"{self.vm} -> {self.host} ({share:.0%} committed after it{broken}" + (
                f"; {others} other host(s) fit, with less room)" if others else ")"
            )
        if not self.candidates:
            return f"{self.vm}: no other host to move it to"
        why = "; ".join(f"{c.host}: {c.reasons[0].message}" for c in self.candidates if c.reasons)
        return f"{self.vm}: no host fits ({why})"


@dataclass
class Cluster:
    """The hosts a placement chooses from: each one's view and capacity, by name; the rules,
    and where each running VM is (a plan adds the VMs it places)."""

    views: dict[str, HostView]
    capacity: dict[str, Capacity]
    overcommit: Overcommit = field(default_factory=Overcommit)
    rules: tuple[Rule, ...] = ()
    where: dict[str, str] = field(default_factory=dict)


def place(vm: VmView, cluster: Cluster) -> Placement:
    """Where ``vm`` (running on ``vm.host``, or powered off) should go."""
    source = cluster.views.get(vm.host) if vm.host is not None else None
    fit: list[tuple[float, int, str, tuple[Finding, ...]]] = []
    out: list[Candidate] = []
    for name in sorted(cluster.views):
        if name == vm.host:
            continue
        reasons = ruled_out(vm, source, cluster.views[name], cluster)
        hard, soft = findings(vm.name, name, cluster.rules, cluster.where)
        if reasons or hard:
            out.append(Candidate(name, None, (*reasons, *hard)))
            continue
        after = cluster.capacity[name].plus(vm.vcpus, vm.memory_mib)
        # A should-rule broken costs more than any difference in room: kept if at all possible.
        share = after.share(cluster.overcommit) + len(soft)
        fit.append((share, after.vms, name, tuple(soft)))
    fit.sort(key=lambda f: f[:3])
    ranked = [Candidate(name, round(score, 4), (), soft) for score, _, name, soft in fit]
    return Placement(vm.name, ranked[0].host if ranked else None, (*ranked, *out))


def plan(vms: Sequence[VmView], cluster: Cluster) -> list[Placement]:
    """Place each VM, the largest memory first, each seeing those placed before it (the
    cluster's capacities are updated in place)."""
    placements = []
    for vm in sorted(vms, key=lambda v: (-v.memory_mib, -v.vcpus, v.name)):
        placement = place(vm, cluster)
        if placement.host is not None:
            cluster.capacity[placement.host] = cluster.capacity[placement.host].plus(
                vm.vcpus, vm.memory_mib
            )
            cluster.where[vm.name] = placement.host
        placements.append(placement)
    return placements


def ruled_out(
    vm: VmView, source: HostView | None, dest: HostView, cluster: Cluster
) -> tuple[Finding, ...]:
    """Why ``vm`` cannot go to ``dest`` (its rules aside): empty if it can."""
    capacity = cluster.capacity[dest.name]
    if source is not None and vm.power_state == "poweredOn":
        if not dest.connected or dest.maintenance:
            return registrable(vm, dest)
        errors = precheck_compute(vm, source, dest).errors
        if errors:
            return errors
    else:
        found = registrable(vm, dest)
        if found:
            return found
    limit = cluster.overcommit
    after = capacity.plus(vm.vcpus, vm.memory_mib)
    if after.committed_memory_mib > capacity.memory_mib * limit.memory:
        return (
            Finding(
                "insufficient_capacity",
                f"{dest.name} would commit {after.committed_memory_mib} MiB of memory, over its "
                f"{capacity.memory_mib * limit.memory:.0f} MiB (overcommit {limit.memory:g})",
            ),
        )
    if after.committed_vcpus > capacity.cpus * limit.vcpus:
        return (
            Finding(
                "insufficient_capacity",
                f"{dest.name} would commit {after.committed_vcpus} vCPUs, over its "
                f"{capacity.cpus * limit.vcpus:g} ({capacity.cpus} CPUs x {limit.vcpus:g})",
            ),
        )
    return ()


def registrable(vm: VmView, dest: HostView) -> tuple[Finding, ...]:
    """Why ``dest`` cannot hold ``vm`` registered, to run later (a powered-off VM): it is not
    connected, in maintenance, or lacks a datastore of its files or one of its networks."""
    if not dest.connected:
        return (Finding("host_disconnected", f"{dest.name} is not connected"),)
    if dest.maintenance:
        return (
            Finding(
                "host_in_maintenance",
                f"{dest.name} is in maintenance mode: nothing new is placed on it",
            ),
        )
    missing = set(vm.disk_datastores) - dest.datastores
    if missing:
        return (
            Finding(
                "datastore_not_shared",
                f"{dest.name} does not see datastore(s) {', '.join(sorted(missing))}",
            ),
        )
    absent = set(vm.networks) - dest.networks
    if absent:
        return (
            Finding("network_missing", f"{dest.name} has no network {', '.join(sorted(absent))}"),
        )
    return ()
