"""A VM's files on its datastores: its folder, disk images and record, made and removed whole.

Creation is all or nothing (what was made is removed on error); removal touches only the files
the VM's config names, never a folder with anything else left in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvmotion.errors import Conflict, ExecutionError
from kvmotion.host.cpu import VmCpu
from kvmotion.host.datastores import Datastores
from kvmotion.host.vmconfig import VmConfig
from kvmotion.qemu.cmdline import TCG_RAM_PAD_KIB

log = logging.getLogger(__name__)

RECORD = "vm.json"


async def qemu_img(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise ExecutionError(f"qemu-img {args[0]} failed: {out.decode().strip()}", code="qemu_img")


def write_record(path: Path, config: VmConfig) -> None:
    """Write the record atomically (a crash leaves the old one or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config.model_dump_json(indent=2))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


async def create_vm_files(
    config: VmConfig, datastores: Datastores, sizes_bytes: list[int] | None = None
) -> tuple[Path, list[Path]]:
    """Make the VM's folder, empty disk images and record. Returns the record's path and the
    folders made (remove them to undo). Raises Conflict if the folder exists already."""
    folder = datastores.resolve(config.datastore, config.name)
    if folder.exists():
        raise Conflict(
            f"datastore {config.datastore!r} already has a folder {config.name!r} "
            "(another VM, or what a failed copy left): choose another name or datastore",
            code="folder_exists",
        )
    created: list[Path] = []
    try:
        folder.mkdir(parents=True)
        created.append(folder)
        for i, disk in enumerate(config.disks):
            path = datastores.resolve(disk.datastore, disk.path)
            if not path.parent.exists():
                path.parent.mkdir(parents=True)
                created.append(path.parent)
            size = str(sizes_bytes[i]) if sizes_bytes else f"{disk.size_mib}M"
            await qemu_img("create", "-q", "-f", disk.format, str(path), size)
        record = folder / RECORD
        write_record(record, config)
        return record, created
    except BaseException:
        remove_folders(created)
        raise


def remove_folders(folders: list[Path]) -> None:
    for path in reversed(folders):
        shutil.rmtree(path, ignore_errors=True)


def remove_vm_files(config: VmConfig, datastores: Datastores, record: Path) -> list[str]:
    """Delete the disks the config names and its record, then each folder left empty.
    Returns what could not be removed (nothing raises: the VM already lives elsewhere)."""
    problems: list[str] = []
    paths = [datastores.resolve(d.datastore, d.path) for d in config.disks] + [record]
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
    for folder in sorted({p.parent for p in paths}, reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: never remove what we do not know
    for problem in problems:
        log.warning("could not remove %s", problem)
    return problems


@dataclass(frozen=True)
class Registration:
    """A VM registered on this host (``<run_dir>/registration.json``), pointing at its record.

    It is a commit point (a migration's destination becoming the owner, a storage move's
    switch), so it is written atomically: a crash leaves the old one or the new one.
    """

    config_path: Path
    incoming: bool = False  # a migration's destination, not (yet) the VM's owner
    cpu: VmCpu | None = None  # the CPU the VM runs with here
    created: tuple[Path, ...] = ()  # folders made here for a copy that is not yet the VM's
    moving_to: Path | None = None  # a storage move's new record, until it pivots
    ram_pad_kib: int | None = None  # None: registered before pads were recorded

    FILE = "registration.json"

    def pad_kib(self, accel: str) -> int:
        """The RAM pad the VM runs with. Registered before pads were recorded: every VM under
        TCG was padded then."""
        if self.ram_pad_kib is not None:
            return self.ram_pad_kib
        return TCG_RAM_PAD_KIB if accel == "tcg" else 0

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        body = {
            "config_path": str(self.config_path),
            "incoming": self.incoming,
            "cpu": dataclasses.asdict(self.cpu) if self.cpu is not None else None,
            "created": [str(p) for p in self.created],
            "moving_to": str(self.moving_to) if self.moving_to else None,
            "ram_pad_kib": self.ram_pad_kib,
        }
        path = run_dir / self.FILE
        tmp = path.with_name(f".{self.FILE}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(body))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> Registration:
        """Raises OSError, ValueError or KeyError for a file that cannot be read as one."""
        body = json.loads(path.read_text())
        cpu = body.get("cpu")
        return cls(
            config_path=Path(body["config_path"]),
            incoming=bool(body.get("incoming", False)),
            cpu=VmCpu(**{**cpu, "features": tuple(cpu["features"])}) if cpu else None,
            created=tuple(Path(p) for p in body.get("created") or []),
            moving_to=Path(body["moving_to"]) if body.get("moving_to") else None,
            ram_pad_kib=int(body["ram_pad_kib"]) if body.get("ram_pad_kib") is not None else None,
        )
