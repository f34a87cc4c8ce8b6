"""The lab's DHCP server on the VM network, as a datacenter has one: dnsmasq from Debian.

It runs in the switch namespace, on the VM bridge, at :data:`SERVER_ADDRESS`, and hands out
:data:`RANGE` with no router and no DNS server (the lab reaches nothing outside). VMs booted from
an OS image take their address from it; the lab's test guest keeps its static address (from .10
up, below the range). The lease file is where each host's agent reads a VM's address when the
guest runs no guest agent (``NetworkConfig.dhcp_leases``).

Started by ``lab up`` (idempotent: a running server is kept), ended by ``lab down`` by its pid.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from kvmotion.errors import LabError
from kvmotion.lab import netns

SERVER_ADDRESS = "172.16.2.1"
RANGE = ("172.16.2.100", "172.16.2.250")
LEASE_TIME = "12h"
DNSMASQ = "dnsmasq"

Log = Callable[[str], None]


def dhcp_dir(lab_dir: Path) -> Path:
    return lab_dir / "dhcp"


def lease_file(lab_dir: Path) -> Path:
    return dhcp_dir(lab_dir) / "leases"


def dnsmasq_argv(lab_dir: Path, interface: str) -> list[str]:
    """dnsmasq as the VM network's DHCP server only: no DNS (port 0), no config files, no
    router or DNS options offered, leases in the lab's directory."""
    return [
        DNSMASQ,
        "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--port=0", f"--interface={interface}", "--bind-interfaces", "--except-interface=lo",
        f"--dhcp-range={RANGE[0]},{RANGE[1]},255.255.255.0,{LEASE_TIME}",
        "--dhcp-option=option:router", "--dhcp-option=option:dns-server",
        "--dhcp-authoritative", f"--dhcp-leasefile={lease_file(lab_dir)}",
        "--user=root", "--group=root", "--log-dhcp", "--log-facility=-",
    ]  # fmt: skip


def _pidfile(lab_dir: Path) -> Path:
    return dhcp_dir(lab_dir) / "dnsmasq.pid"


def running_pid(lab_dir: Path) -> int | None:
    """The lab's dnsmasq, if it runs (its pid checked against its start time)."""
    try:
        pid, ticks = (int(w) for w in _pidfile(lab_dir).read_text().split())
    except (OSError, ValueError):
        return None
    if netns.pid_alive(pid) and netns.process_start_ticks(pid) == ticks:
        return pid
    return None


def start(lab_dir: Path, ns: str, interface: str, cidr_prefix: int, log: Log) -> int:
    """Give ``interface`` in ``ns`` the server's address and start dnsmasq there, unless it
    runs already. Returns its pid. Raises LabError without dnsmasq or if it will not start."""
    if shutil.which(DNSMASQ) is None:
        raise LabError(
            "dnsmasq is not installed: install Debian's dnsmasq-base (./run setup does); "
            "the lab's VM network needs it to give VMs their addresses"
        )
    netns.replace_address(interface, f"{SERVER_ADDRESS}/{cidr_prefix}", ns)
    pid = running_pid(lab_dir)
    if pid is not None:
        return pid
    directory = dhcp_dir(lab_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lease_file(lab_dir).touch()
    pid = netns.popen_in_netns(ns, dnsmasq_argv(lab_dir, interface), directory / "dnsmasq.log")
    ticks = netns.process_start_ticks(pid)
    if ticks is None:
        raise LabError(f"dnsmasq exited at once: see {directory / 'dnsmasq.log'}")
    _pidfile(lab_dir).write_text(f"{pid} {ticks}\n")
    log(f"started the VM network's DHCP server at {SERVER_ADDRESS} (dnsmasq pid {pid})")
    return pid


def stop(lab_dir: Path, log: Log) -> bool:
    """End the lab's dnsmasq by its pid. Returns whether one ran."""
    pid = running_pid(lab_dir)
    if pid is None:
        return False
    if not netns.terminate(pid, grace=5.0):
        raise LabError(f"dnsmasq pid {pid} survived SIGKILL")
    log(f"stopped the VM network's DHCP server (pid {pid})")
    return True
