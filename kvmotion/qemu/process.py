"""QEMU processes: start (daemonized), find again after an agent restart, wait, end.

A VM must outlive its agent (an agent restart never stops a VM), so QEMU is started with
``-daemonize`` and found again through its pidfile. Liveness is checked against ``/proc``: the pid
must belong to a live (not zombie) ``qemu-system`` process whose command line carries the VM's uuid,
which guards against pid reuse. Nothing is ever killed by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from pathlib import Path
from typing import Protocol

from kvmotion.errors import QemuError
from kvmotion.qemu.cmdline import QemuLaunch, build_command

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make daemonized QEMUs our children, so that we reap them (pid 1 may not)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def process_alive(pid: int, must_contain: str | None = None) -> bool:
    """True if ``pid`` is a live QEMU (not a zombie) whose argv contains ``must_contain``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):
        _reap(pid)
        return False
    if not cmdline or b"qemu-system" not in cmdline[0]:
        return False
    return must_contain is None or any(must_contain.encode() in arg for arg in cmdline)


def read_pidfile(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


class QemuHandle(Protocol):
    """What a VM needs of its running QEMU: a :class:`QemuProcess`, or a unit test's fake."""

    pid: int

    def alive(self) -> bool: ...

    async def wait_exit(self, timeout: float | None) -> bool: ...

    async def kill(self, timeout: float = 10.0) -> None: ...


class QemuProcess:
    """A running QEMU, known by pid. Create with :meth:`start` or :meth:`find`."""

    def __init__(self, pid: int, uuid: str, pidfile: Path) -> None:
        self.pid = pid
        self.uuid = uuid
        self.pidfile = pidfile

    def __repr__(self) -> str:
        return f"QemuProcess(pid={self.pid}, uuid={self.uuid})"

    @classmethod
    async def start(cls, launch: QemuLaunch, timeout: float = 30.0) -> QemuProcess:
        """Start QEMU daemonized. Raises QemuError with exit code, argv and output on failure."""
        argv = build_command(launch)
        launch.pidfile.unlink(missing_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise QemuError(f"QEMU for {launch.name} did not start in {timeout:.0f} s") from exc
        output = out.decode(errors="replace").strip()
        pid = read_pidfile(launch.pidfile)
        if proc.returncode != 0 or pid is None or not process_alive(pid, launch.uuid):
            raise QemuError(
                f"QEMU for {launch.name} failed to start (exit {proc.returncode}): "
                f"{output or 'no output'}",
                # another QEMU holds one of its disks (maybe on another host: HA waits for it)
                code="disk_locked" if 'Failed to get "write" lock' in output else None,
                exit_code=proc.returncode,
                argv=argv,
                output=output,
            )
        log.info("started QEMU for %s: pid %d", launch.name, pid)
        return cls(pid, launch.uuid, launch.pidfile)

    @classmethod
    def find(cls, pidfile: Path, uuid: str) -> QemuProcess | None:
        """The QEMU of VM ``uuid`` still running from an earlier agent, if any."""
        pid = read_pidfile(pidfile)
        if pid is not None and process_alive(pid, uuid):
            return cls(pid, uuid, pidfile)
        return None

    def alive(self) -> bool:
        return process_alive(self.pid, self.uuid)

    async def wait_exit(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s (None: forever) for the process to end; True if it did."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            if not self.alive():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done, timeout)
            return not self.alive()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
            _reap(self.pid)

    async def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL and wait. Raises QemuError if the process survives it."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if not await self.wait_exit(timeout):
            raise QemuError(f"QEMU pid {self.pid} survived SIGKILL for {timeout:.0f} s")
