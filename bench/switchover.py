"""The pause the user sees at switchover, side by side: with and without the handover.

One lab, one VM (256 MiB, the demo's workload: 4 MiB/s dirtied over 16 MiB), migrated back and
forth ``--migrations`` times per variant and round, the variants alternating by round:
- handover: the source tells the destination the moment it stops the guest, and the destination
  takes the VM's traffic (host/switchover.py: pins the MAC to its tap, sends a RARP) so frames
  sent during the stun wait there for the resume;
- announce only: the VM network learns the new place from QEMU's announce after the resume.

From the lab's client, all the time: a TCP request every 10 ms (pipelined, guestd answers), an
ICMP echo every 10 ms, and on a second connection a request every 100 ms (a user who sends
little, whose lost request TCP resends late). Per migration: QEMU's downtime, the guest's stop
(stunned -> resumed, the agents' marks), the longest gap between TCP answers and between ICMP
replies in the migration's window, the sparse client's longest wait, the client's
retransmissions, and when the destination took the traffic.

Run as root: ``.venv/bin/python -m bench.switchover [--migrations 10] [--rounds 2]``. Writes
bench/results/switchover.json and .md. Brings the lab up and leaves it up; the VM is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import struct
import time
from pathlib import Path
from typing import Any

from kvmotion.center.client import CenterClient
from kvmotion.lab import labcenter, netns, topology
from kvmotion.lab.demo import WORKLOAD, ensure_image, guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.guestclient import DEFAULT_PORT, PingLoop
from kvmotion.lab.icmp import IcmpProbe, longest_gap_ms
from kvmotion.qemu.cmdline import QEMU_BINARY

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ".venv/bin/python -m bench.switchover"
VM, INDEX = "vm-sw", 9
VARIANTS = {"handover": True, "announce only": False}
SETTLE_S = 1.0  # after each migration, before the next (the user keeps working)
SPARSE_S = 0.1  # the sparse client's request period
TCPI_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in Linux's struct tcp_info


def longest_wait_ms(loop: PingLoop, since: int, until: int) -> float:
    """The longest a request sent in [since, until] waited for its answer."""
    waits = [answered - sent for sent, answered in loop.waits_ns() if since <= sent <= until]
    return round(max(waits, default=0) / 1e6, 1)


def retransmitted(sock: socket.socket) -> int:
    """How many segments the client's kernel has sent again on ``sock`` (lost or late)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, TCPI_TOTAL_RETRANS)[0])


async def one(center: CenterClient, dest: str, handover: bool) -> dict[str, Any]:
    started = await center.migrate(VM, dest, downtime_ms=100, handover=handover)
    task = started
    async with asyncio.timeout(120):
        async for task in center.follow_task(started["id"]):  # noqa: B007 (the last one is kept)
            pass
    if task["state"] != "success":
        raise RuntimeError(f"migration failed: {task['error']}")
    return task


async def run(migrations: int, rounds: int) -> list[dict[str, Any]]:
    ensure_image(print)
    state = topology.lab_up(2, log=lambda _m: None)
    lab_center = labcenter.ensure_center(state, lambda _m: None)
    hosts = [h.name for h in state.hosts[:2]]
    rows: list[dict[str, Any]] = []
    async with CenterClient(lab_center.url, lab_center.token) as center:
        if VM in {v["name"] for v in await center.vms()}:
            with_host = await center.vm(VM)
            if with_host["power_state"] == "poweredOn":
                await center.power_off(VM)
            await center.delete_vm(VM)
        await center.create_vm(hosts[0], vm_spec(VM, INDEX))
        await center.power_on(VM)
        guest = await asyncio.to_thread(wait_for_guest, state, guest_ip(INDEX))
        guest.dirty(*WORKLOAD)
        sock = netns.connect_in_netns(
            state.client_netns, guest_ip(INDEX), DEFAULT_PORT, timeout=5.0
        )
        ping = PingLoop(sock, interval=0.01, max_duration=3600, owns_socket=True).start()
        # A user who sends little (a keystroke every SPARSE_S): a request lost in the stun is
        # resent only after TCP's probe timeout, which adds 200 ms when one request is in flight.
        sparse_sock = netns.connect_in_netns(
            state.client_netns, guest_ip(INDEX), DEFAULT_PORT, timeout=5.0
        )
        sparse = PingLoop(sparse_sock, interval=SPARSE_S, max_duration=3600, owns_socket=True)
        sparse.start()
        icmp = IcmpProbe(state.client_netns, guest_ip(INDEX), max_duration=3600).start()
        try:
            await asyncio.sleep(SETTLE_S)
            for round_no in range(rounds):
                order = list(VARIANTS.items())
                for variant, handover in order if round_no % 2 == 0 else order[::-1]:
                    for _ in range(migrations):
                        here = (await center.vm(VM))["host"]
                        dest = hosts[1] if here == hosts[0] else hosts[0]
                        since, resent = time.monotonic_ns(), retransmitted(sock)
                        task = await one(center, dest, handover)
                        await asyncio.sleep(SETTLE_S)
                        until = time.monotonic_ns()
                        rows.append(row(task, variant, ping.replies_ns(), icmp, since, until))
                        rows[-1]["tcp_retransmits"] = retransmitted(sock) - resent
                        rows[-1]["sparse_wait_ms"] = longest_wait_ms(sparse, since, until)
                        print(json.dumps(rows[-1]))
        finally:
            ping.stop()
            sparse.stop()
            icmp.stop()
            summary = await asyncio.to_thread(ping.join, 30)
            sparse_summary = await asyncio.to_thread(sparse.join, 30)
            guest.close()
            await center.power_off(VM)
            await center.delete_vm(VM)
    for got in (summary, sparse_summary):
        if not got.same_connection or got.lost:
            raise RuntimeError(f"the user's connection suffered: {got}")
    return rows


