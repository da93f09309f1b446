"""``python -m fedjax_core``: configuration mistakes end with exit 2 and a message that says what to fix.

Also: the director and envoy daemons never import JAX.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DIRECTOR_YAML = """\
settings:
  listen_host: 127.0.0.1
  listen_port: 0
  sample_shape: ['32', '32', '3']
  target_shape: ['1']
"""

ENVOY_YAML = """\
params:
  cuda_devices: []
optional_plugin_components: {}
shard_descriptor:
  template: TEMPLATE
  params:
    rank_worldsize: 1, 2
"""


def fedjax(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "fedjax_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _assert_clean_exit(proc: subprocess.CompletedProcess, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr


def test_director_missing_config_file(tmp_path):
    proc = fedjax(tmp_path, "director", "start", "-c", "missing_config.yaml", "--disable-tls")
    _assert_clean_exit(proc)
    assert str(tmp_path / "missing_config.yaml") in proc.stderr
    assert not (tmp_path / "director_state").exists()


def test_director_unknown_key(tmp_path):
    config = _write(tmp_path / "d.yaml", DIRECTOR_YAML.replace("listen_port:", "listen_prot:"))
    proc = fedjax(tmp_path, "director", "start", "-c", str(config), "--disable-tls")
    _assert_clean_exit(proc)
    assert "settings.listen_prot" in proc.stderr
    assert "unknown key" in proc.stderr
    assert "listen_port" in proc.stderr
    assert not (tmp_path / "director_state").exists()  # validated before any side effect


def test_director_wrong_type(tmp_path):
    config = _write(tmp_path / "d.yaml", DIRECTOR_YAML.replace("listen_port: 0", "listen_port: abc"))
    proc = fedjax(tmp_path, "director", "start", "-c", str(config), "--disable-tls")
    _assert_clean_exit(proc)
    assert "settings.listen_port" in proc.stderr
    assert "abc" in proc.stderr


def test_director_without_tls_needs_disable_tls(tmp_path):
    config = _write(tmp_path / "d.yaml", DIRECTOR_YAML)
    proc = fedjax(tmp_path, "director", "start", "-c", str(config))
    _assert_clean_exit(proc)
    assert "--disable-tls" in proc.stderr
    assert "fedjax pki" in proc.stderr
    assert "DIRECTOR READY" not in proc.stdout
    assert not (tmp_path / "director_state").exists()


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_envoy_bad_director_port(tmp_path, port):
    config = _write(tmp_path / "e.yaml", ENVOY_YAML.replace("TEMPLATE", "nosuch.Descriptor"))
    proc = fedjax(tmp_path, "envoy", "start", "-n", "env1", "-c", str(config), "-dp", port, "--disable-tls")
    _assert_clean_exit(proc)
    assert "usage:" in proc.stderr  # argparse's error, before anything starts
    assert "-dp/--director-port" in proc.stderr
    assert port in proc.stderr


def test_envoy_unknown_shard_module(tmp_path):
    template = "no_such_descriptor_module.MyShardDescriptor"
    config = _write(tmp_path / "e.yaml", ENVOY_YAML.replace("TEMPLATE", template))
    proc = fedjax(tmp_path, "envoy", "start", "-n", "env1", "-c", str(config), "--disable-tls")
    _assert_clean_exit(proc)
    assert template in proc.stderr
    assert "shard_descriptor" in proc.stderr


def test_envoy_unknown_shard_class(tmp_path):
    (tmp_path / "my_descriptors.py").write_text("X = 1\n")
    template = "my_descriptors.MissingDescriptor"
    config = _write(tmp_path / "e.yaml", ENVOY_YAML.replace("TEMPLATE", template))
    proc = fedjax(tmp_path, "envoy", "start", "-n", "env1", "-c", str(config), "--disable-tls")
    _assert_clean_exit(proc)
    assert template in proc.stderr
    assert "MissingDescriptor" in proc.stderr


def test_envoy_without_tls_needs_disable_tls(tmp_path):
    config = _write(tmp_path / "e.yaml", ENVOY_YAML.replace("TEMPLATE", "nosuch.Descriptor"))
    proc = fedjax(tmp_path, "envoy", "start", "-n", "env1", "-c", str(config))
    _assert_clean_exit(proc)
    assert "--disable-tls" in proc.stderr


def test_partial_tls_flags_are_refused(tmp_path):
    config = _write(tmp_path / "d.yaml", DIRECTOR_YAML)
    proc = fedjax(tmp_path, "director", "start", "-c", str(config), "-rc", "ca.crt")
    _assert_clean_exit(proc)
    assert "--public-cert-path" in proc.stderr and "--private-key-path" in proc.stderr


def test_daemons_never_import_jax():
    """Nor dp-accounting and SciPy (77 MiB of a director's memory), loaded by the first DP experiment's accounting."""
    code = textwrap.dedent("""
        import sys
        import fedjax_core.director.server
        import fedjax_core.envoy.daemon
        import fedjax_core.cli
        import fedjax_core
        heavy = sorted(m for m in sys.modules
                       if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'dp_accounting', 'scipy'))
        print('HEAVY=' + ','.join(heavy))
        assert 'jax' not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout


