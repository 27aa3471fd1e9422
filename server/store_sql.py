"""What the two store backends share: the records (``Device``, ``SampleRows``), the sample
byte layout, and ``SqlStore``, the store API the rest of the server uses, written once in SQL
that SQLite and PostgreSQL both accept (``?`` placeholders; the PostgreSQL backend turns them
into ``%s``). Each backend (``store.Store`` for SQLite, ``store_pg.PostgresStore``) adds its
connection handling, its schema and the few statements the two dialects spell differently.

Inside ``transaction()`` a backend hands out an object with ``execute(sql, args)`` returning
a cursor (``fetchone()``, ``fetchall()``, ``rowcount``): ``sqlite3.Connection`` for SQLite,
``store_pg.PgTransaction`` for PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fedmobillm.errors import FedMobiLLMError

T = TypeVar("T")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class WriteWaitExpired(FedMobiLLMError):
    """An upload's write waited its whole budget for a place in a commit (SQLite: in the next
    group) and was withdrawn: nothing of it was stored (``limits.IngestGate`` answers 429)."""


@dataclass
class WriteStats:
    """What ``SqlStore.write`` committed since the store opened (``/metrics``): ``commits``
    transactions holding ``writes`` writes (uploads), the most in one: ``largest``."""

    commits: int = 0
    writes: int = 0
    largest: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, writes: int) -> None:
        with self.lock:
            self.commits += 1
            self.writes += writes
            self.largest = max(self.largest, writes)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"commits": self.commits, "writes": self.writes, "largest": self.largest}


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
    with ``scales[i]`` (K,) float32 for int8 (None for fp16). ``activations`` dequantizes.

    ``cursor``: what to pass as ``after`` to the next ``read_samples`` to get the rows that
    follow (SQLite: the last row id; PostgreSQL: the last inserting transaction's id)."""

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
    cursor: int = 0
    # an lm sample's token ids (L_i,) int64 and loss mask (L_i,) uint8; None otherwise
    token_ids: list[np.ndarray | None] = field(default_factory=list)
    loss_mask: list[np.ndarray | None] = field(default_factory=list)

    @property
    def activations(self) -> list[np.ndarray]:
        """M float32 arrays (K, d) or (K, L_i, d), dequantized."""
        return [dequantize_sample(q, s) for q, s in zip(self.raw, self.scales, strict=True)]


# the columns read_samples selects, in this order (both backends)
READ_COLUMNS = (
    "s.id, s.device_id, s.architecture, s.split, s.label, s.encoding, s.act, s.scales, "
    "d.num_taps, d.hidden_size, s.sample_id, s.tokens, s.token_ids, s.loss_mask"
)


def sample_rows(rows: list[tuple], cursor: int) -> SampleRows:
    """READ_COLUMNS rows -> SampleRows."""
    return SampleRows(
        ids=np.array([r[0] for r in rows], dtype=np.int64),
        sample_ids=np.array([r[10] for r in rows], dtype=np.int64),
        device_ids=[r[1] for r in rows],
        architectures=[r[2] for r in rows],
        splits=[r[3] for r in rows],
        encodings=[r[5] for r in rows],
        labels=np.array([r[4] for r in rows], dtype=np.int64),
        raw=[_raw(r[5], bytes(r[6]), r[8], r[9], r[11]) for r in rows],
        scales=[_scales(None if r[7] is None else bytes(r[7])) for r in rows],
        tokens=[r[11] for r in rows],
        cursor=cursor,
        token_ids=[_ids(r[12]) for r in rows],
        loss_mask=[_mask(r[13]) for r in rows],
    )


# A fixed pseudo-random order of the rows: a multiplicative hash of the row id (31 bits, the
# golden-ratio multiplier: consecutive ids spread evenly), indexed per (device, split) as
# ``samples_order`` so that a stream's first k rows in this order cost O(k) to find. No
# overflow: (2^31 - 1) * 1327217885 < 2^62.
SAMPLE_ORDER = "((id % 2147483648) * 1327217885 % 2147483648)"
SAMPLE_ORDER_INDEX = (
    f"CREATE INDEX IF NOT EXISTS samples_order ON samples (device_id, split, {SAMPLE_ORDER})"
)


