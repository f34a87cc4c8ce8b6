"""Encrypted migration streams, for real: with `kvmotion lab tls on`, a VM's memory (compute) and
its disks (change both) cross the migration link as TLS; a sniffer on the destination's link sees
QEMU's stream magic and NBD's requests in plaintext runs and never in TLS runs. The user stays
connected and every acknowledged disk write arrives. A host without certificates is refused.

And the management plane (the lab's default, HTTPS): sniffers on both hosts' management links
and on the center's loopback see no token and no bearer header in clear while the CLI, the
center and the agents (the source's switchover word included) do their work; a decoy token
sent in clear on the same link shows the sniffer would have seen one.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from kvmotion.lab import labcenter, topology
from tests.lab.conftest import assert_user_noticed_nothing, center_http, user_ping_loop
from tests.lab.test_storage import assert_records_kept, create_vm, migrate, remove_vm

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
# What the sniffer looks for in plaintext: "QEVM" and version 3, how a QEMU migration stream
# starts; 0x25609513, the magic of every NBD request (0x21e41c71 with the extended headers QEMU 9+
# negotiates), with a write, trim or write-zeroes command (a disk copy's). 7 or 8 fixed bytes:
# ciphertext matches them by chance about once in 10^8 migrations. NBD negotiates TLS in the
# clear (NBDMAGIC, then STARTTLS), so its greeting shows either way; its requests must not.
SNIFF_LIMIT_S = 120.0

# Reads every TCP payload on one interface until SIGTERM (or the limit); prints what it saw.
# argv[3], if given: a JSON list of hex strings; "needles" lists those seen (case-insensitive).
# argv[4], if given and not 0: only TCP segments from or to that port.
_SNIFFER = r"""
import json, re, signal, socket, struct, sys, time
iface, limit = sys.argv[1], float(sys.argv[2])
needles = [bytes.fromhex(n).lower() for n in json.loads(sys.argv[3])] if len(sys.argv) > 3 else []
port = int(sys.argv[4]) if len(sys.argv) > 4 else 0
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind((iface, 0)); s.settimeout(0.2)
NBD_WRITE = re.compile(rb"(\x25\x60\x95\x13|\x21\xe4\x1c\x71)..\x00[\x01\x03\x06]", re.S)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
seen = {"payload_bytes": 0, "qevm": False, "tls_handshakes": 0, "nbd_requests": False,
        "needles": []}
tail = b""
end = time.monotonic() + limit
while not stop and time.monotonic() < end:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        continue
    ihl = (frame[14] & 0x0F) * 4
    tcp = 14 + ihl
    if port and port not in struct.unpack("!HH", frame[tcp:tcp + 4]):
        continue
    payload = frame[tcp + (frame[tcp + 12] >> 4) * 4:]
    if not payload:
        continue
    seen["payload_bytes"] += len(payload)
    if payload[:1] == b"\x16" and payload[1:2] == b"\x03" and payload[5:6] == b"\x01":
        seen["tls_handshakes"] += 1
    window = tail + payload
    seen["qevm"] = seen["qevm"] or b"QEVM\x00\x00\x00\x03" in window
    seen["nbd_requests"] = seen["nbd_requests"] or NBD_WRITE.search(window) is not None
    low = window.lower()
    seen["needles"] = sorted(set(seen["needles"]) | {n.hex() for n in needles if n in low})
    tail = payload[-64:]
