"""The lab's pure parts: address plan, naming, state (de)serialisation and files."""

from __future__ import annotations

import ipaddress
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmotion import pki
from kvmotion.errors import InvalidInput, LabError
from kvmotion.host.config import HostConfig
from kvmotion.lab import labcenter, topology
from kvmotion.lab.topology import (
    LabState,
    agent_argv_for,
    host_config,
    host_index,
    plan_bridges,
    plan_links,
    plan_netns,
    plan_state,
)

host_counts = st.integers(min_value=topology.MIN_HOSTS, max_value=topology.MAX_HOSTS)


def test_the_seeds_hosts_are_the_first_two() -> None:
    assert [topology.management_address(i) for i in (0, 1)] == ["172.16.0.172", "172.16.0.173"]
    assert [topology.migration_address(i) for i in (0, 1)] == ["172.16.1.172", "172.16.1.173"]
    assert [topology.host_netns(i) for i in (0, 1)] == ["kvm-h172", "kvm-h173"]
    assert topology.agent_url(0) == "https://172.16.0.172:8700"
    assert topology.agent_url(0, https=False) == "http://172.16.0.172:8700"
    assert topology.management_address(7) == "172.16.0.179"


@pytest.mark.parametrize("bad", [0, 1, 9, -2, True, "2", 2.0])
def test_host_count_is_two_to_eight(bad: object) -> None:
    with pytest.raises(InvalidInput):
        topology.validate_host_count(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ref", "index"),
    [(0, 0), (7, 7), ("kvm-h173", 1), ("172.16.0.172", 0), ("172.16.1.174", 2)],
)
def test_host_index_accepts_index_netns_and_addresses(ref: int | str, index: int) -> None:
    assert host_index(ref) == index


@pytest.mark.parametrize(
    "ref", [8, -1, True, "kvm-h171", "kvm-h180", "172.16.2.172", "10.0.0.172", "173", "h173"]
)
def test_host_index_refuses_anything_else(ref: int | str) -> None:
    with pytest.raises(InvalidInput):
        host_index(ref)


@pytest.mark.parametrize(
    ("name", "owned"),
    [
        ("kvm-sw", True),
        ("kvm-client", True),
        ("kvm-h172", True),
        ("kvm-other", False),
        ("kvm-h17", False),
        ("kvm-sw2", False),
        ("netns-kvm-sw", False),
    ],
)
def test_only_the_labs_own_namespaces_are_owned(name: str, owned: bool) -> None:
    assert topology.is_owned_netns(name) is owned


@given(host_counts)
def test_link_names_fit_the_kernel_and_never_collide(hosts: int) -> None:
    per_ns: dict[str | None, list[str]] = {}
    for bridge, bridge_ns in plan_bridges(hosts):
        per_ns.setdefault(bridge_ns, []).append(bridge)
    for veth in plan_links(hosts):
        per_ns.setdefault(veth.ns, []).append(veth.name)
        per_ns.setdefault(veth.peer_ns, []).append(veth.peer)
    for ns, names in per_ns.items():
        assert len(names) == len(set(names)), f"duplicate link names in {ns}: {names}"
        assert all(len(name) <= 15 for name in names), names
    # Every veth is created in its namespace with both names, then the peer moves.
    for veth in plan_links(hosts):
        assert veth.name != veth.peer


@given(host_counts)
def test_address_plan(hosts: int) -> None:
    links = plan_links(hosts)
    by_ns: dict[str | None, list[ipaddress.IPv4Interface]] = {}
    for veth in links:
        if veth.address is not None:
            by_ns.setdefault(veth.ns, []).append(ipaddress.IPv4Interface(veth.address))
    mgmt, migration, vm = (ipaddress.IPv4Network(net) for net in topology.LAB_SUBNETS)
    # The root namespace is on the management network only.
    assert by_ns[None] == [ipaddress.IPv4Interface("172.16.0.1/24")]
    assert by_ns[topology.CLIENT_NETNS] == [ipaddress.IPv4Interface("172.16.2.2/24")]
    for i in range(hosts):
        octet = 172 + i
        assert sorted(str(a) for a in by_ns[f"kvm-h{octet}"]) == [
            f"172.16.0.{octet}/24",
            f"172.16.1.{octet}/24",
        ]
    # The switch holds no address, and no two interfaces share one.
    assert topology.SWITCH_NETNS not in by_ns
    every = [a.ip for addrs in by_ns.values() for a in addrs]
    assert len(every) == len(set(every))
    assert all(any(a in net for net in (mgmt, migration, vm)) for a in every)
    # Guests will use 172.16.2.10 and up: the plan keeps them free.
    assert all(a not in vm or int(a) - int(vm.network_address) < 10 for a in every)


def test_bridges_and_uplinks_are_wired_to_the_switch() -> None:
    assert plan_netns(2) == ["kvm-sw", "kvm-h172", "kvm-h173", "kvm-client"]
    assert plan_bridges(2) == [
        ("mgmt", "kvm-sw"),
        ("vmotion", "kvm-sw"),
        ("vmnet", "kvm-sw"),
        ("vmnet", "kvm-h172"),
        ("vmnet", "kvm-h173"),
    ]
    uplink = next(v for v in plan_links(2) if v.ns == "kvm-h173" and v.name == "vmnet-up")
    assert (uplink.master, uplink.peer_ns, uplink.peer_master) == ("vmnet", "kvm-sw", "vmnet")
    migration = next(v for v in plan_links(2) if v.ns == "kvm-h172" and v.name == "vmotion0")
    assert (migration.peer, migration.peer_master) == ("h172-vmo", "vmotion")
    root = plan_links(2)[0]
    assert (root.name, root.ns, root.peer_ns, root.peer_master) == (
        "kvm-mgmt0",
        None,
        "kvm-sw",
        "mgmt",
    )


