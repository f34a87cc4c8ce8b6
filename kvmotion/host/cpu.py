"""A host's CPU as its VMs see it: the features it offers, the EVC modes it supports, and the
CPU each VM runs with.

The features come from QEMU (``kvmotion.cpu.qemu_cpus``), never from hand-typed lists. A host may
be configured to simulate an older CPU generation (``cpu_generation``, for the lab's mixed
clusters): it then advertises and enforces only that generation's features. Every VM start and
every incoming migration is checked here: a VM never runs with a feature its host lacks.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from kvmotion.cpu import compat
from kvmotion.cpu.catalog import EvcMode, get_mode, load_catalog
from kvmotion.cpu.qemu_cpus import CpuProbe, probe_cpus
from kvmotion.errors import Conflict, KvmotionError, NotFound
from kvmotion.qemu.cmdline import QEMU_BINARY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmCpu:
    """The CPU a VM runs with: QEMU's ``-cpu`` argument and the features the guest gets."""

    model: str  # e.g. "Conroe-v1", or "Opteron_G3-v1,-3dnow" for a mode that removes features
    evc_mode: str | None  # the EVC mode that chose it, if any
    features: tuple[str, ...]  # sorted QEMU feature names; empty when QEMU could not say


def mode_cpu_arg(mode: EvcMode) -> str:
    return ",".join([mode.qemu_model, *(f"-{f}" for f in mode.minus)])


class HostCpu:
    """What this host's QEMU can give VMs. Build with :meth:`probe`."""

    def __init__(
        self, probe: CpuProbe | None, generation: EvcMode | None, error: str | None = None
    ) -> None:
        self.generation = generation
        self.error = error
        if probe is not None and generation is not None:
            limited = compat.limit_host(
                probe.host_features, generation, probe.expansions, accel=probe.accel
            )
            probe = dataclasses.replace(probe, host_features=limited, host_vendor=generation.vendor)
        self.probe = probe

    @classmethod
    async def discover(
        cls,
        accel: str,
        generation_key: str | None,
        extra_models: list[str],
        *,
        binary: str = QEMU_BINARY,
    ) -> HostCpu:
        """Probe QEMU under ``accel``. A simulated generation QEMU cannot run is refused
        (InvalidInput from compat.limit_host); a QEMU that cannot be probed leaves the host
        without CPU facts (and VMs unchecked), saying why."""
        generation = get_mode(generation_key) if generation_key else None
        models = [m.qemu_model for m in load_catalog()] + extra_models
        try:
            probe = await probe_cpus(accel, models, binary=binary)
        except KvmotionError as exc:
            log.error("cannot probe CPU models: %s", exc.message)
            return cls(None, generation, exc.message)
        return cls(probe, generation)

    @property
    def features(self) -> frozenset[str]:
        return self.probe.host_features if self.probe else frozenset()

    @property
    def vendor(self) -> str | None:
        return self.probe.host_vendor if self.probe else None

    def modes(self) -> list[compat.ModeSupport]:
        return compat.host_modes(load_catalog(), self.probe) if self.probe else []

    def model_features(self, model: str) -> frozenset[str] | None:
        if self.probe is None:
            return None
        return self.probe.expansions.get(model)

    def resolve(self, cpu_model: str, evc_mode: str | None) -> VmCpu:
        """The CPU a VM powered on here gets: its EVC mode's baseline if it has one, else its
        configured model. Raises Conflict if this host cannot give it."""
        if evc_mode is not None:
            mode = get_mode(evc_mode)
            arg = mode_cpu_arg(mode)
            features = (
                compat.mode_features(mode, self.probe.expansions) if self.probe else frozenset()
            )
        else:
            arg, features = cpu_model, self.model_features(cpu_model) or frozenset()
            if self.probe is not None and cpu_model not in self.probe.definitions:
                known = cpu_model in ("host", "max")
                if not known:
                    raise NotFound(
                        f"QEMU on this host has no CPU model {cpu_model!r}",
                        code="cpu_model_unknown",
                    )
        cpu = VmCpu(arg, evc_mode, tuple(sorted(features)))
        self.check(cpu, what="start")
        return cpu

    def check(self, cpu: VmCpu, what: str = "run") -> None:
        """Refuse a CPU with features this host lacks (a simulated generation included)."""
        if self.probe is None or not cpu.features:
            return
        missing = compat.missing_for_vm(frozenset(cpu.features), self.features)
        if missing:
            raise Conflict(
                f"this host's CPU lacks features {', '.join(missing)} that CPU {cpu.model} "
                f"needs: it cannot {what} a VM with it (use an EVC mode this host supports)",
                code="cpu_incompatible",
                missing=list(missing),
            )

    def facts(self) -> dict[str, Any]:
        modes = self.modes()
        highest = compat.highest_mode(modes, self.vendor)
        return {
            "features": sorted(self.features),
            "vendor": self.vendor,
            "generation": self.generation.key if self.generation else None,
            "probe_error": self.error,
            "evc_modes": [
                {
                    "key": s.mode.key,
                    "label": s.mode.label,
                    "vendor": s.mode.vendor,
                    "supported": s.supported,
                    "missing": list(s.missing),
                    "reason": s.reason,
                    "features": sorted(s.features),
                }
                for s in modes
            ],
            "highest_evc_mode": highest.mode.key if highest else None,
        }
