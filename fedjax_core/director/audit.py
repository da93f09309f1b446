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
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedjax_core import records as r
from fedjax_core.director.store_api import Store

log = logging.getLogger("fedjax.director")
MAX_DETAIL_CHARS = 4000
MAX_PAGE = 1000
MAX_NAME_CHARS = 256  # actor, peer and experiment as stored
REFUSALS_PER_MINUTE = 10  # refusal entries per caller (name and host); more in that minute are counted, not kept
MAX_TRACKED_CALLERS = 10_000


class AuditTrail:
    def __init__(self, store: Store, clock: Callable[[], float], json_lines: Path | None = None):
        self.store = store
        self.clock = clock
        self.json_lines = json_lines
        self._lock = threading.Lock()
        self._refusals: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # caller -> [window start, count]
        if json_lines is not None:
            json_lines.parent.mkdir(parents=True, exist_ok=True)

    def record(self, action: r.AuditAction, actor: str | None, peer: str = "", experiment: str = "",
               owner: str = "", **detail: Any) -> r.AuditEntry | None:
        """Append one entry, now; ``detail`` becomes its JSON object and ``owner`` (the experiment's submitter,
        who may read the entry) is kept beside it. Never raises: the action it records has happened, and a full
        disk must not turn it into an error; a write that fails is logged with the entry, and None returned."""
        text = json.dumps(detail, sort_keys=True, default=str)
        full, cut = text, MAX_DETAIL_CHARS
        while len(text) > MAX_DETAIL_CHARS:  # its start, as a string (escaping lengthens it: cut until it fits)
            text, cut = json.dumps({"truncated": full[:cut]}), cut * 3 // 4
        entry = r.AuditEntry(action=str(action), actor=(actor or "")[:MAX_NAME_CHARS], peer=peer[:MAX_NAME_CHARS],
                             experiment=experiment[:MAX_NAME_CHARS], detail=text, timestamp=self.clock())
        try:
            entry = dataclasses.replace(entry, id=self.store.add_audit(entry, owner[:MAX_NAME_CHARS]))
        except Exception as exc:  # noqa: BLE001 (sqlite3 and OS errors alike: see the docstring)
            log.error("could not record an audit entry in the database (%s): %s", exc, self._line(entry))
            return None
        if self.json_lines is not None:
            self._append(entry)
        return entry

    def refused(self, actor: str | None, peer: str, experiment: str = "", **detail: Any) -> None:
        """Record a refusal, at most REFUSALS_PER_MINUTE per caller (certificate name and host): a client that
        floods refused calls fills neither the table nor the disk. The first refusal over the limit says so."""
        host = peer.rsplit(":", 1)[0]
        now = self.clock()
        with self._lock:
            window = self._refusals.pop((actor or "", host), None)
            if window is None or now - window[0] >= 60:
                window = [now, 0]
            window[1] += 1
            self._refusals[(actor or "", host)] = window
            while len(self._refusals) > MAX_TRACKED_CALLERS:
                self._refusals.popitem(last=False)
            count = window[1]
        if count <= REFUSALS_PER_MINUTE:
            self.record(r.AuditAction.REFUSE, actor, peer, experiment, **detail)
        elif count == REFUSALS_PER_MINUTE + 1:
            self.record(r.AuditAction.REFUSE, actor, peer, experiment, **detail,
                        note=f"more than {REFUSALS_PER_MINUTE} refusals of this caller within a minute: the "
                             "others of that minute are not recorded")

    @staticmethod
    def _line(entry: r.AuditEntry) -> str:
        return json.dumps({"id": entry.id, "timestamp": entry.timestamp, "action": entry.action,
                           "actor": entry.actor, "peer": entry.peer, "experiment": entry.experiment,
                           "detail": json.loads(entry.detail)}, sort_keys=True)

    def _append(self, entry: r.AuditEntry) -> None:
        line = self._line(entry)
        try:
            with self._lock, open(self.json_lines, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            log.error("could not append to the audit log %s (%s); the entry is in the database: %s",
                      self.json_lines, exc.strerror, line)

    def entries(self, viewer: str | None, since: float = 0.0, after_id: int = 0,
                limit: int = 100) -> tuple[list[r.AuditEntry], bool]:
        """Up to ``limit`` entries after ``after_id`` (at or after ``since``) that ``viewer`` may read (None: all,
        for an admin or in plaintext; else those it made and those about the experiments it had submitted when
        they were recorded), and whether more follow."""
        limit = min(max(limit, 1), MAX_PAGE)
        found = self.store.audit(since, after_id, limit + 1, viewer)
        return found[:limit], len(found) > limit
