"""Consoles: the host's relay (serial from QEMU's log and socket, the screen's socket), and the
center's (tickets, refusals, following a VM that moved). Real sockets and files stand in for
QEMU; the whole path with real guests is in tests/lab/test_real_vm.py and test_web_console.py."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():  # its httpx is fine for these few requests
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from kvmotion.center import console as center_console
from kvmotion.center.api import create_app
from kvmotion.center.console import ConsoleRelay, Tickets
from kvmotion.center.service import ApiToken, Center
from kvmotion.errors import Conflict, Unauthorized
from kvmotion.host import console
from kvmotion.host.console import Consoles, relay_unix
from kvmotion.httpapi import WsEnds
from tests.unit.fake_agent import FakeAgents
from tests.unit.test_executor import (  # noqa: F401 (fixtures used as parameters)
    DST,
    SRC,
    center_config,
    center_db,
    fake,
    template_db,
)

VIEWER = "viewer-token-0123456789"

pytestmark = pytest.mark.timeout(60)


class FakeSerial:
    """QEMU's serial chardev: a unix socket serving one client at a time, and its log."""

    def __init__(self, folder: Path) -> None:
        self.socket, self.log = folder / "console.sock", folder / "console.log"
        self.log.write_bytes(b"")
        self.received = b""
        self.connections = 0
        self.clients: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> FakeSerial:
        self.server = await asyncio.start_unix_server(self._client, str(self.socket))
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.clients.append(writer)
        while data := await reader.read(1024):
            self.received += data

    def guest_prints(self, data: bytes) -> None:
        """The guest writes: QEMU sends it to an attached client and logs it either way."""
        with self.log.open("ab") as f:
            f.write(data)
        for client in self.clients:
            client.write(data)

    async def quit(self) -> None:
        """QEMU ends: its sockets close."""
        assert self.server is not None
        self.server.close()
        for client in self.clients:
            client.close()


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[FakeSerial]:
    started = await FakeSerial(tmp_path).start()
    yield started
    await started.quit()


@dataclass
class Viewer:
    """A console's viewer: what it was sent, and keys it types (None: it leaves)."""

    got: bytearray = field(default_factory=bytearray)
    keys: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)

    async def send(self, data: bytes) -> None:
        self.got += data

    async def receive(self) -> bytes | None:
        return await self.keys.get()


