"""Host-side check of the records guestd writes to its data disk (format: docs/guest.md).

guestd's ``DISK START`` appends one 4096-byte record per block to the raw disk: the record with
sequence number ``seq`` (from 1) sits at byte ``(seq - 1) * 4096``::

    0   8  magic  b"KVMREC01"
    8   8  seq    u64 little-endian
    16  8  rt_ns  u64, guest CLOCK_REALTIME when written
    24  4  crc    u32, zlib.crc32 of the whole record with this field zeroed
    28  4  zero
    32  .. payload: u64 word j = seq * 0x9E3779B97F4A7C15 + j (mod 2**64)

A record counts as acknowledged once its write and flush returned in the guest. The invariant
"an acknowledged write is never lost" holds if records 1..acked are all present and valid.

:func:`verify_records` reads a disk image on the host (qcow2 through ``qemu-img dd -U``, so the
VM may still have it open) and :func:`check_records` judges the bytes (pure). Raises
:class:`kvmotion.errors.LabError` if the image cannot be read.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from kvmotion.errors import LabError

RECORD_SIZE = 4096
MAGIC = b"KVMREC01"
HEADER = struct.Struct("<8sQQII")
PATTERN_MUL = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1
# how far past ``acked`` to look for records written but not (yet) seen acknowledged
DEFAULT_LOOKAHEAD = 4096


@dataclass(frozen=True)
class RecordCheck:
    ok: bool  # records 1..acked are all present, in order and valid
    acked: int
    highest: int  # highest seq such that records 1..highest are all valid
    first_bad: int  # first seq in 1..acked that is missing or invalid, 0 if none
    message: str


def encode_record(seq: int, rt_ns: int) -> bytes:
    """The record guestd writes for ``seq`` (as guestd.c's record_fill)."""
    payload = struct.pack(
        f"<{(RECORD_SIZE - HEADER.size) // 8}Q",
        *(((seq * PATTERN_MUL) + j) & MASK64 for j in range((RECORD_SIZE - HEADER.size) // 8)),
    )
    blank = HEADER.pack(MAGIC, seq, rt_ns, 0, 0) + payload
    crc = zlib.crc32(blank)
    return HEADER.pack(MAGIC, seq, rt_ns, crc, 0) + payload


def record_problem(block: bytes, seq: int) -> str | None:
    """Why ``block`` is not a valid record ``seq``, or None if it is."""
    if len(block) < RECORD_SIZE:
        return "short read (past the end of the disk)"
    magic, found, _rt, crc, _zero = HEADER.unpack_from(block)
    if magic != MAGIC:
        return "no record (magic missing)" if not any(block[:32]) else "bad magic"
    if found != seq:
        return f"holds seq {found}"
    calc = zlib.crc32(block[:24] + b"\0\0\0\0" + block[28:RECORD_SIZE])
    if calc != crc:
        return f"bad crc (stored {crc:08x}, computed {calc:08x})"
    return None


def check_records(data: bytes, acked: int) -> RecordCheck:
    """Judge raw disk bytes (from offset 0): are records 1..acked all there and valid? (pure)"""
    if acked < 0:
        raise LabError(f"acked must be >= 0, not {acked}", code="invalid_input")
    first_bad, reason = 0, ""
    highest = 0
    seq = 1
    while (seq - 1) * RECORD_SIZE < len(data):
        problem = record_problem(data[(seq - 1) * RECORD_SIZE : seq * RECORD_SIZE], seq)
        if problem is not None:
            if seq <= acked and not first_bad:
                first_bad, reason = seq, problem
            break
        highest = seq
        seq += 1
    if first_bad == 0 and highest < acked:  # ran out of data before acked
        first_bad, reason = highest + 1, "short read (past the end of the data)"
    if first_bad:
        message = (
            f"acknowledged record {first_bad} of {acked} is lost or damaged: {reason} "
            f"(records 1..{highest} are valid)"
        )
        return RecordCheck(False, acked, highest, first_bad, message)
    extra = f", plus {highest - acked} written but not seen acknowledged" if highest > acked else ""
    return RecordCheck(True, acked, highest, 0, f"all {acked} acknowledged records valid{extra}")


def verify_records(
    image: Path, acked: int, fmt: str = "qcow2", *, lookahead: int = DEFAULT_LOOKAHEAD
) -> RecordCheck:
    """Read ``image`` (qcow2 or raw) on the host and check records 1..acked.

    Reads ``acked + lookahead`` records at most (never past the disk's end) so that
    ``highest`` also counts records written after the last acknowledgement that was seen.
    """
    if fmt not in ("qcow2", "raw"):
        raise LabError(f"unsupported image format {fmt!r} (qcow2 or raw)", code="invalid_input")
    if acked < 0 or lookahead < 0:
        raise LabError("acked and lookahead must be >= 0", code="invalid_input")
    want = (acked + lookahead) * RECORD_SIZE
    if fmt == "raw":
        try:
            with image.open("rb") as f:
                return check_records(f.read(want), acked)
        except OSError as exc:
            raise LabError(f"cannot read disk image {image}: {exc}") from exc
    size = _virtual_size(image)
    count = min(want, size) // RECORD_SIZE
    if count == 0:
        return check_records(b"", acked)
    fd, tmp = tempfile.mkstemp(prefix="kvmotion-records-", suffix=".raw")
    os.close(fd)
    try:
        _qemu_img(
            "dd", "-U", "-f", "qcow2", "-O", "raw", f"bs={RECORD_SIZE}", f"count={count}",
            f"if={image}", f"of={tmp}",
        )  # fmt: skip
        with open(tmp, "rb") as f:
            return check_records(f.read(), acked)
    except OSError as exc:
        raise LabError(f"cannot read the converted copy of {image}: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def _virtual_size(image: Path) -> int:
    out = _qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(image))
    try:
        size = json.loads(out)["virtual-size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"qemu-img info {image} gave no virtual-size") from exc
    if not isinstance(size, int):
        raise LabError(f"qemu-img info {image} gave a strange virtual-size {size!r}")
    return size


def _qemu_img(*args: str) -> str:
    cmd = ["qemu-img", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except FileNotFoundError as exc:
        raise LabError("qemu-img is not installed (install qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(cmd)} took over 300 s") from exc
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-1000:]}")
    return proc.stdout
