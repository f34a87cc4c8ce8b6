"""The center's Prometheus metrics, served at ``GET /metrics`` (docs/monitoring.md).

Two kinds, from two places:

- **State**, read from the inventory and the task table at each scrape (:meth:`CenterMetrics.
  exposition`): hosts by connection state, each host's reachability, hosts in maintenance mode,
  VMs per host and power state, migrations queued and running, each HA member's state. A center
  that restarted, or a second one on the same database, reports what is true, not what it saw
  happen.
- **What happened**, counted in this center's memory as it happens: each migration that ends
  (told by the task store, :attr:`TaskStore.on_end`, the one place a task becomes final) by kind
  and result, its total time, QEMU's downtime, the guest's pause and the bytes it sent; HA's
  declared host states (:attr:`HaMonitor.on_state`) and its restarts. Counters start at zero
  with the process, as Prometheus expects (``rate()`` and ``increase()`` see the reset).

Every family lives in a registry of the center's own, never ``prometheus_client``'s global one: a
process may hold several centers (the tests do), and each reports only itself.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import select

from kvmotion.center.db import Task
from kvmotion.center.ha import HaMonitor
from kvmotion.center.inventory import Inventory
from kvmotion.center.tasks import TaskState, TaskStore
from kvmotion.migration.ha import CONNECTED, FAILED, ISOLATED, NOT_RESPONDING

# The classic text format, which generate_latest writes and every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A migration's kind: the task's request type ("relocate": a powered-off VM registered
# elsewhere, a cold migration).
KINDS = ("compute", "storage", "both", "relocate")
LIVE_KINDS = ("compute", "both")  # the kinds that stun a running guest
RESULTS = (TaskState.SUCCESS.value, TaskState.ERROR.value, TaskState.CANCELLED.value)
ACTIVE = (TaskState.QUEUED.value, TaskState.RUNNING.value)
HA_STATES = (CONNECTED, NOT_RESPONDING, ISOLATED, FAILED)
POWER_STATES = ("poweredOn", "poweredOff")  # always shown per host (0 when none)
MIGRATION_TASKS = ("migrate", "relocate")  # task kinds that are migrations

# Buckets, in seconds, for the TCG lab (QEMU downtime of a few ms, migrations of seconds) and for
# production (a large guest's copy of many minutes, a stun near a second on a slow link).
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
                    3600.0)  # fmt: skip


@dataclass
class Snapshot:
    """The state gauges' values, read at one scrape."""

    hosts: Tally[str] = field(default_factory=Tally)  # connection state -> hosts
    up: dict[str, bool] = field(default_factory=dict)  # host -> connected
    maintenance: Tally[str] = field(default_factory=Tally)  # "entering" or "in" -> hosts
    vms: Tally[tuple[str, str]] = field(default_factory=Tally)  # (host, power state) -> VMs
    active: Tally[tuple[str, str]] = field(default_factory=Tally)  # (kind, state) -> migrations
    ha: dict[str, str] = field(default_factory=dict)  # HA member -> its state


