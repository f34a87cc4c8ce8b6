"""A host agent's configuration: who it is, where it listens, what it can see.

The same file describes a lab host (written by ``kvmotion lab up``) and a real machine (written by
an admin, e.g. ``/etc/kvmotion/host.json``). Nothing here knows whether it runs in a namespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmotion.configfile import ConfigFile

DEFAULT_AGENT_PORT = 8700


class DatastoreConfig(BaseModel):
    """A directory holding VM folders. ``shared`` means other hosts see the same path."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    shared: bool = False


class NetworkConfig(BaseModel):
    """A VM network: a named bridge that exists on every host that offers the network."""

    model_config = ConfigDict(frozen=True)

    name: str
    bridge: str
    # Where this network's DHCP server writes its leases (dnsmasq's format), if this host can
    # read them: a VM's address is shown from them when its guest runs no guest agent.
    dhcp_leases: Path | None = None


class HostConfig(ConfigFile):
    name: str
    management_address: str
    migration_address: str | None = None
    port: int = DEFAULT_AGENT_PORT
    token: str = Field(repr=False)
    run_dir: Path
    datastores: list[DatastoreConfig] = []
    networks: list[NetworkConfig] = []
    # Where the guest image (kernel, initrd) lives; VMs may boot it directly.
    image_dir: Path | None = None
    # Force an accelerator ("kvm" or "tcg") instead of probing; None means probe.
    accel: str | None = None
    # CPU model QEMU gives VMs that do not ask for one.
    default_cpu_model: str = "qemu64"
    # Simulate an older CPU (an EVC mode key, e.g. "intel-merom"): the host then offers and
    # enforces only that generation's features. For the lab's mixed clusters.
    cpu_generation: str | None = None
    # The machine type (a VM's hardware version) new VMs get. Pin it to one every host of the
    # cluster runs (the oldest QEMU's): a VM can move only to a host whose QEMU has its type.
    machine_type: str = "pc-q35-7.2"
    # The QEMU this host runs VMs with (a path, or a name on PATH): one host of the lab runs
    # Debian 12's 7.2 unpacked beside the system's QEMU this way.
    qemu_binary: str = "qemu-system-x86_64"
    # Streams between hosts (memory, and disk copies over NBD): "required" encrypts them with the
    # certificates in tls_dir (`kvmotion tls issue`; host/tls.py), "off" sends plaintext (for a
    # migration network nobody else can reach, like the lab's).
    migration_tls: Literal["required", "off"] = "required"
    tls_dir: Path = Path("/etc/kvmotion/tls")
    # The agent's API is HTTPS with tls_dir's server certificate (mgmttls.py); true serves
    # plaintext HTTP instead, the center's token in clear (a private network only).
    api_plaintext: bool = False

    # Run-dir layout, shared by the agent and by `lab down` (which must find QEMU pids).
    @property
    def vms_run_dir(self) -> Path:
        return self.run_dir / "vms"


def qemu_pidfiles(run_dir: Path) -> list[Path]:
    """Pidfiles of every QEMU an agent with this run dir started (alive or not)."""
    return sorted((run_dir / "vms").glob("*/qemu.pid"))
