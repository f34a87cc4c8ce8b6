"""EVC compatibility as pure functions of feature sets: data in, decision out, no I/O.

Everything here is decided by set inclusion, never by the order of a list or by generation
numbers: QEMU's models mostly nest, but not everywhere (Opteron_G5 has fma4, tbm and xop, which
EPYC lacks; under TCG Opteron_G3 has ``monitor``, which Opteron_G4 lacks). ``generation`` only
breaks ties between modes with equally many features.

Definitions used throughout:

- A mode's features are its QEMU model's static expansion minus the mode's ``minus`` list.
- A host **supports** a mode iff QEMU here has the mode's model, the model is runnable under the
  host's accelerator (no unavailable features, ignoring ones the mode removes anyway), every mode
  feature is among the host's features, and the host's vendor (if it has one) is the mode's.
- The **highest** of a set of modes is the one with the most features (ties: the later
  generation). It is not necessarily a superset of all the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from kvmotion.cpu.catalog import VENDORS, EvcMode, available
from kvmotion.errors import InvalidInput


class ModelView(Protocol):
    """One CPU model definition as QEMU reports it (see ``qemu_cpus.CpuModel``)."""

    @property
    def runnable(self) -> bool: ...
    @property
    def unavailable(self) -> tuple[str, ...]: ...


class ProbeView(Protocol):
    """What host support needs to know about one host (``qemu_cpus.CpuProbe`` is one)."""

    @property
    def qemu_version(self) -> str: ...
    @property
    def accel(self) -> str: ...
    @property
    def definitions(self) -> Mapping[str, ModelView]: ...
    @property
    def expansions(self) -> Mapping[str, frozenset[str]]: ...
    @property
    def host_features(self) -> frozenset[str]: ...
    @property
    def host_vendor(self) -> str | None: ...


@dataclass(frozen=True)
class Baseline:
    """An EVC mode together with its feature set on this QEMU."""

    mode: EvcMode
    features: frozenset[str]


@dataclass(frozen=True)
class HostCpu:
    """A cluster member's CPU: its features and vendor (None: emulates any vendor, e.g. TCG)."""

    features: frozenset[str]
    vendor: str | None


@dataclass(frozen=True)
class ModeSupport:
    """Whether one host supports one mode, and if not, why."""

    mode: EvcMode
    supported: bool
    missing: tuple[str, ...]  # sorted: features the host lacks or cannot run
    reason: str
    features: frozenset[str]  # the mode's features; empty if QEMU here lacks the model


class RefusalKind(StrEnum):
    HOST_LACKS_FEATURES = "evc_host_lacks_features"
    HOST_VENDOR = "evc_host_vendor_mismatch"
    VM_NEEDS_POWER_CYCLE = "evc_vm_needs_power_cycle"


@dataclass(frozen=True)
class Refusal:
    """One reason a cluster cannot take an EVC mode, as vCenter words it."""

    kind: RefusalKind
    subject: str  # the host's or the VM's name
    missing: tuple[str, ...]  # sorted features at fault
    message: str


def vendor_name(vendor: str | None) -> str:
    return {"intel": "Intel", "amd": "AMD", None: "any vendor"}.get(vendor, str(vendor))


def accel_name(accel: str | None) -> str:
    return {"tcg": "TCG", "kvm": "KVM", None: "the accelerator"}.get(accel, str(accel))


def _names(features: Iterable[str]) -> str:
    return ", ".join(sorted(features))


def mode_features(mode: EvcMode, expansions: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The features of ``mode``: its model's expansion minus ``mode.minus``.

    Raises InvalidInput when ``expansions`` lacks the mode's QEMU model (QEMU too old, or the
    model was not probed).
    """
    try:
        expansion = expansions[mode.qemu_model]
    except KeyError:
        raise InvalidInput(
            f"EVC mode {mode.label} needs QEMU CPU model {mode.qemu_model} "
            f"(QEMU {mode.min_qemu} or newer), which is not available here",
            code="evc_mode_unavailable",
            mode=mode.key,
        ) from None
    return expansion - frozenset(mode.minus)


def baseline(mode: EvcMode, expansions: Mapping[str, frozenset[str]]) -> Baseline:
    """``mode`` with its features. Raises InvalidInput as :func:`mode_features`."""
    return Baseline(mode, mode_features(mode, expansions))


def _support(mode: EvcMode, probe: ProbeView) -> ModeSupport:
    model = probe.definitions.get(mode.qemu_model)
    expansion = probe.expansions.get(mode.qemu_model)
    if model is None or expansion is None:
        if not available(mode, probe.qemu_version):
            why = f"needs QEMU {mode.min_qemu} or newer (this host has {probe.qemu_version})"
        elif model is None:
            why = f"QEMU {probe.qemu_version} has no CPU model {mode.qemu_model}"
        else:
            why = f"CPU model {mode.qemu_model} was not probed"
        return ModeSupport(mode, False, (), why, frozenset())
    features = expansion - frozenset(mode.minus)
    blocked = frozenset(model.unavailable) - frozenset(mode.minus)
    lacking = features - probe.host_features
    missing = tuple(sorted(blocked | lacking))
    if blocked:
        why = f"{accel_name(probe.accel)} cannot provide {_names(blocked)} on this host"
    elif lacking:
        why = f"host lacks {_names(lacking)}"
    else:
        why = "supported"
    return ModeSupport(mode, not missing, missing, why, features)


def _order(support: ModeSupport) -> tuple[int, bool, int, int, str]:
    vendor = support.mode.vendor
    rank = VENDORS.index(vendor) if vendor in VENDORS else len(VENDORS)
    return (
        rank,
        not support.features,
        len(support.features),
        support.mode.generation,
        support.mode.key,
    )


def host_modes(catalog: Iterable[EvcMode], probe: ProbeView) -> list[ModeSupport]:
    """Every mode of the host's vendor (all vendors if it has none), with support and reason.

    Listed by vendor (Intel, then AMD), then from fewest to most features (ties: generation);
    modes whose model QEMU here lacks come last within their vendor.
    """
    modes = [m for m in catalog if probe.host_vendor is None or m.vendor == probe.host_vendor]
    return sorted((_support(mode, probe) for mode in modes), key=_order)


def _rank(support: ModeSupport) -> tuple[int, int]:
    return (len(support.features), support.mode.generation)


def highest_mode(supports: Iterable[ModeSupport], vendor: str | None = None) -> ModeSupport | None:
    """The supported mode with the most features (ties: later generation), or None.

    ``vendor`` restricts the choice to one vendor's modes.
    """
    candidates = [
        s for s in supports if s.supported and (vendor is None or s.mode.vendor == vendor)
    ]
    return max(candidates, key=_rank, default=None)


def common_modes(*per_host: Sequence[ModeSupport]) -> list[ModeSupport]:
    """The modes every host supports, in the first host's order."""
    if not per_host:
        return []
    keys = set.intersection(*({s.mode.key for s in host if s.supported} for host in per_host))
    return [s for s in per_host[0] if s.mode.key in keys]


