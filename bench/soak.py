"""Soak: migrate one busy guest back and forth many times; the guest must stay intact.

After each migration a fresh connection asks guestd for a reply: its counter must only grow (a
guestd restarted by init, or a crashed guest kernel, ends the soak). With ``--idle``, the guest's
working set is written once and then left alone, and its checksum must stay the same after every
migration (no page lost or corrupted in transit).

Run as root: ``.venv/bin/python -m bench.soak [--migrations 40] [--idle]``. Brings the lab up and
leaves it up. This is how the multi-threaded-TCG corruption was found (see qemu/cmdline.py).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from kvmotion.center.client import CenterClient
from kvmotion.lab import labcenter, topology
from kvmotion.lab.demo import ensure_image, guest_ip, vm_spec, wait_for_guest

VM, INDEX = "soak", 9


async def soak(migrations: int, idle: bool, dirty: int = 16, wss: int = 64) -> int:
    ensure_image(lambda _m: None)
    state = topology.lab_up(2, log=lambda _m: None)
    lc = labcenter.ensure_center(state, lambda _m: None)
    hosts = [h.name for h in state.hosts[:2]]
    async with CenterClient(lc.url, lc.token) as center:
        if VM not in {v["name"] for v in await center.vms()}:
            await center.create_vm(hosts[0], vm_spec(VM, INDEX))
            await center.power_on(VM)
        guest = await asyncio.to_thread(wait_for_guest, state, guest_ip(INDEX))
        guest.dirty(32, 64)
        time.sleep(3)
        guest.dirty_stop()
        checksum = guest.checksum()
        if not idle:
            guest.dirty(dirty, wss)
        last_n = guest.ping().n
        guest.close()
        for i in range(migrations):
            where = (await center.vm(VM))["host"]
            dest = hosts[1] if where == hosts[0] else hosts[0]
            task = await center.migrate(VM, dest)
            end = time.monotonic() + 120
            while task["state"] not in ("success", "error", "cancelled"):
                if time.monotonic() > end:
                    print(f"{i}: migration did not end in 120 s")
                    return 1
                await asyncio.sleep(0.05)
                task = await center.task(task["id"])
            try:
                probe = await asyncio.to_thread(wait_for_guest, state, guest_ip(INDEX), 10)
                n = probe.ping().n
                now = probe.checksum() if idle else checksum
                probe.close()
            except Exception as exc:  # the guest died: that is the finding
                print(f"{i}: {task['state']}; the guest stopped answering: {exc}")
                return 1
            intact = n > last_n and now == checksum
            print(f"{i}: {task['state']} downtime {task['summary'].get('downtime_ms')} ms, "
                  f"guestd n={n}, {'intact' if intact else 'CORRUPTED OR RESTARTED'}")  # fmt: skip
            if not intact:
                return 1
            last_n = n
    print(f"{migrations} migrations, guest intact")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--migrations", type=int, default=40)
    parser.add_argument("--idle", action="store_true", help="check the working set's checksum")
    parser.add_argument("--dirty", type=int, default=16, help="MiB/s the guest dirties")
    parser.add_argument("--wss", type=int, default=64, help="over a working set of MiB")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(soak(args.migrations, args.idle, args.dirty, args.wss)))


if __name__ == "__main__":
    main()
