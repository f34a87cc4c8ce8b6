"""`kvmotion task ...`: the center's tasks (migrations): list, show, watch, cancel."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.center.report import write_report
from kvmotion.cli.output import console, print_json
from kvmotion.cli.progress import DEFAULT_WATCH_TIMEOUT_S, follow, print_task
from kvmotion.cli.remote import CenterOpt, JsonOpt, TokenOpt, call, connect

app = typer.Typer(help="Tasks: the center's record of migrations.", no_args_is_help=True)

TaskArg = Annotated[int, typer.Argument(help="task id", show_default=False)]


@app.command("list")
def task_list(
    limit: Annotated[int, typer.Option(min=1, max=500, help="how many, newest first")] = 20,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Recent tasks, newest first."""
    tasks = call(connect(center, token), lambda c: c.tasks(limit))
    if json_out:
        print_json(tasks)
        return
    table = Table("id", "VM", "from", "to", "state", "done", "started", "took", "error")
    for t in tasks:
        req = t.get("request") or {}
        kind = "" if t["kind"] == "migrate" else f"{t['kind']} "
        state = t["state"] if t["state"] != "running" else f"running ({t.get('phase')})"
        table.add_row(
            str(t["id"]),
            escape(f"{kind}{t['target']}"),
            req.get("source", "-"),
            req.get("dest", "-"),
            _state(t["state"], state),
            f"{t.get('progress', 0):.0f} %",
            _time(t.get("created_at")),
            _took(t),
            escape(t.get("error") or ""),
        )
    console.print(table)


@app.command("show")
def task_show(
    task_id: TaskArg, json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """One task: state, timeline, summary, samples and error."""
    task = call(connect(center, token), lambda c: c.task(task_id))
    if json_out:
        print_json(task)
        return
    print_task(task)


@app.command("watch")
def task_watch(
    task_id: TaskArg,
    timeout: Annotated[
        float, typer.Option(min=1, help="stop watching after this many seconds")
    ] = DEFAULT_WATCH_TIMEOUT_S,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Follow a task to its end with a live progress bar; Ctrl-C cancels it. Exit 1 unless it
    succeeded."""
    follow(connect(center, token), task_id, timeout, json_out)


@app.command("cancel")
def task_cancel(
    task_id: TaskArg, json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """Ask the center to cancel a task (a migration past switchover completes instead)."""
    task = call(connect(center, token), lambda c: c.cancel_task(task_id))
    if json_out:
        print_json(task)
        return
    console.print(
        f"cancel requested for task {task_id} ({task['state']}, phase {task.get('phase')}); "
        f"`kvmotion task watch {task_id}` shows how it ends",
        highlight=False,
    )


def _state(state: str, text: str) -> str:
    colour = {"success": "green", "error": "red", "cancelled": "yellow"}.get(state, "cyan")
    return f"[{colour}]{escape(text)}[/]"


def _time(iso: str | None) -> str:
    """Local time; the date too unless it is today."""
    if not iso:
        return "-"
    when = datetime.fromisoformat(iso)
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone()
    today = when.date() == datetime.now().astimezone().date()
    return when.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M")


def _took(task: dict[str, Any]) -> str:
    start, end = task.get("created_at"), task.get("finished_at")
    if not start or not end:
        return "-"
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return f"{seconds:.1f} s"


@app.command("report")
def task_report(
    task_id: Annotated[int, typer.Argument(help="task id")],
    out: Annotated[Path, typer.Option(help="directory for task-ID.png and task-ID.json")] = Path(
        "."
    ),
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write a migration's telemetry as a chart (PNG) and a document (JSON)."""
    task = call(connect(center, token), lambda c: c.task(task_id))
    png, doc = write_report(task, out)
    console.print(f"wrote {png} and {doc}", highlight=False)
