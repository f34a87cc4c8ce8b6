"""The API's list of VMs is kept between requests, each VM's record until it is written
(inventory.VmList, db.Changes): it must never answer with what the inventory no longer says.
On SQLite, then PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from kvmotion.center import runs
from kvmotion.center.api import create_app
from kvmotion.center.db import Vm
from kvmotion.center.inventory import Inventory, VmList
from kvmotion.center.service import Center, CenterConfig
from kvmotion.migration.request import MigrationRequest
from tests.databases import DatabaseServer, statements_during
from tests.unit.fake_agent import PORT, TOKEN, FakeAgents
from tests.unit.test_executor import wait_task

SRC, DST = "172.16.0.172", "172.16.0.173"


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "POLL_INTERVAL", 0.002)


@pytest.fixture
def db_url(database_server: DatabaseServer) -> Iterator[str]:
    url = database_server.fresh()
    yield url
    database_server.drop(url)


@pytest.fixture
async def center(db_url: str) -> AsyncIterator[tuple[Center, FakeAgents, httpx.AsyncClient]]:
    fake = FakeAgents(SRC, DST)
    fake.add_vm(SRC, "vm-a")
    fake.add_vm(SRC, "vm-b")
    center = Center(CenterConfig(db_url=db_url, token="t", refresh_interval_s=3600), fake)
    await center.start()
    for host in (SRC, DST):
        await center.inventory.add_host(host, TOKEN, PORT)
    transport = httpx.ASGITransport(app=create_app(center))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://c", headers={"Authorization": "Bearer t"}
    ) as api:
        yield center, fake, api
    await center.close()


async def listed(api: httpx.AsyncClient) -> dict[str, tuple[str | None, str]]:
    r = await api.get("/v1/vms")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return {v["name"]: (v["host"], v["power_state"]) for v in r.json()}


async def test_the_list_follows_every_change_of_the_inventory(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    c, fake, api = center
    on = (SRC, "poweredOn")
    assert await listed(api) == {"vm-a": on, "vm-b": on}
    assert await listed(api) == {"vm-a": on, "vm-b": on}  # kept: nothing was written

    vm_b = fake.vm(SRC, "vm-b")
    assert vm_b is not None
    vm_b.power_state, vm_b.qemu_status = "poweredOff", None  # its host says so
    await c.inventory.refresh_host(SRC)
    assert await listed(api) == {"vm-a": on, "vm-b": (SRC, "poweredOff")}

    task_id = await c.executor.submit(MigrationRequest("vm-a", DST))  # a migration moves it
    await c.executor.wait(task_id)
    assert (await c.tasks.get(task_id)).state == "success"
    assert (await listed(api))["vm-a"] == (DST, "poweredOn")

    async with c.db.session() as s:  # a bulk update (no object flushed) counts as a write too
        await s.execute(update(Vm).where(Vm.name == "vm-b").values(power_state="missing"))
        await s.commit()
    assert (await listed(api))["vm-b"] == (SRC, "missing")

    fake.add_vm(DST, "vm-c")  # a VM found by a refresh
    await c.inventory.refresh_host(DST)
    assert set(await listed(api)) == {"vm-a", "vm-b", "vm-c"}


async def test_only_written_records_are_read_again_and_readers_share_a_read(
    center: tuple[Center, FakeAgents, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, fake, api = center
    await listed(api)
    reads: list[set[int] | None] = []
    read = VmList._read

    async def counted(self: VmList, ids: set[int] | None) -> list[tuple[int, str, bytes]]:
        reads.append(ids)
        await asyncio.sleep(0.05)  # a slow read: the other requests arrive meanwhile
        return await read(self, ids)

    monkeypatch.setattr(VmList, "_read", counted)
    vm_b = fake.vm(SRC, "vm-b")
    assert vm_b is not None
    vm_b.power_state, vm_b.qemu_status = "poweredOff", None
    await c.inventory.refresh_host(SRC)
    answers = await asyncio.gather(*(listed(api) for _ in range(10)))
    assert all(a["vm-b"] == (SRC, "poweredOff") for a in answers)
    assert reads == [{(await c.inventory.vm("vm-b")).id}]  # one read, of vm-b alone
    await listed(api)
    assert len(reads) == 1  # nothing written since


async def test_a_list_read_between_a_write_and_its_commit_is_read_again(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    c, _, api = center
    await listed(api)
    async with c.db.session() as s:
        vm = await s.get(Vm, (await c.inventory.vm("vm-a")).id)
        assert vm is not None
        vm.power_state = "missing"
        await s.flush()  # written, not yet committed: a reader still sees the old record
        assert (await listed(api))["vm-a"] == (SRC, "poweredOn")
        await s.commit()
    assert (await listed(api))["vm-a"] == (SRC, "missing")


async def test_a_deleted_vm_leaves_the_list(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    c, fake, api = center
    fake.add_vm(DST, "vm-c", power_state="poweredOff")
    await c.inventory.refresh_host(DST)
    assert set(await listed(api)) == {"vm-a", "vm-b", "vm-c"}
    r = await api.delete("/v1/vms/vm-c")
    assert r.status_code == 204, r.text
    assert set(await listed(api)) == {"vm-a", "vm-b"}


async def test_the_host_list_follows_every_change_of_a_host(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    c, fake, api = center

    async def hosts() -> dict[str, dict[str, Any]]:
        r = await api.get("/v1/hosts")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        return {h["name"]: h for h in r.json()}

    first = await hosts()
    assert set(first) == {SRC, DST} and first[DST]["maintenance"] is None
    assert await hosts() == first  # kept: nothing was written

    fake.host(DST).facts["memory"]["available_bytes"] -= 2**30  # its agent says so
    await c.inventory.refresh_host(DST)
    seen = (await hosts())[DST]["facts"]["memory"]["available_bytes"]
    assert seen == first[DST]["facts"]["memory"]["available_bytes"] - 2**30

    r = await api.post(f"/v1/hosts/{DST}/maintenance/enter")
    assert r.status_code == 202, r.text
    await wait_task(c, r.json()["id"], lambda t: t.state == "success")
    after = await hosts()
    assert after[DST]["maintenance"] == "in" and after[DST]["maintenance_task"] == r.json()["id"]
    assert after[SRC]["maintenance"] is None


async def test_a_round_that_changes_nothing_writes_no_host_and_keeps_the_host_list(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    """Hosts that answer as before are not written again (their last-seen time alone, in one
    statement outside the kept records' watch): GET /v1/hosts reads no host again, and still
    says when each host was last seen."""
    c, _, api = center
    await c.inventory.refresh_all()
    first = {h["name"]: h for h in (await api.get("/v1/hosts")).json()}
    sent = await statements_during(c.db, c.inventory.refresh_all())
    statements = [" ".join(statement.split()).upper() for statement in sent]
    writes = [s for s in statements if s.startswith(("UPDATE", "INSERT", "DELETE"))]
    assert writes == [s for s in writes if s.startswith("UPDATE HOSTS SET LAST_SEEN")]
    assert len(writes) == 1  # every host's last-seen time, at once
    assert c.inventory.kept_hosts.changes.take() == (False, set())  # the kept list stays

    after = {h["name"]: h for h in (await api.get("/v1/hosts")).json()}
    for name in (SRC, DST):
        assert after[name]["last_seen"] > first[name]["last_seen"]  # ISO times, both UTC
        assert {k: v for k, v in after[name].items() if k != "last_seen"} == {
            k: v for k, v in first[name].items() if k != "last_seen"
        }
        one = (await api.get(f"/v1/hosts/{name}")).json()
        assert one["last_seen"] == after[name]["last_seen"]
        stored = await c.inventory.host(name)  # and the database has it too
        assert stored.last_seen is not None
        assert stored.last_seen.isoformat() == after[name]["last_seen"]


async def test_a_host_marked_disconnected_is_connected_again_by_its_next_answer(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    """HA marks a host disconnected; its facts did not change, yet the refresh that finds it
    answering writes it connected again (the round's record, read before, says connected)."""
    c, _, api = center
    await c.inventory.refresh_all()
    hosts = {h.name: h for h in await c.inventory.hosts()}
    await c.inventory.mark_disconnected(DST)
    assert (await c.inventory.host(DST)).connection == "disconnected"
    await c.inventory._refresh_host(hosts[DST])  # as a round read it, before HA's mark
    assert (await c.inventory.host(DST)).connection == "connected"
    listed = {h["name"]: h["connection"] for h in (await api.get("/v1/hosts")).json()}
    assert listed == {SRC: "connected", DST: "connected"}


async def test_a_change_of_facts_is_written_and_listed(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    c, fake, api = center
    await c.inventory.refresh_all()
    await api.get("/v1/hosts")
    fake.host(SRC).facts["memory"]["available_bytes"] -= 2**20
    statements = await statements_during(c.db, c.inventory.refresh_all())
    assert not [s for s in statements if "datastores" in s]  # its memory changed, not they
    assert c.inventory.kept_hosts.changes.take() == (False, {(await c.inventory.host(SRC)).id})
    c.inventory.kept_hosts.changes.add({None})  # what was taken, to read again
    listed = {h["name"]: h for h in (await api.get("/v1/hosts")).json()}
    memory = fake.host(SRC).facts["memory"]
    assert listed[SRC]["facts"]["memory"] == memory
    assert (await c.inventory.host(SRC)).facts["memory"] == memory


async def test_the_datastore_list_and_the_clusters_vms_are_kept_until_written(
    center: tuple[Center, FakeAgents, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /v1/datastores is read again only after a datastore or a host is written, and a
    cluster's VM names only after a VM is: each follows every change."""
    c, fake, api = center
    reads: list[int] = []
    read = Inventory.datastore_list

    async def counted(self: Inventory) -> list[dict[str, Any]]:
        reads.append(1)
        return await read(self)

    monkeypatch.setattr(Inventory, "datastore_list", counted)

    async def free() -> dict[str, int]:
        r = await api.get("/v1/datastores")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        return {d["name"]: d["free_bytes"] for d in r.json()}

    async def cluster_vms() -> list[str]:
        r = await api.get("/v1/clusters")
        assert r.status_code == 200
        (cluster,) = r.json()
        return list(cluster["vms"])

    await c.inventory.refresh_all()
    before = await free()
    assert await free() == before and len(reads) == 1  # kept
    await c.inventory.refresh_all()  # nothing new: nothing written
    assert await free() == before and len(reads) == 1
    local = next(d for d in fake.host(DST).facts["datastores"] if not d.get("shared"))
    local["free_bytes"] -= 2**30
    await c.inventory.refresh_all()
    assert (await free())[local["name"]] == before[local["name"]] - 2**30
    assert len(reads) == 2

    assert await cluster_vms() == ["vm-a", "vm-b"]
    fake.add_vm(DST, "vm-c")
    await c.inventory.refresh_host(DST)
    assert await cluster_vms() == ["vm-a", "vm-b", "vm-c"]
    r = await api.delete("/v1/vms/vm-c")
    assert r.status_code in (204, 409), r.text  # a running VM may be refused: then it stays
    expected = ["vm-a", "vm-b"] if r.status_code == 204 else ["vm-a", "vm-b", "vm-c"]
    assert await cluster_vms() == expected


async def test_a_host_whose_vms_did_not_change_is_compared_again_after_a_vm_is_written(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    """A round skips comparing a host's VMs when its agent lists the same VMs as when they
    last agreed and no VM was written since; a write (here one behind the inventory's back,
    a bulk update) or a change on the host makes the next refresh compare again."""
    c, fake, api = center
    await c.inventory.refresh_all()
    await c.inventory.refresh_all()  # agreed: settled
    async with c.db.session() as s:
        await s.execute(update(Vm).where(Vm.name == "vm-b").values(power_state="missing"))
        await s.commit()
    assert (await listed(api))["vm-b"] == (SRC, "missing")
    await c.inventory.refresh_all()  # its host says it runs: put right
    assert (await listed(api))["vm-b"] == (SRC, "poweredOn")

    await c.inventory.refresh_all()  # settled again
    vm_a = fake.vm(SRC, "vm-a")
    assert vm_a is not None
    vm_a.power_state, vm_a.qemu_status = "poweredOff", None
    await c.inventory.refresh_all()
    assert (await listed(api))["vm-a"] == (SRC, "poweredOff")
    fake.host(SRC).vms.pop("vm-a")  # unregistered on its host, behind the center's back
    await c.inventory.refresh_all()
    assert (await listed(api))["vm-a"] == (SRC, "missing")


async def test_a_vm_written_makes_only_the_hosts_it_concerns_compare_again(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    """During a fleet's migrations, VMs are written all the time: each write makes the next
    round compare only the hosts that compared that VM and the host it is now on."""
    c, fake, api = center
    fake.add_vm(DST, "vm-c")
    await c.inventory.refresh_all()
    await c.inventory.refresh_all()  # agreed: settled
    ids = {h.name: h.id for h in await c.inventory.hosts()}
    assert set(c.inventory._settled) == {ids[SRC], ids[DST]}
    vm_c = await c.inventory.vm("vm-c")
    await c.inventory.set_vm(vm_c.uuid, power_state="missing")
    await c.inventory._take_vm_changes()
    assert set(c.inventory._settled) == {ids[SRC]}  # the other host stays settled
    await c.inventory.refresh_all()  # its host says it runs: put right
    assert (await listed(api))["vm-c"] == (DST, "poweredOn")

    # The record of a VM that its host still runs moved to another host (a migration the
    # center believes went through): the host that runs it compares again and says so.
    await c.inventory.refresh_all()
    vm_b = await c.inventory.vm("vm-b")
    await c.inventory.set_vm(vm_b.uuid, host_id=ids[DST])
    await c.inventory._take_vm_changes()
    assert set(c.inventory._settled) == set()  # the host that compared it, the one it is on
    for _ in range(2):  # the two hosts' answers, in either order: by the second, agreed
        await c.inventory.refresh_all()
    assert (await listed(api))["vm-b"] == (SRC, "poweredOn")


async def test_the_cluster_list_follows_a_new_cluster_and_a_host_moved_into_it(
    center: tuple[Center, FakeAgents, httpx.AsyncClient],
) -> None:
    _, _, api = center

    async def clusters() -> dict[str, tuple[list[str], list[str]]]:
        r = await api.get("/v1/clusters")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        return {x["name"]: (x["hosts"], x["vms"]) for x in r.json()}

    assert await clusters() == {"Cluster": ([SRC, DST], ["vm-a", "vm-b"])}
    assert await clusters() == {"Cluster": ([SRC, DST], ["vm-a", "vm-b"])}  # kept
    r = await api.post("/v1/clusters", json={"name": "rack-2"})
    assert r.status_code == 201, r.text
    assert (await clusters())["rack-2"] == ([], [])
    r = await api.post("/v1/clusters/rack-2/hosts", json={"host": SRC})
    assert r.status_code == 200, r.text
    assert await clusters() == {"Cluster": ([DST], []), "rack-2": ([SRC], ["vm-a", "vm-b"])}
