"""`kvmotion cluster ha` and `kvmotion vm ha-priority`: HA from the command line (center/ha.py).

kvmotion cluster ha prod --enable --failures-to-tolerate 1   # settings, then the state now
kvmotion cluster ha prod                                      # each host's HA state, the reserve,
                                                              # the latest restarts and why
kvmotion vm ha-priority db1 high                              # restarted first (or: disabled)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.cli.evc_cmds import cluster_app
from kvmotion.cli.output import console, print_json
from kvmotion.cli.remote import CenterOpt, JsonOpt, TokenOpt, call, connect, path_name

ClusterArg = Annotated[str, typer.Argument(help="cluster name", callback=path_name)]
STATE_STYLE = {"connected": "green", "not responding": "yellow", "isolated": "yellow",
               "failed": "red"}  # fmt: skip


@cluster_app.command("ha")
def ha(
    name: ClusterArg,
    enable: Annotated[
        bool | None, typer.Option("--enable/--disable", help="turn HA on or off")
    ] = None,
    failure_time: Annotated[
        float | None,
        typer.Option(help="seconds a host is silent on both channels before it is failed (8-600)"),
    ] = None,
    isolation_response: Annotated[
        str | None, typer.Option(help="leave-on, power-off or shutdown: what an isolated host does")
    ] = None,
    failures_to_tolerate: Annotated[
        int | None,
        typer.Option(min=0, max=32, help="admission control: hosts that may fail (0: off)"),
    ] = None,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Show a cluster's HA: settings, each host's state, the reserve, the latest restarts;
    options change the settings."""
    ref = connect(center, token)
    changes = {
        "enabled": enable, "failure_s": failure_time, "isolation_response": isolation_response,
        "failures_to_tolerate": failures_to_tolerate,
    }  # fmt: skip
    if any(v is not None for v in changes.values()):
        call(ref, lambda c: c.set_ha(name, **changes))
    state = call(ref, lambda c: c.ha(name))
    if json_out:
        print_json(state)
        return
    print_ha(state)


def print_ha(state: dict[str, Any]) -> None:
    s = state["settings"]
    if not s["enabled"]:
        console.print(f"cluster {escape(state['cluster'])}: HA disabled")
        return
    console.print(
        f"cluster {escape(state['cluster'])}: HA enabled; a host is failed after "
        f"{s['failure_s']:g} s silent on the management network and its datastores; isolation "
        f"response {s['isolation_response']}"
    )
    hosts = Table("host", "HA state", "since", "why", box=None, pad_edge=False)
    for h in state["hosts"]:
        kind = h["state"] or "not heard yet"
        since = _clock(h["since"]) if h.get("since") else ""
        hosts.add_row(h["host"], f"[{STATE_STYLE.get(kind, 'white')}]{kind}[/]", since,
                      escape(h.get("reason") or ""))  # fmt: skip
    console.print(hosts)
    r = state["reserve"]
    if r["failures"]:
        console.print(
            f"admission control: {r['failures']} host failure(s) tolerated; {r['reserved_mib']} "
            f"MiB of {r['total_mib']} MiB kept free; powered-on VMs use {r['used_mib']} of "
            f"{r['usable_mib']} MiB usable"
        )
    else:
        console.print("admission control: off (0 host failures to tolerate)")
    if not state["restarts"]:
        console.print("no HA restarts")
        return
    restarts = Table("task", "VM", "from", "to", "state", "restart", "why", box=None,
                     pad_edge=False)  # fmt: skip
    for t in state["restarts"]:
        summary = t.get("summary") or {}
        took = f"{summary['restart_s']:.1f} s" if "restart_s" in summary else ""
        restarts.add_row(
            str(t["id"]), t["target"], t["request"].get("failed_host", ""),
            summary.get("dest", ""), t["phase"] if t["state"] == "running" else t["state"],
            took, escape(t["request"].get("reason", "")),
        )  # fmt: skip
    console.print(restarts)


def _clock(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%H:%M:%S")


def register(vm_app: typer.Typer) -> None:
    vm_app.command("ha-priority")(vm_ha_priority)


def vm_ha_priority(
    vm: Annotated[str, typer.Argument(help="VM name", callback=path_name)],
    priority: Annotated[str, typer.Argument(help="high, medium, low, or disabled (never)")],
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Set the order HA restarts a VM in when its host fails (or never restart it)."""
    done = call(connect(center, token), lambda c: c.set_ha_priority(vm, priority))
    console.print(f"VM {escape(done['vm'])}: HA restart priority {done['ha_priority']}")
