"""A typed QMP session over ``qemu.qmp``: the only place kvmotion talks QMP.

QMP errors (``ExecuteError``, connection and protocol errors) become :class:`QemuError` here, once.
Replies are JSON at this edge; callers that need structure parse them into dataclasses right away.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from kvmotion.errors import QemuError, QmpTimeout

log = logging.getLogger(__name__)

JSON = dict[str, Any]


@dataclass(frozen=True)
class VmStatus:
    """``query-status``: QEMU's run state (running, paused, prelaunch, inmigrate...)."""

    status: str
    running: bool

    @classmethod
    def parse(cls, reply: JSON) -> VmStatus:
        return cls(status=str(reply["status"]), running=bool(reply["running"]))


class QmpSession:
    """One QMP connection to one QEMU: ``connect()``, commands and events, ``close()``."""

    def __init__(self, socket_path: Path, name: str) -> None:
        self.socket_path = socket_path
        self.name = name
        self._client = QMPClient(name)
        self._client.logger = log.getChild(name)
        # QEMU's own chatter at INFO is noise for agent logs.
        self._client.logger.setLevel(logging.WARNING)

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect, retrying while QEMU creates its socket, until ``timeout``.

        Raises QemuError when QEMU does not answer in time.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        last: Exception | None = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                await asyncio.wait_for(self._client.connect(str(self.socket_path)), timeout=5)
                return
            except (QMPError, OSError, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.05)
        raise QemuError(
            f"{self.name}: QEMU's QMP socket {self.socket_path} did not answer in {timeout:.0f} s: "
            f"{last}"
        ) from last

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError) as exc:  # QEMU already gone: nothing to close
            log.debug("%s: disconnect: %s", self.name, exc)

    async def execute(
        self, command: str, arguments: JSON | None = None, timeout: float = 30.0, oob: bool = False
    ) -> Any:
        """Run one QMP command; raise QemuError with QEMU's own message on failure.
        ``oob``: out of band, answered even while QEMU's main loop is busy (commands that allow
        it, such as ``yank``)."""
        try:
            call = self._client.execute(command, arguments, oob=oob)
            return await asyncio.wait_for(call, timeout)
        except TimeoutError as exc:
            raise QmpTimeout(f"{self.name}: QMP {command} timed out after {timeout:.0f} s") from exc
        except QMPError as exc:
            raise QemuError(f"{self.name}: QMP {command} failed: {exc}", command=command) from exc

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor (SCM_RIGHTS) under ``name``, for ``fd`` addresses."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise QemuError(f"{self.name}: passing a file descriptor failed: {exc}") from exc
        await self.execute("getfd", {"fdname": name})

    def listener(self, names: list[str] | None = None) -> EventListener:
        """An event listener, registered; pair with :meth:`remove_listener`."""
        lst = EventListener(names)
        self._client.register_listener(lst)
        return lst

    def remove_listener(self, lst: EventListener) -> None:
        """Unregister ``lst``; a listener removed already is left alone."""
        if lst in self._client._listeners:
            self._client.remove_listener(lst)

    async def query_status(self) -> VmStatus:
        return VmStatus.parse(await self.execute("query-status"))
