"""HA without a lab: the pure judgement (a host's state from its two channels, which VMs may be
restarted, in which order, admission control's arithmetic), a host agent's heartbeats, fence and
isolation on real files with a fake clock, and the center's restarts through fake agents."""

# ruff: noqa: F811 (the fixtures imported below are the tests' parameters)
from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from kvmotion.center.api import create_app
from kvmotion.center.service import Center
from kvmotion.center.tasks import TaskState
from kvmotion.host.config import DatastoreConfig
from kvmotion.host.ha import HA_DIR, Held, HostHa, fence_after
from kvmotion.host.protocol import HaSettingsIn
from kvmotion.migration.ha import (
    CONNECTED,
    FAILED,
    ISOLATED,
    NOT_RESPONDING,
    Sighting,
    Signals,
    judge,
    reserve,
    restart_order,
)
from tests.unit.fake_agent import FakeAgents
from tests.unit.test_executor import (  # noqa: F401 (fixtures used as parameters)
    DST,
    SRC,
    center,
    center_config,
    center_db,
    fake,
    template_db,
)

F = 15.0


def signals(silent: float, **ages: float) -> Signals:
    seen = {ds: (Sighting("172.16.0.9", age, ("u1",)),) for ds, age in ages.items()}
    return Signals("172.16.0.172", silent, frozenset(["shared", "nfs2"]), seen)


# -- the judgement (pure) ----------------------------------------------------------------------
def test_a_host_s_state_needs_both_channels_to_be_failed() -> None:
    assert judge(signals(0, shared=0.5), F).state == CONNECTED
    assert judge(signals(5, shared=6), F).state == NOT_RESPONDING  # not long enough yet
    isolated = judge(signals(20, shared=0.8), F)
    assert isolated.state == ISOLATED and "shared (1 s)" in isolated.reason
    assert not isolated.may_restart(["shared"], "u1")  # its VMs are its own response's
    one_alive = judge(signals(20, shared=30, nfs2=1), F)
    assert one_alive.state == ISOLATED  # alive on one datastore: it runs
    failed = judge(signals(20, shared=16, nfs2=17), F)
    assert failed.state == FAILED and failed.lapsed == {"shared", "nfs2"}
    assert failed.may_restart(["shared"], "u1") and failed.leased == {"u1"}
    unwatched = judge(Signals("h", 60, frozenset(["shared"]), {}), F)
    assert unwatched.state == NOT_RESPONDING and "cannot be told" in unwatched.reason


def test_a_vm_restarts_only_where_every_lease_lapsed_or_it_was_released() -> None:
    partly = judge(signals(20, shared=16), F)  # nfs2 unwatched: its leases there unknown
    assert partly.state == FAILED
    assert partly.may_restart(["shared"], "u1")
    assert not partly.may_restart(["shared", "nfs2"], "u1")
    assert not partly.may_restart([], "u1")  # nothing shared: nothing to restart it from
    released = Signals("h", 20, frozenset(["shared"]),
                       {"shared": (Sighting("o", 0.5, (), ("u7",)),)})  # fmt: skip
    verdict = judge(released, F)
    assert verdict.state == ISOLATED and verdict.may_restart(["shared"], "u7")


@given(
    silent=st.floats(0, 100),
    ages=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(0, 100), max_size=3),
)
def test_never_failed_while_a_heartbeat_lives_or_the_center_hears_it(
    silent: float, ages: dict[str, float]
) -> None:
    seen = {ds: (Sighting("o", age),) for ds, age in ages.items()}
    verdict = judge(Signals("h", silent, frozenset("abc"), seen), F)
    if verdict.state == FAILED:
        assert silent >= F and ages and all(age >= F for age in ages.values())
    for ds in "abc":
        if verdict.may_restart([ds], "x"):
            assert ds in ages and ages[ds] >= F and silent >= F


def test_restart_order_is_by_priority_and_disabled_never() -> None:
    vms = [("b", None), ("a", "low"), ("c", "high"), ("d", "disabled"), ("e", "medium")]
    assert restart_order(vms) == ["c", "b", "e", "a"]


