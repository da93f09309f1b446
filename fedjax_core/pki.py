"""A small PKI for mTLS: one root CA per federation, one certificate per party.

    fedjax pki init --dir pki                 # pki/root_ca.crt, pki/root_ca.key
    fedjax pki certify --dir pki --name env1  # pki/env1.crt, pki/env1.key
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key readable by its owner only, from the first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(directory: Path) -> Path:
    """Create ``root_ca.crt`` and ``root_ca.key`` in ``directory``; refuses to overwrite a CA."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "root_ca.crt", directory / "root_ca.key"
    if cert_path.exists():
        raise FileExistsError(f"{cert_path} exists already; a federation keeps one root CA")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedjax root CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now())
            .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS * 5))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def certify(directory: Path, name: str, sans: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Issue ``<name>.crt``/``<name>.key`` signed by the CA in ``directory``, for client and server use."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"certificate name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                         "(a host name or an envoy name)")
    ca_cert_path, ca_key_path = directory / "root_ca.crt", directory / "root_ca.key"
    if not ca_cert_path.exists():
        raise FileNotFoundError(f"no root CA in {directory}: run `fedjax pki init --dir {directory}` first")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    alt_names: list[x509.GeneralName] = []
    for entry in [name, "localhost", "127.0.0.1", *sans]:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            alt_names.append(x509.DNSName(entry))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now())
            .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