def sample_order(ids: np.ndarray) -> np.ndarray:
    """``SAMPLE_ORDER`` of row ids (n,) int64 -> keys (n,) int64, as the database computes."""
    ids = np.asarray(ids, dtype=np.int64)
    return (ids % 2147483648) * 1327217885 % 2147483648


class SqlStore:
    """The store API (both backends). Subclasses provide ``transaction()``, ``_query()``,
    ``close()``, ``_insert_rows()``, ``_series_bucket()`` and ``read_samples()``."""

    backend = "sql"
    write_stats: WriteStats  # set by each backend's __init__

    def transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def write(self, work: Callable[[Any], T], samples: int = 0, wait_s: float | None = None) -> T:
        """``work(db)`` inside a write transaction; its result once the transaction holding it
        has committed (durable), its exception (nothing of it stored) if it raised. Here:
        a transaction of its own (PostgreSQL: concurrent connections share WAL flushes).
        SQLite (``store.Store``) joins concurrent writes into one transaction (group commit).
        ``samples``: the write's size (a group's bound); ``wait_s``: how long it may wait for
        its place in a commit before ``WriteWaitExpired`` (None: no bound)."""
        with self.transaction() as db:
            value = work(db)
        self.write_stats.count(1)
        return value

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _lock_device(self, db: Any, device_id: str) -> None:
        """Serialise the ingests of one device (PostgreSQL; SQLite has one writer anyway)."""

    def _insert_rows(self, db: Any, rows: list[tuple]) -> int:
        """INSERT the sample rows, skipping (device, split, sample id) already stored; how many
        were new. Row: (device_id, architecture, split, sample_id, label, batch_id, encoding,
        act bytes, scales bytes | None, tokens | None, token_ids bytes | None, loss_mask
        bytes | None)."""
        raise NotImplementedError

    def _series_bucket(self) -> str:
        """SQL of the time bucket of a batch, ``? ? ?`` = (start, width, points - 1)."""
        raise NotImplementedError

    def _after_delete(self) -> None:
        """Called after a device's data was deleted (SQLite: checkpoint the WAL)."""

    def read_samples(self, after: int, limit: int = 10_000) -> SampleRows:
        raise NotImplementedError

    # -- sampled read-back (a trainer restarting on a store larger than its memory cap) --

    # the column ``read_samples``' cursor counts in (SQLite: the row id; PostgreSQL: txid)
    cursor_column = "id"

    def sample_horizon(self) -> int:
        """A cursor that splits the store in two: the rows stored so far (cursor column <=
        it: ``stream_sample``, ``stream_ids``) and the rows ``read_samples(horizon)`` returns
        from now on."""
        raise NotImplementedError

    def stream_sample(
        self, device_id: str, split: str, horizon: int, k: int, after_key: int = -1
    ) -> np.ndarray:
        """Row ids (<= k,) int64 of the device's ``split`` rows at or before ``horizon``, the
        smallest ``SAMPLE_ORDER`` keys above ``after_key`` first: the first k rows of the
        stream in a fixed pseudo-random order (bottom-k sampling), read off the index
        ``samples_order`` (O(k); no activation is read, the stream's size does not matter).
        Pass the last key returned (``sample_order(ids[-1])``) as ``after_key`` for the next
        k."""
        rows = self._query(
            f"SELECT id FROM samples WHERE device_id = ? AND split = ? AND "
            f"{self.cursor_column} <= ? AND {SAMPLE_ORDER} > ? ORDER BY {SAMPLE_ORDER} LIMIT ?",
            (device_id, split, horizon, after_key, k),
        )
        return np.asarray(rows, dtype=np.int64).reshape(-1)

    def stream_ids(self, device_id: str, split: str, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids (n,) int64, sample ids (n,) int64) of all the device's ``split`` rows at or
        before ``horizon`` (an index-only scan: for the anchors, bounded by the anchor set)."""
        rows = self._query(
            f"SELECT id, sample_id FROM samples WHERE device_id = ? AND split = ? "
            f"AND {self.cursor_column} <= ?",
            (device_id, split, horizon),
        )
        both = np.asarray(rows, dtype=np.int64).reshape(-1, 2)  # (n, 2)
        return both[:, 0].copy(), both[:, 1].copy()

    def stored_bytes(self, device_id: str, limit: int = 16) -> float | None:
        """Mean stored activation bytes of up to ``limit`` of the device's rows (None: it has
        none): what a held sample of its architecture costs, before any is read."""
        rows = self._query(
            "SELECT avg(length(act)) FROM (SELECT act FROM samples WHERE device_id = ? LIMIT ?) t",
            (device_id, limit),
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    # ``s.id`` among the ids of one parameter (``_id_list`` makes it): SQLite's json_each
    ids_clause = "s.id IN (SELECT value FROM json_each(?))"

    def _id_list(self, ids: list[int]) -> Any:
        return json.dumps(ids)

    def read_samples_by_id(self, ids: np.ndarray, chunk: int = 4096) -> SampleRows:
        """The rows with these row ids (m,), in row id order, as ``read_samples`` returns them
        (ids no longer stored, e.g. of a device whose data was deleted, are absent); cursor
        0 (these rows are not a page of ``read_samples``)."""
        out: list[tuple] = []
        id_list = sorted(int(i) for i in ids)
        for start in range(0, len(id_list), chunk):
            out += self._query(
                f"SELECT {READ_COLUMNS} FROM samples s JOIN devices d "
                f"ON s.device_id = d.device_id WHERE {self.ids_clause} ORDER BY s.id",
                (self._id_list(id_list[start : start + chunk]),),
            )
        return sample_rows(out, 0)

    # -- task --------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """One value of the meta table (the task's pinned settings), None if absent."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def label_names(self) -> list[str] | None:
        rows = self._query("SELECT value FROM meta WHERE key='label_names'")
        return json.loads(rows[0][0]) if rows else None

    # -- devices -----------------------------------------------------------------------

    def add_device(
        self,
        db: Any,
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

    def find_ack(self, db: Any, device_id: str, key: str) -> tuple[dict, str | None] | None:
        """(acknowledgement, content digest) of the batch the device sent under ``key``. The
        first statement of an ingest: on PostgreSQL it also takes the device's ingest lock
        for the rest of the transaction (a re-send racing its original waits for it)."""
        self._lock_device(db, device_id)
        row = db.execute(
            "SELECT ack, content FROM batches WHERE device_id = ? AND idempotency_key = ?",
            (device_id, key),
        ).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def stored_samples(
        self, db: Any, device: Device, split: str, sample_ids: np.ndarray
    ) -> dict[int, tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """sample id -> (label, float32 (K, d), or (K, L, d) for a token sample, the token
        ids (L,) int64 and loss mask (L,) uint8 of an lm sample or None) for the ids of
        ``sample_ids`` already stored."""
        out: dict[int, tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
        ids = [int(i) for i in sample_ids]
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[start : start + 900]
            rows = db.execute(
                "SELECT sample_id, label, encoding, act, scales, tokens, token_ids, loss_mask "
                "FROM samples "
                "WHERE "
                f"device_id = ? AND split = ? AND sample_id IN ({','.join('?' * len(part))})",
                (device.device_id, split, *part),
            ).fetchall()
            # the row's token ids must not rebind ``ids``: the next chunk is cut from it
            for sid, label, enc, act, scales, tokens, tok_ids, mask in rows:
                q = _raw(enc, bytes(act), device.num_taps, device.hidden_size, tokens)
                blob = None if scales is None else bytes(scales)
                x = dequantize_sample(q, _scales(blob))
                out[sid] = (label, x, _ids(tok_ids), _mask(mask))
        return out

    def insert_samples(
        self,
        db: Any,
        device: Device,
        split: str,
        batch_id: str,
        encoding: str,
        activations: np.ndarray,  # (N, K, d) or token batch (N, K, T, d); int8 or float16
        scales: np.ndarray | None,  # (K,) float32
        labels: np.ndarray,  # (N,)
        sample_ids: np.ndarray,  # (N,)
        lengths: np.ndarray | None = None,  # (N,) real tokens of a token batch
        token_ids: np.ndarray | None = None,  # (N, T) int64: an lm batch's token ids
        loss_mask: np.ndarray | None = None,  # (N, T) uint8: an lm batch's loss mask
    ) -> int:
        """INSERT every sample not stored yet; returns how many were new. A token sample is
        stored unpadded: its first ``lengths[i]`` positions, (K, L_i, d), K * L_i * d values;
        an lm sample's ids (int32, L_i values) and loss mask (uint8, L_i) beside them."""
        scale_blob = None if scales is None else np.asarray(scales, np.float32).tobytes()
        n = len(labels)
        tokens = [None] * n if lengths is None else [int(t) for t in lengths]
        rows = [
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
                None if token_ids is None else _lm_bytes(token_ids[i], tokens[i], np.int32),
                None if loss_mask is None else _lm_bytes(loss_mask[i], tokens[i], np.uint8),
            )
            for i in range(n)
        ]
        new = self._insert_rows(db, rows)
        db.execute(
            "INSERT INTO device_counts (device_id, split, n) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id, split) DO UPDATE SET n = device_counts.n + excluded.n",
            (device.device_id, split, new),
        )
        return new

    def add_batch(
        self,
        db: Any,
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
                "ON CONFLICT (device_id) DO UPDATE SET offences = device_flags.offences + 1, "
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
            # waits for an ingest of this device in flight (PostgreSQL), which then finds the
            # device revoked (``is_revoked``) or commits before these deletes run
            self._lock_device(db, device_id)
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
        self._after_delete()
        return row[0], n

    def is_revoked(self, db: Any, device_id: str) -> bool:
        """Inside an ingest transaction (after ``find_ack``, which holds the device's lock):
        was the device revoked since its request was authenticated?"""
        row = db.execute("SELECT revoked FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return row is None or row[0] is not None

    def data_deleted(self) -> set[str]:
        """Devices whose samples were removed: the trainer drops what it cached of them."""
        rows = self._query("SELECT device_id FROM devices WHERE data_deleted <> 0")
        return {r[0] for r in rows}

    def device_samples(self, device_id: str, db: Any | None = None) -> dict:
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
        return {"devices": int(d), "batches": int(b), "samples": int(s)}

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
            f"SELECT {self._series_bucket()} AS k, max(b.created), "
            "d.architecture, b.split, sum(b.samples) FROM batches b JOIN devices d "
            "ON b.device_id = d.device_id GROUP BY k, d.architecture, b.split ORDER BY k",
            (lo, width, points - 1),
        )
        totals: dict[str, dict[str, int]] = {}
        series: list[dict[str, Any]] = []
        for k, t, arch, split, n in rows:
            arch_totals = totals.setdefault(arch, {"train": 0, "validation": 0})
            arch_totals[split] = arch_totals.get(split, 0) + int(n)
            if series and series[-1]["bucket"] == k:
                series[-1]["time"] = max(series[-1]["time"], t)
            else:
                series.append({"bucket": k, "time": t})
            series[-1]["architectures"] = {a: dict(c) for a, c in totals.items()}
        return [{"time": p["time"], "architectures": p["architectures"]} for p in series]


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


def _lm_bytes(row: np.ndarray, tokens: int | None, dtype: type) -> bytes:
    """An lm sample's ids or loss mask (T,) -> its first ``tokens`` values as ``dtype``."""
    return np.ascontiguousarray(np.asarray(row)[:tokens], dtype=dtype).tobytes()


def _ids(blob: bytes | None) -> np.ndarray | None:
    """Stored token ids (int32 bytes) -> (L,) int64, None for a sample without."""
    return None if blob is None else np.frombuffer(bytes(blob), dtype=np.int32).astype(np.int64)


def _mask(blob: bytes | None) -> np.ndarray | None:
    """A stored loss mask (uint8 bytes) -> (L,) uint8, None for a sample without."""
    return None if blob is None else np.frombuffer(bytes(blob), dtype=np.uint8)


def _scales(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)  # (K,)
