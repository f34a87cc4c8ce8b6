"""Balancing (DRS) as the center runs it, per cluster: the inputs of the pure pass
(migration/balance.py) gathered from the agents and the inventory, its moves kept as
recommendations, and applied as ordinary migrations, by the admin (manual) or at once
(automatic).

- **Settings**, per cluster: ``mode`` off (the default) / manual / automatic; ``threshold`` 1-5
  (3); ``window_s``, the minutes the VMs' load is averaged over (300 s); ``hold_s``, how long a
  VM moved by anyone stays where it is (600 s).
- **Load**: each connected member host's agent averages its VMs' CPU and memory over the window
  (``GET /v1/load``, host/load.py). A VM just moved has few samples on its new host: its last
  figure from the old one stands in until the new host has two.
- **Cost**: each move's time is estimated from the VM's resident memory over the hosts'
  migration link (the predictor with no dirtying). A manual pass asked for fresh also samples
  each recommended VM's memory (dirty rate, working set) and attaches the predictor's time and
  downtime, as a precheck with ``--predict`` does.
- **Passes** run every ``interval_s`` for every cluster not off; an automatic cluster's moves
  are submitted at once (the executor's cost model queues them). Every pass is kept as the
  cluster's latest, with its recommendations numbered; applying one submits its migration and
  records it, so that the balancer does not undo it while the load is the same.

What a center restart loses: the latest passes and the balancer's own moves (the hold time still
holds: it is read from the finished migration tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from kvmotion.center.clusters import Clusters
from kvmotion.center.db import Cluster as ClusterRow
from kvmotion.center.db import Database, Host
from kvmotion.center.executor import Executor
from kvmotion.center.inventory import Inventory, vm_view
from kvmotion.center.placing import cluster_now
from kvmotion.center.prediction import DEFAULT_LINK_BPS, link_of, sample_and_predict
from kvmotion.center.rules import Rules
from kvmotion.center.tasks import TaskState, TaskStore, record_event
from kvmotion.errors import InvalidInput, KvmotionError, NotFound
from kvmotion.migration.balance import LEVELS, Pass, PastMove, Settings, VmLoad, balance
from kvmotion.migration.placement import Cluster, Overcommit
from kvmotion.migration.policy import ConvergenceRequest
from kvmotion.migration.predictor import predict
from kvmotion.migration.request import MigrationRequest

log = logging.getLogger(__name__)

MODES = ("off", "manual", "automatic")
DEFAULTS = {"mode": "off", "threshold": 3, "window_s": 300.0, "hold_s": 600.0}
INTERVAL_S = 60.0  # between two passes over a cluster that is not off
HISTORY = 500  # the finished migrations read for the hold time
PREDICT_TIMEOUT_S = 30.0
KEEP_RECOMMENDATIONS = 1000  # the recent recommendations kept appliable by number


@dataclass
class Recommendation:
    id: int
    vm: str
    source: str
    dest: str
    mandatory: bool
    reason: str
    imbalance_before: float
    imbalance_after: float
    cpu: float
    memory_mib: float
    move_s: float
    source_cpu_after: float
    prediction: dict[str, Any] | None = None
    task: int | None = None  # the migration applying it
    state: str = "pending"  # pending, applied, failed, stale

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClusterPass:
    cluster: str
    at: datetime
    settings: dict[str, Any]
    result: Pass
    recommendations: list[Recommendation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # hosts whose load could not be read

    def as_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "cluster": self.cluster,
            "at": self.at.isoformat(),
            "settings": self.settings,
            "imbalance": r.imbalance,
            "imbalance_after": r.after,
            "tolerance": r.tolerance,
            "hosts": [
                {"host": h, "cpu": s.cpu, "memory": s.memory} for h, s in sorted(r.loads.items())
            ],
            "recommendations": [rec.as_dict() for rec in self.recommendations],
            "held": list(r.held),
            "why_no_more": r.why_no_more,
            "errors": self.errors,
        }


class Balancer:
    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        executor: Executor,
        tasks: TaskStore,
        rules: Rules,
        clusters: Clusters,
        overcommit: Overcommit | None = None,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.db, self.inventory, self.executor, self.tasks = db, inventory, executor, tasks
        self.clusters = clusters
        self.rules = rules
        self.overcommit = overcommit or Overcommit()
        self.interval_s = interval_s
        self._passes: dict[str, ClusterPass] = {}
        # Every recommendation of recent passes by number, so that one shown to a user stays
        # appliable when a pass of the loop's replaces the latest meanwhile.
        self._recent: dict[int, tuple[str, Recommendation]] = {}
        self._ids = itertools.count(1)
        self._made: deque[PastMove] = deque(maxlen=HISTORY)  # the balancer's own moves
        self._known: dict[str, VmLoad] = {}  # each VM's latest load (a moved VM's stands in)
        self._loop: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- settings ----------------------------------------------------------------------------
    @staticmethod
    def _settings_of(row: ClusterRow) -> dict[str, Any]:
        return {
            "mode": row.drs_mode or DEFAULTS["mode"],
            "threshold": row.drs_threshold or DEFAULTS["threshold"],
            "window_s": row.drs_window_s or DEFAULTS["window_s"],
            "hold_s": DEFAULTS["hold_s"] if row.drs_hold_s is None else row.drs_hold_s,
        }

    async def settings(self, name: str) -> dict[str, Any]:
        return self._settings_of(await self.clusters.get(name))

    async def configure(self, name: str, **changes: Any) -> dict[str, Any]:
        """Set some of mode, threshold, window_s, hold_s; returns them all."""
        mode, threshold = changes.get("mode"), changes.get("threshold")
        window, hold = changes.get("window_s"), changes.get("hold_s")
        if mode is not None and mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}", code="invalid_mode")
        if threshold is not None and threshold not in LEVELS:
            raise InvalidInput("the migration threshold is 1 to 5", code="invalid_threshold")
        if window is not None and not 10 <= window <= 900:
            raise InvalidInput("the load window is 10 to 900 seconds", code="invalid_window")
        if hold is not None and not 0 <= hold <= 86400:
            raise InvalidInput("the hold time is 0 to 86400 seconds", code="invalid_hold")
        cluster_id = (await self.clusters.get(name)).id  # NotFound
        async with self.db.session() as s:
            row = await s.get(ClusterRow, cluster_id)
            assert row is not None
            if mode is not None:
                row.drs_mode = mode
            if threshold is not None:
                row.drs_threshold = threshold
            if window is not None:
                row.drs_window_s = float(window)
            if hold is not None:
                row.drs_hold_s = float(hold)
            await s.commit()
            current = self._settings_of(row)
        await record_event(
            self.db,
            f"cluster {name} balancing: {current['mode']}, threshold {current['threshold']}",
        )
        return current

    # -- passes ------------------------------------------------------------------------------
    def latest(self, name: str) -> ClusterPass | None:
        return self._passes.get(name)

    async def run_pass(self, name: str, *, predict_moves: bool = False) -> ClusterPass:
        """A pass over the cluster now; kept as its latest (replacing the recommendations of
        the one before that were not applied)."""
        async with self._lock:
            row = await self.clusters.get(name)
            current = self._settings_of(row)
            members = await self.clusters.members(row)
            cluster, views = await self._cluster(members)
            loads, errors = await self._loads(members, views, current["window_s"])
            history = await self._history()
            settings = Settings(threshold=current["threshold"], hold_s=current["hold_s"])
            result = balance(cluster, views, loads, history, settings, now=time.time())
            recs = [
                Recommendation(
                    next(self._ids),
                    m.vm,
                    m.source,
                    m.dest,
                    m.mandatory,
                    m.reason,
                    m.before,
                    m.after,
                    m.cpu,
                    m.memory_mib,
                    m.move_s,
                    m.source_cpu_after,
                )
                for m in result.moves
            ]
            done = ClusterPass(name, datetime.now(UTC), current, result, recs, errors)
            self._passes[name] = done
            for rec in recs:
                self._recent[rec.id] = (name, rec)
            for old in sorted(self._recent)[: max(len(self._recent) - KEEP_RECOMMENDATIONS, 0)]:
                del self._recent[old]
        if predict_moves and recs:
            await self._predict(recs, {h.name: h for h in members})
        return done

    async def _cluster(self, members: list[Host]) -> tuple[Cluster, dict[str, Any]]:
        names = {h.name for h in members}
        cluster = await cluster_now(self.inventory, self.rules, self.overcommit)
        cluster.views = {n: v for n, v in cluster.views.items() if n in names}
        cluster.capacity = {n: c for n, c in cluster.capacity.items() if n in names}
        views = {
            v.name: vm_view(v, False)
            for v in await self.inventory.vms()
            if v.host is not None
            and v.host.name in names
            and v.power_state == "poweredOn"
            and not self.executor.migrating(v.name)
        }
        return cluster, views

    async def _loads(
        self, members: list[Host], views: dict[str, Any], window_s: float
    ) -> tuple[dict[str, VmLoad], list[str]]:
        connected = [h for h in members if h.connection == "connected"]

        async def ask(host: Host) -> Any:
            async with self.inventory.agent(host) as agent:
                return await agent.load(window_s)

        answers = await asyncio.gather(*(ask(h) for h in connected), return_exceptions=True)
        errors = []
        # the destination is not chosen yet: the source's own link stands for the pair's
        links = {h.name: link_of(h) or DEFAULT_LINK_BPS for h in members}
        for host, answer in zip(connected, answers, strict=True):
            if isinstance(answer, BaseException):
                message = answer.message if isinstance(answer, KvmotionError) else repr(answer)
                errors.append(f"{host.name}: {message}")
                continue
            for vm_name, load in answer.vms.items():
                view = views.get(vm_name)
                if view is None or view.host != host.name:
                    continue  # not this host's VM now (moved since it was sampled)
                ram = view.memory_mib * 2**20
                estimate = predict(
                    ram, min(int(load.memory_mib * 2**20), ram), 0.0, 0,
                    links[host.name], ConvergenceRequest(),
                )  # fmt: skip
                self._known[vm_name] = VmLoad(load.cpu, load.memory_mib, estimate.total_s)
        loads = {n: self._known[n] for n in views if n in self._known}
        return loads, errors

    async def _history(self) -> list[PastMove]:
        """Every finished migration (the hold time), and the balancer's own moves (no undo),
        oldest first."""
        moves = []
        for task in await self.tasks.recent("migrate", TaskState.SUCCESS, HISTORY):
            request = task.request or {}
            if task.finished_at is None or request.get("source") == request.get("dest"):
                continue
            moves.append(
                PastMove(
                    str(request.get("vm")),
                    str(request.get("source")),
                    str(request.get("dest")),
                    task.finished_at.timestamp(),
                )
            )
        return sorted([*moves, *self._made], key=lambda m: (m.at, m.by_balancer))

    async def _predict(self, recs: list[Recommendation], hosts: dict[str, Host]) -> None:
        """The predictor's time and downtime for each recommendation, from a fresh sample of
        the VM's memory (all at once, bounded)."""

        async def one(rec: Recommendation) -> None:
            try:
                vm = await self.inventory.vm(rec.vm)
                req = MigrationRequest(rec.vm, rec.dest)
                rec.prediction = await asyncio.wait_for(
                    sample_and_predict(
                        self.inventory, self.tasks, req, vm, hosts[rec.source], hosts[rec.dest]
                    ),
                    PREDICT_TIMEOUT_S,
                )
            except (KvmotionError, TimeoutError, KeyError) as exc:
                why = exc.message if isinstance(exc, KvmotionError) else repr(exc)
                rec.prediction = {"error": f"no prediction: {why}"}

        await asyncio.gather(*(one(r) for r in recs))

    # -- applying ----------------------------------------------------------------------------
    async def apply(self, name: str, ids: list[int] | None = None) -> list[dict[str, Any]]:
        """Submit pending recommendations: all of the latest pass's, or those numbered (of a
        recent pass: one a user was shown stays appliable after the loop's next pass; one whose
        VM moved since is "stale"). One migration each. Raises NotFound for an unknown number."""
        latest = self._passes.get(name)
        pending = [r for r in latest.recommendations if r.state == "pending"] if latest else []
        if ids is not None:
            known = {i: rec for i, (cluster, rec) in self._recent.items() if cluster == name}
            missing = [i for i in ids if i not in known]
            if missing:
                raise NotFound(
                    f"cluster {name} has no recommendation {', '.join(map(str, missing))} "
                    "in its recent passes (list them again)",
                    code="recommendation_not_found",
                )
            pending = [known[i] for i in ids if known[i].state == "pending"]
        applied = []
        for rec in pending:
            try:
                vm = await self.inventory.vm(rec.vm)
                if vm.host is None or vm.host.name != rec.source:
                    rec.state = "stale"
                    applied.append({**rec.as_dict(), "error": f"{rec.vm} is no longer on "
                                    f"{rec.source}"})  # fmt: skip
                    continue
                rec.task = await self.executor.submit(MigrationRequest(rec.vm, rec.dest))
                rec.state = "applied"
                self._made.append(
                    PastMove(rec.vm, rec.source, rec.dest, time.time(), True, rec.cpu,
                             rec.source_cpu_after)
                )  # fmt: skip
                await record_event(
                    self.db, f"balancing cluster {name}: {rec.vm} {rec.source} -> {rec.dest} "
                    f"(task {rec.task}): {rec.reason}", vm=rec.vm,
                )  # fmt: skip
                applied.append(rec.as_dict())
            except KvmotionError as exc:
                rec.state = "failed"
                applied.append({**rec.as_dict(), "error": f"{exc.message} ({exc.code})"})
        return applied

    # -- the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="balancing")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for row in await self.clusters.all():
                mode = self._settings_of(row)["mode"]
                if mode == "off":
                    continue
                try:
                    done = await self.run_pass(row.name)
                    if mode == "automatic" and done.recommendations:
                        await self.apply(row.name)
                except Exception:  # one cluster's failure must not stop the others
                    log.exception("balancing cluster %s failed", row.name)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
