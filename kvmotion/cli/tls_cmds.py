"""`kvmotion tls ...`: the certificates that encrypt migration streams between hosts."""

from __future__ import annotations

from pathlib import Path

import typer

from kvmotion import pki
from kvmotion.cli.output import console

app = typer.Typer(
    help="Certificates for encrypted migration streams (a CA, and each host's directory).",
    no_args_is_help=True,
)


@app.command("ca")
def ca(
    directory: Path = typer.Argument(..., help="where the CA lives (keep ca-key.pem private)"),
) -> None:
    """Create the CA that signs every host's certificates (kept if it exists)."""
    cert = pki.create_ca(directory)
    console.print(f"CA certificate: {cert}")


@app.command("issue")
def issue(
    ca_dir: Path = typer.Option(..., "--ca", help="the CA's directory (`kvmotion tls ca`)"),
    host: str = typer.Option(..., "--host", help="the host's name, as the center knows it"),
    address: list[str] = typer.Option(
        [], "--address", help="an address the host is reached at (management, migration)"
    ),
    out: Path = typer.Option(..., "--out", help="where to write; copy it to the host's tls_dir"),
) -> None:
    """Write a host's certificate directory (CA, server and client certificates and keys)."""
    files = pki.issue_host(ca_dir, out, host, address)
    console.print(f"{len(files)} files in {out}: copy them to {host}'s tls_dir")
