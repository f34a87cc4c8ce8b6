"""The center: inventory, tasks, the migration executor, and the loop that keeps facts fresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from kvmotion.center.balancing import INTERVAL_S, Balancer
from kvmotion.center.clusters import Clusters
from kvmotion.center.console import ConsoleRelay
from kvmotion.center.db import Database
from kvmotion.center.executor import DEFAULT_STALL_TIMEOUT, Executor
from kvmotion.center.ha import INTERVAL_S as HA_INTERVAL_S
from kvmotion.center.ha import HaMonitor
from kvmotion.center.inventory import Inventory
from kvmotion.center.maintenance import Maintenance
from kvmotion.center.metrics import CenterMetrics
from kvmotion.center.rules import Rules
from kvmotion.center.tasks import TaskStore, record_event
from kvmotion.configfile import ConfigFile
from kvmotion.errors import KvmotionError

log = logging.getLogger(__name__)

DEFAULT_CENTER_PORT = 8600


class ApiToken(BaseModel):
    """Someone who may use the center's API besides its administrator token."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    token: str = Field(pattern=r"^[\x21-\x7e]{16,512}$", repr=False)
    role: Literal["admin", "read-only"] = "read-only"


class CenterConfig(ConfigFile):
    listen: str = "127.0.0.1"
    port: int = DEFAULT_CENTER_PORT
    db_url: str = "sqlite+aiosqlite:////var/lib/kvmotion/center.db"
    token: str = Field(repr=False)  # the administrator's ("admin")
    users: list[ApiToken] = Field(default_factory=list)  # more tokens, each with a role
    refresh_interval_s: float = 5.0
    # Concurrent migrations follow vCenter's costs (migration/costs.py); this caps the count per
    # host on top (the lab sets 2: TCG on a small machine).
    migrations_per_host: int | None = Field(None, ge=1, le=64)
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT  # a copy that moves no byte this long aborts
    balancing_interval_s: float = Field(INTERVAL_S, ge=5.0)  # between passes (center/balancing.py)
    ha_interval_s: float = Field(HA_INTERVAL_S, ge=0.2, le=5.0)  # HA heartbeats (center/ha.py)

    def api_tokens(self) -> dict[str, tuple[str, str]]:
        """Every token the API accepts: token -> (name, role)."""
        tokens: dict[str, tuple[str, str]] = {u.token: (u.name, u.role) for u in self.users}
        tokens[self.token] = ("admin", "admin")
        return tokens


class Center:
    def __init__(
        self, config: CenterConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.db = Database(config.db_url)
        self.tasks = TaskStore(self.db)
        self.inventory = Inventory(
            self.db, migrating=lambda name: self.executor.migrating(name), transport=transport
        )
        self.executor = Executor(
            self.db,
            self.inventory,
            self.tasks,
            config.migrations_per_host,
            stall_timeout_s=config.stall_timeout_s,
        )
        self.clusters = Clusters(self.db, self.inventory)
        self.consoles = ConsoleRelay(self.inventory)
        self.rules = Rules(self.db, self.inventory)
        self.executor.rules = self.rules
        self.maintenance = Maintenance(
            self.db, self.inventory, self.executor, self.tasks, self.rules
        )
        self.balancer = Balancer(
            self.db, self.inventory, self.executor, self.tasks, self.rules, self.clusters,
            interval_s=config.balancing_interval_s,
        )  # fmt: skip
        self.ha = HaMonitor(
            self.db, self.inventory, self.executor, self.tasks, self.rules, self.clusters,
            interval_s=config.ha_interval_s,
        )  # fmt: skip
        self.metrics = CenterMetrics(self.inventory, self.tasks, self.ha)  # GET /metrics
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.db.migrate()
        await self.inventory.ensure_defaults()
        await self._fail_orphaned_tasks()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="refresh-hosts")
        self.balancer.start()
        self.ha.start()

    async def _fail_orphaned_tasks(self) -> None:
        """Tasks a previous center left unfinished: mark them failed, saying so."""
        for task in await self.tasks.list(limit=500):
            if task.state in ("queued", "running"):
                await self.tasks.update(
                    task.id,
                    state="error",
                    error="the center restarted during this task; hosts were re-read",
                    error_code="center_restarted",
                )
                await record_event(
                    self.db, f"task {task.id} ended by a center restart", severity="warning"
                )

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.inventory.refresh_all()
            except KvmotionError as exc:
                log.warning("refreshing hosts: %s", exc.message)
            except Exception:  # the loop must outlive any one bad refresh
                log.exception("refreshing hosts failed; retrying")
            await asyncio.sleep(self.config.refresh_interval_s)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.ha.close()
        await self.balancer.close()
        await self.maintenance.close()
        await self.executor.close()
        await self.inventory.close()
        await self.db.close()
