"""A VM's disk copies on its host, against a fake QEMU (fake_qmp.py): Storage vMotion
(kvmotion/host/storage_move.py), the disk side of "change both" in abort and finish, and the
restart recovery of a copy an earlier agent left (kvmotion/host/recovery.py).

Every test says what QEMU was told (the copy's jobs, the pivot, yanks) and what each set of
files became: the rule is that no file the VM uses is ever deleted, and no copy is left behind
that nothing records. Disk images are real (qemu-img), QEMU is the fake.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kvmotion.errors import QemuError
from kvmotion.host import recovery
from kvmotion.host.config import DatastoreConfig
from kvmotion.host.datastores import Datastores
from kvmotion.host.tls import MigrationTls
from kvmotion.host.vm import VirtualMachine
from kvmotion.host.vmconfig import DiskConfig, VmConfig
from kvmotion.host.vmfiles import Registration, create_vm_files, write_record
from kvmotion.host.vmstate import MigrationRole, PowerState, VmEnvironment
from kvmotion.qemu.qmp import QmpSession
from tests.unit.fake_qmp import FakeHost, FakeQemu, failing
from tests.unit.test_vm import DEST_URI, UUID, refused, release, until
from tests.unit.test_vm import host as host  # the fixture

DEST_HOST, NBD_PORT = "10.0.0.2", 10809


def make_disk_vm(root: Path, host: FakeHost, disks: int = 1) -> VirtualMachine:
    """vm-a with ``disks`` disks on datastore ds (ds2 is empty), its files made as an agent
    makes them."""
    for ds in ("ds", "ds2"):
        (root / ds).mkdir(exist_ok=True)
    config = VmConfig(
        uuid=UUID,
        name="vm-a",
        datastore="ds",
        vcpus=1,
        memory_mib=64,
        disks=tuple(
            DiskConfig(
                datastore="ds", path=f"vm-a/vm-a{'-' + str(i) if i else ''}.qcow2", size_mib=1
            )
            for i in range(disks)
        ),
        nics=(),
        cpu_model="qemu64",
        machine_type="pc-q35-7.2",
        boot_image=None,
        kernel_args="",
        created_at=datetime.now(UTC),
    )
    env = VmEnvironment(
        datastores=Datastores(
            [
                DatastoreConfig(name="ds", path=root / "ds"),
                DatastoreConfig(name="ds2", path=root / "ds2"),
            ]
        ),
        bridges={},
        image_dir=None,
        accel="tcg",
        qemu_binary="qemu-system-x86_64",
        ram_pad_kib=0,
        tls=MigrationTls("off", root / "tls"),
        start_qemu=host.start_qemu,
        find_qemu=host.find_qemu,
        create_tap=host.create_tap,
        delete_tap=host.delete_tap,
    )
    folder = root / "ds" / "vm-a"
    folder.mkdir()
    for disk in config.disks:
        path = env.datastores.resolve(disk.datastore, disk.path)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    write_record(folder / "vm.json", config)
    return VirtualMachine(config, folder / "vm.json", root / "run", env)


@pytest.fixture
async def vm(tmp_path: Path, host: FakeHost) -> AsyncIterator[VirtualMachine]:
    vm = make_disk_vm(tmp_path, host)
    yield vm
    await release(vm, host)


def old_disk(root: Path) -> Path:
    return root / "ds" / "vm-a" / "vm-a.qcow2"


def new_disk(root: Path) -> Path:
    return root / "ds2" / "vm-a" / "vm-a.qcow2"


def registration(vm: VirtualMachine) -> Registration:
    return Registration.read(vm.run_dir / Registration.FILE)


async def running(vm: VirtualMachine, host: FakeHost) -> FakeQemu:
    await vm.power_on()
    return host.qemus[vm.files.pidfile]


async def copying_to_dest(vm: VirtualMachine, host: FakeHost) -> FakeQemu:
    """A "change both" source copying its disk into the destination's NBD export."""
    qemu = await running(vm, host)
    await vm.storage_move.mirror_to(DEST_HOST, NBD_PORT, "ds2")
    assert [j["device"] for j in qemu.block_jobs] == ["mirror-disk0"]
    return qemu


async def storage_ready(vm: VirtualMachine, qemu: FakeQemu) -> None:
    qemu.mirrors_ready()
    await until(lambda: vm.storage is not None and vm.storage.view.phase == "ready")


