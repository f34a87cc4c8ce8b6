"""A VM's console through the center: the serial port or the screen of whichever host runs it.

A viewer (the CLI's ``vm console``, the web client's terminal and noVNC) opens a websocket to the
center, authenticated with an admin's token (``Authorization``, the CLI) or with a ticket
(``?ticket=``, the browser, whose websockets cannot carry a header): ``POST
/v1/vms/{vm}/console`` gives one, good for one connection within ``TICKET_TTL_S``, as Proxmox's
``vncproxy`` tickets are. The center opens the same console on the VM's host agent
(``host/console.py``) with the host's token and relays binary frames both ways.

A serial console **follows the VM**: when its QEMU ends on a host because the VM moved (the
inventory names its new host before the source's copy ends: ``ComputeRun.finalize``), the center
reconnects to the new host, tells the viewer in one line, and replays what the guest printed there
since it resumed (the destination's log from its start), so nothing is lost or shown twice. A
screen does not follow (an RFB session cannot be moved): its viewer reconnects (the web client
does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from kvmotion.center.db import Host, Vm
from kvmotion.center.inventory import Inventory
from kvmotion.center.tasks import record_event
from kvmotion.errors import Conflict, HostUnreachable, KvmotionError, Unauthorized
from kvmotion.httpapi import WS_NORMAL, WS_SERVER_ERROR, WsEnds, ws_close_code

log = logging.getLogger(__name__)

KINDS = ("serial", "vnc")
TICKET_TTL_S = 30.0
FOLLOW_S = 90.0  # how long a serial console waits for its VM to run again (on another host)
FOLLOW_POLL_S = 0.5
SAME_HOST_RETRY_S = 2.0  # a console broken on a host still running the VM: reopened after this
CONNECT_TIMEOUT_S = 10.0
MAX_FRAME = 1024 * 1024


@dataclass(frozen=True)
class Ticket:
    vm_uuid: str
    kind: str
    user: str
    expires: float


class Tickets:
    """One-use console tickets, in memory (a restarted center forgets them: ask again)."""

    def __init__(self) -> None:
        self._tickets: dict[str, Ticket] = {}

    def issue(self, vm_uuid: str, kind: str, user: str) -> str:
        now = time.monotonic()
        self._tickets = {k: t for k, t in self._tickets.items() if t.expires > now}
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = Ticket(vm_uuid, kind, user, now + TICKET_TTL_S)
        return ticket

    def take(self, ticket: str, vm_uuid: str, kind: str) -> str:
        """The user the ticket was given to; it is used up. Raises Unauthorized."""
        found = self._tickets.pop(ticket, None)
        if found is None or found.expires <= time.monotonic():
            raise Unauthorized(
                "the console ticket is unknown, used or expired: ask for a new one "
                "(POST /v1/vms/{vm}/console)",
                code="ticket_invalid",
            )
        if (found.vm_uuid, found.kind) != (vm_uuid, kind):
            raise Unauthorized(
                "this console ticket is for another VM or console", code="ticket_invalid"
            )
        return found.user


def check_console(vm: Vm, kind: str) -> Host:
    """The host whose console to open. Raises Conflict: the VM is off, or has no screen."""
    if vm.power_state != "poweredOn" or vm.host is None:
        raise Conflict(
            f"VM {vm.name} is {vm.power_state}: a console shows a running VM (power it on)",
            code="vm_not_running",
        )
    if kind == "vnc" and not vm.config.get("graphics"):
        raise Conflict(
            f"VM {vm.name} has no screen (it was created without graphics): use its serial console",
            code="no_display",
        )
    return vm.host


class AgentRefused(KvmotionError):
    """The host's agent refused the console (its close code says why: 4000 + a status)."""

    http_status = 409
    code = "console_refused"


