"""Schemathesis against the host agent's OpenAPI description: requests generated from the schema
(valid and not) must never make the agent fail with an internal error, every refusal must come in
the project's error shape, and every route but ``/v1/health`` must want the center's token.

The agent is real (:class:`HostAgent`, its FastAPI app, a run dir and a datastore in a temporary
directory), seeded with two powered-off VMs that the generated paths name half of the time. It
never runs anything, through these seams (patched for this module only):

- the accelerator and CPU probes and ``qemu --version`` at start: not run (accel forced to TCG);
- ``QemuProcess.start``: raises :class:`QemuError`, as a QEMU that fails to start does. A request
  valid enough to get there (power-on of a seeded VM, an incoming migration) is answered 500
  ``qemu_failed``: allowed only when this stub was reached for that very request;
- taps (``ip tuntap``/``ip link``) and the migration link's speed (``ip``/``tc``): not touched;
- ``qemu-img create``: an empty file is written instead.

No route is excluded: with these seams none can start a process. (A cold storage move would run
``qemu-img convert``, but the agent has one datastore, so every move is refused first.)
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kvmotion.errors import QemuError
from kvmotion.host import facts, taps, vmfiles
from kvmotion.host.agent import HostAgent
from kvmotion.host.api import create_app
from kvmotion.host.config import DatastoreConfig, HostConfig, NetworkConfig
from kvmotion.host.cpu import HostCpu
from kvmotion.host.hostqemu import HostQemu
from kvmotion.host.vmconfig import VmCreateRequest
from kvmotion.qemu.accel import AccelChoice
from kvmotion.qemu.process import QemuProcess

TOKEN = "agent-fuzz-token"
QEMU_7_2 = HostQemu("qemu-system-x86_64", AccelChoice("tcg", "forced"), "7.2.0", ("pc-q35-7.2",))
SEEDS = ("vm-a", "vm-b")  # vm-b is the one DELETE may take; the others keep vm-a

_root = Path(tempfile.mkdtemp(prefix="kvmotion-agent-fuzz-"))
(_root / "ds").mkdir()
CONFIG = HostConfig(
    name="172.16.0.172",
    management_address="127.0.0.1",
    migration_address="127.0.0.1",
    token=TOKEN,
    run_dir=_root / "run",
    datastores=[DatastoreConfig(name="shared", path=_root / "ds", shared=True)],
    networks=[NetworkConfig(name="vm-network", bridge="kvfuzz-nobr")],
    accel="tcg",
)


class QemuStarts:
    """The stub of ``QemuProcess.start``: counts the requests that got as far as starting QEMU."""

    calls = 0

    @classmethod
    async def start(cls, *_: Any, **__: Any) -> QemuProcess:
        cls.calls += 1
        raise QemuError("QEMU is not started in unit tests")


async def _no_probe(cls: type[HostCpu], *_: Any, **__: Any) -> HostCpu:
    return cls(None, None, "not probed in unit tests")


async def _qemu_version(*_: Any) -> str:
    return "7.2.0"


async def _machine_types(*_: Any) -> tuple[str, ...]:
    return ("pc-q35-7.2",)


async def _touch_image(*args: str) -> None:
    assert args[0] == "create", args
    Path(args[-2]).write_bytes(b"")


async def _no_tap(*_: Any) -> None:
    raise AssertionError("a unit test must not create taps")


async def _nothing(*_: Any) -> None:
    return None


@pytest.fixture(scope="module", autouse=True)
def no_processes() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QemuProcess, "start", QemuStarts.start)
        mp.setattr(HostCpu, "discover", classmethod(_no_probe))
        mp.setattr(facts, "qemu_version", _qemu_version)
        mp.setattr(facts, "machine_types", _machine_types)
        mp.setattr(facts, "link_speed_mbps", lambda _: None)
        mp.setattr(taps, "create_tap", _no_tap)
        mp.setattr(taps, "delete_tap", _nothing)
        mp.setattr(vmfiles, "qemu_img", _touch_image)
        yield


_agent = HostAgent(CONFIG)
for _name in SEEDS:  # registered in the run dir: the app's start finds them, as after a restart
    asyncio.run(
        _agent.create(VmCreateRequest(name=_name, datastore="shared", boot_image=None, disks=[]))
    )
_uuids = [vm.config.uuid for vm in _agent.vms.values()]
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_agent))


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Name a seeded VM (by name or uuid) two times in three, a generated one otherwise."""
    if not path_parameters or "vm" not in path_parameters:
        return st.just(path_parameters)
    seeds = ["vm-b"] if context.operation.method.upper() == "DELETE" else ["vm-a", *_uuids[:1]]
    return st.sampled_from([path_parameters, *({"vm": s} for s in seeds)])


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_agent_api_never_fails_internally(case: Any) -> None:
    logging.getLogger("kvmotion").setLevel(logging.CRITICAL)  # refusals are expected here
    before = QemuStarts.calls
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    what = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json().get("error") or {}
        assert error.get("code") and error.get("message"), what
        if response.status_code >= 500:  # only QEMU's start, which the stub refuses
            assert error["code"] == "qemu_failed" and QemuStarts.calls > before, what
    assert all(vm.state == "poweredOff" for vm in _agent.vms.values()), what
    assert registered() == sorted(_agent.vms), what


