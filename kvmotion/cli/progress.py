"""How the CLI shows a task: a live progress bar while it runs; its timeline and summary after.

``vm migrate`` and ``task watch`` share :func:`follow`. Reading a task (progress numbers, timeline
offsets) is pure; :func:`watch` follows the center's task stream (pushed as the task changes),
:func:`cancel_and_wait` polls it; :func:`follow` is the
synchronous edge, where Ctrl-C cancels the task through the API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from kvmotion.center.client import CenterClient
from kvmotion.center.tasks import STEPS
from kvmotion.cli.output import console, err_console, fail, print_json
from kvmotion.cli.remote import CenterRef, call
from kvmotion.errors import Conflict, ExecutionError, KvmotionError

POLL_INTERVAL_S = 0.2
DEFAULT_WATCH_TIMEOUT_S = 3600.0  # generous: a large VM over a slow migration link
CANCEL_WAIT_S = 120.0  # an abort ends the destination's QEMU and resumes the source
FINAL_STATES = frozenset({"success", "error", "cancelled"})

STEP_TEXT: dict[str, str] = {
    "prepared": "destination QEMU started, listening on its migration address",
    "disk_copy": "disks being copied while the VM runs (guest writes go to both)",
    "disks_ready": "every disk copy caught up; it now tracks each guest write",
    "disks_switched": "VM switched to its copied disks; old files removed",
    "traffic_taken": "the destination took the VM's traffic: frames wait there for the resume",
    "mac_learned": "the VM network learned the VM on the destination (its bridge saw it)",
    **dict(STEPS),
}
DISK_PHASES = ("disk_copy", "disk_switch")

Task = dict[str, Any]


# -- reading a task (pure) --------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One progress line of a running task."""

    phase: str
    percent: float
    mbytes_per_s: float | None  # QEMU's throughput, in MB/s
    pass_no: int | None
    eta_s: float | None  # remaining bytes at the current throughput


def snapshot(task: Task) -> Snapshot:
    summary = task.get("summary") or {}
    mbit = summary.get("throughput_mbps")  # QEMU's "mbps" is megabits per second
    bytes_per_s = float(mbit) * 1e6 / 8 if mbit else None
    remaining = summary.get("remaining_bytes")
    disks = summary.get("disk_copy") or {}
    if task.get("phase") in DISK_PHASES and disks:
        rate = disks.get("throughput_bps")
        bytes_per_s = float(rate) if rate else None
        remaining = int(disks.get("total_bytes") or 0) - int(disks.get("copied_bytes") or 0)
    eta = None
    if bytes_per_s and remaining is not None and task.get("state") == "running":
        eta = int(remaining) / bytes_per_s
    passes = summary.get("passes")
    return Snapshot(
        phase=str(task.get("phase") or task.get("state") or "?"),
        percent=float(task.get("progress") or 0.0),
        mbytes_per_s=bytes_per_s / 1e6 if bytes_per_s else None,
        pass_no=int(passes) if passes is not None else None,
        eta_s=eta,
    )


@dataclass(frozen=True)
class Step:
    name: str
    offset_ms: int  # since the migration was requested
    text: str


