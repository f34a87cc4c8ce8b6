"""The destination's take of a VM's traffic at the stun (host/switchover.py), on a real Linux
bridge in a namespace of its own: the MAC points at the VM's port, the RARP leaves on the
bridge's other ports, and the entry is an ordinary learned one, which moves with the VM and is
gone with its port (a static one stayed in the table for good once the VM left the host).

Two veth pairs stand in for the uplink and the VM's tap; no QEMU is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

MAC = "52:54:00:5e:70:01"
TAKE = """
import asyncio, sys
from kvmotion.host.switchover import take_traffic
sys.exit(0 if asyncio.run(take_traffic({"br0": [("vmtap", sys.argv[1])]})) is not None else 1)
"""
# What arrives on the uplink's far end, for a second: the RARP's source MAC and EtherType.
LISTEN = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("up-far", 0)); s.settimeout(0.2)
print("ready", flush=True)
end = time.monotonic() + 5
while time.monotonic() < end:
    try:
        frame = s.recv(2048)
    except TimeoutError:
        continue
    if frame[12:14] == b"\\x80\\x35":
        print(frame[6:12].hex(":")); break
"""


def sh(ns: str, command: str, check: bool = True) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-c", command], capture_output=True, text=True, timeout=10
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{command}: {done.stderr}")
    return done.stdout


def fdb(ns: str) -> str:
    return "\n".join(line for line in sh(ns, "bridge fdb show br br0").splitlines() if MAC in line)


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"kvm-t{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        sh(name, "ip link add br0 type bridge && ip link set br0 up")
        for port, far in (("uplink", "up-far"), ("vmtap", "vm-far")):
            sh(name, f"ip link add {port} type veth peer name {far}")
            sh(name, f"ip link set {port} master br0 && ip link set {port} up")
            sh(name, f"ip link set {far} up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


def test_the_take_points_the_mac_at_the_vm_and_announces_it(ns: str) -> None:
    listener = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        took = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", TAKE, MAC], timeout=20
        )
        assert took.returncode == 0
        heard, _ = listener.communicate(timeout=10)
    finally:
        listener.kill()
        listener.wait()
    assert heard.strip() == MAC  # the switches beyond the uplink learn the new place
    entry = fdb(ns)
    assert "dev vmtap" in entry and "static" not in entry and "permanent" not in entry

    # The VM leaves this host: its frames come back through the uplink, and the entry follows
    # them; then its port goes, and nothing of it stays.
    raw = bytes.fromhex(MAC.replace(":", ""))
    frame = b"\xff" * 6 + raw + b"\x80\x35" + bytes(46)
    send = (
        "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
        f"s.bind(('up-far', 0)); s.send({frame!r})"
    )
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", send], check=True, timeout=10)
    assert "dev uplink" in fdb(ns)
    assert "static" not in fdb(ns)  # so it ages out like any learned entry


def test_a_port_that_is_on_no_bridge_cannot_be_taken(ns: str) -> None:
    sh(ns, "ip link set vmtap nomaster")
    took = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", TAKE, MAC],
        timeout=20,
        capture_output=True,
        text=True,
    )
    assert took.returncode == 1, took.stderr
    assert fdb(ns) == ""
