"""A real server VM, as a user brings and uses one: a Debian 12 image imported onto the shared
datastore, a VM made from it and booted by SeaBIOS, configured at first boot by cloud-init
(hostname, the user's SSH key), given its address by the VM network's DHCP server, shown by the
center. Looked at over SSH as its user would: booted by GRUB from the disk (that kernel and
root=UUID= on its command line), cloud-init done from the NoCloud seed, every server unit active
and none failed, PostgreSQL's bench role by password over TCP, nginx answering; and the guest
agent answering the center. Then moved compute-only, storage-only and both while real clients
use it: an SSH session printing a line every 10 ms, wrk against nginx, pgbench against
PostgreSQL. Afterwards every committed transaction is in the database, and the powered-off disk
passes `fsck -n`.

Hostile image files are refused and change nothing.

Under TCG the guest boots in about a minute (measured: see the issue's note); one VM serves
the whole module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmotion.lab import netns, realclients, topology
from kvmotion.lab.osimage import build_os_image
from tests.lab.conftest import center_http, wait_task

pytestmark = pytest.mark.lab

SRC, DST = "172.16.0.172", "172.16.0.173"
IMAGE = "debian-12"
VM = "web1"
USER = "debian"
BOOT_TIMEOUT_S = 900
CLI = [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kvmotion")]


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


def kvmotion(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def images_dir(lab: topology.LabState) -> Path:
    return lab.shared_datastore / ".images"


def snapshot(lab: topology.LabState) -> list[tuple[str, int]]:
    folder = images_dir(lab)
    if not folder.exists():
        return []
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def hostile_files(tmp: Path) -> dict[str, tuple[Path, str | None, str]]:
    """Files a user (or an attacker) might upload as an image, and the format they claim."""
    good = tmp / "good.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(good), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 8M", str(good)], check=True,
                   capture_output=True)  # fmt: skip
    truncated = tmp / "truncated.qcow2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    shadow = tmp / "shadow.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow",
         str(shadow), "64M"], check=True,
    )  # fmt: skip
    raw = tmp / "raw-claims-qcow2.img"
    raw.write_bytes(b"\0" * (1 << 20))
    empty = tmp / "empty.qcow2"
    empty.write_bytes(b"")
    return {  # the file, the format it claims, the error the user must see
        "truncated": (truncated, None, "image_corrupt"),
        "backing-shadow": (shadow, None, "image_backing_file"),
        "raw-claims-qcow2": (raw, "qcow2", "image_format"),
        "empty": (empty, None, "image_invalid"),
    }


def test_hostile_images_are_refused_and_change_nothing(
    lab: topology.LabState, center: httpx.Client, tmp_path: Path
) -> None:
    before = snapshot(lab)
    listed = center.get("/v1/images").json()
    for name, (path, fmt, code) in hostile_files(tmp_path).items():
        args = ["image", "import", str(path), "--datastore", "shared", "--name", name]
        done = kvmotion(*args, *(["--format", fmt] if fmt else []))
        assert done.returncode != 0, f"{name} was accepted: {done.stdout}"
        assert f"error ({code}): not imported" in done.stderr, (name, done.stderr)
        assert snapshot(lab) == before, f"{name} left files behind"
    assert center.get("/v1/images").json() == listed


def vm_addresses(center: httpx.Client, vm_name: str = VM) -> tuple[list[str], str | None]:
    vm = center.get(f"/v1/vms/{vm_name}").json()
    return vm.get("addresses") or [], vm.get("addresses_source")


def wait_address(center: httpx.Client, timeout: float, vm_name: str = VM) -> tuple[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        addresses, source = vm_addresses(center, vm_name)
        v4 = [a for a in addresses if ":" not in a]
        if v4 and source is not None:
            return v4[0], source
        time.sleep(3)
    raise AssertionError(f"the center showed no address for {vm_name} in {timeout:.0f} s")


# A user's look around a freshly booted server, in one SSH login (a login costs seconds under
# TCG): one "name value" line each. It waits for cloud-init's last stage and for systemd to end
# the boot first, so nothing is judged half-started.
SERVER_CHECKS = """\
echo "cloud-init $(cloud-init status --wait | sed -n 's/^status: //p')"
echo "system $(systemctl is-system-running --wait)"
echo "units $(systemctl is-active postgresql postgresql@15-main nginx ssh qemu-guest-agent | xargs)"
echo "failed $(systemctl list-units --failed --plain --no-legend | awk '{print $1}' | xargs)"
echo "result $(tr -d '\\n' < /run/cloud-init/result.json)"
echo "hostname $(hostname)"
echo "key $(cut -d' ' -f2 ~/.ssh/authorized_keys | xargs)"
echo "pg $(PGPASSWORD=bench psql -h 127.0.0.1 -U bench -d bench -tAc 'select current_user')"
echo "listen $(ss -Hltn | awk '{print $4}' | sort | xargs)"
echo "http $( (exec 3<>/dev/tcp/127.0.0.1/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 &&
              head -n 1 <&3) | tr -d '\\r')"