async def until(check: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def serial(consoles: Consoles, qemu: FakeSerial, viewer: Viewer, **kw: Any) -> asyncio.Task[str]:
    return asyncio.create_task(
        consoles.serial(qemu.socket, qemu.log, viewer.send, viewer.receive,
                        running=lambda: True, **kw)
    )  # fmt: skip


async def test_a_viewer_sees_the_last_output_then_what_follows(qemu: FakeSerial) -> None:
    qemu.guest_prints(b"x" * 10_000 + b"\r\nweb1 login: ")
    consoles, viewer = Consoles(), Viewer()
    relay = serial(consoles, qemu, viewer)
    await until(lambda: viewer.got.endswith(b"login: "))
    assert len(viewer.got) == console.HISTORY_BYTES  # the last few KiB, not the whole log
    qemu.guest_prints(b"debian\r\nPassword: ")
    await until(lambda: viewer.got.endswith(b"Password: "))
    viewer.keys.put_nowait(None)  # the viewer leaves
    assert await relay == "the viewer left"


async def test_keys_reach_the_serial_port_through_one_connection(qemu: FakeSerial) -> None:
    consoles, first, second = Consoles(), Viewer(), Viewer()
    relays = [serial(consoles, qemu, first), serial(consoles, qemu, second)]
    await until(lambda: qemu.connections == 1)
    first.keys.put_nowait(b"ls\r")
    second.keys.put_nowait(b"exit\r")
    await until(lambda: qemu.received == b"ls\rexit\r")
    qemu.guest_prints(b"both see this")
    await until(lambda: first.got.endswith(b"both see this") and second.got.endswith(b"this"))
    first.keys.put_nowait(None)
    await relays[0]
    second.keys.put_nowait(b"more")  # the line stays open for the viewer left
    await until(lambda: qemu.received.endswith(b"more"))
    assert qemu.connections == 1
    second.keys.put_nowait(None)
    await relays[1]


async def test_the_console_ends_when_qemu_does_after_its_last_words(qemu: FakeSerial) -> None:
    consoles, viewer = Consoles(), Viewer()
    relay = serial(consoles, qemu, viewer, offset=0)
    await until(lambda: qemu.connections == 1)
    qemu.guest_prints(b"reboot: Power down")
    await qemu.quit()
    why = await relay
    assert "QEMU ended" in why and viewer.got == b"reboot: Power down"


async def test_a_replay_from_the_start_is_the_whole_log_bounded(qemu: FakeSerial) -> None:
    qemu.guest_prints(b"a" * (console.MAX_HISTORY_BYTES + 10) + b"end")
    viewer = Viewer()
    relay = serial(Consoles(), qemu, viewer, offset=0)
    await until(lambda: viewer.got.endswith(b"end"))
    assert len(viewer.got) == console.MAX_HISTORY_BYTES
    viewer.keys.put_nowait(None)
    await relay


async def test_no_serial_socket_is_refused_with_what_to_do(tmp_path: Path) -> None:
    viewer = Viewer()
    with pytest.raises(Conflict) as info:
        await Consoles().serial(tmp_path / "none.sock", tmp_path / "none.log", viewer.send,
                                viewer.receive, running=lambda: True)  # fmt: skip
    assert info.value.code == "console_unavailable" and "power-on" in info.value.message


async def test_the_screen_is_relayed_both_ways(tmp_path: Path) -> None:
    async def vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        data = await reader.read(12)
        writer.write(b"got " + data)
        await writer.drain()
        writer.close()

    path = tmp_path / "vnc.sock"
    server = await asyncio.start_unix_server(vnc, str(path))
    viewer = Viewer()
    viewer.keys.put_nowait(b"RFB 003.008\n")
    try:
        why = await relay_unix(path, viewer.send, viewer.receive, "the VM's screen")
    finally:
        server.close()
    assert bytes(viewer.got) == b"RFB 003.008\ngot RFB 003.008\n"
    assert why == "the VM's screen closed"


# -- the center ----------------------------------------------------------------------------------


def test_tickets_are_for_one_connection_to_one_console(monkeypatch: pytest.MonkeyPatch) -> None:
    tickets = Tickets()
    one = tickets.issue("uuid-a", "serial", "alice")
    assert tickets.take(one, "uuid-a", "serial") == "alice"
    with pytest.raises(Unauthorized):
        tickets.take(one, "uuid-a", "serial")  # used
    other = tickets.issue("uuid-a", "serial", "alice")
    with pytest.raises(Unauthorized):
        tickets.take(other, "uuid-b", "serial")  # another VM's
    late = tickets.issue("uuid-a", "vnc", "alice")
    monkeypatch.setattr(center_console, "TICKET_TTL_S", -1.0)
    expired = tickets.issue("uuid-a", "vnc", "alice")
    with pytest.raises(Unauthorized):
        tickets.take(expired, "uuid-a", "vnc")
    assert tickets.take(late, "uuid-a", "vnc") == "alice"


@dataclass
class Row:
    """The inventory's VM row, as far as the console reads it."""

    name: str
    power_state: str
    host: Any
    uuid: str = "uuid-a"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostRow:
    name: str
    url: str = "http://127.0.0.1:1"
    token: str = "t"


class Places:
    """An inventory that reports, in turn, where the VM is."""

    def __init__(self, *rows: Row) -> None:
        self.rows = list(rows)
        self.db = None

    async def vm(self, ref: str) -> Row:
        return self.rows.pop(0) if len(self.rows) > 1 else self.rows[0]

    async def fresh_vm(self, vm: Row) -> Row:
        return vm


class Ends:
    """The viewer's websocket, as WsEnds gives it."""

    def __init__(self) -> None:
        self.sent = b""
        self.gone = False
        self.closed: tuple[int, str] | None = None

    async def send(self, data: bytes) -> None:
        self.sent += data

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


async def test_a_serial_console_follows_the_vm_to_its_new_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QEMU ends on the source (the move's finish), the inventory names the destination: the
    console reopens there from its log's start, and tells the viewer in one line."""
    monkeypatch.setattr(center_console, "FOLLOW_POLL_S", 0.01)
    a, b = HostRow(SRC), HostRow(DST)
    places = Places(
        Row("vm-a", "poweredOn", a),
        Row("vm-a", "poweredOn", a),
        Row("vm-a", "poweredOn", b),
        Row("vm-a", "poweredOff", b),
    )
    relay = ConsoleRelay(places)  # type: ignore[arg-type]
    opened: list[tuple[str, int | None]] = []

    async def fake_relay(
        ends: Ends, host: HostRow, uuid: str, kind: str, offset: int | None
    ) -> tuple[str, int]:
        opened.append((host.name, offset))
        await ends.send(f"<{host.name}>".encode())
        return "the VM's QEMU ended on this host", 5000

    monkeypatch.setattr(relay, "_relay", fake_relay)
    monkeypatch.setattr(center_console, "record_event", _no_event)
    ends = Ends()
    await relay.serve(ends, "vm-a", "serial", "admin")  # type: ignore[arg-type]
    assert opened == [(SRC, None), (DST, 0)]  # the last KiB first, then all since it resumed
    assert ends.sent == (f"<{SRC}>\r\n[kvmotion: console moved to host {DST}]\r\n<{DST}>".encode())
    assert ends.closed == (1000, "the VM is no longer running")


async def _no_event(*args: Any, **kw: Any) -> None:
    return None


async def test_a_serial_console_broken_on_a_host_still_running_the_vm_resumes_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent restarted (QEMU did not): the console is reopened on the same host from the
    log offset it had reached, so nothing is shown twice, and no "moved" line."""
    monkeypatch.setattr(center_console, "FOLLOW_POLL_S", 0.01)
    monkeypatch.setattr(center_console, "SAME_HOST_RETRY_S", 0.05)
    a = HostRow(SRC)
    places = Places(*[Row("vm-a", "poweredOn", a)] * 40, Row("vm-a", "poweredOff", a))
    relay = ConsoleRelay(places)  # type: ignore[arg-type]
    opened: list[int | None] = []

    async def fake_relay(
        ends: Ends, host: HostRow, uuid: str, kind: str, offset: int | None
    ) -> tuple[str, int]:
        opened.append(offset)
        if len(opened) == 2:
            raise center_console.HostUnreachable("the agent is restarting")
        return "host ended the console", (offset or 1000) + 10

    monkeypatch.setattr(relay, "_relay", fake_relay)
    monkeypatch.setattr(center_console, "record_event", _no_event)
    ends = Ends()
    await relay.serve(ends, "vm-a", "serial", "admin")  # type: ignore[arg-type]
    assert opened[:3] == [None, 1010, 1010]  # the refused try, then again from where it was
    assert b"moved" not in ends.sent
    assert ends.closed == (1000, "the VM is no longer running")


async def test_a_console_of_a_vm_that_is_off_or_has_no_screen_is_refused() -> None:
    ends = Ends()
    relay = ConsoleRelay(Places(Row("vm-off", "poweredOff", None)))  # type: ignore[arg-type]
    await relay.serve(ends, "vm-off", "serial", "admin")  # type: ignore[arg-type]
    assert ends.closed is not None and ends.closed[0] == 4409
    assert "power it on" in ends.closed[1]
    ends = Ends()
    relay = ConsoleRelay(Places(Row("vm-a", "poweredOn", HostRow(SRC))))  # type: ignore[arg-type]
    await relay.serve(ends, "vm-a", "vnc", "admin")  # type: ignore[arg-type]
    assert ends.closed is not None and ends.closed[0] == 4409 and "no screen" in ends.closed[1]


# -- the center's API ------------------------------------------------------------------------------


@pytest.fixture
def app_client(
    center_db: str,  # noqa: F811 (the fixture)
    fake: FakeAgents,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[TestClient]:
    """The center's app; its relay only says whom it would serve (the fake hosts have no
    console, and no test here reaches an address)."""

    async def serve(self: ConsoleRelay, ends: WsEnds, vm: str, kind: str, user: str) -> None:
        await ends.close(1000, f"would relay {kind} of {vm} for {user}")

    monkeypatch.setattr(ConsoleRelay, "serve", serve)
    config = center_config(center_db).model_copy(
        update={"users": [ApiToken(name="viewer", token=VIEWER, role="read-only")]}
    )
    center = Center(config, transport=fake)
    with TestClient(create_app(center)) as client:
        client.headers["Authorization"] = "Bearer t"
        yield client


def test_a_ticket_is_given_to_admins_for_a_running_vm(app_client: TestClient) -> None:
    r = app_client.post("/v1/vms/vm-a/console", json={"kind": "serial"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["url"] == f"/v1/vms/vm-a/console/serial?ticket={body['ticket']}"
    r = app_client.post("/v1/vms/vm-off/console", json={"kind": "serial"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "vm_not_running"
    r = app_client.post("/v1/vms/vm-a/console", json={"kind": "vnc"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_display"
    r = app_client.post(
        "/v1/vms/vm-a/console", json={"kind": "serial"},
        headers={"Authorization": f"Bearer {VIEWER}"},
    )  # fmt: skip
    assert r.status_code == 403  # a read-only user may look, not type


@pytest.mark.parametrize(
    ("query", "headers", "code"),
    [
        ("?ticket=made-up", {}, 4401),
        ("", {"Authorization": "Bearer wrong"}, 4401),
        ("", {"Authorization": f"Bearer {VIEWER}"}, 4403),
    ],
    ids=["unknown-ticket", "wrong-token", "read-only-user"],
)
def test_a_console_without_a_ticket_or_an_admin_is_closed_saying_why(
    app_client: TestClient, query: str, headers: dict[str, str], code: int
) -> None:
    with (
        app_client.websocket_connect(f"/v1/vms/vm-a/console/serial{query}", headers=headers) as ws,
        pytest.raises(WebSocketDisconnect) as info,
    ):
        ws.receive_bytes()
    assert info.value.code == code and info.value.reason


def test_a_ticket_is_used_up_by_its_first_connection(app_client: TestClient) -> None:
    url = app_client.post("/v1/vms/vm-a/console", json={"kind": "serial"}).json()["url"]
    with app_client.websocket_connect(url) as ws, pytest.raises(WebSocketDisconnect) as info:
        ws.receive_bytes()
    assert info.value.code == 1000 and info.value.reason == "would relay serial of vm-a for admin"
    with app_client.websocket_connect(url) as ws, pytest.raises(WebSocketDisconnect) as info:
        ws.receive_bytes()
    assert info.value.code == 4401 and "used or expired" in info.value.reason


async def test_ws_ends_reads_text_and_leaves_cleanly() -> None:
    class Socket:
        def __init__(self) -> None:
            self.messages = [{"type": "websocket.receive", "text": "ls\r"},
                             {"type": "websocket.disconnect"}]  # fmt: skip

        async def receive(self) -> dict[str, Any]:
            return self.messages.pop(0)

    ends = WsEnds(Socket())  # type: ignore[arg-type]
    assert await ends.receive() == b"ls\r"
    assert await ends.receive() is None and ends.gone
    with pytest.raises(ConnectionError), contextlib.suppress(httpx.HTTPError):
        await ends.send(b"x")
