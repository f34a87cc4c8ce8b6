import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kvmotion.host.vmconfig import VmConfig, VmCreateRequest, check_mac, check_name, mac_for


@pytest.mark.parametrize("name", ["vm-a", "a", "Web_01.prod", "x" * 63])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a/b", "..", "a..b", "../etc", ".hidden", "-x", "a b", "a\x00b", "a\nb", "x" * 64]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        check_name(name)


@given(st.text(max_size=80))
def test_accepted_names_are_safe_path_components(name: str) -> None:
    try:
        check_name(name)
    except ValueError:
        return
    assert "/" not in name and ".." not in name and name.isprintable() and not name.startswith(".")


@pytest.mark.parametrize("mac", ["52:54:00:12:34:56", "52:54:00:AB:cd:EF"])
def test_good_macs(mac: str) -> None:
    assert check_mac(mac) == mac.lower()


@pytest.mark.parametrize("mac", ["52:54:00:12:34", "zz:54:00:12:34:56", "01:00:5e:00:00:01", ""])
def test_bad_macs(mac: str) -> None:
    with pytest.raises(ValueError, match="MAC"):
        check_mac(mac)


@given(st.uuids(), st.integers(0, 7))
def test_generated_macs_are_valid_unicast_and_stable(u: object, index: int) -> None:
    mac = mac_for(str(u), index)
    assert check_mac(mac) == mac
    assert mac_for(str(u), index) == mac


def test_request_defaults_and_record() -> None:
    req = VmCreateRequest(name="vm-a", datastore="shared", nics=[{"network": "vm-network"}])
    cfg = VmConfig.from_request(req, cpu_model="qemu64", machine_type="pc-q35-7.2")
    assert cfg.memory_mib == 256 and cfg.vcpus == 1
    assert [d.path for d in cfg.disks] == ["vm-a/vm-a.qcow2"]
    assert cfg.nics[0].mac.startswith("52:54:00:")
    assert VmConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    "body",
    [
        {"name": "vm/a", "datastore": "shared"},
        {"name": "vm-a", "datastore": "../x"},
        {"name": "vm-a", "datastore": "shared", "memory_mib": -1},
        {"name": "vm-a", "datastore": "shared", "vcpus": 0},
        {"name": "vm-a", "datastore": "shared", "disks": [{"size_mib": 0}]},
        {"name": "vm-a", "datastore": "shared", "nics": [{"network": "n", "mac": "bad"}]},
        {"name": "vm-a", "datastore": "shared", "kernel_args": "a\nb"},
        {"name": "vm-a", "datastore": "shared", "cpu_model": "host,+x; rm"},
        {"name": "vm-a", "datastore": "shared", "surprise": 1},
    ],
)
def test_bad_requests_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        VmCreateRequest.model_validate(body)
