"""The tutorial's start scripts: from their own folder or anywhere, with clear failures."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from processes import REPO, Process, copy_tutorial, free_port

FEDJAX_BIN = str(Path(sys.executable).parent / "fedjax")


def run_script(args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def test_scripts_start_from_their_own_folder_and_a_second_envoy_from_another_copy(tmp_path):
    port = free_port()
    director_dir, envoy_dir = copy_tutorial(tmp_path, port)
    second_copy = Path(shutil.copytree(envoy_dir, tmp_path / "elsewhere" / "envoy"))
    env = {"FEDJAX_BIN": FEDJAX_BIN}
    processes = []
    try:
        director = Process(["./start_director.sh"], cwd=director_dir, env=env, name="director")
        processes.append(director)
        director.wait_for("DIRECTOR READY")
        assert f"TensorBoard logs in {director_dir}/logs" in director.output()
        processes.append(Process(["./start_envoy.sh", "env_one", "envoy_config.yaml", "-dp", str(port)],
                                 cwd=envoy_dir, env=env, name="env_one"))
        processes.append(Process([str(second_copy / "start_envoy.sh"), "env_two", "envoy_config_2.yaml",
                                  "-dh", "127.0.0.1", "-dp", str(port)], cwd=tmp_path, env=env, name="env_two"))
        for envoy in processes[1:]:
            envoy.wait_for("ENVOY READY")
        assert f"work files in {second_copy}/envoy_workspace/env_two" in processes[2].output()

        from fedjax_core import Federation

        registry = Federation(director_node_fqdn="127.0.0.1", director_port=port, tls=False).get_shard_registry()
        assert {name: entry["shard_info"]["n_samples"]["train"] for name, entry in registry.items()} == \
            {"env_one": 2585, "env_two": 2585}
    finally:
        for p in reversed(processes):
            p.stop()


def test_missing_config_is_a_clear_error(tmp_path):
    result = run_script([str(REPO / "envoy" / "start_envoy.sh"), "env_one", "no_such.yaml"], cwd=tmp_path)
    assert result.returncode == 1
    assert "envoy config not found" in result.stderr and "no_such.yaml" in result.stderr
    result = run_script([str(REPO / "director" / "start_director.sh")], cwd=tmp_path,
                        env={"DIRECTOR_CONFIG": str(tmp_path / "missing.yaml")})
    assert result.returncode == 1 and "director config not found" in result.stderr


def test_missing_install_is_a_clear_error(tmp_path):
    """Copies outside the repository find no .venv; with no fedjax on PATH they say to run make install."""
    director_dir, envoy_dir = copy_tutorial(tmp_path, free_port())
    env = {"FEDJAX_BIN": str(tmp_path / "nowhere" / "fedjax"), "PATH": "/usr/bin:/bin"}
    for args, cwd in ((["./start_director.sh"], director_dir),
                      (["./start_envoy.sh", "env_one", "envoy_config.yaml"], envoy_dir)):
        result = run_script(args, cwd=cwd, env=env)
        assert result.returncode == 1
        assert "fedjax is not installed here: run 'make install'" in result.stderr


def test_usage_without_arguments(tmp_path):
    result = run_script([str(REPO / "envoy" / "start_envoy.sh")], cwd=tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_a_config_with_a_tls_section_runs_mtls_unless_plaintext_is_asked_for(tmp_path):
    """The start scripts choose TLS from the config (a filled-in tls: section never runs plaintext
    silently), say which they chose and why, and FEDJAX_TLS=0 forces plaintext."""
    import yaml

    from fedjax_core import Federation, pki

    port = free_port()
    director_dir, envoy_dir = copy_tutorial(tmp_path, port)
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir)
    for name, role in (("localhost", "director"), ("env_one", "envoy"), ("api", "api")):
        pki.certify(pki_dir, name, role=role)
    for config, name in ((director_dir / "director_config.yaml", "localhost"), (envoy_dir / "envoy_config.yaml", "env_one")):
        data = yaml.safe_load(config.read_text())
        data["tls"] = {"root_certificate": "../pki/root_ca.crt", "certificate": f"../pki/{name}.crt",
                       "private_key": f"../pki/{name}.key"}  # relative to the config file
        config.write_text(yaml.safe_dump(data))
    env = {"FEDJAX_BIN": FEDJAX_BIN}
    env.pop("FEDJAX_TLS", None)
    processes = []
    try:
        director = Process(["./start_director.sh"], cwd=director_dir, env=env, name="director")
        processes.append(director)
        director.wait_for("DIRECTOR READY")
        assert "director: mTLS (the config has a tls: section; FEDJAX_TLS=0 for plaintext)" in director.output()
        assert f"mTLS with certificate {pki_dir}/localhost.crt (from the config's tls: section)" in director.output()
        envoy = Process(["./start_envoy.sh", "env_one", "envoy_config.yaml", "-dp", str(port)], cwd=envoy_dir,
                        env=env, name="env_one")
        processes.append(envoy)
        envoy.wait_for("ENVOY READY")
        fed = Federation(director_node_fqdn="localhost", director_port=port, tls=True,
                         cert_chain=str(pki_dir / "root_ca.crt"), api_cert=str(pki_dir / "api.crt"),
                         api_private_key=str(pki_dir / "api.key"))
        assert list(fed.get_shard_registry()) == ["env_one"]
        fed.close()
        for p in reversed(processes):
            p.stop()
        plain = Process(["./start_director.sh"], cwd=director_dir, env={**env, "FEDJAX_TLS": "0"}, name="plain")
        processes.append(plain)
        plain.wait_for("DIRECTOR READY")
        assert "director: plaintext (FEDJAX_TLS=0)" in plain.output()
        assert "plaintext gRPC: --disable-tls was given" in plain.output()
    finally:
        for p in reversed(processes):
            p.stop()


def test_each_certificate_flag_overrides_the_configs_tls_section_on_its_own(tmp_path):
    from fedjax_core import pki
    from fedjax_core.cli import _tls, build_parser
    from fedjax_core.config import ConfigError, TLSConfig

    pki.init_ca(tmp_path / "pki")
    section = TLSConfig(root_certificate="pki/root_ca.crt", certificate="pki/old.crt", private_key="pki/old.key")
    args = build_parser().parse_args(["envoy", "start", "-n", "e", "-c", "x.yaml", "-pc", "/elsewhere/new.crt",
                                      "-pk", "/elsewhere/new.key"])
    files = _tls(args, section, tmp_path)
    assert (files.root_certificate, files.certificate, files.private_key) == (
        tmp_path / "pki" / "root_ca.crt", Path("/elsewhere/new.crt"), Path("/elsewhere/new.key"))
    with pytest.raises(ConfigError, match="--root-cert-path, --private-key-path missing"):
        _tls(build_parser().parse_args(["envoy", "start", "-n", "e", "-c", "x.yaml", "-pc", "a.crt"]), None, tmp_path)


def test_scripts_choose_tls_from_flags_and_the_environment(tmp_path):
    """What the scripts hand to fedjax, seen through a stand-in that prints its arguments."""
    fake = tmp_path / "fake_fedjax"
    fake.write_text("#!/bin/sh\necho \"ARGS: $*\"\n")
    fake.chmod(0o755)
    director_dir, envoy_dir = copy_tutorial(tmp_path, free_port())
    env = {"FEDJAX_BIN": str(fake)}
    cases = [  # (extra args, FEDJAX_TLS, expected choice, is --disable-tls passed)
        ([], None, "plaintext (the config has no tls: section", True),
        (["-rc", "ca.crt", "-pc", "me.crt", "-pk", "me.key"], None, "mTLS (certificates given on the command line)",
         False),
        (["--disable-tls"], "1", "plaintext (--disable-tls given)", True),
        ([], "1", "mTLS (FEDJAX_TLS=1)", False),
    ]
    for args, tls, choice, plaintext in cases:
        case_env = {**env, **({"FEDJAX_TLS": tls} if tls else {})}
        for script, cwd in ((["./start_director.sh"], director_dir),
                            (["./start_envoy.sh", "env_one", "envoy_config.yaml"], envoy_dir)):
            result = run_script([*script, *args], cwd=cwd, env=case_env)
            assert result.returncode == 0, result.stderr
            assert choice in result.stdout, (script, args, result.stdout)
            passed = result.stdout.split("ARGS: ", 1)[1]
            assert passed.count("--disable-tls") == (1 if plaintext else 0), (script, args, passed)
    result = run_script(["./start_director.sh"], cwd=director_dir, env={**env, "FEDJAX_TLS": "yes"})
    assert result.returncode == 2 and "FEDJAX_TLS must be 1 (mTLS) or 0 (plaintext), got 'yes'" in result.stderr
    relative = run_script([str(director_dir / "start_director.sh")], cwd=director_dir.parent,
                          env={**env, "DIRECTOR_CONFIG": "director/director_config.yaml"})
    assert f"-c {director_dir}/director_config.yaml" in relative.stdout  # made absolute before the script moves
