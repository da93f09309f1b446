"""The envoy's own record of what it ran and refused: ``<work_dir>/<envoy>/audit.jsonl``, one JSON object per line.

Each line says when, which experiment, who submitted it, the sha256 of the bundle this envoy checked and
consented to run (or why it refused), and how it was approved (automatically, or in review). The file is the
daemon's (0600, beside folders no worker can reach); a data owner reads it without asking the director.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("fedjax.envoy")
FILE = "audit.jsonl"


class EnvoyAudit:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def record(self, action: str, experiment: str, **detail) -> None:
        """Append one line; a write that fails is logged, never raised (the experiment's fate is decided)."""
        line = json.dumps({"timestamp": time.time(), "action": action, "experiment": experiment, **detail},
                          sort_keys=True)
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.fchmod(fd, 0o600)  # a file that existed keeps no wider mode
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
        except OSError as exc:
            log.error("could not append to %s (%s): %s", self.path, exc.strerror, line)

    def entries(self) -> list[dict]:
        """Every line so far (for tests and tools); a torn last line (a crash mid-write) is skipped."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