# The switchover route wants the one-time token the destination gave the center for the source
# (host/switchover.py), not the center's: see the test below.
SWITCHOVER = "/v1/migrations/{uuid}/switchover"


@schema.include(path=SWITCHOVER).parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_switchover_route_wants_a_migrations_own_token(case: Any) -> None:
    """Without an incoming migration whose token it names, it is refused and changes nothing
    (the center's token is no substitute)."""
    before = {uuid: vm.state for uuid, vm in _agent.vms.items()}
    for headers in ({}, {"X-Switchover-Token": "wrong"}, {"Authorization": f"Bearer {TOKEN}"}):
        response = case.call(headers=headers)
        what = f"{case.method} {case.formatted_path} {headers} -> {response.status_code}"
        assert response.status_code in (403, 405, 422), what
        assert TOKEN not in response.text
    assert {uuid: vm.state for uuid, vm in _agent.vms.items()} == before


def registered() -> list[str]:
    """The VMs the run dir holds a registration for (what an agent that restarts finds)."""
    return sorted(p.parent.name for p in CONFIG.vms_run_dir.glob("*/registration.json"))


@schema.exclude(path="/v1/health").exclude(path=SWITCHOVER).parametrize()
@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_agent_api_wants_the_token(case: Any) -> None:
    if case.method.upper() != case.operation.method.upper():  # a method the path lacks: 405
        assert case.call().status_code == 405
        return
    before = {uuid: vm.state for uuid, vm in _agent.vms.items()}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = case.call(headers=headers)
        what = f"{case.method} {case.formatted_path} {headers} -> {response.status_code}"
        assert response.status_code == 401, what
        assert response.json()["error"]["code"] == "unauthorized", what
        assert TOKEN not in response.text
    assert {uuid: vm.state for uuid, vm in _agent.vms.items()} == before


# -- regressions: what the fuzzing found ---------------------------------------------------------
def _record(**kw: Any) -> dict[str, Any]:
    uuid = "0e5a1c53-6a7d-4c3e-9a55-6f2b3c4d5e6f"
    record: dict[str, Any] = {
        "uuid": uuid, "name": "vm-in", "datastore": "shared", "vcpus": 1, "memory_mib": 64,
        "disks": [], "nics": [], "cpu_model": "qemu64", "machine_type": "pc-q35-7.2",
        "boot_image": None, "kernel_args": "", "created_at": "2024-01-01T00:00:00+00:00",
    }  # fmt: skip
    disk = {"datastore": "shared", "path": "vm-in/vm-in.qcow2", "size_mib": 8}
    return {
        "config": record | {"disks": [disk]} | kw,
        "config_path": f"{_root}/ds/vm-in/vm.json",
        "ram_pad_kib": 8,  # this agent's QEMU is 7.2 under TCG: a VM must come padded
    }


INCOMING: list[tuple[str, dict[str, Any]]] = [
    # A uuid names the registration's folder in the run dir: an empty one was the run dir itself
    # (its registration written beside every VM's, then the whole folder removed when QEMU did
    # not start: every VM of the host forgotten); '..' left the run dir.
    ("empty uuid", _record(uuid="")),
    ("uuid with ..", _record(uuid="../../../tmp/kvmotion-escape")),
    ("uuid not canonical", _record(uuid="0E5A1C53-6A7D-4C3E-9A55-6F2B3C4D5E6F")),
    ("name with /", _record(name="a/b")),
    ("name ..", _record(name="..")),
    ("name with NUL", _record(name="vm\x00")),
    ("10,000-character name", _record(name="a" * 10_000)),
    ("disk path leaving the datastore", _record(disks=[
        {"datastore": "shared", "path": "../../etc/passwd", "size_mib": 8}])),
    # A NUL in a disk path was a 500 (ValueError: embedded null byte while resolving it).
    ("disk path with NUL", _record(disks=[
        {"datastore": "shared", "path": "vm-in/a\x00.qcow2", "size_mib": 8}])),
    ("no vCPUs", _record(vcpus=0)),
    ("no memory", _record(memory_mib=0)),
    ("negative disk", _record(disks=[
        {"datastore": "shared", "path": "vm-in/vm-in.qcow2", "size_mib": -1}])),
    ("multicast MAC", _record(nics=[{"network": "vm-network", "mac": "01:00:5e:00:00:01"}])),
    ("machine type with options", _record(machine_type="pc,accel=kvm")),
    ("a newline in kernel args", _record(kernel_args="init=/bin/sh\n")),
    ("a tab in kernel args", _record(kernel_args="a\tb")),
    ("relative config_path", _record() | {"config_path": "vm-in/vm.json"}),
    ("config_path not a record", _record() | {"config_path": "/etc/passwd"}),
    ("config_path with ..", _record() | {"config_path": f"{_root}/ds/../../vm.json"}),
]  # fmt: skip


