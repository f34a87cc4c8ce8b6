"""Hostile input through the CLI: every command here must exit non-zero with one line saying what
is wrong (no traceback, no raw exception), and change nothing in the center or on its hosts.

Two kinds of refusal: the CLI's own (typer's usage errors, exit 2, for a value no command could
send: a number out of range, a name that cannot be a URL's path segment), and the center's,
which the CLI prints as ``error (code): message`` with the exit code of its kind (3 refused,
4 not found). The center is real (its app under uvicorn on 127.0.0.1, SQLite, the executor), as
in test_center_cli.py; its agents are the fakes of fake_agent.py: nothing leaves the process's
loopback.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from kvmotion.center.api import create_app
from kvmotion.center.service import Center, CenterConfig
from kvmotion.cli.main import app
from tests.databases import DatabaseServer
from tests.unit.fake_agent import PORT, FakeAgents
from tests.unit.fake_agent import TOKEN as AGENT_TOKEN

SRC, DST = "172.16.0.172", "172.16.0.173"
TOKEN = "center-token"
LONG = "a" * 10_000
NOT_UTF8 = b"vm-\xff".decode(errors="surrogateescape")  # what Python makes of a non-UTF-8 argv
CREATE = ("vm", "create")
AT = ("--host", SRC, "--datastore", "shared")
MIGRATE = ("vm", "migrate", "vm-a", "--host", DST)

# (id, arguments, exit code, what the error line must say: the center's code in parentheses,
# or for the CLI's own refusals a piece of typer's one-line message)
CASES: list[tuple[str, tuple[str, ...], int, str]] = [
    # -- names --------------------------------------------------------------------------------
    ("name with /", (*CREATE, "a/b", *AT), 3, "(invalid_input)"),
    ("name ..", (*CREATE, "..", *AT), 3, "(invalid_input)"),
    ("name with NUL", (*CREATE, "a\x00b", *AT), 3, "(invalid_input)"),
    ("name with escape sequence", (*CREATE, "a\x1b[31mred", *AT), 3, "(invalid_input)"),
    ("name ending in a newline", (*CREATE, "vm-nl\n", *AT), 3, "(invalid_input)"),
    ("10,000-character name", (*CREATE, LONG, *AT), 3, "(invalid_input)"),
    ("non-ASCII name", (*CREATE, "vm-é", *AT), 3, "(invalid_input)"),
    ("name that looks like markup", (*CREATE, "[/x]", *AT), 3, "(invalid_input)"),
    ("name not UTF-8", (*CREATE, NOT_UTF8, *AT), 3, "not UTF-8"),
    ("datastore with ..", (*CREATE, "vm-new", "--host", SRC, "--datastore", "../shared"), 3,
     "(invalid_input)"),
    ("network with /", (*CREATE, "vm-new", *AT, "--network", "a/b"), 3, "(invalid_input)"),
    ("unknown host", (*CREATE, "vm-new", "--host", "a/b", "--datastore", "shared"), 4,
     "(host_not_found)"),
    ("show a name with /", ("vm", "show", "a/b"), 2, "cannot be a name"),
    ("show ..", ("vm", "show", ".."), 2, "cannot be a name"),
    ("show .", ("vm", "show", "."), 2, "cannot be a name"),
    ("start ..", ("vm", "start", ".."), 2, "cannot be a name"),
    ("delete .", ("vm", "delete", ".", "--yes"), 2, "cannot be a name"),
    ("show a name with NUL", ("vm", "show", "a\x00b"), 3, "(invalid_input)"),
    ("show a 10,000-character name", ("vm", "show", LONG), 4, "(vm_not_found)"),
    ("show a name not UTF-8", ("vm", "show", NOT_UTF8), 3, "not UTF-8"),
    ("host show ..", ("host", "show", ".."), 2, "cannot be a name"),
    ("host show a/b", ("host", "show", "a/b"), 2, "cannot be a name"),
    ("host evc-modes [/x]", ("host", "evc-modes", "[/x]"), 2, "cannot be a name"),
    ("cluster show ..", ("cluster", "show", ".."), 2, "cannot be a name"),
    ("cluster add-host ..", ("cluster", "add-host", "Cluster", ".."), 2, "cannot be a name"),
    ("cluster create a/b", ("cluster", "create", "a/b"), 3, "(invalid_input)"),
    ("cluster create 10,000 characters", ("cluster", "create", LONG), 3, "(invalid_input)"),
    ("EVC mode not a key", ("cluster", "set-evc", "Cluster", "INVALID!"), 3, "(invalid_input)"),
    ("EVC mode with NUL", ("vm", "set-evc", "vm-off", "x\x00"), 3, "(invalid_input)"),
    ("host address ..", ("host", "add", "..", "--agent-token", "t"), 3, "(invalid_input)"),
    # -- numbers ------------------------------------------------------------------------------
    ("negative memory", (*CREATE, "vm-new", *AT, "--memory", "-1"), 2, "'--memory'"),
    ("huge memory", (*CREATE, "vm-new", *AT, "--memory", "9" * 20), 3, "(invalid_input)"),
    ("memory not a number", (*CREATE, "vm-new", *AT, "--memory", "lots"), 2, "'--memory'"),
    ("no vCPUs", (*CREATE, "vm-new", *AT, "--vcpus", "0"), 2, "'--vcpus'"),
    ("huge disk", (*CREATE, "vm-new", *AT, "--disk-mib", "9" * 12), 3, "(invalid_input)"),
    ("negative downtime", (*MIGRATE, "--downtime-ms", "-5"), 2, "'--downtime-ms'"),
    ("huge downtime", (*MIGRATE, "--downtime-ms", "99999999"), 2, "'--downtime-ms'"),
    ("bandwidth past inf", (*MIGRATE, "--max-bandwidth-mbit", "1e400"), 2, "not a finite"),
    ("bandwidth inf", (*MIGRATE, "--max-bandwidth-mbit", "inf"), 2, "not a finite"),
    ("bandwidth nan", (*MIGRATE, "--max-bandwidth-mbit", "nan"), 2, "'--max-bandwidth-mbit'"),
    ("deadline inf", (*MIGRATE, "--deadline", "inf"), 2, "not a finite"),
    ("negative deadline", (*MIGRATE, "--deadline", "-1"), 2, "'--deadline'"),
    ("port out of range", ("host", "add", SRC, "--agent-token", "t", "--port", "70000"), 2,
     "'--port'"),
    ("task limit 0", ("task", "list", "--limit", "0"), 2, "'--limit'"),
    # -- unknown ids, wrong values, wrong states ----------------------------------------------
    ("unknown task", ("task", "show", "999999"), 4, "(task_not_found)"),
    ("huge task id", ("task", "show", "9" * 23), 3, "(invalid_input)"),
    ("negative task id", ("task", "show", "-1"), 2, "No such option"),
    ("task id not a number", ("task", "show", "abc"), 2, "'task_id'"),
    ("cancel an unknown task", ("task", "cancel", "424242"), 4, "(task_not_found)"),
    ("watch an unknown task", ("task", "watch", "424242"), 4, "(task_not_found)"),
    ("unknown priority", (*MIGRATE, "--priority", "urgent"), 3, "(invalid_input)"),
    ("unknown migration type", (*MIGRATE, "--type", "teleport"), 2, "'--type'"),
    ("migrate to nowhere", ("vm", "migrate", "vm-a"), 3, "(invalid_input)"),
    ("migrate to datastore ../x", ("vm", "migrate", "vm-a", "--datastore", "../x"), 3,
     "(invalid_input)"),
    ("migrate to host ..", ("vm", "migrate", "vm-a", "--host", ".."), 4, "(host_not_found)"),
    ("register a powered-off VM where it is", ("vm", "migrate", "vm-off", "--host", SRC), 3,
     "(invalid_input)"),
    ("migrate to its own host", ("vm", "migrate", "vm-a", "--host", SRC), 3, "(same_host)"),
    ("start a running VM", ("vm", "start", "vm-a"), 3, "(wrong_state)"),
    ("delete a running VM", ("vm", "delete", "vm-a", "--yes"), 3, "(wrong_state)"),
]  # fmt: skip


@dataclass(frozen=True)
class RunningCenter:
    url: str
    agents: FakeAgents
    http: httpx.Client  # for looking at the center between commands
    lab_dir: Path  # an empty directory: the machine's lab center is never found


@pytest.fixture(scope="module")
def center(database_server: DatabaseServer) -> Iterator[RunningCenter]:
    tmp = Path(tempfile.mkdtemp(prefix="kvmotion-cli-hostile-"))
    db_url = database_server.fresh()
    agents = FakeAgents(SRC, DST)
    agents.add_vm(SRC, "vm-a")
    agents.add_vm(SRC, "vm-off", power_state="poweredOff")
    service = Center(
        CenterConfig(db_url=db_url, token=TOKEN, refresh_interval_s=3600),
        transport=agents,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), log_level="warning", lifespan="on", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the center did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with httpx.Client(base_url=url, headers=AUTH, trust_env=False, timeout=20) as http:
            for host in (SRC, DST):
                body = {"address": host, "token": AGENT_TOKEN, "port": PORT}
                assert http.post("/v1/hosts", json=body).status_code == 201
            assert http.post("/v1/clusters", json={"name": "Cluster"}).status_code in (201, 409)
            (tmp / "lab").mkdir()
            yield RunningCenter(url, agents, http, tmp / "lab")
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        database_server.drop(db_url)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def state(center: RunningCenter) -> dict[str, Any]:
    """What a refusal must leave as it was: the center's inventory and tasks, and the requests
    that could change a host (anything but a GET) its agents carried out."""
    paths = ("/v1/vms", "/v1/hosts", "/v1/tasks", "/v1/clusters", "/v1/datastores")
    seen = {p: center.http.get(p).raise_for_status().json() for p in paths}
    for host in seen["/v1/hosts"]:
        host.pop("last_seen", None)
        host.pop("facts", None)
    seen["agents"] = [
        (c.host, c.method, c.path)
        for c in center.agents.calls
        if c.method != "GET" and c.status is not None and c.status < 400  # done, not refused
    ]
    return seen


@pytest.fixture(scope="module")
def initial(center: RunningCenter) -> dict[str, Any]:
    return state(center)


@pytest.mark.parametrize(
    ("args", "exit_code", "says"),
    [c[1:] for c in CASES],
    ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CASES)],
)
def test_refused_in_one_line_and_nothing_changed(
    center: RunningCenter,
    initial: dict[str, Any],
    args: tuple[str, ...],
    exit_code: int,
    says: str,
) -> None:
    env = {
        "COLUMNS": "200",  # typer's usage errors are boxed to the terminal's width
        "KVMOTION_CENTER_URL": None,
        "KVMOTION_CENTER_TOKEN": None,
        "KVMOTION_LAB_DIR": str(center.lab_dir),
    }
    result = CliRunner().invoke(app, [*args, "--center", center.url, "--token", TOKEN], env=env)
    output = result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"raw exception {result.exception!r}"
    )
    assert "Traceback" not in output + result.stdout
    assert result.exit_code == exit_code, (result.exit_code, output)
    lines = [line for line in output.splitlines() if says in line]
    assert len(lines) == 1, output
    if exit_code == 2:  # typer's usage error: the line says which option or argument, and why
        assert "Invalid value" in lines[0] or "No such option" in lines[0], output
    else:  # the center's refusal, or the CLI's own: one line, nothing else
        assert output.strip() == lines[0].strip() and lines[0].startswith("error ("), output
        assert len(lines[0]) >= 25, output
    assert TOKEN not in output
    assert state(center) == initial  # every case changes nothing: the state stays the first
