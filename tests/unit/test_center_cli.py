"""The center's CLI (`host`, `vm`, `task`) against a real center whose agents are fakes.

The center (its FastAPI app, database, executor) runs under uvicorn on 127.0.0.1 in a thread; the
CLI reaches it over HTTP, as a user's shell would. The agents behind it are one small fake app
(behind an ``httpx.ASGITransport``: nothing leaves the process) that completes a migration after
``MIGRATION_S``, or after ``SLOW_MIGRATION_S`` for VMs named ``slow-*``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from typer.testing import CliRunner, Result

from kvmotion.center.api import create_app
from kvmotion.center.service import Center, CenterConfig
from kvmotion.cli.main import app
from kvmotion.cli.progress import cancel_and_wait, snapshot, timeline
from kvmotion.errors import Conflict, NotFound
from kvmotion.host.protocol import HOST_FACTS, VM_INFO, facts_json
from kvmotion.host.protocol import vm_json as info_json
from kvmotion.host.vmconfig import VmConfig, VmCreateRequest
from kvmotion.httpapi import bearer_checker, install_error_handlers
from tests.databases import DatabaseServer
from tests.unit.fake_agent import etag

TOKEN = "center-token"
AGENT_TOKEN = "agent-token"
HOSTS = {"172.16.0.172": "10.250.0.172", "172.16.0.173": "10.250.0.173"}  # name -> migration
H1, H2 = HOSTS
RAM = 256 * 2**20
MIGRATION_S = 0.4
SLOW_MIGRATION_S = 60.0
WAIT_S = 20.0  # the longest any test waits for anything


# -- fake agents --------------------------------------------------------------------------------
@dataclass
class FakeVm:
    config: dict[str, Any]
    config_path: str
    power_state: str = "poweredOff"
    migration: dict[str, Any] | None = None
    started: float | None = None  # source: when the migration started
    dest: str | None = None  # source: the destination host

    def info(self) -> dict[str, Any]:
        on = self.power_state == "poweredOn"
        status = "running" if on else "inmigrate" if self.power_state == "incoming" else None
        info = {
            "uuid": self.config["uuid"],
            "name": self.config["name"],
            "power_state": self.power_state,
            "qemu_status": status,
            "pid": 4242 if on or status else None,
            "config_path": self.config_path,
            "config": self.config,
            "migration": self.migration,
            "cpu": None,
            "storage": None,
            "incoming": self.power_state == "incoming",
        }
        return info_json(VM_INFO.validate_python(info))  # the real agent's shape, or fail here


def _stats(status: str, elapsed: float, duration: float) -> dict[str, Any]:
    done = status == "completed"
    sent = RAM + RAM // 8 if done else int(RAM * min(elapsed / duration, 0.99))
    return {
        "status": status,
        "total_time_ms": round(elapsed * 1000),
        "setup_time_ms": 3,
        "downtime_ms": 12 if done else None,
        "expected_downtime_ms": 30,
        "transferred_bytes": sent,
        "remaining_bytes": 0 if done else RAM - sent,
        "total_bytes": RAM,
        "dirty_pages_rate": 100,
        "page_size": 4096,
        "mbps": 800.0,
        "passes": 3 if done else 1,
        "throttle_pct": 0,
        "error": None,
    }


class FakeAgents:
    """Every host's agent in one app; the request's host name says which host answers."""

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, FakeVm]] = {h: {} for h in HOSTS}
        self.app = self._build()

    def find(self, host: str, ref: str) -> FakeVm:
        for vm in self.vms[host].values():
            if ref in (vm.config["uuid"], vm.config["name"]):
                return vm
        raise NotFound(f"no VM {ref!r} on {host}", code="vm_not_found")

    def advance(self) -> None:
        """Complete migrations whose time has come (the destination resumes the guest)."""
        for host, vms in self.vms.items():
            for vm in vms.values():
                if vm.started is None or vm.dest is None or vm.migration is None:
                    continue
                if vm.migration["phase"] != "active":
                    continue
                slow = vm.config["name"].startswith("slow")
                duration = SLOW_MIGRATION_S if slow else MIGRATION_S
                elapsed = time.time() - vm.started
                if elapsed < duration:
                    vm.migration["stats"] = _stats("active", elapsed, duration)
                    continue
                t0 = vm.started
                vm.migration.update(
                    phase="completed",
                    stats=_stats("completed", elapsed, duration),
                    marks={**vm.migration["marks"], "stunned": t0 + duration - 0.02,
                           "completed": t0 + duration},
                    samples=[{"t": 0.01 * i, "pass_no": i, "transferred_bytes": RAM // i,
                              "remaining_bytes": 0, "dirty_rate_bps": 409600,
                              "throughput_bps": 1e8, "expected_downtime_ms": 30,
                              "throttle_pct": 0} for i in (1, 2, 3)],
                )  # fmt: skip
                dest = self.find(vm.dest, vm.config["uuid"])
                dest.power_state = "poweredOn"
                dest.migration = {"side": "destination", "phase": "resumed",
                                  "marks": {"resumed": t0 + duration - 0.01}}  # fmt: skip
                assert host != vm.dest

    def facts(self, host: str) -> dict[str, Any]:
        vms = self.vms[host].values()
        return facts_json(HOST_FACTS.validate_python({
            "name": host, "hostname": f"fake-{host}", "management_address": host,
            "migration_address": HOSTS[host],
            "cpu": {"vendor": "GenuineIntel", "model_name": "Fake CPU", "count": 4, "flags": []},
            "memory": {"total_bytes": 16 * 2**30, "available_bytes": 8 * 2**30},
            "cpu_model": {}, "migration_link_bps": None,
            "migration_tls": {"mode": "off", "ready": True},
            "accel": "tcg", "accel_reason": "fake agent", "qemu_version": "9.2.0",
            "machine_type": "pc-q35-9.2", "default_cpu_model": "qemu64",
            "datastores": [{"name": "shared", "path": "/fake/shared", "shared": True,
                            "capacity_bytes": 2**40, "free_bytes": 2**39, "accessible": True}],
            "networks": [{"name": "vm-network", "bridge": "br-vm", "present": True}],
            "vms": len(vms), "vms_powered_on": sum(v.power_state == "poweredOn" for v in vms),
        }))  # fmt: skip

    def _build(self) -> FastAPI:
        fake = FastAPI()
        install_error_handlers(fake)

        async def advance() -> None:
            self.advance()

        deps = [Depends(bearer_checker(AGENT_TOKEN, "fake agent")), Depends(advance)]

        def host_of(request: Request) -> str:
            return str(request.url.hostname)

        @fake.get("/v1/host", dependencies=deps)
        async def facts(request: Request) -> dict[str, Any]:
            return self.facts(host_of(request))

        @fake.get("/v1/vms", dependencies=deps)
        async def list_vms(request: Request) -> list[dict[str, Any]]:
            return [v.info() for v in self.vms[host_of(request)].values()]

        @fake.post("/v1/vms", dependencies=deps, status_code=201)
        async def create_vm(request: Request, req: VmCreateRequest) -> dict[str, Any]:
            host = host_of(request)
            if any(v.config["name"] == req.name for v in self.vms[host].values()):
                raise Conflict(f"VM {req.name} exists", code="name_taken")
            if req.datastore != "shared":
                raise NotFound(f"no datastore {req.datastore!r}", code="datastore_not_found")
            config = VmConfig.from_request(req, cpu_model="qemu64", machine_type="pc-q35-9.2")
            vm = FakeVm(config.model_dump(mode="json"), f"/fake/shared/{req.name}/vm.json")
            self.vms[host][config.uuid] = vm
            return vm.info()

        @fake.get("/v1/vms/{ref}", dependencies=deps)
        async def get_vm(
            request: Request, ref: str, response: Response, after: str = "", wait: float = 0
        ) -> dict[str, Any]:
            """Tagged as the agent does; a long-poll looks again every 20 ms."""
            deadline = time.monotonic() + wait
            if after:  # its figures change with the clock: at most 50 answers a second
                await asyncio.sleep(0.02)
            info = self.find(host_of(request), ref).info()
            while etag(info) == after and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                self.advance()
                info = self.find(host_of(request), ref).info()
            response.headers["ETag"] = f'"{etag(info)}"'
            return info

        @fake.delete("/v1/vms/{ref}", dependencies=deps, status_code=204)
        async def delete_vm(request: Request, ref: str) -> None:
            vm = self.find(host_of(request), ref)
            if vm.power_state != "poweredOff":
                raise Conflict(f"VM {ref} is {vm.power_state}", code="wrong_power_state")
            del self.vms[host_of(request)][vm.config["uuid"]]

        def power(request: Request, ref: str, state: str) -> FakeVm:
            vm = self.find(host_of(request), ref)
            vm.power_state = state
            vm.migration = None
            return vm

        @fake.post("/v1/vms/{ref}/power-on", dependencies=deps)
        async def power_on(request: Request, ref: str) -> dict[str, Any]:
            return power(request, ref, "poweredOn").info()

        @fake.post("/v1/vms/{ref}/shutdown", dependencies=deps)
        async def shutdown(request: Request, ref: str) -> dict[str, Any]:
            return {"vm": power(request, ref, "poweredOff").info(), "how": "guest"}

        @fake.post("/v1/vms/{ref}/power-off", dependencies=deps)
        async def power_off(request: Request, ref: str) -> dict[str, Any]:
            return power(request, ref, "poweredOff").info()

        @fake.post("/v1/migrations/incoming", dependencies=deps, status_code=201)
        async def incoming(request: Request, body: dict[str, Any]) -> dict[str, Any]:
            host = host_of(request)
            vm = FakeVm(body["config"], body["config_path"], power_state="incoming")
            vm.migration = {"side": "destination", "phase": "listening", "marks": {}}
            self.vms[host][vm.config["uuid"]] = vm
            return {"vm": vm.info(), "uri": f"tcp:{HOSTS[host]}:49152"}

        @fake.post("/v1/vms/{ref}/migrate", dependencies=deps, status_code=202)
        async def migrate(request: Request, ref: str, body: dict[str, Any]) -> dict[str, Any]:
            vm = self.find(host_of(request), ref)
            address = body["uri"].split(":")[1]
            vm.dest = next(h for h, a in HOSTS.items() if a == address)
            vm.started = time.time()
            vm.migration = {"side": "source", "phase": "active", "uri": body["uri"],
                            "stats": _stats("active", 0.0, 1.0), "samples": [],
                            "marks": {"migrate_started": vm.started,
                                      "first_byte": vm.started + 0.005}}  # fmt: skip
            return vm.info()

        @fake.post("/v1/vms/{ref}/migration/finish", dependencies=deps)
        async def finish(request: Request, ref: str) -> dict[str, list[str]]:
            vm = self.find(host_of(request), ref)
            del self.vms[host_of(request)][vm.config["uuid"]]  # step 5: gone from the source
            return {"problems": []}

        @fake.post("/v1/vms/{ref}/migration/abort", dependencies=deps)
        async def abort(request: Request, ref: str) -> dict[str, str]:
            vm = self.find(host_of(request), ref)
            if vm.power_state == "incoming":
                del self.vms[host_of(request)][vm.config["uuid"]]
                return {"done": "destination ended"}
            if vm.migration is not None:
                vm.migration["phase"] = "cancelled"
            return {"done": "source kept running"}

        return fake


# -- the center, in a thread ------------------------------------------------------------------
@dataclass(frozen=True)
class RunningCenter:
    url: str
    agents: FakeAgents
    lab_dir: Path  # an empty center directory: the real lab's center is never found


RUNNER = CliRunner()


def cli(center: RunningCenter, *args: str, token: str = TOKEN, **env: str | None) -> Result:
    """`kvmotion ARGS --center URL --token TOKEN`, isolated from the machine's lab and env."""
    environ: dict[str, str | None] = {
        "COLUMNS": "200",
        "KVMOTION_CENTER_URL": None,
        "KVMOTION_CENTER_TOKEN": None,
        "KVMOTION_LAB_DIR": str(center.lab_dir),
        **env,
    }
    where = ["--center", center.url, "--token", token] if token else []
    return RUNNER.invoke(app, [*args, *where], env=environ)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def center(
    tmp_path_factory: pytest.TempPathFactory, database_server: DatabaseServer
) -> Iterator[RunningCenter]:
    tmp = tmp_path_factory.mktemp("center")
    db_url = database_server.fresh()
    agents = FakeAgents()
    service = Center(
        CenterConfig(db_url=db_url, token=TOKEN),
        transport=httpx.ASGITransport(app=agents.app),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), log_level="warning", lifespan="on", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the center did not start"
            time.sleep(0.05)
        (tmp / "lab").mkdir()
        running = RunningCenter(f"http://127.0.0.1:{port}", agents, tmp / "lab")
        for host in HOSTS:  # `kvmotion host add`, as a user adds hosts
            result = ok(cli(running, "host", "add", host, "--agent-token", AGENT_TOKEN))
            assert f"added host {host}" in result.stdout
        yield running
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()
        assert not thread.is_alive(), "the center did not stop"
        database_server.drop(db_url)


