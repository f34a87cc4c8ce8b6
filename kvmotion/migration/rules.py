"""Placement rules, as vSphere's DRS rules: which VMs run together, apart, or on which hosts.

- ``affinity``: the VMs run on one host; ``anti-affinity``: each on a different host;
  ``vm-host``: the VMs run on one of ``hosts``.
- ``must`` rules are hard: a placement never breaks one (maintenance is blocked instead, with the
  rule named) and a migration that would is refused. ``should`` rules are soft: a host that keeps
  them is preferred, one that breaks them is still allowed.

Pure: :func:`conflicts` checks a new rule against the others (refused at creation, naming them);
:func:`findings` says what placing one VM on one host would break, given where the others run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvmotion.migration.precheck import Finding

KINDS = ("affinity", "anti-affinity", "vm-host")


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    vms: frozenset[str]
    hosts: frozenset[str] = frozenset()  # vm-host rules: where the VMs may run
    must: bool = True

    def describe(self) -> str:
        strength = "must" if self.must else "should"
        vms = ", ".join(sorted(self.vms))
        if self.kind == "affinity":
            return f"rule {self.name}: {vms} {strength} run on one host"
        if self.kind == "anti-affinity":
            return f"rule {self.name}: {vms} {strength} run on different hosts"
        return f"rule {self.name}: {vms} {strength} run on {', '.join(sorted(self.hosts))}"


def check(rule: Rule) -> None:
    """Raises ValueError for a rule that makes no sense on its own."""
    if rule.kind not in KINDS:
        raise ValueError(f"rule kind {rule.kind!r}: use one of {', '.join(KINDS)}")
    if rule.kind == "vm-host":
        if not rule.hosts:
            raise ValueError("a vm-host rule names the hosts its VMs may run on")
        if not rule.vms:
            raise ValueError("a vm-host rule names at least one VM")
    elif len(rule.vms) < 2:
        raise ValueError(f"an {rule.kind} rule names at least two VMs")
    elif rule.hosts:
        raise ValueError(f"an {rule.kind} rule names VMs only, no hosts")


def conflicts(new: Rule, rules: Iterable[Rule]) -> list[str]:
    """Why ``new`` cannot stand with ``rules``: must rules no placement could keep together
    (VMs both together and apart; a VM, or VMs that must run together, allowed on no common
    host). One line per conflict, empty if none."""
    if not new.must:
        return []
    others = [r for r in rules if r.must and r.name != new.name]
    problems = []
    for old in others:
        shared = new.vms & old.vms
        if {new.kind, old.kind} == {"affinity", "anti-affinity"} and len(shared) >= 2:
            problems.append(
                f"{old.describe()}: {_names(shared)} cannot run both together and apart"
            )
    if new.kind in ("affinity", "vm-host"):
        problems += _pins_disagree(new, others)
    return problems


def _pins_disagree(new: Rule, others: list[Rule]) -> list[str]:
    """VMs kept together (each VM alone, or groups of must affinity rules, ``new`` among them)
    whose must vm-host rules leave no common host."""
    rules = [*others, new]
    groups = [set(r.vms) for r in rules if r.kind == "affinity"]
    groups += [{vm} for r in rules if r.kind == "vm-host" for vm in r.vms]
    merged: list[set[str]] = []
    for group in groups:  # VMs that must end up together, transitively
        touching = [m for m in merged if m & group]
        for m in touching:
            merged.remove(m)
            group |= m
        merged.append(group)
    problems = []
    for group in merged:
        pins = [r for r in rules if r.kind == "vm-host" and r.vms & group]
        allowed: frozenset[str] | None = None
        for pin in pins:
            allowed = pin.hosts if allowed is None else allowed & pin.hosts
        if (
            allowed is not None
            and not allowed
            and len(pins) > 1
            and new in pins + [r for r in rules if r.kind == "affinity" and r.vms <= group]
        ):
            together = f"{_names(group)} must run together" if len(group) > 1 else _names(group)
            problems.append(
                f"{together}, but "
                + "; ".join(p.describe() for p in pins)
                + ": no host is allowed by all of them"
            )
    return problems


def findings(
    vm: str, host: str, rules: Iterable[Rule], where: Mapping[str, str]
) -> tuple[list[Finding], list[Finding]]:
    """What placing ``vm`` on ``host`` breaks: (must rules, should rules). ``where``: the
    host each other VM runs on (or is planned to: a VM absent from it is not placed yet, and
    binds nothing)."""
    hard: list[Finding] = []
    soft: list[Finding] = []
    for rule in rules:
        if vm not in rule.vms:
            continue
        others = {v: where[v] for v in rule.vms - {vm} if v in where}
        broken = None
        if rule.kind == "vm-host" and host not in rule.hosts:
            broken = f"{rule.describe()}, not on {host}"
        elif rule.kind == "affinity" and any(h != host for h in others.values()):
            away = sorted({f"{v} on {h}" for v, h in others.items() if h != host})
            broken = f"{rule.describe()} ({', '.join(away)})"
        elif rule.kind == "anti-affinity" and host in others.values():
            near = sorted(v for v, h in others.items() if h == host)
            broken = f"{rule.describe()} ({', '.join(near)} on {host})"
        if broken is not None:
            (hard if rule.must else soft).append(Finding("rule_violation", broken))
    return hard, soft


def _names(vms: Iterable[str]) -> str:
    return ", ".join(sorted(vms))
