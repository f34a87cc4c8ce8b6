"""The VM network at switchover (kvmotion/host/switchover.py): what the destination sends and
pins, and who may tell it to."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from kvmotion import pki
from kvmotion.host import switchover
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


async def _destination(
    tls: ssl.SSLContext | None, heard: list[bytes]
) -> tuple[asyncio.Server, int]:
    """A stand-in for the destination's agent: reads the request, answers 204."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=tls)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_tell_destination_over_http_and_https(tmp_path: Path, scheme: str) -> None:
    pki.create_ca(tmp_path / "ca")
    pki.issue_host(tmp_path / "ca", tmp_path / "dst", "dst", ["127.0.0.1"])
    pki.issue_host(tmp_path / "ca", tmp_path / "src", "src", ["127.0.0.1"])
    server_tls = None
    if scheme == "https":
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(
            tmp_path / "dst/server-cert.pem", tmp_path / "dst/server-key.pem"
        )
    heard: list[bytes] = []
    server, port = await _destination(server_tls, heard)
    async with server:
        url = f"{scheme}://127.0.0.1:{port}/v1/migrations/u1/switchover"
        tell = switchover.teller(url, "sw-t0ken", tmp_path / "src")
        assert tell is not None
        await tell()
    assert len(heard) == 1 and b"sw-t0ken" in heard[0]
    assert heard[0].startswith(b"POST /v1/migrations/u1/switchover HTTP/1.1")


async def test_tell_destination_refuses_an_unknown_certificate(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "ca")
    pki.create_ca(tmp_path / "other-ca")
    pki.issue_host(tmp_path / "other-ca", tmp_path / "dst", "dst", ["127.0.0.1"])
    pki.issue_host(tmp_path / "ca", tmp_path / "src", "src", ["127.0.0.1"])
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "dst/server-cert.pem", tmp_path / "dst/server-key.pem")
    heard: list[bytes] = []
    server, port = await _destination(server_tls, heard)
    async with server:
        tell = switchover.teller(f"https://127.0.0.1:{port}/x", "sw-t0ken", tmp_path / "src")
        assert tell is not None
        await tell()  # best effort: a warning (logged), and the token never sent
    assert heard == []
