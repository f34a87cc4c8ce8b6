"""Storage vMotion: disk copy throughput against a plain file copy, and the guest's write latency.

For N storage-only moves of a running VM's disk between the datastores "shared" and "local-172"
(the direction alternates), measured in one run, side by side:
- raw copy: the VM's image file copied with ``cp --sparse=never --reflink=never`` into the other
  datastore's directory (one filesystem), then fsync'ed, timed, deleted. Raw throughput = bytes
  of the file / (cp + fsync) seconds: QEMU flushes a mirror's target before it reports READY,
  so kvmotion's copy time includes that flush too. The cp alone (its data still in the page
  cache) is reported beside it;
- kvmotion's copy: the task's ``disk_copy.copy_time_ms`` (the mirror's start to every disk
  READY); throughput = bytes of real data in the image (``qemu-img map``: allocated, not zero) /
  that time. QEMU's job bytes (``total_bytes``: it counts unallocated ranges, and re-dirtied ones
  again) and the task's ``throughput_bps`` (computed from them) are reported beside it;
- ratio = kvmotion throughput / raw throughput. Goal (the issue's "Measure"): report it; near or
  above 0.8 is good. Not asserted;
- the guest's write latency: guestd writes 4 KiB records back to back, each flushed (O_DIRECT |
  O_DSYNC); its acknowledged count is sampled every 50 ms over 5 s before the move and from the
  task's ``disk_copy`` to ``disks_ready`` step; mean write+flush latency = 1 / records per
  second, before and during, and during / before; and the longest time from ``disk_copy`` to
  ``disks_switched`` in which no record was acknowledged (the pivot drains the guest's I/O);
- a control: the same raw copy once more while the guest writes, and the guest's write latency
  over that cp + fsync, to tell what any copy of these bytes costs the guest from what the
  mirror costs it.
The image is filled with non-zero data (``qemu-io write -P 0x5a``) past its first 64 MiB (the
guest's records) before the VM powers on, so both copies move real bytes.

Page cache: before every measurement the benchmark runs ``sync`` and
``echo 3 > /proc/sys/vm/drop_caches`` and waits a second, and the order of the measurements
alternates from run to run (raw copies first in even runs, the move first in odd ones). (On a
virtual machine the hypervisor may still cache the image: reads after drop_caches are not
necessarily cold.)

Run as root: ``.venv/bin/python -m bench.storage [--runs 3] [--disk-mib 1024]``. Writes
bench/results/storage.json and .md. Brings the lab up and leaves it up; the benchmark VM is
powered off and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from kvmotion.center.client import CenterClient
from kvmotion.errors import KvmotionError
from kvmotion.lab import labcenter, topology
from kvmotion.lab.demo import ensure_image, guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.guestclient import GuestClient

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ".venv/bin/python -m bench.storage"
VM = "bench-storage"
GUEST_INDEX = 7
RECORDS_MIB = 64  # left unfilled at the start of the disk: guestd's records go there
FILL_CHUNK_MIB = 256
BEFORE_S = 5.0  # the guest's write latency before the move, over this window
CONTROL_BEFORE_S = 1.0
SETTLE_S = 1.0  # after drop_caches
SAMPLE_S = 0.05
TASK_TIMEOUT_S = 240.0
COPY_TIMEOUT_S = 240.0
SAMPLER_MAX_S = 300.0
GOAL_RATIO = 0.8
RAW_NAME = ".bench-storage-raw-copy.qcow2"
ORDERS = (("raw", "control", "move"), ("move", "raw", "control"))

T = TypeVar("T")
Samples = list[tuple[float, int]]  # (host wall clock, the guest's acknowledged record count)


# -- files ---------------------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(SETTLE_S)


def fill_image(image: Path, disk_mib: int) -> None:
    """Non-zero data from RECORDS_MIB to the end of the (not yet running) image."""
    commands: list[str] = []
    for offset in range(RECORDS_MIB, disk_mib, FILL_CHUNK_MIB):
        length = min(FILL_CHUNK_MIB, disk_mib - offset)
        commands += ["-c", f"write -P 0x5a {offset}M {length}M"]
    subprocess.run(["qemu-io", *commands, str(image)], check=True, capture_output=True, timeout=300)


def data_bytes(image: Path) -> int:
    """Bytes of real data in a qcow2 image (allocated, not zero), read while the VM runs."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return sum(int(m["length"]) for m in json.loads(out) if m.get("data") and not m.get("zero"))


