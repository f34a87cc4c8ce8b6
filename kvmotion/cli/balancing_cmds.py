"""`kvmotion cluster balancing` and `kvmotion cluster recommendations list|apply`: DRS from the
command line (center/balancing.py).

kvmotion cluster balancing prod --mode manual --threshold 3     # settings (shown without options)
kvmotion cluster recommendations list prod                       # a pass now: loads and moves
kvmotion cluster recommendations apply prod                      # start every pending one
kvmotion cluster recommendations apply prod --id 7               # or those numbered
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.cli.evc_cmds import cluster_app
from kvmotion.cli.output import console, fail, print_json
from kvmotion.cli.remote import CenterOpt, JsonOpt, TokenOpt, call, connect, path_name
from kvmotion.errors import ExecutionError

ClusterArg = Annotated[str, typer.Argument(help="cluster name", callback=path_name)]
recommendations_app = typer.Typer(
    help="Balancing's recommendations: what it would move and why.", no_args_is_help=True
)
cluster_app.add_typer(recommendations_app, name="recommendations")


@cluster_app.command("balancing")
def balancing(
    name: ClusterArg,
    mode: Annotated[
        str | None, typer.Option(help="off, manual (recommend) or automatic (move)")
    ] = None,
    threshold: Annotated[
        int | None, typer.Option(min=1, max=5, help="1 only mandatory moves ... 5 aggressive")
    ] = None,
    window: Annotated[
        float | None, typer.Option(help="seconds the VMs' load is averaged over (10-900)")
    ] = None,
    hold: Annotated[
        float | None, typer.Option(help="seconds a moved VM stays where it is (0-86400)")
    ] = None,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Show a cluster's balancing (DRS) settings and latest pass; options change them."""
    ref = connect(center, token)
    if any(v is not None for v in (mode, threshold, window, hold)):
        call(ref, lambda c: c.set_balancing(name, mode=mode, threshold=threshold,
                                            window_s=window, hold_s=hold))  # fmt: skip
    state = call(ref, lambda c: c.balancing(name))
    if json_out:
        print_json(state)
        return
    s = state["settings"]
    console.print(
        f"cluster {name}: balancing {s['mode']}, threshold {s['threshold']}, load averaged "
        f"over {s['window_s']:g} s, moved VMs held {s['hold_s']:g} s"
    )
    if state["latest"]:
        _print_pass(state["latest"])


@recommendations_app.command("list")
def list_(
    name: ClusterArg, json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """Run a balancing pass now and show the hosts' loads and the moves it recommends."""
    result = call(connect(center, token), lambda c: c.recommendations(name))
    print_json(result) if json_out else _print_pass(result)


@recommendations_app.command("apply")
def apply(
    name: ClusterArg,
    id: Annotated[
        list[int] | None, typer.Option("--id", help="a recommendation's number (repeatable)")
    ] = None,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Start the latest pass's recommendations (all pending, or those numbered), a migration
    task each."""
    result = call(connect(center, token), lambda c: c.apply_recommendations(name, id))
    applied = result["applied"]
    if json_out:
        print_json(result)
    elif not applied:
        console.print(f"cluster {name}: no pending recommendation (list them first)")
    for rec in applied:
        if json_out:
            continue
        if rec.get("error"):
            console.print(f"[red]#{rec['id']} {escape(rec['vm'])}: {escape(rec['error'])}[/]")
        else:
            console.print(f"#{rec['id']} {rec['vm']} {rec['source']} -> {rec['dest']}: "
                          f"task {rec['task']}", highlight=False)  # fmt: skip
    failed = [r for r in applied if r.get("error")]
    if failed:
        fail(ExecutionError(f"{len(failed)} recommendation(s) not applied", code="not_applied"))


def _print_pass(result: dict[str, Any]) -> None:
    hosts = Table("host", "CPU", "memory", title=f"cluster {result['cluster']} at {result['at']}")
    for h in result["hosts"]:
        hosts.add_row(h["host"], f"{h['cpu']:.0%}", f"{h['memory']:.0%}")
    console.print(hosts)
    tolerance = result["tolerance"]
    console.print(
        f"imbalance {result['imbalance']:.3f}"
        + (f" (tolerance {tolerance:.3f})" if tolerance is not None else "")
        + f", {result['imbalance_after']:.3f} once the moves are made",
        highlight=False,
    )
    for error in result.get("errors", []):
        console.print(f"[yellow]load not read: {escape(error)}[/]")
    recs = result["recommendations"]
    if recs:
        table = Table("#", "VM", "from", "to", "cost", "state", "why")
        for r in recs:
            table.add_row(str(r["id"]), r["vm"], r["source"], r["dest"], _cost(r),
                          r["state"], escape(r["reason"]))  # fmt: skip
        console.print(table)
    console.print(f"no more moves: {escape(result['why_no_more'])}" if result["why_no_more"]
                  else "")  # fmt: skip


def _cost(rec: dict[str, Any]) -> str:
    prediction = rec.get("prediction") or {}
    if "total_s" in prediction:
        downtime = prediction.get("downtime_ms")
        return f"{prediction['total_s']:.0f} s" + (
            f", {downtime:.0f} ms down" if downtime is not None else ""
        )
    return f"~{rec['move_s']:.0f} s (estimated)"
