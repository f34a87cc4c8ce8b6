"""The center-agent protocol (kvmotion/host/protocol.py) as both sides speak it.

The same calls, through the center's own client, go to the real agent's app (over ASGI, no
guests) and to the unit tests' fake agent; each reply must come back typed, and the two must
have one shape, key for key. A reply in another shape is a clear error, not a KeyError deep in
the center.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from kvmotion.errors import Conflict, ExecutionError
from kvmotion.host.agent import HostAgent
from kvmotion.host.api import create_app
from kvmotion.host.client import AgentClient
from kvmotion.host.config import HostConfig
from kvmotion.host.protocol import facts_json, vm_json
from tests.unit.fake_agent import PORT, TOKEN, FakeAgents
from tests.unit.test_host_api import TOKEN as AGENT_TOKEN
from tests.unit.test_host_api import config as config  # the fixture

HOST = "172.16.0.172"
SPEC = {
    "name": "vm-n",
    "datastore": "shared",
    "boot_image": None,
    "disks": [{"size_mib": 8}],
    "nics": [{"network": "vm-network"}],
}


@pytest.fixture
async def real(config: HostConfig) -> AsyncIterator[AgentClient]:
    """The real agent's app on test_host_api.py's host (172.16.0.172, datastore "shared")."""
    app = create_app(HostAgent(config))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with AgentClient("http://agent", AGENT_TOKEN, transport=transport) as client:
            yield client


@pytest.fixture
async def fake() -> AsyncIterator[AgentClient]:
    agents = FakeAgents(HOST)
    async with AgentClient(f"http://{HOST}:{PORT}", TOKEN, transport=agents) as client:
        yield client


def shape(value: Any) -> Any:
    """The keys of a JSON value, all the way down (a list by its first item; scalars as '.')."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "."


async def conversation(agent: AgentClient) -> dict[str, Any]:
    """What the center asks of an agent around one powered-off VM, and what it was told."""
    created = await agent.create_vm(SPEC)
    listed = await agent.list_vms()
    got = await agent.get_vm(created.uuid)
    with pytest.raises(Conflict) as no_copy:
        await agent.cancel_storage("vm-n")
    return {
        "facts": facts_json(await agent.facts()),
        "created": vm_json(created),
        "listed": [vm_json(v) for v in listed if v.name == "vm-n"],
        "got": vm_json(got),
        "abort": await agent.abort_migration("vm-n"),
        "cancel_storage": no_copy.value.code,
    }


async def test_the_real_agent_and_the_fake_answer_in_one_shape(
    real: AgentClient, fake: AgentClient
) -> None:
    ours, theirs = await conversation(real), await conversation(fake)

    assert ours["created"]["power_state"] == theirs["created"]["power_state"] == "poweredOff"
    assert ours["got"] == ours["created"] and ours["listed"] == [ours["created"]]
    assert ours["abort"] == theirs["abort"] == "nothing to abort"
    assert ours["cancel_storage"] == theirs["cancel_storage"] == "no_migration"
    for key in ("facts", "created", "listed", "got"):
        real_shape, fake_shape = shape(ours[key]), shape(theirs[key])
        # Lists the fake leaves empty (CPU flags) say nothing about their items. The host's CPU
        # model and EVC modes (facts.cpu_model) are still an untyped dict of the protocol, which
        # the fake leaves empty (its hosts have no EVC): compared once they get their own model.
        drop = {k for k in _keys(real_shape) | _keys(fake_shape) if k.startswith(".cpu_model.")}
        assert _keys(real_shape) - drop == _keys(fake_shape) - drop, key


def _keys(value: Any, path: str = "") -> set[str]:
    if isinstance(value, dict):
        keys = {f"{path}.{k}" for k in value}
        for k, v in value.items():
            keys |= _keys(v, f"{path}.{k}")
        return keys
    if isinstance(value, list) and value:
        return _keys(value[0], f"{path}[]")
    return set()


async def test_a_reply_in_another_shape_is_a_protocol_mismatch() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"name": HOST, "hostname": 7})  # an older agent, say

    async with AgentClient("http://agent", TOKEN, transport=httpx.MockTransport(answer)) as agent:
        with pytest.raises(ExecutionError, match="in a shape this center does not know") as exc:
            await agent.facts()
    assert exc.value.code == "protocol_mismatch"
