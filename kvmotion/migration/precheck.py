"""Migration prechecks: pure functions of inventory and fresh host facts.

Compute: the seed's three conditions (shared storage, a migration network, compatible CPUs) plus
what vCenter also checks (networks, memory, VM state, concurrency). Storage: the target datastore
is seen by the host that will use it, has room, and is not where the disks are. Both: compute's
checks without shared storage, plus storage's on the destination. Errors stop a migration;
warnings are shown. Each finding says what to do. No I/O here: the caller gathers the facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvmotion.qemu.cmdline import unpadded_refusal

# A copy needs its disks' full size free on the target, plus this share for what a qcow2 adds
# (metadata) and what the guest writes while the copy runs.
SPACE_MARGIN = 0.10


@dataclass(frozen=True)
class Finding:
    code: str
    message: str


@dataclass(frozen=True)
class PrecheckResult:
    errors: tuple[Finding, ...] = ()
    warnings: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class HostView:
    """What the precheck needs to know of a host, from its latest facts."""

    name: str
    connected: bool
    migration_address: str | None
    datastores: frozenset[str]
    networks: frozenset[str]
    available_memory_bytes: int
    accel: str
    cpu_vendor: str
    qemu_version: str = "unknown"
    machine_types: frozenset[str] | None = None  # None: the host did not say
    ram_pad_kib: int = 0  # the RAM pad VMs get here: one without it must not come
    runnable_cpu_models: frozenset[str] | None = None  # None: the host did not say
    cpu_features: frozenset[str] | None = None  # what VMs may use here; None: unknown
    cpu_family: str | None = None  # "intel" or "amd" as VMs see it; None: either (TCG)
    evc_modes: tuple[ModeView, ...] = ()  # the EVC modes this host supports
    datastore_free_bytes: Mapping[str, int] = field(default_factory=dict)
    # How it encrypts streams to other hosts: ("required" | "off", certificates ready); None
    # when the host did not say.
    migration_tls: tuple[str, bool] | None = None
    maintenance: bool = False  # entering or in maintenance mode: nothing new comes here


@dataclass(frozen=True)
class ModeView:
    key: str
    label: str
    feature_count: int


@dataclass(frozen=True)
class VmView:
    name: str
    host: str | None
    power_state: str
    disk_datastores: tuple[str, ...]
    networks: tuple[str, ...]
    memory_mib: int
    cpu_model: str
    machine_type: str = ""
    ram_pad_kib: int | None = None  # the pad it runs with; None: not known
    migrating: bool = False
    cpu_features: tuple[str, ...] = ()  # the features it was started with
    disk_bytes: int = 0  # the virtual size of all its disks
    vcpus: int = 1


@dataclass
class _Findings:
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    def error(self, code: str, message: str) -> None:
        self.errors.append(Finding(code, message))

    def warn(self, code: str, message: str) -> None:
        self.warnings.append(Finding(code, message))

    def result(self) -> PrecheckResult:
        return PrecheckResult(tuple(self.errors), tuple(self.warnings))


def precheck_migration(
    vm: VmView, source: HostView, dest: HostView, datastore: str | None = None
) -> PrecheckResult:
    """Can ``vm`` move to ``dest`` (compute), to ``datastore`` on its host (storage; ``dest``
    is ``source``), or to both?"""
    if datastore is None:
        return precheck_compute(vm, source, dest)
    if dest.name == source.name:
        return precheck_storage(vm, source, datastore)
    return precheck_both(vm, source, dest, datastore)


def precheck_compute(vm: VmView, source: HostView, dest: HostView) -> PrecheckResult:
    """Can ``vm`` move, compute only, from ``source`` to ``dest``?"""
    f = _Findings()
    _vm_and_hosts(vm, source, dest, f)
    if dest.name == source.name:
        f.error(
            "same_host",
            f"VM {vm.name} already runs on {dest.name}: choose another host "
            "(or a storage migration to change only its datastore)",
        )
    _shared_storage(vm, dest, f)
    _compute(vm, source, dest, f)
    return f.result()


def precheck_storage(vm: VmView, host: HostView, datastore: str) -> PrecheckResult:
    """Can ``vm``'s disks move to ``datastore`` of its ``host`` (live, or cold if it is off)?"""
    f = _Findings()
    _vm_and_hosts(vm, host, host, f, off_ok=True)
    _target_datastore(vm, host, datastore, f)
    return f.result()


