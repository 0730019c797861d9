"""A development certificate authority: CA, server and client certificates.

For trials and tests only; production uses the hospital's PKI. Keys are written
with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
_KEY_CURVE = ec.SECP256R1()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kiosk-vitals development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return path.with_suffix(".pem")


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def make_ca(directory: Path, name: str = "kiosk-vitals dev CA") -> tuple[Path, Path]:
    """Create ``ca.pem`` and ``ca.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(_KEY_CURVE)
    cert = (
        _builder(_name(name), _name(name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write(directory / "ca", cert, key)
    return directory / "ca.pem", directory / "ca.key"


def _load_ca(
    ca_cert: Path, ca_key: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key made by make_ca")
    return cert, key


def issue_server_cert(
    hosts: list[str], ca_cert: Path, ca_key: Path, directory: Path, stem: str = "server"
) -> tuple[Path, Path]:
    """Issue a TLS server certificate for ``hosts`` (names or IP addresses)."""
    ca, signing_key = _load_ca(ca_cert, ca_key)
    key = ec.generate_private_key(_KEY_CURVE)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        _builder(_name(hosts[0]), ca.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(signing_key, hashes.SHA256())
    )
    _write(directory / stem, cert, key)
    return directory / f"{stem}.pem", directory / f"{stem}.key"


def issue_client_cert(
    common_name: str, ca_cert: Path, ca_key: Path, directory: Path
) -> tuple[Path, Path]:
    """Issue a TLS client certificate whose CN is ``common_name`` (a kiosk id)."""
    ca, signing_key = _load_ca(ca_cert, ca_key)
    key = ec.generate_private_key(_KEY_CURVE)
    cert = (
        _builder(_name(common_name), ca.subject, key.public_key())
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(signing_key, hashes.SHA256())
    )
    _write(directory / common_name, cert, key)
    return directory / f"{common_name}.pem", directory / f"{common_name}.key"