def test_admission_control_keeps_the_largest_hosts_free() -> None:
    r = reserve([16384, 16384, 8192], used_mib=20000, failures=1)
    assert r.usable_mib == 24576 and r.reserved_mib == 16384
    assert r.refusal("small", 4000) is None
    why = r.refusal("big", 5000)
    assert why is not None and "20000 MiB" in why and "24576 MiB is usable" in why
    assert reserve([16384], 0, failures=1).refusal("any", 1) is not None  # none left to fail to
    assert reserve([16384], 99999, failures=0).refusal("any", 1) is None  # off


# -- a host's side: heartbeats, fence, isolation (real files, fake clock) ----------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def host_ha(
    name: str, datastores: list[DatastoreConfig], tmp: Path, clock: Clock, held: list[Held],
    killed: list[str], *, response: str = "leave-on",
) -> HostHa:  # fmt: skip
    async def kill(uuid: str) -> None:
        killed.append(uuid)
        held[:] = [vm for vm in held if vm.uuid != uuid]  # its QEMU is gone

    async def shutdown(uuid: str, timeout: float) -> None:
        killed.append(f"shutdown {uuid}")

    ha = HostHa(name, datastores, tmp / name / "ha.json", lambda: held, kill, shutdown, clock)
    ha.heartbeat(HaSettingsIn(enabled=True, failure_s=F, isolation_response=response), [])
    return ha


async def test_hosts_read_each_other_s_heartbeats_on_their_own_clock(tmp_path: Path) -> None:
    shared = DatastoreConfig(name="shared", path=tmp_path / "ds", shared=True)
    local = DatastoreConfig(name="local", path=tmp_path / "local")
    shared.path.mkdir()
    clock = Clock()
    web = Held("u1", "web", frozenset(["shared"]), True)
    a = host_ha("a", [shared, local], tmp_path, clock, [web], [])
    b = host_ha("b", [shared], tmp_path, clock, [], [])
    await a.tick()
    await b.tick()
    assert (shared.path / HA_DIR / "a.json").exists() and not (local.path / HA_DIR).exists()
    seen = b.report().datastores["shared"].peers["a"]
    assert seen.vms == ["u1"] and seen.age_s == 0
    clock.now += 7  # a stops beating; b keeps reading
    await b.tick()
    assert b.report().datastores["shared"].peers["a"].age_s == 7
    await a.tick()
    await b.tick()
    assert b.report().datastores["shared"].peers["a"].age_s == 0
    assert a.report().datastores["shared"].written_age_s == 0
    assert b.settings_file.exists()  # a restarted agent keeps fencing


async def test_a_host_that_cannot_renew_its_heartbeat_kills_its_vms_there_before_the_lease_lapses(
    tmp_path: Path,
) -> None:
    gone = DatastoreConfig(name="shared", path=tmp_path / "unmounted" / "ds", shared=True)
    ok = DatastoreConfig(name="other", path=tmp_path / "ok", shared=True)
    ok.path.mkdir()
    clock, killed = Clock(), []
    held = [Held("u1", "on-gone", frozenset(["shared"]), True),
            Held("u2", "on-ok", frozenset(["other"]), True)]  # fmt: skip

    async def kill(uuid: str) -> None:
        killed.append(uuid)
        held[:] = [vm for vm in held if vm.uuid != uuid]

    async def shutdown(uuid: str, timeout: float) -> None:
        raise AssertionError("the fence never asks the guest")

    ha = HostHa("a", [gone, ok], tmp_path / "ha.json", lambda: held, kill, shutdown, clock)
    clock.now += 3600  # the agent has run an hour before HA is turned on: its clock starts now
    ha.heartbeat(HaSettingsIn(enabled=True, failure_s=F), [])
    ha.contact = float("inf")  # the center keeps talking: not isolated
    await ha.tick()
    clock.now += fence_after(F) - 0.5
    await ha.tick()
    assert killed == []
    clock.now += 1
    await ha.tick()
    assert killed == ["u1"]  # only the VM on the datastore it lost
    [fence] = ha.report().fenced
    assert fence.vm == "on-gone" and "shared" in fence.reason
    assert ha.report().released == ["u1"]  # the center may restart it elsewhere at once


