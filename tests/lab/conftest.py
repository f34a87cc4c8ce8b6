"""Lab fixtures: real namespaces, QEMU and guests. Everything made is removed, pass or fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion.lab import labcenter, netns, topology
from kvmotion.lab.demo import GUEST_PORT, ensure_image, guest_ip
from kvmotion.lab.guestclient import PingLoop, PingSummary

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def lab_possible() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run ./run setup)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = lab_possible()
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def qemu_pids_under(path: Path) -> list[int]:
    """Live QEMU processes whose command line mentions ``path`` (the lab's directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(str(path).encode() in a for a in argv):
            found.append(int(proc.name))
    return found


def save_logs(state: topology.LabState, name: str) -> None:
    """Keep agent logs and guest consoles for a human to read after a failure."""
    dest = ARTIFACTS / "lab-logs" / name
    for host in state.hosts:
        hdir = host.run_dir.parent
        for log in [*hdir.glob("*.log"), *host.run_dir.glob("vms/*/console.log")]:
            target = dest / host.name / log.relative_to(hdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, target)


def secrets_in_logs(state: topology.LabState) -> list[str]:
    """Logs of the agents and the center that hold a token (the agents' or the center's)."""
    center = labcenter.load_center()
    tokens = [state.token] + ([center.token] if center is not None else [])
    logs = [*(h.agent_log for h in state.hosts), labcenter.center_dir() / "center.log"]
    found = []
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        found += [str(log) for token in tokens if token in text]
    return found


def assert_lab_gone(lab_dir: Path) -> None:
    leftovers = [ns for ns in netns.list_netns() if ns.startswith("kvm-")]
    assert leftovers == [], f"namespaces left behind: {leftovers}"
    assert not netns.link_exists("kvm-mgmt0"), "root veth kvm-mgmt0 left behind"
    assert qemu_pids_under(lab_dir) == [], "QEMU processes left behind"
    assert not (lab_dir / "state.json").exists(), "lab state left behind"
    assert not (lab_dir / "datastores").exists(), "lab datastores left behind"


def _lab(
    request: pytest.FixtureRequest,
    cpus: dict[int | str, str | None] | None = None,
    qemus: dict[int | str, str | None] | None = None,
    hosts: int = 2,
) -> Iterator[topology.LabState]:
    lab_dir = topology.lab_dir()
    # The suite owns the machine's lab: a lab left up (a demo, an earlier run) goes first.
    labcenter.stop_center(lambda _msg: None)
    topology.lab_down(log=lambda _msg: None)
    ensure_image(lambda _msg: None)
    try:
        state = topology.lab_up(hosts, cpus=cpus, qemus=qemus, log=lambda _msg: None)
        yield state
    finally:
        current = topology.load_state()
        leaked = []
        if current is not None:
            save_logs(current, request.module.__name__.rsplit(".", 1)[-1])
            leaked = secrets_in_logs(current)
        labcenter.stop_center(lambda _msg: None)
        topology.lab_down(log=lambda _msg: None)
    assert_lab_gone(lab_dir)
    assert leaked == [], f"secrets written to logs: {leaked}"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[topology.LabState]:
    """A two-host lab with agents, for one test module; torn down and checked after it."""
    yield from _lab(request)


@pytest.fixture(scope="module")
def lab3(request: pytest.FixtureRequest) -> Iterator[topology.LabState]:
    """A three-host lab (172.16.0.172-174): one host's VMs have two others to go to."""
    yield from _lab(request, hosts=3)


@pytest.fixture(scope="module")
def mixed_lab(request: pytest.FixtureRequest) -> Iterator[topology.LabState]:
    """The seed's mixed cluster: .172 an older CPU (Merom), .173 a newer one (Nehalem)."""
    yield from _lab(request, {0: "intel-merom", 1: "intel-nehalem"})


def center_http(state: topology.LabState) -> Iterator[httpx.Client]:
    """The lab's center (started if needed) as an HTTP client, as a user's script would use it."""
    c = labcenter.ensure_center(state, lambda _m: None)
    headers = {"Authorization": f"Bearer {c.token}"}
    verify = c.tls() or True  # the lab's CA signed its certificate
    with httpx.Client(
        base_url=c.url, headers=headers, trust_env=False, timeout=60, verify=verify
    ) as http:
        yield http


def wait_task(center: httpx.Client, task_id: int, deadline: float = 120.0) -> dict[str, Any]:
    """Poll a task until it ends (bounded)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        task: dict[str, Any] = center.get(f"/v1/tasks/{task_id}").json()
        if task["state"] in ("success", "error", "cancelled"):
            return task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not end in {deadline:.0f} s")


def user_ping_loop(state: topology.LabState, index: int = 0) -> PingLoop:
    """The user: a PING every 10 ms to the guest at ``guest_ip(index)``, on one TCP connection."""
    sock = netns.connect_in_netns(state.client_netns, guest_ip(index), GUEST_PORT, timeout=5.0)
    return PingLoop(sock, interval=0.01, max_duration=300, owns_socket=True).start()


def assert_user_noticed_nothing(summary: PingSummary) -> None:
    assert summary.same_connection, f"the user's connection dropped: {summary.error}"
    assert summary.lost == 0, f"{summary.lost} requests lost"
    assert summary.n_monotonic, "guestd restarted: the VM did not keep running"
    assert summary.max_gap_ms < 1000, f"longest gap {summary.max_gap_ms:.0f} ms"
    assert summary.answered == summary.sent >= 50


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SSH key pair a test's user logs into its guests with (``key``, ``key.pub``)."""
    path = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path