echo "firmware $(test -d /sys/firmware/efi && echo uefi || echo bios)"
echo "kernel $(uname -r)"
echo "root $(findmnt -no UUID /)"
echo "cmdline $(cat /proc/cmdline)"
"""


def assert_server_configured(
    lab: topology.LabState, key: Path, address: str, hostname: str, firmware: str
) -> dict[str, str]:
    """Look around the server at ``address`` as its user (:data:`SERVER_CHECKS`) and assert it
    came up as its image and first-boot seed promise, booted by ``firmware``; what was seen."""
    out = realclients.ssh_run(lab.client_netns, key, USER, address,
                              f"bash -c {shlex.quote(SERVER_CHECKS)}", 600)  # fmt: skip
    lines = (line.partition(" ") for line in out.splitlines())
    seen = {name: value.strip() for name, _, value in lines}
    assert seen["firmware"] == firmware, seen
    # cloud-init finished, configured from the NoCloud seed (the kvmotion-made ISO), no errors
    assert seen["cloud-init"] == "done", seen
    result = json.loads(seen["result"])["v1"]
    assert result["datasource"].startswith("DataSourceNoCloud"), result
    assert result["errors"] == [], result
    assert seen["hostname"] == hostname  # from the seed
    assert seen["key"] == Path(f"{key}.pub").read_text().split()[1]
    assert seen["units"].split() == ["active"] * 5, seen
    assert seen["failed"] == "" and seen["system"] == "running", seen
    # GRUB loaded the disk's kernel (the one running) and gave it the root filesystem by UUID
    assert f"BOOT_IMAGE=/boot/vmlinuz-{seen['kernel']} " in seen["cmdline"] + " ", seen
    assert f"root=UUID={seen['root']} " in seen["cmdline"] + " ", seen
    assert seen["pg"] == "bench", seen  # the bench role, by password over TCP
    assert {"0.0.0.0:5432", "0.0.0.0:80", "0.0.0.0:22"} <= set(seen["listen"].split()), seen
    assert seen["http"].startswith("HTTP/1.1 200"), seen
    return seen


def wait_guest_agent(center: httpx.Client, address: str, timeout: float, vm_name: str) -> float:
    """Until the center shows ``vm_name``'s addresses as its guest agent reports them (over the
    VM's virtio-serial channel), ``address`` among them; seconds it took."""
    start = time.monotonic()
    while True:
        addresses, source = vm_addresses(center, vm_name)
        if source == "guest-agent" and address in addresses:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(
                f"the center showed no addresses from {vm_name}'s guest agent in "
                f"{timeout:.0f} s (last: {addresses} from {source})"
            )
        time.sleep(2)


