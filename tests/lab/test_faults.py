"""The fault matrix, for real: in each phase of a migration one part of the system is killed (or
its link cut), then brought back. Whatever died, afterwards:

- the VM runs on exactly one host (one QEMU in the whole lab), the same guest (its counter goes
  on), and the center's inventory says the same host;
- every record the guest saw acknowledged is on its disk;
- no QEMU, tap or registration of the VM is left on the other host;
- the task has a final state and a reason.

Phases: precheck (the fault comes first, then the request), prepare, pre-copy, pre-switchover,
switchover and finalize. To hit the short phases exactly, the lab's agents and center run with
``KVMOTION_FAULT_DIR`` (kvmotion/faults.py): the cell arms a hold at its phase's step, waits until
a process holds there, and strikes. The table of results goes to artifacts/fault-matrix.md (and,
from a run, docs/faults.md).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion import faults
from kvmotion.errors import LabError
from kvmotion.lab import labcenter, netns, topology
from kvmotion.lab.demo import GUEST_PORT, guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.guestclient import GuestClient
from kvmotion.lab.records import verify_records
from tests.lab.conftest import ARTIFACTS, _lab, center_http, qemu_pids_under

pytestmark = pytest.mark.lab

VM, INDEX = "vm-f", 2
LINK_MBIT = 100  # pre-copy of the 256 MiB guest takes about 10 s: time to fail in it
HOLD_S = 6.0  # a held step waits this long: the fault strikes inside it
FAULT_S = 2.0  # a fault lasts this long before the operator repairs it
SETTLE_S = 120.0
PHASES = ("precheck", "prepare", "pre-copy", "pre-switchover", "switchover", "finalize")
STEP = {"prepare": "prepare", "pre-switchover": "pre-switchover", "switchover": "resume",
        "finalize": "finalize"}  # fmt: skip
# Cells that are not migration faults: before the precheck no destination QEMU exists; after the
# switchover the destination's QEMU *is* the VM, and killing it is a crash (HA's business).
NOT_APPLICABLE = {
    ("precheck", "kill -9 destination QEMU"),
    ("finalize", "kill -9 destination QEMU"),
}
RESULTS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Agents and center started by this module may be held at a step (kvmotion/faults.py)."""
    directory = tmp_path_factory.mktemp("fault-holds")
    before = os.environ.get(faults.DIR_ENV)
    os.environ[faults.DIR_ENV] = str(directory)
    yield directory
    if before is None:
        del os.environ[faults.DIR_ENV]
    else:
        os.environ[faults.DIR_ENV] = before


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, hold_dir: Path) -> Iterator[topology.LabState]:
    yield from _lab(request)


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


@pytest.fixture(scope="module")
def guest(lab: topology.LabState, center: httpx.Client) -> Iterator[GuestClient]:
    """One VM for the whole matrix: each cell must leave it running (that is the point), and
    the next cell starts from wherever it runs."""
    spec = vm_spec(VM, INDEX, memory_mib=256)
    r = center.post("/v1/vms", json={"host": lab.hosts[0].name, "spec": spec})
    assert r.status_code == 201, r.text
    assert center.post(f"/v1/vms/{VM}/power-on").status_code == 200
    client = wait_for_guest(lab, guest_ip(INDEX))
    client.disk_start(20)  # a flushed record every 20 ms, all through the matrix
    yield client
    client.close()
    center.post(f"/v1/vms/{VM}/power-off")
    center.delete(f"/v1/vms/{VM}")
    write_table()


def all_qemus(lab: topology.LabState, uuid: str) -> list[tuple[int, int]]:
    """(host index, pid) of every QEMU of this VM in the lab."""
    found = []
    for i, host in enumerate(lab.hosts):
        host_dir = topology.lab_dir() / "hosts" / host.netns
        for pid in qemu_pids_under(host_dir):
            if uuid in " ".join(netns.process_cmdline(pid)):
                found.append((i, pid))
    return found


def leftovers(lab: topology.LabState, uuid: str, runs_on: int) -> list[str]:
    """What of the VM is left on the host that does not run it: taps, its registration."""
    other = lab.hosts[1 - runs_on]
    found = [f"registration {p}" for p in (other.run_dir / "vms").glob(f"{uuid}*")]
    out = netns.ip("-o", "link", "show", ns=other.netns).stdout
    found += [f"tap {line.split(':')[1].strip()}" for line in out.splitlines()
              if f"kt{uuid.replace('-', '')[:8]}" in line]  # fmt: skip
    return found


