"""A fake QEMU for unit tests of a host's VMs: a QMP server on a unix socket, a process stand-in,
and the host operations of :class:`~kvmotion.host.vmstate.VmEnvironment` built on them.

:class:`FakeQemu` speaks QMP as QEMU does, as far as ``qemu.qmp``'s client checks it
(qemu/qmp/qmp_client.py, models.py): a greeting ``{"QMP": {"version": ..., "capabilities":
[]}}``, then only ``qmp_capabilities`` until it is sent; each reply carries the command's ``id``,
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``; events carry a ``timestamp``.
The client writes JSON objects with no separator, so they are parsed as a stream; replies end in
CRLF, as QEMU's do.

It keeps the state a VM's QEMU would report (``status``: running, paused, finish-migrate,
postmigrate, inmigrate...; ``migration``: none, setup, active, pre-switchover, completed, failed,
cancelled) and changes it as QEMU does on ``cont``, ``stop``, ``migrate``, ``migrate-continue``,
``migrate_cancel``, ``migrate-incoming`` and ``quit``, with the events QEMU sends (RESUME, STOP,
MIGRATION, SHUTDOWN). Its block layer holds the VM's disk devices, the nodes they use and mirror
jobs (``blockdev-add``/``-del``/``-mirror``, ``block-job-complete`` pivots a device onto its copy,
``block-job-cancel`` of a READY mirror ends it consistent without pivoting, ``yank``), with the
BLOCK_JOB_* events; a test makes a copy READY (:meth:`FakeQemu.mirrors_ready`).

A test sets the state, scripts a reply (:meth:`FakeQemu.reply`) and reads
what was sent (:attr:`FakeQemu.commands`). A command it does not know is refused as QEMU refuses
one (``CommandNotFound``), so code that sends something unexpected fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmotion.qemu.cmdline import QemuLaunch

JSON = dict[str, Any]

GREETING: JSON = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
        "capabilities": [],
    }
}
# Where a migration is still under way (QEMU's ``migration_is_running``).
MIGRATING = (
    "setup", "active", "pre-switchover", "device", "cancelling",
    "postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover",
)  # fmt: skip
SUN_PATH_MAX = 107  # sockaddr_un's sun_path, without its terminating NUL


class QmpFailure(Exception):
    """A scripted reply may raise this: QEMU answers with an error of ``kind``."""

    def __init__(self, desc: str, kind: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.kind = kind


Reply = Callable[[JSON], Any]


def failing(desc: str, kind: str = "GenericError") -> Reply:
    """A scripted reply: QEMU refuses the command with ``desc``."""

    def answer(_: JSON) -> Any:
        raise QmpFailure(desc, kind)

    return answer


class FakeProcess:
    """Stands in for :class:`~kvmotion.qemu.process.QemuProcess`: no process, an event."""

    def __init__(self, pid: int = 4242) -> None:
        self.pid = pid
        self.killed = False
        self._ended = asyncio.Event()

    def alive(self) -> bool:
        return not self._ended.is_set()

    def end(self) -> None:
        self._ended.set()

    async def wait_exit(self, timeout: float | None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
        return not self.alive()

    async def kill(self, timeout: float = 10.0) -> None:
        self.killed = True
        self.end()


class FakeQemu:
    """One VM's QEMU as QMP shows it. Use as ``async with FakeQemu(path) as qemu:``."""

    def __init__(
        self, socket_path: Path, *, status: str = "running", migration: str = "none"
    ) -> None:
        if len(str(socket_path)) > SUN_PATH_MAX:
            raise ValueError(f"unix socket path too long for the kernel: {socket_path}")
        self.socket_path = socket_path
        self.status = status  # query-status
        self.migration = migration  # query-migrate's status; "none": QEMU answers {}
        # QEMU restarts a guest that it stopped for the switchover when the migration is
        # cancelled (migration_iteration_finish); False: a QEMU that leaves it paused.
        self.resume_on_cancel = True
        self.block_jobs: list[JSON] = []
        self.devices: dict[str, str] = {}  # disk device id (virtio-disk0) -> the node it uses
        self.nodes: dict[str, JSON] = {}  # node name -> {"file": path or NBD URI, "size": n}
        self.yanked: list[str] = []  # nodes whose connections were yanked
        self.nbd_serving = False
        self.capabilities: dict[str, bool] = {}
        self.parameters: JSON = {}
        self.process = FakeProcess()
        self.received: list[tuple[str, JSON]] = []
        self._scripted: dict[str, Reply] = {}
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, bool] = {}  # -> negotiated
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what a test uses ------------------------------------------------------------------------
    @property
    def commands(self) -> list[str]:
        """The commands received, in order (``qmp_capabilities`` included)."""
        return [name for name, _ in self.received]

    def reply(self, command: str, answer: Reply) -> None:
        """Answer ``command`` with ``answer(arguments)`` (which may raise QmpFailure)."""
        self._scripted[command] = answer

    def emit(self, event: str, data: JSON | None = None) -> None:
        """Send an event to every negotiated client, as QEMU does."""
        now = time.time()
        msg: JSON = {
            "event": event,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        if data is not None:
            msg["data"] = data
        for writer, negotiated in list(self._clients.items()):
            if negotiated:
                self._send(writer, msg)

    def set_status(self, status: str) -> None:
        """Change the run state, with the STOP or RESUME event QEMU sends."""
        was_running, self.status = self.status == "running", status
        if was_running and status != "running":
            self.emit("STOP")
        elif not was_running and status == "running":
            self.emit("RESUME")

    def set_migration(self, status: str) -> None:
        """Change the migration's status, with its MIGRATION event."""
        self.migration = status
        self.emit("MIGRATION", {"status": status})

    def pause_before_switchover(self) -> None:
        """The source with pause-before-switchover: the guest stopped, waiting for continue."""
        self.set_status("finish-migrate")
        self.set_migration("pre-switchover")

    def add_disk(self, index: int, node: str, path: str, size: int = 2**30) -> None:
        """Disk ``index`` as QEMU opens it from the command line: a format node on a file."""
        self.nodes[node] = {"file": path, "size": size}
        self.nodes[f"{node}-file"] = {"file": path, "size": size}
        self.devices[f"virtio-disk{index}"] = node

    def mirrors_ready(self) -> None:
        """Every running mirror job has copied its disk and now tracks the guest's writes."""
        for job in self.block_jobs:
            if job["status"] == "running":
                job |= {"status": "ready", "ready": True, "offset": job["len"]}
                self.emit("BLOCK_JOB_READY", self._job_event(job))

    def switch_to_postcopy(self) -> None:
        """The source after migrate-start-postcopy: the guest stopped here, runs there."""
        self.set_status("finish-migrate")
        self.set_migration("postcopy-active")

    def complete_incoming(self) -> None:
        """The destination: the whole stream arrived (the guest waits for ``cont`` with -S)."""
        self.set_status("paused")
        self.set_migration("completed")

    # -- the server ------------------------------------------------------------------------------
    async def __aenter__(self) -> FakeQemu:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.socket_path))

    async def close(self) -> None:
        """Stop listening, hang up on every client, end the process."""
        if self._server is not None:
            self._server.close()
        self._hang_up()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self.socket_path.unlink(missing_ok=True)
        self.process.end()

    def _hang_up(self) -> None:
        for writer in list(self._clients):
            writer.close()
        self._clients.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients[writer] = False
        self._send(writer, GREETING)
        decoder = json.JSONDecoder()
        pending = ""
        try:
            while chunk := await reader.read(65536):
                pending += chunk.decode()
                while pending.strip():
                    try:
                        msg, end = decoder.raw_decode(pending.lstrip())
                    except json.JSONDecodeError:
                        break  # the rest of the object is still on its way
                    pending = pending.lstrip()[end:]
                    self._answer(writer, msg)
        except ConnectionError:
            pass
        finally:
            self._clients.pop(writer, None)
            writer.close()

    def _send(self, writer: asyncio.StreamWriter, msg: JSON) -> None:
        if not writer.is_closing():
            writer.write(json.dumps(msg).encode() + b"\r\n")

    def _answer(self, writer: asyncio.StreamWriter, msg: JSON) -> None:
        name = str(msg.get("execute") or msg.get("exec-oob"))
        args: JSON = msg.get("arguments") or {}
        reply: JSON
        try:
            reply = {"return": self._run(writer, name, args)}
        except QmpFailure as exc:
            reply = {"error": {"class": exc.kind, "desc": exc.desc}}
        if "id" in msg:
            reply["id"] = msg["id"]
        self._send(writer, reply)
        if name == "quit" and "error" not in reply:
            # QEMU answers, says SHUTDOWN, hangs up and exits.
            self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            self._hang_up()
            if self._server is not None:
                self._server.close()
            self.process.end()

    def _run(self, writer: asyncio.StreamWriter, name: str, args: JSON) -> Any:
        if not self._clients.get(writer):
            if name != "qmp_capabilities":
                raise QmpFailure(
                    "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
                )
            self._clients[writer] = True
            self.received.append((name, args))
            return {}
        self.received.append((name, args))
        if name in self._scripted:
            return self._scripted[name](args)
        handler = getattr(self, "_cmd_" + name.replace("-", "_"), None)
        if handler is None:
            raise QmpFailure(f"The command {name} has not been found", "CommandNotFound")
        return handler(args)

    # -- QEMU's behaviour, as far as kvmotion depends on it --------------------------------------
    def _cmd_qmp_capabilities(self, _: JSON) -> Any:
        raise QmpFailure(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
        )

    def _cmd_query_status(self, _: JSON) -> Any:
        return {"status": self.status, "running": self.status == "running", "singlestep": False}

    def _cmd_query_migrate(self, _: JSON) -> Any:
        if self.migration == "none":
            return {}
        info: JSON = {"status": self.migration}
        if self.migration == "setup" and self.status == "inmigrate":
            info["socket-address"] = [{"type": "inet", "host": "127.0.0.1", "port": "49152"}]
        if self.migration == "postcopy-recover-setup":
            info["socket-address"] = [{"type": "inet", "host": "127.0.0.1", "port": "49153"}]
        if self.migration == "completed":
            info |= {"total-time": 1500, "downtime": 30, "setup-time": 2}
            info["ram"] = {"transferred": 2**20, "remaining": 0, "total": 2**20}
        return info

    def _cmd_cont(self, _: JSON) -> Any:
        if self.status == "finish-migrate" and self.migration.startswith("postcopy"):
            raise QmpFailure("Migration is not finalized yet")  # measured on QEMU 10.0
        if self.status == "inmigrate" and self.migration != "completed":
            return {}  # QEMU only remembers to start the guest once the stream is in
        self.set_status("running")
        return {}

    def _cmd_stop(self, _: JSON) -> Any:
        if self.status == "running":
            self.set_status("paused")
        return {}

    def _cmd_migrate_set_capabilities(self, args: JSON) -> Any:
        if self.migration in MIGRATING:
            raise QmpFailure("There's a migration process in progress")
        wanted = self.capabilities | {c["capability"]: c["state"] for c in args["capabilities"]}
        if wanted.get("multifd") and wanted.get("postcopy-ram"):
            raise QmpFailure("Postcopy is not yet compatible with multifd")  # QEMU 10.0
        if wanted.get("postcopy-preempt") and not wanted.get("postcopy-ram"):
            raise QmpFailure("Postcopy preempt requires postcopy-ram")
        self.capabilities = wanted
        return {}

    def _cmd_migrate_set_parameters(self, args: JSON) -> Any:
        self.parameters |= args
        return {}

    def _cmd_migrate(self, args: JSON) -> Any:
        if args.get("resume"):
            if self.migration != "postcopy-paused":
                raise QmpFailure("Cannot resume if there is no paused migration")
            self.set_migration("postcopy-recover")
            self.set_migration("postcopy-active")
            return {}
        if self.migration in MIGRATING:
            raise QmpFailure("There's a migration process in progress")
        self.set_migration("setup")
        self.set_migration("active")
        return {}

    def _cmd_migrate_incoming(self, _: JSON) -> Any:
        if self.status != "inmigrate":
            raise QmpFailure("The incoming migration has already been started")
        self.set_migration("setup")
        return {}

    def _cmd_migrate_continue(self, args: JSON) -> Any:
        if self.migration != args.get("state"):
            raise QmpFailure(f"Migration not in expected state: {self.migration}")
        self.set_migration("device")
        self.set_status("postmigrate")
        self.set_migration("completed")
        return {}

    def _cmd_migrate_start_postcopy(self, _: JSON) -> Any:
        if not self.capabilities.get("postcopy-ram"):
            raise QmpFailure(
                "Enable postcopy with migrate_set_capability before the start of migration"
            )
        return {}

    def _cmd_migrate_pause(self, _: JSON) -> Any:
        if self.migration != "postcopy-active":
            raise QmpFailure(
                "migrate-pause is currently only supported during postcopy-active state"
            )
        self.set_migration("postcopy-paused")
        return {}

    def _cmd_migrate_recover(self, _: JSON) -> Any:
        if self.migration != "postcopy-paused":
            raise QmpFailure("Migrate recover can only be run when postcopy is paused.")
        self.set_migration("postcopy-recover-setup")
        return {}

    def _cmd_migrate_cancel(self, _: JSON) -> Any:
        if self.migration.startswith("postcopy"):
            raise QmpFailure("Postcopy migration in progress, cannot cancel.")  # QEMU 10.0
        if self.migration in MIGRATING:
            self.set_migration("cancelling")
            self.set_migration("cancelled")
            if self.status == "finish-migrate":
                self.set_status("running" if self.resume_on_cancel else "paused")
        return {}

    def _cmd_announce_self(self, _: JSON) -> Any:
        return {}

    def _cmd_quit(self, _: JSON) -> Any:
        return {}

    def _cmd_query_block_jobs(self, _: JSON) -> Any:
        return [{k: v for k, v in j.items() if not k.startswith("_")} for j in self.block_jobs]

    def _job(self, device: str) -> JSON:
        job = next((j for j in self.block_jobs if j["device"] == device), None)
        if job is None:
            raise QmpFailure(f"Block job '{device}' not found", "DeviceNotActive")
        return job

    @staticmethod
    def _job_event(job: JSON) -> JSON:
        return {"device": job["device"], "type": job.get("type", "mirror"), "len": job["len"],
                "offset": job["offset"], "speed": 0}  # fmt: skip

    def _cmd_block_job_cancel(self, args: JSON) -> Any:
        job = self._job(args["device"])
        self.block_jobs.remove(job)
        if job["status"] == "ready" and not args.get("force"):
            # A READY mirror cancelled gracefully ends with its target a consistent copy.
            self.emit("BLOCK_JOB_COMPLETED", self._job_event(job))
        else:
            self.emit("BLOCK_JOB_CANCELLED", self._job_event(job))
        return {}

    def _cmd_block_job_complete(self, args: JSON) -> Any:
        job = self._job(args["device"])
        if job["status"] != "ready":
            raise QmpFailure(f"The active block job '{job['device']}' cannot be completed")
        self.block_jobs.remove(job)
        for device, node in self.devices.items():
            if node == job["_source"]:
                self.devices[device] = job["_target"]  # the pivot
        self.emit("BLOCK_JOB_COMPLETED", self._job_event(job))
        return {}

    def _cmd_query_block(self, _: JSON) -> Any:
        return [
            {"device": "", "qdev": f"/machine/peripheral/{device}/virtio-backend",
             "inserted": {"node-name": node, "file": self.nodes[node]["file"]}}
            for device, node in self.devices.items()
        ]  # fmt: skip

    def _cmd_query_named_block_nodes(self, _: JSON) -> Any:
        return [
            {"node-name": name, "file": n["file"], "image": {"virtual-size": n["size"]}}
            for name, n in self.nodes.items()
        ]

    def _cmd_blockdev_add(self, args: JSON) -> Any:
        file = args.get("file")
        if isinstance(file, dict):
            self._cmd_blockdev_add(file)
            where = str(file.get("filename"))
        elif args["driver"] == "nbd":
            server = args["server"]
            where = f"nbd://{server['host']}:{server['port']}/{args['export']}"
        else:
            where = str(args.get("filename"))
        if args["node-name"] in self.nodes:
            raise QmpFailure(f"Duplicate nodes with node-name='{args['node-name']}'")
        self.nodes[args["node-name"]] = {"file": where, "size": 0}
        return {}

    def _cmd_blockdev_del(self, args: JSON) -> Any:
        name = args["node-name"]
        if name not in self.nodes:
            raise QmpFailure(f"Failed to find node with node-name='{name}'")
        if name in self.devices.values():
            raise QmpFailure(f"Node '{name}' is busy: block device is in use by a guest device")
        del self.nodes[name]
        return {}

    def _cmd_blockdev_mirror(self, args: JSON) -> Any:
        source, target = args["device"], args["target"]
        if source not in self.nodes or target not in self.nodes:
            raise QmpFailure(f"Cannot find device='{source}' nor node-name='{source}'")
        if any(j["device"] == args["job-id"] for j in self.block_jobs):
            raise QmpFailure(f"Job ID '{args['job-id']}' already in use")
        size = self.nodes[source]["size"]
        self.block_jobs.append(
            {"device": args["job-id"], "type": "mirror", "status": "running", "ready": False,
             "offset": 0, "len": size, "_source": source, "_target": target}
        )  # fmt: skip
        return {}

    def _cmd_yank(self, args: JSON) -> Any:
        self.yanked += [i["node-name"] for i in args["instances"]]
        return {}

    def _cmd_nbd_server_stop(self, _: JSON) -> Any:
        if not self.nbd_serving:
            raise QmpFailure("NBD server not running")
        self.nbd_serving = False
        return {}