def precheck_both(vm: VmView, source: HostView, dest: HostView, datastore: str) -> PrecheckResult:
    """Can ``vm`` move to ``dest`` with its disks copied to ``datastore`` there?"""
    f = _Findings()
    _vm_and_hosts(vm, source, dest, f)
    _target_datastore(vm, dest, datastore, f)
    _compute(vm, source, dest, f)
    return f.result()


def _vm_and_hosts(
    vm: VmView, source: HostView, dest: HostView, f: _Findings, *, off_ok: bool = False
) -> None:
    if vm.host != source.name:
        f.error("wrong_source", f"VM {vm.name} runs on {vm.host}, not on {source.name}")
    if vm.power_state != "poweredOn" and not (off_ok and vm.power_state == "poweredOff"):
        f.error(
            "not_running",
            f"VM {vm.name} is {vm.power_state}: vMotion moves running VMs; power it on first",
        )
    if vm.migrating:
        f.error("already_migrating", f"VM {vm.name} is already being migrated")
    for host in _distinct(source, dest):
        if not host.connected:
            f.error(
                "host_disconnected",
                f"host {host.name} is not connected (its agent does not answer)",
            )


def _compute(vm: VmView, source: HostView, dest: HostView, f: _Findings) -> None:
    if dest.maintenance:
        f.error(
            "host_in_maintenance",
            f"host {dest.name} is in maintenance mode: nothing new is placed on it (choose "
            "another host, or `kvmotion host maintenance exit` it)",
        )
    _network(vm, source, dest, f)
    _machine(vm, source, dest, f)
    _cpu(vm, source, dest, f)
    need = vm.memory_mib * 2**20
    if need > dest.available_memory_bytes:
        f.error(
            "insufficient_memory",
            f"host {dest.name} has {dest.available_memory_bytes // 2**20} MiB available; "
            f"VM {vm.name} needs {vm.memory_mib} MiB",
        )
    elif need > dest.available_memory_bytes * 0.9:
        f.warn("memory_tight", f"host {dest.name} would have under 10 % of its memory left")


def _distinct(source: HostView, dest: HostView) -> tuple[HostView, ...]:
    return (source,) if source.name == dest.name else (source, dest)


def _shared_storage(vm: VmView, dest: HostView, f: _Findings) -> None:
    for ds in sorted(set(vm.disk_datastores)):
        if ds not in dest.datastores:
            f.error(
                "datastore_not_shared",
                f"host {dest.name} does not see datastore {ds!r}, which holds disks of VM "
                f"{vm.name}: a compute-only migration needs shared storage; change both "
                "(type 'both', with a datastore of that host) or choose a host that sees it",
            )


def _target_datastore(vm: VmView, host: HostView, datastore: str, f: _Findings) -> None:
    if datastore not in host.datastores:
        seen = ", ".join(sorted(host.datastores)) or "none"
        f.error(
            "datastore_not_visible",
            f"host {host.name} does not see datastore {datastore!r} (it sees: {seen})",
        )
        return
    if vm.disk_datastores and all(ds == datastore for ds in vm.disk_datastores):
        f.error(
            "same_datastore",
            f"VM {vm.name}'s disks are on datastore {datastore!r} already: choose another "
            "datastore" + ("" if host.name == vm.host else ", or migrate compute only"),
        )
        return
    if datastore in vm.disk_datastores:
        f.error(
            "disks_split",
            f"some of VM {vm.name}'s disks are on datastore {datastore!r} already and some not: "
            "move them all to a third datastore first (every disk moves with the VM's folder)",
        )
        return
    free = host.datastore_free_bytes.get(datastore)
    need = int(vm.disk_bytes * (1 + SPACE_MARGIN))
    if free is not None and need > free:
        f.error(
            "insufficient_space",
            f"datastore {datastore!r} has {free // 2**20} MiB free on host {host.name}; VM "
            f"{vm.name}'s disks need {vm.disk_bytes // 2**20} MiB plus "
            f"{SPACE_MARGIN:.0%} margin: free space or choose another datastore",
        )


