"""The simulated fleet over HTTP: one process, one port on 127.0.0.1 per simulated host.

A center addresses a host by address and port (``POST /v1/hosts {address, port, token}``), so
each simulated host listens on a port of its own and the app tells them apart by the port a
request came in on (the ASGI scope's ``server``): the center needs nothing special. A plain ASGI
app (no FastAPI: thousands of hosts' answers per second on a shared core), uvicorn on every
socket. The answers, errors and long-polls are the real agent's (:mod:`kvmotion.lab.simagent`).

``python -m kvmotion.lab.simserve --hosts 1000 --vms-per-host 10 --token T --ready-file F``
writes ``{"pid", "hosts": [{"name", "port"}]}`` to F once every port listens; SIGTERM stops it.
``GET /sim/stats`` (any port, with the token) counts the requests by route.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from kvmotion.errors import KvmotionError, NotFound, Unauthorized
from kvmotion.lab.simagent import Fleet, SimHost, SimSpeed

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_VM = r"/v1/vms/(?P<vm>[^/]+)"
ROUTES: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple(
    (name, method, re.compile(f"^{path}$"))
    for name, method, path in (
        ("facts", "GET", "/v1/host"),
        ("health", "GET", "/v1/health"),
        ("list", "GET", "/v1/vms"),
        ("create", "POST", "/v1/vms"),
        ("register", "POST", "/v1/vms/register"),
        ("images", "GET", "/v1/images"),
        ("load", "GET", "/v1/load"),
        ("ha", "POST", "/v1/ha"),
        ("incoming", "POST", "/v1/migrations/incoming"),
        ("switchover", "POST", r"/v1/migrations/[^/]+/switchover"),
        ("stats", "GET", "/sim/stats"),
        ("get", "GET", _VM),
        ("delete", "DELETE", _VM),
        ("unregister", "POST", f"{_VM}/unregister"),
        ("power_on", "POST", f"{_VM}/power-on"),
        ("power_off", "POST", f"{_VM}/power-off"),
        ("shutdown", "POST", f"{_VM}/shutdown"),
        ("reset", "POST", f"{_VM}/reset"),
        ("migrate", "POST", f"{_VM}/migrate"),
        ("tune", "POST", f"{_VM}/migration/tune"),
        ("postcopy", "POST", f"{_VM}/migration/postcopy(/[a-z]+)?"),
        ("cancel", "POST", f"{_VM}/migration/cancel"),
        ("finish", "POST", f"{_VM}/migration/finish"),
        ("abort", "POST", f"{_VM}/migration/abort"),
        ("storage_move", "POST", f"{_VM}/storage/move"),
        ("storage_mirror", "POST", f"{_VM}/storage/mirror"),
        ("storage_cancel", "POST", f"{_VM}/storage/cancel"),
        ("memory_profile", "POST", f"{_VM}/memory-profile"),
        ("dirty_rate", "POST", f"{_VM}/dirty-rate"),
    )
)


class SimApp:
    """The agents' API for every host of ``fleet``, told apart by the port (ASGI)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._cache: dict[tuple[int, str], tuple[tuple[int, int, int], bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.fleet.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return  # no consoles in the simulation: a websocket is never accepted
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, payload, headers = await self.answer(scope, body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})

    async def answer(self, scope: Scope, body: bytes) -> tuple[int, bytes, list[Any]]:
        port = int((scope.get("server") or ("", 0))[1] or 0)
        route, vm = match_route(scope["method"], scope["path"])
        self.fleet.requests[route] = self.fleet.requests.get(route, 0) + 1
        host = self.fleet.hosts.get(port)
        try:
            if host is None:
                raise NotFound(f"no simulated host on port {port}", code="not_found")
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if route != "health" and auth != f"Bearer {host.token}".encode():
                raise Unauthorized("this host accepts only its center")
            query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode()).items()}
            if route in ("facts", "list"):
                return 200, self._cached(host, route), []
            data = json.loads(body) if body else {}
            status, content = await self._serve(host, route, vm, data, query)
        except KvmotionError as exc:
            status, content = exc.http_status, {"error": {"code": exc.code, "message": exc.message}}
        except (ValueError, KeyError) as exc:  # a body that does not parse (pydantic's too)
            status = 422
            content = {"error": {"code": "invalid_input", "message": str(exc)[:500]}}
        except Exception as exc:  # a fault of the simulation: answered as the agent's 500
            status = 500
            content = {"error": {"code": "internal", "message": repr(exc)[:500]}}
        if status == 204:
            return 204, b"", []
        headers = []
        if route == "get" and status == 200 and host is not None:
            # No await since the record was read: this is its tag.
            headers = [(b"etag", f'"{host.find(vm or "").tag}"'.encode())]
        return status, json.dumps(content).encode(), headers

    def _cached(self, host: SimHost, route: str) -> bytes:
        """Facts and the VM list, made again only when something on the host changed."""
        vms = host.vms.values()
        key = (host.version, sum(v.steps for v in vms), sum(v.figures for v in vms))
        hit = self._cache.get((host.port, route))
        if hit is not None and hit[0] == key:
            return hit[1]
        fleet = self.fleet
        if route == "facts":
            content: Any = fleet.checked("facts", host.facts())
        else:
            content = fleet.checked("list", [v.info() for v in vms])
        data = json.dumps(content).encode()
        self._cache[(host.port, route)] = (key, data)
        return data

    async def _serve(
        self, host: SimHost, route: str, ref: str | None, body: Any, query: dict[str, str]
    ) -> tuple[int, Any]:
        f = self.fleet
        vm = ref or ""
        if route == "health":
            return 200, {"status": "ok", "host": host.name}
        if route == "stats":
            return 200, {"hosts": len(f.hosts), "requests": f.requests}
        if route == "images":
            return 200, []
        if route == "load":
            return 200, f.checked("load", f.load(host, float(query.get("window", 300))))
        if route == "ha":
            return 200, f.checked("ha", f.ha(host))
        if route == "get":
            watched = await f.watch(host, vm, query.get("after"), float(query.get("wait", 0)))
            return 200, f.checked("vm", watched.info())
        if route == "create":
            return 201, f.checked("vm", f.create(host, body).info())
        if route == "register":
            return 201, f.checked("vm", f.register(host, body).info())
        if route in ("delete", "unregister"):
            f.remove(host, vm)
            return 204, None
        if route in ("power_on", "power_off", "reset"):
            return 200, f.checked("vm", f.power(host, vm, route).info())
        if route == "shutdown":
            info = f.power(host, vm, "shutdown").info()
            return 200, f.checked("shutdown", {"vm": info, "how": "guest"})
        if route == "incoming":
            return 201, f.checked("incoming", f.incoming(host, body))
        if route == "switchover":
            return 204, None  # the handover is marked by the simulated source itself
        if route == "migrate":
            return 202, f.checked("vm", f.migrate(host, vm, body).info())
        if route == "tune":
            return 200, f.checked("vm", f.tune(host, vm, body).info())
        if route == "cancel":
            return 200, f.checked("vm", f.cancel(host, vm).info())
        if route == "finish":
            return 200, f.checked("finish", f.finish(host, vm))
        if route == "abort":
            gone = query.get("destination_gone") == "true"
            return 200, f.checked("abort", {"done": f.abort(host, vm, gone)})
        if route == "storage_move":
            return 202, f.checked("vm", f.move_storage(host, vm, body).info())
        if route == "storage_mirror":
            return 202, f.checked("vm", f.mirror(host, vm, body).info())
        if route == "storage_cancel":
            return 200, f.checked("abort", {"done": f.cancel_storage(host, vm)})
        if route == "memory_profile":
            ram = int(host.find(vm).config["memory_mib"]) * 2**20
            profile = {
                "ram_bytes": ram,
                "nonzero_bytes": ram // 2,
                "dirty_rate_bps": f.speed.dirty_bps,
                "working_set_bytes": ram // 8,
            }
            return 200, f.checked("memory_profile", profile)  # fmt: skip
        if route == "dirty_rate":
            return 200, {"dirty_rate_bps": f.speed.dirty_bps}
        if route == "postcopy":
            raise KvmotionError("the simulated agent does not simulate post-copy",
                                code="not_simulated")  # fmt: skip
        raise NotFound("no such route", code="not_found")


