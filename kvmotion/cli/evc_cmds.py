"""EVC from the command line: host modes, clusters and their baseline, per-VM modes.

`kvmotion host evc-modes HOST` shows what the seed's screenshots show: each EVC mode, whether the
host supports it (and what it lacks), fewest features first, and the host's highest mode.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.cli import host_cmds
from kvmotion.cli.output import console, print_json
from kvmotion.cli.remote import CenterOpt, JsonOpt, TokenOpt, call, connect, path_name

cluster_app = typer.Typer(
    help="Clusters: their EVC mode (CPU baseline) and balancing (DRS).", no_args_is_help=True
)

ModeArg = Annotated[str, typer.Argument(help="an EVC mode key, e.g. intel-merom; 'none' disables")]


def _mode(value: str) -> str | None:
    return None if value.lower() in ("none", "disabled", "off") else value


@host_cmds.app.command("evc-modes")
def host_evc_modes(
    host: Annotated[str, typer.Argument(help="host name, e.g. 172.16.0.172", callback=path_name)],
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """The EVC modes a host supports (fewest features first) and its highest."""
    result = call(connect(center, token), lambda c: c.host_evc_modes(host))
    if json_out:
        print_json(result)
        return
    gen = result.get("generation")
    console.print(
        f"host {result['host']}" + (f" (simulating {gen})" if gen else "")
        + f": highest EVC mode {result.get('highest') or 'none'}"
    )  # fmt: skip
    table = Table("EVC mode", "key", "features", "supported", "why not")
    for m in result["modes"]:
        table.add_row(
            escape(m["label"]),
            m["key"],
            str(m["feature_count"] or "-"),
            "[green]yes[/]" if m["supported"] else "[red]no[/]",
            "" if m["supported"] else escape(_short(m.get("reason") or "")),
        )
    console.print(table)


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _print_cluster(cluster: dict[str, Any]) -> None:
    console.print(
        f"cluster {cluster['name']}: EVC mode {cluster['evc_mode'] or 'disabled'}; "
        f"hosts {', '.join(cluster['hosts']) or '-'}; VMs {', '.join(cluster['vms']) or '-'}"
    )
    hosts = cluster["hosts"]
    if not hosts:
        return
    table = Table("EVC mode", *hosts, title="which hosts support each mode")
    for mode in cluster["evc_modes"]:
        marks = []
        for host in hosts:
            support = mode["hosts"].get(host)
            marks.append("-" if support is None else ("yes" if support["supported"] else "no"))
        current = " (current)" if mode["key"] == cluster["evc_mode"] else ""
        table.add_row(escape(mode["label"]) + current, *marks)
    console.print(table)


@cluster_app.command("list")
def cluster_list(
    json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """Every cluster with its EVC mode and hosts."""
    clusters = call(connect(center, token), lambda c: c.clusters())
    if json_out:
        print_json(clusters)
        return
    table = Table("cluster", "EVC mode", "hosts", "VMs")
    for cl in clusters:
        table.add_row(cl["name"], cl["evc_mode"] or "disabled", ", ".join(cl["hosts"]),
                      ", ".join(cl["vms"]))  # fmt: skip
    console.print(table)


@cluster_app.command("show")
def cluster_show(
    name: Annotated[str, typer.Argument(help="cluster name", callback=path_name)],
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """A cluster: its EVC mode, and which hosts support each mode."""
    cluster = call(connect(center, token), lambda c: c.cluster(name))
    if json_out:
        print_json(cluster)
    else:
        _print_cluster(cluster)


@cluster_app.command("create")
def cluster_create(
    name: Annotated[str, typer.Argument(help="cluster name")],
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create an empty cluster."""
    cluster = call(connect(center, token), lambda c: c.create_cluster(name))
    print_json(cluster) if json_out else _print_cluster(cluster)


@cluster_app.command("add-host")
def cluster_add_host(
    name: Annotated[str, typer.Argument(help="cluster name", callback=path_name)],
    host: Annotated[str, typer.Argument(help="host name", callback=path_name)],
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Move a host into a cluster (refused if it cannot support the cluster's EVC mode)."""
    cluster = call(connect(center, token), lambda c: c.add_cluster_host(name, host))
    print_json(cluster) if json_out else _print_cluster(cluster)


@cluster_app.command("set-evc")
def cluster_set_evc(
    name: Annotated[str, typer.Argument(help="cluster name", callback=path_name)],
    mode: ModeArg,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Set the cluster's EVC mode; refused, naming hosts or VMs, when it cannot be applied."""
    cluster = call(connect(center, token), lambda c: c.set_cluster_evc(name, _mode(mode)))
    print_json(cluster) if json_out else _print_cluster(cluster)


def vm_set_evc(
    vm: Annotated[str, typer.Argument(help="VM name", callback=path_name)],
    mode: ModeArg,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Per-VM EVC: set while powered off, never above the cluster's mode."""
    result = call(connect(center, token), lambda c: c.set_vm_evc(vm, _mode(mode)))
    if json_out:
        print_json(result)
    else:
        console.print(
            f"VM {result['name']}: EVC mode {result.get('evc_mode') or 'from its cluster'}"
        )
