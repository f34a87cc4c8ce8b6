"""What a running guest's memory holds, as the host sees it: the inputs of a prediction.

A migration sends non-zero pages; zero pages cost a few bytes each. So the time of the first pass
is the guest's *non-zero* RAM over the link, not its RAM size: a fresh 2 GiB guest may hold 100
MiB. QEMU has no command that counts them, so the agent samples the QEMU process's guest RAM
mapping through ``/proc/PID/mem`` (root on the host, as the agent runs): at most
``MAX_SAMPLES`` pages, chosen pseudo-randomly, each read and compared with a zero page.

The working set (how much memory the guest keeps rewriting) comes from two of QEMU's dirty-rate
measurements of different lengths: QEMU counts the pages that *changed* in its window, so a
guest that rewrites a small set saturates the longer window.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from pathlib import Path

from kvmotion.errors import QemuError
from kvmotion.qemu.qmp import QmpSession

PAGE = 4096
MAX_SAMPLES = 65_536  # about 0.2 s of reads; the estimate's error is well under 1 %
ZERO_PAGE = bytes(PAGE)


def find_ram_mapping(maps: str, ram_bytes: int) -> tuple[int, int] | None:
    """The guest RAM's (start, length) in a QEMU process's ``/proc/PID/maps`` text.

    QEMU maps guest RAM as one anonymous private read-write mapping of the RAM's size (under
    TCG, 8 KiB more: see ``qemu.cmdline.memory_option``). Its TCG code buffer is executable and
    thread stacks are far smaller, so the smallest ``rw-p`` anonymous mapping of at least the
    RAM's size, and at most 4 MiB more, is it. None when there is none (a different QEMU).
    """
    best: tuple[int, int] | None = None
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[1] != "rw-p" or (len(fields) > 5 and fields[5]):
            continue
        start_s, _, end_s = fields[0].partition("-")
        try:
            start, end = int(start_s, 16), int(end_s, 16)
        except ValueError:
            continue
        length = end - start
        if ram_bytes <= length <= ram_bytes + 4 * 2**20 and (best is None or length < best[1]):
            best = (start, length)
    return best


def sample_offsets(length: int, max_samples: int = MAX_SAMPLES) -> list[int]:
    """Page offsets into a mapping of ``length`` bytes, at most ``max_samples``, ascending: a
    fixed pseudo-random choice (an even stride could alias with a periodic layout in the guest)."""
    pages = length // PAGE
    chosen = random.Random(pages).sample(range(pages), min(pages, max_samples))
    return [page * PAGE for page in sorted(chosen)]


def nonzero_bytes(pid: int, ram_bytes: int, max_samples: int = MAX_SAMPLES) -> int | None:
    """Estimate the non-zero bytes of QEMU ``pid``'s guest RAM; None when it cannot be read."""
    try:
        mapping = find_ram_mapping(Path(f"/proc/{pid}/maps").read_text(), ram_bytes)
        if mapping is None:
            return None
        start, length = mapping
        offsets = sample_offsets(min(length, ram_bytes), max_samples)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            nonzero = sum(os.pread(fd, PAGE, start + off) != ZERO_PAGE for off in offsets)
        finally:
            os.close(fd)
    except OSError:
        return None
    if not offsets:
        return None
    return round(nonzero / len(offsets) * ram_bytes)


def working_set_bytes(
    short_rate_bps: float, short_s: float, long_rate_bps: float, long_s: float, cap: int
) -> int:
    """The working set from dirty rates measured over a short and a long window.

    Each measurement is the pages that changed during its window over the window's length. While
    the guest has not yet rewritten its whole working set, the two agree; once the long window
    outlasts it, the long window's changed pages stop growing and *are* the working set. Without
    saturation the working set is at least what the long window saw. Capped at ``cap`` (the
    non-zero RAM or the RAM).
    """
    short_pages = short_rate_bps * long_s  # what the long window would see without saturation
    seen = long_rate_bps * long_s
    if seen < 0.85 * short_pages:  # saturated: the guest rewrote its working set in the window
        return int(min(cap, seen))
    return int(min(cap, max(seen, short_rate_bps * short_s)))


@dataclass(frozen=True)
class MemoryProfile:
    """A running guest's memory, for a prediction (bytes and bytes/s)."""

    ram_bytes: int
    nonzero_bytes: int  # estimated; the RAM size when it could not be read
    dirty_rate_bps: float  # over SHORT_WINDOW_S
    working_set_bytes: int


SHORT_WINDOW_S, LONG_WINDOW_S = 1, 3

# Pages per GiB that QEMU's calc-dirty-rate hashes (its maximum; the default, 512, is one page per
# 2 MiB): a guest dirtying 12 MiB/s over 24 MiB of 256 MiB measured 4-20 MiB/s (stdev 4.2) with
# 512, and 8-15 (stdev 1.8) with 4096, 30 samples each; a low sample made a prediction say "no
# brake needed" for a guest that needed one (issue 13).
DIRTY_SAMPLE_PAGES = 4096


async def measure_dirty_rate(qmp: QmpSession, seconds: int) -> float:
    """The guest's dirty rate in bytes/s, measured by QEMU over ``seconds`` (1-60)."""
    await qmp.execute("calc-dirty-rate", {"calc-time": seconds, "sample-pages": DIRTY_SAMPLE_PAGES})
    deadline = asyncio.get_running_loop().time() + seconds + 10
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        info = await qmp.execute("query-dirty-rate")
        if info.get("status") == "measured":
            return float(info.get("dirty-rate", 0)) * 2**20
    raise QemuError(f"QEMU did not finish measuring {qmp.name}'s dirty rate")


async def memory_profile(qmp: QmpSession, pid: int | None, ram: int) -> MemoryProfile:
    """The inputs of a prediction for the guest of QEMU ``pid`` with ``ram`` bytes: non-zero
    RAM, dirty rate and working set (about 4.5 s)."""
    nonzero = None if pid is None else await asyncio.to_thread(nonzero_bytes, pid, ram)
    short = await measure_dirty_rate(qmp, SHORT_WINDOW_S)
    long = await measure_dirty_rate(qmp, LONG_WINDOW_S)
    nonzero = nonzero or ram
    working_set = working_set_bytes(short, SHORT_WINDOW_S, long, LONG_WINDOW_S, nonzero)
    return MemoryProfile(ram, nonzero, short, working_set)