def match_route(
    method: str, path: str, routes: tuple[tuple[str, str, re.Pattern[str]], ...] = ROUTES
) -> tuple[str, str | None]:
    """The agent's route a request names, and the VM in its path: ("unknown", None) if none."""
    for name, want, pattern in routes:
        match = pattern.match(path)
        if match and method == want:
            return name, match.groupdict().get("vm")
    return "unknown", None


def build_fleet(hosts: int, vms_per_host: int, group_size: int, token: str,
                ports: list[int], speed: SimSpeed | None = None,
                validate: bool = False) -> Fleet:  # fmt: skip
    """``hosts`` hosts on ``ports`` with ``vms_per_host`` running VMs each; hosts sit in groups
    of ``group_size`` that share a datastore (``shared-NNN``), as racks share an array."""
    fleet = Fleet(token, speed, validate)
    for i, port in enumerate(ports[:hosts]):
        fleet.add_host(i, port, i // group_size, vms_per_host)
    return fleet


def listen(count: int) -> list[socket.socket]:
    """``count`` listening sockets on 127.0.0.1, on ports the kernel picks."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        socks.append(sock)
    return socks


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    socks = listen(args.hosts)
    ports = [s.getsockname()[1] for s in socks]
    fleet = build_fleet(args.hosts, args.vms_per_host, args.group_size, args.token, ports)
    config = uvicorn.Config(
        SimApp(fleet), lifespan="on", log_level="warning", access_log=False, http="h11",
        loop="asyncio", timeout_keep_alive=5,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=socks))
    for _ in range(600):
        if server.started or task.done():
            break
        await asyncio.sleep(0.1)
    if server.started:
        hosts = [{"name": h.name, "port": h.port} for h in fleet.hosts.values()]
        ready = Path(args.ready_file)
        ready.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "hosts": hosts}))
        ready.with_suffix(".tmp").rename(ready)
    await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=10)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
