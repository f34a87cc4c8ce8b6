"""What each running VM on this host uses, sampled every few seconds and averaged over a window
the caller chooses (minutes, for balancing: migration/balance.py).

Read from ``/proc`` as ``top`` does, for the VM's QEMU process: CPU is its user and system time
(every thread: vCPUs, I/O, the main loop), memory its resident set. The host's own figures come
along for display (its CPUs busy, from ``/proc/stat``, and its memory available), but balancing
uses the VMs' sums: a host's other work is not the balancer's to move, and in the lab every
"host" shares one kernel, whose ``/proc/stat`` is the same for all of them.

A VM whose QEMU restarted (another pid) starts its samples again; a VM that left is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmotion.host.protocol import HostLoadOut, VmLoadOut

log = logging.getLogger(__name__)

SAMPLE_S = 5.0
KEEP_S = 900.0  # the longest window asked for (15 minutes)
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class _Sample:
    at: float
    cpu_s: float  # the process's user + system time so far
    rss_bytes: int


def read_process(pid: int, proc: Path = Path("/proc")) -> tuple[float, int] | None:
    """(CPU seconds used so far, resident bytes) of a process; None once it is gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        statm = (proc / str(pid) / "statm").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / TICKS, int(statm.split()[1]) * PAGE


def read_host_cpu(proc: Path = Path("/proc")) -> tuple[float, float]:
    """(busy, total) jiffies of every CPU, from /proc/stat's first line."""
    values = [float(v) for v in (proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle and iowait
    return sum(values) - idle, sum(values)


class LoadSampler:
    """Samples of each running VM (by name), kept for ``keep_s``."""

    def __init__(
        self,
        pids: Callable[[], dict[str, int]],
        interval_s: float = SAMPLE_S,
        keep_s: float = KEEP_S,
        proc: Path = Path("/proc"),
    ) -> None:
        self.pids, self.interval_s, self.keep_s, self.proc = pids, interval_s, keep_s, proc
        self._vms: dict[str, tuple[int, deque[_Sample]]] = {}
        self._host: deque[tuple[float, float, float]] = deque()  # (at, busy, total)

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        running = self.pids()
        for name in set(self._vms) - set(running):
            del self._vms[name]
        for name, pid in running.items():
            read = read_process(pid, self.proc)
            if read is None:
                self._vms.pop(name, None)
                continue
            known = self._vms.get(name)
            if known is None or known[0] != pid:
                known = self._vms[name] = (pid, deque())
            samples = known[1]
            samples.append(_Sample(now, *read))
            while samples and samples[0].at < now - self.keep_s:
                samples.popleft()
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._host.append((now, *read_host_cpu(self.proc)))
        while self._host and self._host[0][0] < now - self.keep_s:
            self._host.popleft()

    def report(
        self, window_s: float, cpus: int, memory_available_bytes: int, now: float | None = None
    ) -> HostLoadOut:
        """Averages over the last ``window_s`` seconds (or what has been sampled of them)."""
        now = time.monotonic() if now is None else now
        since = now - window_s
        vms = {}
        for name, (_, samples) in self._vms.items():
            inside = [s for s in samples if s.at >= since]
            if len(inside) < 2:
                continue  # one sample says nothing of a rate yet
            first, last = inside[0], inside[-1]
            vms[name] = VmLoadOut(
                cpu=round(max(last.cpu_s - first.cpu_s, 0.0) / (last.at - first.at), 4),
                memory_mib=round(sum(s.rss_bytes for s in inside) / len(inside) / 2**20, 1),
                seconds=round(last.at - first.at, 1),
                samples=len(inside),
            )
        host = [h for h in self._host if h[0] >= since]
        busy = None
        if len(host) >= 2 and host[-1][2] > host[0][2]:
            busy = round((host[-1][1] - host[0][1]) / (host[-1][2] - host[0][2]), 4)
        return HostLoadOut(
            window_s=window_s,
            interval_s=self.interval_s,
            cpus=cpus,
            host_cpu_busy=busy,
            memory_available_mib=memory_available_bytes // 2**20,
            vms=vms,
        )

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled."""
        while True:
            try:
                self.sample()
            except Exception:  # one bad read must not end the sampling
                log.exception("sampling the VMs' load failed")
            await asyncio.sleep(self.interval_s)
