"""Schemathesis against the center's OpenAPI description: requests generated from the schema
(valid and not) must never make the center fail with an internal error.

A 5xx that names a reason is allowed where it is the truth (502: a host's agent did not answer;
507: no room); a 500 never is. The center's hosts are the fakes of fake_agent.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from kvmotion.center.api import create_app
from kvmotion.center.service import Center, CenterConfig
from tests.databases import DatabaseServer
from tests.unit.fake_agent import FakeAgents

TOKEN = "fuzz-token"
ALLOWED_5XX = {502, 507}


class Target:
    """The center the fuzzed requests reach: the module's fixture points it at a center on
    SQLite, then at one on PostgreSQL (which refuses what SQLite lets by: a string longer than
    its column, a NUL character). Until then it serves the schema only, from the app's code."""

    def __init__(self) -> None:
        self.app: Any = None
        config = CenterConfig(db_url="sqlite+aiosqlite://", token=TOKEN)
        self.schema_only = create_app(Center(config))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "lifespan":  # no center to start
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await self.schema_only(scope, receive, send)


_target = Target()
schema = schemathesis.openapi.from_asgi("/openapi.json", _target)


@pytest.fixture(scope="module")
def center_app(database_server: DatabaseServer) -> Iterator[Any]:
    fake = FakeAgents("172.16.0.172", "172.16.0.173")
    fake.add_vm("172.16.0.172", "vm-a")
    url = database_server.fresh()
    center = Center(CenterConfig(db_url=url, token=TOKEN, refresh_interval_s=3600), transport=fake)
    _target.app = create_app(center)
    yield _target.app
    _target.app = None
    database_server.drop(url)


@schema.exclude(path="/v1/tasks-stream").exclude(path="/v1/tasks/{task_id}/stream").parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_center_api_never_fails_internally(case: Any, center_app: Any) -> None:
    logging.getLogger("kvmotion").setLevel(logging.CRITICAL)  # refusals are expected here
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500 or response.status_code in ALLOWED_5XX, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        error = response.json().get("error") or {}
        assert error.get("code") and error.get("message"), response.text[:300]
