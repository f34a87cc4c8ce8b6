"""Placement rules: what makes sense, what contradicts (refused at creation), what a placement
breaks; and placements keeping them, must rules never broken over random clusters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.migration.placement import Capacity, Cluster, place, plan
from kvmotion.migration.rules import Rule, check, conflicts, findings
from tests.unit.test_placement import NAMES, SRC, cluster, roomy
from tests.unit.test_precheck import host, vm

A, B, C = "172.16.0.173", "172.16.0.174", "172.16.0.175"


def rule(name: str, kind: str, *vms: str, hosts: tuple[str, ...] = (), must: bool = True) -> Rule:
    return Rule(name, kind, frozenset(vms), frozenset(hosts), must)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (rule("r", "affinity", "a"), "at least two VMs"),
        (rule("r", "vm-host", "a"), "names the hosts"),
        (rule("r", "anti-affinity", "a", "b", hosts=(A,)), "VMs only"),
        (rule("r", "together", "a", "b"), "rule kind"),
    ],
)
def test_a_rule_that_makes_no_sense_alone_is_refused(bad: Rule, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check(bad)


def test_contradicting_must_rules_are_named() -> None:
    rules = [
        rule("together", "affinity", "a", "b"),
        rule("pin-a", "vm-host", "a", hosts=(A,)),
    ]
    apart = conflicts(rule("apart", "anti-affinity", "a", "b", "c"), rules)
    assert len(apart) == 1 and "rule together" in apart[0]
    pin_b = conflicts(rule("pin-b", "vm-host", "b", hosts=(B,)), rules)
    assert len(pin_b) == 1 and "a, b must run together" in pin_b[0] and "rule pin-a" in pin_b[0]
    assert conflicts(rule("pin-a2", "vm-host", "a", hosts=(B,)), rules)  # a: A and B, no host
    assert conflicts(rule("pin-b-ok", "vm-host", "b", hosts=(A, B)), rules) == []
    assert conflicts(rule("apart", "anti-affinity", "a", "b", must=False), rules) == []


def test_findings_say_which_rule_and_where() -> None:
    rules = [
        rule("apart", "anti-affinity", "a", "b"),
        rule("with-c", "affinity", "a", "c", must=False),
        rule("pin", "vm-host", "a", hosts=(A, B)),
    ]
    hard, soft = findings("a", C, rules, {"b": C, "c": A})
    assert [f.message for f in hard] == [
        "rule apart: a, b must run on different hosts (b on 172.16.0.175)",
        "rule pin: a must run on 172.16.0.173, 172.16.0.174, not on 172.16.0.175",
    ]
    assert [f.message for f in soft] == [
        "rule with-c: a, c should run on one host (c on 172.16.0.173)"
    ]
    assert findings("a", A, rules, {"b": C, "c": A}) == ([], [])
    assert findings("a", A, rules, {}) == ([], [])  # the others not placed: nothing binds


def test_placement_keeps_must_rules_and_prefers_should_ones() -> None:
    c = cluster((host(SRC), roomy()), (host(A), roomy()), (host(B), roomy(4000)))
    c.rules = (rule("apart", "anti-affinity", "vm-a", "vm-b"),)
    c.where = {"vm-b": A}
    placed = place(vm(), c)
    assert placed.host == B  # A has more room, but vm-b is there
    assert placed.candidates[-1].reasons[0].code == "rule_violation"
    c.rules = (rule("near-b", "affinity", "vm-a", "vm-b", must=False),)
    c.where = {"vm-b": B}
    placed = place(vm(), c)
    assert placed.host == B and placed.candidates[0].broken == ()  # with vm-b, as preferred
    c.rules = (rule("pin", "vm-host", "vm-a", hosts=(SRC,)),)
    placed = place(vm(), c)
    assert placed.host is None and "must run on 172.16.0.172" in placed.explain()


def test_a_plan_moves_a_group_together() -> None:
    """Evacuating a host with two VMs that must stay together: the first placed where there is
    most room, the second follows it."""
    c = cluster((host(SRC), roomy()), (host(A), roomy(2000)), (host(B), roomy(1000)))
    c.rules = (rule("pair", "affinity", "vm-a", "vm-b"),)
    placed = plan([vm(name="vm-a", memory_mib=512), vm(name="vm-b", memory_mib=1024)], c)
    assert [p.host for p in placed] == [B, B]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_plan_never_breaks_a_must_rule(data: st.DataObject) -> None:
    names = NAMES[: data.draw(st.integers(2, 6))]
    vms = [f"vm-{i}" for i in range(data.draw(st.integers(1, 8)))]
    c = Cluster(
        views={n: host(n) for n in names},
        capacity={n: Capacity(cpus=8, memory_mib=16384) for n in names},
    )
    drawn = []
    for i in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["affinity", "anti-affinity", "vm-host"]))
        least = 1 if kind == "vm-host" else 2
        if len(vms) < least:
            continue
        members = data.draw(st.lists(st.sampled_from(vms), min_size=least, unique=True))
        hosts = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        new = rule(f"r{i}", kind, *members, hosts=tuple(hosts) if kind == "vm-host" else ())
        if not conflicts(new, drawn):
            drawn.append(new)
    c.rules = tuple(drawn)
    placements = plan([vm(name=v, host=None, power_state="poweredOff") for v in vms], c)
    where = {p.vm: p.host for p in placements if p.host is not None}
    for v, h in where.items():
        hard, _ = findings(v, h, c.rules, where)
        assert hard == [], (v, h, hard, c.rules)
