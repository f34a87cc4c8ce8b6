"""Placement: the filters (each with its reason), the score, and properties over random clusters:
never the VM's own host, a host in maintenance or a disconnected one, never past a host's
capacity, always the best-scored host that fits."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.migration.placement import Capacity, Cluster, Overcommit, place, plan
from kvmotion.migration.precheck import HostView, VmView
from tests.unit.test_precheck import host, vm

SRC = "172.16.0.172"
NAMES = [f"172.16.0.{n}" for n in range(172, 180)]


def cluster(*hosts: tuple[HostView, Capacity], overcommit: Overcommit | None = None) -> Cluster:
    return Cluster(
        views={h.name: h for h, _ in hosts},
        capacity={h.name: c for h, c in hosts},
        overcommit=overcommit or Overcommit(),
    )


def roomy(committed_mib: int = 0, **kw: object) -> Capacity:
    return replace(Capacity(cpus=4, memory_mib=8192, committed_memory_mib=committed_mib), **kw)  # type: ignore[arg-type]


def test_the_host_with_most_room_wins_and_the_others_are_ranked() -> None:
    c = cluster(
        (host(SRC), roomy(4096)),
        (host("172.16.0.173"), roomy(4096)),
        (host("172.16.0.174"), roomy(1024)),
    )
    placed = place(vm(memory_mib=1024), c)
    assert placed.host == "172.16.0.174"
    assert [x.host for x in placed.candidates] == ["172.16.0.174", "172.16.0.173"]
    assert "-> 172.16.0.174 (25% committed after it; 1 other host(s) fit" in placed.explain()


def test_each_host_ruled_out_says_why() -> None:
    c = cluster(
        (host(SRC), roomy()),
        (host("172.16.0.173", maintenance=True), roomy()),
        (host("172.16.0.174", connected=False), roomy()),
        (host("172.16.0.175", networks=frozenset()), roomy()),
        (host("172.16.0.176"), roomy(8000)),
        (host("172.16.0.177"), roomy(committed_vcpus=16)),
    )
    placed = place(vm(memory_mib=512), c)
    assert placed.host is None
    why = {x.host: x.reasons[0].code for x in placed.candidates}
    assert why == {
        "172.16.0.173": "host_in_maintenance",
        "172.16.0.174": "host_disconnected",
        "172.16.0.175": "network_missing",
        "172.16.0.176": "insufficient_capacity",
        "172.16.0.177": "insufficient_capacity",
    }
    assert placed.explain().startswith("vm-a: no host fits (172.16.0.173: ")


def test_a_powered_off_vm_needs_only_its_datastores_and_room() -> None:
    c = cluster(
        (host(SRC), roomy()),
        (host("172.16.0.173", datastores=frozenset({"local-173"})), roomy()),
        (host("172.16.0.174", migration_address=None, accel="kvm"), roomy()),
    )
    placed = place(vm(power_state="poweredOff"), c)
    assert placed.host == "172.16.0.174"  # no migration network needed to register it
    assert placed.candidates[1].reasons[0].code == "datastore_not_shared"


def test_a_plan_sees_the_vms_placed_before_it() -> None:
    """Two hosts with 4 GiB free each: the 3000 MiB VM first (most room left after it on
    .173), then 2 GiB VMs where they fit (both on .174), and two left over."""
    c = cluster(
        (host(SRC), roomy()),
        (host("172.16.0.173"), roomy(4096)),
        (host("172.16.0.174"), roomy(4096)),
    )
    vms = [vm(name=f"vm-{i}", memory_mib=2048) for i in range(4)] + [
        vm(name="big", memory_mib=3000)
    ]
    placed = plan(vms, c)
    assert placed[0].vm == "big"
    assert [p.host for p in placed] == ["172.16.0.173", "172.16.0.174", "172.16.0.174", None, None]
    assert placed[-1].candidates[0].reasons[0].code == "insufficient_capacity"
    for name in ("172.16.0.173", "172.16.0.174"):
        assert c.capacity[name].committed_memory_mib <= 8192


@st.composite
def clusters(draw: st.DrawFn) -> tuple[Cluster, list[VmView]]:
    count = draw(st.integers(2, 6))
    hosts = []
    for name in NAMES[:count]:
        view = host(
            name,
            connected=draw(st.booleans()) or name == SRC,
            maintenance=draw(st.booleans()) and name != SRC,
        )
        cap = Capacity(
            cpus=draw(st.integers(1, 16)),
            memory_mib=draw(st.integers(512, 65536)),
            committed_vcpus=draw(st.integers(0, 32)),
            committed_memory_mib=draw(st.integers(0, 65536)),
        )
        hosts.append((view, cap))
    vms = [
        vm(name=f"vm-{i}", memory_mib=draw(st.integers(64, 16384)), vcpus=draw(st.integers(1, 8)))
        for i in range(draw(st.integers(1, 10)))
    ]
    return cluster(*hosts, overcommit=Overcommit(memory=draw(st.sampled_from([1.0, 1.5])))), vms


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_a_plan_never_breaks_a_filter_nor_a_capacity(drawn: tuple[Cluster, list[VmView]]) -> None:
    c, vms = drawn
    before = dict(c.capacity)
    placements = plan(vms, c)
    assert len(placements) == len(vms)
    for p in placements:
        if p.host is None:
            assert all(not x.fits for x in p.candidates)
            continue
        assert p.host != SRC
        assert c.views[p.host].connected and not c.views[p.host].maintenance
        scores = [x.score for x in p.candidates if x.score is not None]
        assert p.candidates[0].score == min(scores)  # the best that fits won
    for name, cap in c.capacity.items():
        added = cap.committed_memory_mib - before[name].committed_memory_mib
        if added:  # what the plan put there fits what the host allows
            assert cap.committed_memory_mib <= cap.memory_mib * c.overcommit.memory
            assert cap.committed_vcpus <= cap.cpus * c.overcommit.vcpus
