"""The center: inventory, tasks, the migration executor, and the loop that keeps facts fresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field
from sqlalchemy import select, update

from kvmotion.center.balancing import INTERVAL_S, Balancer
from kvmotion.center.clusters import Clusters
from kvmotion.center.console import ConsoleRelay
from kvmotion.center.db import CenterNode, Database
from kvmotion.center.executor import DEFAULT_STALL_TIMEOUT, Executor
from kvmotion.center.ha import INTERVAL_S as HA_INTERVAL_S
from kvmotion.center.ha import HaMonitor
from kvmotion.center.inventory import Inventory
from kvmotion.center.leader import CHECK_S, Leadership, Role, lock_for
from kvmotion.center.maintenance import Maintenance
from kvmotion.center.metrics import CenterMetrics
from kvmotion.center.orphans import SETTLE_S, Orphans
from kvmotion.center.rules import Rules
from kvmotion.center.tasks import TaskStore
from kvmotion.configfile import ConfigFile
from kvmotion.errors import KvmotionError
from kvmotion.mgmttls import agents_context

log = logging.getLogger(__name__)

DEFAULT_CENTER_PORT = 8600
HEARTBEAT_S = 2.0  # each center writes its row in the centers table this often


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
    # Centers sharing one database (center/leader.py, docs/center-ha.md): this one's name among
    # them (default: this machine's name and port), and the URL its clients use to reach it,
    # which standbys send clients to when it is active (default: from listen and port).
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}$")
    advertise_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    leader_check_s: float = Field(CHECK_S, ge=0.05, le=5.0)  # holds checked, takeovers tried
    # How long the next active center waits for the hosts to finish a migration the lost one
    # left before it aborts it (center/orphans.py)
    orphan_settle_s: float = Field(SETTLE_S, ge=5.0, le=3600.0)
    # The center's TLS directory (`kvmotion tls issue --host center --address ADDR`): its API is
    # served over HTTPS with the server certificate (mgmttls.py); api_plaintext: true serves
    # plaintext HTTP instead (tokens in clear: a private network only).
    tls_dir: Path = Path("/etc/kvmotion/center-tls")
    api_plaintext: bool = False

    def center_name(self) -> str:
        return self.name or f"{socket.gethostname()}:{self.port}"

    def center_url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = socket.gethostname() if self.listen in ("0.0.0.0", "::") else self.listen
        scheme = "http" if self.api_plaintext else "https"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

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
            self.db,
            migrating=lambda name: self.executor.migrating(name),
            transport=transport,
            tls=agents_context(config.tls_dir),
            tls_dir=config.tls_dir,
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
        self.orphans = Orphans(self.inventory, self.executor, self.tasks, config.orphan_settle_s)
        self.leadership = Leadership(
            lock_for(config.db_url), self._activate, self._lose, config.leader_check_s
        )
        self.name = config.center_name()
        self.url = config.center_url()
        self.lost = asyncio.Event()  # leadership was lost: this process must stop acting
        self.metrics = CenterMetrics(self.inventory, self.tasks, self.ha)  # GET /metrics
        self._refresher: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def role(self) -> Role:
        return self.leadership.role

    async def start(self) -> None:
        """Upgrade the schema, then take leadership or wait as a standby. A center alone on its
        database is active when this returns."""
        await self.db.migrate()
        await self._say()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="center-heartbeat")
        await self.leadership.start()
        await self._say()

    async def _activate(self) -> None:
        """Leadership taken: settle what the last active center left, then act."""
        await self.inventory.ensure_defaults()
        async with self.db.session() as s:
            others = list(
                await s.scalars(
                    select(CenterNode.name).where(
                        CenterNode.role == "active", CenterNode.name != self.name
                    )
                )
            )
            await s.execute(
                update(CenterNode).where(CenterNode.name.in_(others)).values(role="lost")
            )
            await s.commit()
        await self._say("active")  # standbys send clients here from now on
        if others:
            reason, code = f"the active center {others[0]} was lost", "center_failover"
            log.warning("%s: this center (%s) takes over", reason, self.name)
        else:
            reason, code = "the center restarted", "center_restarted"
        await self.orphans.settle(reason, code)
        self._refresher = asyncio.create_task(self._refresh_loop(), name="refresh-hosts")
        self.balancer.start()
        self.ha.start()

    async def _lose(self) -> None:
        """Another center may be active now: stop every loop that acts on hosts. The process
        should end (``kvmotion center serve`` does, and its service manager restarts it as a
        standby); migrations under way are left to their agents and the new active center."""
        self.lost.set()
        await self._stop_loops()
        await self.executor.abandon()

    async def _stop_loops(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self.ha.close()
        await self.balancer.close()

    async def _say(self, role: Role | None = None) -> None:
        """This center's row: its role (``role``, else its leadership's) and URL, seen now."""
        role = role or self.role
        if role == "activating":
            role = "active"  # it holds the lock: nobody else is active
        async with self.db.session() as s:
            row = await s.get(CenterNode, self.name)
            if row is None:
                row = CenterNode(name=self.name)
                s.add(row)
            now = datetime.now(UTC)
            if role == "active" and row.role != "active":
                row.active_since = now
            row.url, row.role, row.seen_at = self.url, role, now
            await s.commit()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._say()
            except Exception as exc:  # the database is away: leadership decides what follows
                log.warning("could not write this center's heartbeat: %s", exc)

    async def centers(self) -> list[CenterNode]:
        async with self.db.session() as s:
            return list(await s.scalars(select(CenterNode).order_by(CenterNode.name)))

    async def active_center(self) -> CenterNode | None:
        """The active center as the database says (None while nobody has taken over)."""
        async with self.db.session() as s:
            return await s.scalar(select(CenterNode).where(CenterNode.role == "active"))

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
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self._stop_loops()
        await self.orphans.close()
        started = self.leadership.role != "starting"
        await self.leadership.close()
        if started:
            with contextlib.suppress(Exception):
                await self._say()  # "stopped"
        await self.maintenance.close()
        await self.executor.close()
        await self.inventory.close()
        await self.db.close()
