"""`kvmotion host add|list|show`, `kvmotion datastore list` and `kvmotion vm ...`: the center's
inventory, from the shell.

The host commands join `kvmotion host serve` in :mod:`kvmotion.cli.host_cmds`'s app. Every command
is a client of the center's REST API (:class:`~kvmotion.center.client.CenterClient`); ``--json``
prints the center's object as it came.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.center.client import CenterClient
from kvmotion.cli import host_cmds
from kvmotion.cli.output import console, fail, print_json
from kvmotion.cli.progress import DEFAULT_WATCH_TIMEOUT_S, follow, human_bytes
from kvmotion.cli.remote import (
    CenterOpt,
    JsonOpt,
    TokenOpt,
    call,
    connect,
    finite,
    path_name,
)
from kvmotion.errors import InvalidInput
from kvmotion.host.config import DEFAULT_AGENT_PORT

host_app = host_cmds.app
vm_app = typer.Typer(
    help="Virtual machines: create, power, migrate (vMotion).", no_args_is_help=True
)

datastore_app = typer.Typer(help="Datastores: where VM disks live.", no_args_is_help=True)

VmArg = Annotated[
    str, typer.Argument(help="VM name or uuid", show_default=False, callback=path_name)
]


# -- datastores ---------------------------------------------------------------------------------
@datastore_app.command("list")
def datastore_list(
    json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """Every datastore the hosts report: shared or local, capacity, free space, who sees it."""
    stores = call(connect(center, token), lambda c: c.datastores())
    if json_out:
        print_json(stores)
        return
    table = Table("datastore", "type", "free", "capacity", "hosts")
    for ds in stores:
        table.add_row(
            escape(ds["name"]),
            "shared" if ds.get("shared") else "local",
            human_bytes(ds.get("free_bytes")),
            human_bytes(ds.get("capacity_bytes")),
            escape(", ".join(ds.get("hosts") or []) or "-"),
        )
    console.print(table)


# -- hosts --------------------------------------------------------------------------------------
MAINTENANCE_LABEL: dict[Any, str] = {"entering": "entering", "in": "in maintenance"}


@host_app.command("add")
def host_add(
    address: Annotated[str, typer.Argument(help="the agent's management address")],
    agent_token: Annotated[
        str,
        typer.Option(
            "--agent-token",
            envvar="KVMOTION_AGENT_TOKEN",
            show_default=False,
            help="the token the host's agent accepts",
        ),
    ],
    port: Annotated[int, typer.Option(min=1, max=65535, help="agent port")] = DEFAULT_AGENT_PORT,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Add a host to the center (its datastores, networks and VMs come with it)."""
    host = call(connect(center, token), lambda c: c.add_host(address, agent_token, port))
    if json_out:
        print_json(host)
        return
    console.print(f"added host {host['name']} ({host['url']}): {host['connection']}")


@host_app.command("list")
def host_list(json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None) -> None:
    """The center's hosts, their connection and resources."""
    hosts = call(connect(center, token), lambda c: c.hosts())
    if json_out:
        print_json(hosts)
        return
    table = Table(
        "host", "connection", "maintenance", "HA", "migration address", "accel", "CPU",
        "memory free",
    )  # fmt: skip
    for h in hosts:
        facts = h.get("facts") or {}
        table.add_row(
            h["name"],
            _connection(h["connection"]),
            MAINTENANCE_LABEL.get(h.get("maintenance"), "-"),
            (h.get("ha") or {}).get("state") or "-",
            facts.get("migration_address") or "-",
            facts.get("accel", "-"),
            (facts.get("cpu") or {}).get("vendor", "-"),
            _memory(facts),
        )
    console.print(table)


def _ha(ha: dict[str, Any] | None) -> str:
    """A host's HA state, with why unless it is connected ("-" outside an HA cluster)."""
    if not ha or not ha.get("state"):
        return "-"
    return ha["state"] if ha["state"] == "connected" else f"{ha['state']}: {ha['reason']}"


