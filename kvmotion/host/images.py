"""OS images on a host's datastores: imported safely, listed, deleted when unused.

An image lives at ``<datastore>/.images/<name>.<qcow2|raw>`` with its metadata beside it
(``<name>.json``). An import is streamed into a hidden file in that folder and checked there
before anything is named after it: an upload that breaks or is cancelled, a file that is not a
plain image, or one that does not fit is removed and changes nothing.

Refused, as OpenStack's image import learned to: an empty file; a format other than qcow2 or raw;
a qcow2 with a backing file (it could name any file of the host, e.g. /etc/shadow), an external
data file or encryption; a qcow2 that ``qemu-img check`` finds damaged (truncated) or that QEMU
marked corrupt; a file declared qcow2 that is not one, or declared raw that QEMU would read as
another format; a virtual size past the largest VM disk. The content decides, never the claim.

The first bytes are classified here (:func:`sniff`) before qemu-img opens the file: qemu-img
runs as root and follows the paths inside an image (a VMDK descriptor's extents, a qcow2's data
file), so a crafted file would have it open a FIFO (and hang) or a device (/dev/watchdog arms the
watchdog). Only a qcow2 whose header names no other file, or a file no format claims, reaches
qemu-img, under memory, CPU and time limits. VMs are made from an image by
:func:`kvmotion.host.vmfiles.disk_from_image` (an overlay on its datastore, a copy elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import resource
import secrets
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from kvmotion.errors import (
    Conflict,
    ExecutionError,
    InsufficientResources,
    InvalidInput,
    NotFound,
    PreconditionError,
)
from kvmotion.host.datastores import Datastores
from kvmotion.host.vmconfig import MAX_DISK_MIB, VmConfig, check_name
from kvmotion.host.vmfiles import IMAGE_FORMATS, IMAGES_DIR, RECORD

QEMU_IMG_LIMITS = (1 << 30, 30)  # address space (bytes), CPU seconds, for qemu-img on a file
QEMU_IMG_TIMEOUT_S = 120.0
PROBE_BYTES = 2048  # what QEMU's format probes read (BLOCK_PROBE_BUF_SIZE)
CONVERT = "convert it first with `qemu-img convert -O qcow2 FILE out.qcow2`"


@dataclass(frozen=True)
class ImageInfo:
    name: str
    datastore: str
    format: str
    virtual_size: int
    size: int  # on disk
    imported_at: str
    filename: str = ""
    sha256: str = ""  # of the file as imported ("" in metadata written before it was recorded)


@dataclass(frozen=True)
class Inspection:
    format: str  # qcow2 or raw
    virtual_size: int


# The formats QEMU probes by content, each by its magic: (offset, bytes, format). A conservative
# superset of QEMU's probes (some also check a version), so that a file classified raw here is
# raw to QEMU too. dmg is probed by file name only (".dmg"), which an incoming file never has.
_MAGICS = (
    (0, b"QFI\xfb", "qcow2"), (0, b"QED\x00", "qed"), (0, b"KDMV", "vmdk"), (0, b"COWD", "vmdk"),
    (0, b"vhdxfile", "vhdx"), (0, b"conectix", "vpc"), (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"), (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"), (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
)  # fmt: skip
_VMDK_VERSIONS = tuple(f"version={v}{end}".encode() for v in "123" for end in ("\n", "\r\n"))


def sniff(head: bytes) -> str | None:
    """The format a file starting with ``head`` (its first :data:`PROBE_BYTES`) has, if it is
    one QEMU would recognise; None for raw (no format claims it)."""
    for offset, magic, fmt in _MAGICS:
        if head.startswith(magic, offset):
            if fmt == "qcow2" and struct.unpack_from(">I", head.ljust(8, b"\0"), 4)[0] == 1:
                return "qcow"
            return fmt
    return "vmdk" if _vmdk_descriptor(head) else None


def _vmdk_descriptor(head: bytes) -> bool:
    """QEMU's vmdk_probe for a text descriptor: comments and blank (space) lines, then
    ``version=N``. Such a file names its extents, any file of the host."""
    p, end = 0, len(head)
    while p < end:
        if head[p] == ord("#"):
            newline = head.find(b"\n", p)
            p = end if newline < 0 else newline + 1
        elif head[p] == ord(" "):
            while p < end and head[p] == ord(" "):
                p += 1
            if p < end and head[p] == ord("\r"):
                p += 1
            if p == end or head[p] != ord("\n"):
                return False
            p += 1
        else:
            return head.startswith(_VMDK_VERSIONS, p)
    return False


def _check_qcow2_header(head: bytes) -> None:
    """Refuse a qcow2 whose header names another file or needs a key, before qemu-img opens
    it (qemu-img info opens an external data file)."""
    head = head.ljust(104, b"\0")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    incompatible = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
    named = head[backing_offset : backing_offset + min(backing_size, 200)]
    _refuse_features(
        backing=named.decode(errors="replace") if backing_offset else None,
        data_file=bool(incompatible & 0b100),
        encrypted=struct.unpack_from(">I", head, 32)[0] != 0,
        corrupt=bool(incompatible & 0b10),
    )


def _refuse_features(
    *, backing: str | None, data_file: bool, encrypted: bool, corrupt: bool
) -> None:
    if backing is not None:
        raise _refuse(
            f"it reads through a backing file ({backing!r}): flatten it first with "
            "`qemu-img convert -O qcow2 FILE out.qcow2`",
            code="image_backing_file",
        )
    if data_file:
        raise _refuse(f"its data is in an external data file: {CONVERT}", code="image_data_file")
    if encrypted:
        raise _refuse(f"it is encrypted: decrypt it and {CONVERT}", code="image_encrypted")
    if corrupt:
        raise _refuse(
            "QEMU marked it corrupt: repair it with `qemu-img check -r all FILE`, or convert it",
            code="image_corrupt",
        )


def _limits() -> None:
    address_space, cpu = QEMU_IMG_LIMITS
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))


async def _qemu_img(*args: str) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_limits,
        )  # fmt: skip
    except OSError as exc:
        raise ExecutionError(f"cannot run qemu-img: {exc}", code="qemu_img") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT_S)
    except TimeoutError:
        raise InvalidInput(
            f"qemu-img {args[0]} took over {QEMU_IMG_TIMEOUT_S:.0f} s on the file: refused",
            code="image_invalid",
        ) from None
    finally:  # a timeout, or the import cancelled: qemu-img dies with it
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _info(*args: str) -> dict[str, Any]:
    rc, out, err = await _qemu_img("info", "--output=json", *args)
    try:
        info = json.loads(out) if rc == 0 else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        fmt = f" as {args[1]}" if args[0] == "-f" else ""
        raise _refuse(
            f"qemu-img cannot read it{fmt} ({err.strip()[-200:] or f'exit status {rc}'})",
            code="image_corrupt" if fmt else "image_invalid",
        )
    return info


def _refuse(why: str, code: str = "image_invalid") -> InvalidInput:
    return InvalidInput(f"not imported: {why}", code=code)


async def inspect(path: Path, declared_format: str | None) -> Inspection:
    """The image's format and virtual size, or InvalidInput (a code per reason) saying why it
    is refused. The content decides the format; a declared one must agree with it."""
    head = await asyncio.to_thread(_read_head, path)
    if not head:
        raise _refuse("the file is empty")
    sniffed = sniff(head)
    if sniffed not in (None, "qcow2"):
        raise _refuse(f"it is a {sniffed} image; kvmotion imports qcow2 or raw: {CONVERT}",
                      code="image_format")  # fmt: skip
    fmt = sniffed or "raw"
    if declared_format is not None and declared_format != fmt:
        content = "a qcow2 header" if fmt == "qcow2" else "no image header (it is raw)"
        raise _refuse(
            f"it was declared {declared_format} but has {content}: declare its real format, or "
            "convert it with `qemu-img convert`",
            code="image_format",
        )
    if fmt == "qcow2":
        _check_qcow2_header(head)
        info = await _info("-f", "qcow2", str(path))
    else:
        info = await _info(str(path))  # QEMU's own probe, the last word: raw to it too
        if info.get("format") != "raw":
            raise _refuse(f"qemu-img reads it as {info.get('format')!r}: {CONVERT}",
                          code="image_format")  # fmt: skip
    _check_info(info)
    virtual = int(info.get("virtual-size") or 0)
    if fmt == "qcow2":
        rc, out, err = await _qemu_img("check", "--output=json", "-f", "qcow2", str(path))
        # 0: clean; 3: leaked clusters only (harmless); anything else: corrupt or unreadable
        if rc not in (0, 3):
            lines = [x for x in (err or out).splitlines() if x.strip()]
            detail = "; ".join(lines[:2])[:240] or f"exit status {rc}"
            raise _refuse(f"qemu-img check finds it damaged or truncated ({detail})",
                          code="image_corrupt")  # fmt: skip
    return Inspection(fmt, virtual)


def _check_info(info: dict[str, Any]) -> None:
    """What qemu-img says, checked again: the header checks' second lock."""
    data = (info.get("format-specific") or {}).get("data") or {}
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    _refuse_features(
        backing=None if backing is None else str(backing),
        data_file=bool(data.get("data-file")),
        encrypted=bool(info.get("encrypted") or data.get("encrypt")),
        corrupt=bool(data.get("corrupt")),
    )
    virtual = int(info.get("virtual-size") or 0)
    if virtual <= 0:
        raise _refuse("its virtual size is 0")
    if virtual > MAX_DISK_MIB * 2**20:
        raise _refuse(f"its virtual size, {virtual} bytes, is past the largest VM disk "
                      f"({MAX_DISK_MIB // 2**20} TiB)", code="image_too_large")  # fmt: skip


