"""The worker's sandbox, piece by piece: which rules a policy holds, what a sandboxed process can and
cannot do (each case in a process of its own, as Landlock cannot be undone), and the daemon's refusal
to start where the kernel offers no sandbox."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedjax_core.config import ConfigError, EnvoyConfig
from fedjax_core.envoy import landlock, sandbox
from fedjax_core.envoy.daemon import sandbox_policy

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> Path:
    """A config folder as operators keep them: the descriptor, its data, the config and keys beside."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.bin").write_bytes(b"records")
    (root / "certs").mkdir()
    (root / "certs" / "env1.key").write_text("PRIVATE")
    (root / "certs" / "root_ca.crt").write_text("PUBLIC")
    (root / "descriptor.py").write_text("class D: pass\n")
    (root / "helper_pkg").mkdir()
    (root / "helper_pkg" / "__init__.py").write_text("VALUE = 7\n")
    (root / "envoy_config.yaml").write_text("secret: yes\n")
    (root / "other_envoy.key").write_text("PRIVATE TOO")
    (root / "notes.txt").write_text("not the descriptor's")
    (root / "work").mkdir()
    return root


def test_a_folder_holding_a_denied_path_is_opened_up_around_it(tmp_path):
    root = tree(tmp_path / "cfg")
    rules = dict(sandbox.grant(root, landlock.READ, denied=[root / "envoy_config.yaml", root / "certs" / "env1.key",
                                                            root / "work"]))
    assert rules[str(root)] == landlock.LIST and rules[str(root / "certs")] == landlock.LIST
    assert rules[str(root / "data")] == rules[str(root / "descriptor.py")] == landlock.READ
    assert rules[str(root / "certs" / "root_ca.crt")] == landlock.READ
    for hidden in ("envoy_config.yaml", "certs/env1.key", "other_envoy.key", "work"):  # named, or named like a key
        assert str(root / hidden) not in rules
    assert sandbox.grant(root / "work" / "x", landlock.READ, denied=[root / "work"]) == []  # inside a denied path
    link = root / "data" / "to_key"
    link.symlink_to(root / "certs" / "env1.key")
    assert sandbox.grant(link, landlock.READ, denied=[root / "certs" / "env1.key"]) == []  # links resolve first


def test_the_descriptor_gets_its_code_and_the_data_its_params_name(tmp_path):
    root = tree(tmp_path / "cfg")
    found = set(sandbox.descriptor_paths(root, {"data_dir": "data", "files": ["notes.txt", "missing.bin"], "n": 3}))
    assert found == {root / "descriptor.py", root / "helper_pkg", root / "data", root / "notes.txt"}


