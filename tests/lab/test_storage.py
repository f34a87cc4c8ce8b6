"""Storage vMotion and "change both", for real: disks copied while the guest writes to them.

guestd appends sequence-numbered, flushed records to its disk throughout; after each migration
every record the guest saw acknowledged must be on the disk the VM now uses, in order, and the
guest must have kept running (the same guestd answers the same TCP connection). Failures
mid-copy (the destination's agent killed, the migration link cut) must leave the VM running on
its original disks, with the partial copies removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion.lab import netns, topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.guestclient import GuestClient
from kvmotion.lab.records import verify_records
from tests.lab.conftest import (
    assert_user_noticed_nothing,
    center_http,
    qemu_pids_under,
    user_ping_loop,
    wait_task,
)

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
DISK_MIB = 512
RECORD_INTERVAL_MS = 2  # about a record every few ms: the copy always races the guest's writes


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


def datastore_root(lab: topology.LabState, name: str) -> Path:
    if name == lab.shared_datastore.name:
        return lab.shared_datastore
    [host] = [h for h in lab.hosts if h.local_datastore.name == name]
    return host.local_datastore


def disk_image(lab: topology.LabState, center: httpx.Client, vm: str) -> Path:
    disk = center.get(f"/v1/vms/{vm}").json()["config"]["disks"][0]
    return datastore_root(lab, str(disk["datastore"])) / str(disk["path"])


def create_vm(
    lab: topology.LabState,
    center: httpx.Client,
    name: str,
    index: int,
    datastore: str,
    host: str = SRC,
    prefill_mib: int = 0,
    extra_disks: int = 0,
) -> GuestClient:
    """A running VM whose guest writes records to its first disk; ``prefill_mib`` of data placed
    past the records first makes its copy take a while (on a shaped link)."""
    disks = [{"size_mib": DISK_MIB}] + [{"size_mib": 32}] * extra_disks
    spec = vm_spec(name, index, datastore=datastore) | {"disks": disks}
    r = center.post("/v1/vms", json={"host": host, "spec": spec})
    assert r.status_code == 201, r.text
    if prefill_mib:
        subprocess.run(
            ["qemu-io", "-c", f"write -P 0x5a {DISK_MIB - prefill_mib}M {prefill_mib}M",
             str(disk_image(lab, center, name))],
            check=True, capture_output=True,
        )  # fmt: skip
    assert center.post(f"/v1/vms/{name}/power-on").status_code == 200
    guest = wait_for_guest(lab, guest_ip(index))
    guest.disk_start(RECORD_INTERVAL_MS)
    return guest


def remove_vm(center: httpx.Client, name: str, guest: GuestClient) -> None:
    guest.close()
    center.post(f"/v1/vms/{name}/power-off")
    assert center.delete(f"/v1/vms/{name}").status_code == 204


def migrate(center: httpx.Client, vm: str, **body: Any) -> dict[str, Any]:
    r = center.post(f"/v1/vms/{vm}/migrate", json=body)
    assert r.status_code == 202, r.text
    return wait_task(center, r.json()["id"], deadline=240)


def start(center: httpx.Client, vm: str, **body: Any) -> int:
    r = center.post(f"/v1/vms/{vm}/migrate", json=body)
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


def wait_copying(center: httpx.Client, task_id: int, timeout: float = 60) -> None:
    """Until the disk copy has moved some bytes (and is still going)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        task = center.get(f"/v1/tasks/{task_id}").json()
        copied = ((task["summary"] or {}).get("disk_copy") or {}).get("copied_bytes") or 0
        if task["phase"] == "disk_copy" and copied > 0:
            return
        assert task["state"] in ("queued", "running"), task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never started copying")


def assert_records_kept(
    lab: topology.LabState, center: httpx.Client, vm: str, guest: GuestClient
) -> None:
    """Every record the guest saw acknowledged is on the disk the VM uses now, in order."""
    acked = guest.disk_status().acked
    assert acked > 0, "the guest acknowledged no write"
    check = verify_records(disk_image(lab, center, vm), acked)
    assert check.ok, check.message
    verify = guest.disk_verify()  # and the guest reads them back through its own disk
    assert verify.passed, verify


