"""The prediction's inputs from a guest's memory: the RAM mapping, non-zero pages, working set."""

from __future__ import annotations

import mmap
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.host import guestmem

MAPS = """\
55d0c0000000-55d0c0a00000 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
7f7c94021000-7f7c98000000 ---p 00000000 00:00 0
7f7c9be00000-7f7cabe02000 rw-p 00000000 00:00 0
7f7cac000000-7f7cebfff000 rwxp 00000000 00:00 0
7f7cf0000000-7f7cf0800000 rw-p 00000000 00:00 0
7f7d00000000-7f7d20000000 rw-p 00000000 08:01 99 /var/lib/some-file
"""


def test_finds_the_guest_ram_mapping() -> None:
    ram = 256 * 2**20
    assert guestmem.find_ram_mapping(MAPS, ram) == (0x7F7C9BE00000, ram + 8192)
    assert guestmem.find_ram_mapping(MAPS, 1024 * 2**20) is None  # the code buffer is rwx


def test_counts_non_zero_pages_of_a_real_process() -> None:
    """This process maps 80 MiB and fills a quarter of it: the estimate is within 1 %. (Not
    64 MiB: a thread's malloc arena, grown whole, is a mapping of exactly 64 MiB, which the
    search could take for the guest's RAM; the whole suite's threads made one.)"""
    size = 80 * 2**20
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for page in range(0, size // guestmem.PAGE, 4):
            buf[page * guestmem.PAGE] = 1
        estimate = guestmem.nonzero_bytes(os.getpid(), size, max_samples=4096)
        assert estimate is not None and abs(estimate - size / 4) <= 0.01 * size
    finally:
        buf.close()


def test_unreadable_process_gives_none() -> None:
    assert guestmem.nonzero_bytes(2**22 + 7, 2**20) is None


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.integers(0, 2**34), st.integers(1, 70_000))
def test_sample_offsets_are_bounded_pages_in_the_mapping(length: int, limit: int) -> None:
    offsets = guestmem.sample_offsets(length, limit)
    assert len(offsets) == min(length // guestmem.PAGE, limit)
    assert all(o % guestmem.PAGE == 0 and o + guestmem.PAGE <= length for o in offsets)
    assert offsets == sorted(set(offsets))


def test_working_set_from_two_windows() -> None:
    mib = 2**20
    # 12 MiB/s over a 24 MiB set: 1 s sees 12 MiB changed, 3 s sees the whole 24 (8 MiB/s).
    assert guestmem.working_set_bytes(12 * mib, 1, 8 * mib, 3, 256 * mib) == 24 * mib
    # A guest that never repeats within 3 s: the set is at least what 3 s saw.
    assert guestmem.working_set_bytes(12 * mib, 1, 12 * mib, 3, 256 * mib) == 36 * mib
    # Capped at the non-zero RAM; an idle guest has none.
    assert guestmem.working_set_bytes(200 * mib, 1, 200 * mib, 3, 64 * mib) == 64 * mib
    assert guestmem.working_set_bytes(0, 1, 0, 3, 64 * mib) == 0
