"""Schemathesis against the center's OpenAPI description: requests generated from the schema
(valid and not) must never make the center fail with an internal error.

A 5xx that names a reason is allowed where it is the truth (502: a host's agent did not answer;
507: no room); a 500 never is. The center's hosts are the fakes of fake_agent.py.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from kvmotion.center.api import create_app
from kvmotion.center.service import Center, CenterConfig
from tests.unit.fake_agent import FakeAgents

TOKEN = "fuzz-token"
ALLOWED_5XX = {502, 507}

_fake = FakeAgents("172.16.0.172", "172.16.0.173")
_fake.add_vm("172.16.0.172", "vm-a")
_center = Center(
    CenterConfig(
        db_url=f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='kvmotion-fuzz-')}/c.db",
        token=TOKEN,
        refresh_interval_s=3600,
    ),
    transport=_fake,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_center))


@schema.exclude(path="/v1/tasks-stream").exclude(path="/v1/tasks/{task_id}/stream").parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_center_api_never_fails_internally(case: Any) -> None:
    logging.getLogger("kvmotion").setLevel(logging.CRITICAL)  # refusals are expected here
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500 or response.status_code in ALLOWED_5XX, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        error = response.json().get("error") or {}
        assert error.get("code") and error.get("message"), response.text[:300]
