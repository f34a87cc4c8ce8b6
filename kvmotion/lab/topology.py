"""The lab: a small datacenter of network namespaces on one machine.

This module owns the lab's address plan (pure functions of the host count), building or repairing
it (:func:`lab_up`), reporting what exists (:func:`lab_status`), tearing it down
(:func:`lab_down`), link shaping on the migration network (:func:`shape_link`) and the state file
that lets another process find a running lab. Kernel work goes through :mod:`kvmotion.lab.netns`.

::

    root ns: kvm-mgmt0 172.16.0.1/24 ───────────────┐
    kvm-sw:  bridges  mgmt ─────────── vmotion ──────── vmnet ─────────── (no addresses)
    kvm-h172: mgmt0 172.16.0.172   vmotion0 172.16.1.172   vmnet bridge <- vmnet-up
    kvm-h173: mgmt0 172.16.0.173   vmotion0 172.16.1.173   vmnet bridge <- vmnet-up
    kvm-client:                                             eth0 172.16.2.2

Safety: no lab namespace touches the machine's uplink, and the root namespace keeps an
``unreachable`` route (metric 4242) for each lab subnet, added by :func:`lab_up` and never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from kvmotion import pki
from kvmotion.cpu.catalog import get_mode
from kvmotion.errors import InvalidInput, LabError
from kvmotion.host.config import (
    DEFAULT_AGENT_PORT,
    DatastoreConfig,
    HostConfig,
    NetworkConfig,
    qemu_pidfiles,
)
from kvmotion.lab import dhcp, netns

Log = Callable[[str], None]

# --- the address plan -------------------------------------------------------------------------

MIN_HOSTS, MAX_HOSTS, DEFAULT_HOSTS = 2, 8, 2
FIRST_HOST_OCTET = 172
MANAGEMENT_NET = "172.16.0.0/24"
MIGRATION_NET = "172.16.1.0/24"
VM_NET = "172.16.2.0/24"
LAB_SUBNETS = (MANAGEMENT_NET, MIGRATION_NET, VM_NET)
UNREACHABLE_METRIC = 4242
ROOT_ADDRESS = "172.16.0.1"
CLIENT_ADDRESS = "172.16.2.2"

SWITCH_NETNS = "kvm-sw"
CLIENT_NETNS = "kvm-client"
ROOT_LINK = "kvm-mgmt0"
ROOT_SWITCH_PORT = "root-mgmt"
CLIENT_LINK = "eth0"
CLIENT_SWITCH_PORT = "client-vmnet"
MGMT_BRIDGE, MIGRATION_BRIDGE, VM_BRIDGE = "mgmt", "vmotion", "vmnet"
HOST_MGMT_LINK, HOST_MIGRATION_LINK, HOST_UPLINK = "mgmt0", "vmotion0", "vmnet-up"
VM_NETWORK_NAME = "vm-network"
SHARED_DATASTORE = "shared"
_OWNED_NETNS = re.compile(r"kvm-(sw|client|h\d{3})")

# --- files and agents -------------------------------------------------------------------------

LAB_DIR_ENV = "KVMOTION_LAB_DIR"
DEFAULT_LAB_DIR = Path("/var/lib/kvmotion/lab")
AGENT_ARGV_ENV = "KVMOTION_LAB_AGENT_ARGV"
AGENT_HEALTH_PATH = "/v1/health"
AGENT_START_TIMEOUT = 30.0
LOCK_PATH = Path("/run/lock/kvmotion-lab.lock")
LOCK_TIMEOUT = 120.0
STATE_VERSION = 1
# QEMUs a lab host may run instead of the system's: Debian 12's 7.2, unpacked by ./run setup
# beside the system's QEMU 10 (hosts of different versions, as in the seed).
QEMUS = {"7.2": "/var/cache/kvmotion/qemu-7.2/qemu-system-x86_64"}


def check_qemu(version: str | None) -> str | None:
    """``version`` if a lab host can run it (None: the system's QEMU). Raises InvalidInput for
    an unknown one, LabError for one that is not installed."""
    if version is None:
        return None
    if version not in QEMUS:
        raise InvalidInput(f"the lab offers QEMU {', '.join(QEMUS)} (or 'system'), not {version!r}")
    if not os.access(QEMUS[version], os.X_OK):
        raise LabError(
            f"QEMU {version} is not unpacked at {QEMUS[version]} (./run setup unpacks Debian "
            "12's 7.2 there, on Debian 12)"
        )
    return version


def validate_host_count(hosts: int) -> int:
    if (
        isinstance(hosts, bool)
        or not isinstance(hosts, int)
        or not (MIN_HOSTS <= hosts <= MAX_HOSTS)
    ):
        raise InvalidInput(f"a lab has {MIN_HOSTS} to {MAX_HOSTS} hosts, not {hosts!r}")
    return hosts


def host_octet(index: int) -> int:
    if not 0 <= index < MAX_HOSTS:
        raise InvalidInput(f"lab host index must be 0..{MAX_HOSTS - 1}, not {index}")
    return FIRST_HOST_OCTET + index


def host_netns(index: int) -> str:
    return f"kvm-h{host_octet(index)}"


def management_address(index: int) -> str:
    return f"172.16.0.{host_octet(index)}"


def migration_address(index: int) -> str:
    return f"172.16.1.{host_octet(index)}"


def agent_url(index: int, port: int = DEFAULT_AGENT_PORT, *, https: bool = True) -> str:
    return f"{'https' if https else 'http'}://{management_address(index)}:{port}"


def switch_port(index: int, role: str) -> str:
    """The switch-side name of host ``index``'s veth for ``role`` (mgmt, vmo, vmnet)."""
    return f"h{host_octet(index)}-{role}"


def host_index(ref: int | str) -> int:
    """A lab host's index from its index, namespace (kvm-h173) or address (172.16.0.173 or
    172.16.1.173). Raises InvalidInput for anything else."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        host_octet(ref)
        return ref
    for prefix in ("kvm-h", "172.16.0.", "172.16.1."):
        if isinstance(ref, str) and ref.startswith(prefix) and ref[len(prefix) :].isdigit():
            index = int(ref[len(prefix) :]) - FIRST_HOST_OCTET
            if 0 <= index < MAX_HOSTS:
                return index
    raise InvalidInput(
        f"unknown lab host {ref!r}: give an index 0..{MAX_HOSTS - 1}, a namespace like kvm-h173 "
        "or an address like 172.16.0.173"
    )


def is_owned_netns(name: str) -> bool:
    """True for the namespace names the lab creates (kvm-sw, kvm-client, kvm-hNNN)."""
    return _OWNED_NETNS.fullmatch(name) is not None


@dataclass(frozen=True)
class Veth:
    """One veth pair: ``name`` in ``ns`` (None: root), ``peer`` moved to ``peer_ns``."""

    name: str
    ns: str | None
    peer: str
    peer_ns: str
    address: str | None = None  # CIDR on ``name``
    master: str | None = None  # bridge enslaving ``name`` in ``ns``
    peer_master: str | None = None  # bridge enslaving ``peer`` in ``peer_ns``


def plan_netns(hosts: int) -> list[str]:
    return [SWITCH_NETNS, *(host_netns(i) for i in range(hosts)), CLIENT_NETNS]


def plan_bridges(hosts: int) -> list[tuple[str, str]]:
    """(bridge, namespace) pairs: the switch's three, then each host's VM bridge."""
    switch = [(b, SWITCH_NETNS) for b in (MGMT_BRIDGE, MIGRATION_BRIDGE, VM_BRIDGE)]
    return switch + [(VM_BRIDGE, host_netns(i)) for i in range(hosts)]


def plan_links(hosts: int) -> list[Veth]:
    """Every veth pair of a lab with ``hosts`` hosts."""
    root = f"{ROOT_ADDRESS}/24"
    plan = [Veth(ROOT_LINK, None, ROOT_SWITCH_PORT, SWITCH_NETNS, root, None, MGMT_BRIDGE)]
    for i in range(hosts):
        for name, role, address, master, peer_master in (
            (HOST_MGMT_LINK, "mgmt", f"{management_address(i)}/24", None, MGMT_BRIDGE),
            (HOST_MIGRATION_LINK, "vmo", f"{migration_address(i)}/24", None, MIGRATION_BRIDGE),
            (HOST_UPLINK, "vmnet", None, VM_BRIDGE, VM_BRIDGE),
        ):
            port = switch_port(i, role)
            plan.append(Veth(name, host_netns(i), port, SWITCH_NETNS, address, master, peer_master))
    client = f"{CLIENT_ADDRESS}/24"
    plan.append(
        Veth(CLIENT_LINK, CLIENT_NETNS, CLIENT_SWITCH_PORT, SWITCH_NETNS, client, None, VM_BRIDGE)
    )
    return plan


# --- state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabHost:
    name: str  # its management address, as the center knows it
    index: int
    netns: str
    management_address: str
    migration_address: str
    config_path: Path
    run_dir: Path
    local_datastore: Path
    agent_pid: int | None
    agent_url: str
    agent_start_ticks: int | None = None  # guards agent_pid against pid reuse
    migration_rate_mbit: float | None = None  # shaping of its migration link, None: unshaped
    cpu_generation: str | None = None  # simulated CPU (an EVC mode key); None: the real one
    qemu: str | None = None  # its QEMU (a key of QEMUS); None: the system's

    @property
    def host_dir(self) -> Path:
        return self.config_path.parent

    @property
    def agent_log(self) -> Path:
        return self.host_dir / "agent.log"

    def tls(self) -> ssl.SSLContext | None:
        """What a client verifies this host's agent with: the lab's CA (a copy is in its TLS
        directory) when it serves https, else None (plain http, nothing to verify)."""
        if not self.agent_url.startswith("https://"):
            return None
        return ssl.create_default_context(cafile=str(self.host_dir / "tls" / pki.CA_CERT))


@dataclass(frozen=True)
class LabState:
    hosts: list[LabHost]
    client_netns: str
    client_address: str
    shared_datastore: Path
    image_dir: Path
    token: str = field(repr=False)
    lab_dir: Path
    switch_netns: str = SWITCH_NETNS
    root_link: str = ROOT_LINK
    root_address: str = ROOT_ADDRESS
    # The agent command template ({config}, {address}, {port}); None: `kvmotion host serve`.
    agent_argv: list[str] | None = None
    # Encrypt migration streams (`kvmotion lab tls on`): certificates from the lab's own CA.
    migration_tls: bool = False
    # The agents' and the center's APIs in plain HTTP (`kvmotion lab up --api-plaintext`):
    # tokens in clear on the lab's management network. Off: HTTPS with the lab's CA.
    api_plaintext: bool = False

    @property
    def ca_dir(self) -> Path:
        """The lab's CA (kept in the lab dir: it signs the agents' and the center's
        certificates, and the migration ones)."""
        return self.lab_dir / "tls-ca"

    @property
    def ca_file(self) -> Path:
        return self.ca_dir / pki.CA_CERT

    def tls(self) -> ssl.SSLContext | None:
        """The context lab tools verify the lab's agents and center with (None: plaintext)."""
        return None if self.api_plaintext else ssl.create_default_context(cafile=str(self.ca_file))

    def host(self, ref: int | str) -> LabHost:
        """A host by index, namespace or address; raises NotFound-like InvalidInput."""
        index = host_index(ref)
        for host in self.hosts:
            if host.index == index:
                return host
        raise InvalidInput(f"lab host {ref!r} is not part of this {len(self.hosts)}-host lab")

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **_STATE_ADAPTER.dump_python(self, mode="json")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabState:
        """Raises InvalidInput if ``data`` is not a lab state."""
        if data.get("version") != STATE_VERSION:
            raise InvalidInput(f"unsupported lab state version {data.get('version')!r}")
        try:
            return _STATE_ADAPTER.validate_python(data)
        except ValidationError as exc:
            raise InvalidInput(f"not a lab state: {exc}") from exc


