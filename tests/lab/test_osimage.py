"""The Debian 12 server image for real: booted under TCG by SeaBIOS from a throwaway
overlay, configured at first boot by cloud-init from a NoCloud seed, then checked the way a user
would: the kernel came from the disk, the hostname and SSH key from the seed, cloud-init
finished, nginx, PostgreSQL (the bench role, by password over TCP) and sshd run, and the guest
agent answers on its virtio-serial port.

The guest has no network device (``-nic none``): what it serves is checked from inside, by the
seed's runcmd, which prints its findings to the serial console.

The same image booted by OVMF is tested through the product, as users run it:
tests/lab/test_uefi_vm.py (`vm create --firmware uefi`: booted through UEFI, reached over SSH,
its variable store moved). A second bare boot here under OVMF cost 86 s of every CI run for
checks the firmware does not change (the services), and was dropped.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvmotion.lab.osimage import OsImage, build_os_image, find_os_image

pytestmark = pytest.mark.lab

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 600.0
FINISHED = r"Cloud-init v\. \S+ finished at "
# Run by cloud-init's runcmd at the end of first boot; every line it prints starts with CHECK.
CHECK = "KVMOTION-CHECK"
CHECKS = f"""\
#!/bin/bash
for i in $(seq 60); do systemctl is-active -q postgresql@15-main nginx ssh && break; sleep 1; done
say() {{ echo "{CHECK} $*" > /dev/ttyS0; }}
say units $(systemctl is-active postgresql postgresql@15-main nginx ssh qemu-guest-agent)
say failed $(systemctl list-units --failed --plain --no-legend | wc -l)
say key $(cut -d' ' -f2 /home/debian/.ssh/authorized_keys)
say pg $(PGPASSWORD=bench psql -h 127.0.0.1 -U bench -d bench -tAc 'select current_user')
say listen $(ss -Hltn | awk '{{print $4}}' | sort | tr '\\n' ' ')
say http $( (exec 3<>/dev/tcp/127.0.0.1/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 &&
             head -n 1 <&3) | tr -d '\\r')
say done
"""


@pytest.fixture(scope="session")
def image() -> OsImage:
    built = build_os_image()
    started = time.monotonic()
    assert find_os_image() == built  # the cache answers without building
    assert time.monotonic() - started < 1.0
    return built


def write_seed(directory: Path, hostname: str, public_key: str) -> Path:
    (directory / "meta-data").write_text(f"instance-id: {hostname}-1\nlocal-hostname: {hostname}\n")
    user_data = {
        "ssh_authorized_keys": [public_key],
        "write_files": [{"path": "/root/checks.sh", "permissions": "0755", "content": CHECKS}],
        "runcmd": [["/root/checks.sh"]],
    }  # JSON is YAML
    (directory / "user-data").write_text("#cloud-config\n" + json.dumps(user_data) + "\n")
    seed = directory / "seed.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-output", str(seed), "-volid", "cidata", "-joliet",
         "-rock", str(directory / "user-data"), str(directory / "meta-data")],
        check=True, timeout=60,
    )  # fmt: skip
    return seed


def qemu_argv(work: Path, image: OsImage, seed: Path) -> list[str]:
    overlay = work / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.path),
         str(overlay)], check=True, timeout=60,
    )  # fmt: skip
    argv = [
        QEMU, "-nodefaults", "-machine", "q35", "-accel", "tcg,thread=single", "-m", "1024",
        "-smp", "1", "-nic", "none", "-display", "none", "-monitor", "none",
        "-serial", f"file:{work / 'serial.log'}",
        "-blockdev", f"driver=file,filename={overlay},node-name=disk-file",
        "-blockdev", "driver=qcow2,file=disk-file,node-name=disk",
        "-device", "virtio-blk-pci,drive=disk",
        "-blockdev", f"driver=file,filename={seed},node-name=seed-file,read-only=on",
        "-blockdev", "driver=raw,file=seed-file,node-name=seed,read-only=on",
        "-device", "virtio-blk-pci,drive=seed",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga,path={work / 'qga.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    return argv


class Guest:
    def __init__(self, proc: subprocess.Popen[bytes], serial: Path, started: float) -> None:
        self.proc, self.serial, self.started = proc, serial, started

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_for(self, pattern: str, deadline: float) -> float:
        """Seconds from QEMU's start until ``pattern`` (a regex) is on the serial console."""
        while time.monotonic() < deadline and self.proc.poll() is None:
            if re.search(pattern, self.console()):
                return time.monotonic() - self.started
            time.sleep(0.5)
        pytest.fail(f"no {pattern!r} on the serial console; its end:\n{self.console()[-4000:]}")

    def checks(self) -> dict[str, str]:
        """What the seed's checks printed: name -> the rest of its line (which may begin after
        a login prompt: agetty ends that with no newline)."""
        found = re.findall(rf"{CHECK} (\S+) ?([^\r\n]*)", self.console())
        return {name: value.strip() for name, value in found}


