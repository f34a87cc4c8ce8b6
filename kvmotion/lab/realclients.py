"""Real users of a real server VM, from the lab's client namespace: Debian's own ssh, wrk and
pgbench, none of them ours. What each saw is parsed from its own output.

- :class:`SshTicker`: an interactive SSH session whose remote shell prints a line every 10 ms;
  the longest pause between lines is what its user saw.
- :func:`run_wrk`: HTTP load against the guest's nginx; requests/s, errors, non-2xx, the worst
  latency (the longest stall a request met).
- :func:`run_pgbench`: TPC-B-like transactions against the guest's PostgreSQL; transactions
  done and failed; :func:`count_history` then counts what the database kept.

Every one is bounded in time, and its process is ended by its pid.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmotion.errors import LabError
from kvmotion.lab import netns, postgres

SSH_OPTIONS = (
    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=0",
)  # fmt: skip
PG_ENV = {"PGPASSWORD": "bench", "PGCONNECT_TIMEOUT": "10", "PATH": "/usr/bin:/bin"}
PGBENCH = str(postgres.binaries() / "pgbench") if postgres.available() else "pgbench"
PSQL = "/usr/bin/psql"


def in_client(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def ssh_argv(ns: str, key: Path, user: str, address: str, command: str) -> list[str]:
    return in_client(ns, ["ssh", *SSH_OPTIONS, "-i", str(key), f"{user}@{address}", command])


def ssh_run(ns: str, key: Path, user: str, address: str, command: str, timeout: float) -> str:
    """Run ``command`` in the guest over SSH; its output. Raises LabError if it fails."""
    try:
        done = subprocess.run(
            ssh_argv(ns, key, user, address, command),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"ssh {user}@{address} {command!r} took over {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise LabError(f"ssh {user}@{address} {command!r}: {done.stderr.strip()[-300:]}")
    return done.stdout


def wait_ssh(ns: str, key: Path, user: str, address: str, timeout: float) -> float:
    """Until SSH lets ``user`` in with ``key``; seconds it took. LabError at ``timeout``."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            ssh_run(ns, key, user, address, "true", timeout=30)
            return time.monotonic() - start
        except LabError as exc:
            last = exc.message
            time.sleep(2)
    raise LabError(f"no SSH login to {user}@{address} in {timeout:.0f} s: {last}")


