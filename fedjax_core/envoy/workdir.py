"""An envoy's work dir, ``<work_dir>/<envoy name>/``: what lives where, who may touch it, what is removed.

    review/              the review desk (review.py): the daemon's and the operator's, 0700
    worker-proxy/        the proxy's Unix socket (proxy.py): the worker's account may connect, 0700
    jax_cache/<sub>-<h>/ compiled programs of one submitter (params.jax_compilation_cache), 0700
    bundles/<exp>.bin    bundles as downloaded, checked and held for review: the daemon's only, 0700
    runs/<id>/           one folder per worker, the only place its experiment code may write:
        sandbox.json     what the worker may read and write (sandbox.py), written before it starts
        worker.json      its spec, and bundle.bin, a copy of the experiment's bundle (both 0600)
        tmp/, home/      its TMPDIR and HOME

Folders are never named after an experiment, so no experiment name can stand for the daemon's own
folders. A run's folder is made before its worker starts (a standby's before any experiment comes),
owned by the worker's account; its spec, bundle and temp files are removed when the worker exits, and
leftovers of a daemon that died are swept at the next start.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from fedjax_core.envoy.sandbox import POLICY_FILE, Policy

EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # the director's experiment names
SPEC_FILE, BUNDLE_FILE = "worker.json", "bundle.bin"


class WorkDir:
    """The layout above for one envoy; ``account`` is settings.worker_user's (uid, gid, home), or None."""

    def __init__(self, root: Path, account: tuple[int, int, str] | None, policy: Policy | None):
        self.root, self.account, self.policy = root, account, policy
        self.review, self.proxy = root / "review", root / "worker-proxy"
        self.cache_root, self.bundles, self.runs = root / "jax_cache", root / "bundles", root / "runs"

    def open(self) -> WorkDir:
        """Make the folders and sweep what a daemon that died left: bundles, specs and temp files."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path, mode in ((self.root, 0o711), (self.runs, 0o711), (self.bundles, 0o700)):
            path.mkdir(mode=mode, exist_ok=True)
            os.chmod(path, mode)  # the worker's account may pass through to its own run and socket only
        self.discard_bundles()
        for run in self.runs.iterdir():
            self.close_run(run)
        for legacy in self.root.glob(f"*/{BUNDLE_FILE}"):  # an experiment's folder of the layout before runs/
            legacy.unlink()
            (legacy.parent / SPEC_FILE).unlink(missing_ok=True)
        return self

    def private_dir(self, path: Path) -> Path:
        """``path`` made if missing, for the worker's account only (it writes there)."""
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        if self.account is not None:
            os.lchown(path, *self.account[:2])
        return path

    # --------------------------------------------------------------------------- bundles (daemon only)
    def bundle(self, experiment: str) -> Path:
        """Where ``experiment``'s bundle is kept while it is checked, held and run; ValueError for a name
        that the director would never have given."""
        if not EXPERIMENT_NAME.fullmatch(experiment):
            raise ValueError(f"{experiment!r} is not an experiment name (letters, digits, '_', '.', '-')")
        return self.bundles / f"{experiment}.bin"

    def discard_bundle(self, experiment: str | None) -> None:
        if experiment is not None and EXPERIMENT_NAME.fullmatch(experiment):
            self.bundle(experiment).unlink(missing_ok=True)

    def discard_bundles(self) -> None:
        for leftover in self.bundles.glob("*"):
            leftover.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ one folder a worker
    def new_run(self) -> Path:
        """A fresh folder for the next worker, with its sandbox policy, ``tmp/`` and ``home/``."""
        run = self.runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        self.private_dir(run)
        for sub in ("tmp", "home"):
            self.private_dir(run / sub)
        policy = {"unsandboxed": True} if self.policy is None else self.policy.with_folder(run).as_json()
        self._write(run / POLICY_FILE, json.dumps(policy).encode())
        return run

    def environment(self, run: Path) -> dict[str, str]:
        """What a worker's environment says about its folder: TMPDIR, and HOME inside the sandbox (the
        account's home is out of its reach)."""
        env = {"TMPDIR": str(run / "tmp")}
        if self.policy is not None:
            env["HOME"] = str(run / "home")
        return env

    def fill_run(self, run: Path, experiment: str, spec: dict) -> Path:
        """Put ``experiment``'s bundle and ``spec`` into ``run``; the spec's path."""
        with open(self.bundle(experiment), "rb") as source:
            self._write(run / BUNDLE_FILE, source)
        spec_path = run / SPEC_FILE
        self._write(spec_path, json.dumps({**spec, "bundle_path": str(run / BUNDLE_FILE)}).encode())
        return spec_path

    def close_run(self, run: Path) -> None:
        """Remove what the daemon put into ``run`` and the worker's temp files; the rest stays."""
        for name in (BUNDLE_FILE, SPEC_FILE, POLICY_FILE):
            (run / name).unlink(missing_ok=True)
        shutil.rmtree(run / "tmp", ignore_errors=True)

    def _write(self, path: Path, data) -> None:
        """A new 0600 file of the worker's account; never through a link someone left at ``path``."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                shutil.copyfileobj(data, f, 1 << 20)
            if self.account is not None:
                os.fchown(f.fileno(), *self.account[:2])