def running_vm(center: RunningCenter, name: str, host: str = H1) -> None:
    ok(cli(center, "vm", "create", name, "--host", host, "--datastore", "shared",
           "--memory", "128", "--network", "vm-network"))  # fmt: skip
    ok(cli(center, "vm", "start", name))


def vm_json(center: RunningCenter, name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ok(cli(center, "vm", "show", name, "--json")).stdout)
    return result


def one_line_error(result: Result, code: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"({code})" in lines[0], result.stderr
    return lines[0]


# -- hosts ------------------------------------------------------------------------------------
def test_host_list_show_and_add_twice(center: RunningCenter) -> None:
    out = ok(cli(center, "host", "list")).stdout
    assert H1 in out and H2 in out and "connected" in out and "10.250.0.172" in out
    hosts = json.loads(ok(cli(center, "host", "list", "--json")).stdout)
    assert sorted(h["name"] for h in hosts) == sorted(HOSTS)
    out = ok(cli(center, "host", "show", H2)).stdout
    assert "shared" in out and "vm-network" in out and "GenuineIntel" in out
    assert json.loads(ok(cli(center, "host", "show", H2, "--json")).stdout)["name"] == H2
    again = cli(center, "host", "add", H1, "--agent-token", AGENT_TOKEN)
    assert again.exit_code == 3
    one_line_error(again, "host_exists")


def test_host_add_with_a_wrong_agent_token_is_refused(center: RunningCenter) -> None:
    result = cli(center, "host", "add", H1, "--agent-token", "nope")
    assert result.exit_code == 5  # the agent refused the center: nothing was added
    one_line_error(result, "unauthorized")


# -- VMs --------------------------------------------------------------------------------------
def test_vm_create_list_show_power_delete(center: RunningCenter) -> None:
    out = ok(cli(center, "vm", "create", "vm-life", "--host", H2, "--datastore", "shared",
                 "--memory", "64", "--vcpus", "2", "--disk-mib", "16", "--network", "vm-network",
                 "--kernel-args", "quiet")).stdout  # fmt: skip
    assert "created VM vm-life" in out and "poweredOff" in out
    assert "vm-life" in ok(cli(center, "vm", "list")).stdout
    info = vm_json(center, "vm-life")
    assert info["host"] == H2 and info["config"]["vcpus"] == 2
    assert info["config"]["memory_mib"] == 64 and info["config"]["kernel_args"] == "quiet"
    assert info["config"]["disks"][0]["size_mib"] == 16
    assert "vm-network" in ok(cli(center, "vm", "show", "vm-life")).stdout
    assert "poweredOn" in ok(cli(center, "vm", "start", "vm-life")).stdout
    assert "vm-life" in json.loads(ok(cli(center, "host", "show", H2, "--json")).stdout)["vms"]
    assert "poweredOff" in ok(cli(center, "vm", "stop", "vm-life")).stdout
    assert vm_json(center, "vm-life")["power_state"] == "poweredOff"
    ok(cli(center, "vm", "start", "vm-life"))
    off = json.loads(ok(cli(center, "vm", "poweroff", "vm-life", "--json")).stdout)
    assert off["power_state"] == "poweredOff"
    assert cli(center, "vm", "delete", "vm-life").exit_code == 1  # asks; no answer: aborted
    assert vm_json(center, "vm-life")["name"] == "vm-life"
    assert "deleted VM vm-life" in ok(cli(center, "vm", "delete", "vm-life", "--yes")).stdout
    listed = json.loads(ok(cli(center, "vm", "list", "--json")).stdout)
    assert "vm-life" not in [v["name"] for v in listed]


def test_vm_create_with_bad_input_is_refused(center: RunningCenter) -> None:
    result = cli(center, "vm", "create", "bad/name", "--host", H1, "--datastore", "shared")
    assert result.exit_code == 3
    assert "VM name" in one_line_error(result, "invalid_input")


def test_unknown_vm_is_exit_4_in_one_line(center: RunningCenter) -> None:
    for args in (("vm", "show", "nope"), ("vm", "start", "nope"),
                 ("vm", "migrate", "nope", "--host", H2)):  # fmt: skip
        result = cli(center, *args)
        assert result.exit_code == 4, result.output
        assert "nope" in one_line_error(result, "vm_not_found")


def test_wrong_token_is_exit_5(center: RunningCenter) -> None:
    result = cli(center, "vm", "list", token="wrong")
    assert result.exit_code == 5
    one_line_error(result, "unauthorized")


def test_a_center_that_does_not_answer_says_so(center: RunningCenter) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once this block ends: nothing listens there
    result = cli(dataclasses.replace(center, url=f"http://127.0.0.1:{port}"), "vm", "list")
    assert result.exit_code == 1
    assert "did not answer" in one_line_error(result, "host_unreachable")


def test_center_from_environment_then_lab_then_nowhere(
    center: RunningCenter, tmp_path: Path
) -> None:
    env_center = dataclasses.replace(center, lab_dir=tmp_path)
    by_env = cli(env_center, "vm", "list", "--json", token="",
                 KVMOTION_CENTER_URL=center.url, KVMOTION_CENTER_TOKEN=TOKEN)  # fmt: skip
    assert isinstance(json.loads(ok(by_env).stdout), list)
    nowhere = cli(env_center, "vm", "list", token="")
    assert nowhere.exit_code == 3
    assert "--center" in one_line_error(nowhere, "no_center")
    (tmp_path / "center").mkdir()
    state = {"url": center.url, "token": TOKEN, "pid": 1, "start_ticks": None}
    (tmp_path / "center" / "state.json").write_text(json.dumps(state))
    ok(cli(env_center, "host", "list", token=""))  # the lab's center, found through its state


# -- migrations and tasks -----------------------------------------------------------------------
def test_migrate_shows_timeline_and_summary_and_moves_the_vm(center: RunningCenter) -> None:
    running_vm(center, "vm-move")
    result = ok(cli(center, "vm", "migrate", "vm-move", "--host", H2, "--downtime-ms", "50"))
    out = result.stdout
    for step in ("requested", "prepared", "precopy", "stunned", "resumed", "source_removed"):
        assert step in out
    assert "+0 ms" in out and "QEMU downtime" in out and "12 ms" in out
    assert "request → first byte" in out and f"now runs on {H2}" in out
    assert vm_json(center, "vm-move")["host"] == H2
    assert all(v.config["name"] != "vm-move" for v in center.agents.vms[H1].values())
    tasks = json.loads(ok(cli(center, "task", "list", "--json")).stdout)
    task = next(t for t in tasks if t["target"] == "vm-move")
    assert task["state"] == "success" and task["request"]["downtime_ms"] == 50


def test_migrate_json_prints_the_final_task(center: RunningCenter) -> None:
    running_vm(center, "vm-json")
    task = json.loads(ok(cli(center, "vm", "migrate", "vm-json", "--host", H2, "--json")).stdout)
    assert task["state"] == "success" and task["summary"]["downtime_ms"] == 12
    steps = [s.name for s in timeline(task)]
    assert steps[0] == "requested" and steps[-1] == "source_removed"
    assert {"prepared", "precopy", "stunned", "resumed"} <= set(steps)


def test_dry_run_refused_exits_3_and_changes_nothing(center: RunningCenter) -> None:
    running_vm(center, "vm-dry")
    before = ok(cli(center, "task", "list", "--json")).stdout
    result = cli(center, "vm", "migrate", "vm-dry", "--host", H1, "--dry-run")
    assert result.exit_code == 3
    assert "same_host" in result.stdout and "nothing changed" in result.stdout
    as_json = cli(center, "vm", "migrate", "vm-dry", "--host", H1, "--dry-run", "--json")
    assert as_json.exit_code == 3
    found = json.loads(as_json.stdout)
    assert not found["ok"] and [e["code"] for e in found["errors"]] == ["same_host"]
    assert ok(cli(center, "task", "list", "--json")).stdout == before
    assert vm_json(center, "vm-dry")["host"] == H1
    assert (
        "precheck passed"
        in ok(cli(center, "vm", "migrate", "vm-dry", "--host", H2, "--dry-run")).stdout
    )
    refused = cli(center, "vm", "migrate", "vm-dry", "--host", H1)
    assert refused.exit_code == 3
    one_line_error(refused, "same_host")
    assert ok(cli(center, "task", "list", "--json")).stdout == before


def test_task_list_and_show(center: RunningCenter) -> None:
    running_vm(center, "vm-task")
    started = json.loads(
        ok(cli(center, "vm", "migrate", "vm-task", "--host", H2, "--no-wait", "--json")).stdout
    )
    watched = json.loads(ok(cli(center, "task", "watch", str(started["id"]), "--json")).stdout)
    assert watched["state"] == "success"
    out = ok(cli(center, "task", "list")).stdout
    assert "vm-task" in out and "success" in out
    out = ok(cli(center, "task", "show", str(started["id"]))).stdout
    assert "timeline" in out and "summary" in out and "samples: 3" in out and "resumed" in out
    shown = json.loads(ok(cli(center, "task", "show", str(started["id"]), "--json")).stdout)
    assert shown["id"] == started["id"] and len(shown["samples"]) == 3
    missing = cli(center, "task", "show", "99999")
    assert missing.exit_code == 4
    one_line_error(missing, "task_not_found")
    ended = cli(center, "task", "cancel", str(started["id"]))
    assert ended.exit_code == 3
    one_line_error(ended, "task_ended")


def test_cancel_leaves_the_vm_on_its_source(center: RunningCenter) -> None:
    running_vm(center, "slow-cancel")
    out = ok(cli(center, "vm", "migrate", "slow-cancel", "--host", H2, "--no-wait")).stdout
    assert "kvmotion task watch" in out
    task_id = str(wait_for_target(center, "slow-cancel", "active")["id"])
    assert "cancel requested" in ok(cli(center, "task", "cancel", task_id)).stdout
    result = cli(center, "task", "watch", task_id, "--timeout", str(WAIT_S))
    assert result.exit_code == 1
    assert "cancelled" in one_line_error(result, "cancelled")
    info = vm_json(center, "slow-cancel")
    assert info["host"] == H1 and info["power_state"] == "poweredOn"
    assert all(v.config["name"] != "slow-cancel" for v in center.agents.vms[H2].values())


# `python -m kvmotion ARGS` as a terminal's shell starts it: SIGINT at its default. A process
# started in the background by a non-interactive shell (CI's runner does) begins with SIGINT
# ignored, its children inherit that, and Python then never raises KeyboardInterrupt: this is
# why the Ctrl-C test once failed in CI only (issue 13).
AS_FROM_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'kvmotion', *sys.argv[1:]])"
)


