"""The agent's load sampler: a VM's CPU and memory from /proc, averaged over the window asked
for; a restarted QEMU starts over; a VM that left is forgotten; and a real busy process reads
as busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kvmotion.host.load import PAGE, TICKS, LoadSampler, read_process


def fake_proc(root: Path, pid: int, cpu_s: float, rss_mib: int) -> None:
    ticks = int(cpu_s * TICKS)
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    # the name holds a space and a parenthesis, as a process may name itself
    fields = ["S"] + ["0"] * 10 + [str(ticks // 2), str(ticks - ticks // 2)] + ["0"] * 30
    (root / str(pid) / "stat").write_text(f"{pid} (qemu (x) 1) " + " ".join(fields) + "\n")
    (root / str(pid) / "statm").write_text(f"1000 {rss_mib * 2**20 // PAGE} 0 0 0 0 0\n")


def host_stat(root: Path, busy: int, idle: int) -> None:
    (root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0\n")


def test_a_vm_load_is_averaged_over_the_window(tmp_path: Path) -> None:
    pids = {"web1": 100}
    sampler = LoadSampler(lambda: dict(pids), proc=tmp_path)
    for step, (cpu_s, rss) in enumerate([(0.0, 100), (1.0, 200), (4.0, 300), (7.0, 300)]):
        fake_proc(tmp_path, 100, cpu_s, rss)
        host_stat(tmp_path, busy=100 * step, idle=100 * step)
        sampler.sample(now=10.0 * step)
    whole = sampler.report(window_s=60, cpus=2, memory_available_bytes=2**30, now=30.0)
    assert whole.vms["web1"].cpu == round(7.0 / 30, 4)
    assert whole.vms["web1"].memory_mib == 225.0 and whole.vms["web1"].samples == 4
    assert whole.host_cpu_busy == 0.5 and whole.memory_available_mib == 1024
    recent = sampler.report(window_s=20, cpus=2, memory_available_bytes=0, now=30.0)
    assert recent.vms["web1"].cpu == round(6.0 / 20, 4)  # the last 20 s only
    assert sampler.report(window_s=5, cpus=2, memory_available_bytes=0, now=30.0).vms == {}


def test_a_restarted_qemu_starts_over_and_a_vm_that_left_is_forgotten(tmp_path: Path) -> None:
    pids = {"web1": 100}
    sampler = LoadSampler(lambda: dict(pids), proc=tmp_path)
    fake_proc(tmp_path, 100, 50.0, 100)
    sampler.sample(now=0.0)
    pids["web1"] = 101  # powered off and on: a new process, its time from zero
    fake_proc(tmp_path, 101, 0.0, 100)
    sampler.sample(now=10.0)
    fake_proc(tmp_path, 101, 1.0, 100)
    sampler.sample(now=20.0)
    report = sampler.report(window_s=60, cpus=1, memory_available_bytes=0, now=20.0)
    assert report.vms["web1"].cpu == 0.1 and report.vms["web1"].samples == 2
    del pids["web1"]
    sampler.sample(now=30.0)
    assert sampler.report(window_s=60, cpus=1, memory_available_bytes=0, now=30.0).vms == {}


def test_a_busy_process_reads_as_busy() -> None:
    spin = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        sampler = LoadSampler(lambda: {"busy": proc.pid})
        sampler.sample()
        time.sleep(1.0)
        sampler.sample()
        report = sampler.report(window_s=60, cpus=os.cpu_count() or 1, memory_available_bytes=0)
        assert report.vms["busy"].cpu > 0.5, report  # about one core
        assert report.vms["busy"].memory_mib > 1
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert read_process(proc.pid) is None  # reaped: gone from /proc
