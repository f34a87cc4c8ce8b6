"""OS images: a Debian 12 server disk built from Debian packages, booted through firmware.

This module owns building that image and caching it. ``mmdebstrap`` installs a
:class:`Recipe`'s packages straight into the ext4 root of a partitioned raw disk on a loop device
(GPT: BIOS boot, EFI system, root); the recipe's files and script then configure it in a chroot
(cloud-init reads a NoCloud seed and nothing else; PostgreSQL's ``bench`` role and database are
made at build time, so first boot under TCG stays short; timers a lab server does not need are
disabled). GRUB goes in for i386-pc and x86_64-efi at the removable path, so the one image boots
under SeaBIOS and OVMF. Free space is trimmed (it reads as zeros) and the disk converted to an
uncompressed qcow2: a plain file that live migration moves, that TCG reads without inflating.

An image lives at ``<cache>/os/<digest>/<name>.qcow2`` beside its manifest (``image.json``). The
digest covers every input the builder chooses: the whole recipe (sources, packages, files,
script, disk layout) and :data:`BUILDER_VERSION`, to be raised whenever the build's steps change;
not the mirror's changing package versions: a cached image is reused until its inputs change,
or ``force``. A build runs in a temporary
directory beside the cache, under the cache's lock, and is renamed into place when complete;
its mounts and loop device are released in ``finally``, and those of a killed build before its
directory is removed. Building needs root (loop devices, mounts, chroot).

Every failure raises :class:`kvmotion.errors.LabError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from kvmotion.errors import LabError
from kvmotion.lab.image import Log, _locked, _logger, _run, default_cache_dir

BUILDER_VERSION = "1"  # raise it with any change to how an image is built
MANIFEST = "image.json"
MMDEBSTRAP_TIMEOUT_S = 3600.0
STEP_TIMEOUT_S = 900.0
TOOLS = ("mmdebstrap", "sfdisk", "partx", "mkfs.ext4", "mkfs.vfat", "mcopy", "qemu-img")
# GPT partition types: BIOS boot (GRUB's core image), EFI system, Linux x86-64 root
BIOS_BOOT, ESP, ROOT = (
    "21686148-6449-6E6F-744E-656564454649",
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
)
# What a lab server does not need, and what would otherwise wake up in a TCG guest soon after
# boot: apt's downloads and upgrades, man-db's index, e2scrub's snapshots, fstrim, dpkg's backup.
DISABLED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
)  # fmt: skip
# The character devices the chroot's tools need: (name, major, minor)
CHAR_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                ("urandom", 1, 9), ("tty", 5, 0))  # fmt: skip

DEBIAN_CLOUD_CFG = """\
# kvmotion: configured from a NoCloud seed only (None: the fallback that reads nothing), so no
# network metadata service is ever probed: nothing is sent outside the lab.
datasource_list: [ NoCloud, None ]
manage_etc_hosts: true
# C.UTF-8 needs no locale-gen at first boot
locale: C.UTF-8
# no RSA host key: making one costs a first boot under TCG several seconds
ssh_genkeytypes: [ ed25519, ecdsa ]
"""
DEBIAN_SSHD_CONFIG = "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n"
DEBIAN_SSH_DROPIN = """\
[Service]
# Host keys are made per VM at first boot by cloud-init; booted without a seed, by sshd's unit.
ExecStartPre=
ExecStartPre=/bin/sh -c '[ -e /etc/ssh/ssh_host_ed25519_key ] || \\
  exec ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
"""
# Run by sh -ex in the chroot, after the packages are installed and the files written.
DEBIAN_SCRIPT = f"""\
v=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
conf=/etc/postgresql/$v/main
printf '%s\\n' "listen_addresses = '*'" "ssl = off" > "$conf/conf.d/kvmotion.conf"
echo 'host bench bench 0.0.0.0/0 scram-sha-256' >> "$conf/pg_hba.conf"
printf '%s\\n' "CREATE ROLE bench LOGIN PASSWORD 'bench';" "CREATE DATABASE bench OWNER bench;" |
  runuser -u postgres -- "/usr/lib/postgresql/$v/bin/postgres" --single \\
    -D "/var/lib/postgresql/$v/main" -c "config_file=$conf/postgresql.conf" \\
    -c dynamic_shared_memory_type=mmap postgres > /tmp/pg.out 2>&1