def timeline(task: Task) -> list[Step]:
    entries = sorted(task.get("timeline") or [], key=lambda e: float(e["time"]))
    if not entries:
        return []
    start = next((float(e["time"]) for e in entries if e["step"] == "requested"), None)
    start = float(entries[0]["time"]) if start is None else start
    steps = []
    for entry in entries:
        text = STEP_TEXT.get(entry["step"], "")
        if entry.get("detail"):
            text = f"{text} ({entry['detail']})" if text else str(entry["detail"])
        offset = round((float(entry["time"]) - start) * 1000)
        steps.append(Step(str(entry["step"]), offset, text))
    return steps


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value} ms"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def summary_rows(task: Task) -> list[tuple[str, str]]:
    s = task.get("summary") or {}
    steps = timeline(task)
    task_ms = s.get("task_time_ms")
    if task_ms is None and steps:
        task_ms = steps[-1].offset_ms
    mbit = s.get("throughput_mbps")
    rows = [("total task time", _ms(task_ms))]
    disks = s.get("disk_copy")
    if disks:
        rate = disks.get("throughput_bps")
        rows += [
            ("disks copied", f"{human_bytes(disks.get('copied_bytes'))} of "
             f"{human_bytes(disks.get('total_bytes'))} to {disks.get('datastore')}"),
            ("disk copy time (to ready)", _ms(disks.get("copy_time_ms"))),
            ("disk copy throughput", "-" if not rate else f"{float(rate) / 1e6:.1f} MB/s"),
        ]  # fmt: skip
        if (task.get("request") or {}).get("type") == "storage":
            return rows
    return [
        *rows,
        # The pause the user sees first: the guest stopped from its stun on the source to its
        # resume on the destination (QEMU's downtime counts only the source's part of it).
        ("guest stopped (stunned → resumed)", _ms(s.get("stun_to_resume_ms"))),
        ("resumed → VM network learned it", _ms(s.get("resume_to_mac_learned_ms"))),
        ("QEMU downtime (source's count)", _ms(s.get("downtime_ms"))),
        ("memory transferred", human_bytes(s.get("transferred_bytes"))),
        ("memory streams", "-" if s.get("streams") is None else str(s["streams"])),
        ("passes", "-" if s.get("passes") is None else str(s["passes"])),
        ("QEMU setup time", _ms(s.get("setup_time_ms"))),
        ("QEMU migration time", _ms(s.get("total_time_ms"))),
        ("request → first byte", _ms(s.get("request_to_first_byte_ms"))),
        ("resume → done", _ms(s.get("resume_to_done_ms"))),
        ("throughput", "-" if not mbit else f"{float(mbit) / 8:.1f} MB/s"),
    ]


# -- rendering --------------------------------------------------------------------------------
def _route(task: Task) -> str:
    req = task.get("request") or {}
    to_ds = f" (disks to {req['datastore']})" if req.get("datastore") else ""
    if req.get("type") == "storage":
        return f"on {req.get('source')}{to_ds}"
    if "source" in req and "dest" in req:
        return f"{req['source']} → {req['dest']}{to_ds}"
    return ""


def print_task(task: Task, out: Console = console) -> None:
    """A task as a person reads it: what, its state, its timeline and its numbers."""
    state = str(task.get("state"))
    colour = {"success": "green", "error": "red", "cancelled": "yellow"}.get(state, "cyan")
    what = escape(f"task {task['id']}: {task.get('kind')} {task.get('target')} {_route(task)}")
    out.print(
        f"{what}  [{colour}]{state}[/] (phase {task.get('phase')}, {task.get('progress')} %)",
        highlight=False,
    )
    steps = timeline(task)
    if steps:
        table = Table("step", "at", "what", title="timeline", title_justify="left")
        for step in steps:
            table.add_row(step.name, f"+{step.offset_ms} ms", escape(step.text))
        out.print(table)
    if task.get("summary"):
        table = Table("measure", "value", title="summary", title_justify="left")
        for label, value in summary_rows(task):
            table.add_row(label, value)
        out.print(table)
    out.print(f"samples: {len(task.get('samples') or [])} pre-copy passes recorded")
    for warning in task.get("warnings") or []:
        text = escape(f"({warning.get('code')}): {warning.get('message')}")
        out.print(f"[yellow]warning[/] {text}", highlight=False)
    if task.get("error"):
        text = escape(f"({task.get('error_code')}): {task['error']}")
        out.print(f"[red]error[/] {text}", highlight=False)


