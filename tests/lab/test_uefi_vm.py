"""A UEFI VM, as a user makes one: `vm create --firmware uefi` from the Debian image, booted by
OVMF with its own variable store on its datastore. The guest writes UEFI variables (as
efibootmgr or a Secure Boot key update would) before and after a compute, a storage and a "both"
move: after each, every variable is in the store file where the VM's record now says it is, and
one written after the move lands there (QEMU writes to the moved store, not the old one). Then a
cold boot (powered off, then on), which reads the store from the file: the guest sees all of
them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion.lab import realclients, topology
from kvmotion.lab.osimage import build_os_image
from tests.lab.conftest import center_http, wait_task
from tests.lab.test_real_vm import IMAGE, USER, kvmotion, wait_address

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
VM = "uefi1"
BOOT_TIMEOUT_S = 900
# A vendor GUID of our own for the test's variables (any GUID is the guest's to use)
GUID = "6b6f7461-6e6f-4d6b-b675-6b766d6f7465"


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


@pytest.fixture(scope="module")
def guest(lab: topology.LabState, center: httpx.Client, key: Path) -> Iterator[dict[str, Any]]:
    done = kvmotion("image", "import", str(build_os_image().path), "--datastore", "shared",
                    "--name", IMAGE)  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = kvmotion(
        "vm", "create", VM, "--host", SRC, "--datastore", "shared", "--image", IMAGE,
        "--firmware", "uefi", "--memory", "512", "--network", "vm-network",
        "--ssh-key", f"{key}.pub",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    try:
        yield {"address": boot(lab, center, key)}
    finally:
        center.post(f"/v1/vms/{VM}/power-off")
        center.delete(f"/v1/vms/{VM}")


def boot(lab: topology.LabState, center: httpx.Client, key: Path) -> str:
    started = time.monotonic()
    assert kvmotion("vm", "start", VM).returncode == 0
    address, _ = wait_address(center, BOOT_TIMEOUT_S, VM)
    realclients.wait_ssh(lab.client_netns, key, USER, address, BOOT_TIMEOUT_S)
    print(f"\nOVMF boot to SSH: {time.monotonic() - started:.1f} s")
    return address


def ssh(lab: topology.LabState, key: Path, address: str, command: str) -> str:
    return realclients.ssh_run(lab.client_netns, key, USER, address, command, 120)


def set_variable(lab: topology.LabState, key: Path, address: str, name: str, value: str) -> None:
    """A non-volatile UEFI variable, written through the kernel's efivarfs (attributes NV, BS
    and RT, then the data), in one write as efivarfs wants."""
    ssh(lab, key, address,
        f"printf '\\007\\000\\000\\000{value}' > /tmp/var && sudo -n dd status=none bs=4k "
        f"if=/tmp/var of=/sys/firmware/efi/efivars/{name}-{GUID}")  # fmt: skip


def store_file(lab: topology.LabState, center: httpx.Client) -> Path:
    """The variable store where the VM's record says it is."""
    vm = center.get(f"/v1/vms/{VM}").json()
    roots = {"shared": lab.shared_datastore} | {h.local_datastore.name: h.local_datastore
                                                  for h in lab.hosts}  # fmt: skip
    return roots[vm["config"]["datastore"]] / VM / f"{VM}_VARS.fd"


def test_the_guest_booted_through_uefi(
    lab: topology.LabState, center: httpx.Client, key: Path, guest: dict[str, Any]
) -> None:
    assert ssh(lab, key, guest["address"], "test -d /sys/firmware/efi && echo uefi").strip() == (
        "uefi"
    )
    vm = center.get(f"/v1/vms/{VM}").json()
    assert vm["config"]["firmware"] == "uefi"
    assert store_file(lab, center).stat().st_size > 0


def test_the_variable_store_moves_with_the_vm(
    lab: topology.LabState, center: httpx.Client, key: Path, guest: dict[str, Any]
) -> None:
    address = guest["address"]
    written: list[str] = []

    def write_and_check(step: str) -> None:
        value = f"kvmotion-{step}-{secrets.token_hex(4)}"
        set_variable(lab, key, address, f"Kvmotion{step.title()}", value)
        written.append(value)
        store = store_file(lab, center).read_bytes()
        missing = [v for v in written if v.encode() not in store]
        assert not missing, f"after {step}: {missing} not in {store_file(lab, center)}"

    write_and_check("created")
    moves = [
        ("compute", {"type": "compute", "host": DST}),
        ("storage", {"type": "storage", "datastore": "local-173"}),
        ("both", {"type": "both", "host": SRC, "datastore": "local-172"}),
    ]
    for step, body in moves:
        old = store_file(lab, center)
        r = center.post(f"/v1/vms/{VM}/migrate", json=body)
        assert r.status_code == 202, r.text
        task = wait_task(center, r.json()["id"], deadline=900)
        assert task["state"] == "success", task["error"]
        if step != "compute":
            assert not old.exists(), f"{step}: the old store {old} was left behind"
        write_and_check(step)  # written after the move: in the moved store
    # A cold boot reads the store from the file: the guest sees every variable.
    r = center.post(f"/v1/vms/{VM}/power-off")
    assert r.status_code == 200, r.text
    address = boot(lab, center, key)
    seen = ssh(lab, key, address, f"cat /sys/firmware/efi/efivars/Kvmotion*-{GUID}")
    assert all(v in seen for v in written), (written, seen)
    print(f"\nUEFI variables kept through compute, storage and both moves and a cold boot: "
          f"{len(written)}")  # fmt: skip
