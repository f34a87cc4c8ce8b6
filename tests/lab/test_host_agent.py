"""The host agent, for real: VMs boot on the seed's hosts and the user reaches them.

Order matters inside this module (one lab, one story): VMs are created and booted, reached,
written to, an agent is restarted under a running VM, one VM is shut down gracefully, bad input is
refused. The lab fixture tears everything down and checks nothing is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from kvmotion.errors import Conflict, InvalidInput, NotFound, Unauthorized
from kvmotion.host.client import AgentClient
from kvmotion.host.protocol import ShutdownResult, VmInfo
from kvmotion.lab import topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.records import verify_records
from tests.lab.conftest import qemu_pids_under

pytestmark = pytest.mark.lab


def agent(state: topology.LabState, index: int) -> AgentClient:
    host = state.hosts[index]
    return AgentClient(host.agent_url, state.token, verify=host.tls())


def qemu_pids_of(uuid: str) -> list[int]:
    return [pid for pid in qemu_pids_under(topology.lab_dir()) if uuid in _cmdline(pid)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def booted(lab: topology.LabState) -> dict[str, VmInfo]:
    """vm-a on .172 and vm-b on .173, both on the shared datastore, powered on."""

    async def boot() -> dict[str, VmInfo]:
        vms = {}
        for index, name in enumerate(("vm-a", "vm-b")):
            async with agent(lab, index) as a:
                await a.create_vm(vm_spec(name, index))
                vms[name] = await a.power_on(name)
        return vms

    return asyncio.run(boot())


async def test_vms_run_on_the_seeds_hosts(
    lab: topology.LabState, booted: dict[str, VmInfo]
) -> None:
    for index, name in enumerate(("vm-a", "vm-b")):
        async with agent(lab, index) as a:
            vm = await a.get_vm(name)
            facts = await a.facts()
        assert vm.power_state == "poweredOn" and vm.qemu_status == "running"
        assert facts.management_address == f"172.16.0.{172 + index}"
        assert facts.migration_address == f"172.16.1.{172 + index}"
        assert facts.accel in ("kvm", "tcg") and facts.accel_reason
        assert facts.vms_powered_on == 1
        assert {d.name for d in facts.datastores} == {"shared", f"local-{172 + index}"}
        assert facts.networks[0].present is True
        assert qemu_pids_of(vm.uuid) == [vm.pid]


def test_client_reaches_both_guests(lab: topology.LabState, booted: dict[str, VmInfo]) -> None:
    for index in (0, 1):
        client = wait_for_guest(lab, guest_ip(index))
        first, second = client.ping(), client.ping()
        assert second.n > first.n and second.t_ns >= first.t_ns
        client.close()


def test_disk_records_survive_a_graceful_shutdown(
    lab: topology.LabState, booted: dict[str, VmInfo]
) -> None:
    client = wait_for_guest(lab, guest_ip(1))
    client.disk_start(0)
    time.sleep(1.0)
    acked = client.disk_stop()
    assert acked > 0
    client.close()

    async def shutdown() -> ShutdownResult:
        async with agent(lab, 1) as a:
            return await a.shutdown("vm-b", timeout_s=30)

    result = asyncio.run(shutdown())
    assert result.how == "guest", "the guest should power off on ACPI, not be pulled"
    assert result.vm.power_state == "poweredOff"
    assert qemu_pids_of(booted["vm-b"].uuid) == []
    disk = lab.shared_datastore / "vm-b" / "vm-b.qcow2"
    check = verify_records(disk, acked)
    assert check.ok, check.message
    assert check.highest >= acked


def test_agent_restart_keeps_the_vm_running_once(
    lab: topology.LabState, booted: dict[str, VmInfo]
) -> None:
    host = lab.hosts[0]
    uuid, pid = booted["vm-a"].uuid, booted["vm-a"].pid
    client = wait_for_guest(lab, guest_ip(0))
    before = client.ping()
    current = topology.load_state()
    assert current is not None
    agent_pid = current.hosts[0].agent_pid
    assert agent_pid is not None
    os.kill(agent_pid, signal.SIGKILL)
    # The guest does not notice its agent is gone.
    assert client.ping().n > before.n
    restarted = topology.lab_up(2, log=lambda _m: None)
    assert restarted.hosts[0].agent_pid != agent_pid

    async def check() -> None:
        async with AgentClient(host.agent_url, lab.token, verify=host.tls()) as a:
            vm = await a.get_vm("vm-a")
            assert vm.power_state == "poweredOn" and vm.pid == pid
            with pytest.raises(Conflict):
                await a.power_on("vm-a")

    asyncio.run(check())
    assert qemu_pids_of(uuid) == [pid], "exactly one QEMU for vm-a"
    assert client.ping().n > before.n, "the user's connection survived the agent restart"
    client.close()


async def test_bad_input_is_refused_and_changes_nothing(
    lab: topology.LabState, booted: dict[str, VmInfo]
) -> None:
    async with agent(lab, 0) as a:
        before = await a.list_vms()
        with pytest.raises(Conflict, match="already exists"):
            await a.create_vm(vm_spec("vm-a", 5))
        with pytest.raises(Conflict, match="another host"):
            await a.create_vm(vm_spec("vm-b", 5))  # vm-b's folder is on the shared datastore
        with pytest.raises(NotFound, match="local-173"):
            await a.create_vm(vm_spec("vm-c", 5, datastore="local-173"))
        with pytest.raises(InvalidInput):
            await a.create_vm({**vm_spec("x", 5), "name": "../evil"})
        with pytest.raises(NotFound, match="no VM"):
            await a.get_vm("ghost")
        assert await a.list_vms() == before
    tls = lab.hosts[0].tls()
    async with AgentClient(lab.hosts[0].agent_url, "wrong-token", verify=tls) as bad:
        with pytest.raises(Unauthorized):
            await bad.list_vms()
    async with httpx.AsyncClient(trust_env=False, verify=tls or True) as http:
        r = await http.get(f"{lab.hosts[0].agent_url}/openapi.json")
        assert r.status_code == 200 and "/v1/vms" in r.json()["paths"]


async def test_delete_running_vm_is_refused_then_allowed(
    lab: topology.LabState, booted: dict[str, VmInfo]
) -> None:
    async with agent(lab, 0) as a:
        with pytest.raises(Conflict, match="shut it down"):
            await a.delete_vm("vm-a")
        await a.power_off("vm-a")
        await a.delete_vm("vm-a")
        assert [v.name for v in await a.list_vms()] == []
    assert not (lab.shared_datastore / "vm-a").exists()
