"""The lab's network, for real: namespaces, bridges, routes, shaping, stand-in agents, teardown.

Each test brings a lab up in a temporary lab dir and takes it down in a fixture, pass or fail. No
guest or QEMU image is needed: agents are a stand-in HTTP server answering ``/v1/health``.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmotion.errors import LabError
from kvmotion.lab import netns, topology

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="the lab needs iproute2"),
]

STAND_IN_AGENT = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "ok"}'
        self.send_response(200 if self.path == "/v1/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer((sys.argv[1], int(sys.argv[2])), Health).serve_forever()
"""
STAND_IN_ARGV = [sys.executable, "-c", STAND_IN_AGENT, "{address}", "{port}"]


def quiet(_message: str) -> None:
    pass


def lab_exists() -> bool:
    owned = [ns for ns in netns.list_netns() if topology.is_owned_netns(ns)]
    return bool(owned) or netns.link_exists(topology.ROOT_LINK)


@pytest.fixture
def lab_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private lab dir; the lab is taken down afterwards, pass or fail, and checked gone."""
    if lab_exists():
        pytest.skip("a lab is already up on this machine; not touching it")
    directory = tmp_path / "lab"
    monkeypatch.setenv(topology.LAB_DIR_ENV, str(directory))
    monkeypatch.delenv(topology.AGENT_ARGV_ENV, raising=False)
    try:
        yield directory
    finally:
        topology.lab_down(log=quiet)
    assert_lab_gone(directory)


def assert_lab_gone(directory: Path) -> None:
    assert [ns for ns in netns.list_netns() if ns.startswith("kvm-")] == []
    assert not netns.link_exists(topology.ROOT_LINK)
    assert not directory.exists() or list(directory.iterdir()) == []
    for cidr in topology.LAB_SUBNETS:
        assert netns.has_unreachable_route(cidr, metric=topology.UNREACHABLE_METRIC), cidr


def assert_unreachable_from_root(address: str) -> None:
    """The root namespace refuses ``address`` locally: nothing is sent anywhere."""
    with pytest.raises(OSError) as caught:
        socket.create_connection((address, 9), timeout=1).close()
    assert caught.value.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH), caught.value
    assert not netns.ping(address, timeout=0.5)


def test_two_hosts_management_migration_and_vm_networks(lab_dir: Path) -> None:
    state = topology.lab_up(2, start_agents=False, log=quiet)
    assert [h.name for h in state.hosts] == ["172.16.0.172", "172.16.0.173"]
    assert set(netns.list_netns()) >= {"kvm-sw", "kvm-h172", "kvm-h173", "kvm-client"}

    # Management: the root namespace reaches every host.
    for host in state.hosts:
        assert netns.ping(host.management_address, timeout=1.0), host.name
    # Migration: host to host, never from the root namespace (nor the VM network).
    assert netns.ping("172.16.1.173", ns="kvm-h172", timeout=1.0)
    assert netns.ping("172.16.1.172", ns="kvm-h173", timeout=1.0)
    assert_unreachable_from_root("172.16.1.173")
    assert_unreachable_from_root("172.16.2.2")
    # Nothing in a host namespace routes to the VM network (its bridge has no address).
    assert not netns.ping("172.16.2.2", ns="kvm-h172", timeout=0.5)

    # VM network: the client reaches a listener on kvm-h173's VM bridge across the switch.
    netns.replace_address("vmnet", "172.16.2.3/24", "kvm-h173")
    try:
        with netns.socket_in_netns("kvm-h173") as listener:
            listener.bind(("172.16.2.3", 0))
            listener.listen(1)
            listener.settimeout(5)
            port = listener.getsockname()[1]
            with netns.connect_in_netns("kvm-client", "172.16.2.3", port, timeout=5) as client:
                conn, peer = listener.accept()
                with conn:
                    client.sendall(b"hello from the user")
                    conn.settimeout(5)
                    assert conn.recv(100) == b"hello from the user"
                    assert peer[0] == "172.16.2.2"
    finally:
        netns.delete_address("vmnet", "172.16.2.3/24", "kvm-h173")

    # IPv6 is off everywhere in the lab: no link-local addresses, nothing solicited.
    for ns in topology.plan_netns(2):
        assert netns.ip("-6", "address", "show", ns=ns).stdout.strip() == "", ns
    assert netns.ip("-6", "address", "show", "dev", topology.ROOT_LINK).stdout.strip() == ""

    status = topology.lab_status()
    assert status is not None and status.ok, status and status.problems
    all_up = dict.fromkeys(["mgmt0", "vmotion0", "vmnet", "vmnet-up"], True)
    assert [h.links_up for h in status.hosts] == [all_up, all_up]


def test_lab_up_again_is_idempotent_and_repairs(lab_dir: Path) -> None:
    first = topology.lab_up(2, start_agents=False, log=quiet)
    messages: list[str] = []
    second = topology.lab_up(2, start_agents=False, log=messages.append)
    assert second == first
    assert not [m for m in messages if m.startswith("created")], messages

    # Break it: a host loses its migration link, the root loses its veth.
    netns.delete_link("vmotion0", "kvm-h173")
    netns.delete_link(topology.ROOT_LINK)
    status = topology.lab_status()
    assert status is not None and not status.ok
    assert any("vmotion0" in p for p in status.problems), status.problems
    repaired = topology.lab_up(2, start_agents=False, log=quiet)
    assert repaired.token == first.token
    assert netns.ping("172.16.1.173", ns="kvm-h172", timeout=1.0)
    assert netns.ping("172.16.0.173", timeout=1.0)
    status = topology.lab_status()
    assert status is not None and status.ok, status.problems

    # Another process finds the lab through the state file.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kvmotion.lab import topology as t; "
            "print(len(t.load_state().hosts), t.lab_status().ok)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.split() == ["2", "True"]


def test_stand_in_agents_are_started_watched_and_restarted(lab_dir: Path) -> None:
    # The stand-in serves plain HTTP: the lab asked for it (its default is HTTPS).
    state = topology.lab_up(2, agent_argv=STAND_IN_ARGV, api_plaintext=True, log=quiet)
    assert all(h.agent_url.startswith("http://") for h in state.hosts), state.hosts
    pids = [h.agent_pid for h in state.hosts]
    assert all(pid is not None and netns.pid_alive(pid) for pid in pids)
    assert all(topology.agent_healthy(h) for h in state.hosts)
    status = topology.lab_status()
    assert status is not None and status.ok, status.problems
    assert [(h.agent_alive, h.agent_healthy) for h in status.hosts] == [(True, True)] * 2
    assert (state.hosts[0].host_dir / "agent.log").exists()

    # A dead agent is reported, and the next `lab up` (same command, from the state) restarts it.
    dead = state.hosts[1]
    assert dead.agent_pid is not None
    os.kill(dead.agent_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while netns.pid_alive(dead.agent_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    status = topology.lab_status()
    assert status is not None and any("not running" in p for p in status.problems)
    again = topology.lab_up(2, log=quiet)  # as the lab had it: plaintext
    assert again.hosts[0].agent_pid == pids[0] and again.api_plaintext
    assert again.hosts[1].agent_pid not in (None, pids[1])
    assert all(topology.agent_healthy(h) for h in again.hosts)

    topology.lab_down(log=quiet)
    assert not any(netns.pid_alive(h.agent_pid) for h in again.hosts if h.agent_pid)


def test_agent_that_dies_at_start_is_reported(lab_dir: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('agent broke'); sys.exit(3)"]
    with pytest.raises(LabError, match="agent broke"):
        topology.lab_up(2, agent_argv=argv, log=quiet)


def test_shaping_the_migration_link(lab_dir: Path) -> None:
    topology.lab_up(2, start_agents=False, log=quiet)
    unshaped = netns.measure_throughput("kvm-h172", "kvm-h173", "172.16.1.173", seconds=0.5)
    topology.shape_link("172.16.0.172", 100.0)
    assert netns.rate_mbit("vmotion0", "kvm-h172") == pytest.approx(100.0)
    assert netns.rate_mbit("h172-vmo", "kvm-sw") == pytest.approx(100.0)
    out = netns.measure_throughput("kvm-h172", "kvm-h173", "172.16.1.173", seconds=1.0)
    back = netns.measure_throughput("kvm-h173", "kvm-h172", "172.16.1.172", seconds=1.0)
    assert 70 <= out <= 130, out
    assert 70 <= back <= 130, back
    assert unshaped > 300, unshaped
    state = topology.load_state()
    assert state is not None and state.hosts[0].migration_rate_mbit == 100.0
    status = topology.lab_status()
    assert status is not None and status.hosts[0].migration_rate_mbit == pytest.approx(100.0)

    topology.shape_link(0, None)
    assert netns.rate_mbit("vmotion0", "kvm-h172") is None
    assert netns.rate_mbit("h172-vmo", "kvm-sw") is None
    state = topology.load_state()
    assert state is not None and state.hosts[0].migration_rate_mbit is None
    with pytest.raises(LabError, match="not up"):
        topology.shape_link(5, 10.0)


def test_three_hosts_and_growing(lab_dir: Path) -> None:
    topology.lab_up(2, start_agents=False, log=quiet)
    state = topology.lab_up(3, start_agents=False, log=quiet)
    assert [h.name for h in state.hosts][-1] == "172.16.0.174"
    assert netns.ping("172.16.0.174", timeout=1.0)
    assert netns.ping("172.16.1.174", ns="kvm-h172", timeout=1.0)
    assert netns.ping("172.16.1.172", ns="kvm-h174", timeout=1.0)
    assert (lab_dir / "datastores" / "local-174").is_dir()
    assert (lab_dir / "hosts" / "kvm-h174" / "host.json").is_file()
    # Asking for fewer keeps them all.
    assert len(topology.lab_up(2, start_agents=False, log=quiet).hosts) == 3
    status = topology.lab_status()
    assert status is not None and status.ok and len(status.hosts) == 3, status


def test_lab_down_cleans_up_without_state_and_spares_recycled_pids(lab_dir: Path) -> None:
    state = topology.lab_up(2, agent_argv=STAND_IN_ARGV, api_plaintext=True, log=quiet)
    agents = [h.agent_pid for h in state.hosts if h.agent_pid is not None]
    qemu = shutil.which("qemu-system-x86_64")
    vms = state.hosts[0].run_dir / "vms"
    # A pidfile naming a process that is not QEMU (a recycled pid) must not be killed.
    bystander = subprocess.Popen(["sleep", "60"])
    (vms / "ghost").mkdir(parents=True)
    (vms / "ghost" / "qemu.pid").write_text(f"{bystander.pid}\n")
    qemu_pid = None
    if qemu is not None:
        (vms / "vm-a").mkdir()
        pidfile = vms / "vm-a" / "qemu.pid"
        argv = [qemu, "-machine", "none", "-display", "none", "-S", "-pidfile", str(pidfile)]
        qemu_pid = netns.popen_in_netns("kvm-h172", argv, vms / "vm-a" / "qemu.log")
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pidfile.exists()
    try:
        (lab_dir / "state.json").unlink()
        topology.lab_down(log=quiet)
        assert_lab_gone(lab_dir)
        assert not any(netns.pid_alive(pid) for pid in agents)
        assert qemu_pid is None or not netns.pid_alive(qemu_pid)
        assert bystander.poll() is None
        # Nothing up: a no-op success.
        messages: list[str] = []
        topology.lab_down(log=messages.append)
        assert messages == ["lab down: nothing was up"]
        assert topology.lab_status() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_in_namespace_helpers_fail_clearly() -> None:
    if lab_exists():
        pytest.skip("a lab is already up on this machine")
    with pytest.raises(LabError, match="kvm-nowhere"):
        netns.socket_in_netns("kvm-nowhere")
    with pytest.raises(LabError, match="kvm-nowhere"):
        netns.run_in_netns("kvm-nowhere", ["true"])
    with pytest.raises(LabError, match="exited"):
        netns.ip("link", "show", "dev", "kvm-no-such-link")
