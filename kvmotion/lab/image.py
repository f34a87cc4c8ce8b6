"""The lab guest image: a Debian cloud kernel and a busybox initramfs running guestd.

This module owns building that image and caching it. Nothing is installed on the host: the
kernel package is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the
cache; the initramfs is written as a newc cpio archive by Python (so it can hold /dev/console
without root's ``mknod``), with busybox-static, ``guest/init``, ``guest/guestd`` (compiled here
with ``gcc -static``) and the virtio, ACPI button and evdev modules the guest needs.

An image lives at ``<cache>/<digest>/`` where the digest covers every input (the kernel package
file name, guestd.c, init, the busybox binary, the module list and :data:`BUILDER_VERSION`). A
build happens in a temporary directory that is renamed into place when complete, under a lock,
so a killed build never leaves a half image. A cache hit makes no apt call at all.

Every failure raises :class:`kvmotion.errors.LabError`.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmotion.errors import LabError

log_ = logging.getLogger(__name__)

BUILDER_VERSION = "1"
IMAGE_NAME = "kvmotion-guest"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# The modules the guest loads; their dependencies come from modules.dep.
MODULES: tuple[str, ...] = ("virtio_pci", "virtio_net", "virtio_blk", "button", "evdev")
GCC_FLAGS: tuple[str, ...] = ("-O2", "-Wall", "-Wextra", "-static", "-pthread")
GUEST_DIR = Path(__file__).with_name("guest")
MANIFEST = "image.json"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
# acpid runs /etc/acpi/<ACTION>/<PARAM> on a power-button press (busybox acpid's built-in map)
POWER_SCRIPT = (
    "#!/bin/sh\n"
    "echo 'kvmotion-init: power button, powering off' > /dev/console\n"
    "sync\n"
    "poweroff -f\n"
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: ``kernel`` and ``initrd`` inside ``directory``."""

    name: str
    directory: Path
    kernel: Path
    initrd: Path
    digest: str


def default_cache_dir() -> Path:
    """Where images are cached: ``$KVMOTION_IMAGE_CACHE`` or /var/cache/kvmotion/images."""
    env = os.environ.get("KVMOTION_IMAGE_CACHE")
    return Path(env) if env else Path("/var/cache/kvmotion/images")


def build_image(
    cache_dir: Path | None = None, *, force: bool = False, log: Log | None = None
) -> GuestImage:
    """Return the guest image, building it if its inputs changed (or ``force``).

    ``force`` asks apt again for the newest cloud kernel and rebuilds even on a cache hit.
    Raises LabError if a tool is missing, the kernel package cannot be found or fetched, or
    guestd does not compile.
    """
    say = _logger(log)
    cache = (cache_dir or default_cache_dir()).resolve()
    debs = cache / "debs"
    try:
        debs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create the image cache {cache}: {exc}") from exc
    deb = None if force else _newest_deb(debs)
    if deb is not None:
        digest = _digest(deb.name)
        image = _load(cache, digest)
        if image is not None:
            return image
    with _locked(cache / ".lock"):
        if deb is None:
            deb = _fetch_kernel_deb(debs, say)
        digest = _digest(deb.name)
        image = _load(cache, digest)
        if image is not None and not force:
            return image
        started = time.monotonic()
        _build(cache, digest, deb, say)
        image = _load(cache, digest)
        if image is None:
            raise LabError(f"image {digest} is incomplete right after its build in {cache}")
        say(f"built guest image {digest[:12]} in {time.monotonic() - started:.1f}s")
        return image


def install_image(image: GuestImage, image_dir: Path) -> Path:
    """Copy ``image`` to ``image_dir/<name>/{vmlinuz,initrd.img}``; return that directory.

    Files are replaced atomically; an up-to-date copy (same digest) is left alone.
    """
    dest = image_dir / image.name
    stamp = dest / MANIFEST
    try:
        present = all(p.is_file() for p in (stamp, dest / KERNEL_FILE, dest / INITRD_FILE))
        if present and json.loads(stamp.read_text()).get("digest") == image.digest:
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        for src, name in ((image.kernel, KERNEL_FILE), (image.initrd, INITRD_FILE)):
            tmp = dest / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest / name)
        tmp = dest / f".{MANIFEST}.tmp"
        shutil.copyfile(image.directory / MANIFEST, tmp)
        os.replace(tmp, stamp)
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot install guest image into {dest}: {exc}") from exc
    return dest


# ---------------------------------------------------------------------------------------------
# cache


def _logger(log: Log | None) -> Log:
    """The caller's ``log`` if it gave one (the CLI prints), else this module's logger: each
    line once."""
    if log is not None:
        return log

    def say(msg: str) -> None:
        log_.info("%s", msg)

    return say


