"""The center's REST API (FastAPI; OpenAPI at /openapi.json). A thin shell over :class:`Center`.

Every route but ``/v1/health`` needs the center's token. Errors use the shared table in
:mod:`kvmotion.httpapi`: a refused request (precondition) is 4xx and changed nothing.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi import Path as FastApiPath
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from kvmotion import __version__
from kvmotion.center import images
from kvmotion.center.console import KINDS, TICKET_TTL_S, check_console
from kvmotion.center.db import Event, Host
from kvmotion.center.inventory import (
    DatastoreList,
    VmList,
    compact_json,
    vm_dict,
)
from kvmotion.center.metrics import CONTENT_TYPE
from kvmotion.center.placing import place_new_vm, place_vm
from kvmotion.center.relocation import refusals as relocation_refusals
from kvmotion.center.relocation import relocate
from kvmotion.center.service import Center
from kvmotion.center.tasks import task_dict
from kvmotion.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    KvmotionError,
    NotActive,
    NotFound,
    Unauthorized,
)
from kvmotion.host.config import DEFAULT_AGENT_PORT
from kvmotion.host.migrationview import MAX_STREAMS
from kvmotion.host.protocol import vm_json
from kvmotion.host.vmconfig import VmCreateRequest, check_name
from kvmotion.httpapi import (
    ERROR_RESPONSES,
    WsEnds,
    check_bearer,
    error_response,
    install_error_handlers,
    role_checker,
    ws_close_code,
)
from kvmotion.mgmttls import server_tls
from kvmotion.migration.request import MigrationRequest
from kvmotion.migration.rules import Rule
from kvmotion.migration.strategies import Strategy
from kvmotion.pulse import wait_beat


class HostAdd(BaseModel):
    address: str = Field(max_length=255)  # an IP address or a DNS name

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        labels = value.rstrip(".").split(".")
        if not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels):
            raise ValueError(f"{value[:80]!r} is neither an IP address nor a host name")
        return value

    # Sent to the agent in an HTTP header: printable ASCII only.
    token: str = Field(pattern=r"^[\x21-\x7e]{1,512}$")
    port: int = Field(DEFAULT_AGENT_PORT, ge=1, le=65535)


class VmCreate(BaseModel):
    host: str | None = Field(None, max_length=255)  # None: the placement chooses
    spec: VmCreateRequest


class MigrateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["compute", "storage", "both"] = "compute"
    host: str | None = Field(None, max_length=255)  # storage: the VM's host (the default)
    datastore: str | None = None  # storage and both: where the disks go
    downtime_ms: int = Field(100, ge=1, le=60_000)
    max_bandwidth_bps: int | None = Field(None, ge=1_000_000)
    deadline_s: float | None = Field(None, gt=0, le=86_400)
    priority: Literal["high", "normal"] = "normal"
    allow_postcopy: bool = False
    strategy: Strategy = "kvmotion"  # or another manager's, for comparisons
    predict: bool = False  # sample the guest's memory (about 4.5 s) and predict first
    handover: bool = True  # the destination takes the VM's traffic at the stun (for comparisons)
    streams: int | None = Field(None, ge=1, le=MAX_STREAMS)  # memory's TCP streams (multifd)

    _ds = field_validator("datastore")(lambda v: None if v is None else check_name(v, "datastore"))

    def request(self, vm: str) -> MigrationRequest:
        return MigrationRequest(
            vm, self.host or "", self.type, self.downtime_ms, self.max_bandwidth_bps,
            self.deadline_s, self.priority, self.allow_postcopy, self.strategy, self.predict,
            self.datastore, self.handover, self.streams,
        )  # fmt: skip


log = logging.getLogger(__name__)
LOST_EXIT = 75  # EX_TEMPFAIL: the center lost leadership (systemd's Restart= brings it back)
WEB_DIR = Path(__file__).resolve().parent / "web"
TaskId = Annotated[int, FastApiPath(ge=-(2**31), le=2**31 - 1)]  # 32 bits in PostgreSQL
STREAM_GAP_S = 0.1  # a task stream sends at most this often (a migration's figures change faster)
STREAM_KEEPALIVE_S = 15.0  # a comment line after this long without a change keeps proxies open


class ClusterCreate(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ClusterHost(BaseModel):
    host: str = Field(max_length=255)


class RuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    kind: Literal["affinity", "anti-affinity", "vm-host"]
    vms: list[Annotated[str, Field(max_length=80)]] = Field(max_length=64)
    hosts: list[Annotated[str, Field(max_length=255)]] = Field(default_factory=list, max_length=64)
    must: bool = True  # False: a should rule (preferred, not enforced)


class ConsoleOpen(BaseModel):
    kind: Literal["serial", "vnc"] = "serial"


class MaintenanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    evacuate_powered_off: bool = False  # register powered-off VMs on other hosts too


class ExitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    move_back: bool = False  # migrate back what the evacuation moved off


class BalancingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "manual", "automatic"] | None = None
    threshold: int | None = Field(None, ge=1, le=5)
    window_s: float | None = Field(None, ge=10, le=900)
    hold_s: float | None = Field(None, ge=0, le=86400)


class HaBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    failure_s: float | None = Field(None, ge=8, le=600)
    isolation_response: Literal["leave-on", "power-off", "shutdown"] | None = None
    failures_to_tolerate: int | None = Field(None, ge=0, le=32)


class PriorityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: Literal["high", "medium", "low", "disabled"]


class ApplyBody(BaseModel):
    ids: list[int] | None = Field(None, max_length=256)  # None: every pending one


class EvcBody(BaseModel):
    mode: str | None = Field(None, pattern=r"^[a-z0-9-]{1,40}$")  # None disables EVC


NUL_REFUSED = "a NUL character is not allowed in a name, a value or a path"


async def refuse_nul(request: Request) -> None:
    """PostgreSQL stores no NUL character in text, where SQLite does: a request that carries one
    (in its path, query or JSON body, where JSON writes it \\u0000) is refused whole, the same
    way on both."""
    refuse_nul_in_url(request)
    if b"\\u0000" in await request.body():
        raise InvalidInput(NUL_REFUSED)


def refuse_nul_in_url(request: Request) -> None:
    """The same check for a route whose body is a stream of bytes (an image upload): its body may
    hold anything, and reading it here would hold all of it in memory."""
    if "\x00" in request.url.path or "%00" in request.url.query:
        raise InvalidInput(NUL_REFUSED)


class StandbyGate:
    """Only the active center answers (center/leader.py). A standby answers ``/v1/health`` and
    refuses the rest with 503 ``standby``, naming the active center's URL; a browser asking a
    standby for the web client is sent to the active one's; a console's websocket is closed
    with 1013 (try again later)."""

    OPEN = ("/v1/health", "/openapi.json")

    def __init__(self, app: ASGIApp, center: Center) -> None:
        self.app = app
        self.center = center

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or self.center.role == "active"
            or scope["path"] in self.OPEN
        ):
            await self.app(scope, receive, send)
            return
        try:
            active = await self.center.active_center()
        except Exception:  # no database (yet): no active center known
            active = None
        url = active.url if active is not None and active.name != self.center.name else None
        if scope["type"] == "websocket":
            await WebSocketClose(code=1013, reason="this center is a standby").__call__(
                scope, receive, send
            )
            return
        response: Response
        if url is not None and not scope["path"].startswith("/v1/"):
            response = RedirectResponse(url + scope["path"], status_code=307)
        else:
            where = (
                f"the active center is {active.name} at {url}"
                if active and url
                else ("no center is active yet: another one takes over within seconds")
            )
            error = NotActive(
                f"this center ({self.center.name}) is a standby ({self.center.role}): {where}",
                active_url=url,
            )
            response = error_response(error)
        await response(scope, receive, send)


def create_app(center: Center) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await center.start()
        try:
            yield
        finally:
            await center.close()

    app = FastAPI(
        title="kvmotion center", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES
    )
    install_error_handlers(app)
    app.add_middleware(StandbyGate, center=center)
    tokens = center.config.api_tokens()
    auth = [
        Depends(
            role_checker(
                tokens,
                "the center needs an API token (its own, or a user's from its config)",
                read_paths=("/precheck",),
            )
        ),
        Depends(refuse_nul),
    ]
    stream_auth = [auth[0], Depends(refuse_nul_in_url)]
    inv = center.inventory

    @app.get("/v1/health")
    async def health(response: Response) -> dict[str, Any]:
        """Up, and which center is active (any client may ask any center, unauthenticated;
        a web client whose center was lost asks the others, from its own origin)."""
        response.headers["Access-Control-Allow-Origin"] = "*"
        active = None
        if center.role != "active":
            try:
                active = await center.active_center()
            except Exception as exc:  # no database (yet): up, but no active center known
                log.debug("health: the active center is not known: %s", exc)
        return {
            "status": "ok",
            "role": center.role,
            "center": {"name": center.name, "url": center.url},
            "active": (
                {"name": center.name, "url": center.url}
                if center.role == "active"
                else active and {"name": active.name, "url": active.url}
            ),
        }

    @app.get("/v1/active")
    async def active() -> dict[str, Any]:
        """200 on the active center, 503 on a standby: a load balancer's health check."""
        return {"role": center.role, "center": center.name}

    @app.get("/v1/centers", dependencies=auth)
    async def centers() -> list[dict[str, Any]]:
        """The centers on this database and what each last said (center/leader.py)."""
        return [
            {"name": c.name, "url": c.url, "role": c.role, "started_at": c.started_at.isoformat(),
             "seen_at": c.seen_at.isoformat(),
             "active_since": c.active_since.isoformat() if c.active_since else None}
            for c in await center.centers()
        ]  # fmt: skip

    @app.get("/metrics", dependencies=auth, response_class=Response)
    async def metrics() -> Response:
        """Prometheus' text format (docs/monitoring.md); any API token may scrape."""
        return Response(await center.metrics.exposition(), media_type=CONTENT_TYPE)

    # -- hosts ---------------------------------------------------------------------------------
    @app.post("/v1/hosts", dependencies=auth, status_code=201)
    async def add_host(body: HostAdd) -> dict[str, Any]:
        return inv.host_record(await inv.add_host(body.address, body.token, body.port))

    @app.get("/v1/hosts", dependencies=auth, response_model=list[dict[str, Any]])
    async def list_hosts() -> Response:
        """Every host (kept between requests, encoded: Inventory.kept_hosts; its last-seen
        time spliced in: Inventory.host_json), each with its maintenance task and HA state
        (``host_now``)."""
        latest = await center.maintenance.latest_tasks()
        hosts = []
        for host in await inv.kept_hosts.values():
            now = host_now(host.name, latest)
            tail = NOTHING_NOW if now == NOTHING_NOW_DICT else compact_json(now)[1:]
            hosts.append(inv.host_json(host)[:-1] + b"," + tail)  # two keys longer
        return Response(b"[" + b",".join(hosts) + b"]", media_type="application/json")

    # Most hosts, most of the time: encoded once (the end of an object, as spliced above)
    NOTHING_NOW_DICT: dict[str, Any] = {"maintenance_task": None, "ha": None}
    NOTHING_NOW = compact_json(NOTHING_NOW_DICT)[1:]

    def host_now(name: str, latest: dict[str, int]) -> dict[str, Any]:
        """A host's latest maintenance task (None if it never had one) and its HA state (None
        outside an HA cluster)."""
        return {"maintenance_task": latest.get(name), "ha": center.ha.host_state(name)}

    datastore_list = DatastoreList(inv)

    @app.get("/v1/datastores", dependencies=auth, response_model=list[dict[str, Any]])
    async def list_datastores() -> Response:
        """Every datastore a host reported, with capacity, free space and the hosts that see
        it (shared: more than one); kept between requests (inventory.DatastoreList)."""
        return Response(await datastore_list.json(), media_type="application/json")

    # -- OS images -----------------------------------------------------------------------------
    @app.get("/v1/images", dependencies=auth)
    async def list_images() -> list[dict[str, Any]]:
        """Every OS image on the datastores, with the hosts that see it and its VMs."""
        return await images.list_images(inv)

    @app.put("/v1/images/{name}", dependencies=stream_auth, status_code=201)
    async def import_image(
        name: str,
        request: Request,
        datastore: str = Query(max_length=63),
        format: str | None = Query(None, pattern="^(qcow2|raw)$"),
        filename: str = Query("", max_length=255),
    ) -> dict[str, Any]:
        """Import the request's body (a qcow2 or raw image, streamed) onto ``datastore``."""
        try:
            check_name(name, "image name")
            check_name(datastore, "datastore")
        except ValueError as exc:
            raise InvalidInput(str(exc), code="invalid_name") from None
        length = request.headers.get("content-length")
        return await images.import_image(
            inv, datastore, name, request.stream(),
            length=int(length) if length and length.isdigit() else None,
            fmt=format, filename=filename,
        )  # fmt: skip

    @app.delete("/v1/images/{name}", dependencies=auth, status_code=204)
    async def delete_image(name: str, datastore: str = Query(max_length=63)) -> None:
        await images.delete_image(inv, datastore, name)

    @app.get("/v1/hosts/{name}", dependencies=auth)
    async def get_host(name: str) -> dict[str, Any]:
        host = inv.host_record(await inv.host(name))
        host |= host_now(host["name"], await center.maintenance.latest_tasks())
        host["vms"] = await inv.vm_names([host["name"]])
        return host

    # -- VMs -----------------------------------------------------------------------------------
    vm_list = VmList(center.db)

    @app.get("/v1/vms", dependencies=auth, response_model=list[dict[str, Any]])
    async def list_vms() -> Response:
        """Every VM (kept between requests: inventory.VmList)."""
        return Response(await vm_list.json(), media_type="application/json")

    @app.get("/v1/vms/{vm}", dependencies=auth)
    async def get_vm(vm: str) -> dict[str, Any]:
        return vm_dict(await inv.vm(vm))

    @app.post("/v1/hosts/{name}/maintenance/enter", dependencies=auth, status_code=202)
    async def enter_maintenance(name: str, body: MaintenanceBody | None = None) -> dict[str, Any]:
        """Empty the host of running VMs (live migrations where the placement says), then
        hold it in maintenance; the task shows what moves and what blocks it."""
        task_id = await center.maintenance.enter(
            name, evacuate_powered_off=body is not None and body.evacuate_powered_off
        )
        return task_dict(await center.tasks.get(task_id))

    @app.post("/v1/hosts/{name}/maintenance/exit", dependencies=auth)
    async def exit_maintenance(name: str, body: ExitBody | None = None) -> dict[str, Any]:
        """End maintenance mode; with ``move_back``, what its evacuation moved off comes back
        (``moved_back``: a task, or why not, per VM)."""
        host = inv.host_record(await center.maintenance.exit(name))
        if body is not None and body.move_back:
            host["moved_back"] = await center.maintenance.move_back(name)
        return host

    def taking_new_vms(host: Host) -> None:
        if host.maintenance is not None:
            raise Conflict(
                f"host {host.name} is in maintenance mode: nothing new runs there (choose "
                "another host, or `kvmotion host maintenance exit` it)",
                code="host_in_maintenance",
            )

    @app.post("/v1/vms", dependencies=auth, status_code=201)
    async def create_vm(body: VmCreate) -> dict[str, Any]:
        """Create a VM on ``host``, or, given none, on the host the placement chooses (the
        answer's ``placement`` says why)."""
        why = None
        if body.host is None:
            placement = await place_new_vm(inv, center.rules, body.spec)
            assert placement.host is not None
            host, why = await inv.host(placement.host), placement.explain()
        else:
            host = await inv.host(body.host)
        taking_new_vms(host)
        async with inv.agent(host) as agent:
            info = await agent.create_vm(body.spec.model_dump(mode="json"))
        created = vm_dict(await inv.upsert_vm(vm_json(info), host))
        return created | ({"placement": why} if why else {})

    async def _power(vm: str, action: str, **kw: Any) -> dict[str, Any]:
        if center.executor.migrating((await inv.vm(vm)).name):
            raise Conflict(f"VM {vm} is being migrated: wait for it or cancel the task")
        record = await inv.vm(vm)
        assert record.host is not None
        if action == "power_on":
            taking_new_vms(record.host)
        async with inv.agent(record.host) as agent:
            if action == "power_on":
                info = await agent.power_on(record.uuid, **kw)
            elif action == "shutdown":
                info = (await agent.shutdown(record.uuid)).vm
            else:
                info = await agent.power_off(record.uuid)
        return vm_dict(await inv.upsert_vm(vm_json(info), record.host))

    @app.post("/v1/vms/{vm}/power-on", dependencies=auth)
    async def power_on(vm: str) -> dict[str, Any]:
        """Power on; in an EVC cluster (or with a per-VM mode) the VM gets that baseline. A
        powered-off VM whose host is in maintenance is first registered on the host the
        placement chooses (``placed`` says where and why), or refused if none fits."""
        record = await inv.vm(vm)
        placed = None
        in_maintenance = record.host is not None and record.host.maintenance is not None
        if in_maintenance and record.power_state == "poweredOff":
            placement = await place_vm(inv, center.rules, record)
            if placement.host is None:
                why = placement.explain().removeprefix(f"{record.name}: ")
                raise Conflict(
                    f"host {record.host.name if record.host else '?'} is in maintenance mode "
                    f"and no other host can take VM {record.name}: {why}",
                    code="host_in_maintenance",
                )
            await relocate(center.db, inv, center.executor, center.tasks, center.rules,
                           record.name, placement.host)  # fmt: skip
            placed = placement.explain()
        record = await inv.vm(vm)
        if record.power_state == "poweredOff":
            await center.ha.admit(record)
        mode = await center.clusters.effective_mode(record)
        answer = await _power(vm, "power_on", evc_mode=mode)
        return answer | {"placed": placed} if placed else answer

    @app.post("/v1/vms/{vm}/shutdown", dependencies=auth)
    async def shutdown(vm: str) -> dict[str, Any]:
        return await _power(vm, "shutdown")

    @app.post("/v1/vms/{vm}/power-off", dependencies=auth)
    async def power_off(vm: str) -> dict[str, Any]:
        return await _power(vm, "power_off")

    @app.delete("/v1/vms/{vm}", dependencies=auth, status_code=204)
    async def delete_vm(vm: str) -> None:
        record = await inv.vm(vm)
        if record.host is not None:
            if center.executor.migrating(record.name):
                raise Conflict(
                    f"VM {vm} is being migrated: wait for it or cancel the task",
                    code="already_migrating",
                )
            async with inv.agent(record.host) as agent:
                await agent.delete_vm(record.uuid)
        await inv.remove_vm(record.uuid)

    # -- placement rules ---------------------------------------------------------------------------
    @app.get("/v1/rules", dependencies=auth)
    async def list_rules() -> list[dict[str, Any]]:
        """Each rule, and whether the running VMs keep it now (what breaks it, if not)."""
        return await center.rules.states()

    @app.post("/v1/rules", dependencies=auth, status_code=201)
    async def add_rule(body: RuleBody) -> dict[str, Any]:
        rule = Rule(body.name, body.kind, frozenset(body.vms), frozenset(body.hosts), body.must)
        await center.rules.add(rule)
        return next(r for r in await center.rules.states() if r["name"] == rule.name)

    @app.delete("/v1/rules/{name}", dependencies=auth, status_code=204)
    async def delete_rule(name: str) -> None:
        await center.rules.delete(name)

    # -- consoles --------------------------------------------------------------------------------
    @app.post("/v1/vms/{vm}/console", dependencies=auth)
    async def open_console(vm: str, body: ConsoleOpen, request: Request) -> dict[str, Any]:
        """A ticket for one connection to the VM's console within ``TICKET_TTL_S`` (a browser's
        websocket cannot carry the token); admins only, as every POST."""
        record = await inv.vm(vm)
        check_console(record, body.kind)
        user = api_user(request.headers.get("authorization", ""))
        ticket = center.consoles.tickets.issue(record.uuid, body.kind, user)
        return {
            "kind": body.kind,
            "ticket": ticket,
            "url": f"/v1/vms/{record.name}/console/{body.kind}?ticket={ticket}",
            "expires_in_s": TICKET_TTL_S,
        }

    @app.websocket("/v1/vms/{vm}/console/{kind}")
    async def console(
        ws: WebSocket, vm: str, kind: str, ticket: str | None = Query(None, max_length=64)
    ) -> None:
        """The VM's serial console (``serial``) or screen (``vnc``, RFB for noVNC), binary
        frames both ways, wherever it runs; with a ticket, or an admin's ``Authorization``."""
        offered = ws.scope.get("subprotocols") or ()
        await ws.accept(subprotocol="binary" if "binary" in offered else None)
        ends = WsEnds(ws)
        try:
            if kind not in KINDS:
                raise NotFound(f"no console {kind[:20]!r}: serial or vnc", code="no_console")
            record = await inv.vm(vm)
            if ticket is not None:
                user = center.consoles.tickets.take(ticket, record.uuid, kind)
            else:
                user = api_user(ws.headers.get("authorization", ""), admin=True)
        except KvmotionError as exc:
            await ends.close(ws_close_code(exc), exc.message)
            return
        await center.consoles.serve(ends, record.name, kind, user)

    def api_user(authorization: str, admin: bool = False) -> str:
        match = check_bearer(authorization.encode(), tokens)
        if match is None:
            raise Unauthorized("missing or wrong token: the console needs an admin's token")
        if admin and match[1] != "admin":
            raise Forbidden(
                f"{match[0]!r} may only look (role {match[1]}): consoles are for admins"
            )
        return match[0]

    # -- migrations ------------------------------------------------------------------------------
    @app.post("/v1/vms/{vm}/migrate", dependencies=auth, status_code=202)
    async def migrate(vm: str, body: MigrateBody) -> dict[str, Any]:
        """A migration task. A powered-off VM given another host (type compute) is moved by
        registering it there (center/relocation.py): its task has ended when this answers."""
        record = await inv.vm(vm)
        if record.power_state == "poweredOff" and body.type == "compute" and body.host:
            task_id = await relocate(center.db, inv, center.executor, center.tasks,
                                     center.rules, vm, body.host)  # fmt: skip
            return task_dict(await center.tasks.get(task_id))
        task_id = await center.executor.submit(body.request(vm))
        return task_dict(await center.tasks.get(task_id))

    @app.post("/v1/vms/{vm}/migrate/precheck", dependencies=auth)
    async def precheck(vm: str, body: MigrateBody) -> dict[str, Any]:
        """What a migration would find, without starting it (errors and warnings)."""
        record = await inv.vm(vm)
        if record.power_state == "poweredOff" and body.type == "compute" and body.host:
            dest = await inv.fresh_facts(body.host, unreachable_ok=True)
            found = await relocation_refusals(inv, center.rules, record, dest)
            return {
                "ok": not found,
                "errors": [e.__dict__ for e in found],
                "warnings": [],
                "relocation": True,  # powered off: it would be registered there
            }
        req, record, source, dest, result = await center.executor.precheck(body.request(vm))
        answer: dict[str, Any] = {
            "ok": result.ok,
            "errors": [e.__dict__ for e in result.errors],
            "warnings": [w.__dict__ for w in result.warnings],
        }
        if body.predict and result.ok and req.kind != "storage":
            try:
                answer["prediction"] = await center.executor.predict(req, record, source, dest)
            except KvmotionError as exc:  # a prediction is advice: its absence refuses nothing
                answer["prediction_error"] = exc.message
        return answer

    # -- clusters and EVC ------------------------------------------------------------------------
    @app.get("/v1/clusters", dependencies=auth, response_model=list[dict[str, Any]])
    async def list_clusters() -> Response:
        """Every cluster described (kept between requests: Clusters.list_json)."""
        return Response(await center.clusters.list_json(), media_type="application/json")

    @app.post("/v1/clusters", dependencies=auth, status_code=201)
    async def create_cluster(body: ClusterCreate) -> dict[str, Any]:
        cluster = await center.clusters.create(body.name)
        return await center.clusters.describe(cluster.name)

    @app.get("/v1/clusters/{name}", dependencies=auth)
    async def get_cluster(name: str) -> dict[str, Any]:
        return await center.clusters.describe(name)

    @app.post("/v1/clusters/{name}/hosts", dependencies=auth)
    async def add_cluster_host(name: str, body: ClusterHost) -> dict[str, Any]:
        await center.clusters.add_host(name, body.host)
        return await center.clusters.describe(name)

    @app.put("/v1/clusters/{name}/evc", dependencies=auth)
    async def set_cluster_evc(name: str, body: EvcBody) -> dict[str, Any]:
        await center.clusters.set_evc(name, body.mode)
        return await center.clusters.describe(name)

    @app.get("/v1/clusters/{name}/balancing", dependencies=auth)
    async def get_balancing(name: str) -> dict[str, Any]:
        """The cluster's balancing settings and its latest pass (None before the first)."""
        latest = center.balancer.latest(name)
        return {
            "settings": await center.balancer.settings(name),
            "latest": latest.as_dict() if latest else None,
        }

    @app.put("/v1/clusters/{name}/balancing", dependencies=auth)
    async def set_balancing(name: str, body: BalancingBody) -> dict[str, Any]:
        return await center.balancer.configure(name, **body.model_dump(exclude_none=True))

    @app.post("/v1/clusters/{name}/recommendations", dependencies=auth)
    async def recommend(name: str) -> dict[str, Any]:
        """A balancing pass now (whatever the mode): the loads, and the moves it recommends,
        each with the predictor's time and downtime from a fresh sample."""
        return (await center.balancer.run_pass(name, predict_moves=True)).as_dict()

    @app.post("/v1/clusters/{name}/recommendations/apply", dependencies=auth)
    async def apply_recommendations(name: str, body: ApplyBody) -> dict[str, Any]:
        """Start the latest pass's recommendations (those numbered, or all pending)."""
        return {"applied": await center.balancer.apply(name, body.ids)}

    @app.get("/v1/clusters/{name}/ha", dependencies=auth)
    async def get_ha(name: str) -> dict[str, Any]:
        """The cluster's HA settings, each member's HA state, admission control's reserve and
        the latest restarts."""
        return await center.ha.status(name)

    @app.put("/v1/clusters/{name}/ha", dependencies=auth)
    async def set_ha(name: str, body: HaBody) -> dict[str, Any]:
        return await center.ha.configure(name, **body.model_dump(exclude_none=True))

    @app.put("/v1/vms/{vm}/ha-priority", dependencies=auth)
    async def set_ha_priority(vm: str, body: PriorityBody) -> dict[str, Any]:
        return await center.ha.set_priority(vm, body.priority)

    @app.put("/v1/vms/{vm}/evc", dependencies=auth)
    async def set_vm_evc(vm: str, body: EvcBody) -> dict[str, Any]:
        return vm_dict(await center.clusters.set_vm_evc(vm, body.mode))

    @app.get("/v1/hosts/{name}/evc-modes", dependencies=auth)
    async def host_evc_modes(name: str) -> dict[str, Any]:
        """The EVC modes this host supports, fewest features first, and its highest."""
        host = await inv.fresh_facts(name)
        cpu = (host.facts or {}).get("cpu_model") or {}
        modes = [{k: m[k] for k in ("key", "label", "vendor", "supported", "missing", "reason")}
                 | {"feature_count": len(m.get("features", []))}
                 for m in cpu.get("evc_modes", [])]  # fmt: skip
        return {
            "host": host.name,
            "generation": cpu.get("generation"),
            "highest": cpu.get("highest_evc_mode"),
            "modes": modes,
        }

    # -- tasks and events --------------------------------------------------------------------
    @app.get("/v1/tasks", dependencies=auth)
    async def list_tasks(limit: int = 50) -> list[dict[str, Any]]:
        return [task_dict(t) for t in await center.tasks.list(min(max(limit, 1), 500))]

    @app.get("/v1/tasks/{task_id}", dependencies=auth)
    async def get_task(task_id: TaskId) -> dict[str, Any]:
        return task_dict(await center.tasks.get(task_id))

    @app.post("/v1/tasks/{task_id}/cancel", dependencies=auth)
    async def cancel_task(task_id: TaskId) -> dict[str, Any]:
        return task_dict(await center.executor.request_cancel(task_id))

    @app.get("/v1/tasks-stream", dependencies=auth)
    async def task_stream(limit: int = 20) -> StreamingResponse:
        """Server-sent events: each recent task as it changes (``event: task``), pushed when it
        changes (the web client's stream)."""
        return _sse(_task_events(center, min(max(limit, 1), 100), None))

    @app.get("/v1/tasks/{task_id}/stream", dependencies=auth)
    async def one_task_stream(task_id: TaskId) -> StreamingResponse:
        """Server-sent events: one task as it changes, ending after it ends (the CLI's)."""
        await center.tasks.get(task_id)  # NotFound before the stream starts
        return _sse(_task_events(center, 1, task_id))

    @app.get("/v1/events", dependencies=auth)
    async def events(limit: int = 100) -> list[dict[str, Any]]:
        async with center.db.session() as s:
            newest = select(Event).order_by(Event.id.desc()).limit(min(max(limit, 1), 1000))
            rows = await s.scalars(newest)
            return [
                {"id": e.id, "time": e.time.isoformat(), "severity": e.severity,
                 "message": e.message, "vm": e.vm, "host": e.host, "task_id": e.task_id}
                for e in rows
            ]  # fmt: skip

    # The web client (static files, no build step): everything the API did not claim.
    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _task_events(center: Center, limit: int, task_id: int | None) -> AsyncIterator[str]:
    """Each task (``task_id``, or the ``limit`` newest) whenever it changed: woken by the task
    store's pulse, reading only the tasks changed since the last look (a run's live figures are
    in memory, not polled from the database), each read once for every stream
    (``TaskStore.shown``)."""
    store = center.tasks
    seq, _ = store.changes(0)
    ids = [task_id] if task_id is not None else await store.newest_shown(limit)
    seen: dict[int, str] = {}
    said_at = time.monotonic()
    while True:
        final = False
        for changed in ids:
            try:
                task = await store.shown(changed)
            except NotFound:
                if changed == task_id:
                    raise
                continue
            final = task.final
            if seen.get(task.id) != task.body:
                seen[task.id] = task.body
                said_at = time.monotonic()
                yield f"event: task\ndata: {task.body}\n\n"
        if task_id is not None and final:
            return
        while True:
            beat = store.changed.next()
            seq, ids = store.changes(seq)
            if task_id is not None:
                ids = [t for t in ids if t == task_id]
            if ids:
                break
            quiet = time.monotonic() - said_at
            if quiet >= STREAM_KEEPALIVE_S:
                said_at = time.monotonic()
                yield ": keep-alive\n\n"
                continue
            await wait_beat(beat, STREAM_KEEPALIVE_S - quiet)
        await asyncio.sleep(STREAM_GAP_S)


