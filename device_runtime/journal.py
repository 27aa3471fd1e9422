"""The device's journal of uploads: an append-only, fsynced JSON-lines file.

Before a batch is sent, a ``pending`` line names its idempotency key and sample ids;
after the server acknowledges it, an ``ack`` line follows. With local differential privacy
(``privacy``), a ``release`` line precedes the ``pending`` one: the batch's noise
multiplier and its texts' keyed fingerprints, from which ``ledger()`` rebuilds the
device's spending; a batch refused for the budget leaves a ``refused`` line. A device killed at any moment
restarts by re-sending the one pending batch (same key: the server answers
``duplicate``), then continues after the last acknowledged sample. A line cut short by
the kill is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"


def records_hash(items: list[tuple[int, str, int]]) -> str:
    """Fingerprint of (sample id, text, label) triples: detects data that changed."""
    h = hashlib.sha256()
    for sid, text, label in items:
        h.update(f"{sid}\x1f{label}\x1f{text}\x1e".encode())
    return h.hexdigest()[:16]


@dataclass
class Entry:
    event: str  # "pending" | "ack" | "release" | "refused"
    key: str
    split: str
    bundle_sha256: str
    ids: list[int]
    data: str  # records_hash of the batch's records
    info: dict[str, Any] = field(default_factory=dict)


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / JOURNAL_NAME
        self.entries: list[Entry] = self._load()

    def _load(self) -> list[Entry]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a line cut short by a kill: drop it
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
                os.fsync(f.fileno())
        entries = []
        for n, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entries.append(Entry(**json.loads(line)))
            except (ValueError, TypeError):
                log.warning("journal %s line %d is unreadable; ignored", self.path, n)
        return entries

    def _append(self, entry: Entry) -> None:
        self.entries.append(entry)
        line = json.dumps(entry.__dict__, separators=(",", ":")) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def pending(self, entry: Entry) -> None:
        self._append(Entry(**{**entry.__dict__, "event": "pending"}))

    def ack(self, entry: Entry, info: dict[str, Any]) -> None:
        self._append(Entry(**{**entry.__dict__, "event": "ack", "info": info}))

    def acked(self, split: str, bundle_sha256: str) -> list[Entry]:
        return [
            e
            for e in self.entries
            if e.event == "ack" and e.split == split and e.bundle_sha256 == bundle_sha256
        ]

    def unacked_pending(self, split: str, bundle_sha256: str) -> Entry | None:
        """The batch that was sent (or about to be) when the device last stopped."""
        acked = {e.key for e in self.acked(split, bundle_sha256)}
        for e in reversed(self.entries):
            if e.event == "pending" and e.split == split and e.bundle_sha256 == bundle_sha256:
                return None if e.key in acked else e
        return None

    def unacked_pendings(self, split: str, bundle_sha256: str) -> list[Entry]:
        """Every batch that was sent (or about to be) and never acknowledged, oldest first,
        once per key: not only the last run's (a later run with a smaller --limit may have
        left an earlier one unsent; it may have reached the server all the same)."""
        acked = {e.key for e in self.acked(split, bundle_sha256)}
        out: dict[str, Entry] = {}
        for e in self.entries:
            if e.event == "pending" and e.split == split and e.bundle_sha256 == bundle_sha256:
                if e.key not in acked:
                    out.setdefault(e.key, e)
        return list(out.values())

    def release(self, entry: Entry, info: dict[str, Any]) -> None:
        """Record a privacy release (before the batch is sent): ``info`` holds ``z``,
        ``delta``, ``fingerprints`` and the epsilons after it."""
        self._append(Entry(**{**entry.__dict__, "event": "release", "info": info}))

    def refused(self, entry: Entry, reason: str) -> None:
        """Record a batch refused on the device (privacy budget): nothing was sent."""
        self._append(Entry(**{**entry.__dict__, "event": "refused", "info": {"reason": reason}}))

    def releases(self) -> list[Entry]:
        return [e for e in self.entries if e.event == "release"]

    def ledger(self, delta: float) -> Any:
        """The device's privacy spending (``privacy.PrivacyLedger``) from its release
        lines, every split and bundle together."""
        from fedmobillm.device_runtime.privacy import PrivacyLedger

        ledger = PrivacyLedger(delta)
        for e in self.releases():
            settings = release_settings(e.info)
            ledger.add(e.key, float(e.info["z"]), list(e.info["fingerprints"]), settings)
        return ledger

    def last_ack(self, split: str | None = None) -> Entry | None:
        for e in reversed(self.entries):
            if e.event == "ack" and (split is None or e.split == split):
                return e
        return None


def release_settings(info: dict[str, Any]) -> tuple | None:
    """(z, clip, label epsilon) of a release line: what a re-send of its batch must reuse
    (None for a line that does not record them)."""
    if "z" not in info or "clip" not in info:
        return None
    label = info.get("label_epsilon")
    return (
        round(float(info["z"]), 12),
        round(float(info["clip"]), 12),
        None if label is None else round(float(label), 12),
    )