@host_app.command("show")
def host_show(
    name: Annotated[str, typer.Argument(help="host name", callback=path_name)],
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """One host: its facts, datastores, networks and VMs."""
    host = call(connect(center, token), lambda c: c.host(name))
    if json_out:
        print_json(host)
        return
    facts = host.get("facts") or {}
    cpu = facts.get("cpu") or {}
    table = Table("host", host["name"], show_header=True)
    for key, value in (
        ("connection", host["connection"]),
        ("maintenance", MAINTENANCE_LABEL.get(host.get("maintenance"), "-")),
        ("HA", _ha(host.get("ha"))),
        ("agent", host["url"]),
        ("last seen", host.get("last_seen") or "-"),
        ("migration address", facts.get("migration_address") or "-"),
        ("accelerator", f"{facts.get('accel', '-')} ({facts.get('accel_reason', '')})"),
        ("CPU", f"{cpu.get('vendor', '-')} {cpu.get('model_name', '')} x{cpu.get('count', '?')}"),
        ("memory free", _memory(facts)),
        ("QEMU", _qemu(facts)),
        ("new VMs' machine type", facts.get("machine_type", "-")),
        ("VMs", ", ".join(host.get("vms") or []) or "-"),
    ):
        table.add_row(key, escape(str(value)))
    console.print(table)
    stores = Table("datastore", "shared", "accessible", "free", "capacity")
    for ds in facts.get("datastores", []):
        stores.add_row(
            ds["name"],
            _yes(ds.get("shared")),
            _yes(ds.get("accessible")),
            human_bytes(ds.get("free_bytes")),
            human_bytes(ds.get("capacity_bytes")),
        )
    console.print(stores)
    nets = Table("network", "bridge", "present")
    for net in facts.get("networks", []):
        nets.add_row(net["name"], net.get("bridge", "-"), _yes(net.get("present")))
    console.print(nets)


def _connection(value: str) -> str:
    return value if value == "connected" else f"[red]{value}[/]"


def _yes(value: Any) -> str:
    return "yes" if value else "[red]no[/]"


def _qemu(facts: dict[str, Any]) -> str:
    """The host's QEMU, and the RAM pad its VMs get where it needs one."""
    pad = facts.get("ram_pad_kib")
    said = str(facts.get("qemu_version", "-"))
    return f"{said} (VMs get a {pad} KiB RAM pad: QEMU < 9.0 under TCG)" if pad else said


def _memory(facts: dict[str, Any]) -> str:
    mem = facts.get("memory") or {}
    if not mem:
        return "-"
    return f"{human_bytes(mem.get('available_bytes'))} of {human_bytes(mem.get('total_bytes'))}"


# -- VMs ----------------------------------------------------------------------------------------
class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


@vm_app.command("create")
def vm_create(
    name: Annotated[str, typer.Argument(help="the new VM's name")],
    datastore: Annotated[str, typer.Option(help="datastore for its files", show_default=False)],
    host: Annotated[
        str | None,
        typer.Option(help="host to create it on [default: the one with most room that fits]"),
    ] = None,
    memory: Annotated[int, typer.Option(min=16, help="memory in MiB")] = 256,
    vcpus: Annotated[int, typer.Option(min=1, help="virtual CPUs")] = 1,
    disk_mib: Annotated[
        int | None,
        typer.Option(min=1, help="size of its disk in MiB [default: 64, or the image's size]"),
    ] = None,
    network: Annotated[
        list[str] | None, typer.Option(help="connect a NIC to this network (repeatable)")
    ] = None,
    kernel_args: Annotated[str, typer.Option(help="extra guest kernel arguments")] = "",
    image: Annotated[
        str | None,
        typer.Option(help="make its disk from this OS image (`kvmotion image list`) and boot it"),
    ] = None,
    image_datastore: Annotated[
        str | None, typer.Option(help="where the image is [default: the VM's datastore]")
    ] = None,
    ssh_key: Annotated[
        list[Path] | None,
        typer.Option(help="a public key file (e.g. ~/.ssh/id_ed25519.pub) the guest lets in"),
    ] = None,
    hostname: Annotated[
        str | None, typer.Option(help="the guest's hostname [default: the VM's name]")
    ] = None,
    user_data: Annotated[
        Path | None, typer.Option(help="a cloud-config file for the guest's first boot")
    ] = None,
    graphics: Annotated[
        bool | None,
        typer.Option(
            "--graphics/--no-graphics",
            help="a screen (VGA, in the web console) [default: with an image]",
            show_default=False,
        ),
    ] = None,
    firmware: Annotated[
        Firmware, typer.Option(help="bios (SeaBIOS) or uefi (OVMF, its variables moving with it)")
    ] = Firmware.BIOS,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a VM (powered off) on a host: the lab's test guest, or from an OS image."""
    spec: dict[str, Any] = {
        "name": name,
        "datastore": datastore,
        "vcpus": vcpus,
        "memory_mib": memory,
        "disks": [{"size_mib": disk_mib}] if disk_mib else [{}],
        "nics": [{"network": n} for n in network or []],
        "kernel_args": kernel_args,
    }
    if image is not None:
        spec |= {"image": image, "image_datastore": image_datastore}
    if graphics is not None:
        spec["graphics"] = graphics
    if firmware is not Firmware.BIOS:
        spec["firmware"] = firmware.value
    if image is not None or ssh_key or user_data or hostname:
        spec["first_boot"] = first_boot_spec(name, hostname, ssh_key or [], user_data)
    vm = call(connect(center, token), lambda c: c.create_vm(host, spec))
    if json_out:
        print_json(vm)
        return
    console.print(
        f"created VM {vm['name']} ({vm['uuid']}) on {vm['host']}: {vm['power_state']}; "
        f"start it with `kvmotion vm start {vm['name']}`",
        highlight=False,
    )
    if vm.get("placement"):
        console.print(f"placed: {vm['placement']}", highlight=False)


def first_boot_spec(
    name: str, hostname: str | None, keys: list[Path], user_data: Path | None
) -> dict[str, Any]:
    """What the guest's first-boot seed says, from the user's files (read here, sent whole)."""
    try:
        ssh_keys = [line for k in keys for line in k.read_text().splitlines() if line.strip()]
        text = user_data.read_text() if user_data is not None else None
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {getattr(exc, 'filename', '')}: {exc}") from exc
    default = re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:63] or "vm"
    return {"hostname": hostname or default, "ssh_keys": ssh_keys, "user_data": text}


@vm_app.command("list")
def vm_list(json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None) -> None:
    """The center's VMs and where they run."""
    vms = call(connect(center, token), lambda c: c.vms())
    if json_out:
        print_json(vms)
        return
    table = Table(
        "VM", "host", "power state", "vCPUs", "memory", "datastores", "networks", "addresses"
    )
    for vm in vms:
        cfg = vm.get("config") or {}
        table.add_row(
            vm["name"],
            vm.get("host") or "-",
            vm["power_state"],
            str(cfg.get("vcpus", "-")),
            f"{cfg.get('memory_mib', '-')} MiB",
            ", ".join(sorted({d["datastore"] for d in cfg.get("disks", [])})) or "-",
            ", ".join(n["network"] for n in cfg.get("nics", [])) or "-",
            ", ".join(vm.get("addresses") or []) or "-",
        )
    console.print(table)


@vm_app.command("show")
def vm_show(
    vm: VmArg, json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """One VM: where it runs, its devices and where its record lives."""
    info = call(connect(center, token), lambda c: c.vm(vm))
    if json_out:
        print_json(info)
        return
    cfg = info.get("config") or {}
    table = Table("VM", info["name"])
    for key, value in (
        ("uuid", info["uuid"]),
        ("host", info.get("host") or "-"),
        ("power state", info["power_state"]),
        ("vCPUs", cfg.get("vcpus", "-")),
        ("memory", f"{cfg.get('memory_mib', '-')} MiB"),
        ("CPU model", cfg.get("cpu_model", "-")),
        ("machine", cfg.get("machine_type", "-")),
        ("firmware", "UEFI (OVMF)" if cfg.get("firmware") == "uefi" else "BIOS (SeaBIOS)"),
        ("console", "serial and screen" if cfg.get("graphics") else "serial"),
        ("record", info.get("config_path") or "-"),
    ):
        table.add_row(key, escape(str(value)))
    for disk in cfg.get("disks", []):
        where = f"[{disk['datastore']}] {disk.get('path')} ({disk.get('size_mib')} MiB)"
        table.add_row("disk", escape(where))
    for nic in cfg.get("nics", []):
        table.add_row("NIC", f"{nic['network']} {nic.get('mac', '')}")
    if cfg.get("image"):
        table.add_row("image", escape(str(cfg["image"])))
    if info.get("addresses"):
        source = info.get("addresses_source") or "?"
        table.add_row("addresses", escape(f"{', '.join(info['addresses'])} (from {source})"))
    console.print(table)


def _power(
    action: Callable[[CenterClient], Awaitable[dict[str, Any]]],
    json_out: bool,
    center: str | None,
    token: str | None,
) -> None:
    info = call(connect(center, token), action)
    if json_out:
        print_json(info)
        return
    if info.get("placed"):
        console.print(f"placed (its host is in maintenance): {info['placed']}", highlight=False)
    line = f"VM {info['name']} on {info.get('host')}: {info['power_state']}"
    console.print(line, highlight=False)


@vm_app.command("start")
def vm_start(
    vm: VmArg, json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """Power a VM on."""
    _power(lambda c: c.power_on(vm), json_out, center, token)


@vm_app.command("stop")
def vm_stop(
    vm: VmArg, json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """Shut a VM down through its guest (ACPI); powered off if the guest does not comply."""
    _power(lambda c: c.shutdown(vm), json_out, center, token)


@vm_app.command("poweroff")
def vm_poweroff(
    vm: VmArg, json_out: JsonOpt = False, center: CenterOpt = None, token: TokenOpt = None
) -> None:
    """Power a VM off at once (pulls the plug)."""
    _power(lambda c: c.power_off(vm), json_out, center, token)


@vm_app.command("delete")
def vm_delete(
    vm: VmArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a powered-off VM and its disks."""
    ref = connect(center, token)
    if not yes:
        typer.confirm(f"delete VM {vm} and its disks?", abort=True)
    call(ref, lambda c: c.delete_vm(vm))
    if json_out:
        print_json({"name": vm, "deleted": True})
        return
    console.print(f"deleted VM {vm}", highlight=False)


class MigrationType(StrEnum):
    COMPUTE = "compute"
    STORAGE = "storage"
    BOTH = "both"


@vm_app.command("migrate")
def vm_migrate(
    vm: VmArg,
    host: Annotated[
        str | None,
        typer.Option(help="destination host (omit to move only the disks)", show_default=False),
    ] = None,
    datastore: Annotated[
        str | None,
        typer.Option(
            help="move the disks to this datastore (with --host: change both)",
            show_default=False,
        ),
    ] = None,
    downtime_ms: Annotated[
        int, typer.Option(min=1, max=60_000, help="the longest stun QEMU may choose")
    ] = 100,
    kind: Annotated[
        MigrationType | None,
        typer.Option(
            "--type",
            help="compute, storage or both (default: from --host and --datastore)",
            show_default=False,
        ),
    ] = None,
    max_bandwidth_mbit: Annotated[
        float | None,
        typer.Option(
            min=8, help="cap the migration stream (Mbit/s)", show_default=False, callback=finite
        ),
    ] = None,
    deadline: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="give up (abort) after this many seconds",
            show_default=False,
            callback=finite,
        ),
    ] = None,
    priority: Annotated[
        str, typer.Option(help="normal, or high: brake the guest harder to finish sooner")
    ] = "normal",
    allow_postcopy: Annotated[
        bool, typer.Option("--allow-postcopy", help="switch to post-copy if pre-copy cannot end")
    ] = False,
    predict: Annotated[
        bool,
        typer.Option("--predict", help="sample the guest's memory first (about 4.5 s) and predict"),
    ] = False,
    strategy: Annotated[
        str,
        typer.Option(
            help="kvmotion (the convergence engine), or for comparisons another manager's: "
            "qemu-defaults, libvirt, auto-converge, ovirt, nova"
        ),
    ] = "kvmotion",
    streams: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=16,
            help="TCP streams for memory (QEMU's multifd); default: 2 on links over 2 Gbit/s, "
            "else 1, and 1 with --allow-postcopy",
            show_default=False,
        ),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="print the task and return")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only run the precheck; change nothing")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="stop watching after this many seconds")
    ] = DEFAULT_WATCH_TIMEOUT_S,
    json_out: JsonOpt = False,
    center: CenterOpt = None,
    token: TokenOpt = None,
) -> None:
    """Live-migrate a running VM: to another host (--host), its disks to another datastore
    (--datastore), or both at once; shows its progress and timeline. A powered-off VM given
    --host alone is registered there (its files stay).

    Ctrl-C while it runs cancels the migration (the VM keeps running where it was, on its disks).
    Exit codes: 0 migrated, 1 failed or cancelled, 3 refused by the precheck (nothing changed).
    """
    if kind is None:
        if host is None and datastore is None:
            fail(InvalidInput("say where to: --host (compute), --datastore (storage), or both"))
        kind = (
            MigrationType.COMPUTE
            if datastore is None
            else MigrationType.STORAGE
            if host is None
            else MigrationType.BOTH
        )
    ref = connect(center, token)
    bandwidth = None if max_bandwidth_mbit is None else round(max_bandwidth_mbit * 1e6 / 8)
    options = {
        "deadline_s": deadline,
        "priority": priority,
        "allow_postcopy": allow_postcopy,
        "strategy": strategy,
        "streams": streams,
        "predict": predict or dry_run,
        "datastore": datastore,
    }
    if dry_run:
        result = call(
            ref, lambda c: c.precheck(vm, host, kind.value, downtime_ms, bandwidth, **options)
        )
        if json_out:
            print_json(result)
        else:
            _print_precheck(vm, _where(host, datastore), result)
        raise typer.Exit(0 if result.get("ok") else 3)
    task = call(ref, lambda c: c.migrate(vm, host, kind.value, downtime_ms, bandwidth, **options))
    if task.get("kind") == "relocate":  # powered off: registered there, already done
        if json_out:
            print_json(task)
        else:
            console.print(
                f"[green]VM {vm} (powered off) is now registered on {host}[/] (task "
                f"{task['id']}; its files stay where they are)",
                highlight=False,
            )
        return
    if no_wait:
        if json_out:
            print_json(task)
        else:
            console.print(
                f"task {task['id']}: migrating {vm} to {_where(host, datastore)}; "
                f"follow it with `kvmotion task watch {task['id']}`",
                highlight=False,
            )
        return
    if not json_out:
        req = task.get("request") or {}
        limit = "" if kind is MigrationType.STORAGE else f" (downtime limit {downtime_ms} ms)"
        console.print(
            f"task {task['id']}: migrating VM {vm} from {req.get('source')} to "
            f"{_where(host, datastore)}{limit}; Ctrl-C cancels",
            highlight=False,
        )
    final = follow(ref, int(task["id"]), timeout, json_out)
    if not json_out:
        summary = final.get("summary") or {}
        if kind is MigrationType.STORAGE:
            console.print(f"[green]VM {vm}'s disks are now on {datastore}[/]", highlight=False)
        else:
            console.print(
                f"[green]VM {vm} now runs on {_where(host, datastore)}[/] "
                f"(QEMU downtime {summary.get('downtime_ms')} ms)",
                highlight=False,
            )


def _where(host: str | None, datastore: str | None) -> str:
    if datastore is None:
        return str(host)
    return f"datastore {datastore}" if host is None else f"{host}, datastore {datastore}"


def _print_precheck(vm: str, host: str, result: dict[str, Any]) -> None:
    for error in result.get("errors", []):
        text = escape(f"({error['code']}): {error['message']}")
        console.print(f"[red]error[/] {text}", highlight=False)
    for warning in result.get("warnings", []):
        text = escape(f"({warning['code']}): {warning['message']}")
        console.print(f"[yellow]warning[/] {text}", highlight=False)
    p = result.get("prediction")
    if p:
        brake = f", braking the guest's CPU to {p['brake_pct']} %" if p.get("needs_brake") else ""
        downtime = p.get("downtime_ms")
        console.print(
            f"prediction: {'converges' if p['converges'] else 'DOES NOT converge'} in about "
            f"{p['total_s']:.1f} s over {p['passes']} passes, downtime about "
            f"{downtime if downtime is None else round(downtime)} ms{brake} (the guest dirties "
            f"{p['sampled_dirty_bps'] / 2**20:.0f} MiB/s; link {p['link_bps'] * 8 / 1e6:.0f} "
            f"Mbit/s). {p.get('reason', '')}",
            highlight=False,
        )
    if result.get("ok"):
        console.print(f"precheck passed: VM {vm} can migrate to {host}", highlight=False)
    else:
        console.print(f"precheck failed: VM {vm} cannot migrate to {host}; nothing changed")
