"""Control-plane overhead of a compute migration, beside QEMU's own migration time.

For N migrations of a busy guest back and forth between the seed's hosts, measured in one run:
- request -> first byte: from the center accepting the request to QEMU sending its first byte
  (precheck with fresh host facts, the destination QEMU started and listening, migrate issued);
- resume -> done: from the guest resuming on the destination to the task's success (the inventory
  updated, the source QEMU ended);
- QEMU's own total migration time, and its downtime;
- CPU time the center and the two agents spent per migration (their own, from /proc/PID/stat,
  request to the task's end; not their children's: an agent reaps the QEMU it ends), beside
  what they spend in the same wall time with no migration (refresh loops, measured for
  ``IDLE_S`` before the runs): the control plane's own cost (issue 14). The benchmark follows
  each task over the center's task stream, as the web client does.
Goal (issue 3): each overhead at most 300 ms.

Run as root: ``.venv/bin/python -m bench.control_plane [--runs 10]``. Writes
bench/results/control_plane.json and .md. Brings the lab up and leaves it up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from kvmotion.center.client import CenterClient, center_tls
from kvmotion.lab import labcenter, topology
from kvmotion.lab.demo import WORKLOAD, ensure_image, guest_ip, vm_spec, wait_for_guest

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_MS = 300
IDLE_S = 10.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """CPU time of ``pid`` itself, in ms. Not its children's: an agent reaps the QEMU it
    started, and the guest's whole CPU time would count as the agent's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = (int(x) for x in fields[11:13])
    return (utime + stime) * 1000 / TICKS


def control_plane_ms(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_ms(pid) for name, pid in pids.items()}


async def until_ended(url: str, token: str, task_id: int) -> None:
    """Follow the center's task stream (as the web client does) until the task ends."""
    headers = {"Authorization": f"Bearer {token}"}
    timeout = httpx.Timeout(30.0, read=60.0)
    async with (
        asyncio.timeout(120),
        httpx.AsyncClient(
            base_url=url, headers=headers, timeout=timeout, trust_env=False, verify=center_tls(url)
        ) as http,
        http.stream("GET", "/v1/tasks-stream", params={"limit": 5}) as stream,
    ):
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                task = json.loads(line.removeprefix("data: "))
                if task["id"] == task_id and task["state"] in ("success", "error", "cancelled"):
                    return
    raise RuntimeError(f"the task stream ended before task {task_id} did")


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
        pids = {"center": lc.pid} | {
            f"agent {h.name}": h.agent_pid for h in state.hosts[:2] if h.agent_pid is not None
        }
        before, t0 = control_plane_ms(pids), time.monotonic()
        await asyncio.sleep(IDLE_S)
        after, idle_s = control_plane_ms(pids), time.monotonic() - t0
        idle_per_s = {k: (after[k] - before[k]) / idle_s for k in pids}
        for i in range(runs):
            where = (await center.vm("bench-cp"))["host"]
            dest = hosts[1] if where == hosts[0] else hosts[0]
            before, t0 = control_plane_ms(pids), time.monotonic()
            task = await center.migrate("bench-cp", dest)
            await until_ended(lc.url, lc.token, task["id"])
            after, wall_s = control_plane_ms(pids), time.monotonic() - t0
            task = await center.task(task["id"])
            if task["state"] != "success":
                raise RuntimeError(f"migration {i} {task['state']}: {task['error']}")
            used = {k: after[k] - before[k] for k in pids}
            agents = [k for k in pids if k.startswith("agent")]
            s = task["summary"]
            rows.append({
                "run": i,
                "dest": dest,
                "request_to_first_byte_ms": s["request_to_first_byte_ms"],
                "resume_to_done_ms": s["resume_to_done_ms"],
                "qemu_total_ms": s["total_time_ms"],
                "qemu_downtime_ms": s["downtime_ms"],
                "task_ms": s["task_time_ms"],
                "wall_ms": round(wall_s * 1000),
                "center_cpu_ms": round(used["center"]),
                "agents_cpu_ms": round(sum(used[k] for k in agents)),
                "center_idle_cpu_ms": round(idle_per_s["center"] * wall_s),
                "agents_idle_cpu_ms": round(sum(idle_per_s[k] for k in agents) * wall_s),
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
        ("center_cpu_ms", ""),
        ("agents_cpu_ms", ""),
        ("center_idle_cpu_ms", ""),
        ("agents_idle_cpu_ms", ""),
    ):
        med, worst = statistics.median(col(key)), max(col(key))
        ok = "" if not goal else (" met" if worst <= GOAL_MS else " MISSED")
        lines.append(f"| {key} | {med:.0f} | {worst:.0f} | {med / qemu:.2f} | {goal}{ok} |")
    lines += [
        "",
        "CPU rows: CPU time (their own) of the center and of both agents together from "
        "the request to the task's end; the *_idle_* rows are what the same processes spend in "
        f"the same wall time with no migration (measured over {IDLE_S:.0f} s before the runs).",
    ]
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