def run_sandboxed(policy: sandbox.Policy, body: str) -> subprocess.CompletedProcess:
    """``body`` in a fresh Python that entered ``policy`` first; it prints one JSON line."""
    script = textwrap.dedent("""
        import json, os, sys
        from pathlib import Path
        from fedjax_core.envoy import sandbox
        sandbox.enter(sandbox.Policy.read(Path(sys.argv[1])))
        def tried(f):
            try:
                f()
                return True
            except OSError:
                return False
    """) + textwrap.dedent(body)
    policy_file = Path(policy.rules[-1][0]) / "policy.json"
    policy_file.write_text(json.dumps(policy.as_json()))
    return subprocess.run([sys.executable, "-s", "-c", script, str(policy_file)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


needs_landlock = pytest.mark.skipif(sys.platform != "linux", reason="Landlock is Linux's")


@needs_landlock
def test_a_sandboxed_process_reads_what_it_needs_and_writes_only_its_folder(tmp_path):
    root = tree(tmp_path / "cfg")
    own = tmp_path / "run"
    own.mkdir()
    policy = sandbox.policy_for(abi=landlock.abi_version(), config_dir=root, denied=[root / "envoy_config.yaml",
                                root / "work"], shard_params={"data_dir": "data"}, gpus=False).with_folder(own)
    done = run_sandboxed(policy, f"""
        root, own = Path({str(root)!r}), Path({str(own)!r})
        sys.path.insert(0, str(root))
        sandbox.ModulesBeside(root).install()
        import descriptor, helper_pkg, numpy  # the descriptor and a package beside it; numpy's threads start inside
        print(json.dumps({{
            "data": tried(lambda: (root / "data" / "train.bin").read_bytes()),
            "own_write": tried(lambda: (own / "out.txt").write_text("ok")),
            "helper": helper_pkg.VALUE,
            "config": tried(lambda: (root / "envoy_config.yaml").read_text()),
            "key": tried(lambda: (root / "certs" / "env1.key").read_text()),
            "key_beside": tried(lambda: (root / "other_envoy.key").read_text()),
            "notes": tried(lambda: (root / "notes.txt").read_text()),
            "listing": tried(lambda: os.listdir(root)),
            "write_beside": tried(lambda: (root / "sitecustomize.py").write_text("x")),
            "tmp": tried(lambda: open("/tmp/fedjax-sandbox-test", "w")),
            "shadow": tried(lambda: open("/etc/shadow").read()),
            "etc": tried(lambda: open("/etc/hostname").read()),
            "parent_environ": tried(lambda: open(f"/proc/{{os.getppid()}}/environ").read()),
        }}))
    """)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen == {"data": True, "own_write": True, "helper": 7, "etc": True, "config": False, "key": False,
                    "key_beside": False, "notes": False, "listing": False, "write_beside": False, "tmp": False,
                    "shadow": False, "parent_environ": False}


@needs_landlock
def test_a_process_with_threads_refuses_to_enter(tmp_path):
    policy = sandbox.Policy(rules=((str(tmp_path), landlock.READ_WRITE),), abi=landlock.abi_version())
    script = ("import threading; from fedjax_core.envoy import sandbox\n"  # a thread that never ends on its own
              "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
              f"sandbox.enter(sandbox.Policy(rules={policy.rules!r}, abi={policy.abi}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "threads when entering its sandbox" in done.stderr


def test_a_permission_error_in_experiment_code_is_explained():
    policy = sandbox.Policy(rules=(), abi=1)
    try:
        try:
            raise PermissionError(13, "Permission denied", "/srv/labels.csv")
        except PermissionError as denied:
            raise RuntimeError("the descriptor could not load its labels") from denied
    except RuntimeError as exc:
        hint = sandbox.explain(exc, policy)
    assert "(/srv/labels.csv)" in hint and "settings.sandbox.read_paths" in hint
    assert sandbox.explain(RuntimeError("a task failed"), policy) == ""  # no permission error in the chain
    assert sandbox.explain(PermissionError(13, "denied"), None) == ""  # unsandboxed: the sandbox did not do it


def config(**sandbox_settings) -> EnvoyConfig:
    return EnvoyConfig.model_validate({"settings": {"sandbox": sandbox_settings},
                                       "shard_descriptor": {"template": "descriptor.D"}})


def test_without_landlock_the_daemon_refuses_to_start_unless_the_operator_opts_out(tmp_path, monkeypatch):
    def unavailable():
        raise landlock.LandlockUnavailable("the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK)")

    monkeypatch.setattr(landlock, "abi_version", unavailable)
    with pytest.raises(ConfigError, match=r"settings.sandbox: this machine cannot sandbox experiment code: the kernel "
                                          r"was built without Landlock.*experiment_code_may_read_envoy_secrets: true"):
        sandbox_policy(config(), tmp_path, None, None, tmp_path / "work" / "env1")
    assert sandbox_policy(config(experiment_code_may_read_envoy_secrets=True), tmp_path, None, None,
                          tmp_path / "work" / "env1") is None


def test_sandbox_paths_must_exist(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"settings.sandbox.read_paths\[1\]: .*missing is not an existing file"):
        sandbox_policy(config(read_paths=["file.txt", "missing"]), tmp_path, None, None, tmp_path / "w" / "e")
    with pytest.raises(ConfigError, match=r"settings.sandbox.write_paths\[0\]: .*file.txt is not an existing folder"):
        sandbox_policy(config(write_paths=["file.txt"]), tmp_path, None, None, tmp_path / "w" / "e")
    with pytest.raises(ValueError, match="experiment_code_may_read_envoy_secrets"):
        config(experiment_code_may_read_envoy_secrets="yes")  # strict: a typo cannot turn the sandbox off


def test_links_back_up_the_tree_are_followed_once(tmp_path):
    root = tree(tmp_path / "cfg")
    (root / "data" / "latest").symlink_to(root)  # data/latest -> the config folder itself
    rules = dict(sandbox.grant(root, landlock.READ, denied=[root / "envoy_config.yaml"]))
    assert rules[str(root)] == landlock.LIST and str(root / "envoy_config.yaml") not in rules


def test_only_pythons_own_folders_are_granted_not_every_sys_path_entry(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"  # e.g. PYTHONPATH=/srv/checkout, which holds configs and state
    checkout.mkdir()
    monkeypatch.syspath_prepend(str(checkout))
    paths = {str(p) for p in sandbox.python_paths()}
    assert str(checkout) not in paths
    assert sys.prefix in paths and any(p.endswith("site-packages") for p in paths)
    import fedjax_core

    assert str(Path(fedjax_core.__file__).parent) in paths  # an editable install's package folder


def test_files_not_everyone_may_read_are_found(tmp_path):
    (tmp_path / "public.conf").write_text("x")
    (tmp_path / "admin.conf").write_text("token")
    (tmp_path / "admin.conf").chmod(0o600)
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "private" / "inside").write_text("y")
    found = sandbox.not_world_readable(tmp_path)
    assert sorted(found) == [tmp_path / "admin.conf", tmp_path / "private"]


def test_unix_sockets_are_found_where_services_keep_them(tmp_path):
    import socket

    (tmp_path / "a").mkdir()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "a" / "b.sock"))
        assert sandbox.unix_sockets([str(tmp_path)]) == [str(tmp_path / "a" / "b.sock")]
        assert sandbox.unix_sockets([str(tmp_path)], depth=0) == []  # files of the folder itself only