def qemus_on(lab: topology.LabState, index: int, uuid: str) -> list[int]:
    host_dir = topology.lab_dir() / "hosts" / lab.hosts[index].netns
    return [p for p in qemu_pids_under(host_dir) if uuid in " ".join(netns.process_cmdline(p))]


def vm_folder(lab: topology.LabState, datastore: str, vm: str) -> Path:
    return datastore_root(lab, datastore) / vm


def test_storage_only_shared_to_local_and_back(
    lab: topology.LabState, center: httpx.Client
) -> None:
    guest = create_vm(lab, center, "vm-s", 4, "shared", extra_disks=1)
    uuid = center.get("/v1/vms/vm-s").json()["uuid"]
    [pid] = qemus_on(lab, 0, uuid)
    ping = user_ping_loop(lab, 4)
    try:
        for source, target in (("shared", "local-172"), ("local-172", "shared")):
            task = migrate(center, "vm-s", type="storage", datastore=target)
            assert task["state"] == "success", task["error"]
            assert task["request"]["type"] == "storage" and task["request"]["dest"] == SRC
            steps = [t["step"] for t in task["timeline"]]
            for step in ("disk_copy", "disks_ready", "disks_switched"):
                assert step in steps, steps
            copy = task["summary"]["disk_copy"]
            # The jobs' total is the disks plus what the guest rewrote behind the copy.
            assert copy["copied_bytes"] == copy["total_bytes"] >= (DISK_MIB + 32) * 2**20
            assert [d["disk"] for d in copy["disks"]] == [0, 1] and copy["datastore"] == target
            vm = center.get("/v1/vms/vm-s").json()
            assert vm["host"] == SRC and vm["power_state"] == "poweredOn"
            assert vm["config"]["datastore"] == target
            assert [d["datastore"] for d in vm["config"]["disks"]] == [target, target]
            for disk in vm["config"]["disks"]:
                assert (datastore_root(lab, target) / disk["path"]).exists()
            assert vm["config_path"].startswith(str(datastore_root(lab, target)))
            assert (vm_folder(lab, target, "vm-s") / "vm.json").exists()
            assert not vm_folder(lab, source, "vm-s").exists(), "old files left behind"
            assert qemus_on(lab, 0, uuid) == [pid], "the VM's QEMU must never stop"
            assert_records_kept(lab, center, "vm-s", guest)
    finally:
        ping.stop()
        summary = ping.join(timeout=30)
    assert_user_noticed_nothing(summary)
    remove_vm(center, "vm-s", guest)


def test_storage_move_of_a_powered_off_vm(lab: topology.LabState, center: httpx.Client) -> None:
    """Cold: the files are copied as they are; the VM then boots from the new datastore."""
    spec = vm_spec("vm-o", 9, datastore="shared") | {"disks": [{"size_mib": DISK_MIB}]}
    assert center.post("/v1/vms", json={"host": SRC, "spec": spec}).status_code == 201
    pattern = ["-c", f"write -P 0x5a 64M {DISK_MIB - 64}M"]
    image = disk_image(lab, center, "vm-o")
    subprocess.run(["qemu-io", *pattern, str(image)], check=True, capture_output=True)
    task = migrate(center, "vm-o", type="storage", datastore="local-172")
    assert task["state"] == "success", task["error"]
    vm = center.get("/v1/vms/vm-o").json()
    assert vm["power_state"] == "poweredOff"
    assert [d["datastore"] for d in vm["config"]["disks"]] == ["local-172"]
    assert not vm_folder(lab, "shared", "vm-o").exists()
    moved = disk_image(lab, center, "vm-o")
    read = ["-c", f"read -P 0x5a 64M {DISK_MIB - 64}M"]
    check = subprocess.run(["qemu-io", "-r", *read, str(moved)], capture_output=True, text=True)
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, check
    assert center.post("/v1/vms/vm-o/power-on").status_code == 200
    guest = wait_for_guest(lab, guest_ip(9))
    guest.disk_start(RECORD_INTERVAL_MS)
    wait_until(lambda: guest.disk_status().acked > 10, 20, "the guest wrote nothing")
    assert_records_kept(lab, center, "vm-o", guest)
    remove_vm(center, "vm-o", guest)


