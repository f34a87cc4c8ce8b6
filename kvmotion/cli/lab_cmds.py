"""`kvmotion lab ...` and `kvmotion demo`: the datacenter on one machine."""

from __future__ import annotations

import asyncio
import dataclasses

import typer
from rich.table import Table

from kvmotion.cli.output import console, print_json
from kvmotion.lab import demo as demo_mod
from kvmotion.lab import labcenter, topology

app = typer.Typer(help="The lab: hosts, networks and datastores in network namespaces.")


def _log(msg: str) -> None:
    console.print(f"  {msg}", highlight=False)


@app.command("up")
def up(
    hosts: int = typer.Option(2, "--hosts", "-n", min=2, max=8, help="how many hosts"),
    cpu: list[str] = typer.Option(
        [],
        "--cpu",
        metavar="HOST=MODE",
        help="simulate a CPU generation on a host, e.g. --cpu 172=intel-merom (MODE 'real' "
        "restores the real CPU); see `kvmotion host evc-modes`",
    ),
    qemu: list[str] = typer.Option(
        [],
        "--qemu",
        metavar="HOST=VERSION",
        help="run a host on another QEMU, e.g. --qemu 172=7.2 (Debian 12's, unpacked by "
        "./run setup); VERSION 'system' restores the system's",
    ),
    api_plaintext: bool | None = typer.Option(
        None,
        "--api-plaintext/--api-https",
        help="serve the agents' and the center's APIs in plain HTTP (tokens in clear on the "
        "lab's management network) or HTTPS with the lab's CA; default: as the lab had it, "
        "HTTPS for a new lab",
    ),
) -> None:
    """Build the lab (idempotent): hosts 172.16.0.172.., networks, datastores, agents, center."""
    cpus = _per_host(cpu, "--cpu", "172=intel-merom", "real")
    qemus = _per_host(qemu, "--qemu", "172=7.2", "system")
    demo_mod.ensure_image(_log)
    state = topology.lab_up(hosts, cpus=cpus, qemus=qemus, api_plaintext=api_plaintext, log=_log)
    center = labcenter.ensure_center(state, _log)
    console.print(f"center: {center.url} (the CLI finds it through the lab's state)")
    if center.ca_file:
        console.print(f"the lab's CA: {center.ca_file} (trust it in a browser to open the center)")
    for host in state.hosts:
        console.print(
            f"host {host.name}: agent {host.agent_url}, migration {host.migration_address}"
        )


def _per_host(
    items: list[str], option: str, example: str, default: str
) -> dict[int | str, str | None]:
    """HOST=VALUE options by host address (VALUE ``default``: None)."""
    chosen: dict[int | str, str | None] = {}
    for item in items:
        ref, sep, value = item.partition("=")
        if not sep or not ref or not value:
            raise typer.BadParameter(f"{option} takes HOST=VALUE, e.g. {example}, not {item!r}")
        address = f"172.16.0.{ref}" if ref.isdigit() else ref
        chosen[address] = None if value == default else value
    return chosen


@app.command("down")
def down() -> None:
    """Remove everything the lab made: namespaces, links, agents, VMs, files."""
    labcenter.stop_center(_log)
    topology.lab_down(log=_log)
    console.print("lab is down")


@app.command("status")
def status(json_out: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """What the lab has now (only looks; `lab up` repairs)."""
    st = topology.lab_status()
    if st is None:
        console.print("no lab is up (run `kvmotion lab up`)")
        raise typer.Exit(1)
    if json_out:
        print_json(dataclasses.replace(st, state=None))
        return
    table = Table("host", "namespace", "links", "agent", "VMs (QEMU pids)", "migration link")
    for h in st.hosts:
        links = "up" if h.links_up and all(h.links_up.values()) else "DOWN"
        agent = "healthy" if h.agent_healthy else ("alive" if h.agent_alive else "DEAD")
        rate = "unshaped" if h.migration_rate_mbit is None else f"{h.migration_rate_mbit:g} Mbit/s"
        pids = ", ".join(map(str, h.qemu_pids)) or "-"
        table.add_row(h.name, h.netns, links, f"{agent} (pid {h.agent_pid})", pids, rate)
    console.print(table)
    if st.state is not None:
        console.print(f"client (the user): {st.state.client_address} in {st.state.client_netns}")
        console.print(f"shared datastore: {st.state.shared_datastore}")
    for problem in st.problems:
        console.print(f"[red]problem:[/] {problem}")
    if not st.ok:
        raise typer.Exit(1)


@app.command("shape")
def shape(
    host: str = typer.Argument(..., help="host name (management address), e.g. 172.16.0.172"),
    mbit: float | None = typer.Option(None, help="link speed in Mbit/s; omit to remove shaping"),
) -> None:
    """Shape a host's migration link to a speed (tc), or remove the shaping."""
    topology.shape_link(host, mbit)
    console.print(f"{host}: migration link {'unshaped' if mbit is None else f'{mbit:g} Mbit/s'}")


@app.command("link")
def link(
    host: str = typer.Argument(..., help="host name (management address), e.g. 172.16.0.173"),
    state: str = typer.Argument(..., help="down (cut the link, as a pulled cable) or up"),
    network: str = typer.Option(
        "migration", help="migration, management (the center's), or storage (the shared datastore)"
    ),
) -> None:
    """Cut or mend a host's migration, management or storage link: to see a migration fail
    safely, or HA tell an isolated host from a failed one."""
    if state not in ("up", "down"):
        raise typer.BadParameter("say up or down", param_hint="STATE")
    if network not in ("migration", "management", "storage"):
        raise typer.BadParameter("say migration, management or storage", param_hint="--network")
    topology.set_link_up(host, state == "up", network)
    console.print(f"{host}: {network} link {state}")


@app.command("kill")
def kill(
    host: str = typer.Argument(..., help="host name (management address), e.g. 172.16.0.173"),
) -> None:
    """Kill a host as a power cut would (its agent and QEMUs, SIGKILL); `lab up` restarts its
    agent."""
    pids = topology.kill_host(host)
    console.print(f"{host}: killed {len(pids)} process(es): {' '.join(map(str, pids))}")


@app.command("tls")
def tls(
    state: str = typer.Argument(..., help="on (encrypt migration streams) or off (plaintext)"),
) -> None:
    """Encrypt migration and disk-copy streams with the lab CA's certificates, or stop."""
    if state not in ("on", "off"):
        raise typer.BadParameter("say on or off", param_hint="STATE")
    topology.set_migration_tls(state == "on", _log)
    console.print(f"migration TLS {state}; the center sees it at its next refresh (3 s in the lab)")


def demo(
    os_name: str | None = typer.Option(
        None, "--os", help="debian: the same story with a real Debian server and real clients"
    ),
) -> None:
    """The seed's lab: vm-a moves 172.16.0.172 -> .173 -> .172 while its user stays connected."""
    if os_name is None:
        asyncio.run(demo_mod.run_demo(_log))
        return
    if os_name != "debian":
        raise typer.BadParameter("the real-server demo has one OS: debian", param_hint="--os")
    from kvmotion.lab.osdemo import run_os_demo  # needs the OS image builder only here

    asyncio.run(run_os_demo(_log))
