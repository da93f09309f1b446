"""Secure by default: a whole federation over mTLS, and envoys bound to their certificates."""
from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import message_factory

from fedjax_core import Federation, FLExperiment, ModelInterface, pki
from fedjax_core.errors import NotFoundError, PermissionDeniedError
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import federation_service_pb2 as fed_pb
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import FEDJAX, Stack


@pytest.fixture
def tls_stack(tmp_path):
    stack = Stack(tmp_path, tls=True)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        print(stack.logs())


@pytest.fixture
def mtls_director(tmp_path):
    """A director over mTLS with no envoy running (envoy 1's config is there to start one)."""
    stack = Stack(tmp_path, n_envoys=1, tls=True)
    try:
        stack.start_director()
        yield stack
    finally:
        stack.stop()
        print(stack.logs())


def _federation(stack: Stack, name: str, timeout_s: float = 10) -> Federation:
    """A notebook connection to ``stack``'s director presenting certificate ``name``."""
    return Federation(director_node_fqdn="127.0.0.1", director_port=stack.port, tls=True, timeout_s=timeout_s,
                      cert_chain=str(stack.pki / "root_ca.crt"), api_cert=str(stack.pki / f"{name}.crt"),
                      api_private_key=str(stack.pki / f"{name}.key"))


def _every_rpc(stack: Stack, module, service: str, name: str) -> dict[str, tuple[grpc.StatusCode, str]]:
    """Call every RPC of ``service`` (new ones included) with an empty request, presenting certificate
    ``name``, as a hand-written client would: ``{rpc: (status code, details)}``."""
    creds = grpc.ssl_channel_credentials((stack.pki / "root_ca.crt").read_bytes(),
                                         (stack.pki / f"{name}.key").read_bytes(),
                                         (stack.pki / f"{name}.crt").read_bytes())
    descriptor = module.DESCRIPTOR.services_by_name[service]
    answers = {}
    with grpc.secure_channel(f"127.0.0.1:{stack.port}", creds) as channel:
        for method in descriptor.methods:
            request = message_factory.GetMessageClass(method.input_type)()
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}
            call = kind[(method.client_streaming, method.server_streaming)](
                f"/{descriptor.full_name}/{method.name}", request_serializer=type(request).SerializeToString)
            try:
                reply = call(iter([request]) if method.client_streaming else request, timeout=10)
                if method.server_streaming:
                    list(reply)
                answers[method.name] = (grpc.StatusCode.OK, "")
            except grpc.RpcError as exc:
                answers[method.name] = (exc.code(), exc.details())
    return answers


def _assert_all_refused(answers: dict, *fragments: str) -> None:
    for rpc, (code, details) in answers.items():
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
        for fragment in fragments:
            assert fragment.format(rpc=rpc) in details, (rpc, details)


def _hand_made_certificate(pki_dir: Path, file_name: str, subject: list[tuple], usages: list) -> None:
    """``file_name``.crt/.key signed by the federation's CA, but not made by `fedjax pki certify`."""
    ca_key = serialization.load_pem_private_key((pki_dir / "root_ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((pki_dir / "root_ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(o, v) for o, v in subject]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(ca_key, hashes.SHA256()))
    (pki_dir / f"{file_name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki_dir / f"{file_name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def test_experiment_over_mtls(tls_stack):
    fed = tls_stack.federation()
    assert sorted(fed.get_shard_registry()) == ["env1", "env2"]
    exp = FLExperiment(federation=fed, experiment_name="secure")
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=128), rounds_to_train=1, device_assignment_policy="CPU_ONLY",
              opt_treatment="CONTINUE_GLOBAL")
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished"
    assert [row["round"] for row in rows] == [0, 1]
    assert int(exp.get_best_model().step) == 128 // 64
    assert "mTLS" in tls_stack.director.output()


