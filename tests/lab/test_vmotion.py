"""Compute vMotion, for real: the seed's procedure with a user connected, and its failures.

One lab, one center, one VM (vm-a on the shared datastore) busy dirtying memory while the client
pings it every 10 ms over one TCP connection. What a user would check: where the VM runs, that
the connection survived with nothing lost, that memory crossed the migration network, and that
a failed or cancelled migration leaves the VM running where it was.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmotion.lab import netns, topology
from kvmotion.lab.demo import WORKLOAD, guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.guestclient import GuestClient
from tests.lab.conftest import (
    assert_user_noticed_nothing,
    center_http,
    qemu_pids_under,
    user_ping_loop,
    wait_task,
)

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
TASK_DEADLINE = 120.0


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


@pytest.fixture(scope="module")
def vm_a(lab: topology.LabState, center: httpx.Client) -> Iterator[GuestClient]:
    """vm-a on .172 (shared datastore), guestd busy with the demo's workload."""
    r = center.post("/v1/vms", json={"host": SRC, "spec": vm_spec("vm-a", 0, memory_mib=256)})
    assert r.status_code == 201, r.text
    assert center.post("/v1/vms/vm-a/power-on").status_code == 200
    guest = wait_for_guest(lab, guest_ip(0))
    guest.dirty(*WORKLOAD)
    yield guest
    guest.close()


def run_task(center: httpx.Client, task_id: int) -> dict[str, Any]:
    return wait_task(center, task_id)


def migrate(center: httpx.Client, dest: str, **body: Any) -> dict[str, Any]:
    r = center.post("/v1/vms/vm-a/migrate", json={"host": dest, **body})
    assert r.status_code == 202, r.text
    task: dict[str, Any] = r.json()
    return task


