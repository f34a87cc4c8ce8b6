"""The destination's side of a live migration (the source's: :mod:`kvmotion.host.migration`).

QEMU was started paused with ``-incoming defer``; listen on the migration address; when the stream
completes, ``cont`` at once (the guest resumes here) and ``announce-self`` so the VM network learns
the VM's new place. In post-copy the guest resumes here as soon as QEMU enters ``postcopy-active``
(QEMU starts it once the device state is in) and faults in the pages it lacks from the source; a
broken post-copy stream is recovered with ``migrate-recover`` (:mod:`kvmotion.center.postcopy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qemu.qmp import EventListener

from kvmotion import faults
from kvmotion.errors import QemuError, QmpTimeout
from kvmotion.host import switchover
from kvmotion.host.migrationview import (
    ACTIVE,
    ANNOUNCE,
    POSTCOPY_PAUSED,
    MigrationMode,
    MigrationStats,
    MigrationView,
    capabilities_arg,
    listening_port,
    require_phase,
)
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (the kernel's choice). Not a listening socket handed
    to QEMU as NBD gets (host/storage.py): ``getfd`` needs QEMU's main loop, which a post-copy
    recovery cannot count on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class Incoming:
    """The destination side: listen, and resume the guest the moment the stream completes."""

    def __init__(
        self,
        qmp: QmpSession,
        name: str,
        on_resumed: Callable[[], None],
        before_resume: Callable[[], Awaitable[None]] | None = None,
        notify: Callable[[], None] = lambda: None,
        learned: Callable[[], Awaitable[float | None]] | None = None,
    ) -> None:
        self.qmp = qmp
        # When the VM network learned the VM here after it resumed (host/taps.py wait_learned):
        # the user's traffic reaches it from then on.
        self.learned = learned
        self._learning: asyncio.Task[None] | None = None
        # Lets the source's agent say the guest stopped there (host/switchover.py).
        self.switchover_token = secrets.token_urlsafe(24)
        self.notify = notify  # called at each change of phase
        self.on_resumed = on_resumed
        self.before_resume = before_resume  # e.g. stop serving the disks over NBD
        self.view = MigrationView(side="destination", phase="setup")
        self.log = log.getChild(name)
        self._task: asyncio.Task[None] | None = None
        self._events: EventListener | None = None
        self._recover_uri: str | None = None  # where a broken post-copy stream is awaited

    async def listen(
        self, address: str, *, mode: MigrationMode = MigrationMode(), tls_creds: str | None = None
    ) -> str:
        """Start listening on ``address`` (the migration network), accepting only TLS streams
        from a certified host with ``tls_creds``, as ``mode`` says (the source's must match);
        return the URI to send to."""
        capabilities = [("events", True), ("late-block-activate", True), *mode.capabilities()]
        await self.qmp.execute("migrate-set-capabilities", capabilities_arg(capabilities))
        params = {"tls-creds": tls_creds or ""} | mode.parameters()
        await self.qmp.execute("migrate-set-parameters", params)
        # Listen for MIGRATION events before the stream can start, so none is missed.
        self._events = self.qmp.listener(["MIGRATION"])
        await self.qmp.execute("migrate-incoming", {"uri": f"tcp:{address}:0"})
        uri = f"tcp:{address}:{listening_port(await self.qmp.execute('query-migrate'))}"
        self.view.uri = uri
        self.view.phase = "listening"
        self.view.marks["listening"] = time.time()
        self._task = asyncio.create_task(self._watch(), name="incoming-migration")
        return uri

    async def _watch(self) -> None:
        """Resume on the MIGRATION event ``completed`` (no polling delay in the downtime), or
        on ``postcopy-active``: from then on the guest runs here, and the pages it still lacks
        come from the source as it touches them."""
        assert self._events is not None
        try:
            while True:
                status = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # not wait_for: see Outgoing._next_status
                        event = await self._events.get()
                    data: Any = event.get("data") or {}  # type: ignore[attr-defined]
                    status = str(data.get("status"))
                if status is None:  # no event for a while: look, in case one was missed
                    try:
                        reply = await self.qmp.execute("query-migrate")
                    except QmpTimeout:
                        if "resumed" in self.view.marks:  # post-copy: a page it waits on
                            continue
                        raise
                    status = MigrationStats.parse(reply).status
                before = self.view.phase
                if status == "postcopy-active" and "resumed" not in self.view.marks:
                    await self._resume()
                    self.view.phase = status
                    self.log.info("post-copy: the guest runs here, its memory still arriving")
                elif status == "completed":
                    if "resumed" not in self.view.marks:
                        await self._resume()
                    self.view.phase = "resumed"
                    self.view.stats = MigrationStats.parse(await self.qmp.execute("query-migrate"))
                    self.log.info("resumed on this host and announced")
                    return
                elif status in ("failed", "cancelled"):
                    self.view.phase = status
                    return
                elif status in (*ACTIVE, *POSTCOPY_PAUSED):
                    self.view.phase = status
                if self.view.phase != before:
                    self.notify()
        except QemuError as exc:
            # A failed incoming migration makes the destination QEMU exit.
            self.view.phase = "failed"
            self.view.error = exc.message
        finally:
            self.notify()
            self.qmp.remove_listener(self._events)

    async def _resume(self) -> None:
        if self.before_resume is not None:
            await self.before_resume()
        await faults.hold("resume")
        await self.qmp.execute("cont")
        self.view.marks["resumed"] = time.time()
        self.view.phase = "resumed"
        self.notify()
        try:  # announce first: the VM network learns the new place at once
            await self.qmp.execute("announce-self", ANNOUNCE)
        finally:  # then record that the guest runs here (a registration fsync)
            self.on_resumed()
        if self.learned is not None:
            self._learning = asyncio.create_task(self._note_learned(self.learned))

    async def pause_postcopy(self) -> None:
        """Break a stalled post-copy stream on this side too (see Outgoing.pause_postcopy)."""
        require_phase(self.view, ("postcopy-active",), "in post-copy")
        # Out of band: QEMU's main loop may be blocked on a page that will never come.
        await self.qmp.execute("migrate-pause", oob=True)

    async def recover(self, address: str) -> str:
        """Listen again for a broken post-copy stream; return the URI the source resumes to.
        Listening already (an earlier try the source never reached): the same URI."""
        require_phase(self.view, POSTCOPY_PAUSED, "paused")
        if self.view.phase == "postcopy-paused" or self._recover_uri is None:
            # Out of band, on a port chosen here: the main loop (which answers query-migrate)
            # may be blocked on a missing page until the stream is back.
            self._recover_uri = f"tcp:{address}:{free_port(address)}"
            await self.qmp.execute("migrate-recover", {"uri": self._recover_uri}, oob=True)
        self.view.marks["recovering"] = time.time()
        return self._recover_uri

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is this migration's switchover token, before the resume."""
        waiting = self.view.phase in ("listening", *ACTIVE)
        return waiting and hmac.compare_digest(token, self.switchover_token)

    async def take_traffic(self, bridges: dict[str, list[tuple[str, str]]]) -> None:
        """The guest stopped on the source: its frames come here now, queued for the resume."""
        if "traffic_taken" in self.view.marks:
            return
        announced = await switchover.take_traffic(bridges)
        if announced is not None:
            self.view.marks["traffic_taken"] = announced
            self.notify()

    async def _note_learned(self, learned: Callable[[], Awaitable[float | None]]) -> None:
        when = await learned()
        if when is not None:
            self.view.marks["mac_learned"] = when
            self.notify()

    async def close(self) -> None:
        for task in (self._task, self._learning):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
