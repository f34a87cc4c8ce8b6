"""Control-plane overhead of a compute migration, beside QEMU's own migration time.

For N migrations of a busy guest back and forth between the seed's hosts, measured in one run:
- request -> first byte: from the center accepting the request to QEMU sending its first byte
  (precheck with fresh host facts, the destination QEMU started and listening, migrate issued);
- resume -> done: from the guest resuming on the destination to the task's success (the inventory
  updated, the source QEMU ended);
- QEMU's own total migration time, and its downtime.
Goal (issue 3): each overhead at most 300 ms.

Run as root: ``.venv/bin/python -m bench.control_plane [--runs 10]``. Writes
bench/results/control_plane.json and .md. Brings the lab up and leaves it up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from kvmotion.center.client import CenterClient
from kvmotion.lab import labcenter, topology
from kvmotion.lab.demo import WORKLOAD, ensure_image, guest_ip, vm_spec, wait_for_guest

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_MS = 300


async def measure(runs: int) -> list[dict[str, Any]]:
    ensure_image(lambda _m: None)
    state = topology.lab_up(2, log=lambda _m: None)
    lc = labcenter.ensure_center(state, lambda _m: None)
    hosts = [h.name for h in state.hosts[:2]]
    rows = []
    async with CenterClient(lc.url, lc.token) as center:
        if "bench-cp" not in {v["name"] for v in await center.vms()}:
            await center.create_vm(hosts[0], vm_spec("bench-cp", 5))
        vm = await center.vm("bench-cp")
        if vm["power_state"] != "poweredOn":
            await center.power_on("bench-cp")
        guest = await asyncio.to_thread(wait_for_guest, state, guest_ip(5))
        guest.dirty(*WORKLOAD)
        for i in range(runs):
            where = (await center.vm("bench-cp"))["host"]
            dest = hosts[1] if where == hosts[0] else hosts[0]
            task = await center.migrate("bench-cp", dest)
            end = time.monotonic() + 120
            while task["state"] not in ("success", "error", "cancelled"):
                if time.monotonic() > end:
                    raise RuntimeError(f"migration {i} did not end in 120 s")
                await asyncio.sleep(0.05)
                task = await center.task(task["id"])
            if task["state"] != "success":
                raise RuntimeError(f"migration {i} {task['state']}: {task['error']}")
            s = task["summary"]
            rows.append({
                "run": i,
                "dest": dest,
                "request_to_first_byte_ms": s["request_to_first_byte_ms"],
                "resume_to_done_ms": s["resume_to_done_ms"],
                "qemu_total_ms": s["total_time_ms"],
                "qemu_downtime_ms": s["downtime_ms"],
                "task_ms": s["task_time_ms"],
            })  # fmt: skip
            print(json.dumps(rows[-1]))
        guest.dirty_stop()
        guest.close()
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows]

    lines = [
        "# Control-plane overhead of compute migrations",
        "",
        f"{len(rows)} migrations of a 256 MiB guest dirtying {WORKLOAD[0]} MiB/s, between "
        "172.16.0.172 and .173 over an unshaped lab link (TCG). "
        "Command: `.venv/bin/python -m bench.control_plane`.",
        "",
        "| measure | median ms | max ms | median / QEMU total | goal |",
        "|---|---|---|---|---|",
    ]
    qemu = statistics.median(col("qemu_total_ms"))
    for key, goal in (
        ("request_to_first_byte_ms", f"<= {GOAL_MS} ms"),
        ("resume_to_done_ms", f"<= {GOAL_MS} ms"),
        ("qemu_total_ms", ""),
        ("qemu_downtime_ms", ""),
        ("task_ms", ""),
    ):
        med, worst = statistics.median(col(key)), max(col(key))
        ok = "" if not goal else (" met" if worst <= GOAL_MS else " MISSED")
        lines.append(f"| {key} | {med:.0f} | {worst:.0f} | {med / qemu:.2f} | {goal}{ok} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.runs))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "control_plane.json").write_text(json.dumps(rows, indent=2))
    text = report(rows)
    (RESULTS / "control_plane.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