_STATE_ADAPTER = TypeAdapter(LabState)


def lab_dir() -> Path:
    """Where the lab keeps its state, configs and datastores (env KVMOTION_LAB_DIR overrides)."""
    raw = os.environ.get(LAB_DIR_ENV)
    path = Path(raw) if raw else DEFAULT_LAB_DIR
    if not path.is_absolute() or path == Path("/"):
        raise InvalidInput(f"{LAB_DIR_ENV} must be an absolute directory other than /, not {raw}")
    return path


def state_path(directory: Path | None = None) -> Path:
    return (directory or lab_dir()) / "state.json"


def plan_state(
    hosts: int, directory: Path, token: str, agent_argv: list[str] | None = None
) -> LabState:
    """The state of a freshly built lab (no agents yet): paths, addresses, names."""
    lab_hosts = []
    for i in range(validate_host_count(hosts)):
        host_dir = directory / "hosts" / host_netns(i)
        lab_hosts.append(
            LabHost(
                name=management_address(i),
                index=i,
                netns=host_netns(i),
                management_address=management_address(i),
                migration_address=migration_address(i),
                config_path=host_dir / "host.json",
                run_dir=host_dir / "run",
                local_datastore=directory / "datastores" / f"local-{host_octet(i)}",
                agent_pid=None,
                agent_url=agent_url(i),
            )
        )
    return LabState(
        hosts=lab_hosts,
        client_netns=CLIENT_NETNS,
        client_address=CLIENT_ADDRESS,
        shared_datastore=directory / "datastores" / SHARED_DATASTORE,
        image_dir=directory / "images",
        token=token,
        lab_dir=directory,
        agent_argv=agent_argv,
    )


