"""Certificates for encrypted migration streams: a cluster CA and each host's certificates.

QEMU's ``tls-creds-x509`` object reads a directory laid out like this (``FILES``): the CA that
signs every host, and the host's own server (it accepts migration streams and NBD connections)
and client (it sends them) certificates and keys. Every host gets one such directory, signed by
one CA per cluster (or per center), so each side verifies the other: the destination accepts only
a client with a certificate from the CA (``verify-peer``), and the source checks the destination's
certificate against the address it connects to (``tls-hostname``).

``kvmotion tls ca DIR`` creates a CA; ``kvmotion tls issue --ca DIR --host NAME --address IP ...
--out DIR`` writes a host's directory (copy it to the host's ``tls_dir``, by default
``/etc/kvmotion/tls``). Keys are ECDSA P-256, written 0600; certificates last ``VALID_DAYS``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmotion.errors import InvalidInput, NotFound

VALID_DAYS = 3650
CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"
FILES = {
    "server": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
    "client": ("ca-cert.pem", "client-cert.pem", "client-key.pem"),
}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvmotion"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _private_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or accept an existing one only if it is ours and nobody else
    may write to it (a directory planted by another user could expose the keys)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise InvalidInput(
            f"{directory} belongs to another user or others may write to it: choose a "
            "directory only you control (not /tmp)"
        )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write atomically through a fresh temporary file (never one someone else made)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, *, ca: bool
) -> x509.CertificateBuilder:
    """What every certificate here shares: serial, validity, and a CA's or a host's usage."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=ca,
                crl_sign=ca,
                key_agreement=not ca,
                content_commitment=False,
                # QEMU 10 refuses a host certificate whose (critical) usage lacks key
                # encipherment ("usage does not permit key encipherment"); 7.2 did not check.
                key_encipherment=not ca,
                data_encipherment=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def create_ca(directory: Path, name: str = "kvmotion CA") -> Path:
    """Create a CA in ``directory`` (``ca-cert.pem``, ``ca-key.pem``); returns the cert's path.
    An existing CA is kept (re-running is harmless)."""
    _private_dir(directory)
    cert_path = directory / CA_CERT
    if cert_path.exists() and (directory / CA_KEY).exists():
        return cert_path
    if cert_path.exists() or (directory / CA_KEY).exists():
        raise InvalidInput(
            f"{directory} holds half a CA (a certificate or a key alone; a host's tls_dir?): "
            "give the CA its own directory"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _builder(_name(name), _name(name), key.public_key(), ca=True).sign(key, hashes.SHA256())
    _write(directory / CA_KEY, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise NotFound(
            f"no CA in {ca_dir} ({exc.filename} is missing): create one with `kvmotion tls ca "
            f"{ca_dir}`"
        ) from exc
    except ValueError as exc:
        raise InvalidInput(f"the CA in {ca_dir} cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"the CA key in {ca_dir} is not an EC key")
    return cert, key


def _alt_names(host: str, addresses: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for entry in [host, *addresses]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            if not entry or any(c.isspace() for c in entry) or len(entry) > 253:
                raise InvalidInput(f"not an address or host name: {entry[:80]!r}") from None
            names.append(x509.DNSName(entry))
    unique: list[x509.GeneralName] = []
    for name in names:
        if name not in unique:
            unique.append(name)
    return unique


def issue_host(ca_dir: Path, out_dir: Path, host: str, addresses: list[str]) -> list[Path]:
    """Write ``host``'s TLS directory (``FILES``) into ``out_dir``, signed by the CA in
    ``ca_dir``; the certificates name ``host`` and every address in ``addresses`` (the
    migration address must be among them: the source checks it). Returns the files written."""
    if out_dir.resolve() == ca_dir.resolve():
        raise InvalidInput("write the host's certificates outside the CA's directory")
    ca_cert, ca_key = _load_ca(ca_dir)
    alt = x509.SubjectAlternativeName(_alt_names(host, addresses))
    _private_dir(out_dir)
    written = []
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(_name(host), ca_cert.subject, key.public_key(), ca=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(alt, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _, cert_name, key_name = FILES[role]
        _write(out_dir / key_name, _key_pem(key), private=True)
        _write(out_dir / cert_name, cert.public_bytes(serialization.Encoding.PEM))
        written += [out_dir / cert_name, out_dir / key_name]
    _write(out_dir / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    return [out_dir / CA_CERT, *written]


def spki_sha256(cert_file: Path) -> str:
    """The base64 SHA-256 of a certificate's public key (SubjectPublicKeyInfo): what a browser
    pins, e.g. Chromium's ``--ignore-certificate-errors-spki-list`` with the CA's."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def missing_files(directory: Path) -> list[str]:
    """The files of a host's TLS directory that are not there (empty when it is complete)."""
    names = sorted({name for files in FILES.values() for name in files})
    return [name for name in names if not (directory / name).is_file()]
