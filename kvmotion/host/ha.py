"""HA on a host: its two heartbeats, what it reads of the others', and what it does alone.

vSphere HA declares a host failed only when it is silent on two channels; kvmotion does the same
(the center's side: center/ha.py, its judgement: migration/ha.py):

- **management**: the center's heartbeat (``POST /v1/ha``, every second) reaches this agent,
  which answers with this report. Each one carries the cluster's HA settings and the other
  members' agent URLs.
- **datastores**: every second, on each *shared* datastore, the agent rewrites its own file
  ``.kvmotion-ha/<host>.json`` (a sequence number, the uuids of the VMs it runs with a disk
  there: their leases) and reads the others'. A file's age is measured here, on this host's own
  clock, as the time since it was last seen to change: no two hosts' clocks are ever compared.
  Each write and read runs in a daemon thread with a deadline (a hung NFS mount is a failed
  write, never a frozen agent).

What the agent does alone, with HA enabled:

- **fence** (vSphere's VM Component Protection): once it has not renewed its heartbeat on a
  datastore for ``failure_s - FENCE_MARGIN_S`` seconds it kills, at once, every QEMU of its VMs
  with a disk there, and lists them as *released*. Their leases lapse at ``failure_s``; the
  center restarts a VM elsewhere only after another host has seen this host's file unchanged
  that long, or once this host, still connected, reports it released. So a VM the center
  restarts was stopped here first, whatever happened to the network.
- **isolation**: once the center has been silent for ``failure_s`` and none of the other
  members' agents answers either (the center alone being down is not isolation; a host with no
  other member is never isolated), the host is
  isolated and applies the cluster's isolation response: ``leave-on`` (the default: its VMs run
  on, and nothing restarts them), ``power-off`` or ``shutdown`` (then each VM stopped is listed
  as *released* in its heartbeat file, and the center restarts it elsewhere). The center's next
  heartbeat ends the isolation.

What this cannot cover: a hung agent (alive, but its event loop stuck) neither renews nor fences;
its QEMUs run on and keep their image locks, so that a restart elsewhere fails to open the disks
and waits (QEMU's locks are the last guard). Proxmox covers that case with a watchdog that
reboots the node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvmotion.host.config import DatastoreConfig
from kvmotion.host.datastores import in_daemon_thread
from kvmotion.host.protocol import (
    HaDatastoreOut,
    HaFenceOut,
    HaPeerOut,
    HaReportOut,
    HaSettingsIn,
)

log = logging.getLogger(__name__)

HA_DIR = ".kvmotion-ha"
INTERVAL_S = 1.0  # between two heartbeats
IO_DEADLINE_S = 2.0  # a heartbeat write (and the reads after it) slower than this failed
FENCE_MARGIN_S = 5.0  # fence this long before the leases lapse (at failure_s)
PROBE_EVERY_S = 5.0  # while the center is silent: how often the other agents are asked
SHUTDOWN_TIMEOUT_S = 60.0  # the isolation response "shutdown": then power off
MAX_FILE = 65536
KEEP_FENCES = 100


def fence_after(failure_s: float) -> float:
    """How long a host goes without renewing its heartbeat on a datastore before it stops its
    VMs there: the lease lapses ``FENCE_MARGIN_S`` later."""
    return failure_s - FENCE_MARGIN_S


@dataclass(frozen=True)
class Held:
    """A VM with a live QEMU here: what its heartbeat and its fence need to know."""

    uuid: str
    name: str
    datastores: frozenset[str]  # of its disks
    leased: bool  # it runs here (not a migration's paused destination)


@dataclass
class _Seen:
    key: tuple[str, int]  # (incarnation, seq): a change of either is a heartbeat
    changed: float  # monotonic, on this host's clock
    vms: list[str]
    released: list[str]
    isolated: bool


class HostHa:
    def __init__(
        self,
        name: str,
        datastores: list[DatastoreConfig],
        settings_file: Path,
        held: Callable[[], list[Held]],
        kill: Callable[[str], Awaitable[None]],
        shutdown: Callable[[str, float], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        peer_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.peer_tls = peer_tls  # the cluster CA, to verify https peers (None: the system's)
        self.shared = [ds for ds in datastores if ds.shared]
        self.settings_file = settings_file
        self.held = held  # the VMs with a live QEMU here
        self.kill = kill  # SIGKILL a VM's QEMU (by uuid)
        self.shutdown = shutdown  # ask its guest, then power off past the timeout
        self.clock = clock
        self.incarnation = uuidlib.uuid4().hex[:12]
        self.settings = _read_settings(settings_file)
        self.started = clock()
        self.contact = self.started  # the center's last heartbeat here
        self.isolated = False
        self.released: set[str] = set()
        self.fenced: deque[HaFenceOut] = deque(maxlen=KEEP_FENCES)
        self._seq = 0
        self._written: dict[str, float] = {}  # datastore -> last renewal (monotonic)
        self._watching: dict[str, float] = {}  # datastore -> when reading began
        self._seen: dict[str, dict[str, _Seen]] = {}  # datastore -> host -> its file
        self._pending: dict[str, asyncio.Future[dict[str, bytes]]] = {}
        self._failing: set[str] = set()  # datastores whose last heartbeat failed
        self._probed = 0.0
        self._responding: asyncio.Task[None] | None = None

    # -- the center's heartbeat ----------------------------------------------------------------
    def heartbeat(self, settings: HaSettingsIn, released_done: list[str]) -> HaReportOut:
        """The center reached this host: keep its settings, end an isolation, and answer."""
        now = self.clock()
        if settings.enabled and not self.settings.enabled:
            # Turned on now: the fence's and the readers' clocks start now, not at the agent's
            # start (a datastore already failing gets the full time before its VMs are killed).
            self.started = now
            self._written.clear()
            self._watching.clear()
            self._seen.clear()
        if settings != self.settings:
            self._save_settings(settings)
        if self.isolated:
            log.warning("HA: the center is back after %.0f s: no longer isolated",
                        now - self.contact)  # fmt: skip
            self.isolated = False
        self.contact = now
        self.released.difference_update(released_done)
        return self.report()

    def report(self) -> HaReportOut:
        now = self.clock()
        stores = {}
        for ds in self.shared:
            written = self._written.get(ds.name)
            began = self._watching.get(ds.name)
            stores[ds.name] = HaDatastoreOut(
                written_age_s=None if written is None else round(now - written, 2),
                watching_s=0.0 if began is None else round(now - began, 2),
                peers={
                    host: _peer_out(seen, now)
                    for host, seen in sorted(self._seen.get(ds.name, {}).items())
                },
            )
        return HaReportOut(
            host=self.name, incarnation=self.incarnation, enabled=self.settings.enabled,
            isolated=self.isolated, datastores=stores, fenced=list(self.fenced),
            released=sorted(self.released),
        )  # fmt: skip

    # -- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the heartbeat must outlive any one bad beat
                log.exception("HA heartbeat failed; next one in %.0f s", INTERVAL_S)
            await asyncio.sleep(INTERVAL_S)

    async def close(self) -> None:
        if self._responding is not None:
            self._responding.cancel()

    async def tick(self) -> None:
        if not self.settings.enabled:
            return
        held = self.held()
        self.released -= {vm.uuid for vm in held}  # powered on here again: not released
        await asyncio.gather(*(self._beat(ds, held) for ds in self.shared))
        await self._fence(held)
        await self._check_isolation(held)

    async def _beat(self, ds: DatastoreConfig, held: list[Held]) -> None:
        """Renew this host's file on ``ds`` and read the others' there."""
        now = self.clock()
        self._watching.setdefault(ds.name, now)
        pending = self._pending.get(ds.name)
        if pending is not None and not pending.done():
            return  # the last one hangs: this beat is missed too
        self._seq += 1
        body = json.dumps({
            "host": self.name, "incarnation": self.incarnation, "seq": self._seq,
            "vms": sorted(h.uuid for h in held if h.leased and ds.name in h.datastores),
            "released": sorted(self.released), "isolated": self.isolated,
        }).encode()  # fmt: skip
        folder, me = ds.path / HA_DIR, _file_name(self.name)
        future = asyncio.wrap_future(
            in_daemon_thread(lambda: _write_and_read(folder, me, body), f"ha {ds.name}")
        )
        self._pending[ds.name] = future
        try:
            files = await asyncio.wait_for(asyncio.shield(future), IO_DEADLINE_S)
        except (OSError, TimeoutError) as exc:
            if ds.name not in self._failing:  # said once per outage, not every second
                self._failing.add(ds.name)
                log.warning("HA: heartbeat on datastore %s failed: %s", ds.name,
                            exc or "no answer in time")  # fmt: skip
            return
        if ds.name in self._failing:
            self._failing.discard(ds.name)
            log.warning("HA: heartbeat on datastore %s renewed again", ds.name)
        self._written[ds.name] = self.clock()
        self._read_peers(ds.name, files)

    def _read_peers(self, datastore: str, files: dict[str, bytes]) -> None:
        now = self.clock()
        seen = self._seen.setdefault(datastore, {})
        for raw in files.values():
            try:
                data = json.loads(raw)
                host, key = str(data["host"]), (str(data["incarnation"]), int(data["seq"]))
                vms, released = list(map(str, data["vms"])), list(map(str, data["released"]))
                isolated = bool(data.get("isolated"))
            except (ValueError, KeyError, TypeError):
                continue  # half a file from a foreign writer: not a heartbeat
            if host == self.name:
                continue
            last = seen.get(host)
            changed = now if last is None or last.key != key else last.changed
            seen[host] = _Seen(key, changed, vms, released, isolated)

    async def _fence(self, held: list[Held]) -> None:
        limit = fence_after(self.settings.failure_s)
        now = self.clock()
        for ds in self.shared:
            silent = now - self._written.get(ds.name, self.started)
            if silent < limit:
                continue
            for vm in held:
                if ds.name not in vm.datastores:
                    continue
                reason = (f"its datastore {ds.name} has not taken this host's heartbeat for "
                          f"{silent:.0f} s: stopped before its lease lapses")  # fmt: skip
                log.error("HA: fencing VM %s: %s", vm.name, reason)
                await self.kill(vm.uuid)
                self.fenced.append(HaFenceOut(vm=vm.name, uuid=vm.uuid, reason=reason,
                                              at=time.time()))  # fmt: skip
                self.released.add(vm.uuid)  # stopped: the center may restart it elsewhere

    async def _check_isolation(self, held: list[Held]) -> None:
        now = self.clock()
        if self.isolated or now - self.contact < self.settings.failure_s:
            return
        if now - self._probed < PROBE_EVERY_S:
            return
        self._probed = now
        if await self._any_peer_answers():
            return  # the center is gone, not this host's network
        self.isolated = True
        response = self.settings.isolation_response
        log.error("HA: isolated (no center for %.0f s, no other host answers): %s",
                  now - self.contact, response)  # fmt: skip
        if response != "leave-on":
            shared = {ds.name for ds in self.shared}
            chosen = [vm for vm in held if vm.leased and vm.datastores & shared]
            self._responding = asyncio.create_task(self._respond(response, chosen))

    async def _respond(self, response: str, vms: list[Held]) -> None:
        """Stop each VM (hard, or the guest first), then release it to be restarted."""
        for vm in vms:
            try:
                if response == "power-off":
                    await self.kill(vm.uuid)
                else:
                    await self.shutdown(vm.uuid, SHUTDOWN_TIMEOUT_S)
            except Exception as exc:  # one VM must not keep the others running
                log.error("HA: the isolation response could not stop %s: %s", vm.name, exc)
                continue
            log.warning("HA: isolation response %s stopped VM %s; released", response, vm.name)
            self.released.add(vm.uuid)

    async def _any_peer_answers(self) -> bool:
        if not self.settings.peers:
            return True  # no other host to tell an isolation from a center outage: not isolated
        verify = self.peer_tls or True
        async with httpx.AsyncClient(trust_env=False, timeout=1.0, verify=verify) as client:

            async def answers(url: str) -> bool:
                try:
                    return (await client.get(url.rstrip("/") + "/v1/health")).status_code == 200
                except httpx.HTTPError:
                    return False

            return any(await asyncio.gather(*(answers(u) for u in self.settings.peers)))

    def _save_settings(self, settings: HaSettingsIn) -> None:
        self.settings = settings
        try:
            self.settings_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.settings_file.with_suffix(".tmp")
            tmp.write_text(settings.model_dump_json())
            os.replace(tmp, self.settings_file)
        except OSError as exc:
            log.error("HA: cannot keep the settings in %s: %s", self.settings_file, exc)
        log.info("HA settings: %s", settings.model_dump(exclude={"peers"}))


def _peer_out(seen: _Seen, now: float) -> HaPeerOut:
    return HaPeerOut(
        age_s=round(now - seen.changed, 2), vms=seen.vms, released=seen.released,
        isolated=seen.isolated,
    )  # fmt: skip


def _read_settings(path: Path) -> HaSettingsIn:
    """The settings the last center sent (an agent that restarts keeps fencing), else off."""
    try:
        return HaSettingsIn.model_validate_json(path.read_text())
    except FileNotFoundError:
        return HaSettingsIn()
    except (OSError, ValueError) as exc:
        log.error("HA: ignoring unreadable settings %s: %s", path, exc)
        return HaSettingsIn()


def _file_name(host: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in host)


def _write_and_read(folder: Path, me: str, body: bytes) -> dict[str, bytes]:
    """Replace this host's file in ``folder`` (written whole, then renamed over: a reader never
    sees half of it), then read the others'. In a thread: any of it may hang on NFS."""
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{me}.tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"{me}.json")
    files = {}
    for path in folder.glob("*.json"):
        if path.stem == me:
            continue
        try:
            with open(path, "rb") as f:
                files[path.stem] = f.read(MAX_FILE)
        except OSError:
            continue  # being replaced, or gone: read at the next beat
    return files
