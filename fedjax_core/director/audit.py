"""The director's audit trail: who submitted, cancelled or downloaded what, which envoys registered, whom the
director refused, from where and why.

Entries go to the director's database (append-only: SQLite triggers refuse changes), where ``fedjax audit`` reads
them over the GetAuditLog RPC, and, with ``settings.audit_log``, also as one JSON object per line to a file that
a log shipper can follow. What an entry says comes from the director (the caller's certificate name and address,
the bundle's hash it computed), never from what a client claims about itself; values a client chose (names,
refusal reasons quoting them) are cut to ``MAX_DETAIL_CHARS``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedjax_core import records as r
from fedjax_core.director.store_api import Store

log = logging.getLogger("fedjax.director")
MAX_DETAIL_CHARS = 4000
MAX_PAGE = 1000


class AuditTrail:
    def __init__(self, store: Store, clock: Callable[[], float], json_lines: Path | None = None):
        self.store = store
        self.clock = clock
        self.json_lines = json_lines
        self._file_lock = threading.Lock()
        if json_lines is not None:
            json_lines.parent.mkdir(parents=True, exist_ok=True)

    def record(self, action: r.AuditAction, actor: str | None, peer: str = "", experiment: str = "",
               **detail: Any) -> r.AuditEntry:
        """Append one entry, now; ``detail`` becomes its JSON object. Never raises for the file: a full disk
        must not refuse the call being audited (the database entry is the record; the file is a copy)."""
        text = json.dumps(detail, sort_keys=True, default=str)
        if len(text) > MAX_DETAIL_CHARS:
            text = json.dumps({"truncated": text[:MAX_DETAIL_CHARS]})
        entry = r.AuditEntry(action=str(action), actor=actor or "", peer=peer, experiment=experiment, detail=text,
                             timestamp=self.clock())
        entry = dataclasses.replace(entry, id=self.store.add_audit(entry))
        if self.json_lines is not None:
            self._append(entry)
        return entry

    def _append(self, entry: r.AuditEntry) -> None:
        line = json.dumps({"id": entry.id, "timestamp": entry.timestamp, "action": entry.action,
                           "actor": entry.actor, "peer": entry.peer, "experiment": entry.experiment,
                           "detail": json.loads(entry.detail)}, sort_keys=True)
        try:
            with self._file_lock, open(self.json_lines, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            log.error("could not append to the audit log %s (%s); the entry is in the database: %s",
                      self.json_lines, exc.strerror, line)

    def entries(self, viewer: str | None, since: float = 0.0, after_id: int = 0,
                limit: int = 100) -> tuple[list[r.AuditEntry], bool]:
        """Up to ``limit`` entries after ``after_id`` (at or after ``since``) that ``viewer`` may read (None: all,
        for an admin or in plaintext; else those it made or about its own experiments), and whether more follow."""
        limit = min(max(limit, 1), MAX_PAGE)
        found = self.store.audit(since, after_id, limit + 1, viewer)
        return found[:limit], len(found) > limit
