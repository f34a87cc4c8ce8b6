"""`kvmotion host maintenance enter|exit HOST`: empty a host to patch it, as vSphere's.

``enter`` starts the center's evacuation (center/maintenance.py) and follows its task: each VM
as it starts moving and once moved, and what blocks the host, with the reason and what to do.
Ctrl-C stops following, not the evacuation (``kvmotion task cancel ID`` stops it).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from kvmotion.center.client import CenterClient
from kvmotion.cli.output import console, fail, print_json
from kvmotion.cli.remote import CenterOpt, JsonOpt, TokenOpt, call, connect, path_name
from kvmotion.errors import ExecutionError

POLL_S = 1.0
HostArg = Annotated[str, typer.Argument(help="host name", callback=path_name)]

app = typer.Typer(help="Maintenance mode: empty a host of running VMs, then hold it empty.")


def register(host_app: typer.Typer) -> None:
    host_app.add_typer(app, name="maintenance")


@app.command("enter")
def enter(
    host: HostArg,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="follow the evacuation until it ends")
    ] = True,
    evacuate_powered_off: Annotated[
        bool,
        typer.Option(
            "--evacuate-powered-off",
            help="register its powered-off VMs on other hosts too (their files stay)",
        ),
    ] = False,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Move every running VM off the host (live), then hold it in maintenance mode."""
    ref = connect(center, token)
    task = call(ref, lambda c: c.enter_maintenance(host, evacuate_powered_off))
    if not wait:
        if json_out:
            print_json(task)
        else:
            console.print(f"host {host} entering maintenance mode: task {task['id']}")
        return
    try:
        final = call(ref, lambda c: follow(c, int(task["id"]), quiet=json_out))
    except KeyboardInterrupt:
        console.print(
            f"\nstopped following; the evacuation goes on (task {task['id']}): "
            f"`kvmotion task cancel {task['id']}` stops it"
        )
        raise typer.Exit(130) from None
    if json_out:
        print_json(final)
    if final["state"] == "success":
        moved = final.get("summary", {}).get("moved", [])
        if not json_out:
            console.print(f"host {host} is in maintenance mode ({len(moved)} VMs moved)")
        return
    fail(ExecutionError(final.get("error") or final["state"], code="maintenance_not_entered"))


@app.command("exit")
def exit_(
    host: HostArg,
    move_back: Annotated[
        bool,
        typer.Option("--move-back", help="migrate back the VMs its evacuation moved off"),
    ] = False,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """End maintenance mode (the VMs moved off stay where they are, unless --move-back)."""
    info = call(connect(center, token), lambda c: c.exit_maintenance(host, move_back))
    if json_out:
        print_json(info)
        return
    console.print(f"host {host} exited maintenance mode")
    for back in info.get("moved_back", []):
        if "task" in back:
            console.print(f"moving {back['vm']} back (task {back['task']})", highlight=False)
        else:
            console.print(f"[yellow]{back['vm']} stays: {back['error']}[/]", highlight=False)


async def follow(client: CenterClient, task_id: int, quiet: bool = False) -> dict[str, Any]:
    """Print what the evacuation does as it changes, until its task ends; the final task."""
    said: set[str] = set()
    while True:
        task = await client.task(task_id)
        summary = task.get("summary") or {}
        lines = [f"moving {m['vm']} (task {m['task']})" for m in summary.get("moving", [])]
        lines += [f"moved {vm}" for vm in summary.get("moved", [])]
        lines += [f"blocked by {b['vm']}: {b['reason']}" for b in summary.get("blockers", [])]
        lines += [f"registered powered-off {vm} elsewhere"
                  for vm in summary.get("powered_off_moved", [])]  # fmt: skip
        lines += [f"powered-off {s['vm']} stays: {s['reason']}"
                  for s in summary.get("powered_off_stayed", [])]  # fmt: skip
        for line in lines:
            if line not in said and not quiet:
                console.print(line, highlight=False)
            said.add(line)
        if task["state"] in ("success", "error", "cancelled"):
            return task
        await asyncio.sleep(POLL_S)
