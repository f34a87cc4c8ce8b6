"""TLS for the management plane: the agents' and the center's APIs served over HTTPS.

A machine's TLS directory is the one ``kvmotion tls issue`` writes (pki.py): the cluster CA, a
server certificate (whose names include the management address it is reached at) and a client
certificate. A service serves HTTPS with its server certificate and accepts, without requiring,
a client certificate signed by the CA; bearer tokens still decide who may do what, now over TLS.
Plaintext only when the configuration asks for it (``api_plaintext``).

The center calls agents over HTTPS when its own TLS directory holds the CA (``agents_context``);
an agent URL stored as ``http://`` (a host added before) is upgraded where it is used
(``agent_url``), so the database needs no rewrite.

Raises :class:`InvalidInput` when HTTPS is required and the directory is incomplete.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from kvmotion import pki
from kvmotion.errors import InvalidInput


def server_tls(tls_dir: Path, plaintext: bool, issue_hint: str) -> dict[str, Any]:
    """uvicorn's TLS options for a service whose certificates are in ``tls_dir`` (empty when
    ``plaintext``). ``issue_hint``: the `kvmotion tls issue ...` command that writes them."""
    if plaintext:
        return {}
    missing = [name for name in pki.missing_files(tls_dir) if name.startswith(("ca", "server"))]
    if missing:
        raise InvalidInput(
            f"cannot serve HTTPS: {', '.join(missing)} missing in {tls_dir}; issue them with "
            f"`{issue_hint}` and copy the directory there, or set api_plaintext: true in the "
            "config to serve plaintext HTTP (bearer tokens in clear: only on a private network)",
            code="tls_missing",
        )
    return {
        "ssl_certfile": str(tls_dir / "server-cert.pem"),
        "ssl_keyfile": str(tls_dir / "server-key.pem"),
        "ssl_ca_certs": str(tls_dir / pki.CA_CERT),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
    }


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """A client context trusting only the cluster CA in ``tls_dir`` and presenting the
    machine's client certificate (when it has one)."""
    context = ssl.create_default_context(cafile=str(tls_dir / pki.CA_CERT))
    if (tls_dir / "client-cert.pem").is_file():
        context.load_cert_chain(tls_dir / "client-cert.pem", tls_dir / "client-key.pem")
    return context


def agents_context(tls_dir: Path) -> ssl.SSLContext | None:
    """The center's context for its agents: its CA and client certificate, or None (plaintext
    HTTP to agents) when ``tls_dir`` holds no CA."""
    return client_context(tls_dir) if (tls_dir / pki.CA_CERT).is_file() else None


def agent_url(url: str, tls: ssl.SSLContext | None) -> str:
    """An agent's stored URL with the scheme the center speaks to it: https when it has TLS."""
    if tls is not None and url.startswith("http://"):
        return "https://" + url.removeprefix("http://")
    return url