def host_config(state: LabState, host: LabHost) -> HostConfig:
    """The agent configuration of a lab host."""
    return HostConfig(
        name=host.name,
        management_address=host.management_address,
        migration_address=host.migration_address,
        port=DEFAULT_AGENT_PORT,
        token=state.token,
        api_plaintext=state.api_plaintext,
        run_dir=host.run_dir,
        datastores=[
            DatastoreConfig(name=SHARED_DATASTORE, path=state.shared_datastore, shared=True),
            DatastoreConfig(name=host.local_datastore.name, path=host.local_datastore),
        ],
        networks=[
            NetworkConfig(
                name=VM_NETWORK_NAME,
                bridge=VM_BRIDGE,
                dhcp_leases=dhcp.lease_file(state.lab_dir),
            )
        ],
        image_dir=state.image_dir,
        migration_tls="required" if state.migration_tls else "off",
        tls_dir=host.host_dir / "tls",
        cpu_generation=host.cpu_generation,
        qemu_binary=QEMUS[host.qemu] if host.qemu else "qemu-system-x86_64",
        # Without EVC a VM sees its host's CPU: a simulated generation's model.
        default_cpu_model=(
            get_mode(host.cpu_generation).qemu_model if host.cpu_generation else "qemu64"
        ),
    )


def load_state() -> LabState | None:
    """The running lab's state, or None if there is none. Raises LabError if it is unreadable."""
    path = state_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read lab state {path}: {exc}") from exc
    try:
        return LabState.from_dict(data)
    except InvalidInput as exc:
        raise LabError(f"lab state {path} is damaged: {exc.message}") from exc


