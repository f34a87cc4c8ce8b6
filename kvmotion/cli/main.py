"""`kvmotion ...`: the command line. Synchronous at its edge only; the services are asyncio.

Exit codes: 0 success, 1 execution failed, 2 usage, 3 refused (precondition; nothing changed),
4 not found, 5 unauthorized.
"""

from __future__ import annotations

import logging
import sys

import typer

from kvmotion.cli import (  # noqa: F401 (balancing_cmds adds its commands on import)
    balancing_cmds,
    center_cmds,
    console_cmds,
    evc_cmds,
    ha_cmds,
    host_cmds,
    image_cmds,
    image_store_cmds,
    inventory_cmds,
    lab_cmds,
    maintenance_cmds,
    rule_cmds,
    task_cmds,
    tls_cmds,
)
from kvmotion.cli.output import fail
from kvmotion.errors import KvmotionError

app = typer.Typer(
    name="kvmotion",
    help="Live-migrate running QEMU VMs between hosts (vMotion for QEMU).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(center_cmds.app, name="center")
app.add_typer(evc_cmds.cluster_app, name="cluster")
app.add_typer(inventory_cmds.datastore_app, name="datastore")
maintenance_cmds.register(host_cmds.app)
app.add_typer(host_cmds.app, name="host")
image_store_cmds.register(image_cmds.app)
app.add_typer(image_cmds.app, name="image")
app.add_typer(lab_cmds.app, name="lab")
app.add_typer(rule_cmds.app, name="rule")
app.add_typer(task_cmds.app, name="task")
app.add_typer(tls_cmds.app, name="tls")
inventory_cmds.vm_app.command("set-evc")(evc_cmds.vm_set_evc)
console_cmds.register(inventory_cmds.vm_app)
ha_cmds.register(inventory_cmds.vm_app)
app.add_typer(inventory_cmds.vm_app, name="vm")
app.command("demo")(lab_cmds.demo)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        app()
    except KvmotionError as exc:
        fail(exc)
