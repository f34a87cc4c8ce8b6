"""The demo of the seed's lab, and the helpers it shares with the lab tests.

The seed's procedure, for real: the user (the client namespace) holds one TCP connection to vm-a
on 172.16.0.172 and sends a request every 10 ms; vm-a is moved to 172.16.0.173 and back while it
dirties memory; the demo prints each migration's five steps and the user's view of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from kvmotion.center.client import CenterClient
from kvmotion.errors import ExecutionError, LabError
from kvmotion.lab import image as image_mod
from kvmotion.lab import labcenter, netns, topology
from kvmotion.lab.guestclient import GuestClient, PingLoop
from kvmotion.lab.icmp import IcmpProbe, longest_gap_ms

GUEST_PORT = 7000
# The user's VM keeps busy while it moves: MiB/s dirtied over a working set of MiB. Moderate on
# purpose: under TCG, QEMU 7.2 loses writes of guests that dirty much faster (docs/vmotion.md).
WORKLOAD = (4, 16)
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


STEP_TEXT = {
    "requested": "1. vMotion requested; the user is connected to {vm} on {src}",
    "prepared": "   {dst} is ready to receive, on its migration address",
    "precopy": "2. memory pre-copy to {dst} started; dirty pages re-sent pass by pass",
    "stunned": "3. {vm} stunned on {src}; last dirty pages and device state sent",
    "resumed": "4. {vm} resumed on {dst} and announced; the user is now connected there",
    "source_removed": "5. {vm} removed from {src}",
    "traffic_taken": "   {dst} took {vm}'s traffic: the user's frames wait there for the resume",
    "mac_learned": "   the VM network learned {vm} on {dst} (its bridge saw it)",
}


def describe_task(task: dict[str, Any], log: Log) -> None:
    """The seed's five steps with their times, then the numbers."""
    req = task["request"]
    names = {"vm": req["vm"], "src": req["source"], "dst": req["dest"]}
    t0 = float(task["timeline"][0]["time"])
    for entry in task["timeline"]:
        text = STEP_TEXT.get(entry["step"], entry["step"]).format(**names)
        log(f"  +{(float(entry['time']) - t0) * 1000:7.0f} ms  {text}")
    s = task["summary"]
    log(
        f"  QEMU downtime {s.get('downtime_ms')} ms, {s.get('passes')} passes, "
        f"{(s.get('transferred_bytes') or 0) / 2**20:.0f} MiB sent in {s.get('total_time_ms')} ms; "
        f"task {s.get('task_time_ms')} ms"
    )


def user_view(task: dict[str, Any], tcp_replies: list[int], icmp: IcmpProbe, since: int) -> str:
    """What the user saw of one migration (from ``since``), beside what QEMU and the agents say."""
    s, now = task["summary"], time.monotonic_ns()
    tcp = longest_gap_ms(tcp_replies, since, now)
    return (
        f"  the user's view: longest gap {tcp:.0f} ms between TCP answers (every 10 ms), "
        f"{icmp.longest_gap_ms(since, now):.0f} ms between ICMP echoes; "
        f"the guest was stopped {s.get('stun_to_resume_ms')} ms (stunned -> resumed; QEMU's "
        f"downtime {s.get('downtime_ms')} ms, its setup {s.get('setup_time_ms')} ms)"
    )


async def _migrate(center: CenterClient, vm: str, dest: str, log: Log) -> dict[str, Any]:
    task = await center.migrate(vm, dest, downtime_ms=100)
    deadline = time.monotonic() + 300
    while task["state"] not in ("success", "error", "cancelled"):
        if time.monotonic() > deadline:
            raise ExecutionError(f"migration task {task['id']} did not end in 300 s")
        await asyncio.sleep(0.1)
        task = await center.task(task["id"])
    if task["state"] != "success":
        raise ExecutionError(f"migration of {vm} to {dest} {task['state']}: {task['error']}")
    describe_task(task, log)
    return task


async def run_demo(log: Log) -> None:
    """The seed's lab: vm-a moves .172 -> .173 -> .172 while the user stays connected."""
    ensure_image(log)
    state = topology.lab_up(2, log=log)
    lab_center = labcenter.ensure_center(state, log)
    src, dst = state.hosts[0].name, state.hosts[1].name
    async with CenterClient(lab_center.url, lab_center.token) as center:
        names = {vm["name"]: vm for vm in await center.vms()}
        if "vm-a" not in names:
            await center.create_vm(src, vm_spec("vm-a", 0))
            log(f"created vm-a on {src} (datastore shared)")
        vm = await center.vm("vm-a")
        if vm["power_state"] != "poweredOn":
            await center.power_on("vm-a")
            log(f"powered on vm-a on {vm['host']}")
        vm = await center.vm("vm-a")
        order = [dst, src] if vm["host"] == src else [src, dst]
        guest = await asyncio.to_thread(wait_for_guest, state, guest_ip(0))
        guest.dirty(*WORKLOAD)
        log(
            f"the user ({state.client_address}) is connected to vm-a at {guest_ip(0)}; "
            f"vm-a dirties {WORKLOAD[0]} MiB/s of a {WORKLOAD[1]} MiB working set"
        )
        sock = netns.connect_in_netns(state.client_netns, guest_ip(0), GUEST_PORT, timeout=5.0)
        ping = PingLoop(sock, interval=0.01, max_duration=600, owns_socket=True).start()
        icmp = IcmpProbe(state.client_netns, guest_ip(0), max_duration=600).start()
        try:
            await asyncio.sleep(1.0)
            for dest in order:
                log(f"vMotion vm-a -> {dest} (change compute resource only)")
                since = time.monotonic_ns()
                task = await _migrate(center, "vm-a", dest, log)
                await asyncio.sleep(1.0)
                log(user_view(task, ping.replies_ns(), icmp, since))
        finally:
            ping.stop()
            icmp.stop()
            summary = await asyncio.to_thread(ping.join, 30)
            guest.dirty_stop()
            guest.close()
        where = (await center.vm("vm-a"))["host"]
    log(
        f"the user's view: {summary.sent} requests every 10 ms on one TCP connection, "
        f"{summary.lost} lost, longest gap between answers {summary.max_gap_ms:.0f} ms, "
        f"{'the same connection throughout' if summary.same_connection else 'CONNECTION DROPPED'}"
    )
    log(f"vm-a runs on {where}. Tear the lab down with `kvmotion lab down`.")
    if summary.lost or not summary.same_connection:
        raise ExecutionError("the user noticed the migration: see the numbers above")
