"""OS images on datastores, against real qemu-img: what the header sniffing refuses before
qemu-img opens a file, each refusal's code, imports that race or break leaving nothing, who uses
an image, and VMs made from one through the agent's API (overlay, copy, grow, never shrink).

tests/unit/test_image_store.py has the first hostile files; these add to them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from kvmotion.errors import Conflict, InsufficientResources, InvalidInput, NotFound
from kvmotion.host.agent import HostAgent
from kvmotion.host.api import create_app
from kvmotion.host.client import AgentClient
from kvmotion.host.config import DatastoreConfig, HostConfig, NetworkConfig
from kvmotion.host.datastores import DatastoreInfo, Datastores
from kvmotion.host.images import PROBE_BYTES, ImageStore, _qemu_img, sniff

TOKEN = "t0ken"
MiB = 2**20


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


class Cramped(Datastores):
    """Datastores whose free space is what the test says (the seam import_stream reads)."""

    def __init__(self, configs: list[DatastoreConfig], free: int | None = None) -> None:
        super().__init__(configs)
        self.free = free

    async def info(self, name: str, timeout: float = 5.0) -> DatastoreInfo:
        real = await super().info(name, timeout)
        return real if self.free is None else dataclasses.replace(real, free_bytes=self.free)


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    found = {name: tmp_path / name for name in ("shared", "local")}
    for root in found.values():
        root.mkdir()
    return found


@pytest.fixture
def datastores(roots: dict[str, Path]) -> Cramped:
    return Cramped(configs(roots))


def configs(roots: dict[str, Path]) -> list[DatastoreConfig]:
    return [DatastoreConfig(name=n, path=p, shared=n == "shared") for n, p in roots.items()]


@pytest.fixture
def store(datastores: Cramped) -> ImageStore:
    return ImageStore(datastores)


async def stream(data: bytes, size: int = 65536, fail_after: int | None = None,
                 gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:  # fmt: skip
    for sent in range(0, len(data), size):
        if fail_after is not None and sent >= fail_after:
            raise ConnectionResetError("the client went away")
        if gate is not None and sent:
            await gate.wait()
        yield data[sent : sent + size]


async def put(store: ImageStore, data: bytes, name: str, fmt: str | None = None,
              datastore: str = "shared", **kw: object) -> object:  # fmt: skip
    length = kw.pop("length", len(data))
    return await store.import_stream(
        datastore, name, stream(data, **kw),  # type: ignore[arg-type]
        length=length, declared_format=fmt, filename="upload.img",  # type: ignore[arg-type]
    )  # fmt: skip


def images_dir(roots: dict[str, Path], ds: str = "shared") -> list[str]:
    folder = roots[ds] / ".images"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def good_qcow2(tmp: Path, size: str = "64M") -> Path:
    path = tmp / f"good-{size}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(path)], check=True,
                   capture_output=True)  # fmt: skip
    return path


# -- the header, classified before qemu-img opens the file --------------------------------------

FORMATS_QEMU_IMG_MAKES = ["qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "parallels"]


@pytest.mark.parametrize("fmt", FORMATS_QEMU_IMG_MAKES)
def test_sniff_agrees_with_qemus_probe(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(path), "16M")
    probed = json.loads(qemu_img("info", "--output=json", str(path)))["format"]
    assert sniff(path.read_bytes()[:PROBE_BYTES]) == probed == fmt


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"# Disk DescriptorFile\nversion=1\nCID=1\n", "vmdk"),
        (b"#c\n   \r\n  \nversion=3\r\n", "vmdk"),
        (b"version=2\n", "vmdk"),
        (b"\nversion=1\n", None),  # an empty line ends QEMU's search
        (b"# comment only", None),
        (b"\xeb\x63\x90" + b"\0" * 507 + b"\x55\xaa", None),  # an MBR: a raw disk
        (b"\0" * 4096, None),
        (b"QFI\xfb\0\0\0\x01", "qcow"),
        (b"QFI\xfb\0\0\0\x07", "qcow2"),  # qemu-img will refuse to read it, as qcow2
        (b"\0" * 64 + b"\x7f\x10\xda\xbe", "vdi"),
        (b"LUKS\xba\xbe\0\x01", "luks"),
    ],
)
def test_sniff(head: bytes, expected: str | None) -> None:
    assert sniff(head) == expected


def test_sniff_on_random_bytes_agrees_with_qemu(tmp_path: Path) -> None:
    path = tmp_path / "noise"
    path.write_bytes(os.urandom(1 << 16))
    assert sniff(path.read_bytes()[:PROBE_BYTES]) is None
    assert json.loads(qemu_img("info", "--output=json", str(path)))["format"] == "raw"


# -- hostile files: each refused with its own code, leaving nothing ------------------------------

Maker = Callable[[Path], tuple[bytes, str | None]]


def _qemu_made(fmt: str, *opts: str) -> Maker:
    def make(tmp: Path) -> tuple[bytes, str | None]:
        path = tmp / f"made.{fmt}"
        qemu_img("create", "-q", "-f", fmt, *opts, str(path), "16M")
        return path.read_bytes(), None

    return make


def _truncated(tmp: Path) -> tuple[bytes, str | None]:
    data = good_qcow2(tmp).read_bytes()
    return data[: len(data) // 2], None


def _header_only(tmp: Path) -> tuple[bytes, str | None]:
    return good_qcow2(tmp).read_bytes()[:100], "qcow2"


def _backing(target: str, declared: str | None) -> Maker:
    def make(tmp: Path) -> tuple[bytes, str | None]:
        path = tmp / "backed.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", target, "-u", str(path), "16M")
        return path.read_bytes(), declared

    return make


def _data_file(tmp: Path) -> tuple[bytes, str | None]:
    path = tmp / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp / 'df.raw'}", str(path), "16M")
    return path.read_bytes(), "qcow2"


def _encrypted(tmp: Path) -> tuple[bytes, str | None]:
    path = tmp / "enc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
             "-o", "encrypt.format=luks,encrypt.key-secret=s0", str(path), "16M")  # fmt: skip
    return path.read_bytes(), None


def _marked_corrupt(tmp: Path) -> tuple[bytes, str | None]:
    data = bytearray(good_qcow2(tmp).read_bytes())
    data[79] |= 0b10  # incompatible_features bit 1: QEMU found it corrupt
    return bytes(data), None


def _vmdk_extent_fifo(tmp: Path) -> tuple[bytes, str | None]:
    """A descriptor whose extent is a FIFO: qemu-img probing it would hang on the open."""
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    text = ('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
            f'createType="monolithicFlat"\nRW 32768 FLAT "{fifo}" 0\n')  # fmt: skip
    return text.encode(), None


def _vmdk_declared_raw(tmp: Path) -> tuple[bytes, str | None]:
    return _vmdk_extent_fifo(tmp)[0], "raw"


HOSTILE: dict[str, tuple[Maker, str]] = {
    "truncated qcow2": (_truncated, "image_corrupt"),
    "qcow2 header only": (_header_only, "image_corrupt"),
    "marked corrupt": (_marked_corrupt, "image_corrupt"),
    "backing /etc/shadow": (_backing("/etc/shadow", None), "image_backing_file"),
    "backing /etc/shadow, declared qcow2": (_backing("/etc/shadow", "qcow2"), "image_backing_file"),
    "qcow2 declared raw": (_backing("/etc/shadow", "raw"), "image_format"),
    "good qcow2 declared raw": (lambda t: (good_qcow2(t).read_bytes(), "raw"), "image_format"),
    "raw declared qcow2": (lambda t: (b"\0" * MiB, "qcow2"), "image_format"),
    "random bytes declared qcow2": (lambda t: (os.urandom(MiB), "qcow2"), "image_format"),
    "qcow2 magic and noise": (lambda t: (b"QFI\xfb" + os.urandom(MiB), "qcow2"), "image_"),
    "data file": (_data_file, "image_data_file"),
    "encrypted": (_encrypted, "image_encrypted"),
    "17 TiB": (lambda t: (_big(t), None), "image_too_large"),
    "empty": (lambda t: (b"", None), "image_invalid"),
    "vmdk extent on a FIFO": (_vmdk_extent_fifo, "image_format"),
    "vmdk descriptor declared raw": (_vmdk_declared_raw, "image_format"),
    **{f: (_qemu_made(f), "image_format") for f in ["vmdk", "vdi", "vhdx", "qed", "vpc", "qcow"]},
    "luks": (
        _qemu_made("luks", "--object", "secret,id=s0,data=pw", "-o", "key-secret=s0"),
        "image_format",
    ),
}


def _big(tmp: Path) -> bytes:
    path = tmp / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "17T")
    return path.read_bytes()


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_file_is_refused_with_its_code_and_leaves_nothing(
    store: ImageStore, roots: dict[str, Path], tmp_path: Path, case: str
) -> None:
    make, code = HOSTILE[case]
    data, declared = make(tmp_path)
    started = time.monotonic()
    with pytest.raises(InvalidInput) as refused:
        await put(store, data, "hostile", declared)
    assert refused.value.code.startswith(code), refused.value.message
    assert refused.value.message.startswith("not imported: ")
    assert time.monotonic() - started < 20  # never the 120 s qemu-img timeout
    assert images_dir(roots) == [] and store.list_images() == []


async def test_qemu_img_dies_with_a_cancelled_import(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TimeoutError):  # qemu-img blocks opening the FIFO; wait_for cancels
        await asyncio.wait_for(_qemu_img("info", "-f", "raw", str(fifo)), 1.0)
    await asyncio.sleep(0.1)
    left = [p for p in Path("/proc").glob("[0-9]*")
            if str(fifo).encode() in _cmdline(p)]  # fmt: skip
    assert left == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


# -- good imports, space, broken and racing uploads ---------------------------------------------


async def test_good_images_record_their_sha256_and_are_listed_per_datastore(
    store: ImageStore, roots: dict[str, Path], tmp_path: Path
) -> None:
    data = good_qcow2(tmp_path).read_bytes()
    info = await put(store, data, "debian", None)
    raw = os.urandom(2 * MiB)  # random bytes are a raw disk, undeclared
    await put(store, raw, "plain", None, datastore="local")
    meta = json.loads((roots["shared"] / ".images" / "debian.json").read_text())
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() == info.sha256  # type: ignore[attr-defined]
    assert (meta["format"], meta["virtual_size"], meta["size"]) == ("qcow2", 64 * MiB, len(data))
    assert meta["filename"] == "upload.img" and meta["imported_at"]
    assert [(i.datastore, i.name, i.format) for i in store.list_images()] == [
        ("local", "plain", "raw"), ("shared", "debian", "qcow2"),
    ]  # fmt: skip
    assert [i.name for i in store.list_images("local")] == ["plain"]
    with pytest.raises(NotFound):
        store.list_images("elsewhere")
    assert images_dir(roots) == ["debian.json", "debian.qcow2"]  # no temporary file left


async def test_leftovers_are_not_listed_and_delete_removes_them(
    store: ImageStore, roots: dict[str, Path]
) -> None:
    folder = roots["shared"] / ".images"
    folder.mkdir()
    (folder / "orphan.raw").write_bytes(b"\0" * 512)  # an import interrupted before its metadata
    (folder / "ghost.json").write_text("{}")
    (folder / ".hidden.json").write_text("{}")
    assert store.list_images() == []
    with pytest.raises(Conflict, match="delete it first"):
        await put(store, b"\1" * 512, "orphan", "raw")
    store.delete("shared", "orphan")
    store.delete("shared", "ghost")
    assert (await put(store, b"\1" * 512, "orphan", "raw")).format == "raw"  # type: ignore[attr-defined]


async def test_space_is_checked_before_and_while_writing(
    store: ImageStore, datastores: Cramped, roots: dict[str, Path]
) -> None:
    datastores.free = MiB
    with pytest.raises(InsufficientResources, match="has 1048576 free"):
        await put(store, b"\0" * 2 * MiB, "big", "raw")
    with pytest.raises(InsufficientResources):  # no length: stopped once past the free space
        await put(store, b"\0" * 2 * MiB, "big", "raw", length=None)
    datastores.free = None
    with pytest.raises(InsufficientResources):  # more than announced
        await put(store, b"\0" * 2 * MiB, "big", "raw", length=MiB)
    assert images_dir(roots) == []


async def test_broken_or_cancelled_uploads_leave_nothing(
    store: ImageStore, roots: dict[str, Path]
) -> None:
    with pytest.raises(ConnectionResetError):
        await put(store, b"\0" * 2 * MiB, "broken", "raw", fail_after=MiB)
    assert images_dir(roots) == []
    gate = asyncio.Event()
    task = asyncio.create_task(put(store, b"\0" * 2 * MiB, "cancelled", "raw", gate=gate))
    while not images_dir(roots):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert images_dir(roots) == []


@pytest.mark.parametrize("formats", [("raw", "raw"), ("raw", "qcow2")])
async def test_racing_imports_of_one_name_keep_one(
    store: ImageStore, roots: dict[str, Path], tmp_path: Path, formats: tuple[str, str]
) -> None:
    """Both pass the early check; the one that names its files first wins, whole."""
    bodies = {"raw": b"\1" * MiB, "qcow2": good_qcow2(tmp_path).read_bytes()}
    gate = asyncio.Event()
    tasks = [
        asyncio.create_task(put(store, bodies[f], "twin", f, gate=gate, size=MiB // 2))
        for f in formats
    ]
    await asyncio.sleep(0.2)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "ImageInfo"]
    [kept] = store.list_images()
    assert images_dir(roots) == ["twin.json", f"twin.{kept.format}"]


# -- who uses an image ---------------------------------------------------------------------------


def record(roots: dict[str, Path], on: str, vm: str, disks: list[dict[str, object]]) -> None:
    body = {
        "uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "name": vm, "datastore": on, "vcpus": 1,
        "memory_mib": 256, "nics": [], "cpu_model": "qemu64", "machine_type": "q35",
        "boot_image": None, "kernel_args": "", "created_at": "2026-12-04T00:00:00Z",
        "disks": disks,
    }  # fmt: skip
    (roots[on] / vm).mkdir()
    (roots[on] / vm / "vm.json").write_text(json.dumps(body))


def disk(ds: str, backing: str | None) -> dict[str, object]:
    return {"datastore": ds, "path": "x/x.qcow2", "size_mib": 64, "backing": backing,
            "backing_format": "qcow2" if backing else None}  # fmt: skip


async def test_users_match_the_image_exactly_and_on_every_datastores_records(
    store: ImageStore, roots: dict[str, Path], tmp_path: Path
) -> None:
    data = good_qcow2(tmp_path).read_bytes()
    for name in ("debian", "debian.12"):
        await put(store, data, name, "qcow2")
    record(roots, "shared", "web1", [disk("shared", ".images/debian.12.qcow2")])
    record(roots, "local", "web2", [disk("shared", ".images/debian.qcow2")])  # record elsewhere
    record(roots, "shared", "web3", [disk("local", ".images/debian.qcow2")])  # local's image
    assert store.users("shared", "debian.12") == ["web1"]
    assert store.users("shared", "debian") == ["web2"]
    with pytest.raises(Conflict, match="web2") as refused:
        store.delete("shared", "debian")
    assert refused.value.code == "image_in_use"
    (roots["local"] / "web2" / "vm.json").unlink()
    store.delete("shared", "debian")
    assert [i.name for i in store.list_images()] == ["debian.12"]


# -- through the agent's API: import, VMs from an image, delete ---------------------------------


@pytest.fixture
async def agent(roots: dict[str, Path], tmp_path: Path) -> AsyncIterator[AgentClient]:
    config = HostConfig(
        name="172.16.0.172", management_address="127.0.0.1", token=TOKEN,
        run_dir=tmp_path / "run", accel="tcg",
        datastores=configs(roots),
        networks=[NetworkConfig(name="vm-network", bridge="kvtest-nobr")],
    )  # fmt: skip
    app = create_app(HostAgent(config))
    async with app.router.lifespan_context(app):
        yield AgentClient("http://agent", TOKEN, transport=httpx.ASGITransport(app=app))


async def test_api_imports_refuses_lists_and_deletes(
    agent: AgentClient, roots: dict[str, Path], tmp_path: Path
) -> None:
    data = good_qcow2(tmp_path).read_bytes()
    info = await agent.import_image("shared", "debian", stream(data), length=len(data), fmt=None,
                                    filename="debian-12.qcow2")  # fmt: skip
    assert (info.format, info.virtual_size, info.filename) == ("qcow2", 64 * MiB, "debian-12.qcow2")
    shadow, _ = _backing("/etc/shadow", None)(tmp_path)
    with pytest.raises(InvalidInput) as refused:
        await agent.import_image("shared", "evil", stream(shadow), length=len(shadow), fmt=None)
    assert refused.value.code == "image_backing_file"
    with pytest.raises(Conflict):
        await agent.import_image("shared", "debian", stream(data), length=len(data), fmt="qcow2")
    assert [i.name for i in await agent.list_images()] == ["debian"]
    assert images_dir(roots) == ["debian.json", "debian.qcow2"]
    await agent.delete_image("shared", "debian")
    with pytest.raises(NotFound):
        await agent.delete_image("shared", "debian")
    assert await agent.list_images() == []


async def test_vms_from_an_image_overlay_on_its_datastore_and_copy_elsewhere(
    agent: AgentClient, roots: dict[str, Path], tmp_path: Path
) -> None:
    data = good_qcow2(tmp_path).read_bytes()
    await agent.import_image("shared", "debian", stream(data), length=len(data), fmt=None)

    async def create(name: str, **disk: object) -> httpx.Response:
        body = {"name": name, "datastore": "shared", "image": "debian", "disks": [disk]}
        return await agent._http.post("/v1/vms", json=body)

    assert (await create("web1")).status_code == 201  # on the image's datastore: an overlay
    overlay = roots["shared"] / "web1" / "web1.qcow2"
    chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(overlay)))
    assert chain[0]["backing-filename"] == "../.images/debian.qcow2"  # whatever the mount point
    assert chain[1]["filename"] == str(roots["shared"] / "web1" / "../.images/debian.qcow2")
    assert chain[0]["virtual-size"] == 64 * MiB

    assert (await create("web2", datastore="local", size_mib=128)).status_code == 201  # a copy
    copy = roots["local"] / "web2" / "web2.qcow2"
    info = json.loads(qemu_img("info", "--output=json", str(copy)))
    assert "backing-filename" not in info and info["virtual-size"] == 128 * MiB  # grown
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(overlay), str(copy))  # same data

    r = await create("web3", size_mib=32)  # never smaller than the image
    assert r.status_code == 422 and r.json()["error"]["code"] == "disk_smaller_than_image"
    assert not (roots["shared"] / "web3").exists()

    with pytest.raises(Conflict, match="web1"):
        await agent.delete_image("shared", "debian")
    assert (await agent._http.delete("/v1/vms/web1")).status_code == 204
    await agent.delete_image("shared", "debian")  # the copy never needed it
    assert images_dir(roots) == []