print(json.dumps(seen))
"""


class Sniffer:
    """A link watched from inside a namespace: by default the destination host's migration
    link; ``needles``: byte strings to look for in every payload."""

    def __init__(
        self,
        lab: topology.LabState,
        index: int,
        link: str = topology.HOST_MIGRATION_LINK,
        needles: list[bytes] | None = None,
        in_root: bool = False,
        port: int = 0,
    ) -> None:
        where = [] if in_root else ["ip", "netns", "exec", lab.hosts[index].netns]
        self.proc = subprocess.Popen(
            [*where, sys.executable, "-c", _SNIFFER, link, str(SNIFF_LIMIT_S),
             json.dumps([n.hex() for n in needles or []]), str(port)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(0.5)  # bound and reading

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        seen: dict[str, Any] = json.loads(out)
        return seen


def wait_center_sees_tls(center: httpx.Client, mode: str) -> None:
    """The center refreshes host facts every 5 s; wait until both hosts report ``mode``."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        modes = [
            ((center.get(f"/v1/hosts/{h}").json().get("facts") or {}).get("migration_tls") or {})
            for h in (SRC, DST)
        ]
        if all(m.get("mode") == mode and m.get("ready") for m in modes):
            return
        time.sleep(0.5)
    raise AssertionError(f"the center never saw migration_tls {mode} on both hosts: {modes}")


def wait_center_sees_not_ready(center: httpx.Client, host: str) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        facts = center.get(f"/v1/hosts/{host}").json().get("facts") or {}
        if (facts.get("migration_tls") or {}).get("ready") is False:
            return
        time.sleep(0.5)
    raise AssertionError(f"the center never saw {host}'s missing certificates")


@pytest.fixture(scope="module", autouse=True)
def tls_off_at_the_end(lab: topology.LabState) -> Iterator[None]:
    yield
    topology.set_migration_tls(False, lambda _m: None)


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