@pytest.fixture
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvmotion-osimage-") as tmp:
        yield Path(tmp)


@contextmanager
def booted(argv: list[str], serial: Path) -> Iterator[Guest]:
    """QEMU running ``argv``; killed by its pid on the way out, pass or fail."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield Guest(proc, serial, started)
    finally:
        proc.kill()
        output, _ = proc.communicate(timeout=60)
        if proc.returncode not in (0, -9):
            print(f"QEMU ended with {proc.returncode}: {output.decode(errors='replace')}")


def guest_agent(path: Path, command: str) -> object:
    """One command to the guest agent on its virtio-serial port: its "return"."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        f = sock.makefile("rwb")
        # guest-sync first: whatever an earlier client left unread is skipped up to its id
        f.write(b'{"execute": "guest-sync", "arguments": {"id": 4711}}\n')
        f.flush()
        while json.loads(f.readline()).get("return") != 4711:
            pass
        f.write(json.dumps({"execute": command}).encode() + b"\n")
        f.flush()
        reply = json.loads(f.readline())
    assert "return" in reply, reply
    return reply["return"]


def test_server_image_boots_and_serves(image: OsImage, work: Path) -> None:
    hostname = "osimage-seabios"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "key")],
                   check=True, timeout=60)  # fmt: skip
    public_key = (work / "key.pub").read_text().strip()
    seed = write_seed(work, hostname, public_key)
    argv = qemu_argv(work, image, seed)
    with booted(argv, work / "serial.log") as guest:
        deadline = guest.started + BOOT_TIMEOUT_S
        login_s = guest.wait_for(f"{hostname} login:", deadline)  # from the seed
        finished_s = guest.wait_for(FINISHED, deadline)
        guest.wait_for(f"{CHECK} done", deadline)
        console = guest.console()
        agent_name = guest_agent(work / "qga.sock", "guest-get-host-name")
    # the kernel GRUB found on the disk, the root filesystem by its UUID
    assert "Linux version" in console
    assert "Command line: BOOT_IMAGE=/boot/vmlinuz-" in console and "root=UUID=" in console
    assert "DataSourceNoCloud" in console  # cloud-init's final message names the seed
    checks = guest.checks()
    assert checks["units"].split() == ["active"] * 5, checks
    assert checks["failed"] == "0", checks
    assert checks["key"] == public_key.split()[1]
    assert checks["pg"] == "bench", checks
    assert {"0.0.0.0:5432", "0.0.0.0:80", "0.0.0.0:22"} <= set(checks["listen"].split()), checks
    assert checks["http"].startswith("HTTP/1.1 200"), checks
    assert agent_name == {"host-name": hostname}
    print(f"\nSeaBIOS: login prompt {login_s:.1f} s, cloud-init finished {finished_s:.1f} s "
          "after QEMU started")  # fmt: skip
