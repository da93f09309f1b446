"""fedjax_core.pki, and mTLS between the notebook and a real director server on loopback."""
from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import grpc
import pytest
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedjax_core import pki
from fedjax_core import records as r
from fedjax_core.api.federation import Federation
from fedjax_core.director.core import Director
from fedjax_core.director.server import create_server
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from fedjax_core.transport import TLSFiles


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(ext.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


# ------------------------------------------------------------------------- pki
def test_init_ca_and_certify_create_files(tmp_path):
    ca_path = pki.init_ca(tmp_path / "pki")
    assert ca_path == tmp_path / "pki" / "root_ca.crt"
    assert ca_path.is_file() and (tmp_path / "pki" / "root_ca.key").is_file()
    cert_path, key_path = pki.certify(tmp_path / "pki", "env_one")
    assert (cert_path, key_path) == (tmp_path / "pki" / "env_one.crt", tmp_path / "pki" / "env_one.key")
    for key in (tmp_path / "pki" / "root_ca.key", key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key  # private keys are private
        serialization.load_pem_private_key(key.read_bytes(), password=None)


def test_certificate_is_issued_by_the_ca_with_sans(tmp_path):
    d = tmp_path / "pki"
    pki.init_ca(d)
    cert_path, key_path = pki.certify(d, "director.example.org", ["10.1.2.3", "alt.example.org"], role="director")
    ca, cert = _cert(d / "root_ca.crt"), _cert(cert_path)
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer do not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False  # a leaf, never a CA
    dns, ips = _sans(cert)
    assert {"director.example.org", "localhost", "alt.example.org"} <= dns
    assert {"127.0.0.1", "10.1.2.3"} <= ips
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH}  # a director serves; it never connects as a client
    # The key file holds the certificate's own private key.
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_ip_name_becomes_an_ip_san(tmp_path):
    pki.init_ca(tmp_path)
    cert_path, _ = pki.certify(tmp_path, "192.168.7.9", role="director")
    dns, ips = _sans(_cert(cert_path))
    assert "192.168.7.9" in ips and "192.168.7.9" not in dns
    assert all(ipaddress.ip_address(ip) for ip in ips)


def test_certificate_from_another_ca_does_not_verify(tmp_path):
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    cert_path, _ = pki.certify(tmp_path / "a", "env_one")
    with pytest.raises((ValueError, InvalidSignature)):
        _cert(cert_path).verify_directly_issued_by(_cert(tmp_path / "b" / "root_ca.crt"))


def test_init_refuses_to_overwrite(tmp_path):
    pki.init_ca(tmp_path)
    before = (tmp_path / "root_ca.crt").read_bytes(), (tmp_path / "root_ca.key").read_bytes()
    with pytest.raises(FileExistsError, match="root_ca.crt"):
        pki.init_ca(tmp_path)
    assert ((tmp_path / "root_ca.crt").read_bytes(), (tmp_path / "root_ca.key").read_bytes()) == before


def test_certify_without_ca_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        pki.certify(tmp_path / "empty", "env_one")
    assert "fedjax pki init" in str(info.value)
    assert not (tmp_path / "empty" / "env_one.crt").exists()


@pytest.mark.parametrize("role, usage", [("director", ExtendedKeyUsageOID.SERVER_AUTH),
                                         ("envoy", ExtendedKeyUsageOID.CLIENT_AUTH),
                                         ("api", ExtendedKeyUsageOID.CLIENT_AUTH)])
def test_role_round_trips_through_the_certificate(tmp_path, role, usage):
    pki.init_ca(tmp_path)
    cert_path, _ = pki.certify(tmp_path, "party-1", role=role)
    cert = _cert(cert_path)
    assert pki.identity(cert) == pki.identity(cert_path.read_bytes()) == pki.Identity("party-1", role)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == [role]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    has_sans = any(isinstance(e.value, x509.SubjectAlternativeName) for e in cert.extensions)
    assert has_sans == (role == "director")  # only the director is dialled by name


@pytest.mark.parametrize("name, role", [("api", "api"), ("env_one", "envoy"), ("director.example.org", "envoy")])
def test_default_role_is_api_for_the_name_api_and_envoy_otherwise(tmp_path, name, role):
    pki.init_ca(tmp_path)
    assert pki.identity(_cert(pki.certify(tmp_path, name)[0])).role == role


def test_bad_role_and_sans_on_a_client_certificate_are_refused(tmp_path):
    pki.init_ca(tmp_path)
    with pytest.raises(ValueError, match="role 'root' is not valid: use director, envoy, api, admin"):
        pki.certify(tmp_path, "env_one", role="root")
    with pytest.raises(ValueError, match="--san is for the director's certificate"):
        pki.certify(tmp_path, "env_one", ["10.0.0.1"], role="envoy")
    assert not (tmp_path / "env_one.crt").exists()


def _hand_made(tmp_path: Path, subject: list[x509.NameAttribute], usages: list | None) -> x509.Certificate:
    """A certificate signed by the federation's CA, but not made by `fedjax pki certify`."""
    ca_key = serialization.load_pem_private_key((tmp_path / "root_ca.key").read_bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name(subject))
               .issuer_name(_cert(tmp_path / "root_ca.crt").subject)
               .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=1)))
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