def sniffed_migration(
    lab: topology.LabState, center: httpx.Client, vm: str, dest: int, **body: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    sniffer = Sniffer(lab, dest)
    try:
        task = migrate(center, vm, host=lab.hosts[dest].name, **body)
    finally:
        seen = sniffer.stop()
    return task, seen


def test_plaintext_then_tls_compute_and_both(lab: topology.LabState, center: httpx.Client) -> None:
    guest = create_vm(lab, center, "vm-t", 7, "local-172")
    ping = user_ping_loop(lab, 7)
    try:
        # The lab's default: plaintext. The sniffer sees QEMU's stream (the control).
        task, seen = sniffed_migration(lab, center, "vm-t", 1, type="both", datastore="local-173")
        assert task["state"] == "success", task["error"]
        assert seen["qevm"] and seen["nbd_requests"], seen
        topology.set_migration_tls(True, lambda _m: None)
        wait_center_sees_tls(center, "required")
        # TLS: memory and disks back to .172.
        task, seen = sniffed_migration(lab, center, "vm-t", 0, type="both", datastore="local-172")
        assert task["state"] == "success", task["error"]
        assert seen["payload_bytes"] > 1 << 20, seen  # the streams crossed this link
        assert not seen["qevm"] and not seen["nbd_requests"], seen
        assert seen["tls_handshakes"] >= 2, seen  # NBD and the memory stream
        assert_records_kept(lab, center, "vm-t", guest)
        assert center.get("/v1/vms/vm-t").json()["host"] == SRC
    finally:
        ping.stop()
        result = ping.join(timeout=30)
    assert_user_noticed_nothing(result)
    remove_vm(center, "vm-t", guest)


def test_tls_compute_on_shared_storage(lab: topology.LabState, center: httpx.Client) -> None:
    guest = create_vm(lab, center, "vm-u", 8, "shared")
    topology.set_migration_tls(True, lambda _m: None)
    wait_center_sees_tls(center, "required")
    ping = user_ping_loop(lab, 8)
    try:
        for dest in (1, 0):
            task, seen = sniffed_migration(lab, center, "vm-u", dest)
            assert task["state"] == "success", task["error"]
            assert not seen["qevm"] and seen["tls_handshakes"] >= 1, seen
            assert center.get("/v1/vms/vm-u").json()["host"] == lab.hosts[dest].name
    finally:
        ping.stop()
        result = ping.join(timeout=30)
    assert_user_noticed_nothing(result)
    assert_records_kept(lab, center, "vm-u", guest)
    remove_vm(center, "vm-u", guest)


def test_missing_certificates_are_refused(lab: topology.LabState, center: httpx.Client) -> None:
    """A host whose certificates are gone: the precheck names it and the fix; nothing moves."""
    guest = create_vm(lab, center, "vm-v", 9, "shared")
    topology.set_migration_tls(True, lambda _m: None)
    key = Path(lab.hosts[1].host_dir) / "tls" / "server-key.pem"
    saved = key.read_bytes()
    key.unlink()
    try:
        wait_center_sees_not_ready(center, DST)
        r = center.post("/v1/vms/vm-v/migrate", json={"host": DST})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "tls_not_ready" and "kvmotion tls issue" in error["message"]
        assert center.get("/v1/vms/vm-v").json()["host"] == SRC
    finally:
        key.write_bytes(saved)
        key.chmod(0o600)
        topology.set_migration_tls(False, lambda _m: None)
        wait_center_sees_tls(center, "off")
    remove_vm(center, "vm-v", guest)


def test_management_plane_shows_no_token(lab: topology.LabState, center: httpx.Client) -> None:
    """The lab's management plane is HTTPS: the center's calls to the agents, the source's
    switchover word to the destination and the CLI's calls to the center carry their tokens
    inside TLS. A decoy sent in clear on the same link is seen: the sniffer would see a token."""
    lc = labcenter.load_center()
    assert lc is not None and lc.url.startswith("https://") and lc.ca_file, lc
    assert all(h.agent_url.startswith("https://") for h in lab.hosts), lab.hosts
    decoy = secrets.token_urlsafe(32).encode()
    needles = [lab.token.encode(), lc.token.encode(), b"bearer ", b"x-switchover-token", decoy]
    guest = create_vm(lab, center, "vm-m", 10, "shared")
    logs = [h.agent_log.stat().st_size for h in lab.hosts]
    mgmt = topology.HOST_MGMT_LINK
    sniffers = {
        SRC: Sniffer(lab, 0, mgmt, needles),
        DST: Sniffer(lab, 1, mgmt, needles),
        # The CLI's calls to the center (the only traffic on its port: other programs on this
        # machine may speak plain HTTP on the loopback)
        "center": Sniffer(lab, 0, "lo", needles, in_root=True, port=urlsplit(lc.url).port or 0),
    }
    try:
        tasks = [migrate(center, "vm-m", host=DST), migrate(center, "vm-m", host=SRC)]
        cli = subprocess.run(
            [sys.executable, "-m", "kvmotion", "vm", "list", "--json"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        # The control: a request with the decoy in clear, to .173's agent, on .173's link.
        with socket.create_connection((DST, topology.DEFAULT_AGENT_PORT), timeout=5) as sock:
            sock.sendall(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nX-Decoy: " + decoy + b"\r\n\r\n")
            with contextlib.suppress(OSError):
                sock.recv(100)
    finally:
        seen = {name: sniffer.stop() for name, sniffer in sniffers.items()}
    for task in tasks:
        assert task["state"] == "success", task["error"]
    assert cli.returncode == 0, cli.stderr
    assert "vm-m" in {vm["name"] for vm in json.loads(cli.stdout)}
    assert seen[DST]["needles"] == [decoy.lower().hex()], seen  # the control, nothing else
    for name in (SRC, "center"):
        assert seen[name]["needles"] == [], (name, seen[name])
    for name in (SRC, DST, "center"):
        assert seen[name]["payload_bytes"] > 0 and seen[name]["tls_handshakes"] >= 1, seen
    # The source told the destination over TLS (host/switchover.py): no failure in its log,
    # and the destination took the traffic at least once (its resume may come first).
    for host, size in zip(lab.hosts, logs, strict=True):
        with host.agent_log.open("rb") as log:
            log.seek(size)
            said = log.read().decode(errors="replace")
        assert "tell the destination" not in said, said[-2000:]
    steps = [{t["step"] for t in task["timeline"]} for task in tasks]
    assert any("traffic_taken" in s for s in steps), steps
    remove_vm(center, "vm-m", guest)
