"""The simulated fleet (kvmotion/lab/simagent.py) under a real center: the center runs unmodified
against it, through its own AgentClient, over an httpx transport into the sim's ASGI app (each
host told apart by its port, as over real sockets). Every reply is checked against the protocol.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from kvmotion.center.service import Center, CenterConfig
from kvmotion.center.tasks import TaskState
from kvmotion.lab.simagent import SimSpeed
from kvmotion.lab.simserve import SimApp, build_fleet
from kvmotion.migration.request import MigrationRequest
from tests.databases import statements_during

HOSTS, VMS, GROUP = 20, 10, 10
TOKEN = "sim-token"
PORTS = list(range(9100, 9100 + HOSTS))
# Fast simulated hardware: a 512 MiB guest moves in about a second.
SPEED = SimSpeed(link_bps=1e9, disk_bps=2e9, tick_s=0.05)


@pytest.fixture
async def center(db_url: str) -> AsyncIterator[Center]:
    fleet = build_fleet(HOSTS, VMS, GROUP, TOKEN, PORTS, SPEED, validate=True)
    transport = httpx.ASGITransport(app=SimApp(fleet))
    config = CenterConfig(db_url=db_url, token="t", refresh_interval_s=3600)
    c = Center(config, transport=transport)
    await c.start()
    try:
        # At once, as an admin script adds a rack: hosts that share a datastore new to the
        # inventory each find it made (it was inserted twice, and refused, before).
        await asyncio.gather(*(c.inventory.add_host("127.0.0.1", TOKEN, p) for p in PORTS))
        yield c
    finally:
        await c.close()
        await fleet.close()


async def until_ended(center: Center, task_id: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = await center.tasks.get(task_id)
        if TaskState(task.state).final:
            return f"{task.state} {task.error or ''}".strip()
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} did not end in {timeout} s")


async def test_refresh_sees_the_whole_fleet(center: Center) -> None:
    await center.inventory.refresh_all()
    hosts = await center.inventory.hosts()
    vms = await center.inventory.vms()
    assert len(hosts) == HOSTS and all(h.connection == "connected" for h in hosts)
    assert len(vms) == HOSTS * VMS
    assert {v.power_state for v in vms} == {"poweredOn"}
    assert {v.host.name for v in vms if v.host} == {h.name for h in hosts}


async def test_compute_and_both_migrations_complete(center: Center) -> None:
    compute = MigrationRequest("vm-0000-00", "sim-0001", "compute")
    both = MigrationRequest("vm-0002-03", "sim-0011", "both", datastore="local-0011")
    ids = [await center.executor.submit(req) for req in (compute, both)]
    assert [await until_ended(center, i) for i in ids] == ["success", "success"]
    moved = await center.inventory.vm("vm-0000-00")
    assert moved.host is not None and moved.host.name == "sim-0001"
    both_vm = await center.inventory.vm("vm-0002-03")
    assert both_vm.host is not None and both_vm.host.name == "sim-0011"
    assert {d["datastore"] for d in both_vm.config["disks"]} == {"local-0011"}
    # The next refresh agrees: each VM is on its new host only.
    await center.inventory.refresh_all()
    on = {v.name: v.host.name for v in await center.inventory.vms() if v.host}
    assert on["vm-0000-00"] == "sim-0001" and on["vm-0002-03"] == "sim-0011"
    task = await center.tasks.get(ids[0])
    assert task.summary["downtime_ms"] == SPEED.downtime_ms


async def test_storage_migration_and_a_refused_one(center: Center) -> None:
    task_id = await center.executor.submit(
        MigrationRequest("vm-0005-01", "", "storage", datastore="local-0005")
    )
    assert await until_ended(center, task_id) == "success"
    vm = await center.inventory.vm("vm-0005-01")
    assert vm.config["datastore"] == "local-0005"
    # Hosts of different groups share no datastore: the precheck refuses, nothing changes.
    _, _, _, _, result = await center.executor.precheck(
        MigrationRequest("vm-0000-01", "sim-0015", "compute")
    )
    assert not result.ok


async def test_a_refresh_that_finds_nothing_new_writes_no_vm(center: Center) -> None:
    """A fleet's refresh reads each host's records once and rewrites none that did not change
    (it read every VM of the inventory per host, and rewrote each reported VM, before)."""
    statements = await statements_during(center.db, center.inventory.refresh_all())
    vm_writes = [
        s for s in statements if s.lstrip().upper().startswith(("UPDATE VMS", "INSERT INTO VMS"))
    ]
    vm_reads = [s for s in statements if "FROM vms" in s]
    # The VMs written before (the hosts' adds) are looked up once: whose hosts they concern.
    assert [s for s in vm_reads if s.startswith("SELECT vms.host_id")] == vm_reads[:1]
    assert vm_writes == []
    assert len(vm_reads) == HOSTS + 1  # one per host

    # The next round finds the same lists, and no VM was written since: nothing to compare.
    statements = await statements_during(center.db, center.inventory.refresh_all())
    assert [s for s in statements if "FROM vms" in s] == []
    writes = [s for s in statements if s.lstrip().upper().startswith(("UPDATE", "INSERT"))]
    assert len(writes) == 1 and "last_seen" in writes[0]  # the hosts' last-seen times, at once