@pytest.fixture(scope="module")
def server(lab: topology.LabState, center: httpx.Client, key: Path) -> Iterator[dict[str, Any]]:
    """The user's story up to a running server: import, create, start, reach it over SSH."""
    image = build_os_image()
    started = time.monotonic()
    done = kvmotion("image", "import", str(image.path), "--datastore", "shared", "--name", IMAGE,
                    "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    import_s = time.monotonic() - started
    done = kvmotion(
        "vm", "create", VM, "--host", SRC, "--datastore", "shared", "--image", IMAGE,
        "--memory", "1024", "--network", "vm-network", "--ssh-key", f"{key}.pub",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    assert kvmotion("vm", "start", VM).returncode == 0
    address, source = wait_address(center, BOOT_TIMEOUT_S)
    ssh_s = realclients.wait_ssh(lab.client_netns, key, USER, address, BOOT_TIMEOUT_S)
    realclients.wait_services(lab.client_netns, address, BOOT_TIMEOUT_S)
    boot_s = time.monotonic() - started
    realclients.run_pgbench(lab.client_netns, address, "-i", "-s", "1", timeout=600)
    try:
        yield {"address": address, "source": source, "import_s": import_s, "boot_s": boot_s,
               "ssh_s": ssh_s, "image": imported}  # fmt: skip
    finally:
        center.post(f"/v1/vms/{VM}/power-off")
        center.delete(f"/v1/vms/{VM}")


def test_user_reaches_the_server_at_the_address_the_center_shows(
    lab: topology.LabState, center: httpx.Client, key: Path, server: dict[str, Any]
) -> None:
    address = server["address"]
    hostname = realclients.ssh_run(lab.client_netns, key, USER, address, "hostname", 60)
    assert hostname.strip() == VM  # from the first-boot seed
    units = realclients.ssh_run(
        lab.client_netns, key, USER, address,
        "systemctl is-active nginx postgresql qemu-guest-agent ssh", 60,
    )  # fmt: skip
    assert units.split() == ["active"] * 4, units
    listed = {i["name"]: i for i in center.get("/v1/images").json()}
    assert listed[IMAGE]["vms"] == [VM] and listed[IMAGE]["datastore"] == "shared"
    # The image cannot be deleted while the VM reads through it.
    assert center.delete(f"/v1/images/{IMAGE}", params={"datastore": "shared"}).status_code == 409
    print(f"\nimport {server['import_s']:.1f} s, boot to SSH {server['boot_s']:.1f} s, "
          f"address from {server['source']}")  # fmt: skip


def test_the_server_came_up_as_its_image_and_seed_promise(
    lab: topology.LabState, center: httpx.Client, key: Path, server: dict[str, Any]
) -> None:
    """The first boot, looked at from inside over SSH (see :func:`assert_server_configured`):
    SeaBIOS and GRUB, cloud-init from the seed, the services; and the guest agent, through the
    center."""
    started = time.monotonic()
    seen = assert_server_configured(lab, key, server["address"], VM, "bios")
    agent_s = wait_guest_agent(center, server["address"], 120, VM)
    print(
        f"\nSeaBIOS guest, kernel {seen['kernel']}: configured by cloud-init, services up; "
        f"checked in {time.monotonic() - started:.1f} s (guest agent {agent_s:.1f} s)"
    )


def move_under_load(
    lab: topology.LabState, center: httpx.Client, key: Path, address: str, **body: Any
) -> dict[str, Any]:
    """One migration while the SSH ticker, wrk and pgbench run; what each client saw."""
    ns = lab.client_netns
    ticker = realclients.SshTicker(ns, key, USER, address, seconds=900).start()
    wrk = realclients.Repeat(realclients.wrk_argv(ns, f"http://{address}/", 2), run_timeout=40)
    pg = realclients.Repeat(
        realclients.pgbench_argv(ns, address, "-n", "-c", "2", "-T", "4"),
        env=realclients.pg_env(), run_timeout=60,
    )  # fmt: skip
    try:
        ticker.wait_lines(50, timeout=60)
        wrk.start()
        pg.start()
        time.sleep(6)
        begin = time.time()
        r = center.post(f"/v1/vms/{VM}/migrate", json=body)
        assert r.status_code == 202, r.text
        task = wait_task(center, r.json()["id"], deadline=900)
        end = time.time()
        time.sleep(6)
    finally:
        ssh_alive = ticker.alive  # before stop() ends it
        wrk_slices, pg_slices = wrk.stop(), pg.stop()
        ticker.stop()
    assert task["state"] == "success", task["error"]
    return {
        "task": task, "begin": begin, "end": end, "ticker": ticker, "ssh_alive": ssh_alive,
        "wrk": wrk_slices, "pg": pg_slices,
    }  # fmt: skip


def wrk_phases(slices: list[realclients.Slice], begin: float, end: float) -> dict[str, Any]:
    phases: dict[str, list[realclients.WrkResult]] = {"before": [], "during": [], "after": []}
    for s in slices:
        assert s.ok, s.output
        phase = "before" if s.end < begin else "after" if s.start > end else "during"
        phases[phase].append(realclients.parse_wrk(s.output))
    out: dict[str, Any] = {}
    for phase, results in phases.items():
        seconds = sum(r.seconds for r in results)
        out[phase] = round(sum(r.requests for r in results) / seconds, 1) if seconds else None
    every = [r for rs in phases.values() for r in rs]
    out["socket_errors"] = sum(r.socket_errors for r in every)
    out["non_2xx"] = sum(r.non_2xx for r in every)
    out["longest_stall_ms"] = max(r.max_latency_ms for r in every)
    return out


@pytest.mark.parametrize(
    "body",
    [
        {"type": "compute", "host": DST},
        {"type": "storage", "datastore": "local-173"},
        {"type": "both", "host": SRC, "datastore": "local-172"},
    ],
    ids=["compute", "storage", "both"],
)
def test_real_clients_keep_working_through_the_move(
    lab: topology.LabState, center: httpx.Client, key: Path, server: dict[str, Any],
    body: dict[str, Any],
) -> None:  # fmt: skip
    address = server["address"]
    before = realclients.count_history(lab.client_netns, address)
    seen = move_under_load(lab, center, key, address, **body)
    task, ticker = seen["task"], seen["ticker"]
    vm = center.get(f"/v1/vms/{VM}").json()
    assert vm["power_state"] == "poweredOn"
    if body["type"] != "storage":
        assert vm["host"] == body["host"]
    if body["type"] != "compute":
        assert {d["datastore"] for d in vm["config"]["disks"]} == {body["datastore"]}
        assert all(d.get("backing") is None for d in vm["config"]["disks"])  # flattened
    assert seen["ssh_alive"], f"the SSH session ended after {ticker.lines} lines"
    web = wrk_phases(seen["wrk"], seen["begin"], seen["end"])
    assert web["socket_errors"] == 0 and web["non_2xx"] == 0, web
    runs = [realclients.parse_pgbench(s.output) for s in seen["pg"]]
    assert all(s.ok for s in seen["pg"]), [s.output[-300:] for s in seen["pg"] if not s.ok]
    assert sum(r.failed for r in runs) == 0
    committed = sum(r.processed for r in runs)
    assert committed > 0
    after = realclients.count_history(lab.client_netns, address)
    assert after - before == committed, (before, after, committed)
    clock = task["summary"].get("guest_clock_step_ms")
    if body["type"] != "storage":
        assert clock is not None, "the guest agent did not set the clock after the move"
    print(
        f"\n{body['type']}: downtime {task['summary'].get('downtime_ms')} ms, SSH longest gap "
        f"{ticker.max_gap_s * 1000:.0f} ms over {ticker.lines} lines; wrk req/s before "
        f"{web['before']}, during {web['during']}, after {web['after']}, longest stall "
        f"{web['longest_stall_ms']:.0f} ms; pgbench {committed} committed, 0 failed; "
        f"guest clock step {clock} ms"
    )


class ConsoleViewer:
    """`kvmotion vm console` in a pseudo-terminal, typed into as a user would."""

    def __init__(self, vm: str) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [*CLI, "vm", "console", vm], stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.fd, self.seen, self.mark = master, b"", 0

    def expect(self, pattern: bytes, timeout: float) -> re.Match[bytes]:
        """Wait (bounded) for ``pattern`` in what the console shows past the last match."""
        end = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen[self.mark :])
            if found:
                self.mark += found.end()
                return found
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {pattern!r} on the console; its end:\n{self.text()}")
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 65536)

    def prompt(self, keys: str, pattern: bytes, tries: int, each: float) -> None:
        """Type ``keys`` until ``pattern`` shows (as a user presses Enter at a quiet console),
        at most ``tries`` times."""
        for attempt in range(tries):
            self.type(keys)
            try:
                self.expect(pattern, each)
                return
            except AssertionError:
                if attempt == tries - 1 or self.proc.poll() is not None:
                    raise

    def text(self) -> str:
        return self.seen[-3000:].decode(errors="replace")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def close(self) -> int:
        if self.proc.poll() is None:
            self.type("\x1d")  # Ctrl-]: detach
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            while select.select([self.fd], [], [], 0.2)[0]:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                self.seen += chunk
        os.close(self.fd)
        return self.proc.returncode