def test_pki_help_says_what_each_option_does_and_its_default(tmp_path):
    text = " ".join(fedjax(tmp_path, "pki", "certify", "--help").stdout.split())
    assert "'api' for the notebook" in text and "(default: pki)" in text and "root CA" in text
    assert "(default: pki)" in " ".join(fedjax(tmp_path, "pki", "init", "--help").stdout.split())


def test_log_level_is_accepted_after_the_start_subcommand_and_from_the_environment(tmp_path):
    from fedjax_core.cli import build_parser, main

    args = build_parser().parse_args(["director", "start", "-c", "x.yaml", "--log-level", "DEBUG"])
    assert args.start_log_level == "DEBUG"
    os.environ["FEDJAX_LOG_LEVEL"] = "LOUD"
    try:
        assert main(["pki", "init", "--dir", str(tmp_path / "pki")]) == 2
    finally:
        del os.environ["FEDJAX_LOG_LEVEL"]


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("192.0.2.10", False), ("::", False)])
def test_loopback_detection(host, loopback):
    from fedjax_core.transport import is_loopback

    assert is_loopback(host) is loopback


def test_plaintext_is_refused_off_loopback_unless_the_operator_insists(tmp_path):
    (tmp_path / "director.yaml").write_text(DIRECTOR_YAML.replace("127.0.0.1", "0.0.0.0"))
    result = fedjax(tmp_path, "director", "start", "-c", "director.yaml", "--disable-tls")
    assert result.returncode == 2
    assert "--disable-tls would listen on '0.0.0.0', which is not a loopback address" in result.stderr
    assert "fedjax pki init" in result.stderr and "--allow-remote-plaintext" in result.stderr
    (tmp_path / "envoy.yaml").write_text(ENVOY_YAML.replace("TEMPLATE", "nowhere.Nothing"))
    result = fedjax(tmp_path, "envoy", "start", "-n", "e", "-c", "envoy.yaml", "-dh", "192.0.2.10", "--disable-tls")
    assert result.returncode == 2
    assert "--disable-tls would talk to a director at '192.0.2.10'" in result.stderr

    from fedjax_core.cli import _check_plaintext, build_parser

    insist = build_parser().parse_args(["director", "start", "-c", "x", "--disable-tls", "--allow-remote-plaintext"])
    _check_plaintext(insist, "0.0.0.0", "listen on")  # no error: the operator insisted


