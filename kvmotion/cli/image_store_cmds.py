"""`kvmotion image import|list|delete`: users' OS images on datastores, through the center."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from kvmotion.cli.output import console, print_json
from kvmotion.cli.progress import human_bytes
from kvmotion.cli.remote import CenterOpt, JsonOpt, TokenOpt, call, connect, path_name


def import_image(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="a qcow2 or raw image"),
    ],
    datastore: Annotated[str, typer.Option(help="where to keep it", show_default=False)],
    name: Annotated[
        str | None,
        typer.Option(
            help="its name [default: the file's name without its extension]",
            callback=lambda v: None if v is None else path_name(v),
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="qcow2 or raw [default: detected, raw only if plain]"),
    ] = None,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Upload an OS image to a datastore, for `vm create --image`. The host checks it
    (format, no backing file, not corrupt, fits) and keeps nothing if it is refused."""
    image_name = name or file.name.split(".")[0]
    size = file.stat().st_size
    with Progress(
        TextColumn(f"uploading {escape(file.name)}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=console, disable=json_out,
    ) as bar:  # fmt: skip
        task = bar.add_task("upload", total=size)
        image = call(
            connect(center, token),
            lambda c: c.import_image(
                file, datastore, image_name, fmt, progress=lambda n: bar.advance(task, n)
            ),
        )
    if json_out:
        print_json(image)
        return
    console.print(
        f"imported image {image['name']} on {image['datastore']}: {image['format']}, "
        f"{human_bytes(image['virtual_size'])} virtual, {human_bytes(image['size'])} on disk; "
        f"create a VM from it with `kvmotion vm create NAME --image {image['name']} ...`",
        highlight=False,
    )


def list_images(
    json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """The OS images on every datastore, and the VMs made from each."""
    images = call(connect(center, token), lambda c: c.images())
    if json_out:
        print_json(images)
        return
    table = Table("image", "datastore", "format", "virtual size", "on disk", "VMs", "hosts")
    for image in images:
        table.add_row(
            escape(image["name"]), escape(image["datastore"]), image["format"],
            human_bytes(image["virtual_size"]), human_bytes(image["size"]),
            ", ".join(image.get("vms") or []) or "-", ", ".join(image.get("hosts") or []),
        )  # fmt: skip
    console.print(table)


def delete_image(
    name: Annotated[str, typer.Argument(help="the image", callback=path_name)],
    datastore: Annotated[str, typer.Option(help="where it is", show_default=False)],
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete an image (refused while a VM is made from it)."""
    call(connect(center, token), lambda c: c.delete_image(name, datastore))
    console.print(f"deleted image {name} from {datastore}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("import")(import_image)
    app.command("list")(list_images)
    app.command("delete")(delete_image)
