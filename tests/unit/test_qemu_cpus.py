"""The CPU probe against the installed QEMU under TCG, and EVC support computed from its answers."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kvmotion.cpu.catalog import available, get_mode, load_catalog
from kvmotion.cpu.compat import highest_mode, host_modes, limit_host, mode_features
from kvmotion.cpu.qemu_cpus import CpuProbe, probe_cpus
from kvmotion.errors import InvalidInput, QemuError
from kvmotion.qemu.cmdline import QEMU_BINARY

pytestmark = pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason="QEMU is not installed")

CATALOG = load_catalog()
MODELS = [mode.qemu_model for mode in CATALOG]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cpu-cache")


@pytest.fixture(scope="module")
def tcg(cache: Path) -> CpuProbe:
    probe = asyncio.run(probe_cpus("tcg", MODELS, cache=cache))
    assert not probe.from_cache
    return probe


def test_merom_is_runnable_under_tcg_and_lacks_sse41(tcg: CpuProbe) -> None:
    conroe = tcg.definitions["Conroe-v1"]
    assert conroe.runnable and conroe.unavailable == ()
    assert tcg.definitions["Conroe"].alias_of == "Conroe-v1"
    assert "sse4.1" not in tcg.expansions["Conroe-v1"]
    assert "sse4.1" in tcg.expansions["Nehalem-v1"]
    # Static expansion: canonical names only, no aliases or non-CPUID options.
    assert "sse4_1" not in tcg.expansions["Nehalem-v1"] and "check" not in tcg.host_features
    assert tcg.host_vendor is None, "TCG emulates both vendors"


def test_catalog_matches_this_qemu(tcg: CpuProbe) -> None:
    for mode in CATALOG:
        if available(mode, tcg.qemu_version):
            assert mode.qemu_model in tcg.definitions, mode.key
            assert tcg.definitions[mode.qemu_model].alias_of is None, "a concrete version"
            assert tcg.model_vendors[mode.qemu_model] == mode.vendor, mode.key
        else:
            assert mode.qemu_model not in tcg.expansions


def test_models_nest_where_expected(tcg: CpuProbe) -> None:
    def feats(key: str) -> frozenset[str]:
        return mode_features(get_mode(key), tcg.expansions)

    intel = [m.key for m in CATALOG if m.vendor == "intel" and m.qemu_model in tcg.expansions]
    for older, newer in itertools.pairwise(intel):
        assert feats(older) <= feats(newer), f"{older} is not a subset of {newer}"
    assert feats("amd-rev-e") <= feats("amd-rev-f") <= feats("amd-greyhound")
    assert feats("amd-zen") <= feats("amd-zen2") <= feats("amd-zen3")
    assert not feats("amd-piledriver") <= feats("amd-zen"), "Opteron_G5 has fma4, tbm, xop"
    assert feats("amd-greyhound-no3dnow") <= feats("amd-greyhound")


async def test_second_probe_comes_from_the_cache(tcg: CpuProbe, cache: Path) -> None:
    started = time.monotonic()
    again = await probe_cpus("tcg", reversed(MODELS), cache=cache)
    assert again.from_cache and time.monotonic() - started < 0.5
    assert again == tcg
    other = await probe_cpus("tcg", ["Conroe-v1"], cache=cache)
    assert not other.from_cache, "the model list is part of the key"
    assert set(other.expansions) == {"Conroe-v1"}


async def test_failed_start_is_a_qemu_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(QemuError, match="invalid accelerator"):
        await probe_cpus("nosuchaccel", ["Conroe-v1"], use_cache=False, timeout=20)
    await probe_cpus("tcg", ["Conroe-v1"], use_cache=False)
    assert list(tmp_path.iterdir()) == [], "temporary directories are removed"


def test_supported_modes_under_tcg(tcg: CpuProbe) -> None:
    listed = host_modes(CATALOG, tcg)
    supported = [s.mode.key for s in listed if s.supported]
    print(f"\nQEMU {tcg.qemu_version} under TCG supports: {', '.join(supported)}")
    for s in listed:
        print(f"  {s.mode.key:24} {len(s.features):3} features  {s.reason}")
    assert {"intel-merom", "intel-penryn", "intel-nehalem", "amd-rev-e", "amd-rev-f"} <= set(
        supported
    )
    assert "intel-sandybridge" not in supported  # TCG has no tsc-deadline (7.2: nor x2apic)
    best = highest_mode(listed, "intel")
    assert best is not None and best.supported
    if tcg.qemu_version.startswith("7.2."):
        assert supported == [
            "intel-merom",
            "intel-penryn",
            "intel-nehalem",
            "intel-westmere",
            "amd-rev-e",
            "amd-rev-f",
        ]
        assert best.mode.key == "intel-westmere"


def test_simulated_generation_on_real_data(tcg: CpuProbe) -> None:
    merom = get_mode("intel-merom")
    limited = limit_host(tcg.host_features, merom, tcg.expansions, accel=tcg.accel)
    assert "sse4.1" not in limited
    old_host = replace(tcg, host_features=limited, host_vendor="intel")
    supported = [s.mode.key for s in host_modes(CATALOG, old_host) if s.supported]
    assert supported == ["intel-merom"]
    with pytest.raises(
        InvalidInput, match=r"TCG cannot emulate .*Sandy Bridge.*(x2apic|tsc-deadline)"
    ):
        limit_host(tcg.host_features, get_mode("intel-sandybridge"), tcg.expansions, accel="tcg")
