"""A UEFI VM, as a user makes one: `vm create --firmware uefi` from the Debian image, booted by
OVMF with its own variable store on its datastore, and come up as the SeaBIOS server of
test_real_vm.py does (checked over SSH the same way: GRUB from the disk, cloud-init from the
seed, every service active, none failed; the guest agent answering the center).

The guest writes UEFI variables (as efibootmgr or a Secure Boot key update would) before and
after a compute, a storage and a "both" move: after each, every variable is in the store file
where the VM's record now says it is, and one written after the move lands there (QEMU writes to
the moved store, not the old one). Before the moves it also makes a boot entry of its own, and
after the last one asks for it once (BootNext). Then a cold boot (powered off, then on): a new
QEMU's firmware reads the store from the moved file, and boots that entry, as its serial console
shows seconds into the boot. (A guest OS reading its variables back would cost a whole boot
under TCG more, about a minute, to read the same store through the same firmware.)"""

from __future__ import annotations

import re
import secrets
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion.lab import realclients, topology
from kvmotion.lab.osimage import build_os_image
from tests.lab.conftest import center_http, wait_task
from tests.lab.test_real_vm import (
    IMAGE,
    USER,
    assert_server_configured,
    kvmotion,
    wait_address,
    wait_guest_agent,
)

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
VM = "uefi1"
BOOT_TIMEOUT_S = 900
# A vendor GUID of our own for the test's variables (any GUID is the guest's to use)
GUID = "6b6f7461-6e6f-4d6b-b675-6b766d6f7465"
BOOT_ENTRY = "4B56"  # Boot4B56, the guest's own boot entry (OVMF numbers its own from 0000 up)
# Run by root in the guest, as efibootmgr would: with a description, make Boot{argv[1]} from the
# entry this boot came from (its device path: the disk, booted at its removable path), without
# the optional data that marks OVMF's own entries (which OVMF drops when it no longer makes
# them); with "--next", set BootNext to it (the firmware boots it at the next boot, once).
# efivarfs takes attributes (NV, BS, RT) and data in one write.
BOOT_ENTRY_SCRIPT = """\
import struct, sys
def var(name):
    return f"/sys/firmware/efi/efivars/{name}-8be4df61-93ca-11d2-aa0d-00e098032b8c"
def read(name):
    with open(var(name), "rb") as f:
        return f.read()[4:]
def write(name, data):
    with open(var(name), "wb", buffering=0) as f:
        f.write(b"\\x07\\0\\0\\0" + data)
number, what = sys.argv[1], sys.argv[2]
if what == "--next":
    write("BootNext", struct.pack("<H", int(number, 16)))
else:
    current = read("Boot%04X" % struct.unpack("<H", read("BootCurrent"))[0])
    path_length, end = struct.unpack_from("<H", current, 4)[0], 6
    while current[end:end + 2] != b"\\0\\0":
        end += 2
    path = current[end + 2:end + 2 + path_length]
    write("Boot" + number, current[:6] + (what + "\\0").encode("utf-16-le") + path)
"""


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


def boot_entry(lab: topology.LabState, key: Path, address: str, what: str) -> None:
    """:data:`BOOT_ENTRY_SCRIPT` in the guest: make the entry described ``what``, or "--next"."""
    script = shlex.quote(BOOT_ENTRY_SCRIPT)
    ssh(lab, key, address, f"sudo -n python3 -c {script} {BOOT_ENTRY} {shlex.quote(what)}")


def serial_console_until(
    lab: topology.LabState, center: httpx.Client, pattern: str, timeout: float
) -> str:
    """What the VM printed on its serial console since QEMU started, once ``pattern`` (a regex)
    shows in it. Read from the console's log on the VM's host (what `vm console` replays): a
    viewer attached after power-on sees only the last few KiB, and the firmware's lines are
    soon scrolled past by the kernel's."""
    vm = center.get(f"/v1/vms/{VM}").json()
    run_dir = next(h.run_dir for h in lab.hosts if h.name == vm["host"])
    log = run_dir / "vms" / vm["uuid"] / "console.log"
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} on {VM}'s serial console in {timeout:.0f} s; its end:\n"
                         f"{text[-3000:]}")  # fmt: skip


def store_file(lab: topology.LabState, center: httpx.Client) -> Path:
    """The variable store where the VM's record says it is."""
    vm = center.get(f"/v1/vms/{VM}").json()
    roots = {"shared": lab.shared_datastore} | {h.local_datastore.name: h.local_datastore
                                                  for h in lab.hosts}  # fmt: skip
    return roots[vm["config"]["datastore"]] / VM / f"{VM}_VARS.fd"


def test_the_guest_booted_through_uefi(
    lab: topology.LabState, center: httpx.Client, key: Path, guest: dict[str, Any]
) -> None:
    """OVMF booted it (the guest sees EFI firmware), and it came up as the SeaBIOS server of
    test_real_vm does: GRUB from the disk, cloud-init from the seed, every service, none failed,
    the guest agent answering the center."""
    seen = assert_server_configured(lab, key, guest["address"], VM, "uefi")
    wait_guest_agent(center, guest["address"], 120, VM)
    vm = center.get(f"/v1/vms/{VM}").json()
    assert vm["config"]["firmware"] == "uefi"
    assert store_file(lab, center).stat().st_size > 0
    print(f"\nOVMF guest, kernel {seen['kernel']}: configured by cloud-init, services up")


def test_the_variable_store_moves_with_the_vm(
    lab: topology.LabState, center: httpx.Client, key: Path, guest: dict[str, Any]
) -> None:
    address = guest["address"]
    written: list[bytes] = []  # as each is stored

    def check(step: str) -> None:
        store = store_file(lab, center).read_bytes()
        missing = [v for v in written if v not in store]
        assert not missing, f"after {step}: {missing} not in {store_file(lab, center)}"

    def write_and_check(step: str) -> None:
        value = f"kvmotion-{step}-{secrets.token_hex(4)}"
        set_variable(lab, key, address, f"Kvmotion{step.title()}", value)
        written.append(value.encode())
        check(step)

    write_and_check("created")
    entry = f"kvmotion-{secrets.token_hex(4)}"
    boot_entry(lab, key, address, entry)  # before the moves
    written.append(entry.encode("utf-16-le"))  # a boot entry's description is UCS-2
    check("the boot entry")
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
    boot_entry(lab, key, address, "--next")  # after the last move
    # A cold boot: a new QEMU, whose firmware reads the store from the moved file. It boots
    # the entry made before the first move, first, as BootNext written after the last says.
    r = center.post(f"/v1/vms/{VM}/power-off")
    assert r.status_code == 200, r.text
    started = time.monotonic()
    assert kvmotion("vm", "start", VM).returncode == 0
    console = serial_console_until(lab, center, r"BdsDxe: starting Boot", 300)
    seconds = time.monotonic() - started
    # what the firmware tried, in order, up to the entry it started (a failure is printed too)
    tried = re.findall(r'BdsDxe: (loading|failed to \w+|starting) Boot(\w{4}) "([^"]*)"', console)
    assert tried == [("loading", BOOT_ENTRY, entry), ("starting", BOOT_ENTRY, entry)], tried
    print(f"\nUEFI variables kept through compute, storage and both moves: {len(written)}; "
          f"cold boot: the firmware booted the guest's entry {entry} {seconds:.1f} s after "
          "vm start")  # fmt: skip