def test_api_certificate_not_in_submitters_cannot_use_the_notebook_api(mtls_director):
    """settings.submitters narrows the api certificates that may drive experiments (default: api)."""
    pki.certify(mtls_director.pki, "intern", role="api")
    with pytest.raises(PermissionDeniedError, match="certificate 'intern' may not use the notebook API; "
                                                    r"this director allows api \(settings.submitters"):
        _federation(mtls_director, "intern")
    mtls_director.director.wait_for(r"refused a call from ipv4:127\.0\.0\.1:\d+ \(certificate 'intern'\): "
                                "the client certificate")


def test_envoy_cannot_use_another_envoys_name(tls_stack):
    impostor = tls_stack.start_envoy(1, name="env1")  # env2's certificate, env1's name
    assert impostor.proc.wait(timeout=60) != 0
    impostor.wait_for(r"certificate is for 'env2', not for envoy 'env1'")
    tls_stack.director.wait_for(r"refused .* \(certificate 'env2'\): the client certificate is for 'env2'")


def test_api_certificate_cannot_register_as_envoy(mtls_director):
    """The notebook's certificate cannot bring up an envoy, nor make any envoy call (worker's included)."""
    stack = mtls_director
    impostor = stack.start_envoy(0, name="api", args=["-pc", str(stack.pki / "api.crt"),
                                                      "-pk", str(stack.pki / "api.key")])
    assert impostor.proc.wait(timeout=60) != 0
    impostor.wait_for(r"director refused envoy 'api': the client certificate 'api' has role api, but "
                      r"EnvoyService\.RegisterEnvoy needs role envoy .*fedjax pki certify --dir pki --name ENVOY_NAME "
                      "--role envoy")
    stack.director.wait_for(r"refused a call from ipv4:127\.0\.0\.1:\d+ \(certificate 'api'\): the client "
                            "certificate 'api' has role api")
    answers = _every_rpc(stack, env_pb, "EnvoyService", "api")
    assert {"RegisterEnvoy", "Heartbeat", "WaitExperiment", "UploadUpdate", "ReportFailure"} <= set(answers)
    _assert_all_refused(answers, "'api' has role api, but EnvoyService.{rpc} needs role envoy")
    assert stack.federation().get_shard_registry() == {}


def test_envoy_certificate_cannot_submit_experiment(mtls_director):
    """An envoy's certificate cannot submit code to the other envoys, nor make any notebook call."""
    stack = mtls_director
    with pytest.raises(PermissionDeniedError, match=r"the client certificate 'env1' has role envoy, but "
                                                    r"FederationService\.GetDatasetInfo needs role api \(only "
                                                    r"notebooks and admins call .*--name api --role api"):
        _federation(stack, "env1")
    answers = _every_rpc(stack, fed_pb, "FederationService", "env1")
    assert {"SubmitExperiment", "CancelExperiment", "GetModel", "StreamMetrics"} <= set(answers)
    _assert_all_refused(answers, "'env1' has role envoy, but FederationService.{rpc} needs role api")
    stack.director.wait_for(r"refused a call from ipv4:127\.0\.0\.1:\d+ \(certificate 'env1'\): the client "
                            "certificate 'env1' has role envoy")
    assert stack.federation().list_experiments() == []


