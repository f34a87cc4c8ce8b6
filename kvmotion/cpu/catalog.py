"""The EVC mode catalog: which CPU baselines exist and which QEMU model each one is.

The catalog is data (``evc_modes.json``, package data), not code. It names each mode as vCenter
does and pins it to a versioned QEMU CPU model; it never lists CPU features, which come from QEMU
itself (see :mod:`kvmotion.cpu.qemu_cpus`), except ``minus``: features a mode removes from its
model. ``generation`` orders modes within a vendor for display and tie-breaks only; which mode a
host supports is decided from feature sets (:mod:`kvmotion.cpu.compat`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from kvmotion.errors import InvalidInput, KvmotionError, NotFound

Vendor = Literal["intel", "amd"]
VENDORS: tuple[Vendor, ...] = ("intel", "amd")

_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")


@dataclass(frozen=True)
class EvcMode:
    """One EVC mode (CPU baseline)."""

    key: str  # stable id, e.g. "intel-merom"
    label: str  # as vCenter shows it, e.g. 'Intel® "Merom" Generation'
    vendor: Vendor
    qemu_model: str  # pinned version, e.g. "Conroe-v1"
    min_qemu: str  # oldest QEMU that has qemu_model, e.g. "7.2"
    generation: int  # order within the vendor, 1 = oldest
    minus: tuple[str, ...] = ()  # QEMU feature names removed from qemu_model
    note: str = ""

    def __str__(self) -> str:
        return f"{self.label} ({self.key})"


def parse_version(version: str) -> tuple[int, ...]:
    """``"7.2.22"`` -> ``(7, 2, 22)``; a Debian suffix (``"7.2.22 (Debian ...)"``) is ignored.

    Raises InvalidInput when ``version`` does not start with a dotted number.
    """
    head = version.strip().split()[0] if version.strip() else ""
    if not _VERSION.match(head):
        raise InvalidInput(f"not a QEMU version: {version!r} (expected e.g. 7.2 or 7.2.22)")
    return tuple(int(part) for part in head.split("."))


def available(mode: EvcMode, qemu_version: str) -> bool:
    """True if QEMU ``qemu_version`` is new enough to have ``mode``'s CPU model."""
    have = parse_version(qemu_version)
    need = parse_version(mode.min_qemu)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def _bad(message: str) -> KvmotionError:
    # A broken catalog is a packaging bug, not a user error.
    return KvmotionError(f"EVC catalog evc_modes.json: {message}", code="evc_catalog_invalid")


def _parse_mode(raw: Any) -> EvcMode:
    if not isinstance(raw, dict):
        raise _bad(f"entry is not an object: {raw!r}")
    try:
        key, label, vendor = str(raw["key"]), str(raw["label"]), str(raw["vendor"])
        model, min_qemu, generation = (
            str(raw["qemu_model"]),
            str(raw["min_qemu"]),
            raw["generation"],
        )
        minus = raw.get("minus", [])
    except KeyError as exc:
        raise _bad(f"entry {raw.get('key', raw)!r} lacks field {exc}") from exc
    if vendor not in VENDORS:
        raise _bad(f"{key}: vendor {vendor!r} is not one of {', '.join(VENDORS)}")
    if not isinstance(generation, int) or generation < 1:
        raise _bad(f"{key}: generation must be a positive integer")
    if not _VERSION.match(min_qemu):
        raise _bad(f"{key}: min_qemu {min_qemu!r} is not a version")
    if not isinstance(minus, list) or not all(isinstance(f, str) for f in minus):
        raise _bad(f"{key}: minus must be a list of QEMU feature names")
    return EvcMode(
        key=key,
        label=label,
        vendor=vendor,
        qemu_model=model,
        min_qemu=min_qemu,
        generation=generation,
        minus=tuple(sorted(set(minus))),
        note=str(raw.get("note", "")),
    )


def parse_catalog(text: str) -> tuple[EvcMode, ...]:
    """Parse and validate catalog JSON. Raises KvmotionError (code evc_catalog_invalid)."""
    try:
        document = json.loads(text)
        entries = document["modes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad(f"not a catalog: {exc}") from exc
    modes = tuple(_parse_mode(entry) for entry in entries)
    keys = [mode.key for mode in modes]
    if len(set(keys)) != len(keys):
        raise _bad(f"duplicate keys in {keys}")
    ranks = [(mode.vendor, mode.generation) for mode in modes]
    if len(set(ranks)) != len(ranks):
        raise _bad("two modes of one vendor share a generation")
    return tuple(sorted(modes, key=lambda m: (VENDORS.index(m.vendor), m.generation)))


@functools.cache
def load_catalog() -> tuple[EvcMode, ...]:
    """All EVC modes, Intel then AMD, oldest generation first."""
    text = resources.files("kvmotion.cpu").joinpath("evc_modes.json").read_text(encoding="utf-8")
    return parse_catalog(text)


def get_mode(key: str, catalog: tuple[EvcMode, ...] | None = None) -> EvcMode:
    """The mode named ``key``. Raises NotFound listing the valid keys."""
    modes = load_catalog() if catalog is None else catalog
    for mode in modes:
        if mode.key == key:
            return mode
    raise NotFound(
        f"no EVC mode {key!r}; valid modes: {', '.join(mode.key for mode in modes)}",
        code="evc_mode_not_found",
        valid=[mode.key for mode in modes],
    )
