"""A long-poll of one VM: the center's watch of a migration, answered when something changes.

``GET /v1/vms/{vm}?after=TAG&wait=S`` answers when the VM's record differs from the one tagged
``TAG`` (its ``ETag``), or after ``S`` seconds with the same record. A step (a power change, the
migration's phase, pass, marks or knobs, a disk copy's phase) is answered at once: the VM beats
(:attr:`VirtualMachine.changed`) and the tag's first half differs. Progress alone (bytes sent or
copied) is answered at most every ``RECHECK_S``, so a migration's figures reach the center a few
times a second, not at QEMU's pace.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING

from kvmotion.host.protocol import VM_INFO
from kvmotion.host.vmstate import VmInfo
from kvmotion.pulse import wait_beat

if TYPE_CHECKING:
    from kvmotion.host.agent import HostAgent

RECHECK_S = 0.2
MAX_WAIT_S = 30.0


def _tag(data: object) -> str:
    return hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=8).hexdigest()


def etag(info: VmInfo) -> str:
    """``STEP-ALL``: a tag of the VM's steps (power, QEMU status, the migration's phase, passes,
    marks and knobs, the disk copy's phase), then of its whole record (with bytes sent)."""
    data = VM_INFO.dump_python(info, mode="json")
    steps = dict(data)
    if steps.get("migration"):
        steps["migration"] = {k: v for k, v in steps["migration"].items() if k != "stats"}
        steps["migration"]["samples"] = len(steps["migration"].get("samples") or [])
    if steps.get("storage"):
        storage = steps["storage"]
        steps["storage"] = {k: storage.get(k) for k in ("phase", "marks", "error", "datastore")}
    return f"{_tag(steps)}-{_tag(data)}"


async def watch_vm(
    agent: HostAgent, ref: str, after: str | None, wait_s: float
) -> tuple[str, VmInfo]:
    """The VM's record and its tag, once it differs from ``after`` (or ``wait_s`` passed): at
    once when a step differs, else (bytes sent, a copy's progress) at most every ``RECHECK_S``.
    Raises NotFound if the VM is (or becomes) unknown here."""
    started = time.monotonic()
    deadline = started + min(max(wait_s, 0.0), MAX_WAIT_S)
    after_steps = (after or "").partition("-")[0]
    while True:
        vm = agent.get(ref)
        beat = vm.changed.next()
        info = await vm.info()
        tag = etag(info)
        now = time.monotonic()
        if after is None or now >= deadline or tag.partition("-")[0] != after_steps:
            return tag, info
        if tag != after:  # progress alone: answered once RECHECK_S has passed
            if now >= started + RECHECK_S:
                return tag, info
            await wait_beat(beat, started + RECHECK_S - now)
        else:
            await wait_beat(beat, min(RECHECK_S, deadline - now))
