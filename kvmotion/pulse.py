"""A pulse: "something changed", for whoever waits for the next change (a long-poll, a stream).

Take the event of the next beat *before* reading the state it guards, then wait on it: a change
between the read and the wait is not missed.
"""

from __future__ import annotations

import asyncio


class Pulse:
    def __init__(self) -> None:
        self._next = asyncio.Event()

    def beat(self) -> None:
        """Wake everyone waiting for the next change."""
        self._next.set()
        self._next = asyncio.Event()

    def next(self) -> asyncio.Event:
        """The event the next :meth:`beat` sets."""
        return self._next


async def wait_beat(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` (from :meth:`Pulse.next`) at most ``timeout`` seconds; True if set."""
    if timeout <= 0:
        return event.is_set()
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