def _digest(deb_name: str) -> str:
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    h.update(f"kernel={deb_name}\n".encode())
    h.update(f"modules={','.join(MODULES)}\n".encode())
    h.update(f"gcc={' '.join(GCC_FLAGS)}\n".encode())
    for path in (GUEST_DIR / "guestd.c", GUEST_DIR / "init", BUSYBOX):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LabError(f"cannot read image input {path}: {exc}") from exc
        h.update(f"{path.name}={hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


def _load(cache: Path, digest: str) -> GuestImage | None:
    """The complete image ``digest`` from the cache, or None."""
    directory = cache / digest
    kernel, initrd = directory / KERNEL_FILE, directory / INITRD_FILE
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        complete = (
            manifest.get("digest") == digest
            and kernel.stat().st_size == manifest.get("kernel_size")
            and initrd.stat().st_size == manifest.get("initrd_size")
        )
    except (OSError, ValueError):
        return None
    if not complete:
        return None
    return GuestImage(IMAGE_NAME, directory, kernel, initrd, digest)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LabError(f"cannot open the image cache lock {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _deb_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.name))


def _newest_deb(debs: Path) -> Path | None:
    found = [
        p
        for p in debs.glob("linux-image-*-cloud-amd64_*.deb")
        if not p.name.startswith(KERNEL_META_PACKAGE + "_")
    ]
    return max(found, key=_deb_key) if found else None


# ---------------------------------------------------------------------------------------------
# tools


def _run(cmd: Sequence[str | Path], *, timeout: float, cwd: Path | None = None) -> str:
    """Run a command; return its stdout. Raises LabError with its stderr on failure."""
    argv = [str(c) for c in cmd]
    env = {**os.environ, "LC_ALL": "C"}
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed (needed to build the guest image)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} failed with status {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _fetch_kernel_deb(debs: Path, say: Log) -> Path:
    """Resolve the cloud kernel's versioned package and download its .deb into ``debs``."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=60)
    except LabError as exc:
        raise LabError(
            f"apt does not know {KERNEL_META_PACKAGE}; run 'apt-get update' first ({exc.message})"
        ) from exc
    names = re.findall(r"^\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", out, re.MULTILINE)
    if not names:
        raise LabError(
            f"apt-cache depends {KERNEL_META_PACKAGE} names no versioned kernel package; "
            "run 'apt-get update' first"
        )
    package = names[0]
    cached = sorted(debs.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    say(f"downloading {package}")
    # apt's sandbox user (_apt) must be able to write where it downloads
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
        os.chmod(tmp, 0o777)
        _run(["apt-get", "download", "-q", package], timeout=900, cwd=Path(tmp))
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not got:
            raise LabError(f"apt-get download {package} produced no .deb")
        final = debs / got[-1].name
        os.replace(got[-1], final)
    os.chmod(final, 0o644)
    return final


def _require_static(binary: Path) -> None:
    """Raise LabError unless ``binary`` is an ELF64 executable without a program interpreter."""
    try:
        with binary.open("rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                raise LabError(f"{binary} is not a 64-bit ELF executable")
            (phoff,) = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as exc:
        raise LabError(f"cannot read {binary}: {exc}; install busybox-static") from exc
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: dynamically linked
            raise LabError(f"{binary} is dynamically linked; install busybox-static")


# ---------------------------------------------------------------------------------------------
# build


def _build(cache: Path, digest: str, deb: Path, say: Log) -> None:
    for stale in cache.glob(".build-*"):  # left by killed builds; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    _require_static(BUSYBOX)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{digest[:12]}-", dir=cache))
    try:
        out, work = tmp / "out", tmp / "work"
        out.mkdir()
        work.mkdir()
        say(f"unpacking {deb.name}")
        _run(["dpkg-deb", "-x", deb, work / "kernel"], timeout=300)
        kernel, version, modules_dir = _kernel_tree(work / "kernel")
        modules = _module_order(modules_dir, version, MODULES)
        say("compiling guestd")
        guestd = work / "guestd"
        _compile_guestd(guestd, say)
        say(f"writing the initramfs ({len(modules)} modules)")
        entries = _initramfs_entries(modules_dir, modules, guestd)
        with gzip.GzipFile(out / INITRD_FILE, "wb", compresslevel=6, mtime=0) as gz:
            gz.write(_cpio(entries))
        shutil.copyfile(kernel, out / KERNEL_FILE)
        manifest = {
            "name": IMAGE_NAME,
            "digest": digest,
            "builder_version": BUILDER_VERSION,
            "kernel_package": deb.name,
            "kernel_version": version,
            "modules": [m.name for m in modules],
            "kernel_size": (out / KERNEL_FILE).stat().st_size,
            "initrd_size": (out / INITRD_FILE).stat().st_size,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        final = cache / digest
        if final.exists():  # an incomplete leftover (complete ones were returned earlier)
            shutil.rmtree(final)
        os.replace(out, final)
    except OSError as exc:
        raise LabError(f"building the guest image in {tmp} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kernel_tree(root: Path) -> tuple[Path, str, Path]:
    """(vmlinuz, kernel version, modules directory) of an unpacked kernel package."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabError(f"the kernel package has no boot/vmlinuz-* (looked in {root})")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if (base / version).is_dir():
            return kernels[-1], version, base / version
    raise LabError(f"the kernel package has no modules directory for {version}")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def _module_order(modules_dir: Path, version: str, wanted: Sequence[str]) -> list[Path]:
    """The module files for ``wanted`` and their dependencies, in load order."""
    dep_file = modules_dir / "modules.dep"
    if not dep_file.is_file():  # Debian's package leaves it to depmod at install time
        base = modules_dir.parents[2]  # the unpacked root, above lib/modules/<version>
        if base.name == "usr":
            base = base.parent
        _run(["depmod", "-b", base, version], timeout=120)
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path, rest.split())
    order: list[str] = []

    def visit(name: str, depth: int) -> None:
        if name in order:
            return
        if name not in deps:
            raise LabError(f"kernel module {name} is not in {dep_file}")
        if depth > 50:
            raise LabError(f"kernel module dependencies loop at {name}")
        for dep in deps[name][1]:
            visit(_module_name(dep), depth + 1)
        order.append(name)

    for name in wanted:
        visit(name, 0)
    return [modules_dir / deps[name][0] for name in order]


def _module_bytes(path: Path) -> bytes:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return _run_bytes(["zstd", "-dc", str(path)])
    return path.read_bytes()


def _run_bytes(argv: list[str]) -> bytes:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)} failed: {exc}") from exc
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _compile_guestd(out: Path, say: Log) -> None:
    cmd = ["gcc", *GCC_FLAGS, "-o", str(out), str(GUEST_DIR / "guestd.c")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except FileNotFoundError as exc:
        raise LabError("gcc is not installed (needed to build guestd; install gcc)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError("compiling guestd took over 300s") from exc
    if proc.returncode != 0:
        raise LabError(f"compiling guestd failed (install gcc, libc6-dev): {proc.stderr[-3000:]}")
    if proc.stderr.strip():
        say(f"guestd compiler warnings: {proc.stderr.strip()}")


# ---------------------------------------------------------------------------------------------
# initramfs


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int  # full st_mode, file type included
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _initramfs_entries(modules_dir: Path, modules: list[Path], guestd: Path) -> list[_Entry]:
    d, f, x, lnk, c = 0o040755, 0o100644, 0o100755, 0o120777, 0o020600
    dirs = "bin dev etc etc/acpi etc/acpi/PWRF lib lib/modules proc sys run tmp var var/log"
    entries = [_Entry(name, d) for name in (*dirs.split(), "var/run", "root", "usr")]
    entries += [
        _Entry("dev/console", c, rdev=(5, 1)),
        _Entry("dev/null", 0o020666, rdev=(1, 3)),
        _Entry("sbin", lnk, b"bin"),
        _Entry("usr/bin", lnk, b"../bin"),
        _Entry("usr/sbin", lnk, b"../bin"),
        _Entry("init", x, (GUEST_DIR / "init").read_bytes()),
        _Entry("bin/busybox", x, BUSYBOX.read_bytes()),
        _Entry("bin/guestd", x, guestd.read_bytes()),
        _Entry("etc/acpi/PWRF/00000080", x, POWER_SCRIPT.encode()),
    ]
    applets = _run([BUSYBOX, "--list"], timeout=30).split()
    entries += [_Entry(f"bin/{a}", lnk, b"busybox") for a in applets if a and a != "busybox"]
    names = []
    for path in modules:
        name = _module_name(str(path.relative_to(modules_dir))) + ".ko"
        entries.append(_Entry(f"lib/modules/{name}", f, _module_bytes(path)))
        names.append(name)
    entries.append(_Entry("lib/modules/load.order", f, ("\n".join(names) + "\n").encode()))
    return entries


def _cpio(entries: list[_Entry]) -> bytes:
    """A newc ("070701") cpio archive of ``entries``, owned by root, mtime 0."""
    parts: list[bytes] = []
    for ino, e in enumerate(entries, start=1):
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
        parts.append(b"070701" + b"".join(b"%08X" % v for v in fields))
        parts.append(name + b"\0" * ((-(110 + len(name))) % 4))
        parts.append(e.data + b"\0" * ((-len(e.data)) % 4))
    trailer = b"TRAILER!!!\0"
    fields = (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(trailer), 0)
    parts.append(b"070701" + b"".join(b"%08X" % v for v in fields))
    parts.append(trailer + b"\0" * ((-(110 + len(trailer))) % 4))
    return b"".join(parts)
