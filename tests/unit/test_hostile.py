"""Hostile input against the center's API: every request here must be refused with a 4xx, a
stable error code and a message, and change nothing (inventory, tasks, clusters).

The center is real (FastAPI app, SQLite, executor); its agents are the fakes of fake_agent.py,
behind an ASGI transport: nothing leaves the process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from kvmotion.center.api import create_app
from kvmotion.center.service import ApiToken, Center, CenterConfig
from tests.databases import DatabaseServer
from tests.unit.fake_agent import PORT, TOKEN, FakeAgents

SRC, DST = "172.16.0.172", "172.16.0.173"
CENTER_TOKEN = "center-secret"
AUTH = {"Authorization": f"Bearer {CENTER_TOKEN}"}
READER_TOKEN = "read-only-token-0123456789"
READER = {"Authorization": f"Bearer {READER_TOKEN}"}
LONG = "a" * 10_000


def spec(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "vm-new", "datastore": "shared"}
    return {"host": SRC, "spec": base | kw}


# (method, path, body or raw bytes, expected status, expected code)
Case = tuple[str, str, Any, int, str]

CASES: list[Case] = [  # at least 50 kinds (issue 8)
    # -- names -------------------------------------------------------------------------------
    ("POST", "/v1/vms", spec(name="a/b"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name=".."), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name="../etc"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name="a\x00b"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name="a\nb"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name="a\x1bb"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name=LONG), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name=""), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name=" vm"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name="vm-é"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(name="-vm"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(datastore="../shared"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(datastore=LONG), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(nics=[{"network": "a/b"}]), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(nics=[{"network": "vm-network", "mac": "zz"}]), 422, "invalid_input"),
    (
        "POST",
        "/v1/vms",
        spec(nics=[{"network": "vm-network", "mac": "01:00:5e:00:00:01"}]),
        422,
        "invalid_input",
    ),
    ("POST", "/v1/vms", spec(cpu_model="max; rm -rf /"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(kernel_args="init=/bin/sh\x00"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(kernel_args=LONG), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(boot_image="../../etc"), 422, "invalid_input"),
    # -- sizes -------------------------------------------------------------------------------
    ("POST", "/v1/vms", spec(memory_mib=-1), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(memory_mib=0), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(memory_mib=10**12), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(vcpus=0), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(vcpus=100_000), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(disks=[{"size_mib": 0}]), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(disks=[{"size_mib": -5}]), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(disks=[{"size_mib": 10**15}]), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(disks=[{"size_mib": 8}] * 100), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(memory_mib="lots"), 422, "invalid_input"),
    ("POST", "/v1/vms", spec(unknown_field=1), 422, "invalid_input"),
    # -- unknown things ------------------------------------------------------------------------
    ("POST", "/v1/vms", spec() | {"host": "172.16.0.199"}, 404, "host_not_found"),
    ("GET", "/v1/vms/ghost", None, 404, "vm_not_found"),
    ("GET", f"/v1/vms/{LONG}", None, 404, "vm_not_found"),
    ("GET", "/v1/hosts/ghost", None, 404, "host_not_found"),
    ("GET", "/v1/tasks/999999", None, 404, "task_not_found"),
    ("POST", "/v1/tasks/999999/cancel", None, 404, "task_not_found"),
    ("GET", "/v1/tasks/-1", None, 404, "task_not_found"),
    ("GET", "/v1/tasks/abc", None, 422, "invalid_input"),
    ("GET", "/v1/clusters/ghost", None, 404, "cluster_not_found"),
    ("POST", "/v1/vms/ghost/power-on", None, 404, "vm_not_found"),
    ("DELETE", "/v1/vms/ghost", None, 404, "vm_not_found"),
    ("POST", "/v1/vms/ghost/migrate", {"host": DST}, 404, "vm_not_found"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": "172.16.0.199"}, 404, "host_not_found"),
    (
        "POST",
        "/v1/vms/vm-a/migrate",
        {"type": "storage", "datastore": "nosuch"},
        404,
        "datastore_not_found",
    ),
    # -- wrong states --------------------------------------------------------------------------
    ("POST", "/v1/vms/vm-a/power-on", None, 409, "wrong_state"),
    ("POST", "/v1/vms/vm-off/power-off", None, 409, "wrong_state"),
    ("DELETE", "/v1/vms/vm-a", None, 409, "wrong_state"),
    ("POST", "/v1/vms/vm-off/migrate", {"host": SRC}, 422, "invalid_input"),
    (
        "POST",
        "/v1/vms/vm-off/migrate",
        {"type": "both", "host": DST, "datastore": "local-173"},
        409,
        "not_running",
    ),
    ("POST", "/v1/vms/vm-a/migrate", {"host": SRC}, 409, "same_host"),
    (
        "POST",
        "/v1/vms/vm-a/migrate",
        {"type": "storage", "datastore": "shared"},
        409,
        "same_datastore",
    ),
    ("POST", "/v1/clusters", {"name": "Cluster"}, 409, "cluster_exists"),
    # -- migration requests --------------------------------------------------------------------
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "downtime_ms": 0}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "downtime_ms": -1}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "downtime_ms": 10**9}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "max_bandwidth_bps": 1}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "deadline_s": 0}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "priority": "urgent"}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "strategy": "yolo"}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "type": "teleport"}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": LONG}, 422, "invalid_input"),
    (
        "POST",
        "/v1/vms/vm-a/migrate",
        {"type": "storage", "datastore": "../x"},
        422,
        "invalid_input",
    ),
    (
        "POST",
        "/v1/vms/vm-a/migrate",
        {"type": "both", "datastore": "local-173"},
        422,
        "invalid_input",
    ),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "datastore": "local-173"}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": DST, "surprise": True}, 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", {"host": ["a"]}, 422, "invalid_input"),
    (
        "POST",
        "/v1/vms/vm-a/migrate/precheck",
        {"host": DST, "downtime_ms": "x"},
        422,
        "invalid_input",
    ),
    # -- malformed bodies ------------------------------------------------------------------------
    ("POST", "/v1/vms", b"{", 422, "invalid_input"),
    ("POST", "/v1/vms", b"", 422, "invalid_input"),
    ("POST", "/v1/vms", b"[]", 422, "invalid_input"),
    ("POST", "/v1/vms", b"null", 422, "invalid_input"),
    ("POST", "/v1/vms", b"\xff\xfe", 422, "invalid_input"),
    ("POST", "/v1/vms/vm-a/migrate", b'{"host": ', 422, "invalid_input"),
    # -- clusters, EVC, hosts ------------------------------------------------------------------
    ("POST", "/v1/clusters", {"name": "a/b"}, 422, "invalid_input"),
    ("POST", "/v1/clusters", {"name": LONG}, 422, "invalid_input"),
    ("PUT", "/v1/clusters/Cluster/evc", {"mode": "INVALID!"}, 422, "invalid_input"),
    ("PUT", "/v1/clusters/Cluster/evc", {"mode": "intel-teleport"}, 404, "evc_mode_not_found"),
    ("PUT", "/v1/vms/vm-a/evc", {"mode": "x" * 100}, 422, "invalid_input"),
    ("POST", "/v1/clusters/Cluster/hosts", {"host": "172.16.0.199"}, 404, "host_not_found"),
    ("POST", "/v1/hosts", {"address": "", "token": "t"}, 422, "invalid_input"),
    ("POST", "/v1/hosts", {"address": ":", "token": "t"}, 422, "invalid_input"),
    ("POST", "/v1/hosts", {"address": "a..b", "token": "t"}, 422, "invalid_input"),
    ("POST", "/v1/hosts", {"address": SRC, "token": "t\u00e9"}, 422, "invalid_input"),
    ("POST", "/v1/hosts", {"address": SRC, "token": "t", "port": 0}, 422, "invalid_input"),
    ("POST", "/v1/hosts", {"address": SRC, "token": "t", "port": 70000}, 422, "invalid_input"),
    # -- images: the body is the image's bytes, never read as text (it may hold NULs) ----------
    ("PUT", "/v1/images/a%00b?datastore=shared", b"QFI", 422, "invalid_input"),
    ("PUT", "/v1/images/deb?datastore=nosuch", b"QFI\x00\\u0000", 404, "datastore_not_found"),
    # -- query parameters ----------------------------------------------------------------------
    ("GET", "/v1/tasks?limit=abc", None, 422, "invalid_input"),
    ("GET", "/v1/events?limit=abc", None, 422, "invalid_input"),
]


@pytest.fixture(scope="module")
def module_db(database_server: DatabaseServer) -> Iterator[str]:
    url = database_server.fresh()
    yield url
    database_server.drop(url)


@contextlib.asynccontextmanager
async def running_center(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A center with hosts .172 and .173, vm-a running and vm-off off on .172."""
    fake = FakeAgents(SRC, DST)
    fake.add_vm(SRC, "vm-a")
    fake.add_vm(SRC, "vm-off", power_state="poweredOff")
    config = CenterConfig(
        db_url=db_url,
        token=CENTER_TOKEN,
        refresh_interval_s=3600,
        users=[ApiToken(name="student", token=READER_TOKEN, role="read-only")],
    )
    center = Center(config, transport=fake)
    await center.start()
    try:
        for host in (SRC, DST):
            await center.inventory.add_host(host, TOKEN, PORT)
        transport = httpx.ASGITransport(app=create_app(center))
        async with httpx.AsyncClient(transport=transport, base_url="http://center") as client:
            yield client
    finally:
        await center.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(module_db: str) -> AsyncIterator[httpx.AsyncClient]:
    """One center for the module's refusals: each must leave it as it was (checked per case).
    A test that changes the center (a migration that is accepted) takes its own."""
    async with running_center(module_db) as client:
        yield client


