"""Balancing (DRS): which running VMs to move so that a cluster's hosts carry even loads.

Pure, like the placement it builds on: the caller gathers each VM's measured load (the agents'
samples, averaged over minutes: ``host/load.py``), the placement's :class:`Cluster` (each host's
view, capacity and the rules), the recent moves, and the cluster's settings.

- **Load.** A host's CPU load is the CPU its VMs used (cores, averaged) over its CPUs; its memory
  load the memory its VMs use (resident) over its memory. Only the VMs count, as vSphere's DRS
  counts VM demand: a host's own work is not the balancer's to move (and in the lab every host
  shares one kernel, so a host-wide figure would be the same on all of them).
- **Imbalance**: the standard deviation of the hosts' loads, CPU and memory taken together
  (the root of the sum of both variances; Watcher's "workload stabilization" with weights 1
  and 1). Hosts that are disconnected or in maintenance are not part of it: nothing may be
  placed there.
- **A move's gain**: how much it lowers the hosts' summed squared deviations from the mean:
  ``2·d·(La - Lb - d)`` for a load ``d`` moved from a host at ``La`` to one at ``Lb`` (per
  resource). Unlike the standard deviation's change, it does not shrink as the cluster grows
  (one move among 1,000 hosts barely moves a standard deviation), and a positive gain always
  lowers the imbalance.
- **A pass** first makes the *mandatory* moves (a VM where a must rule forbids it, at any
  threshold, as vSphere's level 1), then, while the imbalance is above the threshold's
  tolerance, the single move that lowers it most, each move seeing those before it, up to
  ``max_moves``. A load move must gain more than the threshold's minimum, scaled by what the move
  costs (``move_s``: a 60 s migration must gain twice what an instant one must). Candidates:
  the VMs of the most loaded hosts, to the least loaded hosts that pass the placement's filters
  (precheck, capacity, maintenance) and break no rule, must or should.
- **No ping-pong.** Every load move strictly lowers the imbalance, so passes converge and never
  cycle. A VM moved (by anyone) within ``hold_s`` is not moved for load, and a VM the balancer
  moved is never moved back to the host it left unless the load changed since: the VM's own
  CPU by a quarter, or that host's load by a tenth.

Thresholds, as vSphere's migration threshold: 1 only mandatory moves; 2 conservative ... 5
aggressive (acts on small imbalances for small gains). Each move says why, in numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from kvmotion.migration.placement import Capacity, Cluster, place, ruled_out
from kvmotion.migration.precheck import VmView
from kvmotion.migration.rules import findings


@dataclass(frozen=True)
class Level:
    tolerance: float  # an imbalance at or below this is left alone
    min_gain: float  # the gain a move needs (for an instant move): see the module's doc


LEVELS: dict[int, Level | None] = {
    1: None,  # mandatory moves only
    2: Level(0.20, 0.05),
    3: Level(0.10, 0.01),
    4: Level(0.05, 0.004),
    5: Level(0.02, 0.001),
}
COST_SCALE_S = 60.0  # a move this long must gain twice the minimum
SOURCES = 3  # the most loaded hosts whose VMs are tried, per move
TARGETS = 8  # the least loaded hosts each is tried on
UNDO_VM_CHANGE = 0.25  # the VM's CPU must have changed by this share to be moved back ...
UNDO_VM_CHANGE_MIN = 0.05  # ... and by at least this many cores
UNDO_HOST_CHANGE = 0.10  # or the host it left must be this much less loaded


@dataclass(frozen=True)
class VmLoad:
    cpu: float  # CPU cores it used, averaged over the sampling window
    memory_mib: float  # memory it uses (the QEMU process's resident set)
    move_s: float = 0.0  # what moving it would take (estimated)


@dataclass(frozen=True)
class PastMove:
    vm: str
    source: str
    dest: str
    at: float  # when it ended (the caller's clock, as ``now``)
    by_balancer: bool = False
    cpu: float = 0.0  # the VM's CPU when the balancer moved it
    source_cpu: float = 0.0  # the source's CPU load once it had left


@dataclass(frozen=True)
class Settings:
    threshold: int = 3
    hold_s: float = 600.0
    max_moves: int = 8


@dataclass(frozen=True)
class Move:
    vm: str
    source: str
    dest: str
    mandatory: bool
    reason: str
    before: float  # the imbalance before this move (and those above it)
    after: float  # predicted, once it is made
    cpu: float  # the VM's load
    memory_mib: float
    move_s: float
    source_cpu_after: float  # the source's CPU load once the VM has left


@dataclass(frozen=True)
class HostShare:
    cpu: float
    memory: float


@dataclass(frozen=True)
class Pass:
    imbalance: float  # now
    after: float  # predicted, once every move is made
    tolerance: float | None  # the threshold's (None: level 1)
    loads: dict[str, HostShare]  # each balanced host's load now
    moves: tuple[Move, ...] = ()
    held: tuple[str, ...] = ()  # VMs left where they are: moved within the hold time
    why_no_more: str = ""  # why the pass stopped


def balance(
    cluster: Cluster,
    vms: Mapping[str, VmView],
    load: Mapping[str, VmLoad],
    history: Sequence[PastMove] = (),
    settings: Settings | None = None,
    now: float = 0.0,
) -> Pass:
    """One balancing pass over the running VMs ``vms`` (by name; ``vm.host`` is where each
    runs). ``cluster`` is not changed. A VM with no load measured yet is not moved for load."""
    settings = settings or Settings()
    level = LEVELS[settings.threshold]
    state = _State(cluster, vms, load)
    start = state.imbalance()
    loads = {h: HostShare(round(state.cpu[h], 4), round(state.mem[h], 4)) for h in state.hosts}
    recent = {m.vm for m in history if now - m.at < settings.hold_s}
    moves = list(_mandatory(state))
    why = "level 1 makes only mandatory moves" if level is None else ""
    while level is not None and len(moves) < settings.max_moves:
        imbalance = state.imbalance()
        if imbalance <= level.tolerance:
            why = (
                f"imbalance {imbalance:.3f} is within the tolerance {level.tolerance:.3f} "
                f"of threshold {settings.threshold}"
            )
            break
        move, why = _best_load_move(state, level, settings.threshold, recent, history)
        if move is None:
            break
        state.apply(move)
        moves.append(move)
    else:
        if level is not None:
            why = why or f"at most {settings.max_moves} moves a pass"
    return Pass(
        imbalance=round(start, 4),
        after=round(state.imbalance(), 4),
        tolerance=None if level is None else level.tolerance,
        loads=loads,
        moves=tuple(moves),
        held=tuple(sorted(recent & set(state.running))),
        why_no_more=why,
    )


class _State:
    """The loads as the pass's moves change them, with the sums the imbalance needs kept so
    that a candidate move is weighed in constant time."""

    def __init__(
        self, cluster: Cluster, vms: Mapping[str, VmView], load: Mapping[str, VmLoad]
    ) -> None:
        self.cluster = replace(cluster, capacity=dict(cluster.capacity), where=dict(cluster.where))
        self.hosts = sorted(
            h for h, v in cluster.views.items() if v.connected and not v.maintenance
        )
        self.views = {n: v for n, v in vms.items() if v.host in self.hosts}
        self.running = sorted(self.views)
        self.load = {n: load.get(n, VmLoad(0.0, 0.0)) for n in self.running}
        self.measured = {n for n in self.running if n in load}
        self.cpu = dict.fromkeys(self.hosts, 0.0)
        self.mem = dict.fromkeys(self.hosts, 0.0)
        for name, view in self.views.items():
            host = str(view.host)
            self.cpu[host] += self.load[name].cpu / self._cap(host).cpus
            self.mem[host] += self.load[name].memory_mib / max(self._cap(host).memory_mib, 1)
        self.sums = [sum(self.cpu.values()), sum(v * v for v in self.cpu.values()),
                     sum(self.mem.values()), sum(v * v for v in self.mem.values())]  # fmt: skip

    def _cap(self, host: str) -> Capacity:
        return self.cluster.capacity[host]

    def imbalance(self, sums: Sequence[float] | None = None) -> float:
        c1, c2, m1, m2 = sums or self.sums
        n = max(len(self.hosts), 1)
        return math.sqrt(max(c2 / n - (c1 / n) ** 2, 0.0) + max(m2 / n - (m1 / n) ** 2, 0.0))

    def gain(self, imbalance: float, after: float) -> float:
        """What lowering the imbalance from ``imbalance`` to ``after`` takes off the hosts'
        summed squared deviations (the same whatever the cluster's size)."""
        return len(self.hosts) * (imbalance**2 - after**2)

    def shares_after(self, vm: str, dest: str) -> tuple[float, float, float, float]:
        """(source CPU, source memory, dest CPU, dest memory) once ``vm`` is on ``dest``."""
        source, load = str(self.views[vm].host), self.load[vm]
        src_cap, dst_cap = self._cap(source), self._cap(dest)
        return (
            self.cpu[source] - load.cpu / src_cap.cpus,
            self.mem[source] - load.memory_mib / max(src_cap.memory_mib, 1),
            self.cpu[dest] + load.cpu / dst_cap.cpus,
            self.mem[dest] + load.memory_mib / max(dst_cap.memory_mib, 1),
        )

    def imbalance_after(self, vm: str, dest: str) -> float:
        source = str(self.views[vm].host)
        sc, sm, dc, dm = self.shares_after(vm, dest)
        c1, c2, m1, m2 = self.sums
        old = (self.cpu[source], self.mem[source], self.cpu[dest], self.mem[dest])
        return self.imbalance(
            (
                c1 - old[0] - old[2] + sc + dc,
                c2 - old[0] ** 2 - old[2] ** 2 + sc**2 + dc**2,
                m1 - old[1] - old[3] + sm + dm,
                m2 - old[1] ** 2 - old[3] ** 2 + sm**2 + dm**2,
            )
        )

    def allowed(self, vm: str, dest: str) -> bool:
        """Whether the placement's filters and every rule (must and should) let ``vm`` go to
        ``dest``."""
        view = self.views[vm]
        source = self.cluster.views[str(view.host)]
        if ruled_out(view, source, self.cluster.views[dest], self.cluster):
            return False
        where = {k: v for k, v in self.cluster.where.items() if k != vm}
        hard, soft = findings(vm, dest, self.cluster.rules, where)
        _, soft_here = findings(vm, str(view.host), self.cluster.rules, where)
        return not hard and len(soft) <= len(soft_here)

    def apply(self, move: Move) -> None:
        sc, sm, dc, dm = self.shares_after(move.vm, move.dest)
        self.cpu[move.source], self.mem[move.source] = sc, sm
        self.cpu[move.dest], self.mem[move.dest] = dc, dm
        self.sums = [sum(self.cpu.values()), sum(v * v for v in self.cpu.values()),
                     sum(self.mem.values()), sum(v * v for v in self.mem.values())]  # fmt: skip
        view = self.views[move.vm]
        caps = self.cluster.capacity
        caps[move.source] = _less(caps[move.source], view.vcpus, view.memory_mib)
        caps[move.dest] = caps[move.dest].plus(view.vcpus, view.memory_mib)
        self.cluster.where[move.vm] = move.dest
        self.views[move.vm] = replace(view, host=move.dest)


def _less(capacity: Capacity, vcpus: int, memory_mib: int) -> Capacity:
    return replace(
        capacity,
        committed_vcpus=capacity.committed_vcpus - vcpus,
        committed_memory_mib=capacity.committed_memory_mib - memory_mib,
        vms=capacity.vms - 1,
    )


def _mandatory(state: _State) -> list[Move]:
    """A move for each VM where a must rule forbids it, to where the placement puts it."""
    moves: list[Move] = []
    rules = state.cluster.rules
    if not rules:
        return moves
    for name in state.running:
        host = str(state.views[name].host)
        where = {k: v for k, v in state.cluster.where.items() if k != name}
        hard, _ = findings(name, host, rules, where)
        if not hard:
            continue
        placement = place(state.views[name], state.cluster)
        if placement.host is None or placement.host not in state.hosts:
            continue  # nowhere better: the rule stays broken, the pass says nothing new
        before = state.imbalance()
        load = state.load[name]
        move = Move(
            name, host, placement.host, True,
            f"{hard[0].message}: must move ({placement.explain()})",
            round(before, 4), round(state.imbalance_after(name, placement.host), 4),
            load.cpu, load.memory_mib, load.move_s,
            round(state.shares_after(name, placement.host)[0], 4),
        )  # fmt: skip
        state.apply(move)
        moves.append(move)
    return moves


def _undoes(vm: str, dest: str, state: _State, history: Sequence[PastMove]) -> bool:
    """Whether moving ``vm`` to ``dest`` undoes a balancing move whose load has not changed."""
    cpu = state.load[vm].cpu
    for past in reversed(history):
        if past.vm != vm:
            continue
        if not past.by_balancer or past.source != dest:
            return False
        vm_changed = abs(cpu - past.cpu) > max(UNDO_VM_CHANGE * past.cpu, UNDO_VM_CHANGE_MIN)
        host_changed = state.cpu[dest] < past.source_cpu - UNDO_HOST_CHANGE
        return not (vm_changed or host_changed)
    return False


def _best_load_move(
    state: _State,
    level: Level,
    threshold: int,
    recent: set[str],
    history: Sequence[PastMove],
) -> tuple[Move | None, str]:
    imbalance = state.imbalance()
    n = len(state.hosts)
    mean = {h: state.cpu[h] + state.mem[h] for h in state.hosts}
    average = sum(mean.values()) / max(n, 1)
    by_load = sorted(state.hosts, key=lambda h: (-mean[h], h))
    sources = [h for h in by_load if mean[h] > average][:SOURCES]
    targets = [h for h in reversed(by_load) if mean[h] < average][:TARGETS]
    on: dict[str, list[str]] = {}
    for name in state.running:
        on.setdefault(str(state.views[name].host), []).append(name)
    weighed: list[tuple[float, float, str, str, float]] = []
    for source in sources:
        for vm in on.get(source, []):
            if vm in recent or vm not in state.measured:
                continue
            need = level.min_gain * (1 + state.load[vm].move_s / COST_SCALE_S)
            for dest in targets:
                after = state.imbalance_after(vm, dest)
                gain = state.gain(imbalance, after)
                if gain > need:
                    weighed.append((-gain, need, vm, dest, after))
    weighed.sort()
    for minus_gain, need, vm, dest, after in weighed:
        if _undoes(vm, dest, state, history) or not state.allowed(vm, dest):
            continue
        source = str(state.views[vm].host)
        sc, sm, dc, dm = state.shares_after(vm, dest)
        load = state.load[vm]
        reason = (
            f"{source} CPU {state.cpu[source]:.0%} memory {state.mem[source]:.0%}, "
            f"{dest} CPU {state.cpu[dest]:.0%} memory {state.mem[dest]:.0%}; {vm} uses "
            f"{load.cpu:.2f} cores and {load.memory_mib:.0f} MiB; after: {source} CPU {sc:.0%} "
            f"memory {sm:.0%}, {dest} CPU {dc:.0%} memory {dm:.0%}; imbalance "
            f"{imbalance:.3f} -> {after:.3f}, a gain of {-minus_gain:.4f} (over {need:.4f} is "
            f"needed at threshold {threshold} for a move of ~{load.move_s:.0f} s)"
        )
        move = Move(
            vm, source, dest, False, reason, round(imbalance, 4), round(after, 4),
            load.cpu, load.memory_mib, load.move_s, round(sc, 4),
        )  # fmt: skip
        return move, ""
    if not weighed:
        held = len(recent & set(state.running))
        return None, (
            f"no move lowers the imbalance {imbalance:.3f} enough: threshold {threshold} "
            f"needs a gain of {level.min_gain:g} or more"
            + (f" ({held} VM(s) held after a recent move)" if held else "")
        )
    return None, (
        f"the moves that would lower the imbalance {imbalance:.3f} enough are ruled out "
        "(placement filters, rules, or they would undo a recent balancing move)"
    )


def simulate(
    cluster: Cluster,
    vms: Mapping[str, VmView],
    load: Mapping[str, VmLoad],
    settings: Settings | None = None,
    passes: int = 20,
    pass_s: float = 300.0,
) -> list[Pass]:
    """Passes ``pass_s`` apart, each one's moves made before the next (the tests' and the
    benchmark's cluster simulator); stops after a pass that moves nothing."""
    settings = settings or Settings()
    cluster = replace(cluster, capacity=dict(cluster.capacity), where=dict(cluster.where))
    views = dict(vms)
    history: list[PastMove] = []
    done: list[Pass] = []
    for number in range(passes):
        now = number * pass_s
        result = balance(cluster, views, load, history, settings, now)
        done.append(result)
        if not result.moves:
            break
        for move in result.moves:
            view = views[move.vm]
            cluster.capacity[move.source] = _less(
                cluster.capacity[move.source], view.vcpus, view.memory_mib
            )
            cluster.capacity[move.dest] = cluster.capacity[move.dest].plus(
                view.vcpus, view.memory_mib
            )
            cluster.where[move.vm] = move.dest
            views[move.vm] = replace(view, host=move.dest)
            history.append(
                PastMove(
                    move.vm,
                    move.source,
                    move.dest,
                    now,
                    not move.mandatory,
                    move.cpu,
                    move.source_cpu_after,
                )
            )
    return done