def test_ctrl_c_during_migrate_cancels_the_task(center: RunningCenter) -> None:
    """Ctrl-C as a user presses it: SIGINT to the CLI's own process while it shows the progress."""
    running_vm(center, "slow-interrupt")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVMOTION_")}
    environ |= {"KVMOTION_LAB_DIR": str(center.lab_dir), "COLUMNS": "200"}
    argv = [sys.executable, "-c", AS_FROM_A_TERMINAL, "vm", "migrate", "slow-interrupt",
            "--host", H2, "--center", center.url, "--token", TOKEN]  # fmt: skip
    with subprocess.Popen(
        argv, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as user:
        try:
            task = wait_for_target(center, "slow-interrupt", "active")
            time.sleep(1.0)  # the CLI is following the task now
            assert user.poll() is None, user.communicate()
            user.send_signal(signal.SIGINT)
            stdout, stderr = user.communicate(timeout=WAIT_S)
        finally:
            if user.poll() is None:
                user.kill()
    assert user.returncode == 1, (user.returncode, stdout, stderr)
    assert f"interrupted: cancelling task {task['id']}" in stderr, stderr
    assert f"task {task['id']} was cancelled" in stderr, stderr
    assert "Traceback" not in stderr
    assert vm_json(center, "slow-interrupt")["host"] == H1
    [ended] = [t for t in _tasks(center) if t["id"] == task["id"]]
    assert ended["state"] == "cancelled", ended


def _tasks(center: RunningCenter) -> list[dict[str, Any]]:
    with httpx.Client(trust_env=False, timeout=5) as http:
        r = http.get(f"{center.url}/v1/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
        result: list[dict[str, Any]] = r.raise_for_status().json()
        return result


def wait_for_target(center: RunningCenter, target: str, phase: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for task in _tasks(center):
            if task["target"] == target and task["phase"] == phase:
                return task
        time.sleep(0.05)
    raise AssertionError(f"no task for {target} reached phase {phase}")


# -- reading a task (pure) ----------------------------------------------------------------------
def test_snapshot_and_timeline_read_a_task() -> None:
    task = {
        "state": "running",
        "phase": "active",
        "progress": 40.0,
        "summary": {"throughput_mbps": 800.0, "remaining_bytes": 300_000_000, "passes": 2},
        "timeline": [
            {"step": "precopy", "time": 100.25},
            {"step": "requested", "time": 100.0},
            {"step": "prepared", "time": 100.2, "detail": "listening at tcp:10.0.0.2:1"},
        ],
    }
    snap = snapshot(task)
    assert snap.mbytes_per_s == 100.0 and snap.pass_no == 2 and snap.eta_s == 3.0
    steps = timeline(task)
    assert [(s.name, s.offset_ms) for s in steps] == [
        ("requested", 0), ("prepared", 200), ("precopy", 250),
    ]  # fmt: skip
    assert "tcp:10.0.0.2:1" in steps[1].text
    assert snapshot({"state": "queued"}).eta_s is None


async def test_ctrl_c_past_undoing_says_why_and_waits_for_the_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C during the switchover: the center refuses the cancel, the CLI says why and reports
    the task as it ends (here: done, the VM on its destination)."""

    class Refusing:
        async def cancel_task(self, task_id: int) -> dict[str, Any]:
            raise Conflict(
                "too late to cancel: the guest is stunned for its switchover",
                code="too_late_to_cancel",
            )

        async def task(self, task_id: int) -> dict[str, Any]:
            return {"id": task_id, "state": "success"}

    task = await cancel_and_wait(Refusing(), 7, timeout_s=5)  # type: ignore[arg-type]
    assert task["state"] == "success"
    assert "task 7: too late to cancel: the guest is stunned" in capsys.readouterr().err