async def snapshot(api: httpx.AsyncClient) -> dict[str, Any]:
    """What a refusal must leave as it was."""
    paths = ("/v1/vms", "/v1/hosts", "/v1/tasks", "/v1/clusters", "/v1/datastores")
    answers = await asyncio.gather(*(api.get(p, headers=AUTH) for p in paths))
    state = {p: r.json() for p, r in zip(paths, answers, strict=True)}
    for host in state["/v1/hosts"]:
        host.pop("last_seen", None)
        host.pop("facts", None)
    return state


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    CASES,
    ids=[f"{i:02d}-{c[0]}-{c[1][:30]}" for i, c in enumerate(CASES)],
)
async def test_refused_and_nothing_changed(
    api: httpx.AsyncClient, method: str, path: str, body: Any, status: int, code: str
) -> None:
    before = await snapshot(api)
    if isinstance(body, bytes):
        headers = AUTH | {"Content-Type": "application/json"}
        r = await api.request(method, path, content=body, headers=headers)
    else:
        r = await api.request(method, path, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, r.text
    assert 10 <= len(error["message"]) <= 2000, error
    assert await snapshot(api) == before


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": CENTER_TOKEN},
     {"Authorization": "Basic " + CENTER_TOKEN}, {"Authorization": "Bearer " + LONG}],
)  # fmt: skip
async def test_requests_without_the_token_are_refused(
    api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    before = await snapshot(api)
    for method, path, body in (
        ("GET", "/v1/vms", None),
        ("POST", "/v1/vms", spec()),
        ("POST", "/v1/vms/vm-a/migrate", {"host": DST}),
        ("DELETE", "/v1/vms/vm-off", None),
    ):
        r = await api.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert CENTER_TOKEN not in r.text
    assert await snapshot(api) == before


async def test_a_read_only_user_looks_but_changes_nothing(api: httpx.AsyncClient) -> None:
    before = await snapshot(api)
    for path in ("/v1/vms", "/v1/hosts", "/v1/tasks", "/v1/clusters", "/v1/events"):
        assert (await api.get(path, headers=READER)).status_code == 200, path
    r = await api.post("/v1/vms/vm-a/migrate/precheck", json={"host": DST}, headers=READER)
    assert r.status_code == 200 and r.json()["ok"], r.text  # a precheck changes nothing
    for method, path, body in (
        ("POST", "/v1/vms/vm-a/migrate", {"host": DST}),
        ("POST", "/v1/vms/vm-a/power-off", None),
        ("DELETE", "/v1/vms/vm-off", None),
        ("POST", "/v1/clusters", {"name": "mine"}),
        ("PUT", "/v1/clusters/Cluster/evc", {"mode": None}),
        ("POST", "/v1/vms", spec()),
    ):
        r = await api.request(method, path, json=body, headers=READER)
        assert r.status_code == 403, (method, path, r.text)
        error = r.json()["error"]
        assert error["code"] == "forbidden" and "student" in error["message"]
        assert READER_TOKEN not in r.text
    assert await snapshot(api) == before


@pytest.mark.asyncio(loop_scope="function")
async def test_two_migrations_of_one_vm_at_once_one_runs(db_url: str) -> None:
    async with running_center(db_url) as api:
        await _two_migrations_at_once_one_runs(api)


async def _two_migrations_at_once_one_runs(api: httpx.AsyncClient) -> None:
    body = {"host": DST}
    first, second = await asyncio.gather(
        api.post("/v1/vms/vm-a/migrate", json=body, headers=AUTH),
        api.post("/v1/vms/vm-a/migrate", json=body, headers=AUTH),
    )
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [202, 409], (first.text, second.text)
    refused = first if first.status_code == 409 else second
    assert refused.json()["error"]["code"] == "already_migrating"
    tasks = (await api.get("/v1/tasks", headers=AUTH)).json()
    assert len(tasks) == 1