@pytest.mark.parametrize("name, role", [("env1", "envoy"), ("api", "api")])
def test_envoy_certificate_cannot_serve_as_director(tmp_path, name, role):
    """No leaf but the director's can serve: the director will not start with one, and a server that
    does (an attacker's, with a stolen envoy or notebook key) fails every client's TLS handshake."""
    from fedjax_core.director.core import Director
    from fedjax_core.director.server import create_server
    from fedjax_core.transport import TLSFiles

    stack = Stack(tmp_path, n_envoys=1, tls=True)
    cert, key = stack.pki / f"{name}.crt", stack.pki / f"{name}.key"
    refused = subprocess.run([*FEDJAX, "director", "start", "-c", str(stack.director_config), "-pc", str(cert),
                              "-pk", str(key)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert (f"the certificate {cert} ({name}) has role {role}; the director serves only with a certificate of role "
            f"director: `fedjax pki certify --dir {stack.pki} --name 127.0.0.1 --role director`") in refused.stderr
    assert not (tmp_path / "director_state").exists()

    director = Director(state_dir=tmp_path / "rogue_state", log_dir=tmp_path / "rogue_logs",
                        sample_shape=["32", "32", "3"], target_shape=["1"])
    server, stack.port = create_server(director, "127.0.0.1", 0, TLSFiles(stack.pki / "root_ca.crt", cert, key))
    server.start()
    try:
        with pytest.raises(ConnectionError, match=r"unsupported certificate purpose.*The server's certificate is "
                                                  r"not a director's"):
            _federation(stack, "api", timeout_s=30)
        envoy = stack.start_envoy(0)
        envoy.wait_for(r"unreachable \(UNAVAILABLE, the server's certificate is not of role director\)")
        assert "ENVOY READY" not in envoy.output() and director.catalog.shard_registry() == []
    finally:
        stack.stop()
        server.stop(grace=None)
        director.close()
        print(stack.logs())


def test_director_certificate_cannot_act_as_a_client(mtls_director):
    """The director's certificate is for serving only: TLS itself refuses it as a notebook's or an envoy's."""
    with pytest.raises(ConnectionError, match="UNAVAILABLE"):
        _federation(mtls_director, "director", timeout_s=30)
    answers = _every_rpc(mtls_director, env_pb, "EnvoyService", "director")
    assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in answers.values()), answers


def test_unlisted_envoy_is_refused(tmp_path):
    """With settings.allowed_envoys, a certificate of role envoy is not enough: its name must be listed."""
    stack = Stack(tmp_path, n_envoys=2, tls=True)
    config = yaml.safe_load(stack.director_config.read_text())
    config["settings"]["allowed_envoys"] = ["env1"]
    stack.director_config.write_text(yaml.safe_dump(config))
    try:
        stack.start_director()
        stack.start_envoy(0).wait_for("ENVOY READY")
        unlisted = stack.start_envoy(1)
        assert unlisted.proc.wait(timeout=60) != 0
        unlisted.wait_for(r"director refused envoy 'env2': envoy 'env2' is not in this director's "
                          r"settings\.allowed_envoys \(env1\): add env2 there and restart the director")
        _assert_all_refused(_every_rpc(stack, env_pb, "EnvoyService", "env2"),
                            "envoy 'env2' is not in this director's settings.allowed_envoys")
        assert list(stack.federation().get_shard_registry()) == ["env1"]
    finally:
        stack.stop()
        print(stack.logs())


@pytest.mark.parametrize("subject, usages, says", [
    # issued before certificates had roles: both usages, no OU
    ([(NameOID.COMMON_NAME, "env1")], [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
     "'env1' carries no role (issued before roles, or by hand), but EnvoyService.{rpc} needs role envoy: issue it "
     "again with `fedjax pki certify --dir pki --name env1 --role envoy`"),
    # an OU claiming a role the key usage does not give
    ([(NameOID.COMMON_NAME, "env1"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "envoy")],
     [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], "'env1' carries no role"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "envoy")], [ExtendedKeyUsageOID.CLIENT_AUTH],
     "the client certificate carries no usable name"),
    ([(NameOID.COMMON_NAME, "env 1"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "envoy")], [ExtendedKeyUsageOID.CLIENT_AUTH],
     "the client certificate carries no usable name"),
], ids=["no-role", "role-without-its-usage", "no-name", "unusable-name"])
def test_certificate_without_a_usable_name_or_role_is_refused(mtls_director, subject, usages, says):
    """Fail closed: under mTLS a certificate from the federation's CA is not enough without a name and role."""
    _hand_made_certificate(mtls_director.pki, "handmade", subject, usages)
    _assert_all_refused(_every_rpc(mtls_director, env_pb, "EnvoyService", "handmade"), says)
    _assert_all_refused(_every_rpc(mtls_director, fed_pb, "FederationService", "handmade"),
                        says.split(", but")[0])


