"""A throwaway PostgreSQL server for tests, benchmarks and the lab.

`initdb` into a fresh folder, then `postgres` listening on a Unix socket in that folder and on
no TCP address at all: nothing outside the machine can reach it, and it reaches nothing. Run as
the `postgres` user when started as root (PostgreSQL refuses root). Stopped by its pid; the
folder is removed with it.

Production centers use a real PostgreSQL (docs/center-ha.md); this is for the machine the tests
run on, where Debian's `postgresql` package provides the binaries (`./run` installs it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from kvmotion.errors import KvmotionError

START_TIMEOUT_S = 60.0


def binaries() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise KvmotionError(
        "no PostgreSQL server is installed (initdb not found)",
        code="postgres_missing",
        fix="install Debian's postgresql package (./run setup does)",
    )


def available() -> bool:
    try:
        binaries()
    except KvmotionError:
        return False
    return True


class Postgres:
    """One PostgreSQL server in a folder of its own; a context manager."""

    def __init__(self, folder: Path | None = None) -> None:
        self.bin = binaries()
        self._made_folder = folder is None
        self.folder = folder or Path(tempfile.mkdtemp(prefix="kvmotion-pg-"))
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "run"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy URL (asyncpg) for a database on this server, over its socket."""
        return f"postgresql+asyncpg://{self.user}@/{database}?host={self.socket_dir}"

    def _as_owner(self) -> dict[str, Any]:
        """How to run as PostgreSQL's owner: the `postgres` user when we are root."""
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam("postgres")
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def start(self) -> Postgres:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        owner = self._as_owner()
        for path in (self.folder, self.socket_dir) if owner else ():
            os.chown(path, owner["user"], owner["group"])
        log = self.folder / "postgres.log"
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True, capture_output=True, timeout=START_TIMEOUT_S, **self._as_owner(),  # type: ignore[call-overload]
        )  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.socket_dir),
                 "-c", "listen_addresses=", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=300"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                **self._as_owner(),  # type: ignore[call-overload]
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                self.stop()
                raise KvmotionError(f"PostgreSQL did not start: {tail}", code="postgres_start")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        ready = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", str(self.socket_dir), "-U", self.user],
            capture_output=True, timeout=10,
        )  # fmt: skip
        return ready.returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [str(self.bin / "psql"), "-h", str(self.socket_dir), "-U", self.user, "-d", database,
             "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise KvmotionError(f"psql: {done.stderr.strip()}", code="postgres_sql")
        return done.stdout

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (copied from `template` if given); its URL."""
        copy = f' TEMPLATE "{template}"' if template else ""
        self.psql(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGQUIT: immediate shutdown (the data is thrown away anyway)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGQUIT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self._made_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()
