"""The guest's first answers after a resume, apart from any migration: a fresh QEMU against the
same QEMU.

After a migration the user's longest gap (bench/switchover.py) is far longer than the stop:
ICMP answers come some 40 ms after the destination's ``cont``, guestd's TCP answers some 50 ms
after ICMP's. This measures whether that belongs to the network and the migration, or to the
QEMU process the guest resumes in, with no migration link and no second host:

- **warm**: ``stop``, a pause, ``cont`` on the QEMU the guest has been running in;
- **cold**: the guest saved to a file (QEMU's ``migrate`` to ``file:``), its QEMU ended, and a
  fresh QEMU with the same command line (``-incoming defer``, the same tap) loading it, then
  the same pause and ``cont``: what a migration's destination is, without the network.

One lab host (of the two a lab has), one 256 MiB guest doing the demo's workload (4 MiB/s
dirtied over 16 MiB). The host's agent is stopped first so that QMP is free (the guest keeps
running). Per run: from
``cont`` to the first ICMP echo reply (the lab's client echoes every 2 ms) and to guestd's answer
to a TCP request sent during the pause (it waits in the tap, as the user's frames do at the
destination in a migration). Nothing is lost in the pause (the client sends nothing else on the
TCP connection), so no retransmission is in the figure.

Run as root: ``.venv/bin/python -m bench.warmup [--runs 8] [--pause-ms 50]``. Writes
bench/results/warmup.json and .md. Brings the lab up and takes it down at the end (its agent was
stopped and the guest's QEMU is no longer the agent's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kvmotion.center.client import CenterClient
from kvmotion.lab import labcenter, netns, topology
from kvmotion.lab.demo import GUEST_PORT, WORKLOAD, ensure_image, guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.icmp import IcmpProbe
from kvmotion.qemu.cmdline import QEMU_BINARY
from kvmotion.qemu.qmp import QmpSession

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ".venv/bin/python -m bench.warmup"
VM, INDEX = "vm-warm", 11
ANSWER_TIMEOUT_S = 5.0
SAVE_TIMEOUT_S = 60.0


def first_after(times_ns: list[int], since_ns: int) -> float | None:
    """Milliseconds from ``since_ns`` to the first time in ``times_ns`` at or after it."""
    later = [t for t in times_ns if t >= since_ns]
    return (later[0] - since_ns) / 1e6 if later else None


class Measure:
    """From the lab's client: ICMP echoes every 2 ms all along, and one TCP request a run."""

    def __init__(self, state: topology.LabState, ip: str) -> None:
        self.icmp = IcmpProbe(state.client_netns, ip, interval=0.002, max_duration=3600).start()
        self.sock = netns.connect_in_netns(state.client_netns, ip, GUEST_PORT, timeout=5.0)
        self.sock.settimeout(ANSWER_TIMEOUT_S)

    def ask(self) -> None:
        self.sock.sendall(b"PING\n")

    def answered_ns(self) -> int:
        got = b""
        while not got.endswith(b"\n"):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("guestd closed the connection")
            got += chunk
        return time.monotonic_ns()

    def close(self) -> None:
        self.icmp.stop()
        self.sock.close()


async def resume_and_time(
    qmp: QmpSession, measure: Measure, kind: str, pause_s: float
) -> dict[str, Any]:
    measure.ask()  # waits in the tap until the guest runs
    await asyncio.sleep(pause_s)
    blocks = await translated_blocks(qmp)
    await qmp.execute("cont")
    cont_ns = time.monotonic_ns()
    answered = await asyncio.to_thread(measure.answered_ns)
    blocks = await translated_blocks(qmp) - blocks
    await asyncio.sleep(0.3)  # the echoes around the resume are in
    return {
        "kind": kind,
        "icmp_ms": first_after(list(measure.icmp.replies_ns), cont_ns),
        "tcp_ms": (answered - cont_ns) / 1e6,
        "translated_blocks": blocks,
    }


async def translated_blocks(qmp: QmpSession) -> int:
    """How many blocks of guest code TCG holds translated (``info jit``'s TB count)."""
    text = await qmp.execute("human-monitor-command", {"command-line": "info jit"})
    for line in str(text).splitlines():
        if line.startswith("TB count"):
            return int(line.split()[2])
    raise RuntimeError(f"no TB count in info jit: {text!r}")


async def warm(qmp: QmpSession, measure: Measure, pause_s: float) -> dict[str, Any]:
    await qmp.execute("stop")
    return await resume_and_time(qmp, measure, "warm", pause_s)


