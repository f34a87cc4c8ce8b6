"""Certificates for TLS migration streams: what QEMU's tls-creds-x509 reads, signed by one CA."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from kvmotion import pki
from kvmotion.errors import InvalidInput, NotFound


def test_ca_and_host_directory(tmp_path: Path) -> None:
    ca_dir, host_dir = tmp_path / "ca", tmp_path / "h172"
    pki.create_ca(ca_dir)
    before = (ca_dir / pki.CA_CERT).read_bytes()
    pki.create_ca(ca_dir)  # idempotent: the CA is kept
    assert (ca_dir / pki.CA_CERT).read_bytes() == before
    assert pki.missing_files(host_dir) != []
    pki.issue_host(ca_dir, host_dir, "172.16.0.172", ["172.16.1.172", "h172.example"])
    assert pki.missing_files(host_dir) == []
    ca = x509.load_pem_x509_certificate(before)
    for role in ("server", "client"):
        cert = x509.load_pem_x509_certificate((host_dir / f"{role}-cert.pem").read_bytes())
        key = ca.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        cert.verify_directly_issued_by(ca)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address("172.16.1.172") in alt.get_values_for_type(x509.IPAddress)
        assert "h172.example" in alt.get_values_for_type(x509.DNSName)
        assert (host_dir / f"{role}-key.pem").stat().st_mode & 0o077 == 0  # private
    assert (ca_dir / pki.CA_KEY).stat().st_mode & 0o077 == 0


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="kvmotion tls ca"):
        pki.issue_host(tmp_path / "no-ca", tmp_path / "h", "h", [])
    pki.create_ca(tmp_path / "ca")
    with pytest.raises(InvalidInput, match="not an address"):
        pki.issue_host(tmp_path / "ca", tmp_path / "h", "h", ["a b"])


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
def test_qemu_loads_the_credentials(tmp_path: Path) -> None:
    """QEMU (gnutls) reads the directory as both endpoints; a broken one is refused."""
    pki.create_ca(tmp_path / "ca")
    pki.issue_host(tmp_path / "ca", tmp_path / "h", "172.16.0.172", ["172.16.1.172"])

    def qemu(directory: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults",
             "-object", f"tls-creds-x509,id=t,dir={directory},endpoint={endpoint},verify-peer=on",
             "-monitor", "none", "-serial", "none", "-S", "-daemonize", "-pidfile",
             str(tmp_path / f"{endpoint}.pid")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    for endpoint in ("server", "client"):
        result = qemu(tmp_path / "h", endpoint)
        assert result.returncode == 0, result.stderr
        pid = int((tmp_path / f"{endpoint}.pid").read_text())
        subprocess.run(["kill", str(pid)], check=True)
    (tmp_path / "h" / "server-key.pem").write_text("not a key\n")
    assert qemu(tmp_path / "h", "server").returncode != 0


def test_keys_stay_private_whatever_was_planted(tmp_path: Path) -> None:
    """A directory others may write to is refused; a planted file or symlink is never written
    through; half a CA is never silently replaced."""
    pki.create_ca(tmp_path / "ca")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(InvalidInput, match="others may write"):
        pki.issue_host(tmp_path / "ca", open_dir, "h", ["10.0.0.1"])
    out = tmp_path / "h"
    out.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (out / "server-key.pem.tmp").write_text("planted")
    (out / "server-key.pem.tmp").chmod(0o666)
    (out / "client-key.pem").symlink_to(victim)
    pki.issue_host(tmp_path / "ca", out, "h", ["10.0.0.1"])
    assert victim.read_text() == "keep me\n"
    for key in ("server-key.pem", "client-key.pem"):
        path = out / key
        assert not path.is_symlink() and path.stat().st_mode & 0o077 == 0
    half = tmp_path / "half"
    half.mkdir(mode=0o700)
    (half / pki.CA_CERT).write_text("a host's CA certificate")
    with pytest.raises(InvalidInput, match="half a CA"):
        pki.create_ca(half)
    with pytest.raises(InvalidInput, match="outside the CA"):
        pki.issue_host(tmp_path / "ca", tmp_path / "ca", "h", [])
