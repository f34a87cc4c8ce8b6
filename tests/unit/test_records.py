"""The disk record format and its host-side checker, on synthetic data."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.errors import LabError
from kvmotion.lab.records import (
    MAGIC,
    RECORD_SIZE,
    check_records,
    encode_record,
    record_problem,
    verify_records,
)


def disk(count: int, size_records: int | None = None) -> bytearray:
    data = bytearray()
    for seq in range(1, count + 1):
        data += encode_record(seq, 1_700_000_000_000_000_000 + seq)
    total = (size_records or count) * RECORD_SIZE
    data += bytes(max(0, total - len(data)))
    return data


def test_record_layout() -> None:
    rec = encode_record(7, 123)
    assert len(rec) == RECORD_SIZE
    assert rec[:8] == MAGIC
    assert int.from_bytes(rec[8:16], "little") == 7
    assert int.from_bytes(rec[16:24], "little") == 123
    crc = int.from_bytes(rec[24:28], "little")
    assert crc == zlib.crc32(rec[:24] + bytes(4) + rec[28:])
    # payload word j = seq * 0x9E3779B97F4A7C15 + j (mod 2**64)
    assert int.from_bytes(rec[32:40], "little") == (7 * 0x9E3779B97F4A7C15) % 2**64
    assert int.from_bytes(rec[40:48], "little") == (7 * 0x9E3779B97F4A7C15 + 1) % 2**64
    assert record_problem(rec, 7) is None


def test_all_acked_records_present() -> None:
    check = check_records(bytes(disk(10, 16)), 10)
    assert check.ok and check.highest == 10 and check.first_bad == 0
    assert "all 10" in check.message


def test_records_beyond_acked_raise_highest() -> None:
    check = check_records(bytes(disk(12, 16)), 9)
    assert check.ok and check.highest == 12
    assert "3 written but not seen acknowledged" in check.message


def test_zero_acked_on_empty_disk() -> None:
    check = check_records(bytes(RECORD_SIZE * 4), 0)
    assert check.ok and check.highest == 0


def test_missing_acked_record() -> None:
    check = check_records(bytes(disk(5, 16)), 8)
    assert not check.ok
    assert check.first_bad == 6 and check.highest == 5
    assert "magic missing" in check.message


def test_damaged_payload_is_a_crc_error() -> None:
    data = disk(10)
    data[3 * RECORD_SIZE + 2000] ^= 0xFF  # record 4
    check = check_records(bytes(data), 10)
    assert not check.ok and check.first_bad == 4 and check.highest == 3
    assert "bad crc" in check.message


def test_record_in_the_wrong_place() -> None:
    data = disk(6)
    data[2 * RECORD_SIZE : 3 * RECORD_SIZE] = encode_record(9, 1)
    check = check_records(bytes(data), 6)
    assert check.first_bad == 3 and "holds seq 9" in check.message


def test_short_data() -> None:
    check = check_records(bytes(disk(3))[: 3 * RECORD_SIZE - 10], 3)
    assert not check.ok and check.first_bad == 3 and check.highest == 2


def test_negative_acked_is_refused() -> None:
    with pytest.raises(LabError):
        check_records(b"", -1)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=24),
    acked=st.integers(min_value=0, max_value=24),
    damage=st.integers(min_value=1, max_value=24),
)
def test_first_bad_is_the_first_damaged_acked_record(count: int, acked: int, damage: int) -> None:
    data = disk(count, 24)
    if damage <= count:
        data[(damage - 1) * RECORD_SIZE + 100] ^= 0x01
    valid = min(count, damage - 1)  # contiguous valid prefix
    check = check_records(bytes(data), acked)
    assert check.highest == valid
    assert check.ok == (acked <= valid)
    assert check.first_bad == (0 if acked <= valid else valid + 1)


def test_verify_raw_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(disk(20, 64)))
    check = verify_records(image, 15, fmt="raw")
    assert check.ok and check.highest == 20


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_verify_qcow2_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"  # the converted copy's folder: this test's own, not the machine's
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    raw, qcow = tmp_path / "disk.raw", tmp_path / "disk.qcow2"
    raw.write_bytes(bytes(disk(30, 256)))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True
    )
    check = verify_records(qcow, 30)
    assert check.ok and check.highest == 30
    bad = verify_records(qcow, 31)
    assert not bad.ok and bad.first_bad == 31
    # a small lookahead is bounded by the disk size and still finds every acked record
    assert verify_records(qcow, 30, lookahead=10_000).highest == 30
    assert list(scratch.iterdir()) == []  # the converted copy is removed


def test_verify_missing_image(tmp_path: Path) -> None:
    with pytest.raises(LabError):
        verify_records(tmp_path / "nope.raw", 1, fmt="raw")
    with pytest.raises(LabError):
        verify_records(tmp_path / "nope.raw", 1, fmt="vmdk")
