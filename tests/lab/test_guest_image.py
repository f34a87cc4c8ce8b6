"""The guest image for real: build it, boot it under QEMU TCG, talk to guestd, check its disk.

Networking is QEMU user mode with one hostfwd on 127.0.0.1 (nothing leaves the machine).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmotion.lab.guestclient import GuestClient, PingLoop, http_get
from kvmotion.lab.image import GUEST_DIR, GuestImage, build_image, install_image
from kvmotion.lab.records import verify_records

pytestmark = pytest.mark.lab

QEMU = "qemu-system-x86_64"
READY = "KVMOTION-GUEST-READY"
PROBE = "KVMOTION-PROBE-OK"


@pytest.fixture(scope="session")
def image() -> GuestImage:
    started = time.monotonic()
    built = build_image()
    # a second call is a cache hit: no apt, no rebuild
    again_started = time.monotonic()
    assert build_image() == built
    assert time.monotonic() - again_started < 1.0
    print(f"image {built.digest[:12]} ready in {again_started - started:.1f}s")
    return built


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    serial: Path
    qmp_path: Path
    disk: Path
    port: int

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_console(self, marker: str, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if marker in self.console():
                return time.monotonic() - started
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"no {marker!r} within {timeout:.0f}s; console:\n{self.console()[-3000:]}")

    def qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            f = sock.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                for _ in range(20):  # skip events until the return
                    msg = json.loads(f.readline())
                    if "return" in msg or "error" in msg:
                        assert "error" not in msg, msg
                        break


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvmotion-guest-test-") as tmp:
        yield Path(tmp)


@contextmanager
def boot(image: GuestImage, workdir: Path, append: str) -> Iterator[Guest]:
    disk = workdir / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    port = free_port()
    serial, qmp_path = workdir / "serial.log", workdir / "qmp.sock"
    argv = [
        QEMU, "-machine", "pc-q35-7.2,accel=tcg", "-m", "256", "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", f"file:{serial}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7000",
        "-device", "virtio-net-pci,netdev=n0",
        "-drive", f"file={disk},if=none,id=d0,format=qcow2", "-device", "virtio-blk-pci,drive=d0",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    log = (workdir / "qemu.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield Guest(proc, serial, qmp_path, disk, port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_guestd_compiles_without_warnings(workdir: Path) -> None:
    flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-static", "-pthread"]
    out = subprocess.run(
        ["gcc", *flags, "-o", str(workdir / "guestd"), str(GUEST_DIR / "guestd.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_install_image(image: GuestImage, workdir: Path) -> None:
    dest = install_image(image, workdir / "images")
    assert dest == workdir / "images" / "kvmotion-guest"
    assert (dest / "vmlinuz").read_bytes() == image.kernel.read_bytes()
    assert (dest / "initrd.img").stat().st_size == image.initrd.stat().st_size
    assert install_image(image, workdir / "images") == dest  # up to date: left alone


def test_probe_prints_marker_and_powers_off(image: GuestImage, workdir: Path) -> None:
    with boot(image, workdir, "console=ttyS0 kvmotion.probe=1") as guest:
        guest.wait_console(PROBE, 60)
        assert guest.proc.wait(30) == 0
        assert READY not in guest.console()


def test_guest_end_to_end(image: GuestImage, workdir: Path) -> None:
    with boot(image, workdir, "console=ttyS0 kvmotion.ip=10.0.2.15/24") as guest:
        took = guest.wait_console(READY, 60)
        print(f"boot to READY under TCG: {took:.1f}s")
        assert "ip=10.0.2.15/24 port=7000" in guest.console()
        with GuestClient.connect("127.0.0.1", guest.port, timeout=15) as client:
            first = client.ping()
            assert client.ping().n > first.n
            info = client.info()
            assert info.kernel.endswith("cloud-amd64") and {"sse2", "lm"} <= info.flags
            assert info.mem_total_kib > 150_000

            assert http_get("127.0.0.1", guest.port).body.startswith("kvmotion guestd n=")

            client.dirty(50, 32)
            time.sleep(2.0)
            stat = client.dirty_stat()
            print(f"DIRTY 50 MiB/s over 32 MiB achieved {stat.rate_mib_s:.1f} MiB/s")
            assert stat.running and 35 <= stat.rate_mib_s <= 65
            client.checksum()  # while dirtying
            client.dirty_stop()
            frozen = client.checksum()
            assert client.checksum() == frozen  # deterministic once stopped

            loop = PingLoop.connect("127.0.0.1", guest.port, max_duration=1.0).start()
            pings = loop.join(timeout=10)
            assert pings.lost == 0 and pings.same_connection and pings.answered > 20

            client.disk_start(0)
            time.sleep(1.0)
            acked = client.disk_stop()
            assert acked > 10
            verify = client.disk_verify()
            assert verify.passed and verify.ok == acked
            print(f"DISK START 0: {acked} flushed records in 1 s")

            client.disk_start(0)  # keep writing through the power-down
            time.sleep(0.3)
            acked_seen = client.disk_status().acked
            assert acked_seen > acked

        guest.qmp("system_powerdown")
        started = time.monotonic()
        guest.proc.wait(15)
        print(f"system_powerdown to QEMU exit: {time.monotonic() - started:.1f}s")
        assert "power button" in guest.console()

        check = verify_records(guest.disk, acked_seen)
        assert check.ok, check.message
        assert check.highest >= acked_seen