class ConsoleRelay:
    """Relays viewers' websockets to the consoles of the VMs' hosts."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.tickets = Tickets()

    async def serve(self, ends: WsEnds, vm_ref: str, kind: str, user: str) -> None:
        """One viewer, from the start to its close (with the reason the console ended)."""
        try:
            vm = await self.inventory.vm(vm_ref)
            host = check_console(vm, kind)
            await record_event(
                self.inventory.db, f"{user} opened the {kind} console of VM {vm.name}", vm=vm.name
            )
            if kind == "vnc":
                why, _ = await self._relay(ends, host, vm.uuid, "vnc", None)
            else:
                why = await self._serial(ends, vm, host)
        except KvmotionError as exc:
            await ends.close(ws_close_code(exc), exc.message)
        except ConnectionError:
            pass  # the viewer left
        except Exception:
            log.exception("console of %s failed", vm_ref)
            await ends.close(WS_SERVER_ERROR, "the center failed relaying this console")
        else:
            await ends.close(WS_NORMAL, why)

    async def _serial(self, ends: WsEnds, vm: Vm, host: Host) -> str:
        """Relay the serial console, following the VM: to its new host after a move (from
        that log's start), or back to the same host (from where it stopped) when the relay
        broke there but the VM still runs (its agent restarted)."""
        offset: int | None = None  # the first host: its last few KiB of output
        why, first, deadline = "", True, 0.0
        while True:
            try:
                why, offset = await self._relay(ends, host, vm.uuid, "serial", offset)
                deadline = time.monotonic() + FOLLOW_S
            except (HostUnreachable, AgentRefused):
                if first:
                    raise
            first = False
            if ends.gone:
                return why
            found = await self._next_host(vm.uuid, host.name, deadline)
            if found is None:
                return "the VM is no longer running"
            if found.name != host.name:
                await ends.send(f"\r\n[kvmotion: console moved to host {found.name}]\r\n".encode())
                offset = 0  # all it printed there since it resumed
            host = found

    async def _next_host(self, vm_uuid: str, left: str, deadline: float) -> Host | None:
        """Where to reopen the console once it ended on ``left``: the VM's new host (a move:
        the inventory names it before the source's copy ends), or ``left`` again after a
        moment while the VM is still said to run there. None once the VM is off, or at
        ``deadline``."""
        since = time.monotonic()
        while time.monotonic() < deadline:
            vm = await self.inventory.vm(vm_uuid)
            if vm.power_state == "poweredOff":
                return None
            if vm.power_state == "poweredOn" and vm.host is not None:
                if vm.host.name != left or time.monotonic() - since >= SAME_HOST_RETRY_S:
                    return vm.host
                with contextlib.suppress(KvmotionError):
                    await self.inventory.fresh_vm(vm)  # the host's word, not a stale row
            await asyncio.sleep(FOLLOW_POLL_S)
        return None

    async def _relay(
        self, ends: WsEnds, host: Host, vm_uuid: str, kind: str, offset: int | None
    ) -> tuple[str, int | None]:
        """Relay between the viewer and ``host``'s console of the VM until either ends; returns
        the agent's reason and, for a serial console, the log offset reached. Raises
        AgentRefused or HostUnreachable."""
        url = self.inventory.agent_url(host)
        url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        url += f"/v1/vms/{vm_uuid}/console/{kind}"
        if offset is not None:
            url += f"?offset={offset}"
        try:
            agent = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {host.token}"},
                open_timeout=CONNECT_TIMEOUT_S,
                max_size=MAX_FRAME,
                compression=None,
                ssl=self.inventory.tls if url.startswith("wss://") else None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            refused = AgentRefused(f"host {host.name} refused the console (HTTP {status})")
            if 400 <= status < 600:
                refused.http_status = status  # e.g. 4403: its token is not this center's
            raise refused from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise HostUnreachable(
                f"host {host.name} did not open the console: {exc}", code="host_unreachable"
            ) from exc
        async with agent:
            pump = _Pump(ends, agent, offset)
            return await pump.run(host.name), pump.offset


class _Pump:
    """Frames both ways between a viewer and an agent. The agent's text frames say where in
    the log a serial console starts (``{"offset": N}``); its binary frames are the console's
    bytes, counted to know the offset reached."""

    def __init__(self, ends: WsEnds, agent: ClientConnection, offset: int | None) -> None:
        self.ends, self.agent, self.offset = ends, agent, offset

    async def _outward(self) -> None:
        async for message in self.agent:
            if isinstance(message, str):
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    self.offset = int(json.loads(message)["offset"])
                continue
            await self.ends.send(message)
            if self.offset is not None:
                self.offset += len(message)

    async def _inward(self) -> None:
        while (data := await self.ends.receive()) is not None:
            await self.agent.send(data)

    async def run(self, host: str) -> str:
        tasks = [asyncio.create_task(self._outward()), asyncio.create_task(self._inward())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, (ConnectionClosed, ConnectionError)):
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, ConnectionError):
                    await task
        if self.ends.gone:
            return "the viewer left"
        code, reason = self.agent.close_code, self.agent.close_reason or ""
        if code is not None and code >= 4000:
            refused = AgentRefused(reason or f"host {host} ended the console (code {code})")
            refused.http_status = code - 4000  # the agent's refusal, passed on as it said it
            raise refused
        return reason or f"host {host} ended the console"
