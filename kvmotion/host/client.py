"""Client of a host agent's HTTP API, for the center, the CLI and tests.

Requests are built from, and replies validated against, :mod:`kvmotion.host.protocol`: every
method returns typed values. HTTP failures are converted here, once: a host that does not answer
is :class:`HostUnreachable`; an error body becomes the domain error of its status, with the
agent's code and message; a reply in a shape the protocol does not have is an ExecutionError
(``protocol_mismatch``), never a KeyError deep in the center.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from kvmotion.errors import ExecutionError, HostUnreachable
from kvmotion.host.images import ImageInfo
from kvmotion.host.protocol import (
    HOST_FACTS,
    POSTCOPY_STEP,
    VM_INFO,
    VM_LIST,
    AbortResult,
    DiskMirrorRequest,
    FinishRequest,
    FinishResult,
    HaHeartbeatIn,
    HaReportOut,
    HaSettingsIn,
    HostFacts,
    HostLoadOut,
    IncomingRequest,
    IncomingResult,
    MemoryProfileOut,
    MigrateRequest,
    PostcopyResume,
    PostcopyStep,
    PowerOnRequest,
    RegisterRequest,
    ShutdownRequest,
    ShutdownResult,
    StorageMoveRequest,
    TuneRequest,
    VmCreateRequest,
    VmInfo,
    build,
)
from kvmotion.httpapi import api_client, error_from_response

T = TypeVar("T")

# Idle connections are dropped before the agent's server would close them (uvicorn: 5 s), so a
# request never goes out on a connection the server is closing.
KEEPALIVE_EXPIRY_S = 2.0
# A long-poll's answer may take its wait and then this long, as any other request may.
WATCH_MARGIN_S = 30.0
# An upload is answered once the host has checked the whole image (qemu-img check of GiBs).
UPLOAD_TIMEOUT = httpx.Timeout(60.0, read=600.0, write=600.0)
IMAGE_INFO = TypeAdapter(ImageInfo)
IMAGE_LIST = TypeAdapter(list[ImageInfo])


class AgentClient:
    """``async with AgentClient(url, token) as agent: await agent.list_vms()``.

    ``shared``: one client a center keeps per agent and lends out (connections reused); leaving
    ``async with`` does not close it, :meth:`aclose` does.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        shared: bool = False,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.shared = shared
        self._http = api_client(
            self.base_url, token, timeout, transport, KEEPALIVE_EXPIRY_S, verify=verify
        )

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.shared:
            await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self, method: str, path: str, json: Any = None, timeout: float | None = None
    ) -> Any:
        response = await self._send(method, path, json=json, timeout=timeout)
        return None if response.status_code == 204 else response.json()

    async def _send(
        self,
        method: str,
        path: str,
        json: Any = None,
        timeout: float | httpx.Timeout | None = None,
        params: dict[str, Any] | None = None,
        content: AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        what = f"{method} {self.base_url}{path}"
        kwargs: dict[str, Any] = {"json": json, "params": params}
        if content is not None:
            kwargs |= {"content": content, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.RemoteProtocolError:
                if method != "GET":
                    raise
                # A reused connection the agent had closed (it restarted): a read asks again.
                response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise HostUnreachable(f"host agent at {self.base_url} did not answer: {exc!r}") from exc
        if response.status_code >= 400:
            raise error_from_response(response, what)
        return response

    # -- OS images (host/images.py) --------------------------------------------------------
    async def list_images(self) -> list[ImageInfo]:
        return self._typed(IMAGE_LIST, await self.request("GET", "/v1/images"), "GET", "/images")

    async def import_image(
        self, datastore: str, name: str, chunks: AsyncIterator[bytes], *,
        length: int | None, fmt: str | None, filename: str = "",
    ) -> ImageInfo:  # fmt: skip
        """Stream an image's bytes to the host (never held whole); the image as stored."""
        path = f"/v1/datastores/{datastore}/images/{name}"
        params = {"filename": filename} | ({"format": fmt} if fmt else {})
        headers = {"Content-Length": str(length)} if length is not None else None
        response = await self._send(
            "PUT", path, params=params, content=chunks, headers=headers, timeout=UPLOAD_TIMEOUT
        )
        return self._typed(IMAGE_INFO, response.json(), "PUT", path)

    async def delete_image(self, datastore: str, name: str) -> None:
        await self.request("DELETE", f"/v1/datastores/{datastore}/images/{name}")

    async def call(
        self,
        reply: TypeAdapter[T],
        method: str,
        path: str,
        body: BaseModel | None = None,
        timeout: float | None = None,
    ) -> T:
        """One request of the protocol: ``body`` sent as JSON, the answer validated as ``reply``."""
        json = None if body is None else body.model_dump(mode="json")
        answer = await self.request(method, path, json=json, timeout=timeout)
        return self._typed(reply, answer, method, path)

    def _typed(self, reply: TypeAdapter[T], answer: Any, method: str, path: str) -> T:
        try:
            return reply.validate_python(answer)
        except ValidationError as exc:
            raise ExecutionError(
                f"host agent at {self.base_url} answered {method} {path} in a shape this center "
                f"does not know (a different kvmotion version?): {exc}",
                code="protocol_mismatch",
            ) from exc

    async def facts(self) -> HostFacts:
        return await self.call(HOST_FACTS, "GET", "/v1/host")

    async def load(self, window_s: float) -> HostLoadOut:
        """Each running VM's load, averaged over the last ``window_s`` seconds."""
        return await self.call(_LOAD, "GET", f"/v1/load?window={window_s:g}")

    async def ha_heartbeat(
        self, settings: HaSettingsIn, released_done: list[str], timeout: float
    ) -> HaReportOut:
        """The center's HA heartbeat; the host's HA report (host/ha.py)."""
        body = HaHeartbeatIn(settings=settings, released_done=released_done)
        return await self.call(_HA_REPORT, "POST", "/v1/ha", body, timeout=timeout)

    async def register_vm(self, config: dict[str, Any], config_path: str) -> VmInfo:
        """Register a powered-off VM here from its record (see HostAgent.register)."""
        body = build(RegisterRequest, config=config, config_path=config_path)
        return await self.call(VM_INFO, "POST", "/v1/vms/register", body, timeout=60)

    async def unregister_vm(self, vm: str) -> None:
        await self.request("POST", f"/v1/vms/{vm}/unregister", timeout=60)

    async def list_vms(self) -> list[VmInfo]:
        return await self.call(VM_LIST, "GET", "/v1/vms")

    async def get_vm(self, vm: str) -> VmInfo:
        return await self.call(VM_INFO, "GET", f"/v1/vms/{vm}")

    async def watch_vm(self, vm: str, after: str | None, wait_s: float) -> tuple[str, VmInfo]:
        """A long-poll: the VM's record and its tag, once it differs from the record tagged
        ``after`` (at once for None), or after ``wait_s`` seconds unchanged."""
        path = f"/v1/vms/{vm}"
        params = {"wait": wait_s} | ({"after": after} if after is not None else {})
        response = await self._send("GET", path, params=params, timeout=wait_s + WATCH_MARGIN_S)
        info = self._typed(VM_INFO, response.json(), "GET", path)
        return response.headers.get("etag", "").strip('"'), info

    async def create_vm(self, spec: dict[str, Any]) -> VmInfo:
        body = build(VmCreateRequest, **spec)
        return await self.call(VM_INFO, "POST", "/v1/vms", body, timeout=120)

    async def delete_vm(self, vm: str) -> None:
        await self.request("DELETE", f"/v1/vms/{vm}")

    async def power_on(self, vm: str, evc_mode: str | None = None) -> VmInfo:
        body = build(PowerOnRequest, evc_mode=evc_mode)
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/power-on", body, timeout=120)

    async def shutdown(self, vm: str, timeout_s: float = 60) -> ShutdownResult:
        body = build(ShutdownRequest, timeout_s=timeout_s)
        path = f"/v1/vms/{vm}/shutdown"
        return await self.call(_SHUTDOWN, "POST", path, body, timeout=timeout_s + 30)

    async def power_off(self, vm: str) -> VmInfo:
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/power-off", timeout=60)

    async def prepare_incoming(self, req: IncomingRequest) -> IncomingResult:
        return await self.call(_INCOMING, "POST", "/v1/migrations/incoming", req, timeout=120)

    async def migrate(self, vm: str, req: MigrateRequest) -> VmInfo:
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/migrate", req)

    async def tune_migration(self, vm: str, req: TuneRequest) -> VmInfo:
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/migration/tune", req)

    async def start_postcopy(self, vm: str) -> VmInfo:
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/migration/postcopy")

    async def postcopy_step(self, vm: str, step: str, uri: str | None = None) -> PostcopyStep:
        """``pause`` (either side), ``recover`` (destination), ``resume`` to ``uri`` (source)."""
        body = PostcopyResume(uri=uri) if uri is not None else None
        path = f"/v1/vms/{vm}/migration/postcopy/{step}"
        return await self.call(POSTCOPY_STEP, "POST", path, body)

    async def memory_profile(self, vm: str) -> MemoryProfileOut:
        """Non-zero RAM, dirty rate and working set of a running VM (bytes, bytes/s)."""
        path = f"/v1/vms/{vm}/memory-profile"
        return await self.call(_PROFILE, "POST", path, timeout=60)

    async def cancel_migration(self, vm: str) -> VmInfo:
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/migration/cancel", timeout=60)

    async def finish_migration(self, vm: str, *, remove_files: bool = False) -> list[str]:
        """End the source's copy; returns the files it could not remove (``remove_files``)."""
        body = FinishRequest(remove_files=remove_files)
        path = f"/v1/vms/{vm}/migration/finish"
        return (await self.call(_FINISH, "POST", path, body, timeout=60)).problems

    async def move_storage(self, vm: str, req: StorageMoveRequest) -> VmInfo:
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/storage/move", req, timeout=120)

    async def mirror_disks(self, vm: str, req: DiskMirrorRequest) -> VmInfo:
        return await self.call(VM_INFO, "POST", f"/v1/vms/{vm}/storage/mirror", req, timeout=60)

    async def cancel_storage(self, vm: str) -> str:
        """Cancel a disk copy; says what was done."""
        path = f"/v1/vms/{vm}/storage/cancel"
        return (await self.call(_ABORT, "POST", path, timeout=60)).done

    async def abort_migration(self, vm: str, *, destination_gone: bool = False) -> str:
        """Undo this host's side of a migration; says what was done."""
        query = "?destination_gone=true" if destination_gone else ""
        path = f"/v1/vms/{vm}/migration/abort{query}"
        return (await self.call(_ABORT, "POST", path, timeout=60)).done


_SHUTDOWN = TypeAdapter(ShutdownResult)
_INCOMING = TypeAdapter(IncomingResult)
_PROFILE = TypeAdapter(MemoryProfileOut)
_LOAD = TypeAdapter(HostLoadOut)
_HA_REPORT = TypeAdapter(HaReportOut)
_FINISH = TypeAdapter(FinishResult)
_ABORT = TypeAdapter(AbortResult)
