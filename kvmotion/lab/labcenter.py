"""The lab's center: a `kvmotion center serve` in the root namespace, with the lab's hosts added.

The root namespace is the lab's admin workstation: it is on the management network (172.16.0.1)
and runs the center on 127.0.0.1, where the CLI finds it. ``lab up`` starts it (idempotent) and
adds every lab host the way a user would (``POST /v1/hosts``); ``lab down`` stops it and removes
its database.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from kvmotion import pki
from kvmotion.center.service import DEFAULT_CENTER_PORT, CenterConfig
from kvmotion.errors import LabError
from kvmotion.lab import netns
from kvmotion.lab.topology import LabState, lab_dir

Log = Callable[[str], None]
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class LabCenter:
    url: str
    token: str
    pid: int
    start_ticks: int | None
    ca_file: str | None = None  # the lab's CA, which signed the center's certificate (https)

    def tls(self) -> ssl.SSLContext | None:
        """What a client verifies the center with: the lab's CA, or None for plain http."""
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None


def center_dir() -> Path:
    return lab_dir() / "center"


def load_center() -> LabCenter | None:
    try:
        return LabCenter(**json.loads((center_dir() / "state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _running(center: LabCenter) -> bool:
    return netns.pid_alive(center.pid) and (
        center.start_ticks is None or netns.process_start_ticks(center.pid) == center.start_ticks
    )


def _healthy(center: LabCenter) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=1.0, verify=center.tls() or True) as client:
            return client.get(f"{center.url}/v1/health").status_code == 200
    except httpx.HTTPError:
        return False


def ensure_center(state: LabState, log: Log) -> LabCenter:
    """Start the lab's center unless it runs, and add the lab's hosts to it."""
    center = load_center()
    tls_changed = center is not None and (
        (center.ca_file is None) != state.api_plaintext or _other_ca(state)
    )
    if center is None or not _running(center) or tls_changed:
        if center is not None and _running(center):
            netns.terminate(center.pid, grace=5.0)  # the lab turned HTTPS on or off, or its CA
        center = _start(state, log)
    _add_hosts(center, state, log)
    return center


def _other_ca(state: LabState) -> bool:
    """Whether the center's certificate is from another CA than the lab's (the lab was taken
    down and built again without its center): it is issued again."""
    try:
        return (center_dir() / "tls" / pki.CA_CERT).read_bytes() != state.ca_file.read_bytes()
    except FileNotFoundError:
        return False


def _start(state: LabState, log: Log) -> LabCenter:
    directory = center_dir()
    directory.mkdir(parents=True, exist_ok=True)
    old = load_center()
    token = old.token if old is not None else secrets.token_urlsafe(32)
    tls_dir = directory / "tls"
    if _other_ca(state):
        shutil.rmtree(tls_dir)
    if not state.api_plaintext and pki.missing_files(tls_dir):
        # The center's certificate, from the lab's CA (`lab up` made it): the name the CLI and
        # the browser use (127.0.0.1) and the root namespace's address on the management network.
        pki.issue_host(state.ca_dir, tls_dir, "center", ["127.0.0.1", state.root_address])
    config = CenterConfig(
        port=DEFAULT_CENTER_PORT,
        # KVMOTION_LAB_DB_URL: run the lab's center on another database (PostgreSQL)
        db_url=os.environ.get("KVMOTION_LAB_DB_URL")
        or f"sqlite+aiosqlite:///{directory / 'center.db'}",
        token=token,
        refresh_interval_s=3.0,
        stall_timeout_s=10.0,  # a cut migration link in the lab shows within seconds
        migrations_per_host=2,  # TCG guests on a machine of a few cores
        api_plaintext=state.api_plaintext,
        tls_dir=tls_dir,
    )
    config_path = directory / "center.json"
    config.save(config_path)
    argv = [sys.executable, "-m", "kvmotion", "center", "serve", "--config", str(config_path)]
    with (directory / "center.log").open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    netns.adopt_child(proc)
    center = LabCenter(
        f"{'http' if state.api_plaintext else 'https'}://{config.listen}:{config.port}",
        token,
        proc.pid,
        netns.process_start_ticks(proc.pid),
        None if state.api_plaintext else str(state.ca_file),
    )
    state_path = directory / "state.json"
    state_path.write_text(json.dumps(asdict(center)))
    state_path.chmod(0o600)
    deadline = time.monotonic() + START_TIMEOUT
    while not _healthy(center):
        if not _running(center) or time.monotonic() > deadline:
            raise LabError(f"the lab's center did not start; see {directory / 'center.log'}")
        time.sleep(0.2)
    log(f"started the center at {center.url}: pid {center.pid}")
    return center


def _add_hosts(center: LabCenter, state: LabState, log: Log) -> None:
    headers = {"Authorization": f"Bearer {center.token}"}
    verify = center.tls() or True
    with httpx.Client(
        base_url=center.url, headers=headers, trust_env=False, timeout=30, verify=verify
    ) as http:
        known = {h["name"] for h in http.get("/v1/hosts").raise_for_status().json()}
        for host in state.hosts:
            if host.name in known:
                continue
            body = {"address": host.management_address, "token": state.token}
            r = http.post("/v1/hosts", json=body)
            if r.status_code != 201:
                raise LabError(f"the center could not add host {host.name}: {r.text[:300]}")
            log(f"added host {host.name} to the center")


def stop_center(log: Log) -> None:
    center = load_center()
    if center is not None and _running(center):
        if not netns.terminate(center.pid, grace=5.0):
            raise LabError(f"the lab's center (pid {center.pid}) survived SIGKILL")
        log(f"stopped the center (pid {center.pid})")
    shutil.rmtree(center_dir(), ignore_errors=True)
