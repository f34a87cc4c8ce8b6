"""`kvmotion center ...`: run the center on this machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from kvmotion.center.api import serve as serve_api
from kvmotion.center.service import Center, CenterConfig

app = typer.Typer(help="The center (inventory, tasks, migrations).", no_args_is_help=True)


@app.command("serve")
def serve(
    config: Path = typer.Option(
        Path("/etc/kvmotion/center.json"), "--config", "-c", help="center config file"
    ),
) -> None:
    """Run the center (what a systemd unit or `kvmotion lab up` starts)."""
    asyncio.run(serve_api(Center(CenterConfig.load(config))))