def kill_agent(index: int) -> None:
    state = topology.load_state()
    assert state is not None
    pid = state.hosts[index].agent_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


def kill_center() -> None:
    lc = labcenter.load_center()
    assert lc is not None
    os.kill(lc.pid, signal.SIGKILL)


def kill_dest_qemu(lab: topology.LabState, dest: int, uuid: str) -> None:
    [pid] = [pid for i, pid in all_qemus(lab, uuid) if i == dest]
    os.kill(pid, signal.SIGKILL)


def restore(lab: topology.LabState) -> None:
    """Bring back whatever was killed or cut: agents (lab up repairs), the center, the links."""
    for host in lab.hosts:
        topology.set_link_up(host.name, True)
        topology.set_link_up(host.name, True, "management")
    topology.lab_up(2, log=lambda _m: None)
    labcenter.ensure_center(lab, lambda _m: None)


# fault name -> what to do, given (lab, source index, destination index, VM uuid)
FAULTS: dict[str, Callable[[topology.LabState, int, int, str], None]] = {
    "kill -9 source agent": lambda lab, s, d, u: kill_agent(s),
    "kill -9 destination agent": lambda lab, s, d, u: kill_agent(d),
    "kill -9 center": lambda lab, s, d, u: kill_center(),
    "kill -9 destination QEMU": lambda lab, s, d, u: kill_dest_qemu(lab, d, u),
    "migration link cut": lambda lab, s, d, u: topology.set_link_up(lab.hosts[d].name, False),
    "management link cut": lambda lab, s, d, u: topology.set_link_up(
        lab.hosts[d].name, False, "management"
    ),
}
CELLS = [(p, f) for p in PHASES for f in FAULTS if (p, f) not in NOT_APPLICABLE]