def test_change_both_local_to_local_with_user_connected(
    lab: topology.LabState, center: httpx.Client
) -> None:
    guest = create_vm(lab, center, "vm-l", 5, "local-172")
    uuid = center.get("/v1/vms/vm-l").json()["uuid"]
    # Compute only cannot move it: its disk is on a datastore .173 does not see.
    r = center.post("/v1/vms/vm-l/migrate", json={"host": DST})
    assert r.status_code == 409 and r.json()["error"]["code"] == "datastore_not_shared"
    ping = user_ping_loop(lab, 5)
    try:
        for (src_i, src_ds), (dst_i, dst_ds) in (
            ((0, "local-172"), (1, "local-173")),
            ((1, "local-173"), (0, "local-172")),
        ):
            task = migrate(
                center, "vm-l", type="both", host=lab.hosts[dst_i].name, datastore=dst_ds
            )
            assert task["state"] == "success", task["error"]
            steps = [t["step"] for t in task["timeline"]]
            for step in ("disk_copy", "disks_ready", "precopy", "stunned", "resumed"):
                assert step in steps, steps
            summary = task["summary"]
            assert summary["disk_copy"]["copied_bytes"] >= DISK_MIB * 2**20
            assert summary["downtime_ms"] is not None and summary["transferred_bytes"] > 0
            vm = center.get("/v1/vms/vm-l").json()
            assert vm["host"] == lab.hosts[dst_i].name and vm["power_state"] == "poweredOn"
            assert [d["datastore"] for d in vm["config"]["disks"]] == [dst_ds]
            assert len(qemus_on(lab, dst_i, uuid)) == 1 and qemus_on(lab, src_i, uuid) == []
            assert not vm_folder(lab, src_ds, "vm-l").exists(), "source files left behind"
            assert_records_kept(lab, center, "vm-l", guest)
    finally:
        ping.stop()
        result = ping.join(timeout=30)
    assert_user_noticed_nothing(result)
    remove_vm(center, "vm-l", guest)


def assert_kept_on_source(
    lab: topology.LabState,
    center: httpx.Client,
    vm: str,
    guest: GuestClient,
    pid: int,
    index: int = 0,
) -> None:
    info = center.get(f"/v1/vms/{vm}").json()
    assert info["host"] == lab.hosts[index].name and info["power_state"] == "poweredOn"
    assert [d["datastore"] for d in info["config"]["disks"]] == [f"local-{172 + index}"]
    assert qemus_on(lab, index, info["uuid"]) == [pid]
    assert_records_kept(lab, center, vm, guest)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def test_change_both_destination_agent_killed_mid_copy(
    lab: topology.LabState, center: httpx.Client
) -> None:
    guest = create_vm(lab, center, "vm-k", 6, "local-172", prefill_mib=256)
    uuid = center.get("/v1/vms/vm-k").json()["uuid"]
    [pid] = qemus_on(lab, 0, uuid)
    topology.shape_link(SRC, 100)  # 256 MiB takes about 20 s: time to fail mid-copy
    try:
        task_id = start(center, "vm-k", type="both", host=DST, datastore="local-173")
        wait_copying(center, task_id)
        state = topology.load_state()
        assert state is not None and state.hosts[1].agent_pid is not None
        os.kill(state.hosts[1].agent_pid, signal.SIGKILL)
        task = wait_task(center, task_id, deadline=120)
    finally:
        topology.shape_link(SRC, None)
    assert task["state"] == "error", task
    assert_kept_on_source(lab, center, "vm-k", guest, pid)
    # The destination comes back: its orphaned receiving copy and partial disk are removed.
    topology.lab_up(2, log=lambda _m: None)
    wait_until(
        lambda: not qemus_on(lab, 1, uuid) and not vm_folder(lab, "local-173", "vm-k").exists(),
        60,
        "the destination's partial copy was not removed",
    )
    assert_kept_on_source(lab, center, "vm-k", guest, pid)
    remove_vm(center, "vm-k", guest)