def exit_for(task: Task) -> None:
    """Exit 1, in one line, unless the task succeeded."""
    state = task.get("state")
    if state == "success":
        return
    if state == "error":
        fail(ExecutionError(f"task {task['id']} failed: {task.get('error')}", code=_code(task)))
    if state == "cancelled":
        fail(
            ExecutionError(
                f"task {task['id']} was cancelled: {task.get('error')}", code="cancelled"
            )
        )
    watch = f"`kvmotion task watch {task['id']}`"
    fail(KvmotionError(f"task {task['id']} is still {state}; follow it with {watch}"))


def _code(task: Task) -> str:
    return str(task.get("error_code") or "task_failed")


# -- following a task -------------------------------------------------------------------------
async def watch(client: CenterClient, task_id: int, timeout_s: float, show: bool) -> Task:
    """Follow the task's stream until it ends, with a live progress bar when ``show``;
    bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    columns = (
        TextColumn("[bold]{task.fields[phase]:<10}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f} %"),
        TextColumn("{task.fields[rate]:>11}"),
        TextColumn("pass {task.fields[pass_no]:>3}"),
        TextColumn("ETA {task.fields[eta]:>5}"),
    )
    with Progress(*columns, console=console, disable=not show) as bar:
        line = bar.add_task(f"task {task_id}", total=100, phase="", rate="", pass_no="-", eta="-")
        task = await client.task(task_id)
        updates = client.follow_task(task_id)
        try:
            while True:
                snap = snapshot(task)
                bar.update(
                    line,
                    completed=snap.percent,
                    phase=snap.phase,
                    rate="-" if snap.mbytes_per_s is None else f"{snap.mbytes_per_s:.1f} MB/s",
                    pass_no="-" if snap.pass_no is None else str(snap.pass_no),
                    eta=_duration(snap.eta_s),
                )
                if task.get("state") in FINAL_STATES:
                    return task
                left = deadline - time.monotonic()
                try:
                    async with asyncio.timeout(max(left, 0.0)):
                        pushed = await _next_update(updates)
                        if pushed is None:  # the stream ended early (the center restarting?)
                            await asyncio.sleep(POLL_INTERVAL_S)
                            updates = client.follow_task(task_id)
                        task = pushed or await client.task(task_id)
                except TimeoutError:
                    raise KvmotionError(
                        f"task {task_id} is still {task.get('state')} after {timeout_s:.0f} s; "
                        f"follow it with `kvmotion task watch {task_id}`",
                        code="watch_timeout",
                    ) from None
        finally:
            await updates.aclose()


async def _next_update(updates: AsyncIterator[Task]) -> Task | None:
    async for task in updates:
        return task
    return None


async def cancel_and_wait(client: CenterClient, task_id: int, timeout_s: float) -> Task:
    """Ask the center to cancel, then wait (bounded) for the task to end; returns it."""
    try:
        await client.cancel_task(task_id)
    except Conflict as exc:  # it ended meanwhile, or is past undoing: report how it ends
        if exc.code == "too_late_to_cancel":
            err_console.print(f"task {task_id}: {exc.message}", highlight=False)
    deadline = time.monotonic() + timeout_s
    while True:
        task = await client.task(task_id)
        if task.get("state") in FINAL_STATES or time.monotonic() > deadline:
            return task
        await asyncio.sleep(POLL_INTERVAL_S)


def follow(ref: CenterRef, task_id: int, timeout_s: float, json_out: bool) -> Task:
    """Watch a task to its end and show it; Ctrl-C cancels it. Exits 1 unless it succeeded."""
    try:
        task = call(ref, lambda c: watch(c, task_id, timeout_s, show=not json_out))
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: cancelling task {task_id} (the VM keeps running where it was)...",
            highlight=False,
        )
        task = call(ref, lambda c: cancel_and_wait(c, task_id, CANCEL_WAIT_S))
        err_console.print(f"task {task_id} is now {task.get('state')}", highlight=False)
    if json_out:
        print_json(task)
    else:
        print_task(task)
    exit_for(task)
    return task
