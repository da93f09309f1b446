"""A small PKI for mTLS: one root CA per federation, one certificate per party, each with a role.

    fedjax pki init --dir pki                                    # pki/root_ca.crt, pki/root_ca.key
    fedjax pki certify --dir pki --name director.example.org --role director --san 10.0.0.5
    fedjax pki certify --dir pki --name env1 --role envoy        # pki/env1.crt, pki/env1.key
    fedjax pki certify --dir pki --name api --role api           # a notebook's (one per researcher)
    fedjax pki certify --dir pki --name ops --role admin         # sees and cancels every experiment

A certificate's role is written twice, in standard fields any X.509 tool shows:

- the subject's organizational unit: ``CN=<name>, OU=<role>`` (``director``, ``envoy``, ``api`` or
  ``admin``);
- the extended key usage: a director's certificate is for ``serverAuth`` only, an envoy's or
  the notebook's for ``clientAuth`` only. TLS itself enforces this part: gRPC's TLS refuses a
  server whose certificate is not for ``serverAuth`` ("unsupported certificate purpose"), so
  no envoy or notebook certificate can serve as the director, and the director's handshake
  refuses a client certificate that is not for ``clientAuth``.

The director reads a caller's role with :func:`identity` (the OU, trusted only when the
extended key usage agrees with it) and decides what it may call; a certificate without a
usable name or role (issued before roles, or by hand) has no identity and is refused.
Only a director's certificate carries host names (the name, ``localhost``, ``127.0.0.1``
and each ``--san``); client certificates need none.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DIRECTOR, ENVOY, API, ADMIN = "director", "envoy", "api", "admin"
ROLES = (DIRECTOR, ENVOY, API, ADMIN)  # admin: the notebook API, seeing and cancelling every experiment
_USAGE = {DIRECTOR: ExtendedKeyUsageOID.SERVER_AUTH, ENVOY: ExtendedKeyUsageOID.CLIENT_AUTH,
          API: ExtendedKeyUsageOID.CLIENT_AUTH, ADMIN: ExtendedKeyUsageOID.CLIENT_AUTH}


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: ``name`` (its common name) and ``role``; None where unusable."""

    name: str | None
    role: str | None


def default_role(name: str) -> str:
    """The role ``certify`` gives when none is asked for: ``api`` for the name 'api', else ``envoy``."""
    return API if name == "api" else ENVOY


def fix_command(role: str, name: str = "NAME", directory: str | Path = "pki") -> str:
    """The command that issues a certificate of ``role``, for error messages."""
    return f"fedjax pki certify --dir {directory} --name {name} --role {role}"


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


def certify(directory: Path, name: str, sans: list[str] | tuple[str, ...] = (),
            role: str | None = None) -> tuple[Path, Path]:
    """Issue ``<name>.crt``/``<name>.key`` for ``role``, signed by the CA in ``directory``.

    ``role`` defaults to :func:`default_role`; ``sans`` (extra host names or IPs) only for a director.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"certificate name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                         "(a host name or an envoy name)")
    role = role or default_role(name)
    if role not in ROLES:
        raise ValueError(f"certificate role {role!r} is not valid: use {', '.join(ROLES)}")
    if sans and role != DIRECTOR:
        raise ValueError(f"--san is for the director's certificate (the names envoys and notebooks dial); "
                         f"an {role} certificate is for connecting only: drop --san, or add --role director")
    ca_cert_path, ca_key_path = directory / "root_ca.crt", directory / "root_ca.key"
    if not ca_cert_path.exists():
        raise FileNotFoundError(f"no root CA in {directory}: run `fedjax pki init --dir {directory}` first")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(_now())
               .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([_USAGE[role]]), critical=False))
    if role == DIRECTOR:
        alt_names: list[x509.GeneralName] = []
        for entry in dict.fromkeys([name, "localhost", "127.0.0.1", *sans]):
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                alt_names.append(x509.DNSName(entry))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def identity(cert: x509.Certificate | bytes) -> Identity:
    """The name and role a certificate (object or PEM) carries; each None where missing or unusable.

    The name is the single common name, if it is a valid party name; the role is the single
    OU, if it is one of :data:`ROLES` and the extended key usage is exactly that role's.
    """
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    name = names[0] if len(names) == 1 and isinstance(names[0], str) and _NAME.fullmatch(names[0]) else None
    role = units[0] if len(units) == 1 and units[0] in ROLES else None
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = set()
    if role is not None and usages != {_USAGE[role]}:
        role = None
    return Identity(name, role)
