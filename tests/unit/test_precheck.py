"""The compute-migration precheck: one example per finding code, and properties over its inputs."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvmotion.migration.precheck import (
    SPACE_MARGIN,
    Finding,
    HostView,
    VmView,
    precheck_compute,
    precheck_migration,
)

GiB = 2**30


def host(name: str = "172.16.0.173", **kw: object) -> HostView:
    base = HostView(
        name=name,
        connected=True,
        migration_address=f"10.99.0.{name.rsplit('.', 1)[-1]}",
        datastores=frozenset({"shared"}),
        networks=frozenset({"vm-network"}),
        available_memory_bytes=8 * GiB,
        accel="tcg",
        cpu_vendor="GenuineIntel",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def vm(**kw: object) -> VmView:
    base = VmView(
        name="vm-a",
        host="172.16.0.172",
        power_state="poweredOn",
        disk_datastores=("shared",),
        networks=("vm-network",),
        memory_mib=256,
        cpu_model="qemu64",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


SOURCE = host("172.16.0.172")
DEST = host("172.16.0.173")


def codes(findings: tuple[Finding, ...]) -> list[str]:
    return [f.code for f in findings]


def test_a_good_migration_passes() -> None:
    result = precheck_compute(vm(), SOURCE, DEST)
    assert result.ok and result.errors == () and result.warnings == ()


# -- one example per finding ------------------------------------------------------------------


def test_same_host() -> None:
    result = precheck_compute(vm(), SOURCE, SOURCE)
    assert codes(result.errors) == ["same_host"]
    assert "storage migration" in result.errors[0].message


def test_wrong_source() -> None:
    result = precheck_compute(vm(host="172.16.0.174"), SOURCE, DEST)
    assert codes(result.errors) == ["wrong_source"]


def test_a_destination_whose_qemu_lacks_the_machine_type() -> None:
    old = host("172.16.0.173", qemu_version="7.2.22", machine_types=frozenset({"pc-q35-7.2"}))
    new = host("172.16.0.172", qemu_version="10.0.2")
    result = precheck_compute(vm(machine_type="pc-q35-10.0"), new, old)
    assert codes(result.errors) == ["machine_type_missing"]
    message = result.errors[0].message
    assert "pc-q35-10.0" in message and "QEMU 7.2.22 on 172.16.0.173" in message
    assert "10.0.2" in message and "machine_type" in message
    assert precheck_compute(vm(machine_type="pc-q35-7.2"), new, old).ok
    assert precheck_compute(vm(machine_type="pc-q35-10.0"), new, host()).ok  # did not say


@pytest.mark.parametrize(("pad", "ok"), [(8, True), (0, False), (None, True)])
def test_an_unpadded_vm_cannot_go_where_qemu_would_lose_its_writes(
    pad: int | None, ok: bool
) -> None:
    """QEMU before 9.0 under TCG needs the RAM pad; a VM started without it (by QEMU 9+)
    keeps its size while it runs. Not known (an older agent): left to the destination."""
    old = host("172.16.0.173", qemu_version="7.2.22", ram_pad_kib=8)
    result = precheck_compute(vm(ram_pad_kib=pad), SOURCE, old)
    assert result.ok is ok
    if not ok:
        assert codes(result.errors) == ["ram_pad_missing"]
        assert "power it off and on at 172.16.0.173" in result.errors[0].message
    assert precheck_compute(vm(ram_pad_kib=0), SOURCE, DEST).ok  # a host that needs no pad


@pytest.mark.parametrize("state", ["poweredOff", "poweringOn", "missing", "incoming"])
def test_not_running(state: str) -> None:
    result = precheck_compute(vm(power_state=state), SOURCE, DEST)
    assert codes(result.errors) == ["not_running"]
    assert state in result.errors[0].message and "power it on" in result.errors[0].message


def test_already_migrating() -> None:
    result = precheck_compute(vm(migrating=True), SOURCE, DEST)
    assert codes(result.errors) == ["already_migrating"]


@pytest.mark.parametrize("which", ["source", "dest"])
def test_host_disconnected(which: str) -> None:
    source = replace(SOURCE, connected=which != "source")
    dest = replace(DEST, connected=which != "dest")
    result = precheck_compute(vm(), source, dest)
    assert codes(result.errors) == ["host_disconnected"]
    named = source.name if which == "source" else dest.name
    assert named in result.errors[0].message


def test_datastore_not_shared_names_it_and_suggests_both() -> None:
    result = precheck_compute(vm(disk_datastores=("shared", "local-172")), SOURCE, DEST)
    assert codes(result.errors) == ["datastore_not_shared"]
    message = result.errors[0].message
    assert "'local-172'" in message and DEST.name in message and "vm-a" in message
    assert "type 'both'" in message


def test_datastore_not_shared_once_per_datastore() -> None:
    disks = ("local-b", "local-a", "local-b", "shared")
    result = precheck_compute(vm(disk_datastores=disks), SOURCE, DEST)
    assert codes(result.errors) == ["datastore_not_shared"] * 2
    assert "'local-a'" in result.errors[0].message and "'local-b'" in result.errors[1].message


@pytest.mark.parametrize("which", ["source", "dest"])
@pytest.mark.parametrize("address", [None, ""])
def test_no_migration_network(which: str, address: str | None) -> None:
    source = replace(SOURCE, migration_address=address) if which == "source" else SOURCE
    dest = replace(DEST, migration_address=address) if which == "dest" else DEST
    result = precheck_compute(vm(), source, dest)
    assert codes(result.errors) == ["no_migration_network"]
    assert (source if which == "source" else dest).name in result.errors[0].message
    assert "management" in result.errors[0].message


def test_network_missing() -> None:
    result = precheck_compute(vm(networks=("vm-network", "backup-net")), SOURCE, DEST)
    assert codes(result.errors) == ["network_missing"]
    assert "'backup-net'" in result.errors[0].message


def test_accel_mismatch() -> None:
    result = precheck_compute(vm(), replace(SOURCE, accel="kvm"), DEST)
    assert codes(result.errors) == ["accel_mismatch"]
    assert "kvm" in result.errors[0].message and "tcg" in result.errors[0].message


def test_cpu_vendor_under_kvm() -> None:
    source = replace(SOURCE, accel="kvm")
    dest = replace(DEST, accel="kvm", cpu_vendor="AuthenticAMD")
    result = precheck_compute(vm(), source, dest)
    assert codes(result.errors) == ["cpu_vendor"]
    assert "AuthenticAMD" in result.errors[0].message


def test_cpu_vendor_does_not_matter_under_tcg() -> None:
    result = precheck_compute(vm(), SOURCE, replace(DEST, cpu_vendor="AuthenticAMD"))
    assert result.ok


def test_cpu_incompatible() -> None:
    dest = replace(DEST, runnable_cpu_models=frozenset({"qemu64", "Nehalem"}))
    result = precheck_compute(vm(cpu_model="Haswell"), SOURCE, dest)
    assert codes(result.errors) == ["cpu_incompatible"]
    assert "Haswell" in result.errors[0].message and "EVC" in result.errors[0].message
    assert precheck_compute(vm(cpu_model="Nehalem"), SOURCE, dest).ok


def test_insufficient_memory() -> None:
    dest = replace(DEST, available_memory_bytes=255 * 2**20)
    result = precheck_compute(vm(memory_mib=256), SOURCE, dest)
    assert codes(result.errors) == ["insufficient_memory"]
    assert "255 MiB" in result.errors[0].message and "256 MiB" in result.errors[0].message
    assert result.warnings == ()


def test_memory_tight_is_a_warning() -> None:
    dest = replace(DEST, available_memory_bytes=270 * 2**20)  # 256 MiB > 90 % of 270 MiB
    result = precheck_compute(vm(memory_mib=256), SOURCE, dest)
    assert result.ok
    assert codes(result.warnings) == ["memory_tight"]


def test_exactly_enough_memory_is_tight_not_short() -> None:
    dest = replace(DEST, available_memory_bytes=256 * 2**20)
    result = precheck_compute(vm(memory_mib=256), SOURCE, dest)
    assert result.ok and codes(result.warnings) == ["memory_tight"]


def test_every_problem_at_once() -> None:
    source = replace(SOURCE, accel="kvm", migration_address=None, connected=False)
    dest = replace(
        DEST,
        connected=False,
        datastores=frozenset(),
        networks=frozenset(),
        available_memory_bytes=0,
        cpu_vendor="AuthenticAMD",
        runnable_cpu_models=frozenset(),
    )
    result = precheck_compute(vm(power_state="poweredOff", migrating=True), source, dest)
    assert set(codes(result.errors)) == {
        "not_running",
        "already_migrating",
        "host_disconnected",
        "datastore_not_shared",
        "no_migration_network",
        "network_missing",
        "accel_mismatch",
        "cpu_vendor",
        "cpu_incompatible",
        "insufficient_memory",
    }


# -- properties -------------------------------------------------------------------------------

# Enough examples to cover the small alphabets below; keeps the unit suite fast.
PROPERTY = settings(max_examples=50, deadline=None)

NAMES = st.sampled_from(["shared", "nfs-a", "nfs-b", "local-172", "local-173", "san"])
NETS = st.sampled_from(["vm-network", "dmz", "backup", "storage"])
HOSTS = st.sampled_from(["172.16.0.172", "172.16.0.173", "172.16.0.174"])


@st.composite
def passing_case(draw: st.DrawFn) -> tuple[VmView, HostView, HostView]:
    src_name, dst_name = draw(st.lists(HOSTS, min_size=2, max_size=2, unique=True))
    disk_ds = draw(st.lists(NAMES, max_size=6))
    nics = draw(st.lists(NETS, max_size=4))
    memory_mib = draw(st.integers(min_value=0, max_value=64 * 1024))
    accel = draw(st.sampled_from(["kvm", "tcg"]))
    vendor = draw(st.sampled_from(["GenuineIntel", "AuthenticAMD"]))
    cpu_model = draw(st.sampled_from(["qemu64", "Nehalem", "Haswell", "EPYC"]))
    runnable = draw(
        st.one_of(
            st.none(),
            st.frozensets(st.sampled_from(["Nehalem", "EPYC"])).map(lambda s: s | {cpu_model}),
        )
    )
    common = {"accel": accel, "cpu_vendor": vendor}
    source = host(
        src_name,
        datastores=draw(st.frozensets(NAMES)),
        networks=draw(st.frozensets(NETS)),
        available_memory_bytes=draw(st.integers(min_value=0, max_value=2**40)),
        runnable_cpu_models=draw(st.one_of(st.none(), st.frozensets(st.sampled_from(["EPYC"])))),
        **common,
    )
    dest = host(
        dst_name,
        datastores=frozenset(disk_ds) | draw(st.frozensets(NAMES)),
        networks=frozenset(nics) | draw(st.frozensets(NETS)),
        available_memory_bytes=memory_mib * 2**20 + draw(st.integers(min_value=0, max_value=2**40)),
        runnable_cpu_models=runnable,
        **common,
    )
    the_vm = vm(
        host=src_name,
        disk_datastores=tuple(disk_ds),
        networks=tuple(nics),
        memory_mib=memory_mib,
        cpu_model=cpu_model,
    )
    return the_vm, source, dest


@PROPERTY
@given(passing_case())
def test_a_vm_that_fits_always_passes(case: tuple[VmView, HostView, HostView]) -> None:
    result = precheck_compute(*case)
    assert result.errors == ()
    assert set(codes(result.warnings)) <= {"memory_tight"}


@PROPERTY
@given(passing_case(), st.data())
def test_removing_a_datastore_from_the_destination_is_named(
    case: tuple[VmView, HostView, HostView], data: st.DataObject
) -> None:
    the_vm, source, dest = case
    if not the_vm.disk_datastores:
        the_vm = replace(the_vm, disk_datastores=("shared",))
        dest = replace(dest, datastores=dest.datastores | {"shared"})
    gone = data.draw(st.sampled_from(sorted(set(the_vm.disk_datastores))))
    result = precheck_compute(the_vm, source, replace(dest, datastores=dest.datastores - {gone}))
    assert codes(result.errors) == ["datastore_not_shared"]
    assert f"{gone!r}" in result.errors[0].message


def hosts_any(name: st.SearchStrategy[str]) -> st.SearchStrategy[HostView]:
    return st.builds(
        HostView,
        name=name,
        connected=st.booleans(),
        migration_address=st.sampled_from([None, "", "10.99.0.1"]),
        datastores=st.frozensets(NAMES),
        networks=st.frozensets(NETS),
        available_memory_bytes=st.integers(min_value=0, max_value=2**36),
        accel=st.sampled_from(["kvm", "tcg"]),
        cpu_vendor=st.sampled_from(["GenuineIntel", "AuthenticAMD"]),
        runnable_cpu_models=st.one_of(
            st.none(), st.frozensets(st.sampled_from(["qemu64", "EPYC"]))
        ),
    )


VMS_ANY = st.builds(
    VmView,
    name=st.sampled_from(["vm-a", "vm-b"]),
    host=st.one_of(st.none(), HOSTS),
    power_state=st.sampled_from(["poweredOn", "poweredOff", "missing"]),
    disk_datastores=st.lists(NAMES, max_size=5).map(tuple),
    networks=st.lists(NETS, max_size=4).map(tuple),
    memory_mib=st.integers(min_value=0, max_value=2**16),
    cpu_model=st.sampled_from(["qemu64", "EPYC", "Haswell"]),
    migrating=st.booleans(),
)


def _no_duplicates(the_vm: VmView, source: HostView, dest: HostView) -> None:
    result = precheck_compute(the_vm, source, dest)
    assert len(set(result.errors)) == len(result.errors), result.errors
    assert len(set(result.warnings)) == len(result.warnings), result.warnings


@PROPERTY
@given(VMS_ANY, hosts_any(st.just("172.16.0.172")), hosts_any(st.just("172.16.0.173")))
def test_no_duplicate_findings_between_two_hosts(
    the_vm: VmView, source: HostView, dest: HostView
) -> None:
    _no_duplicates(the_vm, source, dest)


@given(VMS_ANY, hosts_any(HOSTS), hosts_any(HOSTS))
@example(vm(), replace(SOURCE, connected=False), replace(SOURCE, connected=False))
def test_no_duplicate_findings_ever(the_vm: VmView, source: HostView, dest: HostView) -> None:
    _no_duplicates(the_vm, source, dest)


@PROPERTY
@given(VMS_ANY, hosts_any(HOSTS), hosts_any(HOSTS))
def test_findings_are_deterministic(the_vm: VmView, source: HostView, dest: HostView) -> None:
    first = precheck_compute(the_vm, source, dest)
    again = precheck_compute(
        replace(the_vm, disk_datastores=tuple(reversed(the_vm.disk_datastores))),
        replace(source),
        replace(dest),
    )
    assert first == precheck_compute(the_vm, source, dest)
    assert first.errors == again.errors and first.warnings == again.warnings


# -- storage and both --------------------------------------------------------------------------

LOCAL_172 = host(
    "172.16.0.172",
    datastores=frozenset({"shared", "local-172"}),
    datastore_free_bytes={"shared": 50 * GiB, "local-172": 50 * GiB},
)
LOCAL_173 = host(
    "172.16.0.173",
    datastores=frozenset({"shared", "local-173"}),
    datastore_free_bytes={"shared": 50 * GiB, "local-173": 50 * GiB},
)
DISKS = {"disk_bytes": 2 * GiB}


def test_storage_move_passes() -> None:
    result = precheck_migration(vm(**DISKS), LOCAL_172, LOCAL_172, "local-172")
    assert result.ok, result.errors


def test_storage_move_of_a_powered_off_vm_passes() -> None:
    result = precheck_migration(
        vm(power_state="poweredOff", **DISKS), LOCAL_172, LOCAL_172, "local-172"
    )
    assert result.ok, result.errors


def test_both_needs_a_running_vm() -> None:
    off = vm(power_state="poweredOff", disk_datastores=("local-172",), **DISKS)
    result = precheck_migration(off, LOCAL_172, LOCAL_173, "local-173")
    assert codes(result.errors) == ["not_running"]


def test_both_from_local_to_local_passes() -> None:
    local_vm = vm(disk_datastores=("local-172",), **DISKS)
    result = precheck_migration(local_vm, LOCAL_172, LOCAL_173, "local-173")
    assert result.ok, result.errors


def test_compute_only_of_a_local_vm_suggests_both() -> None:
    local_vm = vm(disk_datastores=("local-172",), **DISKS)
    result = precheck_migration(local_vm, LOCAL_172, LOCAL_173)
    assert codes(result.errors) == ["datastore_not_shared"]
    assert "both" in result.errors[0].message and "local-172" in result.errors[0].message


@pytest.mark.parametrize(
    ("view", "dest", "datastore", "code", "words"),
    [
        (vm(**DISKS), LOCAL_172, "local-173", "datastore_not_visible", "does not see"),
        (vm(**DISKS), LOCAL_172, "shared", "same_datastore", "already"),
        (vm(disk_bytes=49 * GiB), LOCAL_172, "local-172", "insufficient_space", "MiB free"),
        (vm(power_state="missing", **DISKS), LOCAL_172, "local-172", "not_running", "power"),
        (vm(migrating=True, **DISKS), LOCAL_172, "local-172", "already_migrating", "already"),
        (vm(**DISKS), LOCAL_173, "local-172", "datastore_not_visible", "does not see"),
        (vm(**DISKS), LOCAL_173, "shared", "same_datastore", "compute only"),
        (
            vm(disk_datastores=("shared", "local-172"), **DISKS),
            LOCAL_172,
            "local-172",
            "disks_split",
            "third datastore",
        ),
        (vm(disk_bytes=46 * GiB), LOCAL_173, "local-173", "insufficient_space", "10%"),
    ],
)
def test_storage_refusals(
    view: VmView, dest: HostView, datastore: str, code: str, words: str
) -> None:
    result = precheck_migration(view, LOCAL_172, dest, datastore)
    assert codes(result.errors) == [code]
    assert words in result.errors[0].message


def test_both_keeps_the_compute_checks() -> None:
    dest = replace(LOCAL_173, migration_address=None, networks=frozenset())
    local_vm = vm(disk_datastores=("local-172",), **DISKS)
    result = precheck_migration(local_vm, LOCAL_172, dest, "local-173")
    assert set(codes(result.errors)) == {"no_migration_network", "network_missing"}


@settings(max_examples=200, deadline=None)
@given(
    disk=st.integers(min_value=0, max_value=100 * GiB),
    free=st.integers(min_value=0, max_value=100 * GiB),
)
def test_space_is_refused_exactly_when_the_copy_and_margin_do_not_fit(disk: int, free: int) -> None:
    dest = replace(LOCAL_172, datastore_free_bytes={"local-172": free})
    result = precheck_migration(vm(disk_bytes=disk), dest, dest, "local-172")
    refused = "insufficient_space" in codes(result.errors)
    assert refused == (int(disk * (1 + SPACE_MARGIN)) > free)


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        (("required", True), ("required", True), []),
        (("off", True), ("off", True), []),
        (("required", True), ("off", True), ["migration_tls_mismatch"]),
        (("off", True), ("required", True), ["migration_tls_mismatch"]),
        (("required", True), ("required", False), ["tls_not_ready"]),
        (("required", False), ("required", False), ["tls_not_ready", "tls_not_ready"]),
        (None, None, []),  # agents from before TLS: plaintext on both
        (None, ("required", True), ["migration_tls_mismatch"]),  # an old agent sends plaintext
        (None, ("required", False), ["migration_tls_mismatch", "tls_not_ready"]),
    ],
)
def test_migration_tls_must_agree_and_be_ready(
    src: tuple[str, bool] | None, dst: tuple[str, bool] | None, expected: list[str]
) -> None:
    result = precheck_compute(
        vm(), replace(SOURCE, migration_tls=src), replace(DEST, migration_tls=dst)
    )
    assert codes(result.errors) == expected
    for finding in result.errors:
        assert "migration_tls" in finding.message or "kvmotion tls issue" in finding.message
