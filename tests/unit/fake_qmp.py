"""A fake QEMU for unit tests of a host's VMs: a QMP server on a unix socket, a process stand-in,
and the host operations of :class:`~kvmotion.host.vm.VmEnvironment` built on them.

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
MIGRATION, SHUTDOWN). A test sets the state, scripts a reply (:meth:`FakeQemu.reply`) and reads
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
MIGRATING = ("setup", "active", "pre-switchover", "device", "postcopy-active", "cancelling")
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
        if self.migration == "completed":
            info |= {"total-time": 1500, "downtime": 30, "setup-time": 2}
            info["ram"] = {"transferred": 2**20, "remaining": 0, "total": 2**20}
        return info

    def _cmd_cont(self, _: JSON) -> Any:
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
        self.capabilities |= {c["capability"]: c["state"] for c in args["capabilities"]}
        return {}

    def _cmd_migrate_set_parameters(self, args: JSON) -> Any:
        self.parameters |= args
        return {}

    def _cmd_migrate(self, _: JSON) -> Any:
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

    def _cmd_migrate_cancel(self, _: JSON) -> Any:
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
        return list(self.block_jobs)

    def _cmd_block_job_cancel(self, args: JSON) -> Any:
        job = next((j for j in self.block_jobs if j["device"] == args["device"]), None)
        if job is None:
            raise QmpFailure(f"Block job '{args['device']}' not found", "DeviceNotActive")
        self.block_jobs.remove(job)
        self.emit("BLOCK_JOB_CANCELLED", {"device": job["device"], "type": job.get("type")})
        return {}

    def _cmd_query_named_block_nodes(self, _: JSON) -> Any:
        return []

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
