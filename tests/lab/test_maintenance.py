"""Maintenance mode for real, on a three-host lab: 172.16.0.172 runs four VMs on the shared
datastore (the user connected to one, pinging it every 10 ms; another pinned to .172 by a must
rule) and one on its local datastore. `kvmotion host maintenance enter 172.16.0.172`: three move
to .173 and .174 (the placement spreads them), the user notices nothing; the pinned one and the
local one block the host, each with its reason, until the admin deletes the rule (that VM then
moves) and powers the local one off; then the host is in maintenance, empty of running VMs,
refuses new ones, and exits. Then balancing (DRS), on the same lab: two guests burning CPU on
one host get a recommendation that, applied, evens the hosts' measured loads."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion.lab import topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from tests.lab.conftest import (
    assert_user_noticed_nothing,
    center_http,
    user_ping_loop,
    wait_task,
)
from tests.lab.test_vmotion import agent_vm_names

pytestmark = pytest.mark.lab

HOST = "172.16.0.172"
OTHERS = {"172.16.0.173", "172.16.0.174"}
SHARED_VMS = [f"vm-{i}" for i in range(4)]
PINNED = "vm-3"
LOCAL_VM = "vm-local"
COLD_VM = "vm-cold"
WINDOW_S = 15  # the balancing load window (its shortest is 10 s: samples every 5 s)
CLI = [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kvmotion")]


@pytest.fixture(scope="module")
def center(lab3: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab3)


@pytest.fixture(scope="module")
def vms(lab3: topology.LabState, center: httpx.Client) -> Iterator[None]:
    specs = [vm_spec(n, i) for i, n in enumerate(SHARED_VMS)]
    specs.append(vm_spec(LOCAL_VM, len(SHARED_VMS), datastore="local-172"))
    for spec in specs:
        r = center.post("/v1/vms", json={"host": HOST, "spec": spec})
        assert r.status_code == 201, r.text
        assert center.post(f"/v1/vms/{spec['name']}/power-on").status_code == 200
    for i in range(len(specs)):
        wait_for_guest(lab3, guest_ip(i)).close()
    yield


def kvmotion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def hosts_of(center: httpx.Client) -> dict[str, str | None]:
    return {v["name"]: v["host"] for v in center.get("/v1/vms").json()}


def wait_for(what: str, check: Any, timeout: float = 300) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def test_entering_maintenance_empties_the_host_while_the_user_stays_connected(
    lab3: topology.LabState, center: httpx.Client, vms: None
) -> None:
    pinned = kvmotion("rule", "add", "pin", "--vm-host", "--vm", PINNED, "--host", HOST)
    assert pinned.returncode == 0, pinned.stderr
    user = user_ping_loop(lab3, 0)
    try:
        time.sleep(1)
        done = kvmotion("host", "maintenance", "enter", HOST, "--no-wait", "--json")
        assert done.returncode == 0, done.stderr
        task_id = int(json.loads(done.stdout)["id"])

        def blocked() -> dict[str, Any] | None:
            task: dict[str, Any] = center.get(f"/v1/tasks/{task_id}").json()
            assert task["state"] == "running", task
            return task if task["phase"] == "blocked" else None

        task = wait_for("the shared VMs moved and the local one blocking", blocked)
        time.sleep(1)
    finally:
        user.stop()
        summary = user.join(30)
    assert_user_noticed_nothing(summary)
    blockers = {b["vm"]: b["reason"] for b in task["summary"]["blockers"]}
    assert set(blockers) == {LOCAL_VM, PINNED}, blockers
    assert "local-172" in blockers[LOCAL_VM]
    assert f"rule pin: {PINNED} must run on {HOST}" in blockers[PINNED]
    placed = hosts_of(center)
    free = [n for n in SHARED_VMS if n != PINNED]
    assert sorted(task["summary"]["moved"]) == free
    assert {placed[n] for n in free} == OTHERS  # spread over both other hosts
    assert center.get(f"/v1/hosts/{HOST}").json()["maintenance"] == "entering"
    # The admin resolves the blockers: the pinned VM then moves, the host empties.
    assert kvmotion("rule", "delete", "pin").returncode == 0
    assert center.post(f"/v1/vms/{LOCAL_VM}/power-off").status_code == 200
    wait_for("the task to end", lambda: center.get(f"/v1/tasks/{task_id}").json()["state"]
             != "running", timeout=60)  # fmt: skip
    task = center.get(f"/v1/tasks/{task_id}").json()
    assert task["state"] == "success" and task["phase"] == "in maintenance", task
    assert center.get(f"/v1/hosts/{HOST}").json()["maintenance"] == "in"
    running_here = [v["name"] for v in center.get("/v1/vms").json()
                    if v["host"] == HOST and v["power_state"] == "poweredOn"]  # fmt: skip
    assert running_here == []
    listed = {h["name"]: h for h in json.loads(kvmotion("host", "list", "--json").stdout)}
    assert listed[HOST]["maintenance"] == "in"
    assert sorted(task["summary"]["moved"]) == SHARED_VMS
    print(f"\nmaintenance: {len(free)} VMs moved to {sorted({placed[n] for n in free})}, "
          f"{PINNED} once its rule was deleted; the user's longest gap "
          f"{summary.max_gap_ms:.0f} ms over {summary.answered} pings")  # fmt: skip


def test_a_host_in_maintenance_takes_nothing_new_until_it_exits(
    lab3: topology.LabState, center: httpx.Client, vms: None
) -> None:
    refused = kvmotion("vm", "start", LOCAL_VM)
    assert refused.returncode != 0 and "host_in_maintenance" in refused.stderr, refused.stderr
    back = center.post("/v1/vms/vm-0/migrate", json={"type": "compute", "host": HOST})
    assert back.status_code == 409 and back.json()["error"]["code"] == "host_in_maintenance"
    done = kvmotion("host", "maintenance", "exit", HOST)
    assert done.returncode == 0, done.stderr
    assert center.get(f"/v1/hosts/{HOST}").json()["maintenance"] is None
    assert kvmotion("vm", "start", LOCAL_VM).returncode == 0


def test_a_powered_off_vm_moves_by_registering_it_on_another_host(
    lab3: topology.LabState, center: httpx.Client, vms: None
) -> None:
    """`vm migrate` of a powered-off VM: the other host registers it from its record on the
    shared datastore, the first forgets it, and it then boots there."""
    index = len(SHARED_VMS) + 1
    spec = vm_spec(COLD_VM, index)
    r = center.post("/v1/vms", json={"host": HOST, "spec": spec})
    assert r.status_code == 201, r.text
    try:
        dest = sorted(OTHERS)[0]
        done = kvmotion("vm", "migrate", COLD_VM, "--host", dest)
        assert done.returncode == 0, done.stderr
        assert f"now registered on {dest}" in done.stdout
        assert hosts_of(center)[COLD_VM] == dest
        # each agent says so too (the center asked them, it did not just write it down)
        names = [h.name for h in lab3.hosts]
        assert COLD_VM in agent_vm_names(lab3, names.index(dest))
        assert COLD_VM not in agent_vm_names(lab3, names.index(HOST))
        assert center.post(f"/v1/vms/{COLD_VM}/power-on").status_code == 200
        wait_for_guest(lab3, guest_ip(index)).close()  # it boots from its disk, on dest
        assert hosts_of(center)[COLD_VM] == dest
    finally:
        center.post(f"/v1/vms/{COLD_VM}/power-off")
        center.delete(f"/v1/vms/{COLD_VM}")


def test_an_overloaded_host_gets_a_recommendation_that_applied_evens_the_load(
    lab3: topology.LabState, center: httpx.Client, vms: None
) -> None:
    """Two guests burn a CPU each on one host: balancing (manual) recommends moving one, with
    its reason and cost; applied from the CLI, it runs on the other host, its connection
    still answering, and the hosts' measured loads are even."""
    placed = hosts_of(center)
    busy_host = next(h for h in (placed[n] for n in SHARED_VMS)
                     if sum(placed[n] == h for n in SHARED_VMS) >= 2)  # fmt: skip
    busy = [n for n in SHARED_VMS if placed[n] == busy_host][:2]
    hosts = [HOST, *sorted(OTHERS)]
    assert kvmotion("cluster", "create", "drs").returncode == 0
    for host in hosts:
        assert kvmotion("cluster", "add-host", "drs", host).returncode == 0
    # --hold 0: maintenance has just moved these VMs, and a hold would keep them where they are
    done = kvmotion("cluster", "balancing", "drs", "--mode", "manual", "--threshold", "3",
                    "--window", str(WINDOW_S), "--hold", "0", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["settings"]["mode"] == "manual"
    guests = [wait_for_guest(lab3, guest_ip(SHARED_VMS.index(n))) for n in busy]
    try:
        for guest in guests:
            guest.dirty(0, 1)  # as fast as it can, in 1 MiB: a CPU burnt

        def recommended() -> dict[str, Any] | None:
            listed = kvmotion("cluster", "recommendations", "list", "drs", "--json")
            assert listed.returncode == 0, listed.stderr
            result: dict[str, Any] = json.loads(listed.stdout)
            ours = [r for r in result["recommendations"] if r["vm"] in busy]
            return result if ours else None

        time.sleep(WINDOW_S)  # a window of samples with both guests busy
        result = wait_for("a recommendation to move a busy VM", recommended, timeout=120)
        loads = {h["host"]: h["cpu"] for h in result["hosts"]}
        assert set(loads) == set(hosts)
        assert loads[busy_host] > 0.4 and all(loads[h] < 0.2 for h in hosts if h != busy_host)
        rec = result["recommendations"][0]  # the best move first: a busy VM off its host
        assert rec["vm"] in busy, result["recommendations"]
        assert rec["source"] == busy_host and rec["dest"] != busy_host
        assert f"{busy_host} CPU" in rec["reason"] and rec["imbalance_after"] < result["imbalance"]
        assert rec["prediction"] is not None  # the predictor's time and downtime, or why not
        applied = kvmotion("cluster", "recommendations", "apply", "drs", "--id",
                           str(rec["id"]), "--json")  # fmt: skip
        assert applied.returncode == 0, applied.stderr
        task_id = json.loads(applied.stdout)["applied"][0]["task"]
        task = wait_task(center, task_id, deadline=300)
        assert task["state"] == "success", task
        assert hosts_of(center)[rec["vm"]] == rec["dest"]
        moved = guests[busy.index(rec["vm"])]
        assert moved.ping().n > 0  # the connection made before the move answers after it
        time.sleep(WINDOW_S)  # a window measured with the VM on its new host
        after = json.loads(kvmotion("cluster", "recommendations", "list", "drs", "--json").stdout)
        loads_after = {h["host"]: h["cpu"] for h in after["hosts"]}
        assert abs(loads_after[busy_host] - loads_after[rec["dest"]]) < 0.25, loads_after
        assert after["imbalance"] < result["imbalance"]
        # not sent back: the balancer does not undo its move while the load is the same
        back = [r for r in after["recommendations"] if r["vm"] == rec["vm"]]
        assert all(r["dest"] != busy_host for r in back), back
    finally:
        for guest in guests:
            guest.dirty_stop()
            guest.close()
        kvmotion("cluster", "balancing", "drs", "--mode", "off")
    print(f"\nbalancing: {busy_host} CPU {loads[busy_host]:.0%} -> {loads_after[busy_host]:.0%}, "
          f"{rec['dest']} {loads[rec['dest']]:.0%} -> {loads_after[rec['dest']]:.0%}; "
          f"imbalance {result['imbalance']:.3f} -> {after['imbalance']:.3f}")  # fmt: skip
