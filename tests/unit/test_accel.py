"""The accelerator probe says what happened (kvmotion/qemu/accel.py), with stand-in QEMUs."""

from __future__ import annotations

from pathlib import Path

from kvmotion.qemu.accel import PROBE_MARKER, _boots_under_kvm


def stand_in(tmp_path: Path, body: str) -> str:
    script = tmp_path / "qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


async def test_a_guest_that_boots_means_kvm(tmp_path: Path) -> None:
    qemu = stand_in(tmp_path, f"echo booting; echo {PROBE_MARKER.decode()}; exec sleep 5")
    assert await _boots_under_kvm(tmp_path, tmp_path, 5.0, qemu, "host") is None


async def test_a_qemu_that_stops_at_once_is_quoted(tmp_path: Path) -> None:
    qemu = stand_in(tmp_path, "echo 'qemu: kvm_buf_set_msrs: Assertion failed.'; exit 1")
    why = await _boots_under_kvm(tmp_path, tmp_path, 5.0, qemu, "host")
    assert why is not None and "stopped under KVM" in why and "kvm_buf_set_msrs" in why


async def test_a_guest_that_hangs_is_given_up_after_the_deadline(tmp_path: Path) -> None:
    qemu = stand_in(tmp_path, "echo 'Linux version 6.1'; exec sleep 10")
    why = await _boots_under_kvm(tmp_path, tmp_path, 0.5, qemu, "host")
    assert why is not None and "did not boot under KVM in 0.5 s" in why
