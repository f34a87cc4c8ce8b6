"""Several migrations at once, for real: four running VMs moved between the seed's two hosts in
one burst. Beyond the lab center's cap (2 per host) requests queue, never fail; every VM ends on
the other host, once, and keeps its guest (the same guestd, counting on)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from kvmotion.lab import topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from tests.lab.conftest import center_http, wait_task

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
NAMES = [f"vm-c{i}" for i in range(4)]


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


def test_four_migrations_at_once_all_succeed(lab: topology.LabState, center: httpx.Client) -> None:
    guests = []
    for i, name in enumerate(NAMES):
        r = center.post("/v1/vms", json={"host": SRC, "spec": vm_spec(name, 20 + i)})
        assert r.status_code == 201, r.text
        assert center.post(f"/v1/vms/{name}/power-on").status_code == 200
    for i in range(len(NAMES)):
        guests.append(wait_for_guest(lab, guest_ip(20 + i)))
    before = [g.ping().n for g in guests]

    tasks = []
    for name in NAMES:
        r = center.post(f"/v1/vms/{name}/migrate", json={"host": DST})
        assert r.status_code == 202, r.text
        tasks.append(int(r.json()["id"]))
    # A second request for a VM already moving is refused, and changes nothing.
    r = center.post(f"/v1/vms/{NAMES[0]}/migrate", json={"host": DST})
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_migrating"

    done = [wait_task(center, t, deadline=240) for t in tasks]
    for task in done:
        assert task["state"] == "success", task["error"]
    for task in done:
        assert "resumed" in [s["step"] for s in task["timeline"]]
    for name, guest, n in zip(NAMES, guests, before, strict=True):
        vm = center.get(f"/v1/vms/{name}").json()
        assert vm["host"] == DST and vm["power_state"] == "poweredOn"
        assert guest.ping().n > n, f"{name}'s guest restarted"
        guest.close()
    assert len(center.get("/v1/tasks").json()) == len(tasks)
    for name in NAMES:
        assert center.post(f"/v1/vms/{name}/power-off").status_code == 200
        assert center.delete(f"/v1/vms/{name}").status_code == 204
