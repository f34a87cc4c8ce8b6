"""The host agent's core: the VMs registered on this host and what can be done to them.

I/O-bound but HTTP-free: the REST layer (:mod:`kvmotion.host.api`) is a thin shell over this.
Registrations live in the run dir (``<run_dir>/vms/<uuid>/registration.json``, pointing at the
VM's record on its datastore), so an agent that restarts finds its VMs, and the QEMUs still running,
again, and never starts a second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from kvmotion.errors import Conflict, Forbidden, InsufficientResources, NotFound, QemuError
from kvmotion.host import facts, guestmem, switchover, taps
from kvmotion.host.config import HostConfig
from kvmotion.host.console import Consoles, Receive, Send, relay_unix
from kvmotion.host.cpu import HostCpu, VmCpu
from kvmotion.host.datastores import Datastores
from kvmotion.host.facts import HostFacts, NetworkInfo
from kvmotion.host.guestmem import MemoryProfile
from kvmotion.host.ha import Held, HostHa
from kvmotion.host.hostqemu import HostQemu
from kvmotion.host.images import ImageStore
from kvmotion.host.incoming import Incoming
from kvmotion.host.load import LoadSampler
from kvmotion.host.migrationview import MigrationMode
from kvmotion.host.protocol import HostLoadOut, MigrateRequest
from kvmotion.host.tls import MigrationTls
from kvmotion.host.vm import VirtualMachine
from kvmotion.host.vmconfig import DEFAULT_DISK_MIB, VmConfig, VmCreateRequest
from kvmotion.host.vmfiles import (
    Registration,
    create_vm_files,
    disk_from_image,
    remove_folders,
    remove_vm_files,
)
from kvmotion.host.vmstate import PowerState, VmEnvironment, VmInfo
from kvmotion.mgmttls import agents_context
from kvmotion.qemu.cmdline import unpadded_refusal
from kvmotion.qemu.process import QemuProcess

log = logging.getLogger(__name__)

UNKNOWN_LINK_CAP_BPS = 10_000_000_000 // 8  # QEMU's bandwidth cap on a link of unknown speed


class HostAgent:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.datastores = Datastores(config.datastores)
        self.images = ImageStore(self.datastores)  # OS images on them (host/images.py)
        self.vms: dict[str, VirtualMachine] = {}  # by uuid
        self.qemu = HostQemu.unprobed(config)
        self.cpu = HostCpu(None, None, "not probed yet")
        self.tls = MigrationTls(config.migration_tls, config.tls_dir)
        self._create_lock = asyncio.Lock()
        self.consoles = Consoles()  # the open serial consoles (host/console.py)
        self.load = LoadSampler(self._running_pids)  # what the VMs use (host/load.py)
        self._sampling: asyncio.Task[None] | None = None
        self.ha = HostHa(
            config.name, config.datastores, config.run_dir / "ha.json", self._held,
            self._kill_qemu, self._shutdown_for_ha, peer_tls=agents_context(config.tls_dir),
        )  # fmt: skip
        self._heartbeat: asyncio.Task[None] | None = None

    # -- start and stop ------------------------------------------------------------------------
    async def start(self) -> None:
        """Probe QEMU and the accelerator, then re-attach every registered VM."""
        self.qemu = qemu = await HostQemu.probe(self.config)
        self.cpu = await HostCpu.discover(
            qemu.accel.accel, self.config.cpu_generation, [self.config.default_cpu_model],
            binary=qemu.binary,
        )  # fmt: skip
        self.config.vms_run_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.config.vms_run_dir.glob(f"*/{Registration.FILE}")):
            try:
                registration = Registration.read(path)
                config_path = registration.config_path
                vm = self._make_vm(
                    VmConfig.model_validate_json(config_path.read_text()), config_path
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("cannot load registration %s: %s (left as is)", path, exc)
                continue
            vm.restore(registration)
            self.vms[vm.config.uuid] = vm
            try:
                attached = await vm.attach()
            except (QemuError, OSError, ValueError) as exc:  # one VM must not stop the others
                log.error("re-attaching %s failed: %s (left as is)", vm.config.name, exc)
                continue
            if not attached and vm.incoming:
                # The destination of a migration that ended while we were down: not ours.
                log.info("dropping %s: an incoming migration that never completed", vm.config.name)
                remove_folders(vm.created)
                self._unregister(vm)
            elif not attached and vm.moving_to is not None:
                log.info("dropping the unfinished disk copies of %s", vm.config.name)
                vm.storage_move.drop_copies()
        self._sampling = asyncio.create_task(self.load.run(), name="load-sampler")
        self._heartbeat = asyncio.create_task(self.ha.run(), name="ha-heartbeat")

    async def close(self) -> None:
        """Let go of every VM without stopping any (they outlive the agent)."""
        for task in (self._sampling, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.ha.close()
        await self.consoles.close()
        for vm in self.vms.values():
            await vm.detach()

    def _running_pids(self) -> dict[str, int]:
        return {
            vm.config.name: vm.process.pid
            for vm in self.vms.values()
            if vm.state is PowerState.POWERED_ON and vm.process is not None and not vm.incoming
        }

    def _held(self) -> list[Held]:
        return [
            Held(vm.config.uuid, vm.config.name,
                 frozenset(d.datastore for d in vm.config.disks), not vm.incoming)
            for vm in self.vms.values()
            if vm.process is not None and vm.process.alive()
        ]  # fmt: skip

    async def _kill_qemu(self, uuid: str) -> None:
        """HA's fence: SIGKILL the VM's QEMU now (its watcher records it powered off)."""
        vm = self.vms.get(uuid)
        if vm is not None and vm.process is not None:
            await vm.process.kill()

    async def _shutdown_for_ha(self, uuid: str, timeout: float) -> None:
        vm = self.vms.get(uuid)
        if vm is not None:
            async with vm.lock:
                if vm.state is PowerState.POWERED_ON:
                    await vm.shutdown(timeout)

    def load_report(self, window_s: float) -> HostLoadOut:
        """The VMs' load averaged over the last ``window_s`` seconds."""
        memory = facts.read_memory()
        return self.load.report(window_s, facts.read_cpu().count, memory.available_bytes)

    def _env(self) -> VmEnvironment:
        return VmEnvironment(
            datastores=self.datastores,
            bridges={n.name: n.bridge for n in self.config.networks},
            image_dir=self.config.image_dir,
            accel=self.qemu.accel.accel,
            qemu_binary=self.qemu.binary,
            ram_pad_kib=self.qemu.ram_pad_kib,
            tls=self.tls,
            start_qemu=QemuProcess.start,
            find_qemu=QemuProcess.find,
            create_tap=taps.create_tap,
            delete_tap=taps.delete_tap,
            learned=taps.wait_learned,
            dhcp_leases={n.name: n.dhcp_leases for n in self.config.networks if n.dhcp_leases},
        )

    def _make_vm(self, config: VmConfig, config_path: Path) -> VirtualMachine:
        return VirtualMachine(
            config, config_path, self.config.vms_run_dir / config.uuid, self._env()
        )

    # -- look-ups ------------------------------------------------------------------------------
    def get(self, ref: str) -> VirtualMachine:
        """A VM by uuid or name. Raises NotFound."""
        if ref in self.vms:
            return self.vms[ref]
        for vm in self.vms.values():
            if vm.config.name == ref:
                return vm
        raise NotFound(f"no VM {ref[:80]!r} on host {self.config.name}", code="vm_not_found")

    async def list(self) -> list[VmInfo]:
        return [await vm.info() for vm in sorted(self.vms.values(), key=lambda v: v.config.name)]

    async def facts(self) -> HostFacts:
        """What the center keeps of this host. The slow parts (the migration link's speed from
        `ip` and `tc`, each datastore's statvfs) run off the event loop."""
        memory = facts.read_memory()
        link_bps, datastores = await asyncio.gather(
            asyncio.to_thread(self.link_bandwidth_bps), self.datastores.all_info()
        )
        return HostFacts(
            name=self.config.name,
            hostname=facts.hostname(),
            management_address=self.config.management_address,
            migration_address=self.config.migration_address,
            cpu=facts.read_cpu(),
            cpu_model=self.cpu.facts(),
            migration_link_bps=link_bps,
            migration_tls=self.tls.facts(),
            memory=memory,
            accel=self.qemu.accel.accel,
            accel_reason=self.qemu.accel.reason,
            qemu_version=self.qemu.version,
            machine_type=self.config.machine_type,
            machine_types=self.qemu.machine_types,
            ram_pad_kib=self.qemu.ram_pad_kib,
            default_cpu_model=self.config.default_cpu_model,
            datastores=datastores,
            networks=[
                NetworkInfo(n.name, n.bridge, taps.bridge_exists(n.bridge))
                for n in self.config.networks
            ],
            vms=len(self.vms),
            vms_powered_on=sum(vm.state is PowerState.POWERED_ON for vm in self.vms.values()),
            ha_enabled=self.ha.settings.enabled,
        )

    # -- create, register, delete ------------------------------------------------------------
    async def create(self, req: VmCreateRequest) -> VmInfo:
        """Create a VM's folder, disks and record on its datastore, and register it here.

        Raises NotFound (datastore, network, image), Conflict (name taken here or on the
        datastore), InsufficientResources (memory, space). Nothing is created on error.
        """
        async with self._create_lock:
            await self._check_new(req)
            first_disk, copy = (
                await disk_from_image(req, self.datastores) if req.image else (None, None)
            )
            config = VmConfig.from_request(
                req, cpu_model=self.config.default_cpu_model,
                machine_type=self.config.machine_type, first_disk=first_disk,
            )  # fmt: skip
            config_path, created = await create_vm_files(
                config, self.datastores, first_disk_copy=copy
            )
            try:
                vm = self._register(config, config_path)
            except BaseException:
                remove_folders(created)
                raise
            log.info("created VM %s (%s) on %s", config.name, config.uuid, req.datastore)
            return await vm.info()

    async def _check_new(self, req: VmCreateRequest) -> None:
        if any(vm.config.name == req.name for vm in self.vms.values()):
            raise Conflict(
                f"a VM named {req.name!r} already exists on this host", code="name_taken"
            )
        folder = self.datastores.resolve(req.datastore, req.name)
        if folder.exists():
            raise Conflict(
                f"datastore {req.datastore!r} already has a folder {req.name!r} "
                "(another VM, maybe on another host): choose another name",
                code="name_taken",
            )
        for disk in req.disks:
            self.datastores.get(disk.datastore or req.datastore)
        if req.machine_type:
            self.qemu.check_machine_type(req.machine_type, self.config.name)
        bridges = {n.name for n in self.config.networks}
        for nic in req.nics:
            if nic.network not in bridges:
                raise NotFound(
                    f"network {nic.network!r} does not exist on host {self.config.name} "
                    f"(it has: {', '.join(sorted(bridges)) or 'none'})",
                    code="network_not_found",
                )
        image_dir = self.config.image_dir
        if req.boot_image is not None and (
            image_dir is None or not (image_dir / req.boot_image / "vmlinuz").exists()
        ):
            raise NotFound(
                f"boot image {req.boot_image!r} is not installed on this host "
                "(run `kvmotion image build`)",
                code="image_not_found",
            )
        self._check_memory(req.name, req.memory_mib)
        need: dict[str, int] = {}
        for disk in req.disks:
            ds = disk.datastore or req.datastore
            need[ds] = need.get(ds, 0) + (disk.size_mib or DEFAULT_DISK_MIB) * 2**20
        for ds, size in need.items():
            free = (await self.datastores.info(ds)).free_bytes
            if size > free:
                raise InsufficientResources(
                    f"disks need {size // 2**20} MiB on datastore {ds!r}, which has "
                    f"{free // 2**20} MiB free: choose smaller disks or another datastore",
                    code="insufficient_space",
                )

    def _check_memory(self, vm_name: str, memory_mib: int) -> None:
        """Refuse a VM this host has not the memory for (InsufficientResources)."""
        available = facts.read_memory().available_bytes
        if memory_mib * 2**20 > available:
            raise InsufficientResources(
                f"VM {vm_name} needs {memory_mib} MiB of memory but host {self.config.name} has "
                f"{available // 2**20} MiB available: choose less memory or another host",
                code="insufficient_memory",
            )

    def _register(
        self, config: VmConfig, config_path: Path, *, incoming: bool = False
    ) -> VirtualMachine:
        vm = self._make_vm(config, config_path)
        vm.write_registration(incoming=incoming)
        self.vms[config.uuid] = vm
        return vm

    async def register(self, config: VmConfig, config_path: Path) -> VmInfo:
        """Register a powered-off VM from its record on a datastore this host sees (it was
        unregistered, or is about to be, on another host). Already registered here and powered
        off: its record is answered (a retry). Raises NotFound (the record, a disk or a network
        this host does not see), Conflict (registered here and not powered off), InvalidInput
        (a machine type this QEMU lacks). Nothing is written on error."""
        existing = self.vms.get(config.uuid)
        if existing is not None:
            if existing.state is not PowerState.POWERED_OFF:
                raise Conflict(
                    f"VM {config.name} is already {existing.state} on this host",
                    code="wrong_state",
                )
            return await existing.info()
        if any(vm.config.name == config.name for vm in self.vms.values()):
            raise Conflict(
                f"another VM named {config.name!r} is registered on this host", code="name_taken"
            )
        try:
            record = VmConfig.model_validate_json(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise NotFound(
                f"the record of {config.name} ({config_path}) is not readable from host "
                f"{self.config.name}: {exc}",
                code="record_not_visible",
            ) from exc
        if record.uuid != config.uuid:
            raise Conflict(
                f"{config_path} holds VM {record.name} ({record.uuid}), not {config.name}",
                code="record_mismatch",
            )
        for disk in record.disks:
            if not self.datastores.resolve(disk.datastore, disk.path).exists():
                raise NotFound(
                    f"disk {disk.path} of {record.name} is not visible on datastore "
                    f"{disk.datastore!r} from host {self.config.name}",
                    code="disk_not_visible",
                )
        bridges = {n.name for n in self.config.networks}
        missing = sorted({nic.network for nic in record.nics} - bridges)
        if missing:
            raise NotFound(
                f"network {', '.join(missing)} does not exist on host {self.config.name}",
                code="network_not_found",
            )
        if record.machine_type:
            self.qemu.check_machine_type(record.machine_type, self.config.name)
        vm = self._register(record, config_path)
        log.info("registered powered-off VM %s (%s) from %s", record.name, record.uuid,
                 config_path)  # fmt: skip
        return await vm.info()

    async def unregister(self, ref: str) -> None:
        """Forget a powered-off VM, keeping its files (another host registers it). Raises
        Conflict if it runs or its disks are being copied."""
        vm = self.get(ref)
        async with vm.lock:
            if vm.state is not PowerState.POWERED_OFF or vm.incoming:
                raise Conflict(
                    f"VM {vm.config.name} is {vm.state}: only a powered-off VM is moved by "
                    "registering it elsewhere",
                    code="wrong_state",
                )
            if vm.storage is not None and vm.storage.running:
                raise Conflict(
                    f"VM {vm.config.name}'s disks are being copied: cancel that first",
                    code="wrong_state",
                )
            shutil.rmtree(vm.run_dir, ignore_errors=True)
            self.vms.pop(vm.config.uuid, None)
        log.info("unregistered powered-off VM %s (its files stay)", vm.config.name)

    async def delete(self, ref: str) -> None:
        """Delete a powered-off VM: its record, disks and folder. Raises Conflict if it runs."""
        vm = self.get(ref)
        async with vm.lock:
            if vm.state is not PowerState.POWERED_OFF:
                raise Conflict(
                    f"VM {vm.config.name} is {vm.state}: shut it down before deleting it",
                    code="wrong_state",
                )
            if vm.storage is not None and vm.storage.running:
                raise Conflict(
                    f"VM {vm.config.name}'s disks are being copied: cancel that first",
                    code="wrong_state",
                )
            remove_folders(vm.created)
            remove_vm_files(vm.config, self.datastores, vm.config_path)
            shutil.rmtree(vm.run_dir, ignore_errors=True)
            del self.vms[vm.config.uuid]
            log.info("deleted VM %s", vm.config.name)

    # -- power ---------------------------------------------------------------------------------
    async def power_on(self, ref: str, evc_mode: str | None = None) -> VmInfo:
        """Start a VM, with its EVC mode's baseline CPU if it has one (from its cluster).

        Raises Conflict (running already; a CPU this host cannot give), InsufficientResources.
        """
        vm = self.get(ref)
        async with vm.lock:
            if vm.state is PowerState.POWERED_OFF:
                self._check_memory(vm.config.name, vm.config.memory_mib)
                vm.cpu = self.cpu.resolve(vm.config.cpu_model, evc_mode)
            await vm.power_on()
            return await vm.info()

    async def shutdown(self, ref: str, timeout: float) -> tuple[VmInfo, str]:
        vm = self.get(ref)
        async with vm.lock:
            how = await vm.shutdown(timeout)
            return await vm.info(), how

    async def power_off(self, ref: str) -> VmInfo:
        vm = self.get(ref)
        async with vm.lock:
            await vm.power_off()
            return await vm.info()

    async def reset(self, ref: str) -> VmInfo:
        vm = self.get(ref)
        async with vm.lock:
            await vm.reset()
            return await vm.info()

    # -- live migration ----------------------------------------------------------------------
    # -- consoles ------------------------------------------------------------------------------
    async def console(
        self,
        ref: str,
        kind: str,
        send: Send,
        receive: Receive,
        *,
        offset: int | None = None,
        started: Callable[[int], Awaitable[None]] | None = None,
    ) -> str:
        """Relay a viewer to the VM's serial port or screen until either ends; returns why.
        Raises NotFound (no such VM here, or no screen) or Conflict (it is not running here)."""
        vm = self.get(ref)
        if vm.state is not PowerState.POWERED_ON or vm.process is None:
            raise Conflict(
                f"VM {vm.config.name} is {vm.state} on host {self.config.name}: a console "
                "shows a running VM",
                code="vm_not_running",
            )
        process = vm.process
        if kind == "vnc":
            if not vm.config.graphics:
                raise Conflict(
                    f"VM {vm.config.name} has no screen (created without graphics): use its "
                    "serial console",
                    code="no_display",
                )
            return await relay_unix(vm.files.vnc_socket, send, receive, "the VM's screen")
        return await self.consoles.serial(
            vm.files.console_socket, vm.files.console_log, send, receive,
            offset=offset, running=lambda: vm.process is process, started=started,
        )  # fmt: skip

    def _migration_address(self) -> str:
        if not self.config.migration_address:
            raise Conflict(
                f"host {self.config.name} has no migration address: give it one on the "
                "migration (vMotion) network in its config",
                code="no_migration_address",
            )
        return self.config.migration_address

    async def prepare_incoming(
        self,
        config: VmConfig,
        config_path: Path,
        cpu: VmCpu | None = None,
        *,
        mode: MigrationMode = MigrationMode(),
        datastore: str | None = None,
        ram_pad_kib: int = 0,
    ) -> tuple[VmInfo, str, int | None]:
        """Register ``config`` here and start its QEMU receiving on the migration address.

        With ``datastore`` ("change both"), new empty disks are made there and served over NBD
        on the migration address for the source to copy into; returns that port too.
        Raises Conflict (already here and not powered off), NotFound (a datastore, network or
        image this host lacks), InsufficientResources. Nothing stays on failure.
        """
        address = self._migration_address()
        if cpu is not None:
            self.cpu.check(cpu, what="receive")
        if self.qemu.ram_pad_kib and not ram_pad_kib:
            why = unpadded_refusal(config.name, self.config.name, self.qemu.version)
            raise Conflict(why, code="ram_pad_missing")
        existing = self.vms.get(config.uuid)
        if existing is not None and existing.state is not PowerState.POWERED_OFF:
            raise Conflict(f"VM {config.name} is already {existing.state} on this host")
        if datastore is not None:
            return await self._prepare_with_disks(
                config, cpu, ram_pad_kib, address, mode, datastore
            )
        for disk in config.disks:
            path = self.datastores.resolve(disk.datastore, disk.path)
            if not path.exists():
                raise NotFound(
                    f"disk {disk.path} of {config.name} is not visible on datastore "
                    f"{disk.datastore!r} from host {self.config.name}",
                    code="disk_not_visible",
                )
        self._check_memory(config.name, config.memory_mib)
        vm = self._make_vm(config, config_path)
        vm.cpu, vm.ram_pad_kib = cpu, ram_pad_kib
        vm.write_registration(incoming=True)
        self.vms[config.uuid] = vm
        try:
            async with vm.lock:
                uri, _ = await vm.prepare_incoming(address, mode=mode)
                return await vm.info(), uri, None
        except BaseException:
            self._unregister(vm)
            raise

    async def _prepare_with_disks(
        self,
        config: VmConfig,
        cpu: VmCpu | None,
        ram_pad_kib: int,
        address: str,
        mode: MigrationMode,
        datastore: str,
    ) -> tuple[VmInfo, str, int | None]:
        await self.check_space(datastore, config)
        self._check_memory(config.name, config.memory_mib)
        new = config.moved_to(datastore)
        record, created = await create_vm_files(new, self.datastores)
        vm = self._make_vm(new, record)
        vm.cpu, vm.ram_pad_kib, vm.created = cpu, ram_pad_kib, created
        vm.write_registration(incoming=True)
        self.vms[config.uuid] = vm
        try:
            async with vm.lock:
                uri, port = await vm.prepare_incoming(address, mode=mode, export=True)
                return await vm.info(), uri, port
        except BaseException:
            self._unregister(vm)
            remove_folders(created)
            raise

    async def check_space(self, datastore: str, config: VmConfig) -> None:
        """Refuse to copy ``config``'s disks to ``datastore`` without room for them (their full
        size, plus a tenth for the copy's metadata and the guest's growth)."""
        free = (await self.datastores.info(datastore)).free_bytes
        need = sum(d.size_mib for d in config.disks) * 2**20
        if need * 1.1 > free:
            raise InsufficientResources(
                f"VM {config.name}'s disks need {need // 2**20} MiB (plus 10 %) on datastore "
                f"{datastore!r}, which has {free // 2**20} MiB free on host {self.config.name}",
                code="insufficient_space",
            )

    # -- storage vMotion -----------------------------------------------------------------------
    async def move_storage(self, ref: str, datastore: str, speed_bps: int | None = None) -> VmInfo:
        """Copy a running VM's disks to another datastore here, and switch to the copies."""
        vm = self.get(ref)
        self.datastores.get(datastore)
        await self.check_space(datastore, vm.config)
        async with vm.lock:
            await vm.storage_move.move(datastore, speed_bps)
            return await vm.info()

    async def mirror_disks(
        self, ref: str, host: str, port: int, datastore: str, speed_bps: int | None = None
    ) -> VmInfo:
        """ "Change both", source: copy the VM's disks into the destination's NBD exports."""
        vm = self.get(ref)
        async with vm.lock:
            await vm.storage_move.mirror_to(host, port, datastore, speed_bps)
            return await vm.info()

    async def cancel_storage(self, ref: str) -> str:
        vm = self.get(ref)
        async with vm.lock:
            return await vm.storage_move.cancel()

    def link_bandwidth_bps(self) -> int | None:
        """What the migration link carries (bytes/s); None when its speed is unknown."""
        mbps = facts.link_speed_mbps(self.config.migration_address)
        return int(mbps * 1e6 / 8) if mbps else None

    async def migrate(self, ref: str, req: MigrateRequest) -> VmInfo:
        vm = self.get(ref)
        cap = req.max_bandwidth_bps  # QEMU's cap: the link (not QEMU's 128 MiB/s)
        cap = cap or await asyncio.to_thread(self.link_bandwidth_bps) or UNKNOWN_LINK_CAP_BPS
        stunned = switchover.teller(req.switchover_url, req.switchover_token, self.config.tls_dir)
        async with vm.lock:
            await vm.migrate_out(
                req.uri, cap, req.downtime_limit_ms, brake=req.brake, mode=req.mode(),
                on_stunned=stunned, auto_converge=req.auto_converge,
            )  # fmt: skip
            return await vm.info()

    async def take_switchover(self, uuid: str, token: str) -> None:
        """The source stopped the guest: take its traffic here (host/switchover.py)."""
        vm = self.vms.get(uuid)
        incoming = vm.migration if vm is not None else None
        if vm is None or not isinstance(incoming, Incoming) or not incoming.accepts(token):
            raise Forbidden("no incoming migration with this switchover token", code="forbidden")
        await incoming.take_traffic(switchover.nic_taps(uuid, vm.config.nics, vm.env.bridges))

    async def tune_migration(
        self,
        ref: str,
        downtime_limit_ms: int | None,
        max_bandwidth_bps: int | None,
        throttle_pct: int | None,
    ) -> VmInfo:
        vm = self.get(ref)
        await vm.outgoing().tune(downtime_limit_ms, max_bandwidth_bps, throttle_pct)
        return await vm.info()

    async def dirty_rate(self, ref: str, seconds: int) -> float:
        """The guest's dirty rate in bytes/s, measured by QEMU over ``seconds`` (1-60)."""
        return await guestmem.measure_dirty_rate(self.get(ref).running_qmp(), seconds)

    async def memory_profile(self, ref: str) -> MemoryProfile:
        """The inputs of a prediction: non-zero RAM, dirty rate and working set (about 4.5 s)."""
        vm = self.get(ref)
        pid = vm.process.pid if vm.process is not None else None
        return await guestmem.memory_profile(vm.running_qmp(), pid, vm.config.memory_mib * 2**20)

    async def cancel_migration(self, ref: str) -> VmInfo:
        vm = self.get(ref)
        await vm.cancel_migration()
        return await vm.info()

    async def finish_migration(self, ref: str, *, remove_files: bool = False) -> tuple[str, ...]:
        """Source, after success: end the paused source QEMU and forget the VM here; with
        ``remove_files`` (its disks were copied) delete its old disks and record too."""
        vm = self.get(ref)
        async with vm.lock:
            problems = await vm.finish_outgoing(remove_files=remove_files)
            self._unregister(vm)
            return tuple(problems)

    async def abort_migration(self, ref: str, *, destination_gone: bool = False) -> str:
        """Either side: undo this host's part. A destination forgets the VM."""
        vm = self.get(ref)
        async with vm.lock:
            done = await vm.abort_migration(destination_gone=destination_gone)
            if vm.state is PowerState.POWERED_OFF and done.startswith("destination ended"):
                self._unregister(vm)
            return done

    def _unregister(self, vm: VirtualMachine) -> None:
        """Forget a VM on this host; its record and disks stay on the datastore."""
        shutil.rmtree(vm.run_dir, ignore_errors=True)
        self.vms.pop(vm.config.uuid, None)
