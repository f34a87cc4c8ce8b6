"""OS images on a host's datastores: imported safely, listed, deleted when unused.

An image lives at ``<datastore>/.images/<name>.<qcow2|raw>`` with its metadata beside it
(``<name>.json``). Imports are streamed into a hidden file in that folder and checked there,
before anything is named after them: an upload that breaks, a file that is not a plain image,
or one that does not fit is removed and changes nothing.

What is refused, as OpenStack's image import learned to (untrusted files are read by qemu-img
under memory and CPU limits, and never with a format qemu-img guessed for a file declared raw):
an empty file; a format other than qcow2 or raw; a qcow2 with a backing file (it could name
any file of the host, e.g. /etc/shadow), an external data file or encryption; a qcow2 that
``qemu-img check`` finds corrupt (a truncated file); a file declared qcow2 that is not one; a
file declared raw that qemu-img recognises as another format; a virtual size past the largest
disk a VM may have.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvmotion.errors import Conflict, InsufficientResources, InvalidInput, NotFound
from kvmotion.host.datastores import Datastores
from kvmotion.host.vmconfig import MAX_DISK_MIB, VmConfig, check_name
from kvmotion.host.vmfiles import IMAGE_FORMATS, IMAGES_DIR, RECORD

QEMU_IMG_LIMITS = (1 << 30, 30)  # address space (bytes), CPU seconds, for qemu-img on a file
QEMU_IMG_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ImageInfo:
    name: str
    datastore: str
    format: str
    virtual_size: int
    size: int  # on disk
    imported_at: str
    filename: str = ""


def _limits() -> None:
    address_space, cpu = QEMU_IMG_LIMITS
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))


async def _qemu_img(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=_limits,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise InvalidInput(
            f"qemu-img {args[0]} took over {QEMU_IMG_TIMEOUT_S:.0f} s on the file: refused",
            code="image_invalid",
        ) from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def _refuse(why: str, code: str = "image_invalid") -> InvalidInput:
    return InvalidInput(f"not imported: {why}", code=code)


async def inspect(path: Path, declared: str | None) -> tuple[str, int]:
    """The image's format and virtual size, or InvalidInput saying why it is refused."""
    if path.stat().st_size == 0:
        raise _refuse("the file is empty")
    rc, out, err = await _qemu_img("info", "--output=json", str(path))  # probing, only to look
    if rc != 0:
        raise _refuse(f"qemu-img cannot read it as a disk image ({err.strip()[-200:]})")
    probed = str(json.loads(out).get("format"))
    fmt = declared or probed
    if fmt not in IMAGE_FORMATS:
        raise _refuse(
            f"format {fmt!r}: import qcow2 or raw (`qemu-img convert -O qcow2 FILE out.qcow2`)",
            code="image_format",
        )
    if fmt != probed:
        raise _refuse(
            f"it was declared {fmt} but its content is {probed}: declare its real format, or "
            "convert it with `qemu-img convert`",
            code="image_format",
        )
    rc, out, err = await _qemu_img("info", "--output=json", "-f", fmt, str(path))
    if rc != 0:
        raise _refuse(f"qemu-img cannot read it as {fmt} ({err.strip()[-200:]})")
    info = json.loads(out)
    data = (info.get("format-specific") or {}).get("data") or {}
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise _refuse(
            f"it reads through a backing file ({info.get('backing-filename')!r}): flatten it "
            "first with `qemu-img convert -O qcow2 FILE out.qcow2`",
            code="image_backing_file",
        )
    if data.get("data-file") or info.get("encrypted") or data.get("encrypt"):
        raise _refuse("it has an external data file or is encrypted: convert it first")
    virtual = int(info.get("virtual-size") or 0)
    if not 0 < virtual <= MAX_DISK_MIB * 2**20:
        raise _refuse(f"its virtual size {virtual} bytes is not a VM disk's (at most 16 TiB)")
    if fmt == "qcow2":
        rc, out, err = await _qemu_img("check", "--output=json", "-f", "qcow2", str(path))
        # 0: clean; 3: leaked clusters only (harmless); anything else: corrupt or unreadable
        if rc not in (0, 3):
            lines = [x for x in (err or out).splitlines() if x.strip()]
            detail = "; ".join(lines[:2])[:240] or f"exit status {rc}"
            raise _refuse(f"qemu-img check finds it damaged or truncated ({detail})",
                          code="image_corrupt")  # fmt: skip
    return fmt, virtual


