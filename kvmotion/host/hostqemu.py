"""The QEMU a host runs its VMs with, as the agent finds it at start: which binary, its version
and machine types, the accelerator it runs guests under, and so the RAM pad VMs get here."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kvmotion.errors import InvalidInput
from kvmotion.host import facts
from kvmotion.host.config import HostConfig
from kvmotion.qemu.accel import AccelChoice, choose_accelerator
from kvmotion.qemu.cmdline import ram_pad_kib

log = logging.getLogger(__name__)

PROBE_IMAGE = "kvmotion-guest"  # the image the accelerator probe boots


@dataclass(frozen=True)
class HostQemu:
    binary: str
    accel: AccelChoice
    version: str  # e.g. "10.0.2"; "unknown" when it did not say
    machine_types: tuple[str, ...]  # empty when it did not say

    @property
    def ram_pad_kib(self) -> int:
        """What VMs powered on here get (see ``qemu.cmdline.ram_pad_kib``)."""
        return ram_pad_kib(self.version, self.accel.accel)

    def check_machine_type(self, machine_type: str, host: str) -> None:
        """Raises InvalidInput unless this QEMU runs ``machine_type`` (or did not say)."""
        types = self.machine_types
        if types and machine_type not in types:
            q35 = ", ".join(t for t in types if t.startswith("pc-q35-"))
            raise InvalidInput(
                f"QEMU {self.version} on host {host} has no machine type {machine_type!r} "
                f"(its q35 types: {q35})",
                code="machine_type_unknown",
            )

    @classmethod
    def unprobed(cls, config: HostConfig) -> HostQemu:
        return cls(config.qemu_binary, AccelChoice("tcg", "not probed yet"), "unknown", ())

    @classmethod
    async def probe(cls, config: HostConfig) -> HostQemu:
        image = config.image_dir / PROBE_IMAGE if config.image_dir else None
        binary = config.qemu_binary
        accel, version, machine_types = await asyncio.gather(
            choose_accelerator(
                image / "vmlinuz" if image else None,
                image / "initrd.img" if image else None,
                forced=config.accel,
                binary=binary,
            ),
            facts.qemu_version(binary),
            facts.machine_types(binary),
        )
        found = cls(binary, accel, version, machine_types)
        log.info(
            "host %s: QEMU %s (%s), accelerator %s (%s)%s",
            config.name, version, binary, accel.accel, accel.reason,
            f", VMs padded by {found.ram_pad_kib} KiB" if found.ram_pad_kib else "",
        )  # fmt: skip
        return found