async def serve(center: Center) -> None:
    """Serve the center's API over HTTPS (HTTP if its config says api_plaintext). Raises
    InvalidInput, before listening, when its certificates are missing."""
    import uvicorn

    cfg = center.config
    hint = f"kvmotion tls issue --host center --address {cfg.listen} ..."
    tls = server_tls(cfg.tls_dir, cfg.api_plaintext, hint)
    config = uvicorn.Config(
        create_app(center),
        host=center.config.listen,
        port=center.config.port,
        log_level="info",
        access_log=False,
        # Open task streams (a browser tab) must not hold a stopping center up.
        timeout_graceful_shutdown=3,
        # Idle connections stay open longer than clients keep theirs (httpx: 5 s; a load
        # balancer: 60 s): at uvicorn's 5 s, a client polling every 5 s sent its request on a
        # connection the center was closing ("Server disconnected without sending a response").
        timeout_keep_alive=65,
        **tls,
    )
    server = uvicorn.Server(config)

    async def fence() -> None:
        """Leadership lost: another center may act now, so this one must not, not even to
        shut down cleanly (its migrations' aborts would race the new active center). The
        service manager starts it again, as a standby."""
        await center.lost.wait()
        log.critical("leadership lost: this center exits now (status %d)", LOST_EXIT)
        logging.shutdown()
        os._exit(LOST_EXIT)

    fencing = asyncio.create_task(fence(), name="fence")
    # What exists now (modules, classes, functions, the app: most of the process's objects)
    # lives as long as the process: out of the garbage collector's full passes, which walked
    # it all and held every request for 0.1-0.2 s at a time in a 1,000-host fleet.
    gc.freeze()
    try:
        await server.serve()
    finally:
        fencing.cancel()
