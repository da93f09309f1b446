"""The director's audit trail (director/audit.py): bounded entries, rate-limited refusals, the JSON-lines copy,
and a failing store that does not turn an audited action into an error."""
from __future__ import annotations

import json

from fedjax_core import records as r
from fedjax_core.director import audit as audit_module
from fedjax_core.director.audit import AuditTrail
from fedjax_core.director.memory_store import MemoryStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_are_bounded_and_copied_to_json_lines(tmp_path):
    trail = AuditTrail(MemoryStore(), Clock(), tmp_path / "audit" / "trail.jsonl")
    entry = trail.record(r.AuditAction.SUBMIT, "a" * 100_000, "ipv4:10.0.0.1:5", "x" * 5000, owner="alice",
                         envoys=["e"] * 10_000)
    assert len(entry.actor) == len(entry.experiment) == audit_module.MAX_NAME_CHARS
    assert len(entry.detail) <= audit_module.MAX_DETAIL_CHARS and "truncated" in json.loads(entry.detail)
    [line] = (tmp_path / "audit" / "trail.jsonl").read_text().splitlines()
    assert json.loads(line)["id"] == entry.id == 1 and json.loads(line)["actor"] == entry.actor


def test_refusals_of_one_caller_are_kept_at_most_ten_a_minute(tmp_path):
    store, clock = MemoryStore(), Clock()
    trail = AuditTrail(store, clock)
    for i in range(500):  # a client varying its refused requests
        trail.refused("mallory", f"ipv4:10.0.0.9:{40000 + i}", reason=f"envoy name attempt {i}")
    trail.refused("alice", "ipv4:10.0.0.2:1", reason="another caller is not limited by mallory")
    kept = store.audit()
    assert len(kept) == audit_module.REFUSALS_PER_MINUTE + 2
    assert "others of that minute are not recorded" in json.loads(kept[-2].detail)["note"]
    clock.now += 61  # a new minute
    trail.refused("mallory", "ipv4:10.0.0.9:1", reason="again")
    assert len(store.audit()) == audit_module.REFUSALS_PER_MINUTE + 3


def test_a_store_that_fails_is_logged_not_raised(caplog):
    class Full(MemoryStore):
        def add_audit(self, entry, owner=""):
            raise OSError(28, "No space left on device")

    trail = AuditTrail(Full(), Clock())
    assert trail.record(r.AuditAction.CANCEL, "ops", "ipv4:1.2.3.4:5", "exp") is None
    assert "could not record an audit entry" in caplog.text and '"action": "cancel"' in caplog.text