def test_a_plaintext_notebook_against_an_mtls_director_is_told_to_use_tls(tls_stack):
    with pytest.raises(ConnectionError, match=r"most likely runs mTLS\. Connect with Federation\(\.\.\., tls=True"):
        Federation(director_node_fqdn="127.0.0.1", director_port=tls_stack.port, tls=False, timeout_s=30)
    tls_stack.director.stop()
    assert "Handshake failed" not in tls_stack.director.output()  # gRPC's own noise stays out of the default log


def test_an_mtls_notebook_against_a_plaintext_director_is_told_to_use_plaintext(tmp_path):
    stack = Stack(tmp_path, n_envoys=0)
    try:
        stack.start_director()
        pki.init_ca(tmp_path / "pki")
        pki.certify(tmp_path / "pki", "api")
        with pytest.raises(ConnectionError, match=r"met a plaintext server: the director was started with "
                                                  r"--disable-tls\. Connect with Federation\(\.\.\., tls=False\)"):
            Federation(director_node_fqdn="127.0.0.1", director_port=stack.port, tls=True, timeout_s=5,
                       cert_chain=str(tmp_path / "pki" / "root_ca.crt"), api_cert=str(tmp_path / "pki" / "api.crt"),
                       api_private_key=str(tmp_path / "pki" / "api.key"))
    finally:
        stack.stop()


def test_only_the_submitter_or_an_admin_may_cancel_or_download_an_experiment(tmp_path):
    """The submitter is the certificate's name, never the client_id the notebook sends."""
    stack = Stack(tmp_path, n_envoys=1, tls=True)
    config = yaml.safe_load(stack.director_config.read_text())
    config["settings"].update(submitters=["api", "colleague", "boss"], admins=["boss"])
    stack.director_config.write_text(yaml.safe_dump(config))
    for name in ("colleague", "boss"):
        pki.certify(stack.pki, name, role="api")

    def as_(name):
        return Federation(client_id="boss", director_node_fqdn="127.0.0.1", director_port=stack.port, tls=True,
                          cert_chain=str(stack.pki / "root_ca.crt"), api_cert=str(stack.pki / f"{name}.crt"),
                          api_private_key=str(stack.pki / f"{name}.key"))

    try:
        stack.start()
        exp = FLExperiment(federation=as_("api"), experiment_name="mine")  # client_id says "boss": ignored
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                  data_loader=SubsetDataset(limit=64), rounds_to_train=1, device_assignment_policy="CPU_ONLY")
        assert exp.wait(timeout_s=120).state == "finished", stack.logs()
        colleague = FLExperiment(federation=as_("colleague"), experiment_name="mine")
        colleague.set_model_template(create_train_state())
        with pytest.raises(NotFoundError, match="no experiment named 'mine' among yours .*only its submitter, an "
                                                "admin certificate or one in settings.admins may download its models"):
            colleague.get_last_model()
        boss = FLExperiment(federation=as_("boss"), experiment_name="mine")
        boss.set_model_template(create_train_state())
        import jax
        import numpy as np

        mine, bosses = exp.get_last_model(), boss.get_last_model()  # the submitter and an admin may
        for a, b in zip(jax.tree_util.tree_leaves(mine.params), jax.tree_util.tree_leaves(bosses.params)):
            np.testing.assert_array_equal(a, b)

        queued = FLExperiment(federation=as_("api"), experiment_name="to-cancel")
        queued.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                     data_loader=SubsetDataset(limit=64), rounds_to_train=50, device_assignment_policy="CPU_ONLY")
        with pytest.raises(NotFoundError, match="may cancel it"):
            FLExperiment(federation=as_("colleague"), experiment_name="to-cancel").cancel()
        assert queued.cancel().error == "cancelled by api"
    finally:
        stack.stop()