class ImageStore:
    def __init__(self, datastores: Datastores) -> None:
        self.datastores = datastores

    def _folder(self, datastore: str) -> Path:
        return self.datastores.resolve(datastore, IMAGES_DIR)

    def find(self, datastore: str, name: str) -> ImageInfo | None:
        """The image with its metadata; None if either file is missing or unreadable."""
        _check_name(name)
        meta = self._folder(datastore) / f"{name}.json"
        try:
            info = ImageInfo(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if info.format not in IMAGE_FORMATS:
            return None
        # Where the file is wins over what it says (a renamed datastore, a copied folder)
        info = replace(info, name=name, datastore=datastore)
        return info if (self._folder(datastore) / f"{name}.{info.format}").is_file() else None

    def list_images(self, datastore: str | None = None) -> list[ImageInfo]:
        """Images with their metadata. Skipped: a half-imported or hand-made file (an image
        without metadata or the reverse; :meth:`delete` removes either), and a datastore that
        cannot be read (all datastores; one named is NotFound if this host lacks it)."""
        names = [datastore] if datastore else self.datastores.names()
        found: list[ImageInfo] = []
        for ds in names:
            try:
                metas = sorted(self._folder(ds).glob("*.json"))
            except OSError:
                continue
            for meta in metas:
                with contextlib.suppress(InvalidInput):  # e.g. a hidden file: not an image's
                    if (info := self.find(ds, meta.stem)) is not None:
                        found.append(info)
        return found

    async def import_stream(
        self, datastore: str, name: str, chunks: AsyncIterator[bytes], *,
        length: int | None, declared_format: str | None, filename: str = "",
    ) -> ImageInfo:  # fmt: skip
        """Write the stream to the datastore, check it, and name it. Raises InvalidInput (name,
        format, a refused image), Conflict (``image_exists``), InsufficientResources (the
        datastore's free space, before and while writing), NotFound (datastore). Any failure,
        a broken stream or a cancel included, leaves nothing."""
        _check_name(name)
        folder = self._folder(datastore)
        if self._taken(folder, name):
            raise _exists(datastore, name)
        free = await self._free_bytes(datastore)
        if length is not None and length > free:
            raise InsufficientResources(
                f"the image is {length} bytes and datastore {datastore!r} has {free} free: "
                "free space there or choose another datastore", code="insufficient_space",
            )  # fmt: skip
        folder.mkdir(exist_ok=True)
        tmp = folder / f".incoming-{secrets.token_hex(6)}"
        try:
            written, sha256 = await _receive(tmp, chunks, min(length or free, free))
            if length is not None and written != length:
                raise _refuse(f"the upload ended after {written} of {length} bytes")
            found = await inspect(tmp, declared_format)
            info = ImageInfo(name, datastore, found.format, found.virtual_size, written,
                             datetime.now(UTC).isoformat(), filename[:255], sha256)  # fmt: skip
            commit = asyncio.ensure_future(_disk(self._commit, tmp, info))
            try:
                await asyncio.shield(commit)
            except asyncio.CancelledError:  # its thread names the files anyway: undo that
                await asyncio.wait([commit])
                if not commit.cancelled() and commit.exception() is None:
                    for f in (info.format, "json"):
                        (folder / f"{name}.{f}").unlink(missing_ok=True)
                raise
            return info
        finally:
            tmp.unlink(missing_ok=True)

    async def _free_bytes(self, datastore: str) -> int:
        info = await self.datastores.info(datastore)
        if not info.accessible:
            raise PreconditionError(
                f"datastore {datastore!r} does not answer (a hung mount?): check it on this "
                "host, or import to another datastore",
                code="datastore_inaccessible",
            )
        return info.free_bytes

    @staticmethod
    def _taken(folder: Path, name: str) -> bool:
        return any((folder / f"{name}.{f}").exists() for f in (*IMAGE_FORMATS, "json"))

    @staticmethod
    def _commit(tmp: Path, info: ImageInfo) -> None:
        """Name the checked file and its metadata, replacing neither: the metadata, linked
        first, holds the name whatever the format, so an import of the same name that got there
        first (here, or on another host of a shared datastore) wins and this one is a Conflict."""
        folder = tmp.parent
        image, meta = folder / f"{info.name}.{info.format}", folder / f"{info.name}.json"
        meta_tmp = tmp.with_name(f"{tmp.name}-meta")
        try:
            with open(meta_tmp, "x") as out:
                out.write(json.dumps(asdict(info), indent=2))
                out.flush()
                os.fsync(out.fileno())
            _link(meta_tmp, meta, info)
            linked = False
            try:
                _link(tmp, image, info)
                linked = True
                _fsync_dir(folder)
            except BaseException:
                meta.unlink(missing_ok=True)
                if linked:
                    image.unlink(missing_ok=True)
                raise
        finally:
            meta_tmp.unlink(missing_ok=True)

    def users(self, datastore: str, name: str) -> list[str]:
        """VMs with a disk on ``datastore`` reading through the image, from the records on
        every datastore of this host (a VM's record and its first disk may be on different
        ones); a datastore that cannot be read is skipped."""
        _check_name(name)
        backings = {f"{IMAGES_DIR}/{name}.{fmt}" for fmt in IMAGE_FORMATS}
        users = set()
        for ds in self.datastores.names():
            try:
                records = sorted(self.datastores.resolve(ds, ".").glob(f"*/{RECORD}"))
            except OSError:
                continue
            for record in records:
                try:
                    config = VmConfig.model_validate_json(record.read_text())
                except (OSError, ValueError):
                    continue
                if any(d.datastore == datastore and d.backing in backings for d in config.disks):
                    users.add(config.name)
        return sorted(users)

    def delete(self, datastore: str, name: str) -> None:
        """Remove the image and its metadata (or what an interrupted import left of them).
        Raises NotFound, Conflict (``image_in_use``, naming the VMs)."""
        _check_name(name)
        folder = self._folder(datastore)
        present = [folder / f"{name}.{f}" for f in (*IMAGE_FORMATS, "json")]
        present = [p for p in present if p.exists()]
        if not present:
            raise NotFound(f"no image {name!r} on datastore {datastore!r}", code="image_not_found")
        users = self.users(datastore, name)
        if users:
            raise Conflict(f"image {name!r} is the base of VM(s) {', '.join(users)}: delete "
                           "them or move their disks first", code="image_in_use")  # fmt: skip
        for path in sorted(present, key=lambda p: p.suffix != ".json"):  # metadata first
            path.unlink(missing_ok=True)


def _check_name(name: str) -> None:
    """An image's name is a file name in ``.images/``: the VM name rules (no '/', no '..')."""
    try:
        check_name(name, "image name")
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_name") from None


def _exists(datastore: str, name: str) -> Conflict:
    return Conflict(f"datastore {datastore!r} has an image {name!r} already: delete it first "
                    "or choose another name", code="image_exists")  # fmt: skip


def _link(source: Path, name: Path, info: ImageInfo) -> None:
    try:
        os.link(source, name)  # unlike a rename, never replaces what has the name
    except FileExistsError:
        raise _exists(info.datastore, info.name) from None


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(PROBE_BYTES)


async def _receive(path: Path, chunks: AsyncIterator[bytes], limit: int) -> tuple[int, str]:
    """Write the stream to ``path`` (fsynced, off the event loop); its size and sha256. Stops
    with InsufficientResources past ``limit`` or when the datastore fills up."""
    written, digest = 0, hashlib.sha256()

    def put(out: BinaryIO, data: bytes) -> None:
        out.write(data)
        digest.update(data)  # hashlib lets go of the GIL for large data

    def sync(out: BinaryIO) -> None:
        out.flush()
        os.fsync(out.fileno())

    with open(path, "xb") as out:
        async for chunk in chunks:
            written += len(chunk)
            if written > limit:
                raise InsufficientResources(
                    "the upload is larger than announced or than the datastore's free space",
                    code="insufficient_space",
                )
            await _disk(put, out, chunk)
        await _disk(sync, out)
    return written, digest.hexdigest()


async def _disk(fn: Callable[..., None], *args: Any) -> None:
    """A write in a thread; the datastore's errors become ours (the stream's stay its own)."""
    try:
        await asyncio.to_thread(fn, *args)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientResources("the datastore filled up during the upload: free space "
                                        "there or choose another datastore",
                                        code="insufficient_space") from exc  # fmt: skip
        raise ExecutionError(f"writing the image failed: {exc}", code="image_write_failed") from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the new names survive a crash
    finally:
        os.close(fd)