def suggest_mode(
    catalog: Iterable[EvcMode],
    vm_vendor: str | None,
    modes_supported_by_both: Iterable[ModeSupport],
) -> EvcMode | None:
    """The highest catalog mode of ``vm_vendor`` among modes both hosts support, or None.

    Used to name a fix in a refusal: "set the cluster's EVC mode to X".
    """
    keys = {mode.key for mode in catalog}
    both = [s for s in modes_supported_by_both if s.mode.key in keys]
    best = highest_mode(both, vm_vendor)
    return None if best is None else best.mode


def limit_host(
    host_features: frozenset[str],
    generation_mode: EvcMode,
    expansions: Mapping[str, frozenset[str]],
    *,
    accel: str | None = None,
) -> frozenset[str]:
    """The features of a host simulating an older CPU: the generation's features ∩ the host's.

    Raises InvalidInput when the host (under ``accel``) cannot run the generation at all, listing
    the features it cannot emulate, or when QEMU here lacks the generation's model. A caller that
    simulates a generation should also give the host the mode's vendor.
    """
    features = mode_features(generation_mode, expansions)
    unavailable = features - host_features
    if unavailable:
        raise InvalidInput(
            f"{accel_name(accel)} cannot emulate {generation_mode.label} "
            f"({generation_mode.qemu_model}) on this host: it lacks {_names(unavailable)}",
            code="evc_generation_not_emulable",
            mode=generation_mode.key,
            unavailable=sorted(unavailable),
        )
    return features & host_features


def missing_for_vm(vm_features: frozenset[str], dest_features: frozenset[str]) -> tuple[str, ...]:
    """Features the VM was started with that the destination lacks, sorted (empty: it may move)."""
    return tuple(sorted(vm_features - dest_features))


def check_cluster_mode(
    mode: Baseline, hosts: Mapping[str, HostCpu], powered_on_vms: Mapping[str, frozenset[str]]
) -> list[Refusal]:
    """Why the cluster cannot take ``mode`` (empty: it can), hosts first, each sorted by name.

    A host is refused when its vendor is the other one, or when it lacks a mode feature. A
    powered-on VM is refused when it runs with features beyond the mode: it must be power-cycled
    to pick up the baseline (a running guest cannot lose CPU features).
    """
    label = mode.mode.label
    refusals: list[Refusal] = []
    for name in sorted(hosts):
        host = hosts[name]
        if host.vendor is not None and host.vendor != mode.mode.vendor:
            refusals.append(
                Refusal(
                    RefusalKind.HOST_VENDOR,
                    name,
                    (),
                    f"host {name} has an {vendor_name(host.vendor)} CPU; EVC mode {label} is for "
                    f"{vendor_name(mode.mode.vendor)} hosts (Intel and AMD never mix)",
                )
            )
            continue
        lacking = tuple(sorted(mode.features - host.features))
        if lacking:
            refusals.append(
                Refusal(
                    RefusalKind.HOST_LACKS_FEATURES,
                    name,
                    lacking,
                    f"host {name} cannot support EVC mode {label}: it lacks CPU features "
                    f"{', '.join(lacking)}",
                )
            )
    for name in sorted(powered_on_vms):
        beyond = tuple(sorted(powered_on_vms[name] - mode.features))
        if beyond:
            refusals.append(
                Refusal(
                    RefusalKind.VM_NEEDS_POWER_CYCLE,
                    name,
                    beyond,
                    f"VM {name} is powered on with CPU features beyond EVC mode {label} "
                    f"({', '.join(beyond)}): power it off and on again to apply the mode",
                )
            )
    return refusals


def vm_mode_allowed(vm_mode: Baseline, cluster_mode: Baseline | None) -> bool:
    """Per-VM EVC is allowed iff it is not above the cluster's mode: same vendor, feature subset.

    Without a cluster mode any per-VM mode is allowed.
    """
    if cluster_mode is None:
        return True
    return (
        vm_mode.mode.vendor == cluster_mode.mode.vendor
        and vm_mode.features <= cluster_mode.features
    )
