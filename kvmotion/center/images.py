"""OS images as the center sees them: on datastores, imported and deleted through a host that
mounts the datastore.

An image lives on one datastore (``.images/`` at its root, kept by each host's agent in
:mod:`kvmotion.host.images`); a shared datastore's images are seen by every host that mounts it,
and listed once. An import is streamed from the user through the center to one connected host
that mounts the datastore, never held whole in memory. Deleting is refused while a VM the center
knows is made from the image (its first disk reads through it); the agent checks the records on
the datastore again, for VMs the center does not know.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from kvmotion.center.db import Host, Vm
from kvmotion.center.inventory import Inventory
from kvmotion.errors import Conflict, HostUnreachable, NotFound
from kvmotion.host.images import ImageInfo
from kvmotion.host.vmfiles import IMAGE_FORMATS


def image_json(image: ImageInfo) -> dict[str, Any]:
    """An agent's image record as JSON."""
    return asdict(image)


async def hosts_with(inv: Inventory, datastore: str) -> list[Host]:
    """The connected hosts that mount ``datastore`` (NotFound if none)."""
    await inv.datastore(datastore)  # NotFound for a datastore no host has
    [ds] = [d for d in await inv.datastores() if d.name == datastore]  # with its hosts
    names = {h.name for h in ds.hosts}
    hosts = [h for h in await inv.hosts() if h.name in names and h.connection == "connected"]
    if not hosts:
        raise NotFound(
            f"no connected host mounts datastore {datastore!r} now: reconnect one of "
            f"{', '.join(sorted(names)) or 'its hosts'} first",
            code="no_host_for_datastore",
        )
    return hosts


async def list_images(inv: Inventory) -> list[dict[str, Any]]:
    """Every image on every datastore a connected host mounts, once each, with the hosts that
    see it and the VMs the center knows are made from it."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    vms = await inv.vms()
    for host in await inv.hosts():
        if host.connection != "connected":
            continue
        try:
            async with inv.agent(host) as agent:
                images = await agent.list_images()
        except HostUnreachable:
            continue
        for image in images:
            body = image_json(image)
            key = (body["datastore"], body["name"])
            entry = found.setdefault(
                key, body | {"hosts": [], "vms": users(vms, body["datastore"], body["name"])}
            )
            entry["hosts"].append(host.name)
    return [found[k] for k in sorted(found)]


def users(vms: list[Vm], datastore: str, name: str) -> list[str]:
    """The VMs whose disks read through image ``name`` on ``datastore`` (overlays of it)."""
    bases = {f".images/{name}.{fmt}" for fmt in IMAGE_FORMATS}  # exact: not "debian.12"
    return sorted(
        {
            vm.name
            for vm in vms
            for d in vm.config.get("disks", [])
            if d.get("datastore") == datastore and d.get("backing") in bases
        }
    )


async def import_image(
    inv: Inventory,
    datastore: str,
    name: str,
    chunks: AsyncIterator[bytes],
    *,
    length: int | None,
    fmt: str | None,
    filename: str,
) -> dict[str, Any]:
    """Stream an image to a host that mounts ``datastore``; returns the image as stored."""
    host = (await hosts_with(inv, datastore))[0]
    async with inv.agent(host) as agent:
        image = await agent.import_image(
            datastore, name, chunks, length=length, fmt=fmt, filename=filename
        )
    return image_json(image) | {"hosts": [host.name]}


async def delete_image(inv: Inventory, datastore: str, name: str) -> None:
    using = users(await inv.vms(), datastore, name)
    if using:
        raise Conflict(
            f"image {name!r} on {datastore!r} is the base of VM(s) {', '.join(using)}: delete "
            "them, or move their disks to another datastore (which copies the image's data "
            "into them), first",
            code="image_in_use",
        )
    host = (await hosts_with(inv, datastore))[0]
    async with inv.agent(host) as agent:
        await agent.delete_image(datastore, name)