if grep -E 'ERROR|FATAL' /tmp/pg.out; then exit 1; fi
update-initramfs -u -k all  # again, now that fstab names the root: fsck it before mounting
for u in {" ".join(DISABLED_UNITS)}; do
  if [ -e "/lib/systemd/system/$u" ]; then systemctl disable -q "$u"; fi
done
# every VM makes its own at first boot (PostgreSQL runs without TLS)
rm -f /etc/ssh/ssh_host_* /etc/ssl/private/ssl-cert-snakeoil.key \\
  /etc/ssl/certs/ssl-cert-snakeoil.pem /etc/resolv.conf /etc/dpkg/dpkg.cfg.d/99mmdebstrap
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/lib/cloud /tmp/* /var/tmp/*
: > /etc/machine-id
"""


@dataclass(frozen=True)
class Recipe:
    """Everything an OS image is made of; :func:`recipe_digest` is a pure function of it."""

    name: str  # the image's file name, without .qcow2
    suite: str
    sources: tuple[str, ...]  # one-line apt sources; the first is the main archive
    variant: str  # mmdebstrap's package set beneath ``packages``
    packages: tuple[str, ...]
    files: tuple[tuple[str, str], ...]  # (path in the guest, content), written before ``script``
    script: str  # sh, run in the chroot
    cmdline: str  # the kernel's, after root= and ro
    disk_bytes: int
    esp_mib: int


def grub_defaults(cmdline: str) -> str:
    """/etc/default/grub: the kernel command line, GRUB on the serial console as well."""
    return (
        "GRUB_DEFAULT=0\nGRUB_TIMEOUT=1\nGRUB_DISTRIBUTOR=Debian\nGRUB_CMDLINE_LINUX_DEFAULT=\n"
        f'GRUB_CMDLINE_LINUX="{cmdline}"\nGRUB_TERMINAL="console serial"\n'
        'GRUB_SERIAL_COMMAND="serial --speed=115200 --unit=0 --word=8 --parity=no --stop=1"\n'
        "GRUB_DISABLE_RECOVERY=true\nGRUB_DISABLE_OS_PROBER=true\n"
    )


# Serial last: it is /dev/console, where systemd and cloud-init write. mitigations=off: an Intel
# CPU model (an EVC baseline) otherwise gets page table isolation, which TCG pays for at every
# kernel entry (Nehalem, first boot to login: 96 s with it, 69 s without; qemu64 is unaffected).
DEBIAN_CMDLINE = "console=tty0 console=ttyS0,115200n8 mitigations=off"
# Beyond the "important" priority (a usual Debian server: apt, cron, logrotate, less ...):
# ifupdown and isc-dhcp-client, which bookworm's cloud-init renders its DHCP fallback for (eni
# comes first among its renderers); dbus for hostnamectl; sudo for the default user.
DEBIAN_PACKAGES = (
    "linux-image-cloud-amd64", "systemd-sysv", "dbus", "grub2-common", "grub-pc-bin",
    "grub-efi-amd64-bin", "e2fsprogs", "dosfstools", "openssh-server", "sudo", "nginx",
    "postgresql", "qemu-guest-agent", "cloud-init", "cloud-guest-utils", "ifupdown",
    "isc-dhcp-client", "iproute2", "netbase",
)  # fmt: skip
DEBIAN_12 = Recipe(
    name="debian-12",
    suite="bookworm",
    sources=(
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ),
    variant="important",
    packages=DEBIAN_PACKAGES,
    files=(
        ("/etc/hostname", "debian\n"),
        ("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost\n"),
        ("/etc/default/locale", "LANG=C.UTF-8\n"),
        ("/etc/default/grub", grub_defaults(DEBIAN_CMDLINE)),
        ("/etc/cloud/cloud.cfg.d/90_kvmotion.cfg", DEBIAN_CLOUD_CFG),
        ("/etc/ssh/sshd_config.d/kvmotion.conf", DEBIAN_SSHD_CONFIG),
        ("/etc/systemd/system/ssh.service.d/kvmotion.conf", DEBIAN_SSH_DROPIN),
    ),
    script=DEBIAN_SCRIPT,
    cmdline=DEBIAN_CMDLINE,
    disk_bytes=4 << 30,
    esp_mib=126,
)
RECIPES: Mapping[str, Recipe] = {"debian": DEBIAN_12}


@dataclass(frozen=True)
class OsImage:
    """A built OS image: one qcow2 file."""

    name: str
    path: Path
    digest: str
    size_bytes: int  # on disk
    virtual_size_bytes: int
    build_seconds: float

    def manifest(self, recipe: Recipe, installed: list[str], release: str | None) -> str:
        """The manifest written beside the image: this, and what went into it."""
        fields = {**dataclasses.asdict(self), "path": self.path.name}
        return json.dumps(
            {**fields, "builder_version": BUILDER_VERSION, "suite": recipe.suite,
             "packages": list(recipe.packages), "installed": installed,
             "mirror_release_date": release,
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            indent=2,
        ) + "\n"  # fmt: skip

    @classmethod
    def from_manifest(cls, directory: Path, text: str) -> OsImage:
        """The image a manifest in ``directory`` describes. Raises ValueError if malformed."""
        try:
            data = json.loads(text)
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls)}
            image = cls(**{**fields, "path": directory / str(data["path"])})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed image manifest: {exc!r}") from exc
        if image.path.name != f"{image.name}.qcow2":
            raise ValueError(f"the manifest of {image.name!r} names {image.path.name!r}")
        return image


def recipe_for(os_name: str) -> Recipe:
    try:
        return RECIPES[os_name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise LabError(f"no OS image recipe for {os_name!r} (known: {known})") from None


def recipe_digest(recipe: Recipe) -> str:
    """The cache key: a hash of the builder version and every field of the recipe."""
    h = hashlib.sha256(f"builder={BUILDER_VERSION}\n".encode())
    for key, value in sorted(dataclasses.asdict(recipe).items()):
        h.update(json.dumps([key, value]).encode() + b"\n")
    return h.hexdigest()


def os_cache_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()).resolve() / "os"


def find_os_image(cache_dir: Path | None = None, os_name: str = "debian") -> OsImage | None:
    """The cached image of ``os_name`` for the current recipe, or None; never builds."""
    recipe = recipe_for(os_name)
    return _load(os_cache_dir(cache_dir), recipe_digest(recipe), recipe.name)


def build_os_image(
    cache_dir: Path | None = None,
    *,
    os_name: str = "debian",
    force: bool = False,
    log: Log | None = None,
) -> OsImage:
    """Return the OS image ``os_name``, building it if it is not cached (or ``force``).

    Raises LabError if not root, a tool is missing, the mirror cannot be reached or a package
    installed, or the disk cannot be partitioned, mounted or made bootable.
    """
    say = _logger(log)
    recipe = recipe_for(os_name)
    digest = recipe_digest(recipe)
    cache = os_cache_dir(cache_dir)
    if not force and (image := _load(cache, digest, recipe.name)) is not None:
        return image
    if os.geteuid() != 0:
        raise LabError("building an OS image needs root (mmdebstrap, loop devices, mounts)")
    if missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        raise LabError(f"building an OS image needs {', '.join(missing)}: run ./run setup")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create the image cache {cache}: {exc}") from exc
    with _locked(cache / ".lock"):
        if not force and (image := _load(cache, digest, recipe.name)) is not None:
            return image  # built by another process while we waited
        for stale in cache.glob(".build-*"):  # left by killed builds; we hold the lock
            if problem := _remove_build_dir(stale):
                raise LabError(problem)
        return _build(cache, digest, recipe, say)


# ---------------------------------------------------------------------------------------------
# cache


def _load(cache: Path, digest: str, name: str) -> OsImage | None:
    directory = cache / digest
    try:
        image = OsImage.from_manifest(directory, (directory / MANIFEST).read_text())
        size = image.path.stat().st_size
    except (OSError, ValueError):
        return None
    complete = image.digest == digest and image.name == name and size == image.size_bytes
    return image if complete else None


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [
            Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
            for line in f
        ]
    return sorted((p for p in points if p.is_relative_to(path)), key=lambda p: -len(p.parts))


def _remove_build_dir(tmp: Path) -> str | None:
    """Release what a build left mounted or attached below ``tmp``, then remove it; or say why
    not. A directory with anything still mounted below it (a chroot's /proc) is never removed."""
    for lazy in ([], ["--lazy"]):  # a busy mount is at least detached from the tree
        for point in _mounts_under(tmp):
            with suppress(LabError):
                _run(["umount", *lazy, point], timeout=60)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with suppress(OSError, LabError):
            if Path(backing.read_text().strip()).is_relative_to(tmp):
                _run(["losetup", "-d", f"/dev/{backing.parent.parent.name}"], timeout=60)
    if left := _mounts_under(tmp):
        return f"cannot unmount {', '.join(map(str, left))}: unmount them, then remove {tmp}"
    shutil.rmtree(tmp, ignore_errors=True)
    return None


# ---------------------------------------------------------------------------------------------
# build


def _build(cache: Path, digest: str, recipe: Recipe, say: Log) -> OsImage:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{digest[:12]}-", dir=cache))
    tmp.chmod(0o755)  # apt downloads as its sandbox user, _apt
    try:
        raw, out = tmp / "disk.raw", tmp / "out"
        out.mkdir()
        with _disk(raw, recipe, tmp / "root", say) as disk:
            _install(disk.root, recipe, say)
            release = _release_date(disk.root, recipe)
            say("configuring the guest (cloud-init, PostgreSQL, ssh, disabled timers)")
            (disk.root / "etc/fstab").write_text(disk.fstab())
            with _chroot_mounts(disk):
                installed = _configure(disk.root, recipe)
                _install_grub(disk, say)
            say("trimming free space (it reads as zeros)")
            _run(["fstrim", disk.root], timeout=STEP_TIMEOUT_S)
        say(f"converting to qcow2 ({recipe.disk_bytes >> 30} GiB virtual)")
        qcow2 = out / f"{recipe.name}.qcow2"
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], timeout=1800)
        raw.unlink()
        info = json.loads(_run(["qemu-img", "info", "--output=json", qcow2], timeout=60))
        image = OsImage(
            name=recipe.name,
            path=cache / digest / qcow2.name,
            digest=digest,
            size_bytes=qcow2.stat().st_size,
            virtual_size_bytes=int(info["virtual-size"]),
            build_seconds=round(time.monotonic() - started, 1),
        )
        (out / MANIFEST).write_text(image.manifest(recipe, installed, release))
        if (cache / digest).exists():  # an incomplete leftover, or what ``force`` replaces
            shutil.rmtree(cache / digest)
        os.replace(out, cache / digest)
    except (OSError, ValueError, KeyError) as exc:
        raise LabError(f"building the {recipe.name} image in {tmp} failed: {exc}") from exc
    finally:
        if problem := _remove_build_dir(tmp):  # the build's own error, if any, goes on
            say(f"warning: {problem}")
    say(f"built {image.name} in {image.build_seconds:.0f} s: {image.path}")
    return image


@dataclass(frozen=True)
class _Disk:
    loop: str  # /dev/loopN
    esp: Path
    part: Path  # the root partition
    root: Path  # where it is mounted
    root_uuid: str
    esp_id: str  # the FAT volume id: eight hex digits

    def fstab(self) -> str:
        esp = f"UUID={self.esp_id[:4]}-{self.esp_id[4:]}"
        return (
            f"UUID={self.root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n"
            f"{esp}\t/boot/efi\tvfat\tumask=0077,nofail\t0\t0\n"
        )


@contextmanager
def _disk(raw: Path, recipe: Recipe, root: Path, say: Log) -> Iterator[_Disk]:
    """``raw`` partitioned and formatted on a loop device, its root filesystem mounted at
    ``root``; unmounted and detached on exit."""
    say(f"partitioning a {recipe.disk_bytes >> 30} GiB disk (BIOS boot, EFI system, root)")
    with open(raw, "wb") as f:
        f.truncate(recipe.disk_bytes)
    table = raw.with_name("partitions.sfdisk")
    table.write_text(
        f"label: gpt\nstart=1MiB, size=1MiB, type={BIOS_BOOT}, name=bios\n"
        f"start=2MiB, size={recipe.esp_mib}MiB, type={ESP}, name=esp\n"
        f"start={2 + recipe.esp_mib}MiB, type={ROOT}, name=root\n"
    )
    _stream(["sfdisk", "--quiet", str(raw)], 120, say, stdin=table)
    with ExitStack() as stack:
        loop = _run(["losetup", "-f", "--show", "-P", raw], timeout=60).strip()
        stack.callback(_run, ["losetup", "-d", loop], timeout=60)
        disk = _Disk(loop, Path(f"{loop}p2"), Path(f"{loop}p3"), root, str(uuid.uuid4()),
                     uuid.uuid4().hex[:8].upper())  # fmt: skip
        time.sleep(0.5)
        if not disk.part.exists():  # a kernel without GPT support leaves it to user space
            _run(["partx", "--add", loop], timeout=60)
        for _ in range(100):  # devtmpfs adds the nodes right after
            if disk.esp.exists() and disk.part.exists():
                break
            time.sleep(0.1)
        _run(["mkfs.vfat", "-F", "32", "-n", "EFI", "-i", disk.esp_id, disk.esp], timeout=120)
        # inode tables and journal written now, not by ext4lazyinit in every new guest
        _run(["mkfs.ext4", "-q", "-L", "root", "-U", disk.root_uuid,
              "-E", "lazy_itable_init=0,lazy_journal_init=0", disk.part], timeout=300)  # fmt: skip
        root.mkdir()
        _run(["mount", disk.part, root], timeout=60)
        stack.callback(_run, ["umount", root], timeout=120)
        yield disk


def _install(root: Path, recipe: Recipe, say: Log) -> None:
    """Install the recipe's packages into ``root`` with mmdebstrap, showing its steps."""
    say(f"mmdebstrap: {recipe.suite} ({recipe.variant} + {len(recipe.packages)} packages)")
    argv = [
        "mmdebstrap", "--mode=root", f"--variant={recipe.variant}", "--components=main",
        f"--include={','.join(recipe.packages)}", "--aptopt=Acquire::Retries \"3\"",
        # unsafe-io for speed only: the recipe's script removes it from the guest
        "--dpkgopt=force-unsafe-io", "--skip=cleanup/apt/lists",
        recipe.suite, str(root), *recipe.sources,
    ]  # fmt: skip
    _stream(argv, MMDEBSTRAP_TIMEOUT_S, lambda line: say(f"  {line}"))


@contextmanager
def _chroot_mounts(disk: _Disk) -> Iterator[None]:
    """/proc, /sys and a small /dev in the root, unmounted on exit. The /dev is a tmpfs of our
    own, not the host's bound in: it holds the loop device's nodes and the by-uuid link that
    update-grub needs to write root=UUID= (no udev makes one for partx's partitions)."""
    with ExitStack() as stack:
        for how, target in ((["-t", "proc"], "proc"), (["-t", "sysfs"], "sys"),
                            (["-t", "tmpfs", "-o", "mode=0755,size=16m"], "dev")):  # fmt: skip
            _run(["mount", *how, "kvmotion-build", disk.root / target], timeout=60)
            stack.callback(_run, ["umount", disk.root / target], timeout=120)
        dev = disk.root / "dev"
        for name, major, minor in CHAR_DEVICES:
            os.mknod(dev / name, stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)  # not through the umask
        for node in (Path(disk.loop), *Path("/dev").glob(f"{Path(disk.loop).name}p*")):
            os.mknod(dev / node.name, 0o600 | stat.S_IFBLK, node.stat().st_rdev)
        (dev / "disk/by-uuid").mkdir(parents=True)
        (dev / "disk/by-uuid" / disk.root_uuid).symlink_to(f"../../{disk.part.name}")
        (dev / "fd").symlink_to("/proc/self/fd")
        (dev / "shm").mkdir()
        (dev / "shm").chmod(0o1777)
        yield


def _configure(root: Path, recipe: Recipe) -> list[str]:
    """Write the recipe's files, run its script; return the installed packages and versions."""
    for path, content in recipe.files:
        target = root / path.lstrip("/")
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o644)
    script = root / "kvmotion-configure.sh"
    script.write_text(recipe.script)
    _run(["chroot", root, "/bin/sh", "-ex", f"/{script.name}"], timeout=STEP_TIMEOUT_S)
    script.unlink()
    query = ["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"]
    return _run(query, timeout=120).splitlines()


def _install_grub(disk: _Disk, say: Log) -> None:
    """GRUB for SeaBIOS (grub-install: its core image in the BIOS boot partition) and for UEFI
    at the removable path EFI/BOOT/BOOTX64.EFI, which OVMF boots without NVRAM entries. That is
    what ``grub-install --removable`` writes, made with grub-mkimage and copied in with mtools:
    grub-install wants the ESP mounted, and a build host's kernel may lack vfat (this one does)."""
    root = disk.root
    say("installing GRUB for BIOS (i386-pc) and UEFI (x86_64-efi, removable path)")
    _run(["chroot", root, "grub-install", "--target=i386-pc", disk.loop], timeout=STEP_TIMEOUT_S)
    modules = root / "boot/grub/x86_64-efi"  # what the core image loads from $prefix
    modules.mkdir(exist_ok=True)
    for src in (root / "usr/lib/grub/x86_64-efi").iterdir():
        if src.suffix in (".mod", ".lst"):
            shutil.copyfile(src, modules / src.name)
    load_cfg, efi = root / "tmp/load.cfg", root / "tmp/BOOTX64.EFI"
    load_cfg.write_text(f"search.fs_uuid {disk.root_uuid} root\nset prefix=($root)'/boot/grub'\n")
    _run(["chroot", root, "grub-mkimage", "-O", "x86_64-efi", "-o", "/tmp/BOOTX64.EFI",
          "-c", "/tmp/load.cfg", "-p", "/boot/grub", "part_gpt", "ext2", "search_fs_uuid"],
         timeout=STEP_TIMEOUT_S)  # fmt: skip
    _run(["mmd", "-i", disk.esp, "::/EFI", "::/EFI/BOOT"], timeout=60)
    _run(["mcopy", "-i", disk.esp, efi, "::/EFI/BOOT/BOOTX64.EFI"], timeout=60)
    load_cfg.unlink()
    efi.unlink()
    _run(["chroot", root, "update-grub"], timeout=STEP_TIMEOUT_S)


def _release_date(root: Path, recipe: Recipe) -> str | None:
    """The Date of the main archive's Release file that apt used, if it is still there."""
    url = recipe.sources[0].split()[1].split("://", 1)[-1].rstrip("/")
    release = root / "var/lib/apt/lists" / f"{url.replace('/', '_')}_dists_{recipe.suite}_InRelease"
    with suppress(OSError):
        for line in release.read_text(errors="replace").splitlines():
            if line.startswith("Date:"):
                return line.removeprefix("Date:").strip()
    return None


def _stream(argv: list[str], timeout: float, show: Log, *, stdin: Path | None = None) -> None:
    """Run ``argv``, showing its info, warning and error lines (mmdebstrap's "I: ...") as they
    come. Raises LabError with its last lines if it fails or outlives ``timeout``."""
    tail: deque[str] = deque(maxlen=40)
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    with open(stdin or os.devnull, "rb") as source:
        try:
            proc = subprocess.Popen(argv, stdin=source, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    env=env)  # fmt: skip
        except FileNotFoundError as exc:
            raise LabError(f"{argv[0]} is not installed (needed to build OS images)") from exc
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line[:3] in ("I: ", "W: ", "E: "):
                show(line.rstrip())
        status = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if status != 0:
        why = f"was killed after {timeout:.0f} s" if status < 0 else f"failed ({status})"
        raise LabError(f"{' '.join(argv[:2])} {why}; its last lines:\n" + "\n".join(tail))
