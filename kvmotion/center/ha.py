"""HA as the center runs it, per cluster: the heartbeat to each member, each host's state, the
restart of a failed host's VMs elsewhere, and admission control's reserve.

- **Settings**, per cluster: ``enabled`` (off by default); ``failure_s``, how long a host is
  silent on both channels before it is failed (15 s, as vSphere); ``isolation_response``
  (leave-on, power-off, shutdown); ``failures_to_tolerate`` (admission control: 1; 0 is off).
  A VM's restart priority (high, medium, low, disabled) is its own (``ha_priority``).
- **Heartbeat**: every ``interval_s`` (1 s) the center sends each member of an HA cluster its
  settings and the other members' URLs (``POST /v1/ha``); the answer is that host's report: its
  own datastore heartbeats and what it reads of the others' (host/ha.py).
- **States**: each host is judged from both channels (migration/ha.py): connected, not
  responding, isolated, failed. Each change is an event.
- **Restarts**: a failed host's VMs on shared datastores, once their leases lapsed (and VMs an
  isolated host released), are restarted one by one, high priority first, each on the host the
  placement chooses (rules and capacity as for any placement): registered there from its record,
  then powered on. Each is an ``ha-restart`` task, with when the failure was declared and how
  long the restart took. A restart that fails (a disk still locked by a QEMU that runs on: the
  lock is the last guard against two copies) is unregistered there and tried again at the next
  heartbeat, never forced; the task says what it waits for.
- **Admission control**: powering on a VM in an HA cluster is refused when the powered-on VMs'
  memory would no longer fit on the members left after the largest ``failures_to_tolerate``
  fail.

What a center restart loses: when each host last answered (silence is counted again from the
restart) and the restarts in flight (their tasks end as "center restarted"; the next heartbeats
decide again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from kvmotion.center.clusters import Clusters
from kvmotion.center.db import Cluster as ClusterRow
from kvmotion.center.db import Database, Host, Task, Vm
from kvmotion.center.executor import Executor
from kvmotion.center.inventory import Inventory
from kvmotion.center.placing import capacity, place_vm
from kvmotion.center.rules import Rules
from kvmotion.center.tasks import TaskState, TaskStore, record_event, task_dict
from kvmotion.errors import InsufficientResources, InvalidInput, KvmotionError
from kvmotion.host.protocol import HaReportOut, HaSettingsIn, vm_json
from kvmotion.migration.ha import (
    CONNECTED,
    FAILED,
    ISOLATED,
    PRIORITIES,
    Reserve,
    Sighting,
    Signals,
    Verdict,
    healthy_observer,
    judge,
    reserve,
    restart_order,
)

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 2.0
RESPONSES = ("leave-on", "power-off", "shutdown")
DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "failure_s": 15.0,
    "isolation_response": "leave-on",
    "failures_to_tolerate": 1,
}


@dataclass
class HostHealth:
    """What the center keeps of one member between heartbeats."""

    last_answer: float  # monotonic
    report: HaReportOut | None = None
    answered: bool = False  # the last heartbeat was answered
    verdict: Verdict | None = None
    since: float = 0.0  # when the verdict's state began (Unix time)
    declared: float | None = None  # when it was declared failed or isolated (monotonic)


class HaMonitor:
    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        executor: Executor,
        tasks: TaskStore,
        rules: Rules,
        clusters: Clusters,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.db, self.inventory, self.executor, self.tasks = db, inventory, executor, tasks
        self.rules, self.clusters = rules, clusters
        self.interval_s = interval_s
        self._health: dict[str, HostHealth] = {}
        self._restarting: dict[str, int] = {}  # VM uuid -> its ha-restart task
        self._waiting: dict[str, str] = {}  # VM uuid -> why its restart waits (said once)
        self._released_done: dict[str, set[str]] = {}  # host -> released VMs restarted
        # Told of each host state the center declares (the events below): (host, state).
        self.on_state: list[Callable[[str, str], None]] = []
        self._loop: asyncio.Task[None] | None = None

    # -- settings ----------------------------------------------------------------------------
    @staticmethod
    def _settings_of(row: ClusterRow) -> dict[str, Any]:
        return {
            "enabled": bool(row.ha_enabled),
            "failure_s": row.ha_failure_s or DEFAULTS["failure_s"],
            "isolation_response": row.ha_isolation_response or DEFAULTS["isolation_response"],
            "failures_to_tolerate": DEFAULTS["failures_to_tolerate"]
            if row.ha_failures is None
            else row.ha_failures,
        }

    async def settings(self, name: str) -> dict[str, Any]:
        return self._settings_of(await self.clusters.get(name))

    async def configure(self, name: str, **changes: Any) -> dict[str, Any]:
        """Set some of enabled, failure_s, isolation_response, failures_to_tolerate."""
        failure, response = changes.get("failure_s"), changes.get("isolation_response")
        failures = changes.get("failures_to_tolerate")
        if failure is not None and not 8 <= failure <= 600:
            raise InvalidInput("the failure time is 8 to 600 seconds", code="invalid_failure_time")
        if response is not None and response not in RESPONSES:
            raise InvalidInput(
                f"the isolation response is one of {', '.join(RESPONSES)}",
                code="invalid_isolation_response",
            )
        if failures is not None and not 0 <= failures <= 32:
            raise InvalidInput("host failures to tolerate is 0 to 32", code="invalid_failures")
        cluster_id = (await self.clusters.get(name)).id  # NotFound
        async with self.db.session() as s:
            row = await s.get(ClusterRow, cluster_id)
            assert row is not None
            if changes.get("enabled") is not None:
                row.ha_enabled = bool(changes["enabled"])
            if failure is not None:
                row.ha_failure_s = float(failure)
            if response is not None:
                row.ha_isolation_response = response
            if failures is not None:
                row.ha_failures = int(failures)
            await s.commit()
            current = self._settings_of(row)
        state = "enabled" if current["enabled"] else "disabled"
        await record_event(
            self.db,
            f"cluster {name} HA {state}: failure after {current['failure_s']:g} s, isolation "
            f"response {current['isolation_response']}, tolerating "
            f"{current['failures_to_tolerate']} host failure(s)",
        )
        return current

    async def set_priority(self, vm_ref: str, priority: str) -> dict[str, Any]:
        if priority not in PRIORITIES:
            raise InvalidInput(
                f"the restart priority is one of {', '.join(PRIORITIES)}", code="invalid_priority"
            )
        vm = await self.inventory.vm(vm_ref)
        await self.inventory.set_vm(vm.uuid, ha_priority=priority)
        return {"vm": vm.name, "ha_priority": priority}

    # -- what users see ------------------------------------------------------------------------
    def host_state(self, name: str) -> dict[str, Any] | None:
        """A member's HA state now, or None outside an HA cluster (or before a heartbeat)."""
        health = self._health.get(name)
        if health is None or health.verdict is None:
            return None
        v = health.verdict
        return {
            "state": v.state,
            "reason": v.reason,
            "since": health.since,
            "heartbeat_age_s": v.heartbeat_age_s,
            "fenced": [f.model_dump() for f in health.report.fenced] if health.report else [],
        }

    async def status(self, name: str) -> dict[str, Any]:
        cluster = await self.clusters.get(name)
        members = await self.clusters.members(cluster)
        settings = self._settings_of(cluster)
        async with self.db.session() as s:
            query = select(Task).where(Task.kind == "ha-restart").order_by(Task.id.desc())
            restarts = [task_dict(t) for t in await s.scalars(query.limit(50))]
        names = {h.name for h in members}
        return {
            "cluster": name,
            "settings": settings,
            "hosts": [
                {"host": h.name} | (self.host_state(h.name) or {"state": None}) for h in members
            ],
            "reserve": (await self.reserve(cluster)).as_dict(),
            "restarts": [t for t in restarts if t["request"].get("failed_host") in names],
        }

    async def reserve(self, cluster: ClusterRow) -> Reserve:
        """The members' capacity as the placement counts it (connected, not in maintenance)."""
        vms = await self.inventory.vms()
        room = [
            capacity(h, vms) for h in await self.clusters.members(cluster)
            if h.connection == "connected" and h.maintenance is None
        ]  # fmt: skip
        failures = self._settings_of(cluster)["failures_to_tolerate"]
        used = sum(c.committed_memory_mib for c in room)
        return reserve([c.memory_mib for c in room], used, failures if cluster.ha_enabled else 0)

    async def admit(self, vm: Vm) -> None:
        """Admission control: refuse (InsufficientResources) a power-on that would leave too
        little room to restart the VMs of the hosts the cluster must be able to lose."""
        if vm.host is None or vm.host.cluster_id is None:
            return
        async with self.db.session() as s:
            cluster = await s.get(ClusterRow, vm.host.cluster_id)
        if cluster is None or not cluster.ha_enabled:
            return
        why = (await self.reserve(cluster)).refusal(vm.name, int(vm.config.get("memory_mib", 0)))
        if why is not None:
            raise InsufficientResources(why, code="ha_admission")

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="ha-monitor")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.tick()
            except Exception:  # the monitor must outlive any one bad round
                log.exception("HA round failed; next in %.0f s", self.interval_s)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - began)))

    async def tick(self) -> None:
        for cluster in await self.clusters.all():
            if cluster.ha_enabled:
                await self._round(cluster)
                continue
            # HA off: its hosts are told so (they keep the settings they were sent, and would
            # fence and isolate on their own): at once when it was just turned off, and any
            # host whose facts say HA is on (a center that restarted, a host moved here).
            told = await self._ha_on(cluster)
            for host in told:
                self._health.pop(host.name, None)
            await asyncio.gather(*(self._heartbeat(h, [], DEFAULTS) for h in told))
        await self._end_unneeded_restarts()

    async def _ha_on(self, cluster: ClusterRow) -> list[Host]:
        """The members of ``cluster`` (HA off) whose facts say HA is on, or whose HA was on a
        moment ago here (read in the database: a fleet's facts, every second, would not be)."""
        query = select(Host).where(
            Host.cluster_id == cluster.id,
            Host.name.in_(list(self._health)) | Host.facts["ha_enabled"].as_boolean().is_(True),
        )
        async with self.db.session() as s:
            return list(await s.scalars(query))

    async def _end_unneeded_restarts(self) -> None:
        """A restart still waiting for a VM whose host answers again (and did not release it):
        not needed any more."""
        if not self._restarting:
            return
        vms = {v.uuid: v for v in await self.inventory.vms()}
        for uuid, task_id in list(self._restarting.items()):
            vm = vms.get(uuid)
            host = vm.host.name if vm is not None and vm.host is not None else None
            health = self._health.get(host or "")
            verdict = health.verdict if health is not None else None
            needed = verdict is not None and (verdict.state == FAILED or uuid in verdict.released)
            if vm is not None and health is not None and (not health.answered or needed):
                continue
            self._restarting.pop(uuid, None)
            self._waiting.pop(uuid, None)
            if vm is None:
                why = "not needed: the VM is gone"
            elif health is None:
                why = "not needed: HA was turned off"
            else:
                why = f"not needed: host {host} answers again, with the VM"
            await self.tasks.update(task_id, state=TaskState.CANCELLED, error=why,
                                    error_code="not_needed")  # fmt: skip

    async def _round(self, cluster: ClusterRow) -> None:
        settings = self._settings_of(cluster)
        failure_s = float(settings["failure_s"])
        members = await self.clusters.members(cluster)
        replies = await asyncio.gather(*(self._heartbeat(h, members, settings) for h in members))
        now = time.monotonic()
        for host, reply in zip(members, replies, strict=True):
            health = self._health.setdefault(host.name, HostHealth(last_answer=now))
            health.answered = reply is not None
            if reply is not None:
                health.last_answer, health.report = now, reply
                done = self._released_done.get(host.name)
                if done:
                    done &= set(reply.released)  # what it stopped listing needs no more word
        for host in members:
            await self._judge(host, members, failure_s, now)
        for host in members:
            verdict = self._health[host.name].verdict
            if verdict is not None and (verdict.state == FAILED or verdict.released):
                await self._restart_vms(host, verdict)
        await self._acknowledge_released(members)

    async def _acknowledge_released(self, members: list[Host]) -> None:
        """Tell each host which of the VMs it released run elsewhere now (or are gone): it
        stops listing them."""
        listing = [
            (h.name, report) for h in members
            if (report := self._health[h.name].report) and report.released
            and self._health[h.name].answered
        ]  # fmt: skip
        if not listing:
            return
        where = {vm.uuid: vm.host.name if vm.host else None for vm in await self.inventory.vms()}
        for name, report in listing:
            moved = {u for u in report.released if where.get(u) != name}
            if moved:
                self._released_done.setdefault(name, set()).update(moved)

    async def _heartbeat(
        self, host: Host, members: list[Host], settings: dict[str, Any]
    ) -> HaReportOut | None:
        body = HaSettingsIn(
            enabled=settings["enabled"] is not False, failure_s=settings["failure_s"],
            isolation_response=settings["isolation_response"],
            peers=[self.inventory.agent_url(m) for m in members if m.name != host.name],
        )  # fmt: skip
        done = sorted(self._released_done.get(host.name, ()))
        try:
            async with self.inventory.agent(host) as agent:
                return await agent.ha_heartbeat(body, done, HEARTBEAT_TIMEOUT_S)
        except KvmotionError:
            return None

    def _signals(self, host: Host, members: list[Host], now: float) -> Signals:
        health = self._health[host.name]
        stores = frozenset(  # accessible or not: a host that lost one still mounts it
            d["name"] for d in (host.facts or {}).get("datastores", []) if d.get("shared")
        )
        sightings: dict[str, list[Sighting]] = {}
        for other in members:
            seen = self._health.get(other.name)
            if other.name == host.name or seen is None or not seen.answered or not seen.report:
                continue
            for ds, view in seen.report.datastores.items():
                if ds not in stores or not healthy_observer(view.written_age_s):
                    continue
                peer = view.peers.get(host.name)
                sighting = (
                    Sighting(other.name, peer.age_s, tuple(peer.vms), tuple(peer.released))
                    if peer is not None
                    else Sighting(other.name, view.watching_s)  # never seen it there
                )
                sightings.setdefault(ds, []).append(sighting)
        silent = 0.0 if health.answered else now - health.last_answer
        said = frozenset(health.report.released) if health.answered and health.report else None
        return Signals(host.name, silent, stores, {k: tuple(v) for k, v in sightings.items()},
                       said or frozenset())  # fmt: skip

    async def _judge(self, host: Host, members: list[Host], failure_s: float, now: float) -> None:
        health = self._health[host.name]
        verdict = judge(self._signals(host, members, now), failure_s)
        before = health.verdict.state if health.verdict else None
        health.verdict = verdict
        if verdict.state == before:
            return
        health.since = time.time()
        if verdict.state in (FAILED, ISOLATED):
            health.declared = now
            await self.inventory.mark_disconnected(host.name)
        elif verdict.state == CONNECTED:
            health.declared = None
        if before is None and verdict.state == CONNECTED:
            return
        for listener in self.on_state:
            listener(host.name, verdict.state)
        severity = {FAILED: "alarm", CONNECTED: "info"}.get(verdict.state, "warning")
        await record_event(
            self.db, f"HA: host {host.name} is {verdict.state}: {verdict.reason}",
            severity=severity, host=host.name,
        )  # fmt: skip
        log.log(logging.ERROR if verdict.state == FAILED else logging.WARNING,
                "HA: host %s is %s: %s", host.name, verdict.state, verdict.reason)  # fmt: skip

    # -- restarts ------------------------------------------------------------------------------
    async def _restart_vms(self, host: Host, verdict: Verdict) -> None:
        candidates = {
            vm.name: vm
            for vm in await self.inventory.vms()
            if vm.host is not None and vm.host.name == host.name
            and (vm.power_state == "poweredOn" or vm.uuid in verdict.leased | verdict.released)
            and not self.executor.migrating(vm.name)
            and verdict.may_restart(_datastores(vm), vm.uuid)
        }  # fmt: skip
        order = restart_order((v.name, v.ha_priority) for v in candidates.values())
        for name in order:
            await self._restart(candidates[name], host, verdict)

    async def _restart(self, vm: Vm, failed: Host, verdict: Verdict) -> None:
        health = self._health[failed.name]
        fenced = {f.uuid for f in health.report.fenced} if health.report else set()
        if vm.uuid not in verdict.released:
            why = f"host {failed.name} failed: {verdict.reason}"
        elif vm.uuid in fenced:
            why = f"host {failed.name} lost its datastore and stopped it (fence)"
        else:
            why = f"host {failed.name} is isolated and stopped it (isolation response)"
        task_id = self._restarting.get(vm.uuid)
        if task_id is None:
            task = await self.tasks.create(
                "ha-restart", vm.name,
                {"type": "ha-restart", "vm": vm.name, "failed_host": failed.name, "reason": why},
            )  # fmt: skip
            task_id = self._restarting[vm.uuid] = task.id
            await self.tasks.update(task_id, state=TaskState.RUNNING, phase="placing")
        began = time.monotonic()
        try:
            with self.executor.reserved(vm.name):
                dest = await self._start_elsewhere(vm, task_id)
        except KvmotionError as exc:
            await self._wait(vm, task_id, exc.message)
            return
        restart_s = time.monotonic() - began
        declared_s = began - (health.declared or began)
        summary = {
            "failed_host": failed.name, "dest": dest, "reason": why,
            "silent_s": round(began - health.last_answer, 1),
            "heartbeat_age_s": verdict.heartbeat_age_s,
            "waited_s": round(declared_s, 1), "restart_s": round(restart_s, 1),
        }  # fmt: skip
        await self.tasks.update(
            task_id, state=TaskState.SUCCESS, phase="restarted", progress=100.0, summary=summary
        )
        self._restarting.pop(vm.uuid, None)
        self._waiting.pop(vm.uuid, None)
        if vm.uuid in verdict.released:
            self._released_done.setdefault(failed.name, set()).add(vm.uuid)
        await record_event(
            self.db, f"HA restarted VM {vm.name} on {dest} ({why}) in {restart_s:.1f} s",
            severity="warning", vm=vm.name, host=dest, task_id=task_id,
        )  # fmt: skip
        log.warning("HA restarted %s on %s in %.1f s", vm.name, dest, restart_s)

    async def _start_elsewhere(self, vm: Vm, task_id: int) -> str:
        """Register ``vm`` on the host the placement chooses and power it on; returns the host.
        Nothing stays registered there on failure."""
        placement = await place_vm(self.inventory, self.rules, vm)
        if placement.host is None:
            raise InsufficientResources(
                f"no host can take it: {placement.explain()}", code="no_host_fits"
            )
        dest = await self.inventory.host(placement.host)
        await self.tasks.update(task_id, phase=f"starting on {dest.name}")
        mode = await self.clusters.effective_mode(vm)
        async with self.inventory.agent(dest) as agent:
            await agent.register_vm(vm.config, vm.config_path)
            try:
                info = await agent.power_on(vm.uuid, evc_mode=mode)
            except BaseException:
                with contextlib.suppress(KvmotionError):
                    await agent.unregister_vm(vm.uuid)
                raise
        await self.inventory.upsert_vm(vm_json(info), dest)
        return dest.name

    async def _wait(self, vm: Vm, task_id: int, why: str) -> None:
        if self._waiting.get(vm.uuid) == why:
            return
        self._waiting[vm.uuid] = why
        await self.tasks.update(task_id, phase=f"waiting: {why}"[:40], warnings=[why])
        await record_event(
            self.db, f"HA restart of VM {vm.name} waits: {why}", severity="warning", vm=vm.name,
            task_id=task_id,
        )  # fmt: skip
        log.warning("HA restart of %s waits: %s", vm.name, why)


def _datastores(vm: Vm) -> list[str]:
    return [str(d.get("datastore")) for d in (vm.config or {}).get("disks", [])]
