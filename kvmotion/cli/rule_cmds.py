"""`kvmotion rule add|list|delete`: placement rules, as vSphere's DRS rules (migration/rules.py).

kvmotion rule add web-apart --anti-affinity --vm web1 --vm web2
kvmotion rule add db-pair --affinity --vm db1 --vm app1 --should
kvmotion rule add licensed --vm-host --vm db1 --host 172.16.0.172 --host 172.16.0.173
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.cli.output import console, fail, print_json
from kvmotion.cli.remote import CenterOpt, JsonOpt, TokenOpt, call, connect, path_name
from kvmotion.errors import InvalidInput

app = typer.Typer(help="Placement rules: VMs together, apart, or on some hosts (must or should).")


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="the rule's name", callback=path_name)],
    vm: Annotated[list[str], typer.Option(help="a VM the rule binds (repeatable)")],
    affinity: Annotated[bool, typer.Option("--affinity", help="the VMs run on one host")] = False,
    anti_affinity: Annotated[
        bool, typer.Option("--anti-affinity", help="the VMs run on different hosts")
    ] = False,
    vm_host: Annotated[
        bool, typer.Option("--vm-host", help="the VMs run on one of the --host hosts")
    ] = False,
    host: Annotated[
        list[str] | None, typer.Option(help="a host a --vm-host rule allows (repeatable)")
    ] = None,
    should: Annotated[
        bool, typer.Option("--should", help="preferred, not enforced [default: must]")
    ] = False,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Add a rule. One that contradicts must rules is refused, naming them."""
    kinds = [k for k, on in (("affinity", affinity), ("anti-affinity", anti_affinity),
                             ("vm-host", vm_host)) if on]  # fmt: skip
    if len(kinds) != 1:
        fail(InvalidInput("give one of --affinity, --anti-affinity, --vm-host"))
    body = {"name": name, "kind": kinds[0], "vms": vm, "hosts": host or [], "must": not should}
    rule = call(connect(center, token), lambda c: c.add_rule(body))
    if json_out:
        print_json(rule)
    else:
        console.print(f"added {rule['description']}", highlight=False)


@app.command("list")
def list_(json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None) -> None:
    """The rules, and whether the running VMs keep each one now."""
    rules = call(connect(center, token), lambda c: c.rules())
    if json_out:
        print_json(rules)
        return
    table = Table("rule", "kind", "must", "VMs", "hosts", "now")
    for r in rules:
        table.add_row(
            escape(r["name"]), r["kind"], "must" if r["must"] else "should",
            escape(", ".join(r["vms"])), escape(", ".join(r["hosts"]) or "-"),
            "kept" if r["kept"] else escape("broken: " + "; ".join(r["broken"])),
        )  # fmt: skip
    console.print(table)


@app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="the rule's name", callback=path_name)],
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a rule."""
    call(connect(center, token), lambda c: c.delete_rule(name))
    console.print(f"deleted rule {name}")
