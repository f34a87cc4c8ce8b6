"""`kvmotion demo --os debian`: the seed's story with a real server and real clients.

A Debian 12 server VM (the image `kvmotion image build --os debian` makes, imported onto the
shared datastore) boots on 172.16.0.172 by its firmware, takes its address from the VM
network's DHCP server and its hostname and the demo user's SSH key from its first-boot seed.
Then, while an SSH session prints a line every 10 ms, wrk loads nginx and pgbench runs
transactions against PostgreSQL, the VM moves to 172.16.0.173 and back; the demo prints what
each client saw, and checks that PostgreSQL kept every transaction pgbench saw committed.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmotion.center.client import CenterClient
from kvmotion.errors import ExecutionError, LabError
from kvmotion.lab import labcenter, realclients, topology
from kvmotion.lab.demo import _migrate
from kvmotion.lab.osimage import build_os_image

Log = Callable[[str], None]
VM, IMAGE, USER = "web1", "debian-12", "debian"
BOOT_TIMEOUT_S = 900


def demo_key(state: topology.LabState) -> Path:
    """The demo user's SSH key (made once, kept in the lab's directory)."""
    key = state.lab_dir / "demo" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


async def _server(center: CenterClient, state: topology.LabState, key: Path, log: Log) -> str:
    """The VM, imported, created and started as needed; its address once SSH lets us in."""
    src = state.hosts[0].name
    if not any(i["name"] == IMAGE for i in await center.images()):
        image = await asyncio.to_thread(build_os_image, log=log)
        log(f"importing {image.path} onto datastore shared as {IMAGE}")
        await center.import_image(image.path, "shared", IMAGE)
    if VM not in {vm["name"] for vm in await center.vms()}:
        first_boot = {"hostname": VM, "ssh_keys": [Path(f"{key}.pub").read_text().strip()]}
        spec = {"name": VM, "datastore": "shared", "memory_mib": 1024, "image": IMAGE,
                "nics": [{"network": "vm-network"}], "first_boot": first_boot}  # fmt: skip
        await center.create_vm(src, spec)
        log(f"created {VM} from image {IMAGE} on {src}")
    if (await center.vm(VM))["power_state"] != "poweredOn":
        await center.power_on(VM)
        log(f"powered on {VM}; Debian boots through SeaBIOS (about a minute under TCG)")
    end = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < end:
        vm = await center.vm(VM)
        v4 = [a for a in vm.get("addresses") or [] if ":" not in a]
        if v4:
            log(f"the center shows {VM} at {v4[0]} (from {vm.get('addresses_source')})")
            await asyncio.to_thread(
                realclients.wait_ssh, state.client_netns, key, USER, v4[0], BOOT_TIMEOUT_S
            )
            return str(v4[0])
        await asyncio.sleep(3)
    raise LabError(f"{VM} showed no address in {BOOT_TIMEOUT_S} s")


async def run_os_demo(log: Log) -> None:
    state = topology.lab_up(2, log=log)
    lab_center = labcenter.ensure_center(state, log)
    key = demo_key(state)
    ns = state.client_netns
    async with CenterClient(lab_center.url, lab_center.token) as center:
        address = await _server(center, state, key, log)
        await asyncio.to_thread(realclients.wait_services, ns, address, BOOT_TIMEOUT_S)
        await asyncio.to_thread(realclients.run_pgbench, ns, address, "-i", "-s", "1", timeout=300)
        start = await asyncio.to_thread(realclients.count_history, ns, address)
        ticker = realclients.SshTicker(ns, key, USER, address).start()
        wrk = realclients.Repeat(realclients.wrk_argv(ns, f"http://{address}/", 2)).start()
        pg = realclients.Repeat(
            realclients.pgbench_argv(ns, address, "-n", "-c", "2", "-T", "4"),
            env=realclients.pg_env(),
        ).start()
        log(f"the user: ssh {USER}@{address} printing a line every 10 ms; wrk on nginx; "
            "pgbench on PostgreSQL")  # fmt: skip
        try:
            await asyncio.sleep(5)
            here = (await center.vm(VM))["host"]
            order = [h.name for h in state.hosts[:2]]
            order = order[::-1] if here == order[0] else order
            for dest in order:
                log(f"vMotion {VM} -> {dest} (change compute resource only)")
                task: dict[str, Any] = await _migrate(center, VM, dest, log)
                step = task["summary"].get("guest_clock_step_ms")
                log(f"  the guest's clock was set right after the move (it was {step} ms off)")
                await asyncio.sleep(5)
        finally:
            ssh_open = ticker.alive
            wrk_runs = await asyncio.to_thread(wrk.stop)
            pg_runs = await asyncio.to_thread(pg.stop)
            ticker.stop()
        where = (await center.vm(VM))["host"]
    web = [realclients.parse_wrk(s.output) for s in wrk_runs if s.ok]
    bench = [realclients.parse_pgbench(s.output) for s in pg_runs if s.ok]
    committed = sum(r.processed for r in bench)
    kept = await asyncio.to_thread(realclients.count_history, ns, address) - start
    log(f"ssh: {ticker.lines} lines, longest pause {ticker.max_gap_s * 1000:.0f} ms, session "
        f"{'open throughout' if ssh_open else 'LOST'}")  # fmt: skip
    log(
        f"wrk: {sum(r.requests for r in web)} requests, "
        f"{sum(r.socket_errors for r in web)} socket errors, {sum(r.non_2xx for r in web)} "
        f"non-2xx, longest stall {max((r.max_latency_ms for r in web), default=0):.0f} ms"
    )
    log(f"pgbench: {committed} transactions committed, {sum(r.failed for r in bench)} failed; "
        f"PostgreSQL holds {kept} of them")  # fmt: skip
    failed_runs = len(wrk_runs) - len(web) + len(pg_runs) - len(bench)
    if (
        not ssh_open
        or failed_runs
        or kept != committed
        or any(r.socket_errors or r.non_2xx for r in web)
    ):
        raise ExecutionError("a client noticed the migration: see the numbers above")
    log(f"{VM} runs on {where}. Tear the lab down with `kvmotion lab down`.")
