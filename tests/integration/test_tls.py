"""Secure by default: a whole federation over mTLS, and envoys bound to their certificates."""
from __future__ import annotations

import pytest

from fedjax_core import FLExperiment, ModelInterface
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack


@pytest.fixture
def tls_stack(tmp_path):
    stack = Stack(tmp_path, tls=True)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        print(stack.logs())


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


@pytest.mark.parametrize("name", ["env1", "env9", "director"])
def test_only_the_notebooks_certificate_can_drive_experiments(tls_stack, name):
    """Envoy certificates (registered or not yet) and the director's own cannot submit code."""
    from fedjax_core import Federation, pki
    from fedjax_core.errors import PermissionDeniedError

    if name == "env9":
        pki.certify(tls_stack.pki, name)  # issued, never registered
    with pytest.raises(PermissionDeniedError, match=f"certificate '{name}' may not use the notebook API; "
                                                    r"this director allows api \(settings.submitters"):
        Federation(director_node_fqdn="127.0.0.1", director_port=tls_stack.port, tls=True,
                   cert_chain=str(tls_stack.pki / "root_ca.crt"), api_cert=str(tls_stack.pki / f"{name}.crt"),
                   api_private_key=str(tls_stack.pki / f"{name}.key"))
    tls_stack.director.wait_for(rf"refused a call from ipv4:127\.0\.0\.1:\d+ \(certificate '{name}'\): "
                                "the client certificate")


def test_envoy_cannot_use_another_envoys_name(tls_stack):
    impostor = tls_stack.start_envoy(1, name="env1")  # env2's certificate, env1's name
    assert impostor.proc.wait(timeout=60) != 0
    impostor.wait_for(r"certificate is for 'env2', not for envoy 'env1'")
    tls_stack.director.wait_for(r"refused .* \(certificate 'env2'\): the client certificate is for 'env2'")


def test_a_plaintext_notebook_against_an_mtls_director_is_told_to_use_tls(tls_stack):
    from fedjax_core import Federation

    with pytest.raises(ConnectionError, match=r"most likely runs mTLS\. Connect with Federation\(\.\.\., tls=True"):
        Federation(director_node_fqdn="127.0.0.1", director_port=tls_stack.port, tls=False, timeout_s=5)
    tls_stack.director.stop()
    assert "Handshake failed" not in tls_stack.director.output()  # gRPC's own noise stays out of the default log


def test_an_mtls_notebook_against_a_plaintext_director_is_told_to_use_plaintext(tmp_path):
    from fedjax_core import Federation, pki

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
    import yaml

    from fedjax_core import Federation, pki
    from fedjax_core.errors import PermissionDeniedError

    stack = Stack(tmp_path, n_envoys=1, tls=True)
    config = yaml.safe_load(stack.director_config.read_text())
    config["settings"].update(submitters=["api", "colleague", "boss"], admins=["boss"])
    stack.director_config.write_text(yaml.safe_dump(config))
    for name in ("colleague", "boss"):
        pki.certify(stack.pki, name)

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
        with pytest.raises(PermissionDeniedError, match="submitted by 'api'; only that certificate or one in "
                                                        r"settings.admins may download its models \(the caller is "
                                                        "'colleague'\\)"):
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
        with pytest.raises(PermissionDeniedError, match="may cancel it"):
            FLExperiment(federation=as_("colleague"), experiment_name="to-cancel").cancel()
        assert queued.cancel().error == "cancelled by api"
    finally:
        stack.stop()
