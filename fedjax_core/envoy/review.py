"""Manual review of experiments on an envoy (``settings.review: manual``).

The daemon and ``fedjax envoy review`` share a small private folder (0700) under the envoy's
work dir, ``<work_dir>/<envoy name>/review``:

- ``pending/<experiment>.json``: written by the daemon for each experiment it holds (name,
  submitter, the bundle's sha256, task names, package versions: all from the bundle's JSON
  header, nothing is unpickled);
- ``decisions/<experiment>.json``: written by the CLI (approve, or refuse with a reason), bound
  to the sha256 of the bundle that was reviewed; a decision for other bytes is ignored.

Every file is written to a temporary name and renamed, so neither side reads half a file.
The daemon looks for decisions every ``CHECK_S`` seconds (waiting on its stop event in
between); decisions stay on disk, so a restarted daemon does not ask again.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

CHECK_S = 2.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # the director's experiment names


class ReviewError(ValueError):
    """A review command that cannot be carried out; the message says why and what to do."""


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class ReviewDesk:
    """Pending experiments and the operator's decisions for one envoy."""

    def __init__(self, root: Path):
        self.root = root
        self.pending_dir, self.decisions_dir = root / "pending", root / "decisions"

    def open(self) -> ReviewDesk:
        """Create the folders, private to the daemon's user."""
        for path in (self.root, self.pending_dir, self.decisions_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        return self

    @staticmethod
    def _file(folder: Path, experiment: str) -> Path:
        if not _NAME.fullmatch(experiment):
            raise ReviewError(f"{experiment!r} is not an experiment name")
        return folder / f"{experiment}.json"

    # the daemon's side
    def hold(self, entry: dict[str, Any]) -> None:
        _write_json(self._file(self.pending_dir, entry["experiment"]), {**entry, "held_at": time.time()})

    def decision(self, experiment: str, sha256: str) -> dict[str, Any] | None:
        """The operator's decision on ``experiment`` with bundle ``sha256``, if there is one."""
        try:
            found = json.loads(self._file(self.decisions_dir, experiment).read_text())
        except (OSError, ValueError):
            return None
        return found if found.get("sha256") == sha256 else None

    def forget(self, experiment: str) -> None:
        self._file(self.pending_dir, experiment).unlink(missing_ok=True)

    def forget_all_but(self, experiment: str) -> list[str]:
        """Drop pending entries of other experiments (the director moved on); their names."""
        gone = [e["experiment"] for e in self.pending() if e["experiment"] != experiment]
        for name in gone:
            self.forget(name)
        return gone

    def pending(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.pending_dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced
        return out

    # the operator's side
    def decide(self, experiment: str, approve: bool, reason: str = "") -> dict[str, Any]:
        """Record a decision on a pending experiment; ReviewError when it is not pending."""
        entry = next((e for e in self.pending() if e["experiment"] == experiment), None)
        if entry is None:
            names = ", ".join(e["experiment"] for e in self.pending()) or "none"
            raise ReviewError(f"no experiment named {experiment!r} is pending review (pending: {names})")
        decision = {"experiment": experiment, "sha256": entry["sha256"], "approve": approve,
                    "reason": reason, "decided_at": time.time()}
        _write_json(self._file(self.decisions_dir, experiment), decision)
        return decision


def describe(entry: dict[str, Any]) -> str:
    """One pending experiment, for the log and for `fedjax envoy review`."""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(entry.get("versions", {}).items())) or "not recorded"
    return (f"experiment {entry['experiment']!r} from submitter {entry.get('submitter', '?')!r}\n"
            f"  bundle sha256: {entry['sha256']} ({entry.get('bundle_bytes', '?')} bytes)\n"
            f"  tasks: {', '.join(entry.get('tasks') or []) or 'not recorded'}\n"
            f"  device policy: {entry.get('device_assignment_policy', '?')}\n"
            f"  notebook versions: {versions}")


def desks(work_dir: Path, name: str | None) -> ReviewDesk:
    """The review desk of envoy ``name`` under ``work_dir`` (the only one there when ``name`` is None)."""
    if name is not None:
        root = work_dir / name / "review"
        if not root.is_dir():
            raise ReviewError(f"{root} does not exist: is envoy {name!r} started with this config and "
                              "settings.review: manual?")
        return ReviewDesk(root)
    found = sorted(p.parent.name for p in work_dir.glob("*/review") if p.is_dir())
    if not found:
        raise ReviewError(f"no envoy under {work_dir} has held an experiment for review (is the daemon started "
                          "with settings.review: manual?)")
    if len(found) > 1:
        raise ReviewError(f"several envoys share {work_dir} ({', '.join(found)}): choose one with -n NAME")
    return ReviewDesk(work_dir / found[0] / "review")