def test_serial_console_logs_in_and_follows_the_vm_to_its_new_host(
    lab: topology.LabState, center: httpx.Client, key: Path, server: dict[str, Any]
) -> None:
    """`kvmotion vm console`: the getty on the guest's serial port, a login, a command; a
    move with the console open (compute, or "both" once the disk is local), the console
    following the VM, a command there; Ctrl-]."""
    password = secrets.token_hex(8)
    realclients.ssh_run(lab.client_netns, key, USER, server["address"],
                        f"echo {USER}:{password} | sudo -n chpasswd", 60)  # fmt: skip
    # The serial getty starts once the boot is over (after cloud-init's last stage, which a
    # loaded TCG guest may still be in): wait for it, as a user would for a login prompt.
    realclients.ssh_run(
        lab.client_netns, key, USER, server["address"],
        "for i in $(seq 300); do systemctl is-active --quiet serial-getty@ttyS0 && exit 0; "
        "sleep 1; done; exit 1", 330,
    )  # fmt: skip
    viewer = ConsoleViewer(VM)
    try:
        viewer.expect(rb"Connected to the serial console", 30)
        viewer.prompt("\r", rf"{VM} login: ".encode(), tries=6, each=20)
        viewer.type(f"{USER}\r")
        viewer.expect(rb"Password: ", 60)
        viewer.type(f"{password}\r")
        viewer.expect(rf"{USER}@{VM}:~\$ ".encode(), 120)
        viewer.type("echo CONSOLE-$((6*7))\r")
        viewer.expect(rb"CONSOLE-42", 60)  # the shell ran it (the typed line says 6*7)
        vm = center.get(f"/v1/vms/{VM}").json()
        there = DST if vm["host"] == SRC else SRC
        body: dict[str, Any] = {"type": "compute", "host": there}
        if vm["config"]["datastore"] != "shared":  # after the "both" move: a local disk
            body |= {"type": "both", "datastore": f"local-{there.rsplit('.', 1)[1]}"}
        r = center.post(f"/v1/vms/{VM}/migrate", json=body)
        assert r.status_code == 202, r.text
        task = wait_task(center, r.json()["id"], deadline=900)
        assert task["state"] == "success", task["error"]
        viewer.expect(rf"\[kvmotion: console moved to host {re.escape(there)}\]".encode(), 60)
        viewer.type("echo MOVED-$((6*7))\r")
        viewer.expect(rb"MOVED-42", 60)
        viewer.type("exit\r")
        viewer.expect(rf"{VM} login: ".encode(), 60)
    finally:
        code = viewer.close()
    assert code == 0, viewer.text()
    assert "[console closed: detached]" in viewer.text()
    print(f"\nconsole: logged in, ran a command, followed the VM to {there}")


