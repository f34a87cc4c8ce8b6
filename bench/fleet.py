"""A fleet: one center on PostgreSQL managing up to 1,000 simulated hosts and 10,000 VMs.

Per step (hosts x VMs per host), measured against a real center process (``kvmotion center
serve``) and a real PostgreSQL (kvmotion/lab/postgres.py), with the hosts simulated in another
process (kvmotion/lab/simserve.py: the agent's API over in-memory VMs, one port per host):
- adding every host (``POST /v1/hosts``, 8 at a time);
- the inventory refresh of the whole fleet: the center's own rounds (``refreshed N hosts in X s``
  in its log), as its refresh loop runs them every ``refresh_interval_s``;
- API latency, p50/p99 per call, under ``--clients`` web clients that poll as the web client
  does (every 5 s /v1/hosts, /v1/vms, /v1/datastores, /v1/clusters at once; a task stream held
  open; a quarter of them on the events page) and one CLI user (vm list, vm/host/task show);
- the center's CPU (seconds per second, from /proc/PID/stat) idle and under that load, and its
  memory (RSS, and its peak); the same of its poller process (center/poller.py), apart;
- ``--migrations`` concurrent live migrations (4 in 5 compute, 1 in 5 "change both") submitted
  at once through the API, under the same load, each followed to its end: every task must end
  in success.
Goals (issue 19): API p99 under 100 ms; a refresh of the whole fleet under 10 s.

Run: ``flock /tmp/kvmotion-lab.lock nice -n 5 .venv/bin/python -m bench.fleet --label after``
(``--steps 100,250,500,1000``). Writes bench/results/fleet.json (each label's steps kept) and
fleet.md. The center, PostgreSQL, the simulated hosts and this load generator share the
machine's cores: the center's CPU is its own, but it competes for the cores with the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kvmotion.lab.postgres import Postgres

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "fleet-bench-token-0123456789"
SIM_TOKEN = "fleet-sim-token"
TICKS = os.sysconf("SC_CLK_TCK")
POLL_S = 5.0  # the web client's inventory refresh (web/js/state.js REFRESH_MS)
GOAL_P99_MS = 100.0
GOAL_REFRESH_S = 10.0
REFRESH_RE = re.compile(r"refreshed (\d+) hosts in ([0-9.]+) s")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (the center's poller, center/poller.py)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_s(pid)
    return total


def memory_mib(pid: int) -> tuple[float, float]:
    """RSS now and its peak (VmHWM), MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """End a process this benchmark started, by its pid: SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class Latencies:
    by_call: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, call: str, seconds: float) -> None:
        self.by_call.setdefault(call, []).append(seconds * 1000)

    def error(self, call: str, what: str) -> None:
        self.errors.setdefault(call, []).append(what[:200])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        every = [x for xs in self.by_call.values() for x in xs]
        for call, xs in [*sorted(self.by_call.items()), ("all", every)]:
            if xs:
                out[call] = {"n": len(xs), "p50_ms": round(pct(xs, 50), 1),
                             "p99_ms": round(pct(xs, 99), 1), "max_ms": round(max(xs), 1),
                             "errors": len(self.errors.get(call, []))}  # fmt: skip
        out["errors"] = {k: v[:3] for k, v in self.errors.items()}
        return out


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


class Step:
    """One step: PostgreSQL database, the simulated hosts and a center, all started here."""

    def __init__(self, pg: Postgres, hosts: int, vms: int, args: argparse.Namespace) -> None:
        self.pg, self.n, self.m, self.args = pg, hosts, vms, args
        self.tmp = Path(tempfile.mkdtemp(prefix="kvmotion-fleet-"))
        self.db = f"fleet_{hosts}_{os.getpid()}"
        self.sim: subprocess.Popen[bytes] | None = None
        self.center: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.ports: list[int] = []
        self.log_path = self.tmp / "center.log"
        self.stop_load = asyncio.Event()
        self.added = hosts  # how many the center took

    def start(self) -> None:
        python = sys.executable
        ready = self.tmp / "sim.json"
        with open(self.tmp / "sim.log", "wb") as err:  # the child keeps its own copy
            self.sim = subprocess.Popen(
                [python, "-m", "kvmotion.lab.simserve", "--hosts", str(self.n),
                 "--vms-per-host", str(self.m), "--token", SIM_TOKEN, "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.sim.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the simulated fleet did not start: {self.tail('sim.log')}")
            time.sleep(0.1)
        self.ports = [h["port"] for h in json.loads(ready.read_text())["hosts"]]
        db_url = self.pg.create_database(self.db)
        port = free_port()
        # Plain HTTP: the simulated hosts serve no TLS (the handshakes are not measured here).
        config = {"listen": "127.0.0.1", "port": port, "db_url": db_url, "token": TOKEN,
                  "refresh_interval_s": self.args.refresh_interval,
                  "api_plaintext": True}  # fmt: skip
        (self.tmp / "center.json").write_text(json.dumps(config))
        with open(self.log_path, "wb") as err:
            self.center = subprocess.Popen(
                [python, "-m", "kvmotion", "center", "serve", "--config",
                 str(self.tmp / "center.json")],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    break
            if self.center.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the center did not start: {self.tail('center.log')}")
            time.sleep(0.2)

    def tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / name).read_text(errors="replace")[-1500:]
        return ""

    def close(self) -> None:
        stop(self.center)
        stop(self.sim)
        if self.args.keep_logs:
            keep = Path(self.args.keep_logs)
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("center.log", "sim.log"):
                if (self.tmp / name).exists():
                    (self.tmp / name).rename(keep / f"{self.n}-{name}")
        with contextlib.suppress(Exception):
            self.pg.drop_database(self.db)
        for path in sorted(self.tmp.iterdir()):
            path.unlink()
        self.tmp.rmdir()

    def client(self, connections: int = 6) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=connections),
        )  # fmt: skip

    def refresh_rounds(self) -> list[tuple[int, float]]:
        text = self.log_path.read_text(errors="replace")
        return [(int(a), float(b)) for a, b in REFRESH_RE.findall(text)]

    # -- phases ---------------------------------------------------------------------------------
    async def add_hosts(self) -> dict[str, Any]:
        started, errors = time.monotonic(), []
        queue = list(self.ports)
        async with self.client(8) as http:

            async def worker() -> None:
                while queue:
                    port = queue.pop()
                    body = {"address": "127.0.0.1", "token": SIM_TOKEN, "port": port}
                    try:
                        r = await http.post("/v1/hosts", json=body, timeout=300)
                        if r.status_code != 201:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))),
                                   self.args.cap)  # fmt: skip
            vms = len((await http.get("/v1/vms", timeout=300)).json())
            self.added = len((await http.get("/v1/hosts", timeout=300)).json())
        return {"add_s": round(time.monotonic() - started, 1), "add_errors": errors[:5],
                "add_failed": len(errors), "hosts_added": self.added, "vms_seen": vms}  # fmt: skip

    async def whole_rounds(self, count: int, after: int) -> list[float]:
        """Wait (at most ``--cap`` s) for ``count`` refresh rounds of the whole fleet past the
        first ``after`` rounds; their durations."""
        deadline = time.monotonic() + self.args.cap
        while time.monotonic() < deadline:
            full = [s for n, s in self.refresh_rounds()[after:] if n == self.added]
            if len(full) >= count:
                return full[:count]
            await asyncio.sleep(0.5)
        return [s for n, s in self.refresh_rounds()[after:] if n == self.added]

    async def web_client(self, lat: Latencies, events_page: bool) -> None:
        async with self.client() as http:
            await asyncio.sleep(random.uniform(0, POLL_S))
            stream = asyncio.create_task(self._stream(http, lat))
            try:
                while not self.stop_load.is_set():
                    t0 = time.monotonic()
                    calls = ["/v1/hosts", "/v1/vms", "/v1/datastores", "/v1/clusters"]
                    if events_page:
                        calls.append("/v1/events?limit=300")
                    await asyncio.gather(*(self._get(http, lat, c) for c in calls))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, POLL_S - (time.monotonic() - t0))):
                            await self.stop_load.wait()
            finally:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream

    async def _stream(self, http: httpx.AsyncClient, lat: Latencies) -> None:
        t0 = time.monotonic()
        try:
            async with http.stream("GET", "/v1/tasks-stream?limit=30", timeout=None) as r:
                lat.add("GET /v1/tasks-stream (headers)", time.monotonic() - t0)
                async for _ in r.aiter_lines():
                    pass
        except httpx.HTTPError as exc:
            lat.error("GET /v1/tasks-stream (headers)", repr(exc))

    async def _get(self, http: httpx.AsyncClient, lat: Latencies, path: str) -> None:
        """One call, timed to its whole answer read. Not parsed: each web client parses in its
        own browser, and 20 clients' 7 MB VM lists parsed here would slow this one process's
        timing of every call."""
        label = "GET " + re.sub(r"/(vm|sim)-[0-9-]+", "/{name}", path.split("?")[0])
        label = re.sub(r"/tasks/\d+", "/tasks/{id}", label)
        t0 = time.monotonic()
        try:
            r = await http.get(path)
        except httpx.HTTPError as exc:
            lat.error(label, repr(exc))
            return
        lat.add(label, time.monotonic() - t0)
        if r.status_code != 200 and r.status_code != 404:  # a 404 is an answer (no such task)
            lat.error(label, f"{r.status_code} {r.text[:100]}")

    async def cli_user(self, lat: Latencies) -> None:
        """`kvmotion vm list`, `vm show`, `host show`, `task list`, `task show`, once a second."""
        rnd = random.Random(7)
        async with self.client(2) as http:
            i = 0
            while not self.stop_load.is_set():
                vm = f"vm-{rnd.randrange(self.n):04d}-{rnd.randrange(self.m):02d}"
                host = f"sim-{rnd.randrange(self.n):04d}"
                path = [f"/v1/vms/{vm}", f"/v1/hosts/{host}", "/v1/tasks?limit=50", "/v1/vms",
                        "/v1/tasks/1"][i % 5]  # fmt: skip
                i += 1
                await self._get(http, lat, path)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.stop_load.wait()

    async def migrations(self, count: int) -> dict[str, Any]:
        """``count`` migrations at once, each between two hosts of one group (they share its
        datastore); every fifth a "change both" onto the destination's local datastore."""
        pairs = [(2 * k * (self.n // (2 * count)), 2 * k * (self.n // (2 * count)) + 1)
                 for k in range(count)]  # fmt: skip
        started = time.monotonic()
        async with self.client(count) as http:

            async def one(k: int, src: int, dst: int) -> dict[str, Any]:
                vm = f"vm-{src:04d}-00"
                both = k % 5 == 4
                body: dict[str, Any] = {"type": "both" if both else "compute",
                                        "host": f"sim-{dst:04d}"}  # fmt: skip
                if both:
                    body["datastore"] = f"local-{dst:04d}"
                t0 = time.monotonic()
                r = await http.post(f"/v1/vms/{vm}/migrate", json=body)
                submit_ms = (time.monotonic() - t0) * 1000
                if r.status_code != 202:
                    return {"vm": vm, "state": f"refused {r.status_code}", "error": r.text[:200]}
                task = r.json()
                while task["state"] not in ("success", "error", "cancelled"):
                    if time.monotonic() - t0 > self.args.cap:
                        break
                    await asyncio.sleep(1.0)
                    task = (await http.get(f"/v1/tasks/{task['id']}")).json()
                where = (await http.get(f"/v1/vms/{vm}")).json()["host"]
                return {"vm": vm, "type": body["type"], "state": task["state"],
                        "error": task.get("error"), "submit_ms": round(submit_ms),
                        "task_s": round(time.monotonic() - t0, 2),
                        "moved": where == f"sim-{dst:04d}"}  # fmt: skip

            rows = await asyncio.gather(*(one(k, s, d) for k, (s, d) in enumerate(pairs)))
        ok = [r for r in rows if r["state"] == "success" and r.get("moved")]
        return {
            "count": count, "success": len(ok), "wall_s": round(time.monotonic() - started, 1),
            "task_s_p50": statistics.median(r["task_s"] for r in ok) if ok else None,
            "task_s_max": max(r["task_s"] for r in ok) if ok else None,
            "submit_ms_p50": statistics.median(r["submit_ms"] for r in ok) if ok else None,
            "submit_ms_max": max(r["submit_ms"] for r in ok) if ok else None,
            "failures": [r for r in rows if r not in ok][:5],
        }  # fmt: skip

    async def measure(self) -> dict[str, Any]:
        assert self.center is not None and self.sim is not None
        row: dict[str, Any] = {"hosts": self.n, "vms": self.n * self.m}
        row |= await self.add_hosts()
        added_rounds = len(self.refresh_rounds())
        # The first round that starts after the last host was added; then the next one.
        rounds = await self.whole_rounds(2, added_rounds)
        row["refresh_idle_s"] = rounds
        pid = self.center.pid
        poller = children(pid)  # started at its first refresh: there by now
        c0, p0, t0 = cpu_s(pid), tree_cpu_s(poller), time.monotonic()
        await asyncio.sleep(self.args.idle)
        row["center_cpu_idle"] = round((cpu_s(pid) - c0) / (time.monotonic() - t0), 3)
        row["poller_cpu_idle"] = round((tree_cpu_s(poller) - p0) / (time.monotonic() - t0), 3)
        row["rss_idle_mib"] = round(memory_mib(pid)[0])
        lat = Latencies()
        clients = [asyncio.create_task(self.web_client(lat, i % 4 == 0))
                   for i in range(self.args.clients)]  # fmt: skip
        clients.append(asyncio.create_task(self.cli_user(lat)))
        before_load = len(self.refresh_rounds())
        c0, s0, t0 = cpu_s(pid), cpu_s(self.sim.pid), time.monotonic()
        p0 = tree_cpu_s(poller)
        await asyncio.sleep(self.args.load)
        wall = time.monotonic() - t0
        row["center_cpu_load"] = round((cpu_s(pid) - c0) / wall, 3)
        row["poller_cpu_load"] = round((tree_cpu_s(poller) - p0) / wall, 3)
        row["sim_cpu_load"] = round((cpu_s(self.sim.pid) - s0) / wall, 3)
        row["api"] = lat.summary()
        row["refresh_load_s"] = [
            s for n, s in self.refresh_rounds()[before_load:] if n == self.added
        ]
        mig_lat = Latencies()
        lat.by_call, lat.errors = mig_lat.by_call, mig_lat.errors  # the load goes on, apart
        count = min(self.args.migrations, self.n // 2)
        row["migrations"] = await self.migrations(count)
        row["api_during_migrations"] = mig_lat.summary()
        self.stop_load.set()
        await asyncio.gather(*clients, return_exceptions=True)
        rss, peak = memory_mib(pid)
        row |= {"rss_mib": round(rss), "rss_peak_mib": round(peak)}
        with contextlib.suppress(OSError):
            row["poller_rss_peak_mib"] = round(sum(memory_mib(p)[1] for p in poller))
        return row


async def run_step(pg: Postgres, hosts: int, args: argparse.Namespace) -> dict[str, Any]:
    step = Step(pg, hosts, args.vms_per_host, args)
    try:
        step.start()
        return await step.measure()
    except (TimeoutError, RuntimeError, httpx.HTTPError) as exc:
        return {"hosts": hosts, "vms": hosts * args.vms_per_host, "broke": repr(exc)[:500],
                "refresh_s": step.refresh_rounds() if step.log_path.exists() else []}  # fmt: skip
    finally:
        step.close()


def summary_line(row: dict[str, Any]) -> dict[str, Any]:
    api = row.get("api", {}).get("all", {})
    rounds = row.get("refresh_idle_s", []) + row.get("refresh_load_s", [])
    mig = row.get("migrations", {})
    return {
        "hosts": row["hosts"], "vms": row["vms"],
        "add_s": row.get("add_s"),
        "refresh_s": max(rounds) if rounds else None,
        "api_p50_ms": api.get("p50_ms"), "api_p99_ms": api.get("p99_ms"),
        "cpu_idle": row.get("center_cpu_idle"), "cpu_load": row.get("center_cpu_load"),
        "rss_mib": row.get("rss_peak_mib"),
        "poller": (f" (poller: {row['poller_cpu_idle']} / {row['poller_cpu_load']}, "
                   f"{row.get('poller_rss_peak_mib')} MiB)" if "poller_cpu_load" in row else ""),
        "migrations": f"{mig.get('success')}/{mig.get('count')}" if mig else None,
        "broke": row.get("broke"),
    }  # fmt: skip


FINDINGS = """\
The machine: 2 cores, 24 GiB. The center, PostgreSQL, the simulated hosts (one process) and this
load generator share the two cores: the center's CPU and memory are its own (/proc/PID), its
latencies include waiting for a core. The hosts are simulated (kvmotion/lab/simagent.py): the
center's work is real, the agents' is not.

What broke first, as the fleet grew (found while building the simulated fleet):
1. Adding hosts at once: two hosts that share a datastore new to the inventory both inserted it,
   and the second add failed (500, a unique violation on datastores.name). Fix: new datastores
   and networks are made under a lock.
2. The refresh: one host after another, each reading every VM of the inventory and rewriting
   every VM it reported: O(hosts x VMs) per round (18 hosts: 2.5 s). Fix: a host's records are
   read in one query, only changed records are written, 8 hosts are refreshed at once.
3. A cluster's and a host's description read every VM record to list names. Fix: names only.

Then, measured by this benchmark (the "before" rows: the center as it was at 8efa38c):
4. At 250 hosts the center's one core was full (0.97 cores) under the 20 web clients' polls:
   API p50 2.0 s, p99 9.3 s. A profile (py-spy) showed it rebuilding the whole VM list for almost
   every request: the list was kept until any VM or host was written, and each refresh round
   writes every host (last seen). Loading a VM also loaded its host's facts, and a host its
   datastores. Fix: each VM's and host's encoded record is kept until that record is written
   (db.Changes, told at commit; inventory.Kept), concurrent requests share one read, and hosts'
   datastores load only when asked.
5. At 500 hosts the database pool ran dry ("QueuePool limit of size 10 overflow 10 reached")
   while requests held connections waiting for the core, and the step broke; at 1,000 too.
6. Submitting a migration took 17-27 s at 250-500 hosts: its precheck's placement rules read
   every VM with its host's facts. Fix: where VMs run, read by name. HA turned off read every
   host's facts every second; a cluster's description read every host. Fix: the hosts HA still
   says are on; each host's EVC modes kept per write of the host.
7. GET /v1/datastores loaded a datastore per host with its hosts as records: a third of the
   center's CPU at 1,000 hosts. Fix: plain rows.
8. A poll sent as uvicorn closed its 5 s keep-alive ("Server disconnected without sending a
   response"): the center now keeps idle connections 65 s, longer than its clients.
9. The refresh wrote each host's datastores under the lock of point 1, one host after another:
   12.9 s a round at 1,000 hosts. Fix: the lock only to make a new datastore or network.
What was left then (the "after" rows): API p99 524 ms, refresh 14.1 s at 1,000 hosts.

Then (issue 19 part 5; the "after refresh fixes" rows):
10. Each refresh round wrote every host (last seen, connection, facts) and its datastores, read
    each host's record five times and each host's VMs with their hosts' records: ten
    statements and five sessions per host, 10,000 a round. Each host write also made the kept
    host records stale, so the host list and the clusters' descriptions read and encoded every
    host again after every round. Fix: a host that answers with the facts this center last
    wrote is not written (its datastores only when what it says of them changed); when each
    host was last seen is kept in memory, written for all hosts in one statement a round
    outside the kept records' watch, and spliced into the answers; a host whose agent lists
    the VMs it listed when they last agreed, with no VM written since, is not compared again.
    A round of 1,000 unchanged hosts: 4 statements (measured in one process, the agents over
    an ASGI transport: 0.67 s CPU a round; before, 300 hosts took 2.1 s).
11. GET /v1/datastores read 1,100 datastores and 2,000 links, and each cluster's description
    10,000 VM names, per request. Fix: both kept until a datastore, host or VM is written;
    GET /v1/clusters kept encoded.
12. With the database's work gone, a round waited on the agents' round trips, 8 hosts at a
    time (6.4 s for 1,000 hosts with no API load). Fix: 32 hosts at once at the agents, 8 of
    them at once at the database (2.5 s, then bound by the center's CPU: about 1 ms per agent
    call, two a host, in the HTTP client).
What was left then (the "after refresh fixes" rows): API p99 178-244 ms at 1,000 hosts, 1.7-2.0 s
during the 50 migrations. The simulated hosts' facts never change; a real host's available
memory does, so a real fleet's round writes most hosts' records (two statements each; in one
process, 1,000 hosts changed each round: 2.3 s CPU a round against 0.67 s). The garbage
collector's full passes measured 110-200 ms (in one process with the simulated agents);
gc.freeze before serving keeps what lives as long as the process out of them.

Then (the "task stream shared, hosts settled one by one" rows):
13. Where the tail comes from, seen from outside: a probe process asking small calls (a task,
    a VM) every 0.1 s beside the load, and py-spy on the center (250 samples a second). Under
    the poll load alone the probe's p50 was 4 ms; its spikes (90-150 ms) fell within refresh
    rounds, when the center's event loop was 80-92 % busy (the round's HTTP client, and its
    answers decoded and fingerprinted: about 2 ms of the loop per host), against 5-15 %
    between rounds. Tried and not kept: the round's questions to the agents on a thread of
    their own, with its own event loop. The API's p99 did not move (184 ms) and rounds grew
    from 2.5 to 3-3.8 s: Python's interpreter lock, handed over every 5 ms, turned each of a
    request's waits for I/O into a wait for the lock.
14. During the 50 migrations the probe waited 140 ms at p50 and up to 1.5 s, the loop 95-99 %
    busy: each of the 20 web clients' task streams read every changed task from the database
    itself (50 migrations' figures, 20 reads of each change); every VM written made every
    host's next refresh compare all its VMs again (10,000 records loaded a round); each
    migration's precheck read where all 10,000 VMs run, with no placement rule to check; and
    every host list asked the database for each host's latest maintenance task. Fix: a
    changed task is read and encoded once for all streams (TaskStore.shown); a VM written
    makes only the hosts that compared it, and the host it is on now, compare again; where
    VMs run is read only if a rule exists; the latest maintenance tasks are kept until this
    center makes one. At 1,000 hosts: p99 during the migrations 2.0 s -> 0.71 s (p50 155 ->
    48 ms), submit p50 2.6 -> 1.1 s; under the poll load alone p99 244 -> 115 ms.
What was left then: the goal (p99 under 100 ms) was met up to 500 hosts, not at 1,000 (115
ms): the refresh round ran on the API's event loop, about 2 ms of it per host.

Then (the "the refresh in a poller process" rows):
15. The refresh's questions to the agents are asked by a process of the center's own
    (center/poller.py), with its own HTTP clients and the center's CA and certificate. It
    sends the center one line of JSON per host: the facts, the VM list's fingerprint, and the
    list only when the fingerprint is not the one the center last agreed with. The center's
    event loop keeps the comparison and the writes. At 1,000 hosts: API p99 under the poll
    load 115 -> 55 ms (p50 18 -> 14 ms), 0.71 -> 0.37 s during the 50 migrations; the
    center's CPU under load 0.38 -> 0.07 cores, its poller's 0.27 (on the other core). In a
    run at 1,000 hosts alone with the probe of point 13 beside it: the probe's p99 under the
    poll load 119 -> 31 ms.
What is left: the goals are met at every step (API p99 27-55 ms, refresh 0.3-4.7 s, the worst
being the first round after 1,000 hosts were added, which compares every host). During the 50
migrations p99 is 0.25-0.6 s: their own calls (precheck, the agents' long-polls, task writes)
share the loop. The simulated hosts' facts never change; a real host's available memory does:
then each round writes most hosts' records (two statements each) on the center's loop. The web
client still polls whole lists every 5 s; pushing inventory changes on the task stream would
spare most of those reads. The fleet's center is plaintext (the simulated hosts serve no TLS):
TLS would cost the poller, not the API's loop.
"""


def report(results: dict[str, Any]) -> str:
    lines = [
        "# A fleet: one center, 1,000 simulated hosts, 10,000 VMs, on PostgreSQL",
        "",
        f"Goals: API p99 < {GOAL_P99_MS:.0f} ms; a refresh of the whole fleet < "
        f"{GOAL_REFRESH_S:.0f} s; 50 concurrent migrations, every one a success.",
        "",
        FINDINGS,
        "",
    ]
    for label, run in results.items():
        lines += [f"## {label}", "", run.get("note", ""), "",
                  f"Command: `{run['command']}`", "",
                  "| hosts | VMs | add all s | refresh s (worst) | API p50 ms | API p99 ms | "
                  "center CPU idle / load (cores) | center RSS peak MiB | migrations ok |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in run["steps"]:
            s = summary_line(row)
            if s["broke"]:
                lines.append(f"| {s['hosts']} | {s['vms']} | broke: {s['broke']} ||||||||")
                continue
            lines.append(
                f"| {s['hosts']} | {s['vms']} | {s['add_s']} | {s['refresh_s']} | "
                f"{s['api_p50_ms']} | {s['api_p99_ms']} | {s['cpu_idle']} / {s['cpu_load']}"
                f"{s['poller']} | {s['rss_mib']} | {s['migrations']} |"
            )
        lines.append("")
        for row in run["steps"]:
            if "api" not in row:
                continue
            lines += [f"Per call at {row['hosts']} hosts (under poll load; then during the "
                      "migrations):", "",
                      "| call | n | p50 ms | p99 ms | max ms | errors | p99 ms in migrations |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            during = row.get("api_during_migrations", {})
            for call, v in row["api"].items():
                if call == "errors":
                    continue
                d = during.get(call, {})
                lines.append(
                    f"| {call} | {v['n']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} | "
                    f"{v['errors']} | {d.get('p99_ms', '')} |"
                )
            mig = row["migrations"]
            lines += ["", f"Migrations: {mig['success']}/{mig['count']} succeeded in "
                      f"{mig['wall_s']} s (task p50 {mig['task_s_p50']} s, max "
                      f"{mig['task_s_max']} s; submit p50 {mig['submit_ms_p50']} ms, max "
                      f"{mig['submit_ms_max']} ms). Refresh rounds (s): idle "
                      f"{row['refresh_idle_s']}, under load {row['refresh_load_s']}.",
                      ""]  # fmt: skip
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with Postgres() as pg:
        for hosts in [int(x) for x in args.steps.split(",")]:
            row = await run_step(pg, hosts, args)
            print(json.dumps(summary_line(row)), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", default="100,250,500,1000")
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--load", type=float, default=30.0, help="seconds of poll load")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle, for CPU")
    parser.add_argument("--migrations", type=int, default=50)
    parser.add_argument("--refresh-interval", type=float, default=5.0)
    parser.add_argument("--cap", type=float, default=600.0, help="seconds any phase may take")
    parser.add_argument("--keep-logs", default="", help="a folder for the center's logs")
    parser.add_argument("--label", default="run")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=str(RESULTS / "fleet"))
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    rows = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    command = "flock /tmp/kvmotion-lab.lock nice -n 5 .venv/bin/python -m bench.fleet " + " ".join(
        sys.argv[1:]
    )
    results[args.label] = {"command": command, "note": args.note, "steps": rows}
    path.write_text(json.dumps(results, indent=2))
    text = report(results)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