class ImageStore:
    def __init__(self, datastores: Datastores) -> None:
        self.datastores = datastores

    def _folder(self, datastore: str) -> Path:
        return self.datastores.resolve(datastore, IMAGES_DIR)

    def find(self, datastore: str, name: str) -> ImageInfo | None:
        _check_name(name)
        meta = self._folder(datastore) / f"{name}.json"
        try:
            info = ImageInfo(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return info if (self._folder(datastore) / f"{name}.{info.format}").is_file() else None

    def list_images(self, datastore: str | None = None) -> list[ImageInfo]:
        """Images with their metadata (a half-imported or hand-made file is not listed)."""
        names = [datastore] if datastore else self.datastores.names()
        found = []
        for ds in names:
            try:
                metas = sorted(self._folder(ds).glob("*.json"))
            except OSError:
                continue
            found += [i for m in metas if (i := self.find(ds, m.stem)) is not None]
        return found

    async def import_stream(
        self, datastore: str, name: str, chunks: AsyncIterator[bytes], *,
        length: int | None, declared_format: str | None, filename: str = "",
    ) -> ImageInfo:  # fmt: skip
        _check_name(name)
        folder = self._folder(datastore)
        if any((folder / f"{name}.{f}").exists() for f in (*IMAGE_FORMATS, "json")):
            raise Conflict(f"datastore {datastore!r} has an image {name!r} already: delete it "
                           "first or choose another name", code="image_exists")  # fmt: skip
        free = (await self.datastores.info(datastore)).free_bytes
        if length is not None and length > free:
            raise InsufficientResources(
                f"the image is {length} bytes and datastore {datastore!r} has {free} free: "
                "free space there or choose another datastore", code="insufficient_space",
            )  # fmt: skip
        folder.mkdir(exist_ok=True)
        tmp = folder / f".incoming-{secrets.token_hex(6)}"
        try:
            written = await _receive(tmp, chunks, min(length or free, free))
            if length is not None and written != length:
                raise _refuse(f"the upload ended after {written} of {length} bytes")
            fmt, virtual = await inspect(tmp, declared_format)
            info = ImageInfo(name, datastore, fmt, virtual, written,
                             datetime.now(UTC).isoformat(), filename[:255])  # fmt: skip
            tmp.replace(folder / f"{name}.{fmt}")
            _write_json(folder / f"{name}.json", asdict(info))
            return info
        finally:
            tmp.unlink(missing_ok=True)

    def users(self, datastore: str, name: str) -> list[str]:
        """VMs whose record on ``datastore`` has a disk reading through the image."""
        _check_name(name)
        prefix = f"{IMAGES_DIR}/{name}."
        users = []
        for record in self.datastores.resolve(datastore, ".").glob(f"*/{RECORD}"):
            try:
                config = VmConfig.model_validate_json(record.read_text())
            except (OSError, ValueError):
                continue
            if any((d.backing or "").startswith(prefix) for d in config.disks):
                users.append(config.name)
        return sorted(users)

    def delete(self, datastore: str, name: str) -> None:
        info = self.find(datastore, name)
        if info is None:
            raise NotFound(f"no image {name!r} on datastore {datastore!r}", code="image_not_found")
        users = self.users(datastore, name)
        if users:
            raise Conflict(f"image {name!r} is the base of VM(s) {', '.join(users)}: delete "
                           "them or move their disks first", code="image_in_use")  # fmt: skip
        folder = self._folder(datastore)
        (folder / f"{name}.json").unlink(missing_ok=True)
        (folder / f"{name}.{info.format}").unlink(missing_ok=True)


def _check_name(name: str) -> None:
    """An image's name is a file name in ``.images/``: the VM name rules (no '/', no '..')."""
    try:
        check_name(name, "image name")
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_name") from None


async def _receive(path: Path, chunks: AsyncIterator[bytes], limit: int) -> int:
    """Write the stream to ``path`` (fsynced); stop with InsufficientResources past ``limit``."""
    written = 0
    with open(path, "xb") as out:
        async for chunk in chunks:
            written += len(chunk)
            if written > limit:
                raise InsufficientResources(
                    "the upload is larger than announced or than the datastore's free space",
                    code="insufficient_space",
                )
            await asyncio.to_thread(out.write, chunk)
        out.flush()
        os.fsync(out.fileno())
    return written


def _write_json(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(path)