class FakeHost:
    """The host operations of a VmEnvironment, faked: each QEMU "started" is a FakeQemu on the
    launch's QMP socket; taps are names in a dict. Close it at the end of a test."""

    def __init__(self) -> None:
        self.qemus: dict[Path, FakeQemu] = {}  # by pidfile
        self.launches: list[QemuLaunch] = []
        self.taps: dict[str, str] = {}  # name -> bridge
        self.taps_deleted: list[str] = []

    async def start_qemu(self, launch: QemuLaunch) -> FakeProcess:
        self.launches.append(launch)
        qemu = FakeQemu(launch.qmp_socket, status="inmigrate" if launch.incoming else "running")
        for i, disk in enumerate(launch.disks):
            qemu.add_disk(i, disk.node, str(disk.path))
        await qemu.start()
        self.qemus[launch.pidfile] = qemu
        return qemu.process

    def find_qemu(self, pidfile: Path, uuid: str) -> FakeProcess | None:
        qemu = self.qemus.get(pidfile)
        return qemu.process if qemu is not None and qemu.process.alive() else None

    async def left_running(
        self, pidfile: Path, socket: Path, *, status: str, migration: str = "none"
    ) -> FakeQemu:
        """A QEMU that an earlier agent started (for :meth:`VirtualMachine.attach`)."""
        qemu = FakeQemu(socket, status=status, migration=migration)
        await qemu.start()
        self.qemus[pidfile] = qemu
        return qemu

    async def create_tap(self, name: str, bridge: str) -> None:
        self.taps[name] = bridge

    async def delete_tap(self, name: str) -> None:
        self.taps.pop(name, None)
        self.taps_deleted.append(name)

    async def close(self) -> None:
        for qemu in self.qemus.values():
            await qemu.close()
