"""How the CLI speaks: one-line errors that say what to do, exit codes by error kind, JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, NoReturn

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from kvmotion.errors import (
    KvmotionError,
    NotFound,
    PreconditionError,
    Unauthorized,
)

UNWRAPPED_WIDTH = 1000  # "as wide as it needs": rich has no unbounded width


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's wrapping at its width. Anything else (a pipe, a log file, CI) reads
    one line as one line: no wrapping, so a path, an id or a timeline step is never cut, and
    tables as wide as they need unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    width = None if os.environ.get("COLUMNS") else UNWRAPPED_WIDTH
    return Console(stderr=stderr, soft_wrap=True, width=width)


console = _console()
err_console = _console(stderr=True)


def exit_code(exc: KvmotionError) -> int:
    if isinstance(exc, Unauthorized):
        return 5
    if isinstance(exc, NotFound):
        return 4
    if isinstance(exc, PreconditionError):
        return 3
    return 1


def fail(exc: KvmotionError) -> NoReturn:
    """One line, ``error (code): message``; the message is text (a name in it like ``[/x]`` is
    not markup), then exit with the error's code."""
    err_console.print(
        f"[bold red]error[/] ({escape(exc.code)}): {escape(exc.message)}",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(exit_code(exc))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    print(json.dumps(_plain(value), indent=2, default=str))
