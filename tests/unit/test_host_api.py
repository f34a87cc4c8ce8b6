"""The agent's HTTP API without booting guests: auth, validation, create/delete on a datastore."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kvmotion.host.agent import HostAgent
from kvmotion.host.api import create_app
from kvmotion.host.config import DatastoreConfig, HostConfig, NetworkConfig

TOKEN = "t0ken"


@pytest.fixture
def config(tmp_path: Path) -> HostConfig:
    (tmp_path / "ds").mkdir()
    return HostConfig(
        name="172.16.0.172",
        management_address="127.0.0.1",
        token=TOKEN,
        run_dir=tmp_path / "run",
        datastores=[DatastoreConfig(name="shared", path=tmp_path / "ds", shared=True)],
        networks=[NetworkConfig(name="vm-network", bridge="kvtest-nobr")],
        accel="tcg",
    )


@pytest.fixture
async def client(config: HostConfig) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(HostAgent(config))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://agent",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as c:
            yield c


async def test_health_needs_no_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/health", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["host"] == "172.16.0.172"


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "t0ken", f"Bearer {TOKEN}x"])
async def test_wrong_token_is_401(client: httpx.AsyncClient, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {"Authorization": ""}
    r = await client.get("/v1/vms", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


async def test_facts(client: httpx.AsyncClient) -> None:
    facts = (await client.get("/v1/host")).json()
    assert facts["accel"] == "tcg" and "host config" in facts["accel_reason"]
    assert facts["memory"]["total_bytes"] > 0
    assert facts["datastores"][0]["name"] == "shared" and facts["datastores"][0]["shared"]
    assert facts["networks"] == [{"name": "vm-network", "bridge": "kvtest-nobr", "present": False}]
    # No migration address, so no link to measure: unknown (costed as the slower link), never a
    # made-up 10 Gbit/s.
    assert facts["migration_link_bps"] is None


async def test_create_list_delete(client: httpx.AsyncClient, config: HostConfig) -> None:
    body = {"name": "vm-a", "datastore": "shared", "boot_image": None, "disks": [{"size_mib": 8}]}
    r = await client.post("/v1/vms", json=body)
    assert r.status_code == 201, r.text
    vm = r.json()
    assert vm["power_state"] == "poweredOff"
    folder = config.datastores[0].path / "vm-a"
    assert (folder / "vm.json").exists() and (folder / "vm-a.qcow2").exists()
    assert [v["name"] for v in (await client.get("/v1/vms")).json()] == ["vm-a"]
    assert (await client.get(f"/v1/vms/{vm['uuid']}")).json()["name"] == "vm-a"
    r = await client.post("/v1/vms", json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"
    assert (await client.post("/v1/vms/vm-a/shutdown")).status_code == 409
    assert (await client.delete("/v1/vms/vm-a")).status_code == 204
    assert not folder.exists()
    assert (await client.get("/v1/vms/vm-a")).status_code == 404


async def test_agent_restart_finds_registered_vms(config: HostConfig) -> None:
    for _ in range(2):
        app = create_app(HostAgent(config))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://a", headers=headers
            ) as c:
                vms = (await c.get("/v1/vms")).json()
                if not vms:
                    body = {"name": "vm-a", "datastore": "shared", "boot_image": None}
                    assert (await c.post("/v1/vms", json=body)).status_code == 201
                else:
                    assert [v["name"] for v in vms] == ["vm-a"]
                    assert vms[0]["power_state"] == "poweredOff"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "a/b", "datastore": "shared"}, 422, "invalid_input"),
        ({"name": "..", "datastore": "shared"}, 422, "invalid_input"),
        ({"name": "a\x01", "datastore": "shared"}, 422, "invalid_input"),
        ({"name": "vm", "datastore": "nope", "boot_image": None}, 404, "datastore_not_found"),
        (
            {"name": "vm", "datastore": "shared", "boot_image": None, "nics": [{"network": "x"}]},
            404,
            "network_not_found",
        ),
        ({"name": "vm", "datastore": "shared"}, 404, "image_not_found"),
        (
            {"name": "vm", "datastore": "shared", "boot_image": None, "memory_mib": 1024 * 1024},
            507,
            "insufficient_memory",
        ),
        (
            {"name": "vm", "datastore": "shared", "boot_image": None,
             "disks": [{"size_mib": 16 * 1024 * 1024}]},
            507,
            "insufficient_space",
        ),
        (
            {"name": "vm", "datastore": "shared", "nics": [{"network": "vm-network",
                                                              "mac": "01:00:00:00:00:01"}]},
            422,
            "invalid_input",
        ),
    ],
)  # fmt: skip
async def test_bad_input_changes_nothing(
    client: httpx.AsyncClient, config: HostConfig, body: dict[str, object], status: int, code: str
) -> None:
    r = await client.post("/v1/vms", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert list(config.datastores[0].path.iterdir()) == []
    assert (await client.get("/v1/vms")).json() == []


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/vms", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


async def test_unknown_vm_operations(client: httpx.AsyncClient) -> None:
    for path in ("/v1/vms/ghost/power-on", "/v1/vms/ghost/shutdown", "/v1/vms/ghost/reset"):
        r = await client.post(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "vm_not_found"
