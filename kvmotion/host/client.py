"""Client of a host agent's HTTP API, for the center, the CLI and tests.

HTTP failures are converted here, once: a host that does not answer is :class:`HostUnreachable`;
an error body becomes the domain error of its status, with the agent's code and message.
"""

from __future__ import annotations

from typing import Any

import httpx

from kvmotion.errors import HostUnreachable
from kvmotion.httpapi import api_client, error_from_response

# Idle connections are dropped before the agent's server would close them (uvicorn: 5 s), so a
# request never goes out on a connection the server is closing.
KEEPALIVE_EXPIRY_S = 2.0


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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.shared = shared
        self._http = api_client(self.base_url, token, timeout, transport, KEEPALIVE_EXPIRY_S)

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
        what = f"{method} {self.base_url}{path}"
        kwargs: dict[str, Any] = {"json": json}
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
        return None if response.status_code == 204 else response.json()

    async def facts(self) -> Any:
        return await self.request("GET", "/v1/host")

    async def list_vms(self) -> Any:
        return await self.request("GET", "/v1/vms")

    async def get_vm(self, vm: str) -> Any:
        return await self.request("GET", f"/v1/vms/{vm}")

    async def create_vm(self, spec: dict[str, Any]) -> Any:
        return await self.request("POST", "/v1/vms", json=spec, timeout=120)

    async def delete_vm(self, vm: str) -> None:
        await self.request("DELETE", f"/v1/vms/{vm}")

    async def power_on(self, vm: str, evc_mode: str | None = None) -> Any:
        body = {"evc_mode": evc_mode}
        return await self.request("POST", f"/v1/vms/{vm}/power-on", json=body, timeout=120)

    async def shutdown(self, vm: str, timeout_s: float = 60) -> Any:
        return await self.request(
            "POST", f"/v1/vms/{vm}/shutdown", json={"timeout_s": timeout_s}, timeout=timeout_s + 30
        )

    async def power_off(self, vm: str) -> Any:
        return await self.request("POST", f"/v1/vms/{vm}/power-off", timeout=60)

    async def prepare_incoming(
        self,
        config: dict[str, Any],
        config_path: str,
        cpu: dict[str, Any] | None = None,
        *,
        postcopy: bool = False,
        datastore: str | None = None,
    ) -> Any:
        body = {
            "config": config,
            "config_path": config_path,
            "cpu": cpu,
            "postcopy": postcopy,
            "datastore": datastore,
        }
        return await self.request("POST", "/v1/migrations/incoming", json=body, timeout=120)

    async def migrate(
        self,
        vm: str,
        uri: str,
        downtime_limit_ms: int,
        max_bandwidth_bps: int | None = None,
        *,
        brake: bool = False,
        postcopy: bool = False,
    ) -> Any:
        body = {
            "uri": uri,
            "downtime_limit_ms": downtime_limit_ms,
            "max_bandwidth_bps": max_bandwidth_bps,
            "brake": brake,
            "postcopy": postcopy,
        }
        return await self.request("POST", f"/v1/vms/{vm}/migrate", json=body)

    async def tune_migration(self, vm: str, **knobs: int | None) -> Any:
        return await self.request("POST", f"/v1/vms/{vm}/migration/tune", json=knobs)

    async def start_postcopy(self, vm: str) -> Any:
        return await self.request("POST", f"/v1/vms/{vm}/migration/postcopy")

    async def memory_profile(self, vm: str) -> dict[str, Any]:
        """Non-zero RAM, dirty rate and working set of a running VM (bytes, bytes/s)."""
        result: dict[str, Any] = await self.request(
            "POST", f"/v1/vms/{vm}/memory-profile", timeout=60
        )
        return result

    async def cancel_migration(self, vm: str) -> Any:
        return await self.request("POST", f"/v1/vms/{vm}/migration/cancel", timeout=60)

    async def finish_migration(self, vm: str, *, remove_files: bool = False) -> list[str]:
        """End the source's copy; returns the files it could not remove (``remove_files``)."""
        body = {"remove_files": remove_files}
        result = await self.request("POST", f"/v1/vms/{vm}/migration/finish", json=body, timeout=60)
        return list((result or {}).get("problems", []))

    async def move_storage(
        self, vm: str, datastore: str, max_bandwidth_bps: int | None = None
    ) -> Any:
        body = {"datastore": datastore, "max_bandwidth_bps": max_bandwidth_bps}
        return await self.request("POST", f"/v1/vms/{vm}/storage/move", json=body, timeout=120)

    async def mirror_disks(
        self,
        vm: str,
        host: str,
        port: int,
        datastore: str,
        max_bandwidth_bps: int | None = None,
    ) -> Any:
        body = {
            "host": host,
            "port": port,
            "datastore": datastore,
            "max_bandwidth_bps": max_bandwidth_bps,
        }
        return await self.request("POST", f"/v1/vms/{vm}/storage/mirror", json=body, timeout=60)

    async def cancel_storage(self, vm: str) -> Any:
        return await self.request("POST", f"/v1/vms/{vm}/storage/cancel", timeout=60)

    async def abort_migration(self, vm: str, *, destination_gone: bool = False) -> Any:
        query = "?destination_gone=true" if destination_gone else ""
        return await self.request("POST", f"/v1/vms/{vm}/migration/abort{query}", timeout=60)