def test_powered_off_disk_is_clean(
    lab: topology.LabState, center: httpx.Client, key: Path, server: dict[str, Any],
    tmp_path: Path,
) -> None:  # fmt: skip
    realclients.ssh_run(lab.client_netns, key, USER, server["address"], "sync", 60)
    r = center.post(f"/v1/vms/{VM}/shutdown", timeout=180)
    assert r.status_code == 200, r.text
    disk = center.get(f"/v1/vms/{VM}").json()["config"]["disks"][0]
    root = {"shared": lab.shared_datastore} | {h.local_datastore.name: h.local_datastore
                                                 for h in lab.hosts}  # fmt: skip
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(root[disk["datastore"]] / disk["path"]),
                    str(raw)], check=True, timeout=600)  # fmt: skip
    loop = subprocess.run(["losetup", "-f", "--show", "-P", "-r", str(raw)], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        # A kernel that leaves partitions to user space (no udev here): partx adds them.
        subprocess.run(["partx", "-a", loop], capture_output=True, check=False)
        parts = sorted(Path("/dev").glob(f"{Path(loop).name}p*"))
        kinds = {
            p: subprocess.run(["blkid", "-o", "value", "-s", "TYPE", str(p)],
                              capture_output=True, text=True).stdout.strip()
            for p in parts
        }  # fmt: skip
        ext4 = [p for p, kind in kinds.items() if kind == "ext4"]
        assert ext4, kinds
        fsck = subprocess.run(["fsck.ext4", "-n", str(ext4[0])], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        print(f"\nfsck.ext4 -n {ext4[0]}: {fsck.stdout.strip().splitlines()[-1]}")
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert netns.netns_exists(lab.client_netns)
