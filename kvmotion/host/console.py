"""A VM's consoles on its host: the serial port and the screen, relayed to a websocket.

QEMU serves both on unix sockets in the VM's run directory (``qemu/cmdline.py``): the serial
port's socket takes one client at a time and QEMU writes everything the guest prints to
``console.log`` as well, whether a client is attached or not; the VNC socket takes any number.

- **Serial**: what a viewer reads comes from the log, from an offset it chooses (the last few KiB
  so the current prompt shows, or the log's start: the center's console, following a VM that just
  moved here, gets exactly what the guest printed since it resumed). The socket is shared by every
  viewer of the VM (:class:`SerialLine`): it carries keystrokes, and is kept drained, since QEMU
  would otherwise stall the guest's serial port once the socket's buffer is full.
- **Screen**: each viewer gets its own VNC connection, bytes relayed both ways (RFB is the
  viewer's business: noVNC in the web client).

A console ends when the VM's QEMU does (powered off, or moved to another host: the center's console
follows it there) or when its viewer leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from kvmotion.errors import Conflict, NotFound

log = logging.getLogger(__name__)

HISTORY_BYTES = 4096  # a new viewer sees the last output, so the prompt it arrives at
MAX_HISTORY_BYTES = 256 * 1024  # the most a viewer may ask to replay
TAIL_POLL_S = 0.03  # how often the log is looked at for new output
READ_CHUNK = 64 * 1024

Send = Callable[[bytes], Awaitable[None]]
Receive = Callable[[], Awaitable[bytes | None]]  # None: the viewer left


class SerialLine:
    """The one connection to a VM's serial socket, shared by every viewer of its console."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.viewers = 0
        self.ended = asyncio.Event()  # QEMU closed the socket: its process ended
        self._writer: asyncio.StreamWriter | None = None
        self._drain: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()

    async def attach(self) -> None:
        async with self._opening:  # two viewers arriving at once share one connection
            await self._open()
        self.viewers += 1

    async def _open(self) -> None:
        if self._writer is None:
            try:
                reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError as exc:
                raise Conflict(
                    f"the serial console of this VM cannot be opened ({exc.strerror}); a VM "
                    "started by an older kvmotion gets one after its next power-on",
                    code="console_unavailable",
                ) from exc
            self._drain = asyncio.create_task(self._drain_until_closed(reader))

    async def detach(self) -> None:
        self.viewers -= 1
        if self.viewers <= 0:
            await self.close()

    async def send(self, data: bytes) -> None:
        if self._writer is None or self.ended.is_set():
            return
        self._writer.write(data)
        with contextlib.suppress(OSError):
            await self._writer.drain()

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _drain_until_closed(self, reader: asyncio.StreamReader) -> None:
        """What comes out of the socket is also in the log (read from there): discard it."""
        with contextlib.suppress(OSError):
            while await reader.read(READ_CHUNK):
                pass
        self.ended.set()


class Consoles:
    """The serial lines of this host's VMs, by the VM's run directory."""

    def __init__(self) -> None:
        self._lines: dict[Path, SerialLine] = {}

    async def serial(
        self,
        socket_path: Path,
        log_path: Path,
        send: Send,
        receive: Receive,
        *,
        offset: int | None = None,
        history: int = HISTORY_BYTES,
        running: Callable[[], bool],
        started: Callable[[int], Awaitable[None]] | None = None,
    ) -> str:
        """Relay one viewer until it leaves or the VM's QEMU ends; returns why it ended.
        ``offset``: replay the log from there (None: its last ``history`` bytes); ``started``
        is told the log offset the relay starts at (what it sends after is the log from
        there, so a viewer that reconnects knows where to resume)."""
        line = self._lines.get(socket_path)
        if line is None or line.ended.is_set():
            line = self._lines[socket_path] = SerialLine(socket_path)
        await line.attach()
        try:
            typing = asyncio.create_task(_keys(line, receive))
            try:
                return await _tail(log_path, send, line, typing, offset, history, running, started)
            finally:
                typing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await typing
        finally:
            await line.detach()
            if line.viewers <= 0 and self._lines.get(socket_path) is line:
                del self._lines[socket_path]

    async def close(self) -> None:
        lines, self._lines = list(self._lines.values()), {}
        for line in lines:
            await line.close()


async def _keys(line: SerialLine, receive: Receive) -> None:
    """The viewer's keystrokes to the guest's serial port, until the viewer leaves."""
    while (data := await receive()) is not None:
        await line.send(data)


async def _tail(
    log_path: Path,
    send: Send,
    line: SerialLine,
    viewer: asyncio.Task[None],
    offset: int | None,
    history: int,
    running: Callable[[], bool],
    started: Callable[[int], Awaitable[None]] | None,
) -> str:
    try:
        log_file = open(log_path, "rb")  # noqa: SIM115 (closed below, after the loop)
    except OSError as exc:
        raise NotFound(
            f"the serial console's log is missing ({exc.strerror})", code="console_unavailable"
        ) from exc
    with log_file:
        size = os.fstat(log_file.fileno()).st_size
        if offset is None:
            offset = size - min(max(history, 0), MAX_HISTORY_BYTES)
        position = min(max(offset, size - MAX_HISTORY_BYTES, 0), size)
        if started is not None:
            await started(position)
        while True:
            ended = line.ended.is_set() or not running()
            log_file.seek(position)
            data = log_file.read(READ_CHUNK)
            if data:
                position += len(data)
                await send(data)
                continue
            if ended:
                return "the VM's QEMU ended on this host (powered off, or moved away)"
            if viewer.done():
                return "the viewer left"
            await asyncio.sleep(TAIL_POLL_S)


async def relay_unix(path: Path, send: Send, receive: Receive, what: str) -> str:
    """Relay bytes between a viewer and a unix socket (the VM's VNC server) until either ends."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError as exc:
        raise Conflict(
            f"{what} is not available ({exc.strerror}); a VM started by an older kvmotion gets "
            "one after its next power-on",
            code="console_unavailable",
        ) from exc

    async def outward() -> None:
        while data := await reader.read(READ_CHUNK):
            await send(data)

    async def inward() -> None:
        while (data := await receive()) is not None:
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(outward()), asyncio.create_task(inward())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        return "the viewer left" if first is tasks[1] else f"{what} closed"
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
