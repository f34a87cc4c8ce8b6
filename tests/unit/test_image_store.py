"""Importing OS images onto a datastore: good ones kept, hostile ones refused leaving nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmotion.errors import Conflict, InsufficientResources, InvalidInput, NotFound
from kvmotion.host.config import DatastoreConfig
from kvmotion.host.datastores import Datastores
from kvmotion.host.images import ImageInfo, ImageStore


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    root = tmp_path / "ds"
    root.mkdir()
    return ImageStore(Datastores([DatastoreConfig(name="shared", path=root, shared=True)]))


async def chunks(
    path: Path, size: int = 65536, fail_after: int | None = None
) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        sent = 0
        while data := f.read(size):
            if fail_after is not None and sent >= fail_after:
                raise ConnectionResetError("the client went away")
            sent += len(data)
            yield data


def put(
    store: ImageStore, path: Path, name: str, fmt: str | None = None, **kw: object
) -> ImageInfo:
    async def run() -> ImageInfo:
        return await store.import_stream(
            "shared",
            name,
            chunks(path, fail_after=kw.pop("fail_after", None)),  # type: ignore[arg-type]
            length=kw.pop("length", path.stat().st_size),
            declared_format=fmt,  # type: ignore[arg-type]
            filename=path.name,
        )

    return asyncio.run(run())


def files(store: ImageStore) -> list[str]:
    folder = store.datastores.resolve("shared", ".images")
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def good_qcow2(tmp: Path) -> Path:
    path = tmp / "good.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 4M", str(path)], check=True,
                   capture_output=True)  # fmt: skip
    return path


def test_good_images_are_kept_and_listed(store: ImageStore, tmp_path: Path) -> None:
    info = put(store, good_qcow2(tmp_path), "debian", None)
    assert (info.format, info.virtual_size) == ("qcow2", 64 * 2**20)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\1" * (2 << 20))
    assert put(store, raw, "plain", "raw").format == "raw"
    assert [i.name for i in store.list_images()] == ["debian", "plain"]
    assert files(store) == ["debian.json", "debian.qcow2", "plain.json", "plain.raw"]
    with pytest.raises(Conflict):
        put(store, raw, "plain", "raw")


def hostile(tmp: Path) -> dict[str, tuple[Path, str | None, type[Exception]]]:
    good = good_qcow2(tmp)
    truncated = tmp / "truncated.qcow2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    shadow = tmp / "shadow.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(shadow), "64M")
    raw = tmp / "raw.img"
    raw.write_bytes(b"\0" * (1 << 20))
    claims = tmp / "claims-raw.img"  # a qcow2 header inside a file declared raw
    claims.write_bytes(shadow.read_bytes())
    empty = tmp / "empty.qcow2"
    empty.write_bytes(b"")
    vmdk = tmp / "disk.vmdk"
    qemu_img("create", "-f", "vmdk", str(vmdk), "16M")
    noise = tmp / "noise.qcow2"
    noise.write_bytes(b"QFI\xfb" + bytes(range(256)) * 64)
    return {
        "truncated": (truncated, None, InvalidInput),
        "backing-shadow": (shadow, None, InvalidInput),
        "raw-declared-qcow2": (raw, "qcow2", InvalidInput),
        "qcow2-declared-raw": (claims, "raw", InvalidInput),
        "empty": (empty, None, InvalidInput),
        "vmdk": (vmdk, None, InvalidInput),
        "noise": (noise, "qcow2", InvalidInput),
    }


def test_hostile_files_are_refused_and_leave_nothing(store: ImageStore, tmp_path: Path) -> None:
    for name, (path, fmt, error) in hostile(tmp_path).items():
        with pytest.raises(error):
            put(store, path, name, fmt)
        assert files(store) == [], name
    assert store.list_images() == []


def test_broken_uploads_and_full_datastores_leave_nothing(
    store: ImageStore, tmp_path: Path
) -> None:
    good = good_qcow2(tmp_path)
    with pytest.raises(ConnectionResetError):
        put(store, good, "broken", None, fail_after=65536)
    assert files(store) == []
    with pytest.raises(InvalidInput, match="ended after"):
        put(store, good, "short", None, length=good.stat().st_size + 1)
    with pytest.raises(InsufficientResources):
        put(store, good, "huge", None, length=1 << 60)
    assert files(store) == []


def test_delete_is_refused_while_a_vm_reads_through_the_image(
    store: ImageStore, tmp_path: Path
) -> None:
    put(store, good_qcow2(tmp_path), "debian", None)
    root = store.datastores.resolve("shared", ".")
    (root / "web1").mkdir()
    record = {
        "uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "name": "web1", "datastore": "shared",
        "vcpus": 1, "memory_mib": 256, "nics": [], "cpu_model": "qemu64",
        "machine_type": "q35", "boot_image": None, "kernel_args": "",
        "created_at": "2026-12-04T00:00:00Z",
        "disks": [{"datastore": "shared", "path": "web1/web1.qcow2", "size_mib": 64,
                   "backing": ".images/debian.qcow2", "backing_format": "qcow2"}],
    }  # fmt: skip
    (root / "web1" / "vm.json").write_text(json.dumps(record))
    assert store.users("shared", "debian") == ["web1"]
    with pytest.raises(Conflict, match="web1"):
        store.delete("shared", "debian")
    (root / "web1" / "vm.json").unlink()
    store.delete("shared", "debian")
    assert files(store) == []
    with pytest.raises(NotFound):
        store.delete("shared", "debian")


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", ""])
def test_names_that_are_not_file_names_are_refused(store: ImageStore, name: str) -> None:
    with pytest.raises(InvalidInput):
        store.delete("shared", name)
    with pytest.raises(InvalidInput):
        store.users("shared", name)


def test_center_counts_only_vms_on_exactly_this_image() -> None:
    from kvmotion.center.db import Vm
    from kvmotion.center.images import users

    def vm(name: str, datastore: str, backing: str | None) -> Vm:
        disks = [{"datastore": datastore, "path": f"{name}/{name}.qcow2", "backing": backing}]
        return Vm(name=name, uuid=name, config={"disks": disks})

    vms = [
        vm("a", "shared", ".images/debian.qcow2"),
        vm("b", "shared", ".images/debian.12.qcow2"),  # another image whose name starts alike
        vm("c", "local", ".images/debian.qcow2"),  # the same name on another datastore
        vm("d", "shared", None),
    ]
    assert users(vms, "shared", "debian") == ["a"]
