"""`kvmotion vm console NAME`: the VM's serial console in this terminal, through the center.

The center gives a ticket (``POST /v1/vms/{vm}/console``: a VM that is off or unknown is refused
there, with its code), then this terminal is joined to the console's websocket: the terminal in
raw mode, every key to the guest as typed, **Ctrl-]** detaches (as ``virsh console`` and telnet).
When the VM moves to another host the center follows it and says so in one line. With stdin not a
terminal (a pipe), its bytes are sent as they come and the console stays open after its end, until
the center closes it or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty

import typer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from kvmotion.center.client import center_tls
from kvmotion.cli.inventory_cmds import VmArg
from kvmotion.cli.output import err_console, fail
from kvmotion.cli.remote import CenterOpt, CenterRef, TokenOpt, call
from kvmotion.cli.remote import connect as connect_center
from kvmotion.errors import HostUnreachable, KvmotionError
from kvmotion.httpapi import ERRORS_BY_STATUS, WS_NORMAL

ESCAPE = 0x1D  # Ctrl-]
READ_CHUNK = 4096


def register(vm_app: typer.Typer) -> None:
    vm_app.command("console")(vm_console)


def vm_console(vm: VmArg, center: CenterOpt = None, token: TokenOpt = None) -> None:
    """Attach this terminal to a VM's serial console (Ctrl-] detaches)."""
    ref = connect_center(center, token)
    opened = call(ref, lambda c: c.open_console(vm, "serial"))
    interactive = sys.stdin.isatty()
    if interactive:
        err_console.print(
            f"Connected to the serial console of VM {vm} (Ctrl-] detaches; press Enter for a "
            "prompt)",
            highlight=False,
        )
    try:
        why = asyncio.run(attach(ws_url(ref, str(opened["url"])), interactive))
    except KeyboardInterrupt:
        why = "interrupted"
    except KvmotionError as exc:
        fail(exc)
    err_console.print(f"\n[console closed: {why}]", highlight=False, markup=False)


def ws_url(ref: CenterRef, path: str) -> str:
    base = ref.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    return base + path


async def attach(url: str, interactive: bool) -> str:
    """Join stdin and stdout to the console at ``url`` until either ends; returns why."""
    try:
        ssl = center_tls(url) if url.startswith("wss://") else None
        ws = await connect(url, open_timeout=15, compression=None, max_size=1024 * 1024, ssl=ssl)
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise HostUnreachable(f"the center did not open the console: {exc}") from exc
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if interactive else None
    if interactive:
        tty.setraw(fd)
    try:
        async with ws:
            return await _join(ws, fd)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _join(ws: ClientConnection, fd: int) -> str:
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(fd, lambda: keys.put_nowait(os.read(fd, READ_CHUNK)))
    detached = asyncio.Event()

    async def typing() -> None:
        while data := await keys.get():
            if ESCAPE in data:
                if before := data[: data.index(ESCAPE)]:
                    await ws.send(before)
                detached.set()
                return
            await ws.send(data)
        loop.remove_reader(fd)  # stdin ended (a pipe): keep showing the console

    async def showing() -> None:
        out = sys.stdout.buffer
        async for message in ws:
            out.write(message if isinstance(message, bytes) else message.encode())
            out.flush()

    tasks = [
        asyncio.create_task(typing()),
        asyncio.create_task(showing()),
        asyncio.create_task(detached.wait()),
    ]
    try:
        await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await task
    if detached.is_set():
        await ws.close()
        return "detached"
    code, reason = ws.close_code, ws.close_reason or ""
    if code is not None and code >= 4000 and code - 4000 in ERRORS_BY_STATUS:
        raise ERRORS_BY_STATUS[code - 4000](reason or f"the console ended (code {code})")
    if code not in (None, WS_NORMAL):
        raise KvmotionError(reason or f"the console ended (code {code})")
    return reason or "the center closed it"