def raw_copy(source: Path, dest_dir: Path) -> dict[str, float]:
    """``source`` copied into ``dest_dir`` with cp, then fsync'ed; timed; the copy deleted.

    ``start``/``end``: the wall-clock span of cp + fsync."""
    target = dest_dir / RAW_NAME
    target.unlink(missing_ok=True)
    try:
        start, t0 = time.time(), time.monotonic()
        done = subprocess.run(
            ["cp", "--sparse=never", "--reflink=never", str(source), str(target)],
            capture_output=True, text=True, timeout=COPY_TIMEOUT_S,
        )  # fmt: skip
        t1 = time.monotonic()
        if done.returncode != 0:
            raise RuntimeError(f"cp {source} {target} failed: {done.stderr.strip()}")
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        t2, end = time.monotonic(), time.time()
        size = target.stat().st_size
    finally:
        target.unlink(missing_ok=True)
    return {"bytes": size, "cp_s": t1 - t0, "fsync_s": t2 - t1, "start": start, "end": end}


# -- the guest's writes --------------------------------------------------------------------------
class AckSampler:
    """The guest's acknowledged record count, sampled in a thread."""

    def __init__(self, guest: GuestClient) -> None:
        self.guest = guest
        self.samples: Samples = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ack-sampler", daemon=True)

    def start(self) -> AckSampler:
        self._thread.start()
        return self

    def stop(self) -> Samples:
        self._stop.set()
        self._thread.join(timeout=15)
        if self._thread.is_alive():
            raise RuntimeError("the guest's record sampler did not stop in 15 s")
        if self.error is not None:
            raise RuntimeError(f"sampling the guest's records failed: {self.error!r}")
        return self.samples

    def _run(self) -> None:
        end = time.monotonic() + SAMPLER_MAX_S
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                t0 = time.time()
                status = self.guest.disk_status()
                t1 = time.time()
                if status.full:
                    raise RuntimeError("the guest's disk is full of records: use a larger disk")
                self.samples.append(((t0 + t1) / 2, status.acked))
                self._stop.wait(SAMPLE_S)
        except BaseException as exc:  # reported by stop()
            self.error = exc


def acked_at(samples: Samples, t: float) -> float:
    """The acknowledged count at wall-clock ``t``, interpolated between samples."""
    if not samples or t < samples[0][0] or t > samples[-1][0]:
        raise RuntimeError(f"no record samples around {t:.3f}")
    for (ta, a), (tb, b) in itertools.pairwise(samples):
        if ta <= t <= tb:
            return a + (b - a) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
    return float(samples[-1][1])


def write_ms(samples: Samples, start: float, end: float) -> float | None:
    """Mean write+flush latency between ``start`` and ``end``: 1 / records per second."""
    if end <= start:
        raise RuntimeError(f"empty window {start:.3f}..{end:.3f}")
    rate = (acked_at(samples, end) - acked_at(samples, start)) / (end - start)
    return 1000 / rate if rate > 0 else None


def longest_stall_ms(samples: Samples, start: float, end: float) -> float:
    """The longest time in ``start``..``end`` in which no record was acknowledged (to within
    the sampling interval)."""
    inside = [(t, a) for t, a in samples if start <= t <= end]
    longest, since, last = 0.0, start, None
    for t, a in inside:
        if a != last:
            since, last = t, a
        longest = max(longest, t - since)
    return longest * 1000


async def with_writes(guest: GuestClient, body: Callable[[], Awaitable[T]]) -> tuple[T, Samples]:
    """Run ``body`` while the guest writes records back to back, its acked count sampled."""
    guest.disk_start(0)
    sampler = AckSampler(guest).start()
    try:
        result = await body()
        await asyncio.sleep(0.3)  # a sample past the end of the window
    finally:
        samples = await asyncio.to_thread(sampler.stop)
        guest.disk_stop()
    return result, samples


