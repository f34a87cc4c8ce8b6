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

from kvmotion.errors import Conflict, ExecutionError, InvalidInput, NotFound
from kvmotion.host import firmware
from kvmotion.host.cpu import VmCpu
from kvmotion.host.datastores import Datastores
from kvmotion.host.seed import write_seed
from kvmotion.host.vmconfig import DiskConfig, VmConfig, VmCreateRequest
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
    config: VmConfig,
    datastores: Datastores,
    sizes_bytes: list[int] | None = None,
    *,
    first_disk_copy: Path | None = None,
    vars_from: Path | None = None,
) -> tuple[Path, list[Path]]:
    """Make the VM's folder, disk images, first-boot seed, UEFI variable store and record.
    Returns the record's path and the folders made (remove them to undo). Raises Conflict if
    the folder exists.

    A disk with a ``backing`` is made as a qcow2 overlay of it; ``first_disk_copy``: the first
    disk is a full copy of that image (an image on another datastore), grown to its size.
    ``vars_from``: the variable store to copy (a cold move), else OVMF's empty one."""
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
            if i == 0 and first_disk_copy is not None:
                fmt = first_disk_copy.suffix.lstrip(".")  # an image's name says its format
                await qemu_img("convert", "-q", "-f", fmt, "-O", disk.format,
                               str(first_disk_copy), str(path))  # fmt: skip
                await qemu_img("resize", "-q", "-f", disk.format, str(path), size)
            else:
                await qemu_img("create", "-q", "-f", disk.format, *_backing(disk, datastores),
                               str(path), size)  # fmt: skip
        if config.first_boot is not None and config.seed_path is not None:
            seed = datastores.resolve(config.datastore, config.seed_path)
            await write_seed(seed, config.uuid, config.first_boot)
        if config.vars_path is not None:
            store = datastores.resolve(config.datastore, config.vars_path)
            if vars_from is not None:
                await asyncio.to_thread(firmware.copy_vars, vars_from, store)
            else:
                await asyncio.to_thread(firmware.new_vars, store)
        record = folder / RECORD
        write_record(record, config)
        return record, created
    except BaseException:
        remove_folders(created)
        raise


IMAGES_DIR = ".images"  # a datastore's OS images (host/images.py keeps them)
IMAGE_FORMATS = ("qcow2", "raw")


def find_image(datastores: Datastores, name: str, where: list[str]) -> tuple[str, str, str]:
    """The first datastore of ``where`` that holds image ``name``: (datastore, its path
    relative to that datastore's root, its format). Raises NotFound naming where it looked."""
    for datastore in where:
        for fmt in IMAGE_FORMATS:
            relative = f"{IMAGES_DIR}/{name}.{fmt}"
            if datastores.resolve(datastore, relative).is_file():
                return datastore, relative, fmt
    raise NotFound(
        f"no image {name!r} on datastore(s) {', '.join(where)} of this host: import it with "
        "`kvmotion image import FILE --datastore DS` (`kvmotion image list` shows what there is)",
        code="image_not_found",
    )


async def image_virtual_size(path: Path, fmt: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "-U", "--output=json", "-f", fmt, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ExecutionError(
            f"cannot read image {path.name}: {err.decode().strip()}", code="qemu_img"
        )
    return int(json.loads(out)["virtual-size"])


async def disk_from_image(
    req: VmCreateRequest, datastores: Datastores
) -> tuple[DiskConfig, Path | None]:
    """The first disk of a VM made from ``req.image``, and the image to copy into it if it is
    not an overlay.

    On the image's own datastore the disk is a qcow2 overlay of it: made in a moment, sharing
    the image's blocks, and every host that mounts the datastore resolves it. On another
    datastore it is a full copy (a local datastore, or an image kept elsewhere), independent of
    the image. A storage move later copies an overlay's whole chain into one file either way.
    The disk is the image's size, or larger if asked; never smaller (InvalidInput).
    """
    assert req.image is not None
    target = req.disks[0].datastore or req.datastore
    where = [req.image_datastore] if req.image_datastore else [target]
    if req.image_datastore is None:
        where += [d for d in datastores.names() if d != target]
    datastore, relative, fmt = find_image(datastores, req.image, where)
    size = await image_virtual_size(datastores.resolve(datastore, relative), fmt)
    size_mib = -(-size // 2**20)
    asked = req.disks[0].size_mib
    if asked is not None and asked < size_mib:
        raise InvalidInput(
            f"image {req.image!r} is {size_mib} MiB: its VM's disk cannot be {asked} MiB "
            "(leave the size out, or ask for more)",
            code="disk_smaller_than_image",
        )
    disk = DiskConfig(
        datastore=target, path=f"{req.name}/{req.name}.qcow2", size_mib=max(asked or 0, size_mib)
    )
    if datastore == target:
        return disk.model_copy(update={"backing": relative, "backing_format": fmt}), None
    return disk, datastores.resolve(datastore, relative)


def _backing(disk: DiskConfig, datastores: Datastores) -> list[str]:
    """qemu-img's options for a disk's backing image, named relative to the disk's own folder:
    QEMU resolves it so on every host, wherever the datastore is mounted there."""
    if disk.backing is None:
        return []
    path = datastores.resolve(disk.datastore, disk.path)
    base = datastores.resolve(disk.datastore, disk.backing)
    return ["-b", os.path.relpath(base, path.parent), "-F", disk.backing_format or "qcow2"]


def remove_folders(folders: list[Path]) -> None:
    for path in reversed(folders):
        shutil.rmtree(path, ignore_errors=True)


def remove_vm_files(config: VmConfig, datastores: Datastores, record: Path) -> list[str]:
    """Delete the disks the config names and its record, then each folder left empty.
    Returns what could not be removed (nothing raises: the VM already lives elsewhere)."""
    problems: list[str] = []
    paths = [datastores.resolve(d.datastore, d.path) for d in config.disks] + [record]
    for derived in (config.seed_path, config.vars_path):
        if derived is not None:
            paths.append(datastores.resolve(config.datastore, derived))
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