def _tls(source: HostView, dest: HostView, f: _Findings) -> None:
    """Both ends of a stream must agree on TLS, and a host that requires it needs certificates."""
    if source.migration_tls is None and dest.migration_tls is None:
        return  # agents from before TLS: both send plaintext
    # An agent that does not report TLS predates it: it sends and accepts plaintext only.
    (src_mode, _), (dst_mode, _) = (host.migration_tls or ("off", True) for host in (source, dest))
    if src_mode != dst_mode:
        tls, plain = (source, dest) if src_mode == "required" else (dest, source)
        f.error(
            "migration_tls_mismatch",
            f"host {tls.name} requires TLS for migration streams and {plain.name} sends them in "
            "plaintext (migration_tls: off): give both hosts the same migration_tls",
        )
    for host in _distinct(source, dest):
        mode, ready = host.migration_tls or ("off", True)
        if mode == "required" and not ready:
            f.error(
                "tls_not_ready",
                f"host {host.name} requires migration TLS but lacks its certificates: issue "
                f"them with `kvmotion tls issue --host {host.name} ...` into its tls_dir",
            )


def _network(vm: VmView, source: HostView, dest: HostView, f: _Findings) -> None:
    _tls(source, dest, f)
    for host in _distinct(source, dest):
        if not host.migration_address:
            f.error(
                "no_migration_network",
                f"host {host.name} has no migration (vMotion) address: configure one on the "
                "migration network; memory never crosses the management or VM network",
            )
    for net in sorted(set(vm.networks)):
        if net not in dest.networks:
            f.error(
                "network_missing",
                f"host {dest.name} has no network {net!r}, which VM {vm.name} is connected to",
            )


def _machine(vm: VmView, source: HostView, dest: HostView, f: _Findings) -> None:
    """The VM's hardware version must exist on the destination, and its RAM size be safe
    there."""
    types = dest.machine_types
    if vm.machine_type and types is not None and vm.machine_type not in types:
        f.error(
            "machine_type_missing",
            f"VM {vm.name} has machine type {vm.machine_type} (its hardware version), which "
            f"QEMU {dest.qemu_version} on {dest.name} does not run ({source.name} runs QEMU "
            f"{source.qemu_version}): give the cluster's new VMs the machine type of its "
            f"oldest QEMU (`machine_type` in each host's config), or upgrade {dest.name}'s QEMU",
        )
    if dest.ram_pad_kib and vm.ram_pad_kib == 0:
        f.error("ram_pad_missing", unpadded_refusal(vm.name, dest.name, dest.qemu_version))


def _cpu(vm: VmView, source: HostView, dest: HostView, f: _Findings) -> None:
    if source.accel != dest.accel:
        f.error(
            "accel_mismatch",
            f"host {source.name} runs VMs under {source.accel} and {dest.name} under "
            f"{dest.accel}: a running VM cannot change accelerator",
        )
    if source.cpu_vendor != dest.cpu_vendor and source.accel == "kvm":
        f.error(
            "cpu_vendor",
            f"host {source.name} has {source.cpu_vendor} CPUs and {dest.name} "
            f"{dest.cpu_vendor}: Intel and AMD never mix",
        )
    if source.cpu_family and dest.cpu_family and source.cpu_family != dest.cpu_family:
        f.error(
            "cpu_vendor",
            f"host {source.name} gives VMs {source.cpu_family} CPUs and {dest.name} "
            f"{dest.cpu_family}: Intel and AMD never mix",
        )
    if vm.cpu_features and dest.cpu_features is not None:
        missing = sorted(set(vm.cpu_features) - dest.cpu_features)
        if missing:
            f.error(
                "cpu_incompatible",
                f"host {dest.name} lacks CPU features {', '.join(missing)} that VM {vm.name} "
                f"was started with: {_evc_fix(source, dest)}",
            )
    if dest.runnable_cpu_models is not None and vm.cpu_model not in dest.runnable_cpu_models:
        f.error(
            "cpu_incompatible",
            f"host {dest.name} cannot run CPU model {vm.cpu_model} of VM {vm.name}: "
            "set an EVC baseline both hosts support",
        )


def _evc_fix(source: HostView, dest: HostView) -> str:
    """Name the EVC mode that would make the move possible: the richest both hosts support."""
    theirs = {m.key for m in source.evc_modes}
    both = [m for m in dest.evc_modes if m.key in theirs]
    if not both:
        return "no EVC mode is supported by both hosts"
    best = max(both, key=lambda m: (m.feature_count, m.key))
    return (
        f"set the cluster's EVC mode to {best.label} ({best.key}), which both hosts support, "
        "and power-cycle the VM"
    )
