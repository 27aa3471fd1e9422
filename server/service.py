"""Service layer: registration, validated ingest, device state. Raises ``server.errors``
exceptions; knows nothing about HTTP."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from fedmobillm.device_runtime.protocol import TASKS, TOKEN_PIVOT, Manifest, bundle_digest
from fedmobillm.device_runtime.serde import Batch, PayloadError, decode_batch
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.anchors import AnchorSet
from fedmobillm.server.checks import (
    ValueRejected,
    batch_content,
    check_layout,
    check_resent,
    check_values,
    is_token_device,
)
from fedmobillm.server.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from fedmobillm.server.store import Device, SqlStore, hash_token

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 100
MAX_LABELS = 1000
# Refused uploads of impossible values (ValueRejected) and non-finite training steps traced to
# a device count as offences; at this many the device is quarantined (an admin releases it).
QUARANTINE_AFTER = 3
# devices of batch uploads held by token (Service.cached_device): at this many, forgotten
MAX_CACHED_DEVICES = 100_000


@dataclass
class Counters:
    """In-process counters for /metrics (reset on restart, like any Prometheus counter)."""

    acked_batches: int = 0
    acked_samples: int = 0
    duplicate_batches: int = 0
    skipped_samples: int = 0
    ingest_bytes: int = 0
    conflicts: int = 0  # 409s for re-sent keys or sample ids with other content
    offences: int = 0  # uploads refused for values the registered bundle cannot produce
    rejected: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reject(self, status: int) -> None:
        with self.lock:
            self.rejected[status] = self.rejected.get(status, 0) + 1

    def requests(self) -> dict[str, Any]:
        """What the status shows of the requests since start: rejected ones by HTTP status."""
        with self.lock:
            return {
                "acked_batches": self.acked_batches,
                "duplicate_batches": self.duplicate_batches,
                "conflicts": self.conflicts,
                "refused_values": self.offences,
                "rejected": {str(s): n for s, n in sorted(self.rejected.items())},
            }


INPUTS = ("pivot", "tokens")
VOCAB_KEY = "lm_vocab/"  # meta key prefix: an lm architecture's vocabulary size


def _before_mask_digest(batch: Batch, was: str) -> bool:
    """Whether ``was`` is ``batch``'s content digest as acknowledged before an lm batch's
    loss mask joined it (split, ids, labels, token ids only). Such a re-send is answered with
    its acknowledgement once ``check_resent`` found every stored sample's mask (stored
    with the rows all along) equal to the re-sent one; logged, never silent."""
    if batch.loss_mask is None:
        return False
    if batch_content(dataclasses.replace(batch, loss_mask=None)) != was:
        return False
    log.info(
        "idempotency key %r of device %s was acknowledged before loss masks joined the "
        "batch digest: the re-sent masks are compared with the stored samples' instead",
        batch.idempotency_key,
        batch.device_id,
    )
    return True


class Service:
    """``inputs``: what this federation's devices upload, ``"pivot"`` (one vector per tap and
    sample, pivot bundles) or ``"tokens"`` (every token's taps, bundles exported with
    ``--pivot none``); settings ``side.inputs``. ``task``: ``"classify"`` or ``"lm"``
    (decoder token bundles; uploads carry token ids and a loss mask, no labels; settings
    ``task``). A data dir keeps the kind and the task it started with."""

    def __init__(
        self,
        store: SqlStore,  # SQLite (store.Store) or PostgreSQL (store_pg.PostgresStore)
        max_samples_per_batch: int = 4096,
        anchors: AnchorSet | None = None,
        inputs: str = "pivot",
        task: str = "classify",
        lm_max_seq_len: int = 512,  # lm: the longest bundle max_seq_len registration accepts
    ) -> None:
        if inputs not in INPUTS:
            raise FedMobiLLMError(f"inputs must be one of {INPUTS}, not {inputs!r}")
        if task not in TASKS or (task == "lm" and inputs != "tokens"):
            raise FedMobiLLMError(f"task must be one of {TASKS} (lm with tokens), not {task!r}")
        self.store = store
        self.max_samples = max_samples_per_batch
        self.anchors = anchors
        self.inputs = inputs
        self.task = task
        self.lm_max_seq_len = lm_max_seq_len
        self.counters = Counters()
        self._vocab: dict[str, int] = {}  # lm: architecture -> vocabulary size (meta)
        self._labels: list[str] | None = None  # label_names once set (pinned: never change)
        # token hash -> Device, for batch uploads (``device_by_token``)
        self._devices: dict[str, Device] = {}
        self._devices_lock = threading.Lock()
        self._pin_task(task)  # first: an lm data dir says --task lm, not only --inputs tokens
        self._pin_inputs(inputs)
        if anchors is not None:
            self._pin_anchor_set(anchors.digest)

    def _pin_inputs(self, inputs: str) -> None:
        """A data dir keeps one input kind: its stored samples, checkpoints and personal models
        are of that kind. A store from before token federations holds a pivot federation."""
        with self.store.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='inputs'").fetchone()
            if row is None:
                had_devices = db.execute("SELECT 1 FROM devices LIMIT 1").fetchone()
                pinned = "pivot" if had_devices else inputs
                db.execute("INSERT INTO meta VALUES ('inputs', ?)", (pinned,))
            else:
                pinned = row[0]
        if pinned != inputs:
            raise FedMobiLLMError(
                f"this data dir holds a {pinned} federation; the server was started for "
                f"{inputs} (side.inputs): stored samples, checkpoints and personal models are "
                f"{pinned}",
                hint=f"start with --inputs {pinned}, or use a new --data-dir for a {inputs} "
                "federation",
            )

    def _pin_task(self, task: str) -> None:
        """A data dir keeps one task (protocol.TASKS); a store from before tasks holds a
        classify federation if it has devices or is a pivot one."""
        with self.store.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='task'").fetchone()
            if row is None:
                had_devices = db.execute("SELECT 1 FROM devices LIMIT 1").fetchone()
                kind = db.execute("SELECT value FROM meta WHERE key='inputs'").fetchone()
                pivot = kind is not None and kind[0] == "pivot"  # lm needs tokens
                pinned = "classify" if had_devices or pivot else task
                db.execute("INSERT INTO meta VALUES ('task', ?)", (pinned,))
            else:
                pinned = row[0]
        if pinned != task:
            raise FedMobiLLMError(
                f"this data dir holds {'an' if pinned == 'lm' else 'a'} {pinned} federation; "
                f"the server was started for task {task}: stored samples, checkpoints and "
                f"personal models are {pinned}",
                hint=f"start with --task {pinned}, or use a new --data-dir for a {task} federation",
            )

    def _pin_anchor_set(self, digest: str) -> None:
        """A data dir keeps one anchor set: stored anchor activations are keyed by position."""
        with self.store.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='anchor_set'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('anchor_set', ?)", (digest,))
            elif row[0] != digest:
                raise FedMobiLLMError(
                    f"this data dir was trained with another anchor set (sha256 {row[0][:12]}, "
                    f"now {digest[:12]}): stored anchor activations name texts by position",
                    hint="start with the original anchor file, or use a new --data-dir",
                )

    # -- anchors -----------------------------------------------------------------------

    def anchor_share(self, device: Device) -> dict:
        """The anchor texts this device should forward and upload as split ``anchor``."""
        if self.anchors is None:
            raise NotFound(
                "this server has no anchor set",
                hint="start the server with --anchors FILE to use anchor alignment",
            )
        peers = [d.device_id for d in self.store.devices() if d.architecture == device.architecture]
        ids = self.anchors.share(peers.index(device.device_id))
        return {
            "anchor_set": self.anchors.digest,
            "total": len(self.anchors.texts),
            "ids": ids,
            "texts": [self.anchors.texts[i] for i in ids],
        }

    # -- registration ------------------------------------------------------------------

    def register(
        self,
        name: str,
        manifest: dict[str, Any],
        label_names: list[str],
        privacy: dict[str, Any] | None = None,  # its PrivacyDeclaration, checked by the route
        task: str = "classify",  # the device's task: must be this federation's
    ) -> dict:
        name = _check_name(name)
        self._check_task(task)
        labels = _check_labels(label_names) if task == "classify" else _check_no_labels(label_names)
        try:
            m = Manifest.from_dict(manifest)
        except FedMobiLLMError as exc:
            raise BadRequest(f"invalid manifest: {exc.message}") from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise BadRequest(f"invalid manifest: {exc}") from exc
        self._check_kind(m)
        vocab = self._check_lm_bundle(m) if self.task == "lm" else None
        sha = bundle_digest(m)
        token = secrets.token_urlsafe(32)
        with self.store.transaction() as db:
            if vocab is not None:
                key = VOCAB_KEY + m.architecture
                if db.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone() is None:
                    db.execute("INSERT INTO meta VALUES (?, ?)", (key, str(vocab)))
            row = db.execute("SELECT value FROM meta WHERE key='label_names'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('label_names', ?)", (json.dumps(labels),))
            elif json.loads(row[0]) != labels:
                raise Conflict(
                    f"label_names {labels} differ from this server's task {json.loads(row[0])}",
                    hint="register with the same label names as the other devices",
                )
            if db.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"device name {name!r} is taken", hint="choose another name")
            device_id = self.store.add_device(
                db, name, token, m.architecture, sha, m.to_dict(), privacy
            )
        return {
            "device_id": device_id,
            "token": token,
            "architecture": m.architecture,
            "bundle_sha256": sha,
            "task": self.task,
        }

    def _check_task(self, task: str) -> None:
        """Refuse (409) a device of another task than this federation's."""
        if task != self.task:
            other = "lm" if self.task == "classify" else "classify"
            raise Conflict(
                f"this server runs a {self.task} federation; the device registers for task "
                f"{task!r}",
                hint=f"register the device with --task {self.task}, or run a server with "
                f"--task {other} (on its own --data-dir) for {other} devices"
                if task in TASKS
                else f"task must be one of {', '.join(TASKS)}",
            )

    def _check_lm_bundle(self, m: Manifest) -> int:
        """An lm federation's bundle: a decoder token bundle whose frozen head the server
        holds (lm_heads.head_for: local copy, weights sha256, hidden size); its vocab size."""
        if m.kind != "decoder":
            raise Conflict(
                f"this server runs an lm federation: it needs a decoder bundle; this one is an "
                f"{m.kind} ({m.source_model})",
                hint="export a decoder with `fedmobillm export smollm2-135m --pivot none "
                "--generate`",
            )
        if m.max_seq_len > self.lm_max_seq_len:
            raise Conflict(
                f"this bundle's max_seq_len {m.max_seq_len} exceeds this server's "
                f"lm_max_seq_len {self.lm_max_seq_len} (it bounds the trainer's step memory)",
                hint=f"re-export the bundle with --max-seq-len {self.lm_max_seq_len} (or less), "
                "or start the server with a larger lm_max_seq_len",
            )
        from fedmobillm.server.lm_heads import head_for

        return head_for(m.to_dict()).vocab_size

    def _check_kind(self, m: Manifest) -> None:
        """Refuse (409) a bundle whose kind is not this federation's (``self.inputs``)."""
        if self.inputs == "tokens" and m.pivot != TOKEN_PIVOT:
            raise Conflict(
                f"this server runs a token federation (side.inputs = tokens): devices upload "
                f"every token's taps, and this bundle's pivot is {m.pivot!r} (one vector per "
                "tap)",
                hint="export the bundle with `fedmobillm export MODEL --pivot none`, or start "
                "the server with --inputs pivot",
            )
        if self.inputs == "pivot" and m.pivot == TOKEN_PIVOT:
            raise Conflict(
                "this server runs a pivot federation (side.inputs = pivot): devices upload one "
                "vector per tap, and this bundle's pivot is 'none' (every token's taps)",
                hint="export the bundle with the default pivot (`fedmobillm export MODEL`, or "
                "--pivot first/last/mean), or start the server with --inputs tokens",
            )

    # -- ingest ------------------------------------------------------------------------

    def ingest(
        self,
        device: Device,
        payload: bytes,
        write_slot: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> dict:
        """Decode, check and commit one upload; its acknowledgement. ``write_slot``: held
        around the commit (``limits.IngestGate.write_slot``: bounded wait, else 429 before
        anything is stored); what it yields is the rest of that wait, for a place in the
        store's next group commit (SQLite)."""
        if device.device_id in self.store.quarantined():
            raise Forbidden(
                f"device {device.device_id} is quarantined: its uploads are refused and its "
                "samples are out of training",
                hint="an admin sees why with `fedmobillm server quarantine` and can release it "
                "with `fedmobillm server quarantine --release DEVICE_ID`",
            )
        try:
            batch = decode_batch(payload)
        except PayloadError as exc:
            raise BadRequest(exc.message) from exc
        self._check_batch(device, batch)
        try:
            check_values(device, batch)
            self._check_token_ids(device, batch)
        except ValueRejected as exc:
            with self.counters.lock:
                self.counters.offences += 1
            if self.store.add_offence(device.device_id, exc.message, QUARANTINE_AFTER):
                exc.hint = f"{exc.hint}; this device is now quarantined"
            raise
        try:
            with write_slot() if write_slot is not None else nullcontext() as wait_s:
                ack = self._commit(device, batch, wait_s)
        except Conflict:
            with self.counters.lock:
                self.counters.conflicts += 1
            raise
        with self.counters.lock:
            if ack["duplicate"]:
                self.counters.duplicate_batches += 1
            else:
                self.counters.acked_batches += 1
                self.counters.acked_samples += ack["samples"]
                self.counters.skipped_samples += ack.get("skipped", 0)
            self.counters.ingest_bytes += len(payload)
        return ack

    def _check_batch(self, device: Device, batch: Batch) -> None:
        if batch.device_id != device.device_id:
            raise Forbidden(
                f"payload names device {batch.device_id!r} but the token belongs to "
                f"{device.device_id!r}"
            )
        if batch.bundle_sha256 != device.bundle_sha256:
            raise Conflict(
                f"payload comes from bundle {batch.bundle_sha256[:12]}..., the device "
                f"registered bundle {device.bundle_sha256[:12]}...",
                hint="upload with the registered bundle or register the device anew",
            )
        if is_token_device(device) != (self.inputs == "tokens"):
            raise Conflict(
                f"device {device.device_id} registered a "
                f"{'token' if is_token_device(device) else 'pivot'} bundle; this server runs a "
                f"{self.inputs} federation",
                hint="register the device again with a bundle of this federation's kind",
            )
        check_layout(device, batch)
        self._check_task_batch(device, batch)
        n = batch.num_samples
        if n > self.max_samples:
            raise BadRequest(
                f"{n} samples in one batch; at most {self.max_samples}",
                hint="split the upload into smaller batches",
            )
        if batch.split == "anchor":
            if self.anchors is None:
                raise BadRequest(
                    "this server has no anchor set: anchor uploads are not accepted",
                    hint="start the server with --anchors FILE, or upload train/validation",
                )
            ids = batch.sample_ids
            if (
                (ids < 0).any()
                or (ids >= len(self.anchors.texts)).any()
                or (batch.labels != -1).any()
            ):
                raise BadRequest(
                    f"anchor samples need ids in 0..{len(self.anchors.texts) - 1} (positions "
                    "in the server's anchor set) and label -1",
                    hint="fetch the anchors with GET /v1/anchors and upload them as given",
                )
        num_labels = len(self.label_names() or [])
        bad = (batch.labels < -1) | (batch.labels >= num_labels)
        if bad.any():
            raise BadRequest(
                f"labels must be in -1..{num_labels - 1} (label_names has {num_labels} "
                f"entries); got {int(batch.labels[bad][0])}"
            )

    def _check_task_batch(self, device: Device, batch: Batch) -> None:
        """An lm federation takes lm batches only (token ids + loss mask, ids below the
        architecture's vocabulary); a classify federation refuses them."""
        if self.task == "classify":
            if batch.lm:
                raise BadRequest(
                    "this server runs a classify federation: the upload is an lm batch "
                    "(token_ids and loss_mask) without labels",
                    hint="upload labelled batches (fedmobillm device run without --task lm), "
                    "or send it to a server started with --task lm",
                )
            return
        if not batch.lm:
            raise BadRequest(
                "this server runs an lm federation: every upload carries token_ids and "
                "loss_mask beside the taps (labels -1); this one has none",
                hint="upload with `fedmobillm device run --task lm`",
            )
        if batch.split == "anchor":
            raise BadRequest("anchors are classify-only: an lm federation has no anchor split")

    def _check_token_ids(self, device: Device, batch: Batch) -> None:
        """An lm batch's ids must be below its architecture's vocabulary size: the bundle's
        tokenizer cannot produce others (ValueRejected: an offence)."""
        if batch.token_ids is None:
            return
        vocab = self.vocab_size(device.architecture)
        top = int(batch.token_ids.max())
        if top >= vocab:
            raise ValueRejected(
                f"token id {top} is outside the vocabulary of {device.architecture} "
                f"({vocab} tokens): the bundle's tokenizer cannot produce it",
                hint="upload the ids the registered bundle's tokenizer gives",
            )

    # -- devices of batch uploads ------------------------------------------------------

    def device_by_token(self, token: str) -> Device | None:
        """The device holding ``token`` as the store has it (None: unknown or revoked), kept
        for ``cached_device``. A device's record does not change once registered but for its
        revocation, which ``revoke`` forgets here and ``_store_batch`` checks again inside
        every write transaction (a revocation by another process)."""
        device = self.store.device_by_token(token)
        if device is not None:
            with self._devices_lock:
                if len(self._devices) >= MAX_CACHED_DEVICES:
                    self._devices.clear()
                self._devices[hash_token(token)] = device
        return device

    def cached_device(self, token: str) -> Device | None:
        """The device ``device_by_token`` found for ``token`` before, None if none (ask
        ``device_by_token``)."""
        with self._devices_lock:
            return self._devices.get(hash_token(token))

    def _forget_device(self, device_id: str) -> None:
        with self._devices_lock:
            for key in [k for k, d in self._devices.items() if d.device_id == device_id]:
                del self._devices[key]

    def label_names(self) -> list[str] | None:
        """The task's label names (meta), read once they are set: the first registration
        pins them and later ones must match (``register``), so a set value never changes."""
        if self._labels is None:
            self._labels = self.store.label_names()
        return self._labels

    def vocab_size(self, architecture: str) -> int:
        """The lm architecture's vocabulary size, as registration stored it (meta)."""
        if architecture not in self._vocab:
            value = self.store.meta(VOCAB_KEY + architecture)
            if value is None:
                raise Conflict(
                    f"architecture {architecture} has no vocabulary size on record",
                    hint="register the device again",
                )
            self._vocab[architecture] = int(value)
        return self._vocab[architecture]

    def _commit(self, device: Device, batch: Batch, wait_s: float | None = None) -> dict:
        """Store the batch (or find its acknowledgement) in a write of the store: on SQLite
        joined with the uploads committing at the same time (group commit), each in its own
        savepoint; returns once its commit returned. ``wait_s``: the longest wait for a place
        in a commit (``WriteWaitExpired``: nothing stored)."""
        content = batch_content(batch)
        return self.store.write(
            functools.partial(self._store_batch, device, batch, content),
            samples=batch.num_samples,
            wait_s=wait_s,
        )

    def _store_batch(self, device: Device, batch: Batch, content: str, db: Any) -> dict:
        """Inside a write transaction: the checks against what is stored, then the batch and
        its new samples; its acknowledgement (raises, storing nothing, when refused)."""
        found = self.store.find_ack(db, device.device_id, batch.idempotency_key)
        if self.store.is_revoked(db, device.device_id):  # revoked while this one waited
            raise Unauthorized(
                "unknown token: the device was revoked while this upload waited; nothing "
                "of it was stored",
                hint="register the device to get a token",
            )
        stored = self.store.stored_samples(db, device, batch.split, batch.sample_ids)
        if found is not None:
            ack, was = found
            if was is not None and was != content and not _before_mask_digest(batch, was):
                raise Conflict(
                    f"idempotency key {batch.idempotency_key!r} was acknowledged for other "
                    "samples, labels, token ids or loss mask; the first upload is kept",
                    hint="use a new idempotency key for new content (fedmobillm device run "
                    "derives it from the sample ids)",
                )
            check_resent(device, batch, stored)  # the loss mask against the stored one
            return {**ack, "duplicate": True}
        check_resent(device, batch, stored)
        batch_id = "b-" + uuid.uuid4().hex[:20]
        new = self.store.insert_samples(
            db,
            device,
            batch.split,
            batch_id,
            batch.encoding,
            batch.activations,
            batch.scales,
            batch.labels,
            batch.sample_ids,
            batch.lengths,
            batch.token_ids,
            batch.loss_mask,
        )
        ack = {
            "batch_id": batch_id,
            "samples": new,
            "skipped": batch.num_samples - new,
            "split": batch.split,
            "duplicate": False,
            "device_samples": self.store.device_samples(device.device_id, db),
        }
        self.store.add_batch(
            db,
            batch_id,
            device.device_id,
            batch.idempotency_key,
            batch.split,
            new,
            ack,
            content,
        )
        return ack

    def release(self, device_id: str) -> None:
        if not self.store.release(device_id):
            raise NotFound(
                f"device {device_id!r} has no offences and is not quarantined",
                hint="list flagged devices with `fedmobillm server quarantine`",
            )

    def revoke(self, device_id: str, delete_data: bool) -> dict:
        """Revoke a device's token at once; with ``delete_data`` remove its samples too (the
        trainer drops them at its next poll). A Revoked message as a dict."""
        done = self.store.revoke(device_id, delete_data)
        self._forget_device(device_id)
        if done is None:
            raise NotFound(
                f"no device {device_id!r}", hint="list devices with `fedmobillm server devices`"
            )
        revoked, deleted = done
        log.warning(
            "device %s revoked%s", device_id, f"; {deleted} samples deleted" if delete_data else ""
        )
        return {"device_id": device_id, "revoked": revoked, "deleted_samples": deleted}

    # -- reads -------------------------------------------------------------------------

    def devices(self) -> list[dict]:
        """Every registered device (revoked ones too) as DeviceInfo dicts."""
        samples: dict[str, dict[str, int]] = {}
        for device_id, _, split, n in self.store.sample_counts():
            samples.setdefault(device_id, {"train": 0, "validation": 0})[split] = n
        last = self.store.last_uploads()
        quarantined = self.store.quarantined()
        return [
            {
                "device_id": d.device_id,
                "name": d.name,
                "architecture": d.architecture,
                "samples": samples.get(d.device_id, {"train": 0, "validation": 0}),
                "registered": d.created,
                "last_upload": last.get(d.device_id),
                "quarantined": d.device_id in quarantined,
                "revoked": d.revoked,
                "data_deleted": d.data_deleted,
                "privacy": d.privacy,
            }
            for d in self.store.devices()
        ]

    def device_state(self, device_id: str) -> dict:
        device = self.store.device(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        keys = self.store.device_batches(device_id)
        return {
            "device_id": device.device_id,
            "name": device.name,
            "architecture": device.architecture,
            "bundle_sha256": device.bundle_sha256,
            "samples": self.store.device_samples(device_id),
            "batches": len(keys),
            "acked_keys": keys,
        }

    def fleet(self) -> dict:
        """Devices, samples per device and per architecture."""
        per_device: dict[str, dict[str, int]] = {}
        per_arch: dict[str, dict[str, int]] = {}
        for device_id, arch, split, n in self.store.sample_counts():
            per_device.setdefault(device_id, {"train": 0, "validation": 0})[split] = n
            a = per_arch.setdefault(arch, {"train": 0, "validation": 0, "devices": 0})
            a.setdefault(split, 0)
            a[split] += n
        last = self.store.last_uploads()
        quarantined = self.store.quarantined()
        devices = []
        for d in self.store.devices():
            per_arch.setdefault(d.architecture, {"train": 0, "validation": 0, "devices": 0})
            per_arch[d.architecture]["devices"] += 1
            devices.append(
                {
                    "device_id": d.device_id,
                    "name": d.name,
                    "architecture": d.architecture,
                    "samples": per_device.get(d.device_id, {"train": 0, "validation": 0}),
                    "registered": d.created,
                    "last_upload": last.get(d.device_id),  # None until its first batch
                    "quarantined": d.device_id in quarantined,
                }
            )
        return {
            "task": self.task,  # the federation's task: classify or lm
            "label_names": self.store.label_names(),
            "devices": devices,
            "architectures": per_arch,
            "totals": self.store.totals(),
            # cumulative stored samples per architecture over time (the dashboard's chart)
            "samples_over_time": self.store.sample_series(),
        }


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"name must be a non-empty string of at most {MAX_NAME_CHARS} chars")
    return name.strip()


def _check_no_labels(labels: Any) -> list[str]:
    if labels != []:
        raise BadRequest(
            "an lm device registers with label_names [] (its targets are its own tokens)",
            hint="register with --task lm and no labels",
        )
    return []


def _check_labels(labels: Any) -> list[str]:
    if (
        not isinstance(labels, list)
        or not 2 <= len(labels) <= MAX_LABELS
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise BadRequest(
            f"label_names must be a list of 2..{MAX_LABELS} distinct non-empty strings"
        )
    return list(labels)