# -- Storage vMotion on one host -------------------------------------------------------------------
async def test_a_storage_move_pivots_to_the_copies_then_removes_the_old_files(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    qemu = await running(vm, host)
    await vm.storage_move.move("ds2")
    assert registration(vm).moving_to == tmp_path / "ds2" / "vm-a" / "vm.json"  # before copying
    assert new_disk(tmp_path).exists()

    qemu.mirrors_ready()  # the VM pivots by itself once every copy is ready
    await until(lambda: vm.storage is not None and vm.storage.view.phase == "completed")
    assert "block-job-complete" in qemu.commands
    assert qemu.nodes[qemu.devices["virtio-disk0"]]["file"] == str(new_disk(tmp_path))
    assert vm.config.datastore == "ds2" and vm.config_path.parent == tmp_path / "ds2" / "vm-a"
    assert not old_disk(tmp_path).exists() and not (tmp_path / "ds" / "vm-a").exists()
    assert registration(vm).moving_to is None and registration(vm).created == ()
    assert "disk0" not in qemu.nodes  # the old node closed


async def test_cancelling_a_storage_move_keeps_the_disks_and_removes_the_copies(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    qemu = await running(vm, host)
    await vm.storage_move.move("ds2")

    assert await vm.storage_move.cancel() == "disk copy cancelled; the VM keeps its disks"
    assert ("block-job-cancel", {"device": "mirror-disk0", "force": True}) in qemu.received
    assert qemu.devices["virtio-disk0"] == "disk0" and old_disk(tmp_path).exists()
    assert not (tmp_path / "ds2" / "vm-a").exists()
    assert registration(vm).moving_to is None and vm.config.datastore == "ds"


async def test_a_storage_move_of_a_powered_off_vm_copies_its_files(
    vm: VirtualMachine, tmp_path: Path
) -> None:
    await vm.storage_move.move("ds2")  # qemu-img convert, in the background

    await until(lambda: vm.storage is not None and vm.storage.view.phase == "completed", 10)
    assert vm.config.datastore == "ds2" and new_disk(tmp_path).exists()
    assert not old_disk(tmp_path).exists()
    assert vm.state is PowerState.POWERED_OFF


# -- abort_migration with a disk copy ("change both") ----------------------------------------------
async def test_abort_of_a_powered_off_vm_does_nothing(vm: VirtualMachine) -> None:
    assert vm.role is MigrationRole.NONE
    assert await vm.abort_migration() == "nothing to abort"


async def test_abort_before_memory_moves_cancels_the_disk_copy(
    vm: VirtualMachine, host: FakeHost
) -> None:
    qemu = await copying_to_dest(vm, host)
    assert vm.role is MigrationRole.UNWATCHED

    assert await vm.abort_migration() == "source kept running, its disk copy cancelled"
    nbd = [n for n in qemu.yanked if n.startswith("nbd-disk0-")]
    assert nbd, "the NBD connection is yanked before the job is cancelled"
    assert qemu.block_jobs == [] and not any(n.startswith("nbd-disk0-") for n in qemu.nodes)
    assert "migrate_cancel" not in qemu.commands and qemu.status == "running"
    assert vm.storage is not None and vm.storage.view.phase == "cancelled"


async def test_abort_of_a_change_both_cancels_memory_and_disks(
    vm: VirtualMachine, host: FakeHost
) -> None:
    qemu = await copying_to_dest(vm, host)
    await storage_ready(vm, qemu)
    await vm.migrate_out(DEST_URI, 10**9, 300)
    await until(lambda: vm.outgoing().view.phase == "active")
    assert vm.role is MigrationRole.SOURCE

    assert await vm.abort_migration() == "source kept running, its disk copy cancelled"
    assert "migrate_cancel" in qemu.commands and qemu.status == "running"
    assert qemu.block_jobs == [] and qemu.devices["virtio-disk0"] == "disk0"


async def test_abort_of_a_later_copy_on_a_vm_this_host_received(
    vm: VirtualMachine, host: FakeHost
) -> None:
    """The VM came here by an earlier migration, and now copies its disks away again."""
    vm.write_registration(incoming=True)
    await vm.prepare_incoming("127.0.0.1")
    qemu = host.qemus[vm.files.pidfile]
    qemu.complete_incoming()
    await until(lambda: vm.state is PowerState.POWERED_ON)
    await vm.storage_move.mirror_to(DEST_HOST, NBD_PORT, "ds2")
    assert vm.role is MigrationRole.RECEIVED

    assert await vm.abort_migration() == "source kept running, its disk copy cancelled"
    assert qemu.block_jobs == [] and qemu.status == "running"


# -- finish_outgoing with remove_files -------------------------------------------------------------
async def test_finish_of_a_change_both_removes_the_source_files(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    qemu = await copying_to_dest(vm, host)
    await storage_ready(vm, qemu)
    await vm.migrate_out(DEST_URI, 10**9, 300)
    await until(lambda: vm.outgoing().view.phase == "active")
    qemu.pause_before_switchover()  # the mirrors end consistent, then the stream completes
    await until(lambda: vm.outgoing().view.phase == "completed")
    assert ("block-job-cancel", {"device": "mirror-disk0"}) in qemu.received  # not forced
    assert vm.storage is not None and vm.storage.view.phase == "completed"

    assert await vm.finish_outgoing(remove_files=True) == []
    assert qemu.commands[-1] == "quit" and vm.state is PowerState.POWERED_OFF
    assert not old_disk(tmp_path).exists() and not vm.config_path.exists()


async def test_finish_refuses_to_remove_files_that_were_not_copied(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    qemu = await running(vm, host)
    await vm.migrate_out(DEST_URI, 10**9, 300)
    qemu.pause_before_switchover()
    await until(lambda: vm.outgoing().view.phase == "completed")

    await refused(vm.finish_outgoing(remove_files=True), "no_disk_copy")
    assert old_disk(tmp_path).exists() and vm.config_path.exists()
    assert vm.state is PowerState.POWERED_OFF  # the stale copy ends all the same


async def test_finish_after_restart_keeps_files_it_cannot_vouch_for(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    """The agent restarted after a "change both" completed: what the copy did went with it."""
    vm.run_dir.mkdir(parents=True)
    qemu = await host.left_running(
        vm.files.pidfile, vm.files.qmp_socket, status="postmigrate", migration="completed"
    )
    qemu.add_disk(0, "disk0", str(old_disk(tmp_path)))
    assert await vm.attach() is True

    problems = await vm.finish_outgoing(remove_files=True)
    assert len(problems) == 1 and "cannot confirm the disks were copied" in problems[0]
    assert qemu.commands[-1] == "quit" and vm.state is PowerState.POWERED_OFF
    assert old_disk(tmp_path).exists() and vm.config_path.exists()


# -- restart recovery of disk copies ---------------------------------------------------------------
async def registered_move(vm: VirtualMachine) -> None:
    """A storage move as its agent records it before copying (the new record and image made
    and registered), taken up by this agent as it starts."""
    new = vm.config.moved_to("ds2")
    record, created = await create_vm_files(new, vm.env.datastores, [2**20] * len(new.disks))
    Registration(vm.config_path, moving_to=record, created=tuple(created)).write(vm.run_dir)
    vm.restore(registration(vm))


async def interrupted_move(vm: VirtualMachine, host: FakeHost, root: Path) -> FakeQemu:
    """What an agent leaves when it stops during a storage move: the move registered, QEMU
    running with a mirror job."""
    await registered_move(vm)
    qemu = await host.left_running(vm.files.pidfile, vm.files.qmp_socket, status="running")
    qemu.add_disk(0, "disk0", str(old_disk(root)))
    qemu.nodes["disk0-ab12"] = {"file": str(new_disk(root)), "size": 2**20}
    qemu.block_jobs.append(
        {"device": "mirror-disk0", "type": "mirror", "status": "running", "offset": 0,
         "len": 2**20, "_source": "disk0", "_target": "disk0-ab12"}
    )  # fmt: skip
    return qemu


async def test_restart_completes_a_move_whose_devices_use_the_copies(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    qemu = await interrupted_move(vm, host, tmp_path)
    qemu.block_jobs.clear()
    qemu.devices["virtio-disk0"] = "disk0-ab12"  # QEMU had pivoted before the agent stopped

    assert await vm.attach() is True
    assert vm.config.datastore == "ds2" and vm.config_path == tmp_path / "ds2" / "vm-a" / "vm.json"
    assert not old_disk(tmp_path).exists() and new_disk(tmp_path).exists()
    assert registration(vm).moving_to is None
    assert registration(vm).config_path == vm.config_path
    assert vm.state is PowerState.POWERED_ON


async def test_restart_drops_a_move_whose_copies_were_not_used_yet(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    qemu = await interrupted_move(vm, host, tmp_path)

    assert await vm.attach() is True
    assert ("block-job-cancel", {"device": "mirror-disk0", "force": True}) in qemu.received
    assert qemu.block_jobs == []
    assert vm.config.datastore == "ds" and old_disk(tmp_path).exists()
    assert not (tmp_path / "ds2" / "vm-a").exists()
    assert registration(vm).moving_to is None and registration(vm).created == ()


async def test_restart_keeps_a_move_as_is_when_qemu_cannot_say(
    vm: VirtualMachine, host: FakeHost, tmp_path: Path
) -> None:
    qemu = await interrupted_move(vm, host, tmp_path)
    qemu.reply("query-block-jobs", failing("QEMU is busy"))

    assert await vm.attach() is True
    assert "block-job-cancel" not in qemu.commands
    assert vm.moving_to is not None and registration(vm).moving_to is not None
    assert old_disk(tmp_path).exists() and new_disk(tmp_path).exists()
    assert vm.config.datastore == "ds" and vm.state is PowerState.POWERED_ON


async def test_restart_records_a_pivot_that_failed_halfway(tmp_path: Path, host: FakeHost) -> None:
    """Two disks, one switched to its copy when the agent stopped: each disk is recorded where
    QEMU uses it, and no file is removed."""
    vm = make_disk_vm(tmp_path, host, disks=2)
    await registered_move(vm)
    qemu = await host.left_running(vm.files.pidfile, vm.files.qmp_socket, status="running")
    qemu.add_disk(0, "disk0", str(new_disk(tmp_path)))  # switched
    qemu.add_disk(1, "disk1", str(tmp_path / "ds" / "vm-a" / "vm-a-1.qcow2"))  # not yet
    try:
        assert await vm.attach() is True
        assert [d.datastore for d in vm.config.disks] == ["ds2", "ds"]
        assert VmConfig.model_validate_json(vm.config_path.read_text()) == vm.config
        assert registration(vm).moving_to is None
        assert old_disk(tmp_path).exists() and new_disk(tmp_path).exists()
        assert (tmp_path / "ds" / "vm-a" / "vm-a-1.qcow2").exists()
    finally:
        await release(vm, host)


async def test_a_move_is_kept_as_is_without_qmp(vm: VirtualMachine, tmp_path: Path) -> None:
    """A QEMU that runs but whose QMP does not answer: nothing can be decided."""
    await registered_move(vm)
    assert vm.qmp is None

    await vm.storage_move.recover()
    assert vm.moving_to is not None and registration(vm).moving_to is not None
    assert old_disk(tmp_path).exists() and new_disk(tmp_path).exists()


async def test_restart_ends_the_disk_copy_of_a_change_both_source(
    vm: VirtualMachine, host: FakeHost
) -> None:
    """The agent stopped while its VM copied its disks to another host: the copy and the
    migration are cancelled, the NBD connection yanked, and the guest runs here."""
    vm.run_dir.mkdir(parents=True)
    qemu = await host.left_running(
        vm.files.pidfile, vm.files.qmp_socket, status="running", migration="active"
    )
    qemu.add_disk(0, "disk0", "/srv/ds/vm-a/vm-a.qcow2")
    qemu.nodes["nbd-disk0-ab12"] = {"file": f"nbd://{DEST_HOST}:{NBD_PORT}/disk0", "size": 0}
    qemu.block_jobs.append(
        {"device": "mirror-disk0", "type": "mirror", "status": "ready", "offset": 1,
         "len": 1, "_source": "disk0", "_target": "nbd-disk0-ab12"}
    )  # fmt: skip
    # A job that is ending by itself: not cancelled, waited for.
    pending = {"device": "mirror-disk1", "status": "pending", "offset": 1, "len": 1}
    qemu.block_jobs.append(pending)
    asyncio.get_running_loop().call_later(0.3, qemu.block_jobs.remove, pending)

    assert await vm.attach() is True
    cancels = [a["device"] for c, a in qemu.received if c == "block-job-cancel"]
    assert cancels == ["mirror-disk0"]
    assert qemu.yanked == ["nbd-disk0-ab12"] and "nbd-disk0-ab12" not in qemu.nodes
    assert qemu.block_jobs == [] and qemu.migration == "cancelled"
    assert qemu.status == "running" and vm.state is PowerState.POWERED_ON


async def test_copy_jobs_that_never_end_are_reported(tmp_path: Path) -> None:
    async with FakeQemu(tmp_path / "qmp.sock") as qemu:
        qemu.block_jobs.append(
            {"device": "mirror-disk0", "status": "running", "len": 1, "offset": 0}
        )
        qemu.reply("block-job-cancel", lambda _: {})  # QEMU takes the cancel, the job goes on
        qmp = QmpSession(tmp_path / "qmp.sock", "vm-a")
        await qmp.connect(timeout=5)
        try:
            with pytest.raises(QemuError, match="did not end"):
                await recovery.end_copy_jobs(qmp, timeout=0.3)
        finally:
            await qmp.close()
