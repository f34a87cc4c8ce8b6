"""The placement's inputs gathered from the inventory (the pure choice: migration/placement.py):
every host's view and capacity now, for an evacuation and for a new VM given no host."""

from __future__ import annotations

from dataclasses import replace

from kvmotion.center.db import Host, Vm
from kvmotion.center.inventory import Inventory, host_view, vm_view
from kvmotion.center.rules import Rules
from kvmotion.errors import InsufficientResources
from kvmotion.host.vmconfig import VmCreateRequest
from kvmotion.migration.placement import Capacity, Cluster, Overcommit, Placement, place
from kvmotion.migration.precheck import VmView


def capacity(host: Host, vms: list[Vm]) -> Capacity:
    """A host's CPUs and memory, and what its powered-on VMs commit."""
    facts = host.facts or {}
    running = [v for v in vms if v.host_id == host.id and v.power_state == "poweredOn"]
    return Capacity(
        cpus=int(facts.get("cpu", {}).get("count") or 1),
        memory_mib=int(facts.get("memory", {}).get("total_bytes") or 0) // 2**20,
        committed_vcpus=sum(int(v.config.get("vcpus", 1)) for v in running),
        committed_memory_mib=sum(int(v.config.get("memory_mib", 0)) for v in running),
        vms=len(running),
    )


async def cluster_now(
    inventory: Inventory, rules: Rules, overcommit: Overcommit | None = None
) -> Cluster:
    """Every host's view and capacity, the rules, and where each running VM is."""
    hosts = await inventory.hosts()
    vms = await inventory.vms()
    return Cluster(
        views={h.name: host_view(h) for h in hosts},
        capacity={h.name: capacity(h, vms) for h in hosts},
        overcommit=overcommit or Overcommit(),
        rules=tuple(await rules.all()),
        where=await rules.where(),
    )


def new_vm_view(spec: VmCreateRequest) -> VmView:
    """A VM about to be created, as the placement sees it: the datastores its files and image
    are on, its networks, its size."""
    stores = {d.datastore or spec.datastore for d in spec.disks} | {spec.datastore}
    if spec.image is not None:
        stores.add(spec.image_datastore or spec.datastore)
    return VmView(
        name=spec.name,
        host=None,
        power_state="poweredOff",
        disk_datastores=tuple(sorted(stores)),
        networks=tuple(n.network for n in spec.nics),
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        cpu_model=spec.cpu_model or "",
    )


async def place_new_vm(inventory: Inventory, rules: Rules, spec: VmCreateRequest) -> Placement:
    """Where a new VM goes when its creator names no host. Raises InsufficientResources
    (saying why each host was ruled out) when none fits."""
    view = new_vm_view(spec)
    placement = place(view, await cluster_now(inventory, rules))
    if placement.host is None:
        raise InsufficientResources(placement.explain(), code="no_host_fits")
    return placement


async def place_vm(inventory: Inventory, rules: Rules, vm: Vm) -> Placement:
    """Where a registered VM would be registered and powered on, among the other hosts: it is
    powered off, or its host failed (HA), so its datastores and networks decide, not a
    migration's precheck."""
    cluster = await cluster_now(inventory, rules)
    cluster.where.pop(vm.name, None)
    return place(replace(vm_view(vm, False), power_state="poweredOff"), cluster)
