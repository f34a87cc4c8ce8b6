"""HTTPS on the management plane (mgmttls.py): the refusal without certificates, and the agent's
real API served by uvicorn over TLS, verified with the cluster CA and refused without it."""

import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from kvmotion import pki
from kvmotion.center.api import serve as serve_center
from kvmotion.center.service import Center, CenterConfig
from kvmotion.cli.main import app
from kvmotion.errors import InvalidInput
from kvmotion.host.agent import HostAgent
from kvmotion.host.api import create_app, serve
from kvmotion.host.config import HostConfig
from kvmotion.host.ha import HostHa
from kvmotion.host.protocol import HaSettingsIn
from kvmotion.mgmttls import agent_url, agents_context, client_context, server_tls

TOKEN = "t0ken-over-tls"


def _config(tmp_path: Path, tls_dir: Path) -> HostConfig:
    return HostConfig(
        name="h172", management_address="127.0.0.1", token=TOKEN, run_dir=tmp_path / "run",
        tls_dir=tls_dir, accel="tcg",
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_agent_refuses_to_start_without_certificates(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path / "no-tls")
    with pytest.raises(
        InvalidInput, match=re.escape("kvmotion tls issue --host h172 --address 127.0.0.1")
    ):
        await serve(HostAgent(config), "127.0.0.1", _free_port())


def test_plaintext_only_when_asked(tmp_path: Path) -> None:
    assert server_tls(tmp_path / "no-tls", plaintext=True, issue_hint="") == {}


@pytest.fixture
def tls_agent(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    pki.create_ca(tmp_path / "ca")
    pki.issue_host(tmp_path / "ca", tmp_path / "agent-tls", "h172", ["127.0.0.1"])
    pki.issue_host(tmp_path / "ca", tmp_path / "center-tls", "center", ["127.0.0.1"])
    config = _config(tmp_path, tmp_path / "agent-tls")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(HostAgent(config)), log_level="warning", access_log=False,
            **server_tls(config.tls_dir, config.api_plaintext, ""),
        )
    )  # fmt: skip
    # In a thread, as test_center_cli runs its center: uvicorn leaves signal handlers alone there
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.02)
        yield f"https://127.0.0.1:{sock.getsockname()[1]}", tmp_path / "center-tls"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


async def test_agent_serves_https_verified_by_the_ca(tls_agent: tuple[str, Path]) -> None:
    url, center_tls = tls_agent
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(verify=client_context(center_tls), headers=headers) as http:
        assert (await http.get(f"{url}/v1/host")).status_code == 200
        assert (
            await http.get(f"{url}/v1/host", headers={"Authorization": "Bearer x"})
        ).status_code == 401
    async with httpx.AsyncClient() as stranger:  # the system store does not know the cluster CA
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await stranger.get(f"{url}/v1/host", headers=headers)
    async with httpx.AsyncClient() as plain:  # and it does not speak plaintext
        with pytest.raises(httpx.HTTPError):
            await plain.get(url.replace("https://", "http://") + "/v1/host", headers=headers)


async def test_center_adds_and_refreshes_a_host_over_https(
    tls_agent: tuple[str, Path], tmp_path: Path
) -> None:
    url, center_tls = tls_agent
    port = int(url.rsplit(":", 1)[1])
    config = CenterConfig(
        db_url=f"sqlite+aiosqlite:///{tmp_path}/center.db", token="center-t0ken", tls_dir=center_tls
    )
    center = Center(config)
    await center.start()
    try:
        host = await center.inventory.add_host("127.0.0.1", TOKEN, port)
        assert host.url == url  # stored as https
        host.url = url.replace("https://", "http://")  # a host added before the center had TLS
        assert center.inventory.agent_url(host) == url
        assert (await center.inventory.agent(host).facts()).name == "h172"
        # A refresh's questions, asked by the poller process with the center's CA and
        # certificate (a plaintext or unverified ask would leave the host disconnected).
        await center.inventory.refresh_all()
        assert center.inventory.poller.starts == 1 and center.inventory.poller.pid
        assert (await center.inventory.host(host.name)).connection == "connected"
        assert host.id in center.inventory.seen
    finally:
        await center.close()


def test_agent_url_upgrades_only_with_tls() -> None:
    context = ssl.create_default_context()
    assert agent_url("http://10.0.0.1:8700", None) == "http://10.0.0.1:8700"
    assert agent_url("http://10.0.0.1:8700", context) == "https://10.0.0.1:8700"
    assert agent_url("https://10.0.0.1:8700", context) == "https://10.0.0.1:8700"


def test_cli_says_how_to_trust_the_center(tls_agent: tuple[str, Path], tmp_path: Path) -> None:
    """An HTTPS server signed by the cluster CA (the agent's API stands in for a center): without
    the CA, one line saying how to pass it; with KVMOTION_CA_FILE, TLS succeeds (and the wrong
    token is the only complaint)."""
    url, _ = tls_agent
    env = {"KVMOTION_CENTER_URL": None, "KVMOTION_CENTER_TOKEN": None, "KVMOTION_CA_FILE": None}
    env |= {"KVMOTION_LAB_DIR": str(tmp_path / "no-lab"), "COLUMNS": "200"}
    argv = ["vm", "list", "--center", url, "--token", "x" * 20]
    refused = CliRunner().invoke(app, argv, env=env)
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "does not trust" in refused.output and "KVMOTION_CA_FILE" in refused.output
    trusted = CliRunner().invoke(
        app, argv, env=env | {"KVMOTION_CA_FILE": str(tmp_path / "ca/ca-cert.pem")}
    )
    assert "does not trust" not in trusted.output, trusted.output


async def test_center_refuses_to_serve_without_certificates(tmp_path: Path) -> None:
    config = CenterConfig(
        db_url=f"sqlite+aiosqlite:///{tmp_path}/center.db", token="center-t0ken",
        tls_dir=tmp_path / "no-tls",
    )  # fmt: skip
    with pytest.raises(InvalidInput, match=re.escape("kvmotion tls issue --host center")):
        await serve_center(Center(config))


async def test_ha_peers_are_asked_over_https_with_the_cluster_ca(
    tls_agent: tuple[str, Path], tmp_path: Path
) -> None:
    """An HA host tells an isolation from a center outage by asking its peers (host/ha.py):
    over HTTPS it verifies them with the cluster CA. Without it no peer would seem to answer,
    and a host that still reaches its peers would take itself for isolated."""
    url, _center_tls = tls_agent

    def ha(peer_tls: ssl.SSLContext | None) -> HostHa:
        async def never(*_args: object) -> None:
            raise AssertionError("no VM is stopped here")

        h = HostHa("h173", [], tmp_path / "ha.json", list, never, never, peer_tls=peer_tls)
        h.settings = HaSettingsIn(enabled=True, peers=[url])
        return h

    assert await ha(agents_context(tmp_path / "agent-tls"))._any_peer_answers()
    assert not await ha(None)._any_peer_answers()  # the system store: the peer seems silent
