"""The VM network at switchover (kvmotion/host/switchover.py): what the destination sends and
pins, and who may tell it to."""

from __future__ import annotations

from kvmotion.host.switchover import nic_taps, rarp_frame, take_traffic
from kvmotion.host.taps import tap_name
from kvmotion.host.vmconfig import NicConfig

UUID = "6f1c2a3e-0000-4000-8000-000000000001"
MAC = "52:54:00:12:34:56"


def test_the_announce_is_a_broadcast_rarp_from_the_vms_mac() -> None:
    frame = rarp_frame(MAC)
    raw = bytes.fromhex(MAC.replace(":", ""))
    assert len(frame) == 60  # the minimum Ethernet frame (without its checksum)
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == raw and frame[12:14] == b"\x80\x35"
    assert frame[14:22] == bytes.fromhex("0001080006040003")  # Ethernet, IPv4, reverse request
    assert frame[22:28] == raw and frame[32:38] == raw  # sender and target: the VM itself


def test_each_nic_is_pinned_on_the_bridge_of_its_network() -> None:
    nics = [
        NicConfig(network="vm-network", mac=MAC),
        NicConfig(network="storage", mac="52:54:00:12:34:57"),
        NicConfig(network="elsewhere", mac="52:54:00:12:34:58"),  # no bridge here: skipped
    ]
    found = nic_taps(UUID, nics, {"vm-network": "vmnet", "storage": "br-st"})
    assert found == {
        "vmnet": [(tap_name(UUID, 0), MAC)],
        "br-st": [(tap_name(UUID, 1), "52:54:00:12:34:57")],
    }


async def test_a_bridge_that_cannot_be_pinned_leaves_the_traffic_to_qemus_announce() -> None:
    """Not a Linux bridge here (or none at all): logged, False, and nothing raised to the
    source's request (the route would have answered 500)."""
    assert await take_traffic({"kvno-such-bridge": [(tap_name(UUID, 0), MAC)]}) is None