def wait_active(center: httpx.Client, task_id: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        task = center.get(f"/v1/tasks/{task_id}").json()
        transferred = (task.get("summary") or {}).get("transferred_bytes") or 0
        if task["phase"] == "active" and transferred > 16 * 2**20:
            return
        assert task["state"] in ("queued", "running"), task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never got into pre-copy")


def wait_holding(hold_dir: Path, step: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if faults.holding(hold_dir, step):
            return
        time.sleep(0.02)
    raise AssertionError(f"no process held at {step} within {timeout:.0f} s")


def settled(lab: topology.LabState, center: httpx.Client, uuid: str, task_id: int | None) -> Any:
    """The task is final and exactly one host runs the VM, as the inventory says; or None."""
    try:
        task = center.get(f"/v1/tasks/{task_id}").json() if task_id is not None else None
        vm = center.get(f"/v1/vms/{VM}").json()
    except httpx.HTTPError:
        return None  # the center is coming back
    if task is not None and task["state"] not in ("success", "error", "cancelled"):
        return None
    qemus = all_qemus(lab, uuid)
    if len(qemus) != 1 or vm["power_state"] != "poweredOn":
        return None
    [(index, _)] = qemus
    if vm["host"] != lab.hosts[index].name or leftovers(lab, uuid, index):
        return None
    if not guest_runs(lab):  # a QEMU, but a stunned guest, is not a running VM
        return None
    return task, index


def guest_runs(lab: topology.LabState) -> bool:
    """guestd answers a new connection within 2 s."""
    try:
        sock = netns.connect_in_netns(lab.client_netns, guest_ip(INDEX), GUEST_PORT, timeout=2)
    except OSError:
        return False
    with GuestClient(sock, timeout=2.0) as client:
        try:
            client.ping()
        except LabError:
            return False
    return True


def strike(
    lab: topology.LabState,
    center: httpx.Client,
    hold_dir: Path,
    phase: str,
    fault: str,
    source: int,
    dest: int,
    uuid: str,
) -> int | None:
    """Start a migration and fault it in ``phase``; the task id (None if it was refused)."""
    body = {"host": lab.hosts[dest].name}
    if phase == "precheck":
        FAULTS[fault](lab, source, dest, uuid)
        try:
            r = center.post(f"/v1/vms/{VM}/migrate", json=body, timeout=30)
        except httpx.HTTPError:
            return None  # the center itself is down: nothing was asked
        assert r.status_code in (202, 404, 409, 502, 503, 504), r.text
        return int(r.json()["id"]) if r.status_code == 202 else None
    if phase in STEP:
        faults.arm(hold_dir, STEP[phase], HOLD_S)
    else:
        topology.shape_link(lab.hosts[source].name, LINK_MBIT)
    r = center.post(f"/v1/vms/{VM}/migrate", json=body)
    assert r.status_code == 202, r.text
    task_id = int(r.json()["id"])
    if phase in STEP:
        wait_holding(hold_dir, STEP[phase])
    else:
        wait_active(center, task_id)
    FAULTS[fault](lab, source, dest, uuid)
    return task_id


@pytest.mark.parametrize(("phase", "fault"), CELLS, ids=[f"{p}|{f}" for p, f in CELLS])
def test_fault_leaves_one_running_vm(
    lab: topology.LabState, center: httpx.Client, guest: GuestClient, hold_dir: Path,
    phase: str, fault: str,
) -> None:  # fmt: skip
    vm = center.get(f"/v1/vms/{VM}").json()
    uuid = vm["uuid"]
    source = next(i for i, h in enumerate(lab.hosts) if h.name == vm["host"])
    dest = 1 - source
    counter = guest.ping().n
    RESULTS[(phase, fault)] = "FAILED"
    task_id = None
    try:
        task_id = strike(lab, center, hold_dir, phase, fault, source, dest, uuid)
        time.sleep(FAULT_S)
        restore(lab)
        end = time.monotonic() + SETTLE_S
        result = None
        while result is None and time.monotonic() < end:
            result = settled(lab, center, uuid, task_id)
            time.sleep(0.5)
    finally:
        topology.shape_link(lab.hosts[source].name, None)
        restore(lab)
        for leftover in hold_dir.iterdir():  # a killed process leaves its marker
            leftover.unlink()
    assert result is not None, (
        f"after {fault} in {phase}: no single running copy within {SETTLE_S:.0f} s; QEMUs "
        f"{all_qemus(lab, uuid)}, VM {center.get(f'/v1/vms/{VM}').json()}, "
        f"task {center.get(f'/v1/tasks/{task_id}').json() if task_id else None}"
    )
    task, runs_on = result
    if task is not None:
        assert_outcome_names_the_fault(task, fault, moved=runs_on == dest)
    # The same guest goes on (a live move or none, never a reboot), wherever it runs now.
    assert guest.ping().n > counter
    acked = guest.disk_status().acked
    [disk] = center.get(f"/v1/vms/{VM}").json()["config"]["disks"]
    check = verify_records(lab.shared_datastore / disk["path"], acked)
    assert check.ok, check.message
    moved = "moved" if runs_on == dest else "stayed"
    how = "refused" if task is None else f"{task['state']} ({task.get('error_code') or 'ok'})"
    RESULTS[(phase, fault)] = f"{how}; VM {moved}, {acked} records kept"


# What a failed task may say for each fault: the fault itself, as the center saw it.
FAULT_CODES = {
    "kill -9 source agent": {"host_unreachable", "migration_lost", "source_cleanup_failed"},
    "kill -9 destination agent": {"host_unreachable", "resume_timeout"},
    "kill -9 center": {"center_restarted"},
    "kill -9 destination QEMU": {"migration_failed", "destination_failed", "resume_failed",
                                 "resume_timeout"},
    "migration link cut": {"migration_stalled", "migration_failed", "destination_failed"},
    "management link cut": {"host_unreachable", "resume_timeout"},
}  # fmt: skip
# The center may lose sight of a migration that the agents finish: the VM moved, the task failed.
LOST_SIGHT = {"host_unreachable", "center_restarted", "migration_lost", "source_cleanup_failed"}


def assert_outcome_names_the_fault(task: dict[str, Any], fault: str, moved: bool) -> None:
    """A task that succeeded moved the VM; one that failed says why, naming this fault."""
    if task["state"] == "success":
        assert moved and not task["error"], task
        return
    assert task["state"] == "error", task  # nobody cancels in the matrix
    assert task["error"] and task["error_code"] in FAULT_CODES[fault], (fault, task)
    assert not moved or task["error_code"] in LOST_SIGHT, (fault, task)


def write_table() -> None:
    """The matrix as markdown, for docs/faults.md."""
    rows = ["| phase | " + " | ".join(FAULTS) + " |", "|---" * (len(FAULTS) + 1) + "|"]
    for phase in PHASES:
        cells = [
            "n/a" if (phase, f) in NOT_APPLICABLE else RESULTS.get((phase, f), "not run")
            for f in FAULTS
        ]
        rows.append(f"| {phase} | " + " | ".join(cells) + " |")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fault-matrix.md").write_text("\n".join(rows) + "\n")
    (ARTIFACTS / "fault-matrix.json").write_text(
        json.dumps({f"{p}|{f}": r for (p, f), r in RESULTS.items()}, indent=1) + "\n"
    )