def row(
    task: dict[str, Any],
    variant: str,
    tcp: list[int],
    icmp: IcmpProbe,
    since: int,
    until: int,
) -> dict[str, Any]:
    s = task["summary"]
    steps = {t["step"]: float(t["time"]) for t in task["timeline"]}
    taken = steps.get("traffic_taken")
    return {
        "variant": variant,
        "downtime_ms": s.get("downtime_ms"),
        "stopped_ms": s.get("stun_to_resume_ms"),
        "tcp_gap_ms": round(longest_gap_ms(tcp, since, until), 1),
        "icmp_gap_ms": round(icmp.longest_gap_ms(since, until), 1),
        "taken_before_resume": taken is not None and taken <= steps["resumed"],
        "taken_after_stun_ms": None if taken is None else round((taken - steps["stunned"]) * 1e3),
        "resume_to_mac_learned_ms": s.get("resume_to_mac_learned_ms"),
    }


def report(rows: list[dict[str, Any]], migrations: int, rounds: int) -> str:
    def med(values: list[Any]) -> str:
        got = [v for v in values if v is not None]
        return f"{statistics.median(got):.0f}" if got else "-"

    def top(values: list[Any]) -> str:
        got = [v for v in values if v is not None]
        return f"{max(got):.0f}" if got else "-"

    lines = [
        "# The user's pause at switchover: handover vs QEMU's announce alone",
        "",
        f"{len(rows)} migrations of a 256 MiB guest dirtying {WORKLOAD[0]} MiB/s over "
        f"{WORKLOAD[1]} MiB, {migrations} per variant in each of {rounds} rounds (variants "
        f"alternating), between the lab's hosts (TCG, {QEMU_BINARY} of the system). Client: "
        "a TCP request and an ICMP echo every 10 ms. Command: `" + COMMAND + "`.",
        "",
        "| variant | migrations | QEMU downtime ms (median / max) | guest stopped ms | "
        "ICMP gap ms | TCP gap ms | sparse client's longest wait ms | taken after the stun ms "
        "| taken before the resume | client's TCP retransmissions (total) | migrations with one "
        "| sparse waits over 200 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        rs = [r for r in rows if r["variant"] == variant]
        if not rs:
            continue
        taken = sum(r["taken_before_resume"] for r in rs)
        cells = [
            f"{med([r.get(k) for r in rs])} / {top([r.get(k) for r in rs])}"
            for k in (
                "downtime_ms", "stopped_ms", "icmp_gap_ms", "tcp_gap_ms", "sparse_wait_ms",
                "taken_after_stun_ms",
            )
        ]  # fmt: skip
        slow = sum(1 for r in rs if (r.get("sparse_wait_ms") or 0) > 200)
        resent = [r["tcp_retransmits"] for r in rs if r.get("tcp_retransmits") is not None]
        lines.append(
            f"| {variant} | {len(rs)} | {' | '.join(cells)} | {taken} of {len(rs)} | "
            f"{sum(resent)} | {sum(1 for n in resent if n)} of {len(resent)} | "
            f"{slow} of {len(rs)} |"
        )
    lines += [
        "",
        "- QEMU downtime: the source QEMU's own count. Guest stopped: from the source agent's "
        "pre-switchover event to the destination agent's `cont` (wall clocks of one machine).",
        "- ICMP gap: the longest time between two echo replies inside the migration's window "
        "(request to 1 s after the task ended); TCP gap the same between guestd's answers.",
        "- Taken after the stun: from the source's pre-switchover event to the destination's "
        "RARP (the handover), median / max.",
        "- Retransmissions: what the client's kernel sent again in the migration's window "
        "(`tcpi_total_retrans`, TCP's loss probes included): a request that reached the source "
        "after it stopped the guest is lost and sent again.",
        f"- Sparse client: a second connection sending one request every {SPARSE_S * 1000:.0f} "
        "ms (a user typing); its longest wait for an answer among the requests sent in the "
        "window. A lone request lost in the stun waits for TCP's loss probe, 200 ms or more.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--migrations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = asyncio.run(run(args.migrations, args.rounds))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "switchover.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows, args.migrations, args.rounds)
    (RESULTS / "switchover.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