class _StateCollector:
    """Yields the gauges of the last :class:`Snapshot` (set just before each exposition)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def describe(self) -> Iterable[Metric]:
        return list(self._families(Snapshot()))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.snapshot))

    @staticmethod
    def _families(snap: Snapshot) -> Iterator[Metric]:
        hosts = GaugeMetricFamily(
            "kvmotion_hosts", "Hosts in the inventory, by connection state", labels=["state"]
        )
        for state in sorted({"connected", "disconnected", *snap.hosts}):
            hosts.add_metric([state], snap.hosts[state])
        yield hosts
        up = GaugeMetricFamily(
            "kvmotion_host_up", "1 if the center reaches the host's agent, else 0", labels=["host"]
        )
        for host, connected in sorted(snap.up.items()):
            up.add_metric([host], 1.0 if connected else 0.0)
        yield up
        maintenance = GaugeMetricFamily(
            "kvmotion_hosts_maintenance",
            "Hosts entering or in maintenance mode",
            labels=["state"],
        )
        for state in ("entering", "in"):
            maintenance.add_metric([state], snap.maintenance[state])
        yield maintenance
        vms = GaugeMetricFamily(
            "kvmotion_vms", "VMs by host and power state", labels=["host", "power_state"]
        )
        for (host, power), count in sorted(snap.vms.items()):
            vms.add_metric([host, power], count)
        yield vms
        active = GaugeMetricFamily(
            "kvmotion_migrations_active",
            "Migrations queued (waiting for a slot) and running, by kind",
            labels=["kind", "state"],
        )
        for kind in sorted({*KINDS, *(k for k, _ in snap.active)}):
            for state in ACTIVE:
                active.add_metric([kind, state], snap.active[kind, state])
        yield active
        ha = GaugeMetricFamily(
            "kvmotion_ha_host_state",
            "1 for each HA member's state now (connected, not responding, isolated, failed)",
            labels=["host", "state"],
        )
        for host, now in sorted(snap.ha.items()):
            for state in HA_STATES:
                ha.add_metric([host, state], 1.0 if now == state else 0.0)
        yield ha


class CenterMetrics:
    """One center's metrics: its registry, the counters its listeners move, and the state read
    at each scrape."""

    def __init__(self, inventory: Inventory, tasks: TaskStore, ha: HaMonitor) -> None:
        self.inventory, self.tasks, self.ha = inventory, tasks, ha
        self.registry = CollectorRegistry()
        self._state = _StateCollector()
        self.registry.register(self._state)
        r = self.registry
        self.migrations = Counter(
            "kvmotion_migrations", "Migrations ended, by kind and result", ["kind", "result"],
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "kvmotion_migration_duration_seconds",
            "A migration's total time, from its request to its end, by kind and result",
            ["kind", "result"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.downtime = Histogram(
            "kvmotion_migration_downtime_seconds",
            "QEMU's downtime of a migration that succeeded (the source's part of the stun)",
            ["kind"], buckets=PAUSE_BUCKETS, registry=r,
        )  # fmt: skip
        self.pause = Histogram(
            "kvmotion_migration_guest_pause_seconds",
            "The guest's pause in a migration that succeeded: from the stun on the source to "
            "the resume on the destination (stun_to_resume_ms)",
            ["kind"], buckets=PAUSE_BUCKETS, registry=r,
        )  # fmt: skip
        self.sent = Counter(
            "kvmotion_migration_sent_bytes",
            "Bytes migrations sent (memory over the migration network, disks copied), by kind",
            ["kind", "data"], registry=r,
        )  # fmt: skip
        self.ha_events = Counter(
            "kvmotion_ha_host_events",
            "Host states HA declared (failed, isolated, not responding, connected again)",
            ["state"], registry=r,
        )  # fmt: skip
        self.ha_restarts = Counter(
            "kvmotion_ha_restarts", "VM restarts by HA ended, by result", ["result"], registry=r
        )
        # Every series exists from the start at 0: a rate over a series born with its first
        # event would miss that event.
        for kind in KINDS:
            for result in RESULTS:
                self.migrations.labels(kind, result)
                self.duration.labels(kind, result)
            for data in ("memory", "disk"):
                self.sent.labels(kind, data)
        for kind in LIVE_KINDS:
            self.downtime.labels(kind)
            self.pause.labels(kind)
        for state in HA_STATES:
            self.ha_events.labels(state)
        for result in RESULTS:
            self.ha_restarts.labels(result)
        tasks.on_end.append(self.task_ended)
        ha.on_state.append(self.host_declared)

    # -- what happened -----------------------------------------------------------------------
    def task_ended(self, task: Task) -> None:
        if task.kind == "ha-restart":
            self.ha_restarts.labels(task.state).inc()
            return
        if task.kind not in MIGRATION_TASKS:
            return
        kind, result = str(task.request.get("type", task.kind)), task.state
        self.migrations.labels(kind, result).inc()
        # A task the center ended at its start (center_restarted) took no time of its own.
        if task.error_code != "center_restarted":
            self.duration.labels(kind, result).observe(_duration_s(task))
        summary: dict[str, Any] = task.summary or {}
        memory = summary.get("transferred_bytes")
        if isinstance(memory, int) and memory > 0:
            self.sent.labels(kind, "memory").inc(memory)
        disks = (summary.get("disk_copy") or {}).get("copied_bytes")
        if isinstance(disks, int) and disks > 0:
            self.sent.labels(kind, "disk").inc(disks)
        if result != TaskState.SUCCESS:
            return
        for histogram, key in ((self.downtime, "downtime_ms"), (self.pause, "stun_to_resume_ms")):
            value = summary.get(key)
            if isinstance(value, int | float) and value >= 0:
                histogram.labels(kind).observe(value / 1000)

    def host_declared(self, host: str, state: str) -> None:
        self.ha_events.labels(state).inc()

    # -- state, and the exposition -----------------------------------------------------------
    async def read(self) -> Snapshot:
        """The state gauges' values now, from the inventory and the task table."""
        snap = Snapshot()
        for host in await self.inventory.hosts():
            snap.hosts[host.connection] += 1
            snap.up[host.name] = host.connection == "connected"
            if host.maintenance is not None:
                snap.maintenance[host.maintenance] += 1
            for power in POWER_STATES:
                snap.vms[host.name, power] += 0
            if (ha := self.ha.host_state(host.name)) is not None:
                snap.ha[host.name] = str(ha["state"])
        for vm in await self.inventory.vms():
            snap.vms[vm.host.name if vm.host is not None else "", vm.power_state] += 1
        async with self.tasks.db.session() as s:
            query = select(Task.kind, Task.request, Task.state).where(
                Task.kind.in_(MIGRATION_TASKS), Task.state.in_(ACTIVE)
            )
            for kind, request, state in await s.execute(query):
                snap.active[str((request or {}).get("type", kind)), state] += 1
        return snap

    async def exposition(self) -> bytes:
        """Every family in Prometheus' text format, the state read just now."""
        snapshot = await self.read()
        # No await between these two: a concurrent scrape cannot swap the snapshot under this one.
        self._state.snapshot = snapshot
        return generate_latest(self.registry)


def _duration_s(task: Task) -> float:
    """From the request's arrival (the timeline's first step) to the task's end."""
    end = task.finished_at or datetime.now(UTC)
    start = next(
        (float(t["time"]) for t in task.timeline or [] if t.get("step") == "requested"),
        task.created_at.timestamp(),
    )
    return max(0.0, end.timestamp() - start)