def test_change_both_migration_link_cut_mid_copy(
    lab: topology.LabState, center: httpx.Client
) -> None:
    """The VM first arrives on .173 by a migration (its agent then holds that migration's
    record), then goes back with its disks while .172's migration link is cut mid-copy."""
    guest = create_vm(lab, center, "vm-c", 7, "local-172", prefill_mib=256)
    uuid = center.get("/v1/vms/vm-c").json()["uuid"]
    task = migrate(center, "vm-c", type="both", host=DST, datastore="local-173")
    assert task["state"] == "success", task["error"]
    [pid] = qemus_on(lab, 1, uuid)
    topology.shape_link(DST, 100)
    ping = user_ping_loop(lab, 7)
    try:
        task_id = start(center, "vm-c", type="both", host=SRC, datastore="local-172")
        wait_copying(center, task_id)
        topology.set_link_up(SRC, False)
        task = wait_task(center, task_id, deadline=120)
        time.sleep(1.0)  # the user keeps working after the failed attempt
    finally:
        topology.set_link_up(SRC, True)
        topology.shape_link(DST, None)
        ping.stop()
        summary = ping.join(timeout=30)
    assert task["state"] == "error" and task["error_code"] == "copy_stalled", task
    assert "link" in task["error"] and "disk copy cancelled" in task["error"], task["error"]
    assert_user_noticed_nothing(summary)
    assert_kept_on_source(lab, center, "vm-c", guest, pid, index=1)
    assert not qemus_on(lab, 0, uuid), "the destination's QEMU was left running"
    assert not vm_folder(lab, "local-172", "vm-c").exists(), "partial copy left behind"
    # The copy's leftovers are gone from the source's QEMU too: the VM moves again.
    task = migrate(center, "vm-c", type="both", host=SRC, datastore="local-172")
    assert task["state"] == "success", task["error"]
    assert_records_kept(lab, center, "vm-c", guest)
    remove_vm(center, "vm-c", guest)


def test_bad_input_changes_nothing(lab: topology.LabState, center: httpx.Client) -> None:
    free = next(d for d in center.get("/v1/datastores").json() if d["name"] == "local-172")
    # A thin disk that fits where it is, but not twice with the copy's margin on the same disk.
    big_mib = int(free["free_bytes"] * 0.95) // 2**20
    spec = vm_spec("vm-b", 8) | {"disks": [{"size_mib": big_mib}]}
    assert center.post("/v1/vms", json={"host": SRC, "spec": spec}).status_code == 201
    assert center.post("/v1/vms/vm-b/power-on").status_code == 200
    before = center.get("/v1/vms/vm-b").json()
    tasks_before = len(center.get("/v1/tasks").json())
    cases = [
        ({"type": "storage", "datastore": "nosuch"}, 404, "datastore_not_found"),
        ({"type": "storage", "datastore": "shared"}, 409, "same_datastore"),
        ({"type": "storage", "datastore": "local-173"}, 409, "datastore_not_visible"),
        ({"type": "storage", "datastore": "local-172"}, 409, "insufficient_space"),
        ({"type": "both", "host": DST, "datastore": "local-172"}, 409, "datastore_not_visible"),
        ({"type": "storage", "datastore": "../etc"}, 422, "invalid_input"),
        ({"type": "both", "datastore": "local-173"}, 422, "invalid_input"),
        ({"type": "compute", "host": DST, "datastore": "local-173"}, 422, "invalid_input"),
        ({"type": "storage", "host": DST, "datastore": "local-173"}, 422, "invalid_input"),
    ]
    for body, status, code in cases:
        r = center.post("/v1/vms/vm-b/migrate", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == code, (body, r.text)
        assert err["message"], body
    assert len(center.get("/v1/tasks").json()) == tasks_before
    after = center.get("/v1/vms/vm-b").json()
    assert after["config"] == before["config"] and after["config_path"] == before["config_path"]
    assert not vm_folder(lab, "local-172", "vm-b").exists()
    assert not vm_folder(lab, "local-173", "vm-b").exists()
    assert center.post("/v1/vms/vm-b/power-off").status_code == 200
    assert center.delete("/v1/vms/vm-b").status_code == 204
