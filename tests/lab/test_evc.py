"""EVC in a mixed cluster, the seed's lab replayed: .172 has an older CPU (Merom), .173 a newer
one (Nehalem). A VM started on the newer host without EVC cannot move to the older one; with the
cluster's EVC mode set to Merom (as the seed does) and the VM power-cycled, it moves both ways
while its user stays connected, and the guest sees only the baseline's CPU flags.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvmotion.lab import netns, topology
from kvmotion.lab.demo import GUEST_PORT, guest_ip, vm_spec, wait_for_guest
from kvmotion.lab.guestclient import PingLoop
from tests.lab.conftest import center_http, wait_task

pytestmark = pytest.mark.lab

OLD, NEW = "172.16.0.172", "172.16.0.173"
CLUSTER = "Cluster"  # the default cluster every added host joins


@pytest.fixture(scope="module")
def center(mixed_lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(mixed_lab)


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json() if r.content else None


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    return str(body["message"])


def run_task(center: httpx.Client, task_id: int) -> dict[str, Any]:
    return wait_task(center, task_id)


def guest_flags(lab: topology.LabState) -> frozenset[str]:
    guest = wait_for_guest(lab, guest_ip(4))
    flags = guest.info().flags
    guest.close()
    return flags


def test_each_host_shows_its_own_evc_modes(
    mixed_lab: topology.LabState, center: httpx.Client
) -> None:
    old = ok(center.get(f"/v1/hosts/{OLD}/evc-modes"))
    new = ok(center.get(f"/v1/hosts/{NEW}/evc-modes"))
    supported = {h["host"]: [m["key"] for m in h["modes"] if m["supported"]] for h in (old, new)}
    assert supported[OLD] == ["intel-merom"]
    assert supported[NEW] == ["intel-merom", "intel-penryn", "intel-nehalem"]
    assert old["highest"] == "intel-merom" and new["highest"] == "intel-nehalem"
    counts = [m["feature_count"] for m in new["modes"] if m["feature_count"]]
    assert counts == sorted(counts), "modes are listed from fewest to most features"
    westmere = next(m for m in new["modes"] if m["key"] == "intel-westmere")
    assert not westmere["supported"] and "aes" in westmere["missing"]


def test_seed_evc_lab(mixed_lab: topology.LabState, center: httpx.Client) -> None:
    # A VM started on the newer host without EVC sees its newer CPU.
    ok(center.post("/v1/vms", json={"host": NEW, "spec": vm_spec("vm-e", 4)}), 201)
    ok(center.post("/v1/vms/vm-e/power-on"))
    assert {"sse4_1", "sse4_2", "popcnt"} <= guest_flags(mixed_lab)

    # ... and cannot move to the older host: the error lists the features and names the fix.
    message = error(
        center.post("/v1/vms/vm-e/migrate", json={"host": OLD}), 409, "cpu_incompatible"
    )
    assert "sse4.1" in message and "popcnt" in message and "intel-merom" in message

    # Setting the cluster to a mode the older host lacks is refused, naming the host.
    message = error(
        center.put(f"/v1/clusters/{CLUSTER}/evc", json={"mode": "intel-nehalem"}),
        409,
        "evc_mode_refused",
    )
    assert OLD in message and "sse4.1" in message
    # Merom while vm-e runs with more: refused, naming the VM (it needs a power cycle).
    message = error(
        center.put(f"/v1/clusters/{CLUSTER}/evc", json={"mode": "intel-merom"}),
        409,
        "evc_mode_refused",
    )
    assert "vm-e" in message and "power" in message

    # As the seed does: the cluster's EVC mode is set to Intel Merom; the VM is power-cycled.
    ok(center.post("/v1/vms/vm-e/power-off"))
    cluster = ok(center.put(f"/v1/clusters/{CLUSTER}/evc", json={"mode": "intel-merom"}))
    assert cluster["evc_mode"] == "intel-merom"
    merom = next(m for m in cluster["evc_modes"] if m["key"] == "intel-merom")
    assert all(h["supported"] for h in merom["hosts"].values())
    vm = ok(center.post("/v1/vms/vm-e/power-on"))
    assert vm["cpu"]["evc_mode"] == "intel-merom" and vm["cpu"]["model"] == "Conroe-v1"
    flags = guest_flags(mixed_lab)
    assert "sse4_1" not in flags and "popcnt" not in flags and "ssse3" in flags

    # Now it moves both ways with its user connected.
    sock = netns.connect_in_netns(mixed_lab.client_netns, guest_ip(4), GUEST_PORT, timeout=5.0)
    ping = PingLoop(sock, interval=0.01, max_duration=120, owns_socket=True).start()
    try:
        for dest in (OLD, NEW):
            task = ok(center.post("/v1/vms/vm-e/migrate", json={"host": dest}), 202)
            done = run_task(center, task["id"])
            assert done["state"] == "success", done["error"]
            assert ok(center.get("/v1/vms/vm-e"))["host"] == dest
    finally:
        ping.stop()
        summary = ping.join(timeout=30)
    assert summary.same_connection and summary.lost == 0 and summary.n_monotonic
    assert "sse4_1" not in guest_flags(mixed_lab)


def test_refusals(mixed_lab: topology.LabState, center: httpx.Client) -> None:
    # Per-VM EVC above the cluster's mode, and while powered on.
    error(center.put("/v1/vms/vm-e/evc", json={"mode": "intel-penryn"}), 409, "wrong_state")
    ok(center.post("/v1/vms/vm-e/power-off"))
    error(
        center.put("/v1/vms/vm-e/evc", json={"mode": "intel-penryn"}), 409, "vm_evc_above_cluster"
    )
    assert ok(center.put("/v1/vms/vm-e/evc", json={"mode": "intel-merom"}))["evc_mode"] == (
        "intel-merom"
    )
    # Unknown modes, clusters; Intel and AMD never mix.
    error(
        center.put(f"/v1/clusters/{CLUSTER}/evc", json={"mode": "intel-z"}),
        404,
        "evc_mode_not_found",
    )
    error(center.put("/v1/clusters/nope/evc", json={"mode": None}), 404, "cluster_not_found")
    message = error(
        center.put(f"/v1/clusters/{CLUSTER}/evc", json={"mode": "amd-rev-e"}),
        409,
        "evc_mode_refused",
    )
    assert "Intel and AMD never mix" in message
    # A host that cannot support a cluster's mode cannot join it.
    ok(center.post("/v1/clusters", json={"name": "newer"}), 201)
    ok(center.post("/v1/clusters/newer/hosts", json={"host": NEW}))
    ok(center.put("/v1/clusters/newer/evc", json={"mode": "intel-nehalem"}))
    message = error(
        center.post("/v1/clusters/newer/hosts", json={"host": OLD}), 409, "host_cannot_join"
    )
    assert OLD in message and "sse4.1" in message
    assert ok(center.get("/v1/clusters/newer"))["hosts"] == [NEW]