@dataclass
class SshTicker:
    """An SSH session whose remote shell prints the time every 10 ms (at most ``seconds``)."""

    ns: str
    key: Path
    user: str
    address: str
    seconds: int = 900
    lines: int = 0
    max_gap_s: float = 0.0
    _proc: subprocess.Popen[str] | None = None
    _thread: threading.Thread | None = None
    _last: float = field(default=0.0)

    def start(self) -> SshTicker:
        count = self.seconds * 100
        # bash's own 10 ms wait (a read that times out on a pipe nobody writes): no process
        # started per line, so the pace is the guest's, not fork's under TCG
        command = (
            "bash -c 'exec 3<> <(:); "
            f"for ((i=0;i<{count};i++)); do echo $i; read -t 0.01 -u 3; done'"
        )
        self._proc = subprocess.Popen(
            ssh_argv(self.ns, self.key, self.user, self.address, command),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, name="ssh-ticker", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for _line in self._proc.stdout:
            now = time.monotonic()
            if self.lines:
                self.max_gap_s = max(self.max_gap_s, now - self._last)
            self._last = now
            self.lines += 1

    def wait_lines(self, count: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.lines < count:
            if time.monotonic() > end or not self.alive:
                raise LabError(f"the SSH session printed {self.lines} lines, not {count}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            netns.terminate(self._proc.pid, grace=2.0)
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    socket_errors: int
    non_2xx: int
    max_latency_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if done is None:
        raise LabError(f"wrk said nothing it did: {text[-300:]!r}")
    seconds = float(done.group(2)) * _UNITS[done.group(3)] / 1000
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    latency = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)", text)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=seconds,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        max_latency_ms=float(latency.group(1)) * _UNITS[latency.group(2)] if latency else 0.0,
    )


def wrk_argv(ns: str, url: str, seconds: int, connections: int = 4) -> list[str]:
    # A request may wait out a whole switchover: a timeout far above any pause we accept.
    return in_client(
        ns, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", url]
    )


def run_wrk(ns: str, url: str, seconds: int, connections: int = 4) -> WrkResult:
    done = subprocess.run(
        wrk_argv(ns, url, seconds, connections),
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    if done.returncode != 0:
        raise LabError(f"wrk failed: {done.stderr.strip()[-300:]}")
    return parse_wrk(done.stdout)


@dataclass(frozen=True)
class PgbenchResult:
    processed: int
    failed: int
    tps: float


def parse_pgbench(text: str) -> PgbenchResult:
    processed = re.search(r"number of transactions actually processed: (\d+)", text)
    if processed is None:
        raise LabError(f"pgbench said nothing it did: {text[-400:]!r}")
    failed = re.search(r"number of failed transactions: (\d+)", text)
    tps = re.search(r"tps = ([\d.]+)", text)
    return PgbenchResult(
        int(processed.group(1)),
        int(failed.group(1)) if failed else 0,
        float(tps.group(1)) if tps else 0.0,
    )


def pgbench_argv(ns: str, address: str, *args: str) -> list[str]:
    return in_client(ns, [PGBENCH, "-h", address, "-U", "bench", *args, "bench"])


def pg_env() -> dict[str, str]:
    return dict(PG_ENV)


def run_pgbench(ns: str, address: str, *args: str, timeout: float) -> str:
    done = subprocess.run(
        pgbench_argv(ns, address, *args), capture_output=True, text=True,
        timeout=timeout, env=pg_env(),
    )  # fmt: skip
    if done.returncode != 0:
        raise LabError(f"pgbench {' '.join(args)} failed: {(done.stdout + done.stderr)[-400:]}")
    return done.stdout + done.stderr


def count_history(ns: str, address: str) -> int:
    """Rows of pgbench_history: one per transaction PostgreSQL committed."""
    done = subprocess.run(
        in_client(ns, [PSQL, "-h", address, "-U", "bench", "-At", "-c",
                       "select count(*) from pgbench_history", "bench"]),
        capture_output=True, text=True, timeout=60, env=pg_env(),
    )  # fmt: skip
    if done.returncode != 0:
        raise LabError(f"psql failed: {done.stderr.strip()[-300:]}")
    return int(done.stdout.strip())


@dataclass(frozen=True)
class Slice:
    start: float  # time.time() when this run began
    end: float
    output: str
    ok: bool


class Repeat:
    """Run a client command again and again (each a short, whole run that reports for itself)
    in a thread until :meth:`stop`, keeping each run's output and time. At most
    ``max_runs`` runs; each bounded by ``run_timeout``."""

    def __init__(
        self, argv: list[str], *, env: dict[str, str] | None = None, run_timeout: float = 60,
        max_runs: int = 2000,
    ) -> None:  # fmt: skip
        self.argv, self.env, self.run_timeout, self.max_runs = argv, env, run_timeout, max_runs
        self.slices: list[Slice] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"repeat {argv[4]}", daemon=True)

    def start(self) -> Repeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        for _ in range(self.max_runs):
            if self._stop.is_set():
                return
            start = time.time()
            try:
                done = subprocess.run(
                    self.argv, capture_output=True, text=True, timeout=self.run_timeout,
                    env=self.env,
                )  # fmt: skip
                ok, output = done.returncode == 0, done.stdout + done.stderr
            except subprocess.TimeoutExpired as exc:
                ok, output = False, f"timed out after {exc.timeout} s"
            self.slices.append(Slice(start, time.time(), output, ok))

    def stop(self) -> list[Slice]:
        self._stop.set()
        self._thread.join(timeout=self.run_timeout + 10)
        return list(self.slices)


def wait_port(ns: str, address: str, port: int, timeout: float) -> float:
    """Until a TCP connection to ``address:port`` from ``ns`` succeeds (a service up in the
    guest); seconds it took. LabError at ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            netns.connect_in_netns(ns, address, port, timeout=2.0).close()
            return time.monotonic() - start
        except (OSError, LabError):
            time.sleep(1)
    raise LabError(f"nothing listens on {address}:{port} after {timeout:.0f} s")


def wait_postgres(ns: str, address: str, timeout: float) -> float:
    """Until PostgreSQL in the guest accepts the bench user's queries (it listens a while
    before it is ready under TCG); seconds it took. LabError at ``timeout``."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        done = subprocess.run(
            in_client(ns, [PSQL, "-h", address, "-U", "bench", "-Atc", "select 1", "bench"]),
            capture_output=True, text=True, timeout=60, env=pg_env(),
        )  # fmt: skip
        if done.returncode == 0:
            return time.monotonic() - start
        last = done.stderr.strip()[-200:]
        time.sleep(2)
    raise LabError(f"PostgreSQL at {address} not ready after {timeout:.0f} s: {last}")


def wait_services(ns: str, address: str, timeout: float) -> None:
    """Until the server image's nginx and PostgreSQL serve (they may come up after sshd)."""
    for port in (80, 5432):
        wait_port(ns, address, port, timeout)
    wait_postgres(ns, address, timeout)