def save_state(state: LabState) -> None:
    """Write the state atomically, readable by root only (it holds the lab's token)."""
    path = state_path(state.lab_dir)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            json.dump(state.to_dict(), out, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        raise LabError(f"cannot write lab state {path}: {exc}") from exc


@contextmanager
def _lab_lock() -> Iterator[None]:
    """One lab command at a time on this machine (namespace names are machine-wide)."""
    try:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        lock = LOCK_PATH.open("a")
    except OSError as exc:
        raise LabError(f"cannot open lab lock {LOCK_PATH}: {exc}") from exc
    with lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise LabError("another kvmotion lab command holds the lab lock") from exc
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- lab up -----------------------------------------------------------------------------------


def lab_up(
    hosts: int = DEFAULT_HOSTS,
    *,
    start_agents: bool = True,
    agent_argv: Sequence[str] | None = None,
    cpus: Mapping[int | str, str | None] | None = None,
    qemus: Mapping[int | str, str | None] | None = None,
    api_plaintext: bool | None = None,
    log: Log = print,
) -> LabState:
    """Build the lab, or find it and repair what is missing; returns its state.

    ``cpus`` gives hosts (by index or address) a simulated CPU generation, an EVC mode key such
    as "intel-merom" (None: the real CPU); ``qemus`` gives hosts another QEMU, a key of
    :data:`QEMUS` such as "7.2" (None: the system's); hosts not named keep what they had.
    ``api_plaintext`` serves the agents' APIs in plain HTTP (None: as the lab had it; a new lab
    serves HTTPS with its own CA's certificates).

    A lab that is up with more hosts keeps them all; one with fewer grows. ``agent_argv`` (or env
    KVMOTION_LAB_AGENT_ARGV, shell-split) replaces the agent command; ``{config}``, ``{address}``
    and ``{port}`` in it are filled in per host. Raises InvalidInput for a bad host count and
    LabError if a step fails (whatever was built stays; ``lab_down`` removes it).
    """
    count = validate_host_count(hosts)
    started = time.monotonic()
    with _lab_lock():
        previous = _load_state_for_repair(log)
        if previous is not None and len(previous.hosts) > count:
            log(f"lab is up with {len(previous.hosts)} hosts; keeping all of them")
            count = len(previous.hosts)
        template = _agent_template(agent_argv, previous)
        _build_network(count, log)
        generations = {host_index(ref): gen for ref, gen in (cpus or {}).items()}
        for gen in generations.values():
            if gen is not None:
                get_mode(gen)  # NotFound lists the valid keys
        versions = {host_index(ref): check_qemu(q) for ref, q in (qemus or {}).items()}
        state = _write_files(count, previous, template, generations, versions, api_plaintext, log)
        for host in state.hosts:
            if host.migration_rate_mbit is not None:
                _apply_rate(host.index, host.migration_rate_mbit)
        dhcp.start(state.lab_dir, SWITCH_NETNS, VM_BRIDGE, 24, log)
        if start_agents:
            state = _ensure_agents(state, log)
        log(f"lab up: {count} hosts in {time.monotonic() - started:.1f}s ({state.lab_dir})")
        return state


def _load_state_for_repair(log: Log) -> LabState | None:
    try:
        return load_state()
    except LabError as exc:
        log(f"ignoring unreadable lab state: {exc.message}")
        return None


def _agent_template(argv: Sequence[str] | None, previous: LabState | None) -> list[str] | None:
    if argv is not None:
        return list(argv)
    from_env = os.environ.get(AGENT_ARGV_ENV)
    if from_env:
        return shlex.split(from_env)
    return previous.agent_argv if previous is not None else None


def _build_network(hosts: int, log: Log) -> None:
    netns.ensure_kernel_modules()
    for cidr in LAB_SUBNETS:
        netns.replace_unreachable_route(cidr, metric=UNREACHABLE_METRIC)
    for ns in plan_netns(hosts):
        if netns.add_netns(ns):
            log(f"created namespace {ns}")
        netns.disable_ipv6(ns=ns)
        netns.set_up("lo", ns)
    for bridge, ns in plan_bridges(hosts):
        netns.add_bridge(bridge, ns)
        netns.set_up(bridge, ns)
    for veth in plan_links(hosts):
        _ensure_veth(veth, log)
    _wait_carrier(hosts)


def _wait_carrier(hosts: int, timeout: float = 5.0) -> None:
    """Wait until every lab link has carrier (the kernel reports it asynchronously)."""
    expected: dict[str | None, set[str]] = {}
    for bridge, ns in plan_bridges(hosts):
        expected.setdefault(ns, set()).add(bridge)
    for veth in plan_links(hosts):
        expected.setdefault(veth.ns, set()).add(veth.name)
        expected.setdefault(veth.peer_ns, set()).add(veth.peer)
    deadline = time.monotonic() + timeout
    while True:
        down = sorted(
            f"{ns or 'root'}/{name}"
            for ns, names in expected.items()
            for name, link in _present(ns, names).items()
            if link is None or not link.up
        )
        if not down:
            return
        if time.monotonic() > deadline:
            raise LabError(f"lab links still down after {timeout:.0f}s: {', '.join(down)}")
        time.sleep(0.05)


def _present(ns: str | None, names: set[str]) -> dict[str, netns.LinkInfo | None]:
    found = netns.links(ns)
    return {name: found.get(name) for name in names}


def _ensure_veth(veth: Veth, log: Log) -> None:
    if not netns.link_exists(veth.name, veth.ns):
        # A switch port whose partner vanished (its namespace outlived by a process) is stale.
        netns.delete_link(veth.peer, veth.peer_ns)
        netns.add_veth(veth.name, veth.peer, ns=veth.ns, peer_ns=veth.peer_ns)
        log(f"created veth {veth.ns or 'root'}/{veth.name} <-> {veth.peer_ns}/{veth.peer}")
    if veth.ns is None:
        netns.disable_ipv6(link=veth.name)
    if veth.address is not None:
        netns.replace_address(veth.name, veth.address, veth.ns)
    if veth.master is not None:
        netns.set_master(veth.name, veth.master, veth.ns)
    if veth.peer_master is not None:
        netns.set_master(veth.peer, veth.peer_master, veth.peer_ns)
    netns.set_up(veth.peer, veth.peer_ns)
    netns.set_up(veth.name, veth.ns)


def _write_files(
    count: int,
    previous: LabState | None,
    template: list[str] | None,
    cpus: Mapping[int, str | None],
    qemus: Mapping[int, str | None],
    api_plaintext: bool | None,
    log: Log,
) -> LabState:
    directory = lab_dir()
    token = previous.token if previous is not None else secrets.token_urlsafe(32)
    state = plan_state(count, directory, token, template)
    plaintext = previous.api_plaintext if api_plaintext is None and previous else api_plaintext
    state = replace(state, api_plaintext=bool(plaintext))
    if previous is not None:
        state = replace(state, migration_tls=previous.migration_tls)
        # Keep what the previous run learned: agent pids and link shaping.
        known = {host.name: host for host in previous.hosts}
        state = replace(state, hosts=[_merge_host(h, known.get(h.name)) for h in state.hosts])
    hosts = []
    for host in state.hosts:
        if host.index in cpus and cpus[host.index] != host.cpu_generation:
            if host.agent_pid is not None and agent_running(host):
                # Its config changes: restart its agent (its VMs keep running).
                netns.terminate(host.agent_pid, grace=5.0)
                log(f"restarting the agent of {host.name} for its new CPU generation")
            host = replace(host, cpu_generation=cpus[host.index], agent_pid=None)
        if host.index in qemus and qemus[host.index] != host.qemu:
            if host.agent_pid is not None and agent_running(host):
                netns.terminate(host.agent_pid, grace=5.0)
                log(f"restarting the agent of {host.name} for its new QEMU")
            host = replace(host, qemu=qemus[host.index], agent_pid=None)
        url = agent_url(host.index, https=not state.api_plaintext)
        if host.agent_pid is not None and url != host.agent_url and agent_running(host):
            netns.terminate(host.agent_pid, grace=5.0)
            log(f"restarting the agent of {host.name} for its new URL {url}")
            host = replace(host, agent_pid=None)
        hosts.append(replace(host, agent_url=url))
    state = replace(state, hosts=hosts)
    try:
        _ensure_certificates(state)
        for path in (state.image_dir, state.shared_datastore):
            path.mkdir(parents=True, exist_ok=True)
        for host in state.hosts:
            host.local_datastore.mkdir(parents=True, exist_ok=True)
            host.run_dir.mkdir(parents=True, exist_ok=True)
            host_config(state, host).save(host.config_path)
    except OSError as exc:
        raise LabError(f"cannot create lab files under {directory}: {exc}") from exc
    save_state(state)
    return state


def _ensure_certificates(state: LabState) -> None:
    """The lab's CA, and each host's certificates naming its management and migration addresses
    (kept once issued: a running agent keeps the files it loaded)."""
    pki.create_ca(state.ca_dir, "kvmotion lab CA")
    for host in state.hosts:
        tls_dir = host.host_dir / "tls"
        if pki.missing_files(tls_dir):
            addresses = [host.management_address, host.migration_address]
            pki.issue_host(state.ca_dir, tls_dir, host.name, addresses)


def _merge_host(host: LabHost, old: LabHost | None) -> LabHost:
    if old is None:
        return host
    return replace(
        host,
        agent_pid=old.agent_pid,
        agent_start_ticks=old.agent_start_ticks,
        agent_url=old.agent_url,
        migration_rate_mbit=old.migration_rate_mbit,
        cpu_generation=old.cpu_generation,
        qemu=old.qemu,
    )


# --- agents -----------------------------------------------------------------------------------


def default_agent_argv() -> list[str]:
    return [sys.executable, "-m", "kvmotion", "host", "serve", "--config", "{config}"]


def agent_argv_for(template: list[str] | None, host: LabHost) -> list[str]:
    """The agent command of ``host``: the template with its placeholders filled in."""
    values = {
        "{config}": str(host.config_path),
        "{address}": host.management_address,
        "{port}": str(DEFAULT_AGENT_PORT),
    }
    argv = []
    for part in template if template is not None else default_agent_argv():
        for key, value in values.items():
            part = part.replace(key, value)
        argv.append(part)
    return argv


def agent_running(host: LabHost) -> bool:
    """True if the agent recorded for ``host`` still runs (and is the same process)."""
    pid = host.agent_pid
    if pid is None or not netns.pid_alive(pid):
        return False
    return (
        host.agent_start_ticks is None or netns.process_start_ticks(pid) == host.agent_start_ticks
    )


def agent_healthy(host: LabHost, timeout: float = 1.0) -> bool:
    """True if ``GET /v1/health`` on the agent answers 200 (asked from this namespace; an https
    agent's certificate verified with the lab's CA)."""
    # trust_env=False: a proxy from the environment must never see lab traffic.
    try:
        with httpx.Client(trust_env=False, timeout=timeout, verify=host.tls() or True) as client:
            return client.get(host.agent_url + AGENT_HEALTH_PATH).status_code == 200
    except httpx.HTTPError:
        return False


def _ensure_agents(state: LabState, log: Log) -> LabState:
    hosts = []
    for host in state.hosts:
        if agent_running(host):
            hosts.append(host)
            continue
        argv = agent_argv_for(state.agent_argv, host)
        pid = netns.popen_in_netns(host.netns, argv, host.agent_log, cwd=host.host_dir)
        host = replace(host, agent_pid=pid, agent_start_ticks=netns.process_start_ticks(pid))
        _write_agent_pidfile(host)
        log(f"started agent for {host.name} in {host.netns}: pid {pid} (log {host.agent_log})")
        hosts.append(host)
    state = replace(state, hosts=hosts)
    save_state(state)
    pending = list(hosts)
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while pending:
        for host in list(pending):
            if agent_healthy(host, timeout=0.5):
                pending.remove(host)
            elif not agent_running(host):
                raise LabError(
                    f"agent for {host.name} exited; see {host.agent_log}:\n{_tail(host.agent_log)}"
                )
        if pending and time.monotonic() > deadline:
            names = ", ".join(h.name for h in pending)
            raise LabError(
                f"agents for {names} did not answer {AGENT_HEALTH_PATH} within "
                f"{AGENT_START_TIMEOUT:.0f}s; see {pending[0].agent_log}"
            )
        if pending:
            time.sleep(0.2)
    return state


def _write_agent_pidfile(host: LabHost) -> None:
    try:
        (host.host_dir / "agent.pid").write_text(f"{host.agent_pid} {host.agent_start_ticks}\n")
    except OSError as exc:
        raise LabError(f"cannot record agent pid for {host.name}: {exc}") from exc


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- link shaping -----------------------------------------------------------------------------


def set_migration_tls(on: bool, log: Log = print) -> LabState:
    """Turn TLS for migration streams on or off in the whole lab (like a site's policy).

    The certificates are the ones ``lab up`` issued each host from the lab's CA (naming its
    management and migration addresses). Every agent restarts with the new
    ``migration_tls`` (its VMs keep running). Raises LabError if the lab is not up.
    """
    with _lab_lock():
        state = load_state()
        if state is None:
            raise LabError("the lab is not up: run `kvmotion lab up` first")
        _ensure_certificates(state)
        hosts = []
        for host in state.hosts:
            if host.agent_pid is not None and agent_running(host):
                netns.terminate(host.agent_pid, grace=5.0)
            hosts.append(replace(host, agent_pid=None, agent_start_ticks=None))
        state = replace(state, migration_tls=on, hosts=hosts)
        for host in state.hosts:
            host_config(state, host).save(host.config_path)
        save_state(state)
        log(f"migration TLS {'required' if on else 'off'} on every host; restarting the agents")
        return _ensure_agents(state, log)


def shape_link(host: int | str, rate_mbit: float | None) -> None:
    """Shape host ``host``'s migration link to ``rate_mbit`` in both directions (tbf on its
    ``vmotion0`` and on the switch-side peer); None removes the shaping.

    Raises InvalidInput for an unknown host or a bad rate, LabError if the host is not up.
    """
    index = host_index(host)
    if rate_mbit is not None and not 0 < rate_mbit <= 100_000:
        raise InvalidInput(f"link rate must be in (0, 100000] Mbit/s, not {rate_mbit}")
    with _lab_lock():
        if not netns.netns_exists(host_netns(index)):
            raise LabError(
                f"lab host {management_address(index)} is not up ({host_netns(index)} is "
                "missing); run `kvmotion lab up`"
            )
        _apply_rate(index, rate_mbit)
        state = load_state()
        if state is not None:
            hosts = [
                replace(h, migration_rate_mbit=rate_mbit) if h.index == index else h
                for h in state.hosts
            ]
            save_state(replace(state, hosts=hosts))


def set_link_up(host: int | str, up: bool, network: str = "migration") -> None:
    """Cut (``up=False``) or mend host ``host``'s migration (or ``management``) link, as a
    pulled cable would: the host's ``vmotion0`` (``mgmt0``) goes down, nothing is told to the
    other end. ``storage`` cuts the host off the shared datastore (:func:`set_storage_up`).

    Raises InvalidInput for an unknown host or network, LabError if the host is not up.
    """
    links = {"migration": HOST_MIGRATION_LINK, "management": HOST_MGMT_LINK}
    if network == "storage":
        set_storage_up(host, up)
        return
    if network not in links:
        raise InvalidInput(f"network must be migration, management or storage, not {network!r}")
    index = host_index(host)
    if not netns.netns_exists(host_netns(index)):
        raise LabError(f"lab host {management_address(index)} is not up; run `kvmotion lab up`")
    netns.ip("link", "set", links[network], "up" if up else "down", ns=host_netns(index))


STORAGE_CUT = "kvmotion-storage-cut"  # the source name of the mount that hides the datastore


def set_storage_up(host: int | str, up: bool) -> None:
    """Cut (``up=False``) or mend host ``host``'s path to the shared datastore, as a failed
    storage link would. The lab's datastore is a directory all hosts share, so the cut is made
    where only that host sees it: in its agent's mount namespace (``ip netns exec`` gives each
    agent its own, and its QEMUs share it), an empty read-only file system is mounted over the
    datastore. The agent's reads and writes there fail from then on, and so do the files a new
    QEMU of that host would open; files its QEMUs have open already stay open (a real cut would
    hang them: HA's fence kills them either way). Idempotent.

    Raises InvalidInput for an unknown host, LabError if its agent does not run.
    """
    state = load_state()
    if state is None:
        raise LabError("the lab is not up; run `kvmotion lab up`")
    lab_host = state.host(host)
    if not agent_running(lab_host) or lab_host.agent_pid is None:
        raise LabError(f"the agent of lab host {lab_host.name} does not run")
    target = str(state.shared_datastore)
    enter = ["nsenter", "-t", str(lab_host.agent_pid), "-m"]
    mounts = netns.run([*enter, "findmnt", "-rn", "-o", "SOURCE", target], check=False).stdout
    cut = STORAGE_CUT in mounts.split()
    if up and cut:
        netns.run([*enter, "umount", "-l", target])
    elif not up and not cut:
        netns.run([*enter, "mount", "-t", "tmpfs", "-o", "ro,size=64k", STORAGE_CUT, target])


def kill_host(host: int | str) -> list[int]:
    """Kill host ``host`` as a power cut would: SIGKILL its agent and every QEMU it started.
    Returns the pids killed. `kvmotion lab up` starts its agent again (its VMs stay off).

    Raises InvalidInput for an unknown host, LabError if the lab is not up.
    """
    state = load_state()
    if state is None:
        raise LabError("the lab is not up; run `kvmotion lab up`")
    lab_host = state.host(host)
    pids = [pid for _, pid in _live_qemus(lab_host.run_dir)]
    if agent_running(lab_host) and lab_host.agent_pid is not None:
        pids.insert(0, lab_host.agent_pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        deadline = time.monotonic() + 10
        while netns.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return pids


def _apply_rate(index: int, rate_mbit: float | None) -> None:
    for dev, ns in (
        (HOST_MIGRATION_LINK, host_netns(index)),
        (switch_port(index, "vmo"), SWITCH_NETNS),
    ):
        if rate_mbit is None:
            netns.clear_rate(dev, ns)
        else:
            netns.set_rate(dev, ns, rate_mbit)


# --- lab status -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostStatus:
    name: str
    netns: str
    netns_exists: bool
    links_up: dict[str, bool]  # mgmt0, vmotion0, vmnet, vmnet-up
    agent_pid: int | None
    agent_alive: bool
    agent_healthy: bool
    qemu_pids: list[int]
    migration_rate_mbit: float | None  # as tc reports it


@dataclass(frozen=True)
class LabStatus:
    state: LabState | None
    namespaces: list[str]  # the lab's namespaces that exist
    root_link_up: bool
    switch_links_up: dict[str, bool]  # bridges and ports in kvm-sw
    client_link_up: bool
    safety_routes: dict[str, bool]  # subnet -> unreachable route present in the root namespace
    hosts: list[HostStatus]
    problems: list[str]  # what is missing or broken, in words; empty when all is well

    @property
    def ok(self) -> bool:
        return not self.problems


def lab_status() -> LabStatus | None:
    """What exists of the lab, or None when nothing does. Only looks; never repairs."""
    problems: list[str] = []
    try:
        state = load_state()
    except LabError as exc:
        state = None
        problems.append(exc.message)
    namespaces = [name for name in netns.list_netns() if is_owned_netns(name)]
    root_links = netns.links(None)
    if state is None and not namespaces and ROOT_LINK not in root_links:
        return None
    count = len(state.hosts) if state is not None else _count_host_netns(namespaces)
    expected = set(plan_netns(count))
    problems += [f"namespace {ns} is missing" for ns in sorted(expected - set(namespaces))]
    root_up = ROOT_LINK in root_links and root_links[ROOT_LINK].up
    if not root_up:
        problems.append(f"root link {ROOT_LINK} is missing or down")
    switch_names = [name for name, ns in plan_bridges(count) if ns == SWITCH_NETNS]
    switch = _links_up(SWITCH_NETNS, switch_names + [v.peer for v in plan_links(count)])
    problems += [
        f"{SWITCH_NETNS}/{name} is missing or down" for name, up in switch.items() if not up
    ]
    client = _links_up(CLIENT_NETNS, [CLIENT_LINK])
    if not client[CLIENT_LINK]:
        problems.append(f"{CLIENT_NETNS}/{CLIENT_LINK} is missing or down")
    routes = {
        cidr: netns.has_unreachable_route(cidr, metric=UNREACHABLE_METRIC) for cidr in LAB_SUBNETS
    }
    problems += [f"safety route unreachable {c} is missing" for c, ok in routes.items() if not ok]
    hosts = []
    directory = state.lab_dir if state is not None else lab_dir()
    for host in state.hosts if state is not None else plan_state(count, directory, "").hosts:
        status = _host_status(host)
        hosts.append(status)
        problems += [
            f"{host.netns}/{n} is missing or down"
            for n, up in status.links_up.items()
            if not up and status.netns_exists
        ]
        if host.agent_pid is not None and not status.agent_alive:
            problems.append(f"agent for {host.name} (pid {host.agent_pid}) is not running")
        elif status.agent_alive and not status.agent_healthy:
            problems.append(f"agent for {host.name} does not answer {AGENT_HEALTH_PATH}")
    return LabStatus(
        state=state,
        namespaces=namespaces,
        root_link_up=root_up,
        switch_links_up=switch,
        client_link_up=client[CLIENT_LINK],
        safety_routes=routes,
        hosts=hosts,
        problems=problems,
    )


def _count_host_netns(namespaces: list[str]) -> int:
    hosts = sum(1 for name in namespaces if name.startswith("kvm-h"))
    return min(max(hosts, MIN_HOSTS), MAX_HOSTS)


def _links_up(ns: str, names: list[str]) -> dict[str, bool]:
    present = netns.links(ns) if netns.netns_exists(ns) else {}
    return {name: name in present and present[name].up for name in names}


def _host_status(host: LabHost) -> HostStatus:
    exists = netns.netns_exists(host.netns)
    names = [HOST_MGMT_LINK, HOST_MIGRATION_LINK, VM_BRIDGE, HOST_UPLINK]
    alive = agent_running(host)
    return HostStatus(
        name=host.name,
        netns=host.netns,
        netns_exists=exists,
        links_up=_links_up(host.netns, names) if exists else dict.fromkeys(names, False),
        agent_pid=host.agent_pid,
        agent_alive=alive,
        agent_healthy=alive and agent_healthy(host),
        qemu_pids=[pid for _, pid in _live_qemus(host.run_dir)],
        migration_rate_mbit=netns.rate_mbit(HOST_MIGRATION_LINK, host.netns)
        if exists and netns.link_exists(HOST_MIGRATION_LINK, host.netns)
        else None,
    )


def _live_qemus(run_dir: Path) -> list[tuple[Path, int]]:
    """(pidfile, pid) of every QEMU started under ``run_dir`` that still runs. The argv check
    guards against a recycled pid."""
    found = []
    for pidfile in qemu_pidfiles(run_dir):
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        argv = netns.process_cmdline(pid)
        if argv and "qemu-system" in argv[0] and netns.pid_alive(pid):
            found.append((pidfile, pid))
    return found


# --- lab down ---------------------------------------------------------------------------------


def lab_down(log: Log = print) -> None:
    """Stop the lab's agents and QEMUs, delete its namespaces and root link, remove its files.

    Works from state.json, and without it from what it finds (agent pidfiles, QEMU pidfiles, the
    lab's namespace names). The safety routes stay. A no-op when nothing is up. Raises LabError if
    something could not be removed.
    """
    started = time.monotonic()
    with _lab_lock():
        try:
            state = load_state()
        except LabError as exc:
            log(f"{exc.message}; cleaning up by name")
            state = None
        directory = state.lab_dir if state is not None else lab_dir()
        did, failures = False, []
        steps: list[Callable[[], bool]] = [
            lambda: _stop_agents(state, directory, log),
            lambda: _stop_qemus(state, directory, log),
            lambda: dhcp.stop(directory, log),
            lambda: _delete_network(state, log),
            lambda: _delete_files(directory, log),
        ]
        # Every step runs even if one before it failed, so that as much as possible is removed.
        for step in steps:
            try:
                did |= step()
            except LabError as exc:
                failures.append(exc.message)
                log(f"error: {exc.message}")
    if failures:
        raise LabError("lab down is incomplete: " + "; ".join(failures))
    if did:
        log(f"lab down in {time.monotonic() - started:.1f}s")
    else:
        log("lab down: nothing was up")


def _stop_agents(state: LabState | None, directory: Path, log: Log) -> bool:
    agents: dict[int, tuple[str, int | None]] = {}
    if state is not None:
        for host in state.hosts:
            if host.agent_pid is not None:
                agents[host.agent_pid] = (host.name, host.agent_start_ticks)
    for pidfile in sorted(directory.glob("hosts/*/agent.pid")):
        try:
            words = pidfile.read_text().split()
            pid, ticks = int(words[0]), (int(words[1]) if words[1:] != ["None"] else None)
        except (OSError, ValueError, IndexError):
            continue
        agents.setdefault(pid, (pidfile.parent.name, ticks))
    did = False
    for pid, (name, ticks) in agents.items():
        if not netns.pid_alive(pid):
            continue
        if ticks is not None and netns.process_start_ticks(pid) != ticks:
            continue  # the pid now belongs to someone else
        did = True
        if netns.terminate(pid, grace=5.0):
            log(f"stopped agent for {name} (pid {pid})")
        else:
            raise LabError(f"agent for {name} (pid {pid}) survived SIGKILL")
    return did


def _stop_qemus(state: LabState | None, directory: Path, log: Log) -> bool:
    run_dirs = set(directory.glob("hosts/*/run"))
    if state is not None:
        run_dirs |= {host.run_dir for host in state.hosts}
    did = False
    for run_dir in sorted(run_dirs):
        for pidfile, pid in _live_qemus(run_dir):
            did = True
            if not netns.terminate(pid, grace=5.0):
                raise LabError(f"QEMU pid {pid} ({pidfile}) survived SIGKILL")
            log(f"stopped QEMU pid {pid} ({pidfile.parent.name})")
    return did


def _delete_network(state: LabState | None, log: Log) -> bool:
    did = False
    if netns.link_exists(ROOT_LINK):
        netns.delete_link(ROOT_LINK)
        log(f"deleted root link {ROOT_LINK}")
        did = True
    names = {name for name in netns.list_netns() if is_owned_netns(name)}
    if state is not None:
        names |= {host.netns for host in state.hosts} | {state.client_netns, state.switch_netns}
    for name in sorted(names):
        if not netns.netns_exists(name):
            continue
        leftovers = netns.netns_pids(name)
        if leftovers:
            # Not ours to kill: the namespace outlives its name until they exit.
            log(f"warning: processes {leftovers} still run in {name}; left alone")
        netns.delete_netns(name)
        log(f"deleted namespace {name}")
        did = True
    return did


def _delete_files(directory: Path, log: Log) -> bool:
    did = False
    try:
        for name in ("datastores", "hosts", "images", "dhcp", "tls-ca"):
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                did = True
            elif path.exists() or path.is_symlink():
                path.unlink()
                did = True
        for name in ("state.json", "state.json.tmp"):
            if (directory / name).exists():
                (directory / name).unlink()
                did = True
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    except OSError as exc:
        raise LabError(f"cannot remove lab files under {directory}: {exc}") from exc
    if did:
        log(f"removed lab files under {directory}")
    return did
