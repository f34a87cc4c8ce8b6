"""Post-copy on real QEMU: a busy guest that pre-copy cannot move by its deadline moves anyway,
and a migration link cut during post-copy (the one moment when neither host holds the whole VM)
is recovered when the link returns, with every write the guest made still in its memory and on
its disk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvmotion.lab import topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.guestclient import GuestClient
from kvmotion.lab.records import verify_records
from tests.lab.conftest import center_http, user_ping_loop, wait_task

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
INDEX = 5
LINK_MBIT = 80  # 10 MB/s: the guest's memory takes seconds to cross
# Over twice what the link carries: after the first pass, pre-copy would need a brake deeper than
# half the guest's speed, so the policy switches to post-copy instead.
DIRTY_MIB_S, WSS_MIB = 24, 48
DEADLINE_S = 40.0
CUT_S = 4.0  # the migration link stays cut this long during post-copy


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


@pytest.fixture(scope="module")
def busy(lab: topology.LabState, center: httpx.Client) -> Iterator[GuestClient]:
    r = center.post("/v1/vms", json={"host": SRC, "spec": vm_spec("pc", INDEX, memory_mib=256)})
    assert r.status_code == 201, r.text
    assert center.post("/v1/vms/pc/power-on").status_code == 200
    guest = wait_for_guest(lab, guest_ip(INDEX))
    for host in (SRC, DST):
        topology.shape_link(host, LINK_MBIT)
    try:
        yield guest
    finally:
        for host in (SRC, DST):
            topology.shape_link(host, None)
            topology.set_link_up(host, True)
        guest.close()


def start_migration(center: httpx.Client, dest: str) -> int:
    body = {"host": dest, "allow_postcopy": True, "deadline_s": DEADLINE_S, "downtime_ms": 100}
    r = center.post("/v1/vms/pc/migrate", json=body)
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


def wait_postcopy(center: httpx.Client, task_id: int, limit_s: float) -> dict[str, Any]:
    """The task once the guest runs on the destination in post-copy, or once it ended."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        task: dict[str, Any] = center.get(f"/v1/tasks/{task_id}").json()
        steps = {t["step"] for t in task["timeline"]}
        if {"postcopy", "resumed"} <= steps or task["state"] in ("success", "error"):
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached post-copy")


def check_intact(lab: topology.LabState, center: httpx.Client, guest: GuestClient) -> None:
    """The guest's memory holds every write it made, its disk every write it acknowledged."""
    memory = guest.dirty_verify()
    assert memory.intact and memory.writes > 0, memory.reply
    acked = guest.disk_stop()
    disk = center.get("/v1/vms/pc").json()["config"]["disks"][0]
    check = verify_records(lab.shared_datastore / str(disk["path"]), acked)
    assert check.ok, check.message
    assert guest.disk_verify().passed


def test_post_copy_moves_a_guest_pre_copy_cannot(
    lab: topology.LabState, center: httpx.Client, busy: GuestClient
) -> None:
    boot = busy.info().uptime_s
    assert busy.disk_start(interval_ms=5).running
    busy.dirty(DIRTY_MIB_S, WSS_MIB)
    time.sleep(1.0)
    ping = user_ping_loop(lab, INDEX)
    try:
        task = wait_task(center, start_migration(center, DST), DEADLINE_S + 60)
    finally:
        ping.stop()
        user = ping.join(timeout=30)
    assert task["state"] == "success", (task["error"], task["summary"].get("decisions"))
    steps = [t["step"] for t in task["timeline"]]
    assert "postcopy" in steps, steps
    summary = task["summary"]
    assert summary["streams"] == 1  # QEMU cannot combine post-copy with multifd
    assert summary["postcopy_breaks"] == summary["postcopy_recoveries"] == 0
    assert any(d["action"] == "start_postcopy" for d in summary["decisions"])
    assert center.get("/v1/vms/pc").json()["host"] == DST
    # The user's connection survived; the guest never restarted; it ran on the destination
    # while its memory was still arriving.
    assert user.same_connection and user.n_monotonic and user.lost == 0, user
    assert busy.info().uptime_s > boot
    check_intact(lab, center, busy)


def test_post_copy_recovers_from_a_cut_migration_link(
    lab: topology.LabState, center: httpx.Client, busy: GuestClient
) -> None:
    assert busy.disk_start(interval_ms=5).running
    busy.dirty(DIRTY_MIB_S, WSS_MIB)
    time.sleep(1.0)
    task_id = start_migration(center, SRC)  # back: the VM runs on DST now
    # Cut once the destination runs the guest. Before that (the source switched, the destination
    # has not yet read the switch behind the queued pre-copy) a cut loses the VM: QEMU can
    # neither resume the source nor recover a destination that never entered post-copy.
    task = wait_postcopy(center, task_id, DEADLINE_S + 30)
    assert task["phase"] == "postcopy-active", (task["state"], task["error"])
    topology.set_link_up(SRC, False)  # the destination's migration link, as a pulled cable
    try:
        time.sleep(CUT_S)
        cut = center.get(f"/v1/tasks/{task_id}").json()
        assert cut["state"] == "running" and cut["phase"].startswith("postcopy"), cut["error"]
    finally:
        topology.set_link_up(SRC, True)
    task = wait_task(center, task_id, 180)
    assert task["state"] == "success", task["error"]
    steps = [t["step"] for t in task["timeline"]]
    assert "postcopy_paused" in steps and "postcopy_recovered" in steps, steps
    summary = task["summary"]
    assert summary["postcopy_breaks"] >= 1 and summary["postcopy_recoveries"] >= 1, summary
    assert center.get("/v1/vms/pc").json()["host"] == SRC
    check_intact(lab, center, busy)
