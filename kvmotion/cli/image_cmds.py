"""`kvmotion image ...`: the guest image built from Debian packages."""

from __future__ import annotations

from pathlib import Path

import typer

from kvmotion.cli.output import console
from kvmotion.lab.image import build_image

app = typer.Typer(help="The guest image.", no_args_is_help=True)


@app.command("build")
def build(
    cache_dir: Path | None = typer.Option(None, help="where images are cached"),
    force: bool = typer.Option(False, help="rebuild even if cached"),
) -> None:
    """Build (or find cached) the guest image: Debian cloud kernel, busybox initramfs, guestd."""
    image = build_image(cache_dir, force=force, log=lambda msg: console.print(f"  {msg}"))
    console.print(f"guest image {image.name} {image.digest[:12]}: {image.directory}")