def test_pki_certify_puts_the_role_in_the_certificate(tmp_path):
    from fedjax_core import pki

    assert fedjax(tmp_path, "pki", "init", "--dir", "pki").returncode == 0
    made = fedjax(tmp_path, "pki", "certify", "--dir", "pki", "--name", "d.example.org", "--role", "director",
                  "--san", "10.0.0.5")
    assert made.returncode == 0 and "pki/d.example.org.crt (role director)" in made.stdout, made.stderr
    for name, role in (("env_one", "envoy"), ("api", "api")):  # the defaults
        assert f"(role {role})" in fedjax(tmp_path, "pki", "certify", "--dir", "pki", "--name", name).stdout
    for name, role in (("d.example.org", "director"), ("env_one", "envoy"), ("api", "api")):
        assert pki.identity((tmp_path / "pki" / f"{name}.crt").read_bytes()) == pki.Identity(name, role)
    refused = fedjax(tmp_path, "pki", "certify", "--dir", "pki", "--name", "env_two", "--san", "10.0.0.6")
    _assert_clean_exit(refused, 1)
    assert "--san is for the director's certificate" in refused.stderr
    text = " ".join(fedjax(tmp_path, "pki", "certify", "--help").stdout.split())
    assert "default: api for --name api, envoy for any other name" in text and "--role director" in text


DESCRIPTOR = """\
import numpy as np
from fedjax_core.shard_descriptor import ShardDescriptor


class Shard(ShardDescriptor):
    def __init__(self, rank_worldsize="1, 1"):
        pass

    def get_split(self, name):
        return {"image": np.zeros((4, 32, 32, 3), np.float32), "label": np.zeros(4, np.int32)}

    sample_shape = ['32', '32', '3']
    target_shape = ['1']
    dataset_description = "four zeros"

    def label_counts(self):
        return COUNTS
"""


@pytest.mark.parametrize("counts, why", [
    ("{0: 4, 1: 0}", r"Shard.label_counts\(\) returned \{0: 4, 1: 0\} \(dict\); it must return a list with one count "
                     r"per class"),
    ("[4, -1]", r"Shard.label_counts\(\) returned \[4, -1\] \(list\)"),
])
def test_envoy_refuses_a_descriptor_value_it_would_misread(tmp_path, counts, why):
    (tmp_path / "bad_shard.py").write_text(DESCRIPTOR.replace("COUNTS", counts))
    config = _write(tmp_path / "e.yaml", ENVOY_YAML.replace("TEMPLATE", "bad_shard.Shard"))
    proc = fedjax(tmp_path, "envoy", "start", "-n", "env1", "-c", str(config), "-dp", "1", "--disable-tls")
    _assert_clean_exit(proc)
    assert re.search(why, proc.stderr), proc.stderr


def test_log_file_gets_the_daemons_log_and_rotates(tmp_path):
    from fedjax_core.local import Process

    config = _write(tmp_path / "director.yaml", DIRECTOR_YAML)
    log = tmp_path / "director.log"
    director = Process([sys.executable, "-m", "fedjax_core", "director", "start", "-c", str(config), "--disable-tls",
                        "--log-file", str(log), "--log-max-mb", "0.0005", "--log-backups", "2"],
                       cwd=tmp_path, name="director")
    try:
        director.wait_for("DIRECTOR READY")
        logged = "".join(p.read_text() for p in tmp_path.glob("director.log*"))
        assert "director listening on 127.0.0.1:" in logged  # what stdout says, in the file too
        assert (tmp_path / "director.log.1").exists()  # 512 bytes each: the start-up lines already rotated
        assert not (tmp_path / "director.log.3").exists()  # --log-backups 2 keeps two
    finally:
        director.stop()


def test_a_log_file_in_a_missing_folder_is_refused_before_starting(tmp_path):
    config = _write(tmp_path / "director.yaml", DIRECTOR_YAML)
    proc = fedjax(tmp_path, "director", "start", "-c", str(config), "--disable-tls", "--log-file",
                  str(tmp_path / "nowhere" / "d.log"))
    _assert_clean_exit(proc)
    assert "the folder" in proc.stderr and "does not exist" in proc.stderr
