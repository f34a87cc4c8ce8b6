"""The center's watch of a VM on one host while a run follows it: one long-poll after another
(``AgentClient.watch_vm``), so the agent answers when the VM changes rather than the center
asking every few milliseconds. The latest record, or the error that ended the watch, is kept
here; each answer wakes the run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from kvmotion.errors import KvmotionError
from kvmotion.host.client import AgentClient
from kvmotion.host.protocol import VmInfo

WAIT_S = 5.0  # an unchanged VM is answered for again after this long
UNTAGGED_PAUSE_S = 0.05  # an agent that tags no answer (no long-poll) is asked this often


class HostWatch:
    """The latest record of one VM on one host; :meth:`latest` raises what ended the watch
    (the host unreachable, the VM unknown there)."""

    def __init__(self, agent: AgentClient, vm: str, wake: asyncio.Event) -> None:
        self.agent = agent
        self.vm = vm
        self.wake = wake
        self.info: VmInfo | None = None
        self.error: KvmotionError | None = None
        self.ready = asyncio.Event()  # the first answer (or error) is in
        # The run read the latest answer: only then is the next one asked for (the watch is
        # never more than one answer ahead of the run).
        self._taken = asyncio.Event()

    async def follow(self) -> None:
        tag: str | None = None
        while True:
            try:
                new, info = await self.agent.watch_vm(self.vm, tag, WAIT_S)
            except Exception as exc:
                self.error = (
                    exc
                    if isinstance(exc, KvmotionError)
                    else KvmotionError(
                        f"watching VM {self.vm} at {self.agent.base_url} failed: {exc!r}",
                        code="internal",
                    )
                )
                self.ready.set()
                self.wake.set()
                return
            if new != tag or not new:
                tag, self.info = new, info
                self._taken.clear()
                self.ready.set()
                self.wake.set()
                await self._taken.wait()
            # Yield even if the answer came without waiting (an agent in this process).
            await asyncio.sleep(UNTAGGED_PAUSE_S if not new else 0)

    def latest(self) -> VmInfo:
        self._taken.set()
        if self.error is not None:
            raise self.error
        assert self.info is not None, "read before the first answer"
        return self.info

    def migration_said(self) -> str | None:
        """What the VM's migration here last said (its error, else its phase), if anything."""
        with contextlib.suppress(KvmotionError):
            view = self.latest().migration
            return (view.error or view.phase or None) if view is not None else None
        return None

    def check_receiving(self, host: str) -> None:
        """A destination must stay alive while we copy to it (:meth:`latest` raises
        HostUnreachable if its agent died: the migration is aborted rather than completed into a
        host nobody drives); raises KvmotionError if its QEMU ended or its stream failed."""
        info = self.latest()
        view = info.migration
        failed = view is not None and view.phase in ("failed", "cancelled")
        if info.power_state == "poweredOff" or failed:
            why = (view.error if view is not None else None) or "its QEMU ended"
            raise KvmotionError(
                f"the destination {host} stopped receiving: {why}", code="destination_failed"
            )


@contextlib.asynccontextmanager
async def watching(agent: AgentClient, vm: str, wake: asyncio.Event) -> AsyncIterator[HostWatch]:
    """Watch ``vm`` on ``agent`` while the block runs; entered once the first answer is in."""
    watch = HostWatch(agent, vm, wake)
    task = asyncio.create_task(watch.follow(), name=f"watch-{vm}-{agent.base_url}")
    try:
        await watch.ready.wait()
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
