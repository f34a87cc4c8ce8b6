"""How `kvmotion` commands reach the center: their shared options and the synchronous edge.

Every command that talks to the center takes ``--center URL`` and ``--token`` (else the
environment, else the lab's center: :func:`~kvmotion.center.client.resolve_center`) and ``--json``.
Its async work runs in :func:`call`, the only ``asyncio.run`` of these commands, which turns a
kvmotion error into one line and an exit code (:func:`kvmotion.cli.output.fail`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

import typer

from kvmotion.center.client import CENTER_TOKEN_ENV, CENTER_URL_ENV, CenterClient, resolve_center
from kvmotion.cli.output import fail
from kvmotion.errors import InvalidInput, KvmotionError, NotActive

T = TypeVar("T")

CenterOpt = Annotated[
    str | None,
    typer.Option(
        "--center",
        metavar="URL",
        show_default=False,
        help=f"the center's URL, or several (comma-separated) of centers that share a database "
        f"(default: ${CENTER_URL_ENV}, else the lab's center)",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        show_default=False,
        help=f"the center's API token (default: ${CENTER_TOKEN_ENV}, else the lab's)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the center's JSON (for scripts)")]


def path_name(value: str) -> str:
    """A typer callback for a name that goes into the URL's path (a VM, host or cluster): '.',
    '..' or a '/' would make it another URL, and no name has them."""
    if value in ("", ".", "..") or "/" in value:
        raise typer.BadParameter(
            f"{value[:80]!r} cannot be a name (no '/', and not '.' or '..'): "
            "give the name as the list command shows it"
        )
    return value


def finite(value: float | None) -> float | None:
    """A typer callback for a number the center is sent: not inf (nor a number past it)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


@dataclass(frozen=True)
class CenterRef:
    """Where the center is, resolved once per command."""

    url: str
    token: str = field(repr=False)


def connect(center: str | None, token: str | None) -> CenterRef:
    """Resolve the center from the options; exits with a one-line error if none is known."""
    try:
        url, tok = resolve_center(center, token)
    except KvmotionError as exc:
        fail(exc)
    return CenterRef(url, tok)


def call(ref: CenterRef, action: Callable[[CenterClient], Awaitable[T]]) -> T:
    """Run ``action`` with a client of the center; a kvmotion error exits with its code."""

    async def run() -> T:
        async with CenterClient(ref.url, ref.token) as client:
            try:
                return await action(client)
            except NotActive as exc:  # a standby, which refused before doing anything
                active = exc.details.get("active_url")
                if not isinstance(active, str):
                    raise
        async with CenterClient(active, ref.token) as client:
            return await action(client)

    try:
        return asyncio.run(run())
    except KvmotionError as exc:
        fail(exc)
    except UnicodeEncodeError as exc:  # bytes the shell passed that are not UTF-8 text
        bad = exc.object[exc.start : exc.end]
        fail(InvalidInput(f"{bad!r} is not UTF-8 text: type names and values as UTF-8"))
