"""The center's Prometheus endpoint, scraped as Prometheus scrapes it: ``GET /metrics`` with a
bearer token, through the real app, parsed with prometheus_client's own parser.

Each test runs a real center (SQLite, then PostgreSQL) whose agents are the fakes of
fake_agent.py; migrations run to their end through the executor, and what the scrape says is
compared with what the inventory and the tasks say.
"""

# ruff: noqa: F811 (the fixtures imported below are the tests' parameters)
from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter as Tally
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmotion.center.api import create_app
from kvmotion.center.db import Task
from kvmotion.center.metrics import LIVE_KINDS
from kvmotion.center.service import ApiToken, Center, CenterConfig
from kvmotion.center.tasks import TaskState
from kvmotion.migration.ha import CONNECTED, FAILED, ISOLATED, NOT_RESPONDING
from kvmotion.migration.request import MigrationRequest
from tests.unit.fake_agent import FakeAgents
from tests.unit.test_executor import (  # noqa: F401 (fixtures used as parameters)
    DST,
    SRC,
    center_db,
    fake,
    fast,
    template_db,
    wait_task,
)

ADMIN_TOKEN = "center-admin-token"
READER_TOKEN = "prometheus-scraper-0123456789"
READER = {"Authorization": f"Bearer {READER_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-kvmotion.json"
F = 15.0  # HA's failure time in the HA test
STATES = (CONNECTED, NOT_RESPONDING, ISOLATED, FAILED)

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


@contextlib.asynccontextmanager
async def open_center(
    db_url: str, fake: FakeAgents, limit: int = 2
) -> AsyncIterator[tuple[Center, httpx.AsyncClient]]:
    """A started center on a copy of the template (both hosts, their VMs), with a read-only
    user, and an HTTP client on its app."""
    config = CenterConfig(
        db_url=db_url,
        token=ADMIN_TOKEN,
        refresh_interval_s=3600,
        migrations_per_host=limit,
        users=[ApiToken(name="prometheus", token=READER_TOKEN, role="read-only")],
    )
    center = Center(config, transport=fake)
    await center.start()
    try:
        transport = httpx.ASGITransport(app=create_app(center))
        async with httpx.AsyncClient(transport=transport, base_url="http://center") as http:
            yield center, http
    finally:
        await center.close()


async def scrape(http: httpx.AsyncClient) -> Samples:
    """Every sample of one scrape, as Prometheus reads it, with a read-only token."""
    r = await http.get("/metrics", headers=READER)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# -- authentication -----------------------------------------------------------------------------


async def test_a_scrape_needs_a_token_and_a_read_only_one_is_enough(
    center_db: str, fake: FakeAgents
) -> None:
    async with open_center(center_db, fake) as (_, http):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
            r = await http.get("/metrics", headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "unauthorized", r.text
        for headers in (READER, ADMIN):
            r = await http.get("/metrics", headers=headers)
            assert r.status_code == 200 and "# TYPE kvmotion_hosts gauge" in r.text
        # A read-only token stays read-only elsewhere.
        r = await http.post(f"/v1/hosts/{DST}/maintenance/enter", headers=READER)
        assert r.status_code == 403, r.text


# -- state, read at each scrape ----------------------------------------------------------------


async def test_hosts_vms_and_maintenance_are_what_the_inventory_says(
    center_db: str, fake: FakeAgents
) -> None:
    async with open_center(center_db, fake) as (center, http):
        hosts = (await http.get("/v1/hosts", headers=READER)).json()
        vms = (await http.get("/v1/vms", headers=READER)).json()
        samples = await scrape(http)
        states = Tally(h["connection"] for h in hosts)
        assert states["connected"] == 2
        for state in ("connected", "disconnected"):
            assert value(samples, "kvmotion_hosts", state=state) == states[state]
        for host in hosts:
            assert value(samples, "kvmotion_host_up", host=host["name"]) == 1.0
        per_host = Tally((v["host"], v["power_state"]) for v in vms)
        assert per_host[SRC, "poweredOn"] == 2 and per_host[SRC, "poweredOff"] == 1
        for host in (SRC, DST):
            for power in ("poweredOn", "poweredOff"):
                got = value(samples, "kvmotion_vms", host=host, power_state=power)
                assert got == per_host[host, power], (host, power)
        assert value(samples, "kvmotion_hosts_maintenance", state="in") == 0

        # The state changes; the next scrape says so (nothing cached).
        await center.inventory.mark_disconnected(SRC)
        r = await http.post(f"/v1/hosts/{DST}/maintenance/enter", headers=ADMIN)
        assert r.status_code == 202, r.text
        await wait_task(center, r.json()["id"], lambda t: TaskState(t.state).final)
        samples = await scrape(http)
        assert value(samples, "kvmotion_hosts", state="disconnected") == 1
        assert value(samples, "kvmotion_hosts", state="connected") == 1
        assert value(samples, "kvmotion_host_up", host=SRC) == 0.0
        assert value(samples, "kvmotion_hosts_maintenance", state="in") == 1
        assert value(samples, "kvmotion_hosts_maintenance", state="entering") == 0


async def test_queue_lengths_count_queued_and_running_migrations(
    center_db: str, fake: FakeAgents
) -> None:
    async with open_center(center_db, fake, limit=1) as (center, http):
        fake.script("vm-a", phases=("active",))  # holds its slot until released below
        first = await center.executor.submit(MigrationRequest("vm-a", DST))
        second = await center.executor.submit(MigrationRequest("vm-b", DST))
        await wait_task(center, second, lambda t: t.phase == "queued")
        await wait_task(center, first, lambda t: t.phase == "active")
        samples = await scrape(http)
        assert value(samples, "kvmotion_migrations_active", kind="compute", state="running") == 1
        assert value(samples, "kvmotion_migrations_active", kind="compute", state="queued") == 1
        assert value(samples, "kvmotion_migrations_active", kind="storage", state="queued") == 0

        fake.scripts["vm-a"].phases = ("completed",)
        for task_id in (first, second):
            await asyncio.wait_for(center.executor.wait(task_id), 5)
            assert (await center.tasks.get(task_id)).state == TaskState.SUCCESS
        samples = await scrape(http)
        for state in ("queued", "running"):
            assert value(samples, "kvmotion_migrations_active", kind="compute", state=state) == 0
        assert value(samples, "kvmotion_migrations_total", kind="compute", result="success") == 2


# -- what happened: migrations -----------------------------------------------------------------


async def run(center: Center, req: MigrationRequest, cancel_at: str | None = None) -> Task:
    task_id = await center.executor.submit(req)
    if cancel_at is not None:
        await wait_task(center, task_id, lambda t: t.phase == cancel_at)
        await center.executor.request_cancel(task_id)
    await asyncio.wait_for(center.executor.wait(task_id), 10)
    return await center.tasks.get(task_id)


def memory_bytes(task: Task) -> int:
    return int(task.summary.get("transferred_bytes") or 0)


def disk_bytes(task: Task) -> int:
    return int((task.summary.get("disk_copy") or {}).get("copied_bytes") or 0)


async def test_ended_migrations_are_counted_by_kind_and_result_with_their_figures(
    center_db: str, fake: FakeAgents
) -> None:
    async with open_center(center_db, fake) as (center, http):
        before = await scrape(http)
        tasks = []
        fake.script(
            "vm-a", phases=("active", "active", "failed"), error="Connection reset by peer",
            dest_notices_failure=False,
        )  # fmt: skip
        tasks.append(await run(center, MigrationRequest("vm-a", DST)))
        fake.script("vm-a", phases=("active",))  # never converges: cancelled during pre-copy
        tasks.append(await run(center, MigrationRequest("vm-a", DST), cancel_at="active"))
        fake.script("vm-a")
        tasks.append(await run(center, MigrationRequest("vm-a", DST)))
        both = MigrationRequest("vm-b", DST, kind="both", datastore="local-173")
        tasks.append(await run(center, both))
        storage = MigrationRequest("vm-a", "", kind="storage", datastore="local-173")
        tasks.append(await run(center, storage))
        # A powered-off VM moves by registering it elsewhere, through the API (a relocation).
        r = await http.post("/v1/vms/vm-off/migrate", json={"host": DST}, headers=ADMIN)
        assert r.status_code == 202, r.text
        tasks.append(await center.tasks.get(r.json()["id"]))
        after = await scrape(http)

    assert [(t.request["type"], t.state) for t in tasks] == [
        ("compute", "error"), ("compute", "cancelled"), ("compute", "success"),
        ("both", "success"), ("storage", "success"), ("relocate", "success"),
    ]  # fmt: skip
    ended = Tally((t.request["type"], t.state) for t in tasks)
    for kind in ("compute", "storage", "both", "relocate"):
        for result in ("success", "error", "cancelled"):
            labels = {"kind": kind, "result": result}
            assert (
                moved(before, after, "kvmotion_migrations_total", **labels) == ended[kind, result]
            ), labels
            count = moved(before, after, "kvmotion_migration_duration_seconds_count", **labels)
            assert count == ended[kind, result], labels
    # The failed one counts as an error, the cancelled one as cancelled.
    assert moved(before, after, "kvmotion_migrations_total", kind="compute", result="error") == 1
    assert (
        moved(before, after, "kvmotion_migrations_total", kind="compute", result="cancelled") == 1
    )

    # Total time: from the request to the end, as the tasks say.
    for t in tasks:
        labels = {"kind": t.request["type"], "result": t.state}
        assert t.finished_at is not None
        took = t.finished_at.timestamp() - float(t.timeline[0]["time"])
        got = moved(before, after, "kvmotion_migration_duration_seconds_sum", **labels)
        assert got == pytest.approx(took, abs=0.01), labels

    # QEMU's downtime and the guest's pause, of each live migration that succeeded.
    live = [t for t in tasks if t.state == "success" and t.request["type"] in LIVE_KINDS]
    assert len(live) == 2
    for family, key in (
        ("kvmotion_migration_downtime_seconds", "downtime_ms"),
        ("kvmotion_migration_guest_pause_seconds", "stun_to_resume_ms"),
    ):
        for kind in LIVE_KINDS:
            mine = [t.summary[key] / 1000 for t in live if t.request["type"] == kind]
            assert mine
            assert moved(before, after, f"{family}_count", kind=kind) == len(mine)
            assert moved(before, after, f"{family}_sum", kind=kind) == pytest.approx(sum(mine))
            # Each observation is in the buckets it belongs to.
            for le in ("0.01", "0.05", "1.0", "+Inf"):
                under = sum(1 for v in mine if v <= float(le))
                assert moved(before, after, f"{family}_bucket", kind=kind, le=le) == under

    # Bytes sent: memory by every migration that streamed some (the failed one too), disks by
    # storage and both.
    for kind in ("compute", "storage", "both", "relocate"):
        mine = [t for t in tasks if t.request["type"] == kind]
        for data, of in (("memory", memory_bytes), ("disk", disk_bytes)):
            got = moved(before, after, "kvmotion_migration_sent_bytes_total", kind=kind, data=data)
            assert got == sum(of(t) for t in mine), (kind, data)
    assert memory_bytes(tasks[0]) > 0  # the failed one streamed before it failed
    assert disk_bytes(tasks[3]) > 0 and memory_bytes(tasks[3]) > 0  # both
    assert disk_bytes(tasks[4]) > 0 and memory_bytes(tasks[4]) == 0  # storage


async def test_a_failing_listener_does_not_fail_the_task(center_db: str, fake: FakeAgents) -> None:
    """The end is written before listeners hear of it: a listener's bug must not turn a migration
    that succeeded into an abort."""
    async with open_center(center_db, fake) as (center, http):

        def broken(task: Task) -> None:
            raise RuntimeError("a bug in a listener")

        center.tasks.on_end.insert(0, broken)
        task = await run(center, MigrationRequest("vm-a", DST))
        assert task.state == TaskState.SUCCESS, task.error
        assert (await center.inventory.vm("vm-a")).host.name == DST  # type: ignore[union-attr]
        samples = await scrape(http)  # the metrics' own listener ran after the broken one
        assert value(samples, "kvmotion_migrations_total", kind="compute", result="success") == 1


# -- what happened: HA ---------------------------------------------------------------------------


async def test_ha_states_events_and_restarts(center_db: str, fake: FakeAgents) -> None:
    async with open_center(center_db, fake) as (center, http):
        await center.ha.close()  # the test drives the rounds
        await center.ha.configure("Cluster", enabled=True, failure_s=F)
        before = await scrape(http)
        await center.ha.tick()
        samples = await scrape(http)
        for host in (SRC, DST):
            assert value(samples, "kvmotion_ha_host_state", host=host, state=CONNECTED) == 1
            assert value(samples, "kvmotion_ha_host_state", host=host, state=FAILED) == 0

        fake.host(SRC).dead = True
        await center.ha.tick()
        assert center.ha.host_state(SRC)["state"] == NOT_RESPONDING  # type: ignore[index]
        center.ha._health[SRC].last_answer -= F  # 15 s of silence
        fake.host(DST).ha_peers = {
            SRC: {"age_s": F + 1, "vms": [], "released": [], "isolated": False}
        }  # and its heartbeat file stopped too
        await center.ha.tick()
        assert center.ha.host_state(SRC)["state"] == FAILED  # type: ignore[index]
        after = await scrape(http)

        assert value(after, "kvmotion_ha_host_state", host=SRC, state=FAILED) == 1
        assert value(after, "kvmotion_ha_host_state", host=SRC, state=CONNECTED) == 0
        assert value(after, "kvmotion_host_up", host=SRC) == 0
        # Each state HA declared is one event the center recorded, and one count.
        events = (await http.get("/v1/events", headers=READER)).json()
        said = Tally(
            m.group(1)
            for e in events
            if (m := re.match(rf"HA: host \S+ is ({'|'.join(STATES)}):", e["message"]))
        )
        assert said[NOT_RESPONDING] == said[FAILED] == 1
        for state in STATES:
            assert (
                moved(before, after, "kvmotion_ha_host_events_total", state=state) == said[state]
            ), state
        restarts = [t for t in await center.tasks.list() if t.kind == "ha-restart"]
        assert [t.state for t in restarts] == ["success", "success"]  # vm-a and vm-b
        assert moved(before, after, "kvmotion_ha_restarts_total", result="success") == 2
        # A restart is not a migration.
        labels = {"kind": "compute", "result": "success"}
        assert moved(before, after, "kvmotion_migrations_total", **labels) == 0


# -- the Grafana dashboard ---------------------------------------------------------------------


def exported_names(center: Center) -> dict[str, set[str]]:
    """Each family the center exports -> the sample names Prometheus stores for it."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        f.name: {f.name + s for s in suffixes.get(f.type, ("",))}
        for f in center.metrics.registry.collect()
    }


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])  # a collapsed row's
    return found


async def test_the_dashboard_graphs_every_family_and_only_what_is_exported(
    center_db: str, fake: FakeAgents
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    async with open_center(center_db, fake) as (center, http):
        families = exported_names(center)
        samples = await scrape(http)
    # What a scrape shows is what the registry describes (families with no series yet too).
    every = set().union(*families.values())
    assert {name for name, _ in samples if not name.endswith("_created")} <= every

    used: set[str] = set()
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            names = set(re.findall(r"kvmotion_[a-z_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= every, (panel["title"], names - every)
            used |= names
    unused = [f for f, names in families.items() if not names & used]
    assert unused == [], f"no panel graphs {unused}"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
