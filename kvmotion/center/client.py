"""Client of the center's REST API, for the CLI and scripts; and where the CLI finds the center.

One method per route of :mod:`kvmotion.center.api`. HTTP failures are converted here, once, as
:mod:`kvmotion.host.client` does for agents: a center that does not answer is
:class:`HostUnreachable`; an error body becomes the domain error of its status (with the center's
code and message). Bodies are returned as the center's JSON objects: the CLI prints them raw.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from kvmotion.errors import ExecutionError, HostUnreachable, InvalidInput
from kvmotion.httpapi import api_client, error_from_response, tls_context

CENTER_URL_ENV = "KVMOTION_CENTER_URL"
CENTER_TOKEN_ENV = "KVMOTION_CENTER_TOKEN"
# The cluster CA's certificate (ca-cert.pem) the center's HTTPS certificate is verified with;
# unset: the system's store.
CA_FILE_ENV = "KVMOTION_CA_FILE"

# The center waits on agents for these (see AgentClient): its answer must not be cut short.
_CREATE_TIMEOUT = 150.0
_POWER_ON_TIMEOUT = 150.0
_SHUTDOWN_TIMEOUT = 120.0
_POWER_OFF_TIMEOUT = 90.0
_PRECHECK_TIMEOUT = 90.0  # fresh facts from two hosts
_STREAM_TIMEOUT = httpx.Timeout(30.0, read=60.0)  # a task stream says something every 15 s
# An upload's answer comes after the host checked the whole image (qemu-img check of GiBs)
_UPLOAD_TIMEOUT = httpx.Timeout(60.0, read=600.0)
_UPLOAD_CHUNK = 1 << 20

JsonObject = dict[str, Any]


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events as (event, data) pairs; comments (keep-alives) skipped."""
    event, data = "message", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def resolve_center(url: str | None, token: str | None) -> tuple[str, str]:
    """The center's URL and token: given ones, else the environment, else the lab's center.
    Several URLs, comma-separated, name centers that share a database: the active one's is
    returned.

    Raises :class:`InvalidInput` (nothing was tried) when none of these names a center, or when a
    center is named without its token.
    """
    url = url or os.environ.get(CENTER_URL_ENV) or None
    if url is not None and "," in url:  # centers sharing a database: the one that is active
        urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        url = find_active(urls) if len(urls) > 1 else urls[0] if urls else None
    token = token or os.environ.get(CENTER_TOKEN_ENV) or None
    if url is None or token is None:
        from kvmotion.lab.labcenter import load_center  # only when nothing else names a center

        lab = load_center()
        if lab is not None and (url is None or url.rstrip("/") == lab.url.rstrip("/")):
            url, token = lab.url, token or lab.token
    if url is None:
        raise InvalidInput(
            "no center to talk to: pass --center URL and --token TOKEN, or set "
            f"{CENTER_URL_ENV} and {CENTER_TOKEN_ENV} (or start the lab's with `kvmotion lab up`)",
            code="no_center",
        )
    if token is None:
        raise InvalidInput(
            f"no token for the center at {url}: pass --token TOKEN or set {CENTER_TOKEN_ENV}",
            code="no_center_token",
        )
    return url.rstrip("/"), token


def find_active(urls: list[str], timeout: float = 3.0) -> str:
    """Of the centers at ``urls`` (those sharing one database: docs/center-ha.md), the URL of
    the active one, as each says at ``/v1/health`` (a standby names the active one). Raises
    HostUnreachable, saying what each answered, when none is active."""
    said = []
    verify = center_tls(urls[0] if urls else None)
    with httpx.Client(timeout=timeout, trust_env=False, verify=verify) as http:
        for url in urls:
            try:
                health = http.get(f"{url}/v1/health").json()
                role = str(health.get("role"))
                active = health.get("active") or {}
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                said.append(f"{url}: {type(exc).__name__}")
                continue
            if role == "active":
                return url
            if active.get("url"):
                return str(active["url"]).rstrip("/")
            said.append(f"{url}: {role}")
    raise HostUnreachable(
        f"no center is active ({'; '.join(said)}): if one was just lost, a standby takes "
        "over within seconds; try again",
        code="no_active_center",
    )


