"""Whether a bridge learned a VM's MAC on its tap (kvmotion/host/taps.py), on a fake sysfs."""

from __future__ import annotations

import struct
from pathlib import Path

from kvmotion.host.taps import learned_on

MAC = "52:54:00:aa:bb:cc"


def fake_sysfs(root: Path, entries: list[tuple[str, int, bool]], tap_port: int) -> Path:
    (root / "br0").mkdir(parents=True)
    (root / "kt1" / "brport").mkdir(parents=True)
    (root / "kt1" / "brport" / "port_no").write_text(f"{tap_port:#x}\n")
    (root / "kt1" / "brport" / "bridge").symlink_to(root / "br0")
    table = b"".join(
        bytes.fromhex(mac.replace(":", ""))
        + struct.pack("=BBIBBH", port & 0xFF, local, 100, port >> 8, 0, 0)
        for mac, port, local in entries
    )
    (root / "br0" / "brforward").write_bytes(table)
    return root


def test_a_mac_learned_on_the_taps_port(tmp_path: Path) -> None:
    sys_net = fake_sysfs(tmp_path, [("52:54:00:00:00:01", 2, False), (MAC, 3, False)], 3)
    assert learned_on("kt1", MAC, sys_net)
    assert not learned_on("kt1", "52:54:00:00:00:01", sys_net)  # another port's


def test_port_numbers_above_255_and_local_entries(tmp_path: Path) -> None:
    sys_net = fake_sysfs(tmp_path, [(MAC, 0x103, False)], 0x103)
    assert learned_on("kt1", MAC, sys_net)
    local = fake_sysfs(tmp_path / "b", [(MAC, 3, True)], 3)
    assert not learned_on("kt1", MAC, local)  # the bridge's own address, not learned


def test_a_tap_on_no_linux_bridge_says_no(tmp_path: Path) -> None:
    assert not learned_on("kt1", MAC, tmp_path)
