"""The demo of the seed's lab, and the helpers it shares with the lab tests.

For now: the lab comes up, a VM boots on each of the seed's hosts (172.16.0.172 and .173) from the
shared datastore, and the user (the client namespace) reaches guestd in both over the VM network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from kvmotion.errors import ExecutionError, LabError
from kvmotion.host.client import AgentClient
from kvmotion.lab import image as image_mod
from kvmotion.lab import netns, topology
from kvmotion.lab.guestclient import GuestClient

GUEST_PORT = 7000
Log = Callable[[str], None]


def guest_ip(index: int) -> str:
    """Lab guests live on the VM network 172.16.2.0/24 from .10 up."""
    return f"172.16.2.{10 + index}"


def ensure_image(log: Log) -> image_mod.GuestImage:
    """Build (or find cached) the guest image and install it where lab hosts boot it from."""
    image = image_mod.build_image(log=log)
    image_mod.install_image(image, topology.lab_dir() / "images")
    return image


def vm_spec(
    name: str, index: int, *, datastore: str = "shared", memory_mib: int = 256
) -> dict[str, Any]:
    return {
        "name": name,
        "datastore": datastore,
        "memory_mib": memory_mib,
        "disks": [{"size_mib": 64}],
        "nics": [{"network": "vm-network"}],
        "kernel_args": f"kvmotion.ip={guest_ip(index)}/24",
    }


def wait_for_guest(state: topology.LabState, ip: str, timeout: float = 90.0) -> GuestClient:
    """Connect to guestd at ``ip`` from the client namespace, retrying until ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            sock = netns.connect_in_netns(state.client_netns, ip, GUEST_PORT, timeout=2.0)
            client = GuestClient(sock)
            client.ping()
            return client
        except (OSError, LabError) as exc:
            last = exc
            time.sleep(0.5)
    raise ExecutionError(
        f"guest {ip} did not answer on port {GUEST_PORT} in {timeout:.0f} s: {last}"
    )


async def run_demo(log: Log) -> None:
    ensure_image(log)
    state = topology.lab_up(2, log=log)
    log("lab is up: hosts " + ", ".join(h.name for h in state.hosts))
    started = []
    for index, host in enumerate(state.hosts[:2]):
        name = f"vm-{'ab'[index]}"
        async with AgentClient(host.agent_url, state.token) as agent:
            existing = {vm["name"]: vm for vm in await agent.list_vms()}
            if name not in existing:
                await agent.create_vm(vm_spec(name, index))
                log(f"created {name} on {host.name} (datastore shared)")
            vm = await agent.get_vm(name)
            if vm["power_state"] != "poweredOn":
                t0 = time.monotonic()
                vm = await agent.power_on(name)
                log(
                    f"powered on {name} on {host.name}: QEMU pid {vm['pid']} "
                    f"({time.monotonic() - t0:.1f} s)"
                )
            facts = await agent.facts()
            log(f"{host.name}: accelerator {facts['accel']} ({facts['accel_reason']})")
        started.append((name, host.name, guest_ip(index)))
    for name, host_name, ip in started:
        t0 = time.monotonic()
        client = await asyncio.to_thread(wait_for_guest, state, ip)
        reply = client.ping()
        info = client.info()
        client.close()
        log(
            f"client {state.client_address} -> {name} on {host_name} at {ip}: "
            f"answered (n={reply.n}, guest uptime {info.uptime_s:.0f} s) "
            f"after {time.monotonic() - t0:.1f} s"
        )
    log("demo done: two VMs run on 172.16.0.172 and 172.16.0.173 and the client reaches both")
    log("tear it down with `kvmotion lab down`")