async def wait_status(qmp: QmpSession, want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (await qmp.execute("query-migrate")).get("status")
        if status == want:
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration to the file: {status}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no {want!r} within {timeout:.0f} s")


async def cold(
    qmp: QmpSession, measure: Measure, host: topology.LabHost, argv: list[str], pause_s: float
) -> tuple[QmpSession, dict[str, Any]]:
    """Save, end this QEMU, load in a fresh one; return the fresh QEMU's session and the row."""
    with tempfile.TemporaryDirectory(prefix="kvmotion-warmup-") as tmp:
        state_file = Path(tmp) / "guest.state"
        await qmp.execute("stop")
        off = [{"capability": "pause-before-switchover", "state": False}]
        await qmp.execute("migrate-set-capabilities", {"capabilities": off})
        await qmp.execute("migrate", {"uri": f"file:{state_file}"})
        await wait_status(qmp, "completed", SAVE_TIMEOUT_S)
        await qmp.execute("quit")
        await qmp.close()
        await asyncio.sleep(0.2)  # its pidfile and socket go; the tap stays (it is the agent's)
        # -daemonize: this returns when the fresh QEMU is up, in the host's namespace
        subprocess.run(["ip", "netns", "exec", host.netns, *argv], check=True, timeout=30)
        fresh = QmpSession(qmp.socket_path, VM)
        await fresh.connect()
        await fresh.execute("migrate-incoming", {"uri": f"file:{state_file}"})
        await wait_status(fresh, "completed", SAVE_TIMEOUT_S)
        return fresh, await resume_and_time(fresh, measure, "cold", pause_s)


def qemu_of(host: topology.LabHost) -> tuple[int, Path]:
    """The pid and run dir of the one QEMU running on ``host``."""
    pidfiles = list(host.run_dir.glob("vms/*/qemu.pid"))
    if len(pidfiles) != 1:
        raise RuntimeError(f"expected one QEMU on {host.name}, found {len(pidfiles)}")
    return int(pidfiles[0].read_text().split()[0]), pidfiles[0].parent


def fresh_argv(pid: int) -> list[str]:
    """The running QEMU's command line, made to wait for an incoming state, stopped."""
    argv = netns.process_cmdline(pid)
    if not argv:
        raise RuntimeError(f"cannot read QEMU {pid}'s command line")
    if "-incoming" in argv:
        at = argv.index("-incoming")
        del argv[at : at + 2]
    return [*argv, "-incoming", "defer", *([] if "-S" in argv else ["-S"])]


async def run(runs: int, pause_s: float) -> list[dict[str, Any]]:
    ensure_image(print)
    state = topology.lab_up(2, log=lambda _m: None)
    lab_center = labcenter.ensure_center(state, lambda _m: None)
    host = state.hosts[0]
    rows: list[dict[str, Any]] = []
    try:
        async with CenterClient(lab_center.url, lab_center.token) as center:
            if VM in {v["name"] for v in await center.vms()}:
                if (await center.vm(VM))["power_state"] == "poweredOn":
                    await center.power_off(VM)
                await center.delete_vm(VM)
            await center.create_vm(host.name, vm_spec(VM, INDEX))
            await center.power_on(VM)
        guest = await asyncio.to_thread(wait_for_guest, state, guest_ip(INDEX))
        guest.dirty(*WORKLOAD)
        guest.close()
        agent = host.agent_pid if topology.agent_running(host) else None
        if agent is None or not netns.terminate(agent, grace=5.0):
            raise RuntimeError(f"cannot stop {host.name}'s agent")
        pid, run_dir = qemu_of(host)
        argv = fresh_argv(pid)
        qmp = QmpSession(run_dir / "qmp.sock", VM)
        await qmp.connect()
        measure = Measure(state, guest_ip(INDEX))
        try:
            await asyncio.sleep(1.0)
            for i in range(runs * 2):  # alternating, so that drift hits both alike
                if i % 2 == 0:
                    row = await warm(qmp, measure, pause_s)
                else:
                    qmp, row = await cold(qmp, measure, host, argv, pause_s)
                rows.append(row)
                print(json.dumps(row))
                await asyncio.sleep(1.0)
        finally:
            measure.close()
            await qmp.close()
    finally:  # as `kvmotion lab down` does
        labcenter.stop_center(lambda _m: None)
        topology.lab_down(log=lambda _m: None)
    return rows


def report(rows: list[dict[str, Any]], pause_s: float) -> str:
    def cell(kind: str, key: str) -> str:
        got = [r[key] for r in rows if r["kind"] == kind and r[key] is not None]
        if not got:
            return "-"
        digits = 0 if all(isinstance(g, int) for g in got) else 1
        return f"{statistics.median(got):.{digits}f} ({min(got):.{digits}f}-{max(got):.{digits}f})"

    lines = [
        "# The guest's first answers after `cont`: a fresh QEMU against the same QEMU",
        "",
        f"{len(rows)} resumes of a 256 MiB guest dirtying {WORKLOAD[0]} MiB/s over {WORKLOAD[1]} "
        f"MiB, alternating, on one lab host (TCG, {QEMU_BINARY} of the system), each after a "
        f"{pause_s * 1000:.0f} ms pause. Command: `{COMMAND}`.",
        "",
        "| QEMU | resumes | first ICMP echo after `cont`, ms: median (range) | "
        "guestd's TCP answer after `cont`, ms | blocks TCG translated until that answer |",
        "|---|---|---|---|---|",
    ]
    for kind, label in (("warm", "the same (stop, cont)"), ("cold", "fresh (state from a file)")):
        n = sum(r["kind"] == kind for r in rows)
        cells = " | ".join(cell(kind, k) for k in ("icmp_ms", "tcp_ms", "translated_blocks"))
        lines.append(f"| {label} | {n} | {cells} |")
    lines += [
        "",
        "- ICMP: the lab's client echoes every 2 ms all along; the first reply after `cont`.",
        "- TCP: one PING to guestd, sent during the pause (it waits in the tap), answered after "
        "`cont`. Nothing else is sent on that connection, so no retransmission is in it.",
        "- Blocks translated: TCG's TB count (`info jit`) at the answer less at `cont`: the guest "
        "code TCG had to translate before it could run it. A KVM host runs guest code as is.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=8, help="resumes of each kind")
    parser.add_argument("--pause-ms", type=int, default=50)
    args = parser.parse_args()
    rows = asyncio.run(run(args.runs, args.pause_ms / 1000))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "warmup.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows, args.pause_ms / 1000)
    (RESULTS / "warmup.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
