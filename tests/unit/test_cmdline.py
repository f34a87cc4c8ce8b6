from pathlib import Path

import pytest

from kvmotion.host.facts import parse_machine_types
from kvmotion.qemu.cmdline import (
    TCG_RAM_PAD_KIB,
    DiskLaunch,
    NicLaunch,
    QemuLaunch,
    build_command,
    ram_pad_kib,
)


def launch(**kw: object) -> QemuLaunch:
    base: dict[str, object] = dict(
        name="vm-a",
        uuid="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        vcpus=2,
        memory_mib=256,
        machine_type="pc-q35-7.2",
        accel="tcg",
        cpu_model="qemu64",
        qmp_socket=Path("/run/x/qmp.sock"),
        pidfile=Path("/run/x/qemu.pid"),
        console_log=Path("/run/x/console.log"),
        console_socket=Path("/run/x/console.sock"),
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd.img"),
        append="console=ttyS0",
        disks=(DiskLaunch("disk0", Path("/ds/vm-a/vm-a.qcow2")),),
        nics=(NicLaunch("net0", "kt1b4e28ba0", "52:54:00:1b:4e:28"),),
    )
    base.update(kw)
    return QemuLaunch(**base)  # type: ignore[arg-type]


def test_command_pins_machine_and_devices() -> None:
    argv = build_command(launch())
    joined = " ".join(argv)
    assert "-machine pc-q35-7.2 -accel tcg,thread=single" in joined
    assert "-daemonize" in argv and "-nodefaults" in argv
    assert "virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1" in joined
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:1b:4e:28,id=net0-dev" in joined
    assert "-incoming" not in argv


def test_destination_waits_paused_for_incoming() -> None:
    argv = build_command(launch(incoming=True))
    assert argv[-3:] == ["-incoming", "defer", "-S"]


def test_same_config_same_devices_on_both_sides() -> None:
    src = build_command(launch())
    dst = build_command(launch(incoming=True))
    assert src == dst[: len(src)]


def test_padded_ram_is_not_a_multiple_of_256_kib() -> None:
    """QEMU 7.2's whole-word bitmap sync skips the TCG TLB reset; an odd size avoids it."""
    size = build_command(launch(memory_mib=1024, ram_pad_kib=TCG_RAM_PAD_KIB))
    value = size[size.index("-m") + 1]
    assert value.endswith("k")
    kib = int(value[:-1])
    assert kib > 1024 * 1024 and kib % 256 != 0 and kib % 8 == 0  # QEMU rounds -m to 8 KiB
    exact = build_command(launch(memory_mib=1024))
    assert exact[exact.index("-m") + 1] == "1024M"


@pytest.mark.parametrize(
    ("version", "accel", "pad"),
    [
        ("7.2.22", "tcg", TCG_RAM_PAD_KIB),
        ("8.2.2", "tcg", TCG_RAM_PAD_KIB),
        ("9.0.0", "tcg", 0),
        ("10.0.2", "tcg", 0),
        ("7.2.22", "kvm", 0),
        ("unknown", "tcg", TCG_RAM_PAD_KIB),  # a QEMU that does not say: the safe size
    ],
)
def test_only_tcg_before_9_0_is_padded(version: str, accel: str, pad: int) -> None:
    assert ram_pad_kib(version, accel) == pad


def test_the_host_binary_runs() -> None:
    argv = build_command(launch(binary="/opt/qemu-7.2/qemu-system-x86_64"))
    assert argv[0] == "/opt/qemu-7.2/qemu-system-x86_64"


def test_machine_types_are_read_from_qemus_help() -> None:
    text = (
        "Supported machines are:\n"
        "microvm              microvm (i386)\n"
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
        "pc-q35-7.2           Standard PC (Q35 + ICH9, 2009) (default)\n"
        "none                 empty machine\n"
    )
    assert parse_machine_types(text) == ("microvm", "pc", "pc-q35-7.2")
    assert parse_machine_types("") == ()


def test_image_vm_boots_its_disk_with_seed_and_guest_agent() -> None:
    """A VM from an OS image: no -kernel (the firmware boots disk 0), the seed read-only after
    the disks (so the image's disk stays vda), and the guest agent's channel."""
    argv = build_command(
        launch(
            kernel=None, initrd=None, append="",
            seed=Path("/ds/vm-a/cidata.iso"), guest_agent_socket=Path("/run/x/qga.sock"),
        )
    )  # fmt: skip
    joined = " ".join(argv)
    assert "-kernel" not in argv and "-append" not in argv
    assert "filename=/ds/vm-a/cidata.iso,node-name=seed-file,read-only=on" in joined
    assert joined.index("id=virtio-disk0") < joined.index("id=virtio-seed")
    assert "socket,id=qga0,path=/run/x/qga.sock,server=on,wait=off" in joined
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in joined


def test_serial_port_is_a_socket_logged_whether_attached_or_not() -> None:
    """The console attaches to a unix socket; QEMU logs every byte (it also logs what it could
    not send while no one is attached), which the agent replays to a console that opens."""
    joined = " ".join(build_command(launch()))
    assert (
        "socket,id=console0,path=/run/x/console.sock,server=on,wait=off,"
        "logfile=/run/x/console.log" in joined
    )
    assert "-serial chardev:console0" in joined
    assert "-vnc" not in joined and "VGA" not in joined  # no screen unless asked


def test_a_vm_with_graphics_has_a_vga_card_and_vnc_on_a_unix_socket() -> None:
    argv = build_command(launch(vnc_socket=Path("/run/x/vnc.sock")))
    assert argv[argv.index("-vnc") + 1] == "unix:/run/x/vnc.sock"
    assert "VGA,id=video0" in argv