# -- the measurements ----------------------------------------------------------------------------
def step_time(task: dict[str, Any], step: str) -> float:
    for entry in task.get("timeline") or []:
        if entry["step"] == step:
            return float(entry["time"])
    raise RuntimeError(f"task {task['id']} has no {step!r} step in its timeline")


async def wait_task(center: CenterClient, task: dict[str, Any]) -> dict[str, Any]:
    end = time.monotonic() + TASK_TIMEOUT_S
    while task["state"] not in ("success", "error", "cancelled"):
        if time.monotonic() > end:
            with contextlib.suppress(KvmotionError):
                await center.cancel_task(task["id"])
            raise RuntimeError(f"task {task['id']} did not end in {TASK_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.1)
        task = await center.task(task["id"])
    if task["state"] != "success":
        raise RuntimeError(f"task {task['id']} {task['state']}: {task['error']}")
    return task


async def move(
    center: CenterClient, guest: GuestClient, datastore: str, data: int
) -> dict[str, Any]:
    """The disk moved to ``datastore`` while the guest writes: 5 s of writes, then the move."""

    async def body() -> tuple[float, dict[str, Any]]:
        await asyncio.sleep(BEFORE_S)
        before_end = time.time()
        task = await center.migrate(VM, None, "storage", datastore=datastore)
        return before_end, await wait_task(center, task)

    (before_end, task), samples = await with_writes(guest, body)
    copy = task["summary"]["disk_copy"]
    requested, copy_start = step_time(task, "requested"), step_time(task, "disk_copy")
    ready, switched = step_time(task, "disks_ready"), step_time(task, "disks_switched")
    before = write_ms(samples, before_end - BEFORE_S, before_end)
    during = write_ms(samples, copy_start, ready)
    copy_s = float(copy["copy_time_ms"]) / 1000
    return {
        "data_bytes": data,
        "copy_s": copy_s,
        "kvmotion_bps": data / copy_s,
        "job_total_bytes": copy["total_bytes"],
        "job_copied_bytes": copy["copied_bytes"],
        "task_throughput_bps": copy["throughput_bps"],
        "task_s": switched - requested,
        "request_to_copy_s": copy_start - requested,
        "ready_to_switched_s": switched - ready,
        "write_window_s": ready - copy_start,
        "write_ms_before": before,
        "write_ms_during": during,
        "write_latency_ratio": during / before if during and before else None,
        "write_stall_ms": longest_stall_ms(samples, copy_start, switched),
    }


async def raw(path: Path, dest_dir: Path) -> dict[str, Any]:
    r = await asyncio.to_thread(raw_copy, path, dest_dir)
    return {
        "raw_bytes": r["bytes"],
        "raw_cp_s": r["cp_s"],
        "raw_fsync_s": r["fsync_s"],
        "raw_bps": r["bytes"] / (r["cp_s"] + r["fsync_s"]),
        "raw_cp_only_bps": r["bytes"] / r["cp_s"],
    }


async def control(guest: GuestClient, path: Path, dest_dir: Path) -> dict[str, Any]:
    """The raw copy again while the guest writes, and the guest's write latency meanwhile."""

    async def body() -> dict[str, float]:
        await asyncio.sleep(CONTROL_BEFORE_S)
        return await asyncio.to_thread(raw_copy, path, dest_dir)

    r, samples = await with_writes(guest, body)
    return {
        "raw_writing_bps": r["bytes"] / (r["cp_s"] + r["fsync_s"]),
        "write_ms_during_raw": write_ms(samples, r["start"], r["end"]),
    }


async def remove_vm(center: CenterClient) -> None:
    if VM not in {v["name"] for v in await center.vms()}:
        return
    with contextlib.suppress(KvmotionError):
        await center.power_off(VM)
    await center.delete_vm(VM)


async def measure(runs: int, disk_mib: int) -> list[dict[str, Any]]:
    if disk_mib < RECORDS_MIB + 64:
        raise SystemExit(f"--disk-mib must be at least {RECORDS_MIB + 64}")
    ensure_image(lambda _m: None)
    state = topology.lab_up(2, log=lambda _m: None)
    lc = labcenter.ensure_center(state, lambda _m: None)
    host = state.hosts[0]
    roots = {state.shared_datastore.name: state.shared_datastore}
    roots[host.local_datastore.name] = host.local_datastore
    rows = []
    async with CenterClient(lc.url, lc.token) as center:
        await remove_vm(center)
        for root in roots.values():
            (root / RAW_NAME).unlink(missing_ok=True)
        spec = vm_spec(VM, GUEST_INDEX, datastore=state.shared_datastore.name)
        await center.create_vm(host.name, spec | {"disks": [{"size_mib": disk_mib}]})
        try:

            async def image() -> tuple[str, Path, Path]:
                """Where the disk is now: its datastore, its file, the other datastore."""
                [disk] = (await center.vm(VM))["config"]["disks"]
                here = str(disk["datastore"])
                there = next(name for name in roots if name != here)
                return here, roots[here] / str(disk["path"]), roots[there]

            await asyncio.to_thread(fill_image, (await image())[1], disk_mib)
            await center.power_on(VM)
            guest = await asyncio.to_thread(wait_for_guest, state, guest_ip(GUEST_INDEX))
            try:
                for i in range(runs):
                    here = (await image())[0]
                    dest = next(name for name in roots if name != here)
                    row: dict[str, Any] = {"run": i, "from": here, "to": dest}
                    order = ORDERS[i % 2]
                    for what in order:
                        _, path, other = await image()  # where the last step left it
                        await asyncio.to_thread(drop_caches)
                        if what == "raw":
                            row |= await raw(path, other)
                        elif what == "control":
                            row |= await control(guest, path, other)
                        else:
                            data = await asyncio.to_thread(data_bytes, path)
                            row |= await move(center, guest, dest, data)
                    row["ratio"] = row["kvmotion_bps"] / row["raw_bps"]
                    row["ratio_cp_only"] = row["kvmotion_bps"] / row["raw_cp_only_bps"]
                    row["ratio_raw_writing"] = row["kvmotion_bps"] / row["raw_writing_bps"]
                    row["order"] = ", ".join(order)
                    rows.append(row)
                    print(json.dumps(row))
            finally:
                guest.close()
        finally:
            await remove_vm(center)
    return rows


# -- results -------------------------------------------------------------------------------------
MIB = 2**20
Column = tuple[str, str, float, str]  # key, header, scale, format
THROUGHPUT: tuple[Column, ...] = (
    ("raw_bps", "raw MiB/s (cp+fsync)", 1 / MIB, ".0f"),
    ("kvmotion_bps", "kvmotion MiB/s", 1 / MIB, ".0f"),
    ("ratio", "**ratio**", 1.0, ".2f"),
    ("raw_cp_only_bps", "cp only MiB/s", 1 / MIB, ".0f"),
    ("ratio_cp_only", "ratio to cp only", 1.0, ".2f"),
    ("raw_writing_bps", "raw MiB/s, guest writing", 1 / MIB, ".0f"),
    ("ratio_raw_writing", "ratio to it", 1.0, ".2f"),
    ("copy_s", "mirror to READY s", 1.0, ".2f"),
    ("raw_cp_s", "cp s", 1.0, ".2f"),
    ("raw_fsync_s", "fsync s", 1.0, ".2f"),
    ("task_throughput_bps", "task's throughput_bps, MiB/s", 1 / MIB, ".0f"),
    ("task_s", "task s", 1.0, ".2f"),
    ("request_to_copy_s", "request to copy start s", 1.0, ".2f"),
    ("ready_to_switched_s", "READY to switched s", 1.0, ".2f"),
)
LATENCY: tuple[Column, ...] = (
    ("write_ms_before", "write ms before", 1.0, ".2f"),
    ("write_ms_during", "write ms during copy", 1.0, ".2f"),
    ("write_latency_ratio", "**during / before**", 1.0, ".1f"),
    ("write_window_s", "copy window s", 1.0, ".2f"),
    ("write_stall_ms", "longest write stall ms, copy to switched", 1.0, ".0f"),
    ("write_ms_during_raw", "write ms during raw cp+fsync", 1.0, ".2f"),
)


def medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {
        key: statistics.median(float(r[key]) for r in rows)
        for key, *_ in THROUGHPUT + LATENCY
        if all(r.get(key) is not None for r in rows)
    }


def table(
    rows: list[dict[str, Any]], med: dict[str, float], columns: tuple[Column, ...]
) -> list[str]:
    def cells(values: dict[str, Any]) -> str:
        return " | ".join(
            "-" if values.get(k) is None else f"{float(values[k]) * scale:{fmt}}"
            for k, _, scale, fmt in columns
        )

    lines = [
        "| run | move | order | " + " | ".join(h for _, h, *_ in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['from']} -> {r['to']} | {r['order']} | {cells(r)} |")
    lines.append(f"| median | | | {cells(med)} |")
    return lines


def report(rows: list[dict[str, Any]], disk_mib: int, command: str) -> str:
    med = medians(rows)
    nan = float("nan")
    ratio = med.get("ratio", nan)
    data_mib = statistics.median(r["data_bytes"] for r in rows) / MIB
    job_mib = statistics.median(r["job_total_bytes"] for r in rows) / MIB
    short = [r["run"] for r in rows if r["write_window_s"] < 1.0]
    lines = [
        "# Storage vMotion: disk copy throughput and guest write latency",
        "",
        f"Command: `{command}` (as root)",
        "",
        f"{len(rows)} storage-only moves of a running guest's {disk_mib} MiB disk "
        f"({data_mib:.0f} MiB of real data; QEMU's job counts {job_mib:.0f} MiB) between the "
        "lab's datastores shared and local-172 (directories on one ext4 filesystem), direction "
        "alternating, beside a plain copy of the same image file into the other datastore. "
        "`sync` + drop_caches before each measurement, and their order alternates from run to "
        "run. QEMU 7.2 under TCG, on a 2-CPU virtual machine.",
        "",
        "- kvmotion MiB/s = real data (`qemu-img map`) / the task's `copy_time_ms` (the mirror's "
        "start to every disk READY, which includes QEMU's flush of the copy); the guest writes "
        "flushed 4 KiB records back to back throughout.",
        "- raw MiB/s = file bytes / time of `cp --sparse=never --reflink=never` + fsync of the "
        "copy, guest idle. Beside it: cp alone (data left in the page cache), and cp + fsync "
        "again while the guest writes (the mirror's conditions).",
        "- write ms = 1 / records acknowledged per second by the guest (one writer, each write "
        "flushed): over 5 s before the move, from the task's disk_copy to disks_ready step, and "
        "over the raw cp + fsync with the guest writing. Longest write stall: the longest "
        "time from disk_copy to disks_switched in which the guest's acknowledged count did not "
        "move (sampled every 50 ms).",
        "",
        f"Median ratio kvmotion / raw: **{ratio:.2f}** (goal: report it; >= {GOAL_RATIO} is "
        f"good: {'met' if ratio >= GOAL_RATIO else 'below'}); to cp alone "
        f"{med.get('ratio_cp_only', nan):.2f}; to cp + fsync while the guest writes "
        f"{med.get('ratio_raw_writing', nan):.2f}.",
        "",
        f"Median guest write latency during the copy / before: "
        f"**{med.get('write_latency_ratio', nan):.1f}x** ({med.get('write_ms_before', nan):.2f}"
        f" ms -> {med.get('write_ms_during', nan):.2f} ms; during a plain cp + fsync of the "
        f"same file: {med.get('write_ms_during_raw', nan):.2f} ms).",
        "",
        "## Throughput",
        "",
        *table(rows, med, THROUGHPUT),
        "",
        "## Guest write latency",
        "",
        *table(rows, med, LATENCY),
    ]
    if short:
        lines += ["", f"Runs {short}: the copy took under 1 s; use a larger --disk-mib."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--disk-mib", type=int, default=1024)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.runs, args.disk_mib))
    command = f"{COMMAND} --runs {args.runs} --disk-mib {args.disk_mib}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command,
        "disk_mib": args.disk_mib,
        "page_cache": "sync + drop_caches (+1 s) before each measurement; their order alternates",
        "raw": "cp --sparse=never --reflink=never, then fsync of the copy",
        "runs": rows,
        "median": medians(rows),
    }
    (RESULTS / "storage.json").write_text(json.dumps(result, indent=2))
    text = report(rows, args.disk_mib, command)
    (RESULTS / "storage.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
