"""The guest's clock after it moved: set right through its guest agent, as VMware Tools does
after a vMotion.

A guest's clock stands still while the guest is stunned, and a guest on a new host may count
from another host's clock; the destination's agent reads the guest's time after the resume,
sets it to this host's, and records the step it corrected on the migration's view (the center
puts it in the task's summary).
"""

from __future__ import annotations

import logging
import time

from kvmotion.host.incoming import Incoming
from kvmotion.host.vmstate import RunFiles
from kvmotion.qemu.qga import sync_guest_clock

log = logging.getLogger(__name__)

# Long enough for a guest agent on a guest just resumed under TCG; a guest whose agent does not
# answer costs this, in a task of its own (and the center's task waits for it).
CLOCK_TIMEOUT_S = 5.0


async def correct_clock(incoming: Incoming, files: RunFiles) -> None:
    """Set the guest's clock to this host's; note the step on ``incoming``'s view, and when
    the attempt ended (``clock_checked``), agent or not."""
    try:
        synced = await sync_guest_clock(files.guest_agent_socket, timeout=CLOCK_TIMEOUT_S)
        if synced is None:
            incoming.log.info("no guest agent answered: the guest's clock was left as it was")
            return
        incoming.view.guest_clock_step_s = synced.step_s  # sync_guest_clock logged it
    finally:
        incoming.view.marks["clock_checked"] = time.time()
        incoming.notify()
