"""HA for real, on a three-host lab with HA enabled on its cluster (failure after 15 s, isolation
response leave-on), each VM on the shared datastore:

- **isolation**: 172.16.0.172's management link is cut. The center cannot reach it, but the
  other hosts still see its heartbeat file change on the datastore: it is *isolated*, its VM
  runs on (the user connected to it notices nothing), nothing is restarted. Mended, it is
  connected again.
- **partition and heal**: 172.16.0.173 loses both its management link and its path to the
  shared datastore while its VM writes flushed records to its disk. Its agent, unable to renew
  its heartbeat, kills the VM's QEMU before its lease lapses; the center, once the other hosts
  see the heartbeat unchanged for 15 s, declares the host failed and restarts the VM on another
  host. Sampled every 50 ms throughout, never do two QEMUs run the VM; every acknowledged record
  is on the disk the restarted VM runs from. Healed, the host comes back and its stale
  registration of the VM is removed.
- **failure**: 172.16.0.174 is killed as a power cut would (its agent and its QEMUs, SIGKILL):
  its VMs restart elsewhere, the high-priority one first, each within the failure time plus the
  restart. Brought back, it runs none of them.

The detection and restart times are printed (pytest -s) and kept in the tasks' summaries.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion.lab import topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.records import verify_records
from tests.lab.conftest import (
    assert_user_noticed_nothing,
    center_http,
    qemu_pids_under,
    user_ping_loop,
)

pytestmark = pytest.mark.lab

CLUSTER = "Cluster"
FAILURE_S = 15.0
ISOLATED_HOST, PARTITIONED_HOST, DEAD_HOST = "172.16.0.172", "172.16.0.173", "172.16.0.174"
VMS = {"ha-iso": (0, ISOLATED_HOST), "ha-part": (1, PARTITIONED_HOST),
       "ha-low": (2, DEAD_HOST), "ha-high": (3, DEAD_HOST)}  # fmt: skip
CLI = [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kvmotion")]


@pytest.fixture(scope="module")
def center(lab3: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab3)


@pytest.fixture(scope="module")
def vms(lab3: topology.LabState, center: httpx.Client) -> Iterator[dict[str, str]]:
    """The VMs booted, HA enabled; their uuids by name."""
    r = center.put(
        f"/v1/clusters/{CLUSTER}/ha",
        json={"enabled": True, "failure_s": FAILURE_S, "failures_to_tolerate": 1},
    )
    assert r.status_code == 200, r.text  # fmt: skip
    uuids = {}
    for name, (index, host) in VMS.items():
        r = center.post("/v1/vms", json={"host": host, "spec": vm_spec(name, index)})
        assert r.status_code == 201, r.text
        uuids[name] = r.json()["uuid"]
        r = center.post(f"/v1/vms/{name}/power-on")
        assert r.status_code == 200, r.text
    r = center.put("/v1/vms/ha-high/ha-priority", json={"priority": "high"})
    assert r.status_code == 200, r.text
    for index, _ in VMS.values():
        wait_for_guest(lab3, guest_ip(index)).close()
    wait_for("every host connected in HA", lambda: states(center) == {
        h: "connected" for h in (ISOLATED_HOST, PARTITIONED_HOST, DEAD_HOST)}, 30)  # fmt: skip
    yield uuids
    for host in lab3.hosts:
        with contextlib.suppress(Exception):
            topology.set_link_up(host.name, True, "management")
            topology.set_storage_up(host.name, True)


def kvmotion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def states(center: httpx.Client) -> dict[str, str | None]:
    ha = center.get(f"/v1/clusters/{CLUSTER}/ha").json()
    return {h["host"]: h["state"] for h in ha["hosts"]}


def wait_for(what: str, check: Any, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not seen within {timeout:.0f} s: {what}")


def qemus_of(uuid: str) -> list[int]:
    """Every QEMU on this machine (all lab hosts share its kernel) that runs ``uuid`` with its
    disk open. A starting QEMU forks twice to daemonize, and its first process waits for the
    last: that one opens the disks, the waiting one never does."""
    found = []
    for pid in qemu_pids_under(Path(uuid)):  # its command line has the uuid
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{pid}/fd").iterdir()
            if any(os.readlink(fd).endswith(".qcow2") for fd in fds):
                found.append(pid)
    return found


class QemuCounter:
    """Counts the QEMUs of one VM every 50 ms, in a thread, for at most ``limit_s``."""

    def __init__(self, uuid: str, limit_s: float = 300.0) -> None:
        self.uuid, self.limit_s = uuid, limit_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> QemuCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        end = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < end:
            self.samples.append((time.monotonic(), len(qemus_of(self.uuid))))
            time.sleep(0.05)

    def first(self, count: int, after: float = 0.0) -> float | None:
        return next((t for t, n in self.samples if t >= after and n == count), None)


def vm_record(center: httpx.Client, name: str) -> dict[str, Any]:
    record: dict[str, Any] = center.get(f"/v1/vms/{name}").json()
    return record


def restarted_elsewhere(center: httpx.Client, name: str, old_host: str) -> dict[str, Any] | None:
    vm = vm_record(center, name)
    return vm if vm["host"] != old_host and vm["power_state"] == "poweredOn" else None


def registered_on(lab: topology.LabState, host: str, uuid: str) -> bool:
    return any((lab.host(host).run_dir / "vms").glob(f"{uuid}*"))


def restart_task(center: httpx.Client, name: str) -> dict[str, Any]:
    ha = center.get(f"/v1/clusters/{CLUSTER}/ha").json()
    [task] = [t for t in ha["restarts"] if t["target"] == name and t["state"] == "success"]
    return task


def test_a_host_cut_off_from_the_center_is_isolated_and_its_vm_runs_on(
    lab3: topology.LabState, center: httpx.Client, vms: dict[str, str]
) -> None:
    uuid = vms["ha-iso"]
    [pid] = qemus_of(uuid)
    user = user_ping_loop(lab3, VMS["ha-iso"][0])
    try:
        time.sleep(1)
        cut = time.monotonic()
        topology.set_link_up(ISOLATED_HOST, False, "management")
        wait_for("the host isolated",
                 lambda: states(center)[ISOLATED_HOST] == "isolated", FAILURE_S + 30)  # fmt: skip
        isolated_s = time.monotonic() - cut
        shown = kvmotion("host", "show", ISOLATED_HOST)
        time.sleep(5)  # past the failure time, well past: still nothing restarts
        ha = center.get(f"/v1/clusters/{CLUSTER}/ha").json()
        topology.set_link_up(ISOLATED_HOST, True, "management")
        wait_for("the host connected again",
                 lambda: states(center)[ISOLATED_HOST] == "connected", 30)  # fmt: skip
    finally:
        topology.set_link_up(ISOLATED_HOST, True, "management")
        user.stop()
        summary = user.join(30)
    print(f"\nisolation: declared {isolated_s:.1f} s after the cut")
    assert shown.returncode == 0 and "isolated:" in shown.stdout, shown
    [host] = [h for h in ha["hosts"] if h["host"] == ISOLATED_HOST]
    assert "datastore heartbeat lives on shared" in host["reason"], host
    assert [t for t in ha["restarts"] if t["target"] == "ha-iso"] == []
    assert qemus_of(uuid) == [pid]  # the same QEMU ran throughout, and no other
    assert vm_record(center, "ha-iso")["host"] == ISOLATED_HOST
    assert_user_noticed_nothing(summary)


def test_a_partitioned_host_stops_its_vm_before_it_restarts_elsewhere_never_two_copies(
    lab3: topology.LabState, center: httpx.Client, vms: dict[str, str]
) -> None:
    name, uuid = "ha-part", vms["ha-part"]
    index = VMS[name][0]
    guest = wait_for_guest(lab3, guest_ip(index))
    guest.disk_start(20)  # a flushed record every 20 ms
    time.sleep(2)
    with QemuCounter(uuid) as counter:
        time.sleep(0.5)
        acked = guest.disk_status().acked
        cut = time.monotonic()
        topology.set_link_up(PARTITIONED_HOST, False, "management")
        topology.set_storage_up(PARTITIONED_HOST, False)
        with contextlib.suppress(Exception):  # the last records acknowledged before the fence
            for _ in range(20):
                acked = max(acked, guest.disk_status().acked)
                time.sleep(0.1)
        guest.close()
        vm = wait_for("the VM restarted elsewhere",
                      lambda: restarted_elsewhere(center, name, PARTITIONED_HOST), 120)  # fmt: skip
        running = time.monotonic() - cut
        wait_for_guest(lab3, guest_ip(index)).close()  # the user reaches it again
        topology.set_storage_up(PARTITIONED_HOST, True)
        topology.set_link_up(PARTITIONED_HOST, True, "management")
        wait_for("the host connected again",
                 lambda: states(center)[PARTITIONED_HOST] == "connected", 60)  # fmt: skip
        wait_for("its stale registration removed",
                 lambda: not registered_on(lab3, PARTITIONED_HOST, uuid), 30)  # fmt: skip
    fenced = counter.first(0, after=cut)
    assert fenced is not None, "the old QEMU never stopped"
    twice = [round(t - cut, 2) for t, n in counter.samples if n > 1]
    assert twice == [], f"two QEMUs ran the VM at once, at {twice} s after the cut"
    restarted = counter.first(1, after=fenced)
    assert restarted is not None
    task = restart_task(center, name)
    print(f"\npartition: old QEMU fenced {fenced - cut:.1f} s after the cut, new one started "
          f"{restarted - cut:.1f} s after, the VM ran on {vm['host']} {running:.1f} s after "
          f"(restart took {task['summary']['restart_s']} s); {len(counter.samples)} samples, "
          "never two")  # fmt: skip
    assert fenced - cut < FAILURE_S, "fenced only after the lease lapsed"
    assert restarted - cut >= FAILURE_S, "restarted before the lease lapsed"
    assert task["request"]["failed_host"] == PARTITIONED_HOST
    assert task["summary"]["dest"] == vm["host"]
    [disk] = vm["config"]["disks"]
    image = Path(lab3.shared_datastore) / disk["path"]
    check = verify_records(image, acked)
    assert check.ok, check.message
    assert not registered_on(lab3, PARTITIONED_HOST, uuid)
    assert len(qemus_of(uuid)) == 1


def test_a_dead_host_s_vms_restart_elsewhere_by_priority(
    lab3: topology.LabState, center: httpx.Client, vms: dict[str, str]
) -> None:
    killed = time.monotonic()
    topology.kill_host(DEAD_HOST)
    wait_for("the host failed", lambda: states(center)[DEAD_HOST] == "failed", FAILURE_S + 30)
    failed_s = time.monotonic() - killed
    for name in ("ha-high", "ha-low"):
        wait_for(f"{name} restarted",
                 lambda n=name: restarted_elsewhere(center, n, DEAD_HOST), 120)  # type: ignore[misc]  # fmt: skip
    running_s = time.monotonic() - killed
    high, low = restart_task(center, "ha-high"), restart_task(center, "ha-low")
    assert high["id"] < low["id"], "the high-priority VM was not restarted first"
    for name in ("ha-high", "ha-low"):
        wait_for_guest(lab3, guest_ip(VMS[name][0])).close()
        assert len(qemus_of(vms[name])) == 1
    shown = kvmotion("cluster", "ha", CLUSTER)
    assert shown.returncode == 0, shown.stderr
    assert "failed" in shown.stdout and "ha-high" in shown.stdout, shown.stdout
    print(f"\nfailure: declared {failed_s:.1f} s after the kill, both VMs ran elsewhere "
          f"{running_s:.1f} s after (restarts {high['summary']['restart_s']} s, "
          f"{low['summary']['restart_s']} s)")  # fmt: skip
    # Brought back, it runs none of them, and forgets them.
    topology.lab_up(3, log=lambda _m: None)
    wait_for("the host connected again", lambda: states(center)[DEAD_HOST] == "connected", 60)
    for name in ("ha-high", "ha-low"):
        wait_for(f"{name}'s stale registration removed",
                 lambda n=name: not registered_on(lab3, DEAD_HOST, vms[n]), 30)  # type: ignore[misc]  # fmt: skip
        assert len(qemus_of(vms[name])) == 1
