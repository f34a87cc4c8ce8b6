"""UEFI VMs: OVMF found (or a refusal saying what to install), the VM's own variable store made,
copied and removed with its files, and the flash on the QEMU command line. Moves with a real
guest: tests/lab/test_uefi_vm.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kvmotion.errors import NotFound
from kvmotion.host import firmware
from kvmotion.host.config import DatastoreConfig
from kvmotion.host.datastores import Datastores
from kvmotion.host.vmconfig import DiskConfig, VmConfig, VmCreateRequest
from kvmotion.host.vmfiles import create_vm_files, remove_vm_files
from kvmotion.qemu.cmdline import build_command
from tests.unit.test_cmdline import launch

OVMF = Path("/usr/share/OVMF")
needs_ovmf = pytest.mark.skipif(
    not (OVMF / firmware.OVMF_VARS).is_file(), reason="Debian's ovmf is not installed"
)


def uefi_config(datastore: str = "ds1") -> VmConfig:
    return VmConfig(
        uuid="1b4e28ba-2fa1-11d2-883f-0016d3cca427", name="vm-u", datastore=datastore, vcpus=1,
        memory_mib=256, disks=(DiskConfig(datastore=datastore, path="vm-u/vm-u.qcow2",
                                          size_mib=16),),
        nics=(), cpu_model="qemu64", machine_type="pc", boot_image=None, kernel_args="",
        created_at=datetime.now(UTC), firmware="uefi",
    )  # fmt: skip


def test_the_firmware_is_asked_for_and_bios_stays_the_default() -> None:
    assert VmCreateRequest(name="a", datastore="ds").firmware == "bios"
    assert VmCreateRequest(name="a", datastore="ds", firmware="uefi").firmware == "uefi"
    with pytest.raises(ValueError):
        VmCreateRequest(name="a", datastore="ds", firmware="coreboot")  # type: ignore[arg-type]
    assert uefi_config().vars_path == "vm-u/vm-u_VARS.fd"
    assert uefi_config().model_copy(update={"firmware": "bios"}).vars_path is None


def test_missing_ovmf_is_refused_saying_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        firmware.ovmf_file(firmware.OVMF_CODE, (tmp_path,))
    assert info.value.code == "firmware_not_found" and "ovmf" in info.value.message


def test_a_uefi_vm_boots_from_flash_code_read_only_and_its_own_variables() -> None:
    argv = build_command(launch(
        kernel=None, initrd=None, append="",
        uefi=(Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/ds/vm-u/vm-u_VARS.fd")),
    ))  # fmt: skip
    joined = " ".join(argv)
    assert argv[argv.index("-machine") + 1] == "pc-q35-7.2,pflash0=pflash0,pflash1=pflash1"
    assert "filename=/usr/share/OVMF/OVMF_CODE_4M.fd,node-name=pflash0-file,read-only=on" in joined
    assert "driver=raw,file=pflash0-file,node-name=pflash0,read-only=on" in joined
    assert "filename=/ds/vm-u/vm-u_VARS.fd,node-name=pflash1-file" in joined
    assert "node-name=pflash1 " in joined + " " and "pflash1,read-only" not in joined
    assert "pflash" not in " ".join(build_command(launch()))  # SeaBIOS: nothing


@needs_ovmf
async def test_the_variable_store_is_made_copied_and_removed_with_the_vm(tmp_path: Path) -> None:
    stores = Datastores([DatastoreConfig(name=n, path=tmp_path / n) for n in ("ds1", "ds2")])
    for n in ("ds1", "ds2"):
        (tmp_path / n).mkdir()
    config = uefi_config()
    record, _ = await create_vm_files(config, stores)
    store = tmp_path / "ds1/vm-u/vm-u_VARS.fd"
    assert store.read_bytes() == (OVMF / firmware.OVMF_VARS).read_bytes()  # OVMF's empty one
    with store.open("r+b") as f:  # what the guest's SetVariable would have written
        f.seek(4096)
        f.write(b"BootOrder-of-this-VM")
    moved = config.moved_to("ds2")
    await create_vm_files(moved, stores, vars_from=store)  # a cold move copies it
    assert (tmp_path / "ds2/vm-u/vm-u_VARS.fd").read_bytes() == store.read_bytes()
    assert remove_vm_files(config, stores, record) == []
    assert not (tmp_path / "ds1/vm-u").exists()  # store, disk, record and folder gone