async def test_a_host_no_one_answers_is_isolated_and_applies_its_response(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = DatastoreConfig(name="shared", path=tmp_path / "ds", shared=True)
    shared.path.mkdir()
    clock, killed = Clock(), []
    held = [Held("u1", "web", frozenset(["shared"]), True)]
    ha = host_ha("a", [shared], tmp_path, clock, held, killed, response="power-off")
    answers = [True]

    async def peers() -> bool:
        return answers[0]

    monkeypatch.setattr(ha, "_any_peer_answers", peers)
    clock.now += F
    await ha.tick()
    assert not ha.isolated  # the center is silent, but the other hosts answer: not isolated
    answers[0] = False
    clock.now += 5
    await ha.tick()
    assert ha.isolated
    assert ha._responding is not None
    await ha._responding
    assert killed == ["u1"] and ha.report().released == ["u1"]
    await ha.tick()
    raw = (shared.path / HA_DIR / "a.json").read_text()
    assert '"released": ["u1"]' in raw and '"isolated": true' in raw
    report = ha.heartbeat(ha.settings, ["u1"])  # the center is back, and restarted it
    assert not report.isolated and report.released == []


# -- the center: states and restarts through fake agents ---------------------------------------
async def enable(center: Center) -> None:
    await center.ha.close()  # the test drives the rounds
    await center.ha.configure("Cluster", enabled=True, failure_s=F)


async def test_a_failed_host_s_vms_restart_on_another_by_priority(
    center: Center, fake: FakeAgents
) -> None:
    await enable(center)
    await center.ha.set_priority("vm-b", "high")
    await center.ha.tick()
    assert center.ha.host_state(SRC)["state"] == CONNECTED  # type: ignore[index]
    assert fake.host(DST).ha_settings["peers"] == [f"http://{SRC}:8700"]  # type: ignore[index]
    fake.host(SRC).dead = True
    await center.ha.tick()
    assert center.ha.host_state(SRC)["state"] == NOT_RESPONDING  # type: ignore[index]
    center.ha._health[SRC].last_answer -= F  # 15 s of silence, and its file still changes:
    fake.host(DST).ha_peers = {SRC: {"age_s": 1.0, "vms": [], "released": [], "isolated": True}}
    await center.ha.tick()
    assert center.ha.host_state(SRC)["state"] == ISOLATED  # type: ignore[index]
    assert fake.vm(DST, "vm-a") is None  # nothing restarts
    fake.host(DST).ha_peers[SRC]["age_s"] = F + 1  # its heartbeat stopped too
    await center.ha.tick()
    assert center.ha.host_state(SRC)["state"] == FAILED  # type: ignore[index]
    for name in ("vm-a", "vm-b"):
        vm = fake.vm(DST, name)
        assert vm is not None and vm.power_state == "poweredOn"
        assert (await center.inventory.vm(name)).host.name == DST  # type: ignore[union-attr]
    assert fake.vm(DST, "vm-off") is None  # it was not running: HA does not start it
    status = await center.ha.status("Cluster")
    order = [t["target"] for t in reversed(status["restarts"])]
    assert order == ["vm-b", "vm-a"]  # high priority first
    assert all(t["state"] == "success" and t["summary"]["dest"] == DST
               for t in status["restarts"])  # fmt: skip
    # Back, it still registers vm-a (powered off now): the refresh removes that registration.
    fake.host(SRC).dead = False
    fake.vm(SRC, "vm-a").power_state = "poweredOff"  # type: ignore[union-attr]
    fake.vm(SRC, "vm-b").power_state = "poweredOff"  # type: ignore[union-attr]
    await center.inventory.refresh_all()
    assert fake.vm(SRC, "vm-a") is None and fake.vm(SRC, "vm-b") is None
    await center.ha.tick()
    assert center.ha.host_state(SRC)["state"] == CONNECTED  # type: ignore[index]


async def test_a_restart_meeting_a_locked_disk_waits_and_leaves_nothing_registered(
    center: Center, fake: FakeAgents
) -> None:
    await enable(center)
    await center.ha.set_priority("vm-b", "disabled")
    await center.ha.tick()
    fake.host(SRC).dead = True
    locked = 'Failed to get "write" lock: is another process using the image?'
    fake.host(DST).fail("power_on", 500, "disk_locked", locked)
    fake.host(DST).ha_peers = {SRC: {"age_s": F + 1, "vms": [], "released": [], "isolated": False}}
    await center.ha.tick()
    center.ha._health[SRC].last_answer -= F
    await center.ha.tick()
    assert fake.vm(DST, "vm-a") is None  # unregistered again
    [task] = (await center.ha.status("Cluster"))["restarts"]
    assert task["state"] == TaskState.RUNNING and "lock" in task["warnings"][0]
    assert (await center.inventory.vm("vm-a")).host.name == SRC  # type: ignore[union-attr]
    del fake.host(DST).errors["power_on"]  # the lock is gone: the next round restarts it
    await center.ha.tick()
    assert fake.vm(DST, "vm-a").power_state == "poweredOn"  # type: ignore[union-attr]
    assert fake.vm(DST, "vm-b") is None  # disabled: never restarted
    task = (await center.ha.status("Cluster"))["restarts"][0]
    assert task["state"] == TaskState.SUCCESS


def test_ha_settings_state_and_admission_through_the_api(center_db: str, fake: FakeAgents) -> None:
    # Two hosts of 16 GiB, one kept free: vm-a and vm-b use 2 x 256 MiB of the 16 GiB usable,
    # and vm-off would need 16 GiB more.
    fake.vm(SRC, "vm-off").config["memory_mib"] = 16 * 1024  # type: ignore[union-attr]
    with TestClient(create_app(Center(center_config(center_db), transport=fake))) as http:
        http.headers["Authorization"] = "Bearer t"
        assert http.get("/v1/clusters/Cluster/ha").json()["settings"]["enabled"] is False
        assert http.get(f"/v1/hosts/{SRC}").json()["ha"] is None  # outside an HA cluster
        bad = http.put("/v1/clusters/Cluster/ha", json={"isolation_response": "reboot"})
        assert bad.status_code == 422
        r = http.put("/v1/clusters/Cluster/ha", json={"enabled": True, "failures_to_tolerate": 1})
        assert r.status_code == 200 and r.json()["enabled"] is True
        deadline = time.monotonic() + 10
        while http.get("/v1/vms/vm-off").json()["config"]["memory_mib"] != 16 * 1024:
            assert time.monotonic() < deadline, "the inventory never saw vm-off's memory"
            time.sleep(0.05)
        refused = http.post("/v1/vms/vm-off/power-on")
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "ha_admission"
        assert "admission control" in refused.json()["error"]["message"]
        assert fake.vm(SRC, "vm-off").power_state == "poweredOff"  # type: ignore[union-attr]
        reserve_now = http.get("/v1/clusters/Cluster/ha").json()["reserve"]
        assert reserve_now["failures"] == 1 and reserve_now["reserved_mib"] == 16384
        assert reserve_now["used_mib"] == 512
        bad = http.put("/v1/vms/vm-a/ha-priority", json={"priority": "sometimes"})
        assert bad.status_code == 422
        assert http.put("/v1/vms/vm-a/ha-priority", json={"priority": "high"}).status_code == 200
        assert http.get("/v1/vms/vm-a").json()["ha_priority"] == "high"
        while (http.get(f"/v1/hosts/{SRC}").json()["ha"] or {}).get("state") != CONNECTED:
            assert time.monotonic() < deadline + 5, "no HA heartbeat answered"
            time.sleep(0.05)


async def test_a_vm_its_connected_host_fenced_restarts_elsewhere_and_is_acknowledged(
    center: Center, fake: FakeAgents
) -> None:
    """Storage lost on one host only (vSphere's VM Component Protection): the host, still
    talking to the center, killed the VM and released it; the center restarts it elsewhere at
    once, then tells the host it may stop listing it."""
    await enable(center)
    await center.ha.tick()
    vm_a = fake.vm(SRC, "vm-a")
    assert vm_a is not None
    vm_a.power_state, vm_a.qemu_status = "poweredOff", None  # fenced
    fake.host(SRC).ha_released = [vm_a.uuid]
    fake.host(SRC).ha_fenced = [{"vm": "vm-a", "uuid": vm_a.uuid, "reason": "lost", "at": 1.0}]
    fake.host(DST).fail("power_on", 507, "insufficient_memory", "no memory for vm-a")
    await center.ha.tick()
    await center.ha.tick()  # its host answers, but released it: the restart still waits
    [task] = (await center.ha.status("Cluster"))["restarts"]
    assert task["state"] == TaskState.RUNNING and "no memory" in task["warnings"][0]
    del fake.host(DST).errors["power_on"]
    await center.ha.tick()
    assert center.ha.host_state(SRC)["state"] == CONNECTED  # type: ignore[index]
    moved = fake.vm(DST, "vm-a")
    assert moved is not None and moved.power_state == "poweredOn"
    assert fake.vm(SRC, "vm-b").power_state == "poweredOn"  # type: ignore[union-attr]
    assert fake.vm(DST, "vm-b") is None  # not released: stays
    await center.ha.tick()  # the next heartbeat says it was restarted
    assert fake.host(SRC).ha_released == []
    [task] = (await center.ha.status("Cluster"))["restarts"]
    assert task["request"]["reason"] == f"host {SRC} lost its datastore and stopped it (fence)"


async def test_a_waiting_restart_ends_when_the_host_answers_again_and_off_is_told(
    center: Center, fake: FakeAgents
) -> None:
    await enable(center)
    await center.ha.tick()
    fake.host(SRC).dead = True
    fake.host(DST).fail("power_on", 500, "disk_locked", 'Failed to get "write" lock')
    fake.host(DST).ha_peers = {SRC: {"age_s": F + 1, "vms": [], "released": [], "isolated": False}}
    await center.ha.tick()
    center.ha._health[SRC].last_answer -= F
    await center.ha.tick()
    tasks = (await center.ha.status("Cluster"))["restarts"]
    assert sorted(t["target"] for t in tasks) == ["vm-a", "vm-b"]
    assert {t["state"] for t in tasks} == {TaskState.RUNNING}
    fake.host(SRC).dead = False  # it was alive all along (its agent hung): the copy runs there
    await center.ha.tick()
    for task in (await center.ha.status("Cluster"))["restarts"]:
        assert task["state"] == TaskState.CANCELLED and "answers again" in task["error"]
    assert fake.vm(DST, "vm-a") is None and fake.vm(SRC, "vm-a").power_state == "poweredOn"  # type: ignore[union-attr]
    await center.ha.configure("Cluster", enabled=False)
    await center.ha.tick()  # the hosts are told HA is off: they stop fencing and isolating
    assert fake.host(SRC).ha_settings["enabled"] is False  # type: ignore[index]
    assert fake.host(DST).ha_settings["enabled"] is False  # type: ignore[index]
    assert center.ha.host_state(SRC) is None
    # Later, the host says HA is on (a center that restarted does not know whom it told).
    fake.host(SRC).ha_settings = fake.host(DST).ha_settings = None
    await center.ha.tick()
    assert fake.host(SRC).ha_settings is None  # nothing to say: no background traffic
    fake.host(SRC).facts["ha_enabled"] = True
    await center.inventory.refresh_all()
    await center.ha.tick()
    assert fake.host(SRC).ha_settings["enabled"] is False  # type: ignore[index]
    assert fake.host(DST).ha_settings is None
