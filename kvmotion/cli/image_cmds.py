"""`kvmotion image ...`: the guest images built from Debian packages."""

from __future__ import annotations

from pathlib import Path

import typer

from kvmotion.cli.output import console
from kvmotion.cli.progress import human_bytes
from kvmotion.lab.image import build_image
from kvmotion.lab.osimage import RECIPES, build_os_image, find_os_image

app = typer.Typer(help="The guest images.", no_args_is_help=True)


def say(msg: str) -> None:
    """A build's progress step, as it happens."""
    console.print(f"  {msg}", markup=False, highlight=False)


@app.command("build")
def build(
    os_name: str | None = typer.Option(
        None,
        "--os",
        help=f"build an OS disk image instead ({', '.join(sorted(RECIPES))}): a server VM booted "
        "by firmware, configured by cloud-init",
        show_default=False,
    ),
    cache_dir: Path | None = typer.Option(None, help="where images are cached"),
    force: bool = typer.Option(False, help="rebuild even if cached"),
) -> None:
    """Build (or find cached) the test guest (Debian cloud kernel, busybox initramfs, guestd),
    or with --os an OS disk image (qcow2)."""
    if os_name is None:
        image = build_image(cache_dir, force=force, log=say)
        console.print(f"guest image {image.name} {image.digest[:12]}: {image.directory}")
        return
    cached = None if force else find_os_image(cache_dir, os_name)
    if cached is None:
        console.print(f"building the {os_name} image (mmdebstrap takes minutes)")
    os_image = cached or build_os_image(cache_dir, os_name=os_name, force=force, log=say)
    how = "cached" if cached else f"built in {os_image.build_seconds:.0f} s"
    console.print(
        f"{os_image.name} {os_image.digest[:12]} ({how}): {os_image.path}\n"
        f"  {human_bytes(os_image.size_bytes)} on disk, "
        f"{human_bytes(os_image.virtual_size_bytes)} virtual",
        markup=False,
        highlight=False,
    )
