"""EVC: the catalog, and properties of the pure compatibility functions over generated worlds.

A generated world is a catalog of modes with random feature sets (some models unknown to QEMU,
some not runnable under the accelerator) and a host with random features and vendor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmotion.cpu.catalog import (
    VENDORS,
    EvcMode,
    available,
    get_mode,
    load_catalog,
    parse_catalog,
    parse_version,
)
from kvmotion.cpu.compat import (
    Baseline,
    HostCpu,
    ModeSupport,
    RefusalKind,
    check_cluster_mode,
    common_modes,
    highest_mode,
    host_modes,
    limit_host,
    missing_for_vm,
    mode_features,
    suggest_mode,
    vm_mode_allowed,
)
from kvmotion.cpu.qemu_cpus import CpuModel, CpuProbe
from kvmotion.errors import InvalidInput, KvmotionError, NotFound

FEATURES = ["sse", "sse2", "pni", "ssse3", "sse4.1", "sse4.2", "popcnt", "aes", "avx", "3dnow"]
feature_sets = st.frozensets(st.sampled_from(FEATURES))
host_vendors = st.sampled_from([None, "intel", "amd"])


@dataclass(frozen=True)
class World:
    catalog: tuple[EvcMode, ...]
    probe: CpuProbe

    def with_host(self, features: frozenset[str], vendor: str | None = None) -> CpuProbe:
        return replace(self.probe, host_features=features, host_vendor=vendor)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    generation = {"intel": 0, "amd": 0}
    modes: list[EvcMode] = []
    definitions: dict[str, CpuModel] = {}
    expansions: dict[str, frozenset[str]] = {}
    for index in range(draw(st.integers(1, 8))):
        vendor = draw(st.sampled_from(VENDORS))
        generation[vendor] += 1
        model = f"Model{index}-v1"
        features = draw(feature_sets)
        minus = draw(st.frozensets(st.sampled_from(FEATURES), max_size=2))
        modes.append(
            EvcMode(
                key=f"{vendor}-{index}",
                label=f"{vendor.title()} generation {index}",
                vendor=vendor,
                qemu_model=model,
                min_qemu=draw(st.sampled_from(["7.2", "8.0"])),
                generation=generation[vendor],
                minus=tuple(sorted(minus)),
            )
        )
        if draw(st.integers(0, 4)) > 0:  # mostly known to QEMU
            unavailable = draw(st.frozensets(st.sampled_from(FEATURES), max_size=2)) & features
            if draw(st.booleans()):
                unavailable = frozenset()
            definitions[model] = CpuModel(model, not unavailable, tuple(sorted(unavailable)))
            expansions[model] = features
    probe = CpuProbe(
        qemu_version="7.2.22",
        accel="tcg",
        definitions=definitions,
        expansions=expansions,
        model_vendors={},
        host_features=draw(feature_sets),
        host_vendor=draw(host_vendors),
    )
    return World(tuple(modes), probe)


def expected_support(mode: EvcMode, probe: CpuProbe) -> bool:
    model = probe.definitions.get(mode.qemu_model)
    if model is None or mode.qemu_model not in probe.expansions:
        return False
    runnable = not (set(model.unavailable) - set(mode.minus))
    return runnable and mode_features(mode, probe.expansions) <= probe.host_features


# --- catalog -----------------------------------------------------------------------------------


def test_catalog_has_every_mode_pinned_and_ordered() -> None:
    catalog = load_catalog()
    keys = [mode.key for mode in catalog]
    assert len(keys) == len(set(keys)) == 22
    assert [m.vendor for m in catalog] == ["intel"] * 12 + ["amd"] * 10
    for vendor in VENDORS:
        gens = [m.generation for m in catalog if m.vendor == vendor]
        assert gens == sorted(gens) == list(range(1, len(gens) + 1))
    assert all(re.fullmatch(r".+-v\d+", m.qemu_model) for m in catalog), "versions are pinned"
    merom = get_mode("intel-merom")
    assert (merom.label, merom.qemu_model) == ('Intel® "Merom" Generation', "Conroe-v1")
    assert get_mode("amd-zen2").label == 'AMD "Zen 2" Generation'
    no3dnow = get_mode("amd-greyhound-no3dnow")
    assert no3dnow.label == "AMD Opteron™ Generation 3 (no 3DNow!™)"
    assert set(no3dnow.minus) == {"3dnow", "3dnowext"}


def test_catalog_json_lists_no_features_but_minus() -> None:
    text = resources.files("kvmotion.cpu").joinpath("evc_modes.json").read_text(encoding="utf-8")
    allowed = {"key", "label", "vendor", "qemu_model", "min_qemu", "generation", "minus", "note"}
    for entry in json.loads(text)["modes"]:
        assert set(entry) <= allowed


def test_get_mode_unknown_lists_valid_keys() -> None:
    with pytest.raises(NotFound) as err:
        get_mode("intel-pentium")
    assert "intel-merom" in err.value.message and "amd-zen3" in err.value.message


def test_available_compares_versions_not_strings() -> None:
    sapphire, genoa = get_mode("intel-sapphirerapids"), get_mode("amd-zen4")
    assert not available(sapphire, "7.2.22") and available(sapphire, "8.0")
    assert available(sapphire, "10.0.0") and not available(genoa, "8.0.4")
    assert available(genoa, "8.1") and available(get_mode("intel-merom"), "7.2.0")
    assert parse_version("7.2.22 (Debian 1:7.2+dfsg-7)") == (7, 2, 22)
    with pytest.raises(InvalidInput):
        parse_version("seven")


def test_parse_catalog_rejects_duplicates_and_bad_vendors() -> None:
    entry = {"key": "x", "label": "X", "vendor": "intel", "qemu_model": "X-v1", "min_qemu": "7.2"}
    with pytest.raises(KvmotionError, match="duplicate"):
        parse_catalog(json.dumps({"modes": [{**entry, "generation": g} for g in (1, 2)]}))
    with pytest.raises(KvmotionError, match="vendor"):
        parse_catalog(json.dumps({"modes": [{**entry, "generation": 1, "vendor": "via"}]}))


# --- host support ------------------------------------------------------------------------------


@given(worlds())
def test_host_supports_mode_iff_runnable_and_subset(world: World) -> None:
    for support in host_modes(world.catalog, world.probe):
        assert support.supported == expected_support(support.mode, world.probe)
        assert list(support.missing) == sorted(set(support.missing))
        if support.supported:
            assert support.missing == () and support.reason == "supported"
        elif support.features:
            assert set(support.missing) >= support.features - world.probe.host_features
            assert support.missing, "a refusal of a known model names the features"


@given(worlds())
def test_host_modes_lists_the_hosts_vendor_only(world: World) -> None:
    listed = host_modes(world.catalog, world.probe)
    vendor = world.probe.host_vendor
    wanted = [m for m in world.catalog if vendor is None or m.vendor == vendor]
    assert sorted(s.mode.key for s in listed) == sorted(m.key for m in wanted)


@given(worlds())
def test_host_modes_go_from_fewest_to_most_features(world: World) -> None:
    listed = host_modes(world.catalog, world.probe)
    ranks = [VENDORS.index(s.mode.vendor) for s in listed]
    assert ranks == sorted(ranks)
    for vendor in VENDORS:
        group = [s for s in listed if s.mode.vendor == vendor]
        known = [s for s in group if s.features]
        assert group[: len(known)] == known, "modes QEMU lacks come last"
        counts = [(len(s.features), s.mode.generation) for s in known]
        assert counts == sorted(counts)


@given(worlds())
def test_highest_mode_is_supported_and_has_the_most_features(world: World) -> None:
    listed = host_modes(world.catalog, world.probe)
    best = highest_mode(listed)
    supported = [s for s in listed if s.supported]
    if not supported:
        assert best is None
        return
    assert best is not None and best.supported
    assert all(len(s.features) <= len(best.features) for s in supported)


@given(worlds(), feature_sets)
def test_adding_host_features_never_removes_a_supported_mode(
    world: World, extra: frozenset[str]
) -> None:
    before = {s.mode.key for s in host_modes(world.catalog, world.probe) if s.supported}
    richer = world.with_host(world.probe.host_features | extra, world.probe.host_vendor)
    after = {s.mode.key for s in host_modes(world.catalog, richer) if s.supported}
    assert before <= after


@given(worlds())
def test_mode_features_drop_minus(world: World) -> None:
    for mode in world.catalog:
        if mode.qemu_model in world.probe.expansions:
            features = mode_features(mode, world.probe.expansions)
            assert features == world.probe.expansions[mode.qemu_model] - set(mode.minus)
        else:
            with pytest.raises(InvalidInput, match=re.escape(mode.qemu_model)):
                mode_features(mode, world.probe.expansions)


# --- simulated generations -----------------------------------------------------------------------


@given(worlds(), st.data())
def test_limit_host_gives_the_generation_or_refuses_naming_features(
    world: World, data: st.DataObject
) -> None:
    known = [m for m in world.catalog if m.qemu_model in world.probe.expansions]
    if not known:
        return
    mode = data.draw(st.sampled_from(known))
    features = mode_features(mode, world.probe.expansions)
    host = world.probe.host_features
    if features <= host:
        limited = limit_host(host, mode, world.probe.expansions, accel="tcg")
        assert limited == features and limited <= host
        simulated = world.with_host(limited, mode.vendor)
        for support in host_modes(world.catalog, simulated):
            if support.supported:  # nothing beyond the generation is offered
                assert support.features <= limited
    else:
        with pytest.raises(InvalidInput) as err:
            limit_host(host, mode, world.probe.expansions, accel="tcg")
        assert "TCG cannot emulate" in err.value.message
        assert all(f in err.value.message for f in features - host)


# --- migration and clusters ----------------------------------------------------------------------


@given(feature_sets, feature_sets)
def test_missing_for_vm_is_the_sorted_difference(vm: frozenset[str], dest: frozenset[str]) -> None:
    missing = missing_for_vm(vm, dest)
    assert list(missing) == sorted(vm - dest)
    assert (missing == ()) == (vm <= dest)


hosts_strategy = st.dictionaries(
    st.sampled_from(["172.16.0.172", "172.16.0.173", "172.16.0.174"]),
    st.builds(HostCpu, feature_sets, host_vendors),
    max_size=3,
)
vms_strategy = st.dictionaries(st.sampled_from(["vm-a", "vm-b", "vm-c"]), feature_sets, max_size=3)


@given(st.sampled_from(load_catalog()), feature_sets, hosts_strategy, vms_strategy)
def test_check_cluster_mode_refuses_exactly_when_a_subset_test_fails(
    mode: EvcMode,
    features: frozenset[str],
    hosts: dict[str, HostCpu],
    vms: dict[str, frozenset[str]],
) -> None:
    refusals = check_cluster_mode(Baseline(mode, features), hosts, vms)
    by_subject = {r.subject: r for r in refusals}
    assert len(by_subject) == len(refusals)
    for name, host in hosts.items():
        wrong_vendor = host.vendor is not None and host.vendor != mode.vendor
        fits = not wrong_vendor and features <= host.features
        assert (name in by_subject) == (not fits)
        if wrong_vendor:
            assert by_subject[name].kind is RefusalKind.HOST_VENDOR
        elif not fits:
            refusal = by_subject[name]
            assert refusal.kind is RefusalKind.HOST_LACKS_FEATURES
            assert refusal.missing == tuple(sorted(features - host.features))
            assert name in refusal.message and all(f in refusal.message for f in refusal.missing)
    for name, vm in vms.items():
        assert (name in by_subject) == (not vm <= features)
        if name in by_subject:
            assert by_subject[name].kind is RefusalKind.VM_NEEDS_POWER_CYCLE
            assert by_subject[name].missing == tuple(sorted(vm - features))
            assert "power" in by_subject[name].message


def test_intel_and_amd_never_mix() -> None:
    merom = Baseline(get_mode("intel-merom"), frozenset({"sse2"}))
    hosts = {"172.16.0.172": HostCpu(frozenset({"sse2", "sse3"}), "amd")}
    [refusal] = check_cluster_mode(merom, hosts, {})
    assert refusal.kind is RefusalKind.HOST_VENDOR
    assert "AMD" in refusal.message and "Intel" in refusal.message


@given(worlds(), feature_sets, host_vendors)
def test_suggest_mode_is_supported_by_both_or_none(
    world: World, other: frozenset[str], vm_vendor: str | None
) -> None:
    first = host_modes(world.catalog, world.probe)
    second = host_modes(world.catalog, world.with_host(other, world.probe.host_vendor))
    both = common_modes(first, second)
    suggestion = suggest_mode(world.catalog, vm_vendor, both)
    candidates = [s for s in both if vm_vendor is None or s.mode.vendor == vm_vendor]
    if not candidates:
        assert suggestion is None
        return
    assert suggestion is not None
    assert vm_vendor is None or suggestion.vendor == vm_vendor
    chosen: list[ModeSupport] = [
        s for host in (first, second) for s in host if s.mode == suggestion
    ]
    assert len(chosen) == 2 and all(s.supported for s in chosen)
    assert all(len(s.features) <= len(chosen[0].features) for s in candidates)


@given(st.sampled_from(load_catalog()), st.sampled_from(load_catalog()), feature_sets, feature_sets)
def test_per_vm_mode_never_above_the_cluster_mode(
    vm_mode: EvcMode, cluster_mode: EvcMode, vm_features: frozenset[str], features: frozenset[str]
) -> None:
    vm, cluster = Baseline(vm_mode, vm_features), Baseline(cluster_mode, features)
    expected = vm_mode.vendor == cluster_mode.vendor and vm_features <= features
    assert vm_mode_allowed(vm, cluster) == expected
    assert vm_mode_allowed(vm, vm) and vm_mode_allowed(vm, None)


def test_order_is_by_features_not_by_generation() -> None:
    # Opteron G5 has fma4/tbm/xop that EPYC lacks: support comes from sets, not the list order.
    g5, zen = get_mode("amd-piledriver"), get_mode("amd-zen")
    expansions = {
        g5.qemu_model: frozenset({"sse2", "fma4", "xop"}),
        zen.qemu_model: frozenset({"sse2", "avx2", "sha-ni", "adx"}),
    }
    probe = CpuProbe(
        qemu_version="7.2.22",
        accel="kvm",
        definitions={name: CpuModel(name, True, ()) for name in expansions},
        expansions=expansions,
        model_vendors={},
        host_features=frozenset({"sse2", "avx2", "sha-ni", "adx"}),
        host_vendor="amd",
    )
    listed = {s.mode.key: s for s in host_modes((g5, zen), probe)}
    assert listed["amd-zen"].supported and not listed["amd-piledriver"].supported
    assert listed["amd-piledriver"].missing == ("fma4", "xop")
    best = highest_mode(listed.values())
    assert best is not None and best.mode == zen