def test_plan_state_lays_out_the_lab_dir(tmp_path: Path) -> None:
    state = plan_state(3, tmp_path, "secret")
    assert [h.name for h in state.hosts] == ["172.16.0.172", "172.16.0.173", "172.16.0.174"]
    host = state.hosts[2]
    assert host.config_path == tmp_path / "hosts" / "kvm-h174" / "host.json"
    assert host.run_dir == tmp_path / "hosts" / "kvm-h174" / "run"
    assert host.local_datastore == tmp_path / "datastores" / "local-174"
    assert state.shared_datastore == tmp_path / "datastores" / "shared"
    assert state.image_dir == tmp_path / "images"
    assert "secret" not in repr(state)


def test_host_config_matches_the_agent_model(tmp_path: Path) -> None:
    state = plan_state(2, tmp_path, "secret")
    config = host_config(state, state.hosts[1])
    config.save(state.hosts[1].config_path)
    loaded = HostConfig.load(state.hosts[1].config_path)
    assert loaded == config
    assert (loaded.name, loaded.management_address, loaded.migration_address, loaded.port) == (
        "172.16.0.173",
        "172.16.0.173",
        "172.16.1.173",
        8700,
    )
    assert [(d.name, d.shared) for d in loaded.datastores] == [
        ("shared", True),
        ("local-173", False),
    ]
    assert [(n.name, n.bridge) for n in loaded.networks] == [("vm-network", "vmnet")]
    assert loaded.image_dir == tmp_path / "images"
    assert loaded.run_dir == tmp_path / "hosts" / "kvm-h173" / "run"


@given(
    hosts=host_counts,
    pids=st.lists(st.none() | st.integers(1, 4_000_000), min_size=8, max_size=8),
    rate=st.none() | st.floats(0.1, 100_000),
    argv=st.none() | st.lists(st.text(min_size=1, max_size=20), max_size=4),
)
def test_state_round_trips_through_json(
    hosts: int, pids: list[int | None], rate: float | None, argv: list[str] | None
) -> None:
    state = plan_state(hosts, Path("/var/lib/kvmotion/lab"), "tok", argv)
    hosts_ = [
        replace(h, agent_pid=pid, agent_start_ticks=pid, migration_rate_mbit=rate)
        for h, pid in zip(state.hosts, pids, strict=False)
    ]
    state = replace(state, hosts=hosts_)
    assert LabState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("hosts"),
        lambda d: d.update(version=99),
        lambda d: d["hosts"][0].update(index="one"),
        lambda d: d.update(hosts="none"),
    ],
)
def test_damaged_state_is_refused(damage: object) -> None:
    data = plan_state(2, Path("/x"), "tok").to_dict()
    damage(data)  # type: ignore[operator]
    with pytest.raises(InvalidInput):
        LabState.from_dict(data)


def test_lab_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(topology.LAB_DIR_ENV, raising=False)
    assert topology.lab_dir() == Path("/var/lib/kvmotion/lab")
    monkeypatch.setenv(topology.LAB_DIR_ENV, str(tmp_path))
    assert topology.lab_dir() == tmp_path
    for bad in ("relative/lab", "/"):
        monkeypatch.setenv(topology.LAB_DIR_ENV, bad)
        with pytest.raises(InvalidInput):
            topology.lab_dir()


def test_state_file_is_private_and_found_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(topology.LAB_DIR_ENV, str(tmp_path))
    assert topology.load_state() is None
    state = plan_state(2, tmp_path, "tok")
    topology.save_state(state)
    path = tmp_path / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert topology.load_state() == state
    path.write_text("{not json")
    with pytest.raises(LabError):
        topology.load_state()
    path.write_text(json.dumps({"version": 1, "hosts": []}))
    with pytest.raises(LabError, match="damaged"):
        topology.load_state()


def test_agent_command_fills_placeholders(tmp_path: Path) -> None:
    state = plan_state(2, tmp_path, "tok")
    host = state.hosts[1]
    default = agent_argv_for(None, host)
    assert default[1:] == ["-m", "kvmotion", "host", "serve", "--config", str(host.config_path)]
    custom = agent_argv_for(["stand-in", "--bind={address}:{port}", "{config}"], host)
    assert custom == ["stand-in", "--bind=172.16.0.173:8700", str(host.config_path)]


def test_shaping_refuses_bad_rates_before_touching_anything() -> None:
    for rate in (0.0, -5.0, 1e9):
        with pytest.raises(InvalidInput):
            topology.shape_link(0, rate)
    with pytest.raises(InvalidInput):
        topology.shape_link("kvm-h999", 100.0)


def test_the_lab_center_is_issued_again_for_a_new_lab_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lab built again (a new CA) without its center's directory removed: the center's old
    certificate would not verify the new agents, so it is seen as from another CA."""
    monkeypatch.setenv(topology.LAB_DIR_ENV, str(tmp_path / "lab"))
    state = plan_state(2, tmp_path / "lab", "t")
    pki.create_ca(state.ca_dir)
    assert not labcenter._other_ca(state)  # no center yet
    pki.issue_host(state.ca_dir, labcenter.center_dir() / "tls", "center", ["127.0.0.1"])
    assert not labcenter._other_ca(state)
    for name in (pki.CA_CERT, pki.CA_KEY):
        (state.ca_dir / name).unlink()
    pki.create_ca(state.ca_dir)  # lab down, lab up: a new CA
    assert labcenter._other_ca(state)
