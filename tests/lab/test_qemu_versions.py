"""Hosts of different QEMU versions, as in the seed (its hosts run different ESXi versions).

Host .172 runs Debian 12's QEMU 7.2 (unpacked beside the system's by ./run setup), .173 the
system's QEMU 10. A VM's machine type is its hardware version; under TCG, 7.2 needs each VM's RAM
padded by 8 KiB (qemu.cmdline.ram_pad_kib), and a VM keeps its RAM size while it runs. What a user
checks: a busy VM moves 7.2 -> 10 -> 7.2 with its user connected and nothing lost; a VM 7.2 cannot
run, or would run unsafely, is refused before anything moves, and the refusal says why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvmotion.lab import netns, topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.records import verify_records
from kvmotion.qemu.cmdline import parse_version
from tests.lab.conftest import (
    _lab,
    assert_user_noticed_nothing,
    center_http,
    qemu_pids_under,
    user_ping_loop,
    wait_task,
)

pytestmark = pytest.mark.lab

OLD, NEW = "172.16.0.172", "172.16.0.173"


def _why_not() -> str | None:
    if not os.access(topology.QEMUS["7.2"], os.X_OK):
        return f"QEMU 7.2 is not unpacked at {topology.QEMUS['7.2']} (./run setup does it)"
    return None


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[topology.LabState]:
    if (why := _why_not()) is not None:
        pytest.skip(why)
    yield from _lab(request, qemus={0: "7.2"})


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


def facts(center: httpx.Client, host: str) -> dict[str, Any]:
    r = center.get(f"/v1/hosts/{host}")
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()["facts"]
    return found


def qemu_cmdline(lab: topology.LabState, index: int, uuid: str) -> list[str]:
    host_dir = topology.lab_dir() / "hosts" / lab.hosts[index].netns
    [pid] = [p for p in qemu_pids_under(host_dir) if uuid in " ".join(netns.process_cmdline(p))]
    return netns.process_cmdline(pid)


def memory_arg(argv: list[str]) -> str:
    return argv[argv.index("-m") + 1]


def new_vm(center: httpx.Client, name: str, index: int, host: str, **spec: Any) -> dict[str, Any]:
    body = {"host": host, "spec": vm_spec(name, index, memory_mib=256) | spec}
    r = center.post("/v1/vms", json=body)
    assert r.status_code == 201, r.text
    r = center.post(f"/v1/vms/{name}/power-on")
    assert r.status_code == 200, r.text
    vm: dict[str, Any] = center.get(f"/v1/vms/{name}").json()
    return vm


def migrate(center: httpx.Client, vm: str, dest: str) -> dict[str, Any]:
    r = center.post(f"/v1/vms/{vm}/migrate", json={"host": dest})
    assert r.status_code == 202, r.text
    return wait_task(center, int(r.json()["id"]))


def test_each_host_reports_its_qemu(center: httpx.Client) -> None:
    old, new = facts(center, OLD), facts(center, NEW)
    assert parse_version(old["qemu_version"]) == (7, 2)
    assert (parse_version(new["qemu_version"]) or (0, 0)) >= (9, 0)
    assert old["accel"] == new["accel"] == "tcg"
    assert (old["ram_pad_kib"], new["ram_pad_kib"]) == (8, 0)
    assert "pc-q35-7.2" in old["machine_types"] and "pc-q35-7.2" in new["machine_types"]
    assert "pc-q35-10.0" in new["machine_types"] and "pc-q35-10.0" not in old["machine_types"]


def test_a_busy_vm_moves_from_7_2_to_10_and_back_intact(
    lab: topology.LabState, center: httpx.Client
) -> None:
    vm = new_vm(center, "vm-mixed", 0, OLD)
    guest = wait_for_guest(lab, guest_ip(0))
    try:
        boot = guest.info().uptime_s
        assert guest.disk_start(interval_ms=5).running
        guest.dirty(16, 48)
        started_padded = memory_arg(qemu_cmdline(lab, 0, vm["uuid"]))
        assert started_padded == f"{256 * 1024 + 8}k"  # 7.2 under TCG: padded
        ping = user_ping_loop(lab)
        try:
            for dest, index in ((NEW, 1), (OLD, 0), (NEW, 1), (OLD, 0)):
                task = migrate(center, "vm-mixed", dest)
                assert task["state"] == "success", task["error"]
                assert center.get("/v1/vms/vm-mixed").json()["host"] == dest
                # The VM keeps the size it started with, on QEMU 10 too.
                assert memory_arg(qemu_cmdline(lab, index, vm["uuid"])) == started_padded
        finally:
            ping.stop()
            summary = ping.join(timeout=30)
        assert_user_noticed_nothing(summary)
        # The same guest (no reboot), and every write it saw acknowledged is on its disk.
        assert guest.info().uptime_s > boot
        guest.dirty_stop()
        acked = guest.disk_stop()
        disk = center.get("/v1/vms/vm-mixed").json()["config"]["disks"][0]
        image = lab.shared_datastore / str(disk["path"])
        check = verify_records(image, acked)
        assert check.ok, check.message
        assert guest.disk_verify().passed
        # An idle working set crosses both ways bit for bit.
        before = guest.checksum()
        for dest in (NEW, OLD):
            assert migrate(center, "vm-mixed", dest)["state"] == "success"
        assert guest.checksum() == before
    finally:
        guest.close()
        center.post("/v1/vms/vm-mixed/power-off")


def test_a_vm_qemu_7_2_cannot_run_safely_is_refused_before_anything_moves(
    lab: topology.LabState, center: httpx.Client
) -> None:
    """A VM started on QEMU 10 has its exact RAM size, which 7.2 under TCG would migrate
    losing writes; one of hardware version 10.0 does not exist on 7.2 at all."""
    exact = new_vm(center, "vm-exact", 1, NEW)
    assert memory_arg(qemu_cmdline(lab, 1, exact["uuid"])) == "256M"
    new_vm(center, "vm-newer", 2, NEW, machine_type="pc-q35-10.0")
    tasks_before = len(center.get("/v1/tasks").json())
    try:
        r = center.post("/v1/vms/vm-exact/migrate", json={"host": OLD})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "ram_pad_missing", error
        assert "loses guest writes" in error["message"] and f"at {OLD}" in error["message"]
        r = center.post("/v1/vms/vm-newer/migrate", json={"host": OLD})
        assert r.status_code == 409, r.text
        codes = [e["code"] for e in r.json()["error"]["details"]["errors"]]
        assert "machine_type_missing" in codes, codes
        message = r.json()["error"]["message"]
        assert "pc-q35-10.0" in message and "QEMU 7.2" in message
        # Nothing moved, no task was made.
        assert len(center.get("/v1/tasks").json()) == tasks_before
        for name in ("vm-exact", "vm-newer"):
            assert center.get(f"/v1/vms/{name}").json()["host"] == NEW
        # A machine type this QEMU lacks is refused at creation, naming what it has.
        spec = vm_spec("vm-future", 3) | {"machine_type": "pc-q35-99.0"}
        r = center.post("/v1/vms", json={"host": OLD, "spec": spec})
        assert r.status_code == 422, r.text
        assert "pc-q35-7.2" in r.json()["error"]["message"]
    finally:
        for name in ("vm-exact", "vm-newer"):
            center.post(f"/v1/vms/{name}/power-off")
