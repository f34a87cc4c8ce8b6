"""The firmware a VM boots with: SeaBIOS (QEMU's default, nothing to do), or UEFI from OVMF.

A UEFI VM runs the host's OVMF code (read-only flash, ``pflash0``) and its own variable store
(``pflash1``: boot entries, Secure Boot keys, whatever the guest's ``SetVariable`` wrote), a copy
of OVMF's empty store made when the VM is created, kept beside its record on its datastore
(``VmConfig.vars_path``) so it moves with the VM:

- compute moves: both hosts open the same file on the shared datastore; QEMU migrates the flash
  contents with the RAM and the destination writes them back to the file as it resumes;
- "both": the destination gets a fresh store from the template, which QEMU overwrites the same way
  with the migrated contents (checked by hand: the source's bytes are in the destination's file);
- storage-only: :func:`switch_vars` copies the store while the guest is paused for it (a
  few ms) and points the flash at the copy (``blockdev-reopen``);
- cold moves copy the file with the disks.

The 4 MiB builds (Debian's ``ovmf``: the 2 MiB ones have too little room for variables) are used
on every host, so the flash devices' sizes match on both sides of a migration.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from kvmotion.errors import NotFound
from kvmotion.qemu.qmp import QmpSession

OVMF_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/ovmf"), Path("/usr/share/qemu"))
OVMF_CODE = "OVMF_CODE_4M.fd"
OVMF_VARS = "OVMF_VARS_4M.fd"
VARS_NODE = "pflash1"


def ovmf_file(name: str, dirs: tuple[Path, ...] = OVMF_DIRS) -> Path:
    """OVMF's ``name`` on this host. Raises NotFound saying what to install."""
    for folder in dirs:
        if (folder / name).is_file():
            return folder / name
    raise NotFound(
        f"UEFI firmware {name} is not on this host (looked in "
        f"{', '.join(str(d) for d in dirs)}): install Debian's ovmf package",
        code="firmware_not_found",
    )


def new_vars(path: Path) -> None:
    """An empty variable store for a new VM (OVMF's template), written whole before use."""
    copy_vars(ovmf_file(OVMF_VARS), path)


def copy_vars(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    partial.replace(target)


async def switch_vars(qmp: QmpSession, current: Path, target: Path) -> None:
    """Point a running UEFI VM's variable store at a copy on another datastore: paused while
    the file is copied (no ``SetVariable`` can land between the copy and the switch), then
    the flash's raw node reopened on the copy, the old file node closed, and the guest
    resumed. Raises QemuError (the VM keeps its store; it is resumed if it was running)."""
    running = (await qmp.execute("query-status")).get("running", False)
    if running:
        await qmp.execute("stop")
    try:
        await asyncio.to_thread(copy_vars, current, target)
        file_node = f"{VARS_NODE}-file-{os.urandom(3).hex()}"
        await qmp.execute(
            "blockdev-add", {"driver": "file", "filename": str(target), "node-name": file_node}
        )
        old = await _file_child(qmp, current)
        await qmp.execute(
            "blockdev-reopen",
            {"options": [{"driver": "raw", "node-name": VARS_NODE, "file": file_node}]},
        )
        if old is not None:
            await qmp.execute("blockdev-del", {"node-name": old})
    finally:
        if running:
            await qmp.execute("cont")


async def _file_child(qmp: QmpSession, path: Path) -> str | None:
    """The protocol node that reads the variable store's file at ``path``."""
    for node in await qmp.execute("query-named-block-nodes", {"flat": True}):
        if node.get("drv") == "file" and node.get("file") == str(path):
            name = str(node.get("node-name", ""))
            if name.startswith(VARS_NODE):
                return name
    return None
