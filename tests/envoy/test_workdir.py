"""The envoy's work dir: a folder per worker with private files, no folder named after an experiment,
and nothing of an experiment's code left once its worker is gone (or its daemon died)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedjax_core.envoy import landlock
from fedjax_core.envoy.sandbox import POLICY_FILE, Policy
from fedjax_core.envoy.workdir import WorkDir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_run_gets_private_copies_of_the_bundle_and_spec_and_loses_them_at_its_end(tmp_path):
    policy = Policy(rules=(("/usr", landlock.READ),), abi=3)
    workdir = WorkDir(tmp_path / "env1", None, policy).open()
    workdir.bundle("exp-1").write_bytes(b"code")
    run = workdir.new_run()
    assert run.parent == workdir.runs and mode(run) == 0o700 and mode(workdir.bundles) == 0o700
    written = json.loads((run / POLICY_FILE).read_text())
    assert written["rules"] == [["/usr", landlock.READ], [str(run), landlock.READ_WRITE]]  # its own folder added
    assert workdir.environment(run) == {"TMPDIR": str(run / "tmp"), "HOME": str(run / "home")}

    spec_path = workdir.fill_run(run, "exp-1", {"experiment": "exp-1"})
    assert (run / "bundle.bin").read_bytes() == b"code"
    assert json.loads(spec_path.read_text()) == {"experiment": "exp-1", "bundle_path": str(run / "bundle.bin")}
    assert mode(run / "bundle.bin") == mode(spec_path) == mode(run / POLICY_FILE) == 0o600
    (run / "tmp" / "scratch").write_text("x")
    (run / "result.txt").write_text("what the experiment wrote")

    workdir.close_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["home", "result.txt"]
    workdir.discard_bundle("exp-1")
    assert list(workdir.bundles.iterdir()) == []


def test_experiment_names_never_name_the_daemons_folders(tmp_path):
    workdir = WorkDir(tmp_path / "env1", None, None).open()
    assert workdir.bundle("review") == workdir.bundles / "review.bin"
    for bad in ("../review", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(ValueError, match="is not an experiment name"):
            workdir.bundle(bad)
    assert workdir.environment(workdir.new_run()).keys() == {"TMPDIR"}  # unsandboxed: the account's HOME stays


def test_files_are_written_as_new_files_never_through_a_link(tmp_path):
    workdir = WorkDir(tmp_path / "env1", None, None).open()
    workdir.bundle("exp").write_bytes(b"code")
    run = workdir.new_run()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (run / "worker.json").symlink_to(victim)  # left by whoever could write the folder
    workdir.fill_run(run, "exp", {})
    assert victim.read_text() == "untouched" and not (run / "worker.json").is_symlink()


def test_a_restarted_daemon_sweeps_what_a_dead_one_left(tmp_path):
    workdir = WorkDir(tmp_path / "env1", None, None).open()
    workdir.bundle("exp").write_bytes(b"code")
    run = workdir.new_run()
    workdir.fill_run(run, "exp", {})
    legacy = tmp_path / "env1" / "old-experiment"  # the layout before runs/: a folder per experiment name
    legacy.mkdir()
    (legacy / "bundle.bin").write_bytes(b"old code")
    (legacy / "worker.json").write_text("{}")

    WorkDir(tmp_path / "env1", None, None).open()
    assert list(workdir.bundles.iterdir()) == []
    assert not (run / "bundle.bin").exists() and not (run / "worker.json").exists()
    assert list(legacy.iterdir()) == []
    assert mode(tmp_path / "env1") == mode(workdir.runs) == 0o711  # a worker account passes to its folder only