def wait_phase(center: httpx.Client, task_id: int, phases: set[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        task = center.get(f"/v1/tasks/{task_id}").json()
        if task["phase"] in phases and task["samples"]:
            return
        assert task["state"] in ("queued", "running"), task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {phases}")


def link_bytes(ns: str, dev: str) -> tuple[int, int]:
    [link] = netns.ip_json("-s", "link", "show", "dev", dev, ns=ns)
    stats = link["stats64"]
    return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(center: httpx.Client) -> Samples:
    """The center's /metrics, as Prometheus reads it."""
    r = center.get("/metrics")
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after[key] - before.get(key, 0.0)


def qemus_on(host_ns: str, uuid: str) -> list[int]:
    host_dir = topology.lab_dir() / "hosts" / host_ns
    return [p for p in qemu_pids_under(host_dir) if uuid in " ".join(netns.process_cmdline(p))]


def agent_vm_names(lab: topology.LabState, index: int) -> list[str]:
    headers = {"Authorization": f"Bearer {lab.token}"}
    verify = lab.hosts[index].tls() or True
    with httpx.Client(trust_env=False, headers=headers, timeout=30, verify=verify) as http:
        return [v["name"] for v in http.get(f"{lab.hosts[index].agent_url}/v1/vms").json()]


def assert_runs_only_on(lab: topology.LabState, center: httpx.Client, index: int) -> None:
    vm = center.get("/v1/vms/vm-a").json()
    assert vm["host"] == lab.hosts[index].name and vm["power_state"] == "poweredOn"
    assert agent_vm_names(lab, index) == ["vm-a"]
    assert agent_vm_names(lab, 1 - index) == []
    assert len(qemus_on(lab.hosts[index].netns, vm["uuid"])) == 1
    assert qemus_on(lab.hosts[1 - index].netns, vm["uuid"]) == []


def test_seed_procedure_there_and_back(
    lab: topology.LabState, center: httpx.Client, vm_a: GuestClient
) -> None:
    ping = user_ping_loop(lab)
    before = scrape(center)
    summaries = []
    try:
        for dest_index in (1, 0):
            src_ns = lab.hosts[1 - dest_index].netns
            before_vmotion = link_bytes(src_ns, "vmotion0")
            before_mgmt = link_bytes(src_ns, "mgmt0")
            task = run_task(center, migrate(center, lab.hosts[dest_index].name)["id"])
            assert task["state"] == "success", task["error"]
            summaries.append(task["summary"])
            steps = [t["step"] for t in task["timeline"]]
            for step in ("requested", "precopy", "stunned", "resumed", "source_removed"):
                assert step in steps, f"timeline lacks {step}: {steps}"
            times = {t["step"]: t["time"] for t in task["timeline"]}
            assert times["requested"] <= times["precopy"] <= times["stunned"]
            assert times["stunned"] <= times["resumed"] <= times["source_removed"]
            summary = task["summary"]
            assert summary["downtime_ms"] is not None and summary["downtime_ms"] >= 0
            # The destination's bridge saw the VM's announce just after it resumed it. The
            # source told the destination the moment it stopped the guest, and the destination
            # took the VM's traffic (host/switchover.py): most often before the resume, but the
            # two run side by side, so either may finish first.
            assert "mac_learned" in steps, steps
            if "traffic_taken" in times:
                assert times["stunned"] <= times["traffic_taken"], steps
            assert 0 <= summary["resume_to_mac_learned_ms"] < 1000, summary
            assert summary["passes"] >= 1 and task["samples"]
            assert summary["transferred_bytes"] > 10 * 2**20
            # Memory went over QEMU's multifd streams (the default two), not the main stream.
            assert summary["streams"] == 2, summary
            assert summary["multifd_bytes"] > summary["transferred_bytes"] / 2, summary
            assert_runs_only_on(lab, center, dest_index)
            # The memory stream crossed the migration network, not the management network.
            sent_vmotion = link_bytes(src_ns, "vmotion0")[0] - before_vmotion[0]
            sent_mgmt = link_bytes(src_ns, "mgmt0")[0] - before_mgmt[0]
            assert sent_vmotion >= summary["transferred_bytes"]
            assert sent_mgmt < summary["transferred_bytes"] / 20
    finally:
        ping.stop()
        result = ping.join(timeout=30)
    assert_user_noticed_nothing(result)
    # The center's /metrics counted both migrations, with QEMU's downtime, the guest's pause
    # and the memory they sent, as their tasks report them.
    after = scrape(center)
    assert moved(before, after, "kvmotion_migrations_total", kind="compute", result="success") == 2
    for family, key in (
        ("kvmotion_migration_downtime_seconds", "downtime_ms"),
        ("kvmotion_migration_guest_pause_seconds", "stun_to_resume_ms"),
    ):
        assert moved(before, after, f"{family}_count", kind="compute") == 2, family
        took = sum(s[key] for s in summaries) / 1000
        assert moved(before, after, f"{family}_sum", kind="compute") == pytest.approx(took)
    sent = moved(
        before, after, "kvmotion_migration_sent_bytes_total", kind="compute", data="memory"
    )
    assert sent == sum(s["transferred_bytes"] for s in summaries)
    vms = center.get("/v1/vms").json()
    for host in lab.hosts:
        running = sum(v["host"] == host.name and v["power_state"] == "poweredOn" for v in vms)
        labels = {"host": host.name, "power_state": "poweredOn"}
        assert after["kvmotion_vms", frozenset(labels.items())] == running, host.name


def test_guest_survives_ten_migrations_in_a_row(
    lab: topology.LabState, center: httpx.Client, vm_a: GuestClient
) -> None:
    """Regression: with multi-threaded TCG a busy guest's kernel crashed within ~6 migrations;
    every answer must come from the same guestd, on the same connection."""
    ping = user_ping_loop(lab)
    try:
        for i in range(10):
            task = run_task(center, migrate(center, lab.hosts[(i + 1) % 2].name)["id"])
            assert task["state"] == "success", task["error"]
    finally:
        ping.stop()
        result = ping.join(timeout=30)
    assert_user_noticed_nothing(result)
    assert_runs_only_on(lab, center, 0)


def test_cancel_during_precopy_keeps_vm_on_source(
    lab: topology.LabState, center: httpx.Client, vm_a: GuestClient
) -> None:
    # A link slower than the guest dirties memory: pre-copy cannot converge, so we can cancel.
    topology.shape_link(SRC, 40)
    try:
        ping = user_ping_loop(lab)
        task = migrate(center, DST)
        wait_phase(center, task["id"], {"active"})
        r = center.post(f"/v1/tasks/{task['id']}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"]
        done = run_task(center, task["id"])
        time.sleep(1.0)  # the user keeps working after the failed attempt
        ping.stop()
        summary = ping.join(timeout=30)
    finally:
        topology.shape_link(SRC, None)
    assert done["state"] == "cancelled" and "cancelled" in done["error"]
    assert_runs_only_on(lab, center, 0)
    assert_user_noticed_nothing(summary)
    assert center.post(f"/v1/tasks/{task['id']}/cancel").status_code == 409


def test_destination_agent_killed_during_precopy(
    lab: topology.LabState, center: httpx.Client, vm_a: GuestClient
) -> None:
    topology.shape_link(SRC, 40)
    try:
        ping = user_ping_loop(lab)
        task = migrate(center, DST)
        wait_phase(center, task["id"], {"active"})
        state = topology.load_state()
        assert state is not None and state.hosts[1].agent_pid is not None
        os.kill(state.hosts[1].agent_pid, signal.SIGKILL)
        done = run_task(center, task["id"])
        time.sleep(1.0)  # the user keeps working after the failed attempt
        ping.stop()
        summary = ping.join(timeout=30)
    finally:
        topology.shape_link(SRC, None)
        topology.lab_up(2, log=lambda _m: None)  # restarts the killed agent
    assert done["state"] == "error"
    assert done["error_code"] == "host_unreachable" and DST in done["error"], done
    assert_user_noticed_nothing(summary)
    assert_runs_only_on(lab, center, 0)


def test_refusals_change_nothing(
    lab: topology.LabState, center: httpx.Client, vm_a: GuestClient
) -> None:
    tasks_before = len(center.get("/v1/tasks").json())
    cases = [
        ({"host": SRC}, 409, "same_host"),
        ({"host": "172.16.0.199"}, 404, "host_not_found"),
        ({"host": DST, "downtime_ms": 0}, 422, "invalid_input"),
        ({"host": DST, "type": "teleport"}, 422, "invalid_input"),
    ]
    for body, status, code in cases:
        r = center.post("/v1/vms/vm-a/migrate", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == code, r.text
    r = center.post("/v1/vms/ghost/migrate", json={"host": DST})
    assert r.status_code == 404 and r.json()["error"]["code"] == "vm_not_found"
    # A VM on a datastore the destination does not see: the precheck names it and the fix.
    spec = vm_spec("vm-local", 3, datastore="local-172")
    assert center.post("/v1/vms", json={"host": SRC, "spec": spec}).status_code == 201
    # Powered off, it would move by registering it there: refused, its disk unseen there.
    r = center.post("/v1/vms/vm-local/migrate", json={"host": DST})
    assert r.status_code == 409 and r.json()["error"]["code"] == "datastore_not_shared", r.text
    assert "local-172" in r.json()["error"]["message"]
    assert center.get("/v1/vms/vm-local").json()["host"] == SRC
    assert center.post("/v1/vms/vm-local/power-on").status_code == 200
    r = center.post("/v1/vms/vm-local/migrate", json={"host": DST})
    err = r.json()["error"]
    assert r.status_code == 409 and err["code"] == "datastore_not_shared", r.text
    assert "local-172" in err["message"] and "both" in err["message"]
    assert center.post("/v1/vms/vm-local/power-off").status_code == 200
    assert center.delete("/v1/vms/vm-local").status_code == 204
    # A VM already migrating: the second request is refused while the first runs.
    topology.shape_link(SRC, 40)
    try:
        task = migrate(center, DST)
        wait_phase(center, task["id"], {"active"})
        r = center.post("/v1/vms/vm-a/migrate", json={"host": DST})
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_migrating"
        center.post(f"/v1/tasks/{task['id']}/cancel")
        assert run_task(center, task["id"])["state"] == "cancelled"
    finally:
        topology.shape_link(SRC, None)
    assert len(center.get("/v1/tasks").json()) == tasks_before + 1
    assert_runs_only_on(lab, center, 0)