@pytest.mark.parametrize("subject, usages, expected", [
    # issued before roles: both usages, no OU
    ([("CN", "env1")], [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], ("env1", None)),
    # an OU that claims a role its key usage does not allow
    ([("CN", "env1"), ("OU", "director")], [ExtendedKeyUsageOID.CLIENT_AUTH], ("env1", None)),
    ([("CN", "api"), ("OU", "api")], None, ("api", None)),
    ([("CN", "api"), ("OU", "api"), ("OU", "envoy")], [ExtendedKeyUsageOID.CLIENT_AUTH], ("api", None)),
    ([("OU", "envoy")], [ExtendedKeyUsageOID.CLIENT_AUTH], (None, "envoy")),  # no name
    ([("CN", "a"), ("CN", "b"), ("OU", "envoy")], [ExtendedKeyUsageOID.CLIENT_AUTH], (None, "envoy")),
    ([("CN", "bad name!"), ("OU", "envoy")], [ExtendedKeyUsageOID.CLIENT_AUTH], (None, "envoy")),
])
def test_a_certificate_without_a_usable_name_or_role_has_none(tmp_path, subject, usages, expected):
    pki.init_ca(tmp_path)
    oids = {"CN": NameOID.COMMON_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME}
    cert = _hand_made(tmp_path, [x509.NameAttribute(oids[k], v) for k, v in subject], usages)
    assert pki.identity(cert) == pki.Identity(*expected)


# ------------------------------------------------------------------ real mTLS
@pytest.fixture
def federation_pki(tmp_path):
    good, other = tmp_path / "pki", tmp_path / "other_pki"
    pki.init_ca(good)
    pki.init_ca(other)
    pki.certify(good, "localhost", role="director")
    pki.certify(good, "api")
    pki.certify(other, "api")
    return good, other


@pytest.fixture
def tls_director(tmp_path, federation_pki):
    good, _ = federation_pki
    director = Director(state_dir=tmp_path / "state", log_dir=tmp_path / "logs",
                        sample_shape=["32", "32", "3"], target_shape=["1"])
    director.register_envoy("env_one", r.ShardInfo(description="shard 1 of 2", sample_shape=("32", "32", "3"),
                                                   target_shape=("1",), train_size=2585, valid_size=509))
    server, port = create_server(director, "127.0.0.1", 0,
                                 TLSFiles(good / "root_ca.crt", good / "localhost.crt", good / "localhost.key"))
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)
        director.close()


def _federation(port: int, d: Path, name: str = "api", root: Path | None = None, tls: bool = True) -> Federation:
    return Federation(client_id=name, director_node_fqdn="127.0.0.1", director_port=port, tls=tls,
                      cert_chain=str(root or d / "root_ca.crt"), api_cert=str(d / f"{name}.crt"),
                      api_private_key=str(d / f"{name}.key"), timeout_s=30)  # bounds a failure only


def test_mtls_client_with_a_certificate_from_the_ca_is_served(tls_director, federation_pki):
    good, _ = federation_pki
    fed = _federation(tls_director, good)
    try:
        registry = fed.get_shard_registry()
        assert list(registry) == ["env_one"]
        assert registry["env_one"]["shard_info"]["n_samples"] == {"train": 2585, "valid": 509}
        assert fed.sample_shape == ["32", "32", "3"] and fed.target_shape == ["1"]
    finally:
        fed.close()


def test_server_refuses_a_client_certificate_it_did_not_issue(tls_director, federation_pki):
    # The client trusts the director's CA, but presents a certificate from another CA: the
    # director's client-certificate check is what refuses it.
    good, other = federation_pki
    with pytest.raises(ConnectionError, match="UNAVAILABLE"):
        fed = _federation(tls_director, other, root=good / "root_ca.crt")
        fed.get_shard_registry()


def test_tls_client_without_a_certificate_is_refused(tls_director, federation_pki):
    good, _ = federation_pki
    creds = grpc.ssl_channel_credentials(root_certificates=(good / "root_ca.crt").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{tls_director}", creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            fed_grpc.FederationServiceStub(channel).GetShardRegistry(fed_pb.GetShardRegistryRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused(tls_director, federation_pki):
    good, _ = federation_pki
    with pytest.raises(ConnectionError, match="UNAVAILABLE"):
        fed = _federation(tls_director, good, tls=False)
        fed.get_shard_registry()


def test_an_admin_certificate_carries_its_role_for_client_auth(tmp_path):
    pki.init_ca(tmp_path)
    cert = _cert(pki.certify(tmp_path, "ops", role=pki.ADMIN)[0])
    assert pki.identity(cert) == pki.Identity("ops", "admin")
