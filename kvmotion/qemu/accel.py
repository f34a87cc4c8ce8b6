"""Choosing the accelerator: KVM only if a real Linux guest boots under it, else TCG.

The probe boots it with ``-cpu host``: where KVM works that boots at once. Where it does not,
QEMU may stop at once (a software KVM that cannot give the host's model: MSR 0x10a here) or the
kernel may hang (a plain model on that KVM stops on an instruction its emulator lacks, after the
deadline); either way the reason given is what happened, with QEMU's last words.

On some machines /dev/kvm opens and firmware runs, yet a Linux kernel hangs at boot under KVM. So
the probe boots the guest image with ``kvmotion.probe=1`` (its init prints a marker and powers off)
and waits for the marker with a deadline. The answer is cached per machine, keyed by everything
that could change it (QEMU binary, host kernel, probe image).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmotion.qemu.cmdline import QEMU_BINARY

log = logging.getLogger(__name__)

PROBE_MARKER = b"KVMOTION-PROBE-OK"
DEFAULT_CACHE = Path("/var/cache/kvmotion/accel-probe.json")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def _probe_key(kernel: Path, initrd: Path, binary: str) -> str:
    qemu = shutil.which(binary) or binary
    parts = [platform.release()]
    for path in (Path(qemu), kernel, initrd):
        try:
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:missing")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


async def _boots_under_kvm(
    kernel: Path, initrd: Path, deadline: float, binary: str, cpu_model: str
) -> str | None:
    """None if the guest booted under KVM, else why not."""
    argv = [
        binary, "-machine", "q35,accel=kvm", "-cpu", cpu_model, "-m", "128M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 kvmotion.probe=1",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(deadline):
            while chunk := await proc.stdout.read(4096):
                seen = (seen + chunk)[-4096:]
                if PROBE_MARKER in seen:
                    return None
        last = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return f"QEMU stopped under KVM before a Linux guest booted ({last[0][:160]})"
    except TimeoutError:
        return f"/dev/kvm opens but a Linux guest did not boot under KVM in {deadline:g} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def choose_accelerator(
    kernel: Path | None,
    initrd: Path | None,
    *,
    forced: str | None = None,
    cache: Path = DEFAULT_CACHE,
    deadline: float = 15.0,
    binary: str = QEMU_BINARY,
) -> AccelChoice:
    """Pick "kvm" or "tcg" for this host, saying why."""
    if forced is not None:
        return AccelChoice(forced, f"set in the host config ({forced})")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is not available")
    if kernel is None or initrd is None or not kernel.exists() or not initrd.exists():
        return AccelChoice("tcg", "no guest image to probe KVM with (run `kvmotion image build`)")
    key = _probe_key(kernel, initrd, binary)
    known: dict[str, dict[str, str]] = {}  # one answer per QEMU binary, kernel and image
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = dict(json.loads(cache.read_text())["probes"])
        if key in known:
            return AccelChoice(**known[key])
    log.info("probing KVM: booting the guest image with a %.0f s deadline", deadline)
    failed = await _boots_under_kvm(kernel, initrd, deadline, binary, "host")
    if failed is None:
        choice = AccelChoice("kvm", "a Linux guest booted under KVM")
    else:
        choice = AccelChoice("tcg", failed)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"probes": known | {key: asdict(choice)}}))
        tmp.replace(cache)
    return choice
