"""`kvmotion host ...`: run the agent on this machine."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer

from kvmotion.host.agent import HostAgent
from kvmotion.host.api import serve as serve_api
from kvmotion.host.config import HostConfig

app = typer.Typer(
    help="Hosts: add, list and show them (through the center); serve runs this machine's agent.",
    no_args_is_help=True,
)


@app.command("serve")
def serve(
    config: Path = typer.Option(
        Path("/etc/kvmotion/host.json"), "--config", "-c", help="host config file"
    ),
) -> None:
    """Run this machine's host agent (what a systemd unit or `kvmotion lab up` starts)."""
    cfg = HostConfig.load(config)
    logging.getLogger().setLevel(logging.INFO)
    asyncio.run(serve_api(HostAgent(cfg), cfg.management_address, cfg.port))
