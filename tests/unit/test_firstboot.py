"""A VM made from an OS image: its request, record, first-boot seed and addresses."""

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvmotion.host.addresses import AddressWatch, lease_addresses, parse_leases
from kvmotion.host.seed import meta_data, write_seed
from kvmotion.host.vmconfig import FirstBoot, VmConfig, VmCreateRequest
from kvmotion.lab.dhcp import dnsmasq_argv

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@lab"


def test_image_request_boots_the_disk_and_has_a_guest_agent() -> None:
    req = VmCreateRequest(name="web1", datastore="shared", image="debian-12")
    assert req.boot_image is None and req.guest_agent is True
    plain = VmCreateRequest(name="t1", datastore="shared")
    assert plain.boot_image == "kvmotion-guest" and plain.guest_agent is False


@pytest.mark.parametrize(
    "fields",
    [
        {"image": "debian-12", "boot_image": "kvmotion-guest"},
        {"image": "debian-12", "kernel_args": "quiet"},
        {"image": "../etc"},
        {"first_boot": {"hostname": "-bad"}},
        {"first_boot": {"hostname": "ok", "ssh_keys": ["not a key"]}},
        {"first_boot": {"hostname": "ok", "ssh_keys": [KEY + "\nssh-rsa AAAA x"]}},
        {"first_boot": {"hostname": "ok", "user_data": "runcmd: [reboot]"}},
        {"first_boot": {"hostname": "ok", "user_data": "#cloud-config\n" + "x" * 70000}},
    ],
)
def test_bad_image_requests_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        VmCreateRequest(name="web1", datastore="shared", **fields)  # type: ignore[arg-type]


def test_record_keeps_the_seed_beside_it_and_a_move_flattens_the_overlay() -> None:
    req = VmCreateRequest(
        name="web1", datastore="shared", image="debian-12",
        first_boot=FirstBoot(hostname="web1", ssh_keys=(KEY,)),
    )  # fmt: skip
    config = VmConfig.from_request(req, cpu_model="qemu64", machine_type="pc-q35-10.0")
    disk0 = config.disks[0].model_copy(
        update={"backing": ".images/debian-12.qcow2", "backing_format": "qcow2"}
    )
    config = config.model_copy(update={"disks": (disk0,)})
    assert config.seed_path == "web1/cidata.iso"
    moved = config.moved_to("local-172")
    assert moved.disks[0].backing is None and moved.disks[0].datastore == "local-172"
    assert moved.seed_path == "web1/cidata.iso"  # beside the moved record
    assert VmConfig.model_validate_json(config.model_dump_json()) == config


def test_seed_is_an_iso_labelled_cidata_with_the_keys(tmp_path: Path) -> None:
    first = FirstBoot(hostname="web1", ssh_keys=(KEY,), user_data="#cloud-config\npackages: []\n")
    seed = tmp_path / "cidata.iso"
    asyncio.run(write_seed(seed, "uuid-1", first))
    label = subprocess.run(
        ["blkid", "-o", "value", "-s", "LABEL", str(seed)], capture_output=True, text=True
    ).stdout.strip()
    assert label == "cidata"
    body = json.loads(meta_data("uuid-1", first))
    assert body == {"instance-id": "uuid-1", "local-hostname": "web1", "public-keys": [KEY]}
    assert [p.name for p in tmp_path.iterdir()] == ["cidata.iso"]  # no temporary files left


def test_leases_by_mac_skip_expired_and_garbage(tmp_path: Path) -> None:
    now = time.time()
    text = (
        f"{int(now) + 600} 52:54:00:aa:bb:01 172.16.2.101 web1 01:52:54:00:aa:bb:01\n"
        f"{int(now) - 5} 52:54:00:aa:bb:02 172.16.2.102 old *\n"
        "garbage line\n"
        f"0 52:54:00:AA:BB:03 172.16.2.103 forever *\n"
        f"{int(now) + 600} 52:54:00:aa:bb:01 not-an-ip x *\n"
    )
    assert parse_leases(text, now) == {
        "52:54:00:aa:bb:01": "172.16.2.101",
        "52:54:00:aa:bb:03": "172.16.2.103",
    }
    leases = tmp_path / "leases"
    leases.write_text(text)
    missing = tmp_path / "nope"
    assert lease_addresses([missing, leases], ["52:54:00:AA:BB:01"]) == ["172.16.2.101"]


def test_addresses_prefer_the_guest_agent_and_fall_back_to_leases() -> None:
    answers: list[list[str] | None] = [["172.16.2.101", "fd00::5"], None]

    async def guest() -> list[str] | None:
        return answers.pop(0)

    async def run() -> list[tuple[tuple[str, ...], str | None]]:
        watch = AddressWatch("web1", guest, lambda: ["172.16.2.150"])
        seen = []
        for _ in range(2):
            await watch.refresh()
            seen.append((watch.addresses, watch.source))
        watch.stop()
        seen.append((watch.addresses, watch.source))
        return seen

    assert asyncio.run(run()) == [
        (("172.16.2.101", "fd00::5"), "guest-agent"),
        (("172.16.2.150",), "dhcp"),
        ((), None),
    ]


def test_dhcp_server_offers_no_router_and_no_dns(tmp_path: Path) -> None:
    argv = dnsmasq_argv(tmp_path, "vmnet")
    assert "--port=0" in argv and "--conf-file=/dev/null" in argv
    assert "--dhcp-option=option:router" in argv and "--dhcp-option=option:dns-server" in argv
    assert f"--dhcp-leasefile={tmp_path / 'dhcp' / 'leases'}" in argv
