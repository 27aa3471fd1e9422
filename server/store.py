"""Durable store: SQLite in WAL mode, activations as per-sample blobs in the same database.

Durability (fsync policy): ``journal_mode=WAL`` with ``synchronous=FULL``. Every ingest is one
``BEGIN IMMEDIATE`` transaction (batch row + its samples); SQLite fsyncs the WAL before
``COMMIT`` returns, and the server acknowledges only after ``COMMIT``. An acknowledged batch
therefore survives a process kill and (on a file system that honours fsync) a power loss.
WAL checkpoints into the main file are SQLite's automatic ones (fsynced as well).

Uniqueness: ``UNIQUE(device_id, idempotency_key)`` on batches and
``UNIQUE(device_id, split, sample_id)`` on samples. A re-sent batch (same key) returns the
original acknowledgement; samples a device already uploaded under another key are skipped
(counted in the acknowledgement as ``skipped``), so no sample is ever stored twice.

Tokens are stored as sha256 hex digests (they are 256-bit random strings, so no salt is
needed); a token is shown once, at registration.

One ``Store`` object = one connection guarded by a lock: the API shares one, the trainer
opens its own (WAL lets it read while ingest writes).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.errors import FedMobiLLMError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    architecture TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    num_taps INTEGER NOT NULL,
    hidden_size INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    idempotency_key TEXT NOT NULL,
    split TEXT NOT NULL,
    samples INTEGER NOT NULL,
    ack TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (device_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    architecture TEXT NOT NULL,
    split TEXT NOT NULL,
    sample_id INTEGER NOT NULL,
    label INTEGER NOT NULL,
    batch_id TEXT NOT NULL,
    encoding TEXT NOT NULL,
    act BLOB NOT NULL,
    scales BLOB,
    UNIQUE (device_id, split, sample_id)
);
CREATE TABLE IF NOT EXISTS device_flags (
    device_id TEXT PRIMARY KEY,
    offences INTEGER NOT NULL DEFAULT 0,
    last_reason TEXT NOT NULL DEFAULT '',
    quarantined REAL
);
CREATE TABLE IF NOT EXISTS device_counts (
    device_id TEXT NOT NULL,
    split TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (device_id, split)
);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Device:
    device_id: str
    name: str
    architecture: str
    bundle_sha256: str
    num_taps: int
    hidden_size: int
    manifest: dict[str, Any]
    created: float
    revoked: float | None = None  # when its token was revoked (refused from then on)
    data_deleted: bool = False  # its samples were removed from the store
    privacy: dict[str, Any] | None = None  # its declared mechanism (PrivacyDeclaration)


@dataclass
class SampleRows:
    """Samples read back for training, as stored: ``raw[i]`` int8 or float16, (K, d) for a
    pivot sample or (K, L_i, d) for a token sample (``tokens[i] = L_i``, None for pivot),
    with ``scales[i]`` (K,) float32 for int8 (None for fp16). ``activations`` dequantizes."""

    ids: np.ndarray  # (M,) int64 store row ids
    sample_ids: np.ndarray  # (M,) int64 device-local ids (anchor splits: the anchor's id)
    device_ids: list[str]
    architectures: list[str]
    splits: list[str]
    encodings: list[str]
    labels: np.ndarray  # (M,) int64
    raw: list[np.ndarray]  # M arrays (K, d) or (K, L_i, d), int8 / float16 as uploaded
    scales: list[np.ndarray | None]  # M arrays (K,) float32 (int8) or None (fp16)
    tokens: list[int | None]  # M real-token counts L_i; None for pivot samples

    @property
    def activations(self) -> list[np.ndarray]:
        """M float32 arrays (K, d) or (K, L_i, d), dequantized."""
        return [dequantize_sample(q, s) for q, s in zip(self.raw, self.scales, strict=True)]


class Store:
    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # deleted rows (revoke --delete-data) are overwritten with zeros, not left in free
        # pages (many builds default to this already; docs/privacy.md)
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA busy_timeout=30000")
        for stmt in SCHEMA.strip().split(";\n"):
            if stmt.strip():
                self._db.execute(stmt)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added since a store was created (SQLite has no ADD COLUMN IF NOT EXISTS)."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(batches)")}
        if "content" not in cols:  # digest of (split, sample ids, labels); NULL for old rows
            self._db.execute("ALTER TABLE batches ADD COLUMN content TEXT")
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}
        if "revoked" not in cols:  # time its token was revoked; NULL while it works
            self._db.execute("ALTER TABLE devices ADD COLUMN revoked REAL")
        if "data_deleted" not in cols:  # 1 once its samples were removed
            self._db.execute(
                "ALTER TABLE devices ADD COLUMN data_deleted INTEGER NOT NULL DEFAULT 0"
            )
        if "privacy" not in cols:  # JSON of its declared privacy mechanism; NULL: none
            self._db.execute("ALTER TABLE devices ADD COLUMN privacy TEXT")
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(samples)")}
        if "tokens" not in cols:  # real tokens of a token sample (K, L, d); NULL = pivot (K, d)
            self._db.execute("ALTER TABLE samples ADD COLUMN tokens INTEGER")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error), under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- task --------------------------------------------------------------------------

    def label_names(self) -> list[str] | None:
        rows = self._query("SELECT value FROM meta WHERE key='label_names'")
        return json.loads(rows[0][0]) if rows else None

    # -- devices -----------------------------------------------------------------------

    def add_device(
        self,
        db: sqlite3.Connection,
        name: str,
        token: str,
        architecture: str,
        bundle_sha256: str,
        manifest: dict[str, Any],
        privacy: dict[str, Any] | None = None,
    ) -> str:
        """Insert within an open transaction; returns the new device id."""
        device_id = "dev-" + uuid.uuid4().hex[:16]
        db.execute(
            "INSERT INTO devices (device_id, name, token_hash, architecture, bundle_sha256, "
            "num_taps, hidden_size, manifest, created, privacy) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device_id,
                name,
                hash_token(token),
                architecture,
                bundle_sha256,
                len(manifest["taps"]),
                int(manifest["hidden_size"]),
                json.dumps(manifest, sort_keys=True),
                time.time(),
                None if privacy is None else json.dumps(privacy, sort_keys=True),
            ),
        )
        return device_id

    def _device(self, where: str, arg: str) -> Device | None:
        rows = self._query(
            "SELECT device_id, name, architecture, bundle_sha256, num_taps, hidden_size, "
            f"manifest, created, revoked, data_deleted, privacy FROM devices WHERE {where} = ?",
            (arg,),
        )
        if not rows:
            return None
        r = rows[0]
        privacy = json.loads(r[10]) if r[10] else None
        return Device(
            r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8], bool(r[9]), privacy
        )

    def device_by_token(self, token: str) -> Device | None:
        """The device holding ``token``; None if no device does or its token was revoked."""
        device = self._device("token_hash", hash_token(token))
        return device if device is not None and device.revoked is None else None

    def device(self, device_id: str) -> Device | None:
        return self._device("device_id", device_id)

    def devices(self) -> list[Device]:
        ids = [r[0] for r in self._query("SELECT device_id FROM devices ORDER BY created")]
        return [d for i in ids if (d := self.device(i)) is not None]

    # -- batches -----------------------------------------------------------------------

    def find_ack(
        self, db: sqlite3.Connection, device_id: str, key: str
    ) -> tuple[dict, str | None] | None:
        """(acknowledgement, content digest) of the batch the device sent under ``key``."""
        row = db.execute(
            "SELECT ack, content FROM batches WHERE device_id = ? AND idempotency_key = ?",
            (device_id, key),
        ).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def stored_samples(
        self, db: sqlite3.Connection, device: Device, split: str, sample_ids: np.ndarray
    ) -> dict[int, tuple[int, np.ndarray]]:
        """sample id -> (label, float32 (K, d), or (K, L, d) for a token sample) for the ids
        of ``sample_ids`` already stored."""
        out: dict[int, tuple[int, np.ndarray]] = {}
        ids = [int(i) for i in sample_ids]
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[start : start + 900]
            rows = db.execute(
                "SELECT sample_id, label, encoding, act, scales, tokens FROM samples WHERE "
                f"device_id = ? AND split = ? AND sample_id IN ({','.join('?' * len(part))})",
                (device.device_id, split, *part),
            ).fetchall()
            for sid, label, enc, act, scales, tokens in rows:
                q = _raw(enc, act, device.num_taps, device.hidden_size, tokens)
                out[sid] = (label, dequantize_sample(q, _scales(scales)))
        return out

    def insert_samples(
        self,
        db: sqlite3.Connection,
        device: Device,
        split: str,
        batch_id: str,
        encoding: str,
        activations: np.ndarray,  # (N, K, d) or token batch (N, K, T, d); int8 or float16
        scales: np.ndarray | None,  # (K,) float32
        labels: np.ndarray,  # (N,)
        sample_ids: np.ndarray,  # (N,)
        lengths: np.ndarray | None = None,  # (N,) real tokens of a token batch
    ) -> int:
        """INSERT OR IGNORE every sample; returns how many were new. A token sample is stored
        unpadded: its first ``lengths[i]`` positions, (K, L_i, d), K * L_i * d values."""
        scale_blob = None if scales is None else np.asarray(scales, np.float32).tobytes()
        n = len(labels)
        tokens = [None] * n if lengths is None else [int(t) for t in lengths]
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO samples (device_id, architecture, split, sample_id, label, "
            "batch_id, encoding, act, scales, tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    device.device_id,
                    device.architecture,
                    split,
                    int(sample_ids[i]),
                    int(labels[i]),
                    batch_id,
                    encoding,
                    _sample_bytes(activations[i], tokens[i]),
                    scale_blob,
                    tokens[i],
                )
                for i in range(n)
            ),
        )
        new = db.total_changes - before
        db.execute(
            "INSERT INTO device_counts VALUES (?, ?, ?) ON CONFLICT (device_id, split) "
            "DO UPDATE SET n = n + excluded.n",
            (device.device_id, split, new),
        )
        return new

    def add_batch(
        self,
        db: sqlite3.Connection,
        batch_id: str,
        device_id: str,
        key: str,
        split: str,
        samples: int,
        ack: dict,
        content: str | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO batches (batch_id, device_id, idempotency_key, split, samples, ack, "
            "created, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (batch_id, device_id, key, split, samples, json.dumps(ack), time.time(), content),
        )

    # -- offences and quarantine -------------------------------------------------------

    def add_offence(self, device_id: str, reason: str, quarantine_after: int) -> bool:
        """Count one offence (a refused upload or a non-finite training step traced to the
        device); quarantine the device at ``quarantine_after``. True if it is quarantined."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO device_flags (device_id, offences, last_reason) VALUES (?, 1, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET offences = offences + 1, "
                "last_reason = excluded.last_reason",
                (device_id, reason[:500]),
            )
            db.execute(
                "UPDATE device_flags SET quarantined = ? WHERE device_id = ? AND offences >= ? "
                "AND quarantined IS NULL",
                (time.time(), device_id, quarantine_after),
            )
            row = db.execute(
                "SELECT quarantined FROM device_flags WHERE device_id = ?", (device_id,)
            ).fetchone()
        return row is not None and row[0] is not None

    def flags(self) -> list[dict[str, Any]]:
        """Every device with offences: id, offences, last reason, quarantined (time or None)."""
        rows = self._query(
            "SELECT f.device_id, d.name, d.architecture, f.offences, f.last_reason, "
            "f.quarantined FROM device_flags f JOIN devices d ON f.device_id = d.device_id "
            "ORDER BY f.device_id"
        )
        keys = ("device_id", "name", "architecture", "offences", "last_reason", "quarantined")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def quarantined(self) -> set[str]:
        rows = self._query("SELECT device_id FROM device_flags WHERE quarantined IS NOT NULL")
        return {r[0] for r in rows}

    def release(self, device_id: str) -> bool:
        """Lift a quarantine and forget the device's offences. False if it was not flagged."""
        with self.transaction() as db:
            n = db.execute("DELETE FROM device_flags WHERE device_id = ?", (device_id,)).rowcount
        return n > 0

    # -- revocation --------------------------------------------------------------------

    def revoke(self, device_id: str, delete_data: bool) -> tuple[float, int] | None:
        """Revoke a device's token (at once: the next request with it is unknown); with
        ``delete_data`` also remove its samples, counts and batches. (time first revoked,
        samples removed), or None if there is no such device. Repeating it is harmless."""
        with self.transaction() as db:
            db.execute(
                "UPDATE devices SET revoked = coalesce(revoked, ?) WHERE device_id = ?",
                (time.time(), device_id),
            )
            row = db.execute(
                "SELECT revoked FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                return None
            if not delete_data:
                return row[0], 0
            n = db.execute("DELETE FROM samples WHERE device_id = ?", (device_id,)).rowcount
            db.execute("DELETE FROM device_counts WHERE device_id = ?", (device_id,))
            db.execute("DELETE FROM batches WHERE device_id = ?", (device_id,))
            db.execute("UPDATE devices SET data_deleted = 1 WHERE device_id = ?", (device_id,))
        self._forget_wal()
        return row[0], n

    def _forget_wal(self) -> None:
        """Copy the WAL into the database file and truncate it, so that the pages holding
        deleted rows (zeroed by secure_delete) replace the old copies everywhere. Best
        effort: a reader's open snapshot (the trainer mid-read) can keep it from finishing;
        the next automatic checkpoint and a clean shutdown do it then."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def data_deleted(self) -> set[str]:
        """Devices whose samples were removed: the trainer drops what it cached of them."""
        return {r[0] for r in self._query("SELECT device_id FROM devices WHERE data_deleted")}

    def device_samples(self, device_id: str, db: sqlite3.Connection | None = None) -> dict:
        sql = "SELECT split, n FROM device_counts WHERE device_id = ?"
        rows = db.execute(sql, (device_id,)).fetchall() if db else self._query(sql, (device_id,))
        counts = {"train": 0, "validation": 0}
        counts.update({split: n for split, n in rows})
        return counts

    def device_batches(self, device_id: str) -> list[str]:
        rows = self._query(
            "SELECT idempotency_key FROM batches WHERE device_id = ? ORDER BY created",
            (device_id,),
        )
        return [r[0] for r in rows]

    # -- aggregate views ---------------------------------------------------------------

    def sample_counts(self) -> list[tuple[str, str, str, int]]:
        """(device_id, architecture, split, count) for every device with samples."""
        return self._query(
            "SELECT c.device_id, d.architecture, c.split, c.n FROM device_counts c "
            "JOIN devices d ON c.device_id = d.device_id"
        )

    def totals(self) -> dict[str, int]:
        rows = self._query(
            "SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM batches), "
            "(SELECT coalesce(sum(n), 0) FROM device_counts)"
        )
        d, b, s = rows[0]
        return {"devices": d, "batches": b, "samples": s}

    def last_uploads(self) -> dict[str, float]:
        """device_id -> time of its latest acknowledged batch (devices that uploaded)."""
        rows = self._query("SELECT device_id, max(created) FROM batches GROUP BY device_id")
        return {device_id: t for device_id, t in rows}

    def sample_series(self, points: int = 200) -> list[dict[str, Any]]:
        """Stored samples per architecture and split over time, cumulative, from the ack times
        of the batches (durable: right after a restart too). Batches are bucketed by time into
        at most ``points`` points: ``[{"time", "architectures": {arch: {split: n}}}]``."""
        lo, hi = self._query("SELECT min(created), max(created) FROM batches")[0]
        if lo is None:
            return []
        width = max((hi - lo) / points, 1e-6)
        rows = self._query(
            "SELECT min(CAST((b.created - ?) / ? AS INTEGER), ?) AS k, max(b.created), "
            "d.architecture, b.split, sum(b.samples) FROM batches b JOIN devices d "
            "ON b.device_id = d.device_id GROUP BY k, d.architecture, b.split ORDER BY k",
            (lo, width, points - 1),
        )
        totals: dict[str, dict[str, int]] = {}
        series: list[dict[str, Any]] = []
        for k, t, arch, split, n in rows:
            arch_totals = totals.setdefault(arch, {"train": 0, "validation": 0})
            arch_totals[split] = arch_totals.get(split, 0) + n
            if series and series[-1]["bucket"] == k:
                series[-1]["time"] = max(series[-1]["time"], t)
            else:
                series.append({"bucket": k, "time": t})
            series[-1]["architectures"] = {a: dict(c) for a, c in totals.items()}
        return [{"time": p["time"], "architectures": p["architectures"]} for p in series]

    # -- training reads ----------------------------------------------------------------

    def read_samples(self, after_id: int, limit: int = 10_000) -> SampleRows:
        """Samples with row id > after_id, oldest first, as stored (``SampleRows``)."""
        rows = self._query(
            "SELECT s.id, s.device_id, s.architecture, s.split, s.label, s.encoding, s.act, "
            "s.scales, d.num_taps, d.hidden_size, s.sample_id, s.tokens FROM samples s JOIN "
            "devices d ON s.device_id = d.device_id WHERE s.id > ? ORDER BY s.id LIMIT ?",
            (after_id, limit),
        )
        return SampleRows(
            ids=np.array([r[0] for r in rows], dtype=np.int64),
            sample_ids=np.array([r[10] for r in rows], dtype=np.int64),
            device_ids=[r[1] for r in rows],
            architectures=[r[2] for r in rows],
            splits=[r[3] for r in rows],
            encodings=[r[5] for r in rows],
            labels=np.array([r[4] for r in rows], dtype=np.int64),
            raw=[_raw(r[5], r[6], r[8], r[9], r[11]) for r in rows],
            scales=[_scales(r[7]) for r in rows],
            tokens=[r[11] for r in rows],
        )


def dequantize_sample(q: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """One sample, int8 (K, d) or (K, L, d) times per-tap ``scales`` (K,), or float16 as it
    is -> float32 of the same shape."""
    if q.dtype != np.int8:
        return q.astype(np.float32)
    if scales is None:
        raise FedMobiLLMError("an int8 sample needs its per-tap scales")
    s = np.asarray(scales, np.float32).reshape((-1,) + (1,) * (q.ndim - 1))  # (K, 1[, 1])
    return q.astype(np.float32) * s


def _sample_bytes(act: np.ndarray, tokens: int | None) -> bytes:
    """One sample's stored bytes: (K, d) as is, or the real tokens (K, L, d) of (K, T, d)."""
    return np.ascontiguousarray(act if tokens is None else act[:, :tokens]).tobytes()


def _raw(encoding: str, act: bytes, k: int, d: int, tokens: int | None) -> np.ndarray:
    """A stored sample's bytes -> int8/float16 (K, d), or (K, L, d) for a token sample."""
    q = np.frombuffer(act, dtype=np.int8 if encoding == "int8" else np.float16)
    return q.reshape(k, d) if tokens is None else q.reshape(k, tokens, d)


def _scales(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)  # (K,)