def center_tls(url: str | None = None) -> ssl.SSLContext:
    """The context the center at ``url`` is verified with: ``$KVMOTION_CA_FILE``'s CA, else the
    lab's CA for the lab's center, else the system's store. Raises InvalidInput when the file
    cannot be read."""
    ca_file = os.environ.get(CA_FILE_ENV)
    if not ca_file and url is not None:
        from kvmotion.lab.labcenter import load_center  # the lab's center: its own CA

        lab = load_center()
        if lab is not None and lab.ca_file and _origin(lab.url) == _origin(url):
            ca_file = lab.ca_file
    if not ca_file:
        return tls_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"{CA_FILE_ENV}={ca_file}: not a CA certificate: {exc}") from exc


def _origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


def unreachable(url: str, exc: httpx.HTTPError) -> HostUnreachable:
    """The center did not answer, or its certificate is not trusted here (one line saying how to
    trust it)."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return HostUnreachable(
            f"the center at {url} presented a certificate this machine does not trust: set "
            f"{CA_FILE_ENV} to the cluster CA's ca-cert.pem (the one `kvmotion tls ca` made)",
            code="tls_untrusted",
        )
    return HostUnreachable(
        f"the center at {url} did not answer: {exc!r} "
        "(is it running? `kvmotion lab up` starts the lab's)"
    )


class CenterClient:
    """``async with CenterClient(url, token) as center: await center.vms()``."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = api_client(self.url, token, timeout, transport, verify=center_tls(self.url))

    async def __aenter__(self) -> CenterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | httpx.Timeout | None = None,
        content: AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        what = f"{method} {self.url}{path}"
        kwargs: dict[str, Any] = {"json": json, "params": params}
        if content is not None:
            kwargs |= {"content": content, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc
        if response.status_code >= 400:
            raise error_from_response(response, what)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ExecutionError(
                f"{what}: the center answered with something other than JSON: "
                f"{response.text[:200]!r}",
                code="bad_response",
            ) from exc

    async def _object(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        body = await self.request(method, path, **kwargs)
        if not isinstance(body, dict):
            raise ExecutionError(
                f"{method} {self.url}{path}: expected an object", code="bad_response"
            )
        return body

    async def _list(self, path: str, **kwargs: Any) -> list[JsonObject]:
        body = await self.request("GET", path, **kwargs)
        if not isinstance(body, list) or not all(isinstance(x, dict) for x in body):
            raise ExecutionError(f"GET {self.url}{path}: expected a list", code="bad_response")
        return body

    # -- health and hosts ----------------------------------------------------------------------
    async def add_host(self, address: str, token: str, port: int | None = None) -> JsonObject:
        body: JsonObject = {"address": address, "token": token}
        if port is not None:
            body["port"] = port
        return await self._object("POST", "/v1/hosts", json=body)

    async def hosts(self) -> list[JsonObject]:
        return await self._list("/v1/hosts")

    async def rules(self) -> list[JsonObject]:
        return await self._list("/v1/rules")

    async def add_rule(self, body: JsonObject) -> JsonObject:
        return await self._object("POST", "/v1/rules", json=body)

    async def delete_rule(self, name: str) -> None:
        await self.request("DELETE", f"/v1/rules/{_segment(name)}")

    async def enter_maintenance(self, name: str, evacuate_powered_off: bool = False) -> JsonObject:
        path = f"/v1/hosts/{_segment(name)}/maintenance/enter"
        body = {"evacuate_powered_off": evacuate_powered_off}
        return await self._object("POST", path, json=body)

    async def exit_maintenance(self, name: str, move_back: bool = False) -> JsonObject:
        path = f"/v1/hosts/{_segment(name)}/maintenance/exit"
        return await self._object("POST", path, json={"move_back": move_back}, timeout=120)

    async def host(self, name: str) -> JsonObject:
        return await self._object("GET", f"/v1/hosts/{_segment(name)}")

    # -- VMs -----------------------------------------------------------------------------------
    async def vms(self) -> list[JsonObject]:
        return await self._list("/v1/vms")

    async def vm(self, vm: str) -> JsonObject:
        return await self._object("GET", f"/v1/vms/{_segment(vm)}")

    async def create_vm(self, host: str | None, spec: JsonObject) -> JsonObject:
        """Create a VM on ``host``, or where the center's placement says (None)."""
        body = {"host": host, "spec": spec}
        return await self._object("POST", "/v1/vms", json=body, timeout=_CREATE_TIMEOUT)

    async def power_on(self, vm: str) -> JsonObject:
        path = f"/v1/vms/{_segment(vm)}/power-on"
        return await self._object("POST", path, timeout=_POWER_ON_TIMEOUT)

    async def open_console(self, vm: str, kind: str = "serial") -> JsonObject:
        """A ticket and the websocket path of the VM's console (``center/console.py``)."""
        path = f"/v1/vms/{_segment(vm)}/console"
        return await self._object("POST", path, json={"kind": kind})

    async def shutdown(self, vm: str) -> JsonObject:
        path = f"/v1/vms/{_segment(vm)}/shutdown"
        return await self._object("POST", path, timeout=_SHUTDOWN_TIMEOUT)

    async def power_off(self, vm: str) -> JsonObject:
        path = f"/v1/vms/{_segment(vm)}/power-off"
        return await self._object("POST", path, timeout=_POWER_OFF_TIMEOUT)

    async def delete_vm(self, vm: str) -> None:
        await self.request("DELETE", f"/v1/vms/{_segment(vm)}", timeout=_POWER_OFF_TIMEOUT)

    # -- migrations ----------------------------------------------------------------------------
    async def migrate(
        self,
        vm: str,
        host: str | None,
        type: str = "compute",
        downtime_ms: int = 100,
        max_bandwidth_bps: int | None = None,
        **convergence: Any,
    ) -> JsonObject:
        """Start a migration; returns its task (202: the work goes on in the center).
        ``convergence``: deadline_s, priority, allow_postcopy, strategy, streams, predict,
        datastore."""
        body = _migrate_body(host, type, downtime_ms, max_bandwidth_bps) | convergence
        path = f"/v1/vms/{_segment(vm)}/migrate"
        return await self._object("POST", path, json=body, timeout=_PRECHECK_TIMEOUT)

    async def precheck(
        self,
        vm: str,
        host: str | None,
        type: str = "compute",
        downtime_ms: int = 100,
        max_bandwidth_bps: int | None = None,
        **convergence: Any,
    ) -> JsonObject:
        """What a migration would find (``ok``, ``errors``, ``warnings``, and a ``prediction``
        with ``predict=True``); starts nothing."""
        body = _migrate_body(host, type, downtime_ms, max_bandwidth_bps) | convergence
        path = f"/v1/vms/{_segment(vm)}/migrate/precheck"
        return await self._object("POST", path, json=body, timeout=_PRECHECK_TIMEOUT)

    async def datastores(self) -> list[JsonObject]:
        return await self._list("/v1/datastores")

    # -- OS images -----------------------------------------------------------------------------
    async def images(self) -> list[JsonObject]:
        return await self._list("/v1/images")

    async def import_image(
        self,
        path: Path,
        datastore: str,
        name: str,
        fmt: str | None = None,
        progress: Callable[[int], None] = lambda _n: None,
    ) -> JsonObject:
        """Upload the image file at ``path`` to ``datastore`` as ``name``, streamed (never read
        whole); ``progress`` is told each chunk's size as it goes."""
        size = path.stat().st_size

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as f:
                while data := f.read(_UPLOAD_CHUNK):
                    progress(len(data))
                    yield data

        params = {"datastore": datastore, "filename": path.name} | ({"format": fmt} if fmt else {})
        return await self._object(
            "PUT", f"/v1/images/{_segment(name)}", params=params, content=chunks(),
            headers={"Content-Length": str(size)}, timeout=_UPLOAD_TIMEOUT,
        )  # fmt: skip

    async def delete_image(self, name: str, datastore: str) -> None:
        path = f"/v1/images/{_segment(name)}"
        await self.request("DELETE", path, params={"datastore": datastore})

    # -- tasks and events ----------------------------------------------------------------------
    async def tasks(self, limit: int = 50) -> list[JsonObject]:
        return await self._list("/v1/tasks", params={"limit": limit})

    async def task(self, task_id: int) -> JsonObject:
        return await self._object("GET", f"/v1/tasks/{task_id}")

    async def follow_task(self, task_id: int) -> AsyncGenerator[JsonObject, None]:
        """The task each time it changes, from the center's task stream, until it ends (or the
        center ends the stream). Raises NotFound, HostUnreachable."""
        path = f"/v1/tasks/{task_id}/stream"
        what = f"GET {self.url}{path}"
        try:
            # Quiet for up to the stream's keep-alive (15 s) while nothing changes.
            async with self._http.stream("GET", path, timeout=_STREAM_TIMEOUT) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response, what)
                async for event, data in sse_events(response.aiter_lines()):
                    if event == "task":
                        yield json.loads(data)
        except httpx.HTTPError as exc:
            raise HostUnreachable(f"the center at {self.url} stopped answering: {exc!r}") from exc

    async def cancel_task(self, task_id: int) -> JsonObject:
        return await self._object("POST", f"/v1/tasks/{task_id}/cancel")

    # -- clusters and EVC ----------------------------------------------------------------------
    async def clusters(self) -> list[JsonObject]:
        return await self._list("/v1/clusters")

    async def cluster(self, name: str) -> JsonObject:
        return await self._object("GET", f"/v1/clusters/{_segment(name)}")

    async def create_cluster(self, name: str) -> JsonObject:
        return await self._object("POST", "/v1/clusters", json={"name": name})

    async def add_cluster_host(self, name: str, host: str) -> JsonObject:
        return await self._object(
            "POST", f"/v1/clusters/{_segment(name)}/hosts", json={"host": host}, timeout=60
        )

    async def set_cluster_evc(self, name: str, mode: str | None) -> JsonObject:
        return await self._object(
            "PUT", f"/v1/clusters/{_segment(name)}/evc", json={"mode": mode}, timeout=60
        )

    async def balancing(self, name: str) -> JsonObject:
        return await self._object("GET", f"/v1/clusters/{_segment(name)}/balancing")

    async def set_balancing(self, name: str, **settings: Any) -> JsonObject:
        body = {k: v for k, v in settings.items() if v is not None}
        return await self._object("PUT", f"/v1/clusters/{_segment(name)}/balancing", json=body)

    async def ha(self, name: str) -> JsonObject:
        """The cluster's HA: settings, each member's state, the reserve, the latest restarts."""
        return await self._object("GET", f"/v1/clusters/{_segment(name)}/ha")

    async def set_ha(self, name: str, **settings: Any) -> JsonObject:
        body = {k: v for k, v in settings.items() if v is not None}
        return await self._object("PUT", f"/v1/clusters/{_segment(name)}/ha", json=body)

    async def set_ha_priority(self, vm: str, priority: str) -> JsonObject:
        path = f"/v1/vms/{_segment(vm)}/ha-priority"
        return await self._object("PUT", path, json={"priority": priority})

    async def recommendations(self, name: str) -> JsonObject:
        """A balancing pass now: the loads and what it recommends (sampling each VM it would
        move for the predictor: a few seconds)."""
        path = f"/v1/clusters/{_segment(name)}/recommendations"
        return await self._object("POST", path, timeout=120)

    async def apply_recommendations(self, name: str, ids: list[int] | None) -> JsonObject:
        path = f"/v1/clusters/{_segment(name)}/recommendations/apply"
        return await self._object("POST", path, json={"ids": ids}, timeout=120)

    async def set_vm_evc(self, vm: str, mode: str | None) -> JsonObject:
        return await self._object("PUT", f"/v1/vms/{_segment(vm)}/evc", json={"mode": mode})

    async def host_evc_modes(self, host: str) -> JsonObject:
        return await self._object("GET", f"/v1/hosts/{_segment(host)}/evc-modes")


def _migrate_body(
    host: str | None, type: str, downtime_ms: int, max_bandwidth_bps: int | None
) -> JsonObject:
    return {
        "host": host,
        "type": type,
        "downtime_ms": downtime_ms,
        "max_bandwidth_bps": max_bandwidth_bps,
    }


def _segment(value: str) -> str:
    """A name as one path segment: a '/', '?' or '#' in it must not change the URL's meaning."""
    return quote(value, safe="")