@pytest.mark.parametrize("body", [b for _, b in INCOMING], ids=[i for i, _ in INCOMING])
def test_a_hostile_incoming_record_is_refused_and_changes_nothing(body: dict[str, Any]) -> None:
    before = (registered(), QemuStarts.calls, sorted(_root.rglob("*")))
    case = schema["/v1/migrations/incoming"]["POST"].Case(body=body)
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and "config" in error["message"], error
    assert (registered(), QemuStarts.calls, sorted(_root.rglob("*"))) == before
    assert not Path("/tmp/kvmotion-escape").exists()


def test_a_valid_incoming_record_gets_as_far_as_starting_qemu() -> None:
    """The checks above refuse only what is wrong: the center's own records pass them."""
    before = (registered(), QemuStarts.calls)
    (_root / "ds" / "vm-in").mkdir(exist_ok=True)
    (_root / "ds" / "vm-in" / "vm-in.qcow2").write_bytes(b"")
    case = schema["/v1/migrations/incoming"]["POST"].Case(body=_record())
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 500 and response.json()["error"]["code"] == "qemu_failed"
    assert QemuStarts.calls == before[1] + 1 and registered() == before[0]


def test_an_unpadded_vm_is_refused_by_a_qemu_that_would_lose_its_writes() -> None:
    """A VM started by QEMU 9+ has its exact RAM size: 7.2 under TCG would lose its writes
    when it migrates it on, so the agent refuses it (the center's precheck does first)."""
    before = (registered(), QemuStarts.calls)
    (_root / "ds" / "vm-in").mkdir(exist_ok=True)
    (_root / "ds" / "vm-in" / "vm-in.qcow2").write_bytes(b"")
    body = _record() | {"ram_pad_kib": 0}
    case = schema["/v1/migrations/incoming"]["POST"].Case(body=body)
    found, _agent.qemu = _agent.qemu, QEMU_7_2  # whatever the app's start found
    try:
        response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        _agent.qemu = found
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "ram_pad_missing"
    assert "loses guest writes" in response.json()["error"]["message"]
    assert (registered(), QemuStarts.calls) == before


# Names, MACs and kernel arguments were checked with re.match and a pattern ending in '$', which
# also matches before a final newline: "vm\n" was a valid VM name (and folder), "...:56\n" a MAC.
CREATE: list[tuple[str, dict[str, Any]]] = [
    ("name ending in a newline", {"name": "vm-nl\n"}),
    ("datastore ending in a newline", {"datastore": "shared\n"}),
    (
        "MAC ending in a newline",
        {"nics": [{"network": "vm-network", "mac": "52:54:00:12:34:56\n"}]},
    ),
    ("network ending in a newline", {"nics": [{"network": "vm-network\n"}]}),
    ("kernel args ending in a newline", {"kernel_args": "quiet\n"}),
    ("CPU model ending in a newline", {"cpu_model": "qemu64\n"}),
]


@pytest.mark.parametrize("fields", [f for _, f in CREATE], ids=[i for i, _ in CREATE])
def test_a_trailing_newline_is_refused_and_changes_nothing(fields: dict[str, Any]) -> None:
    before = (registered(), sorted(_root.rglob("*")))
    body = {"name": "vm-nl", "datastore": "shared", "boot_image": None, "disks": []} | fields
    response = (
        schema["/v1/vms"]["POST"].Case(body=body).call(headers={"Authorization": f"Bearer {TOKEN}"})
    )
    assert response.status_code == 422, response.text[:300]
    assert response.json()["error"]["code"] == "invalid_input"
    assert (registered(), sorted(_root.rglob("*"))) == before
