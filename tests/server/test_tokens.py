"""Token federations on the server (issue 15): registration by bundle kind, the checks of a
token upload, unpadded storage (and the migration of older stores), the trainer's compact
cache and padded mini-batches, and a real server that trains on token uploads."""

from __future__ import annotations

import sqlite3
import time
import uuid

import httpx
import numpy as np
import pytest
from server_helpers import FAST, admin_headers, make_manifest, register, upload

from fedmobillm.device_runtime.protocol import bytes_per_sample
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.errors import BadRequest, Conflict
from fedmobillm.server.service import Service
from fedmobillm.server.store import Store

LABELS = ["negative", "positive"]
K, D, MAX_LEN = 2, 16, 32
SCALES = np.full(K, 0.05, np.float32)


def token_manifest(name: str = "tiny-tok", hidden: int = D) -> dict:
    m = make_manifest(name, hidden=hidden)
    m["pivot"] = "none"
    return m


def token_data(ids, seed: int = 0, lo: int = 3, hi: int = 12):
    """Learnable token taps, one record per id: x float32 (N, K, T, d) zero past lengths (N,),
    the label shifting a fixed direction at every real token; y (N,)."""
    xs, ys, ls = [], [], []
    direction = np.random.default_rng(99).normal(size=(2, K, 1, D))
    for i in ids:
        rng = np.random.default_rng(seed * 1_000_003 + int(i))
        n, y = int(rng.integers(lo, hi + 1)), int(rng.integers(0, 2))
        xs.append(rng.normal(size=(K, n, D)) + 1.5 * direction[y])
        ys.append(y)
        ls.append(n)
    t = max(ls)
    x = np.zeros((len(xs), K, t, D), np.float32)
    for j, a in enumerate(xs):
        x[j, :, : a.shape[1]] = a
    return x, np.asarray(ys, np.int64), np.asarray(ls, np.int64)


def token_batch(reg: dict, ids, *, key=None, split="train", encoding="int8", seed=0, **kw):
    """A token Batch; ``kw`` overrides fields (activations, lengths, scales, labels)."""
    ids = np.asarray(list(ids), np.int64)
    x, y, lengths = token_data(ids, seed)
    act = quantize_int8(x, SCALES) if encoding == "int8" else x.astype(np.float16)
    fields = {
        "device_id": reg["device_id"],
        "bundle_sha256": reg["bundle_sha256"],
        "idempotency_key": key or uuid.uuid4().hex,
        "split": split,
        "encoding": encoding,
        "activations": act,
        "labels": y,
        "sample_ids": ids,
        "scales": SCALES if encoding == "int8" else None,
        "lengths": lengths,
    }
    fields.update(kw)
    return Batch(**fields)


@pytest.fixture
def service(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    yield Service(store, inputs="tokens")
    store.close()


def _register(service: Service, name: str = "phone", manifest: dict | None = None) -> dict:
    return service.register(name, manifest or token_manifest(), LABELS)


def _ingest(service: Service, reg: dict, batch: Batch) -> dict:
    return service.ingest(service.store.device(reg["device_id"]), encode_batch(batch))


# -- registration ----------------------------------------------------------------------


def test_registration_matches_the_federation_kind(tmp_path, service):
    """A token federation refuses a pivot bundle and a pivot federation a token bundle (409),
    each naming the export that fits."""
    with pytest.raises(Conflict, match="token federation") as exc:
        _register(service, "pivot-phone", make_manifest("tiny-p"))
    assert "--pivot none" in exc.value.hint
    assert _register(service)["architecture"]
    store = Store(tmp_path / "pivot" / "store.sqlite3")
    try:
        pivot = Service(store)
        with pytest.raises(Conflict, match="pivot federation") as exc:
            _register(pivot, "token-phone")
        assert "--inputs tokens" in exc.value.hint
        assert pivot.register("pivot-phone", make_manifest("tiny-p"), LABELS)["device_id"]
    finally:
        store.close()


def test_a_data_dir_keeps_its_input_kind(tmp_path, service):
    _register(service)
    with pytest.raises(FedMobiLLMError, match="holds a tokens federation") as exc:
        Service(service.store, inputs="pivot")
    assert "--inputs tokens" in exc.value.hint


# -- ingest checks ---------------------------------------------------------------------


def test_token_batch_is_stored_unpadded(service):
    reg = _register(service)
    batch = token_batch(reg, range(6))
    ack = _ingest(service, reg, batch)
    assert ack["samples"] == 6 and not ack["duplicate"]
    rows = service.store._query("SELECT sample_id, tokens, length(act) FROM samples")
    for sid, tokens, nbytes in rows:
        assert tokens == batch.lengths[sid]
        assert nbytes == bytes_per_sample(K, D, "int8", tokens)  # K * L * d, no padding
    read = service.store.read_samples(0)
    assert [a.shape for a in read.activations] == [(K, int(n), D) for n in batch.lengths]
    assert read.raw[0].dtype == np.int8 and read.tokens == batch.lengths.tolist()
    want = batch.activations[2, :, : batch.lengths[2]].astype(np.float32) * 0.05
    np.testing.assert_allclose(read.activations[2], want, rtol=1e-6)
    assert _ingest(service, reg, batch)["duplicate"]  # same key again: the first ack


def test_fp16_token_batch_within_bounds(service):
    reg = _register(service)
    assert _ingest(service, reg, token_batch(reg, range(4), encoding="fp16"))["samples"] == 4
    read = service.store.read_samples(0)
    assert read.raw[0].dtype == np.float16 and read.scales[0] is None


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda b: setattr(b, "lengths", None), BadRequest, "token bundle"),
        (lambda b: setattr(b, "activations", b.activations[:, :, :, :5]), BadRequest, "emits"),
        (lambda b: setattr(b, "scales", b.scales * 2), BadRequest, "pre-scales"),
    ],
)
def test_token_batch_refused(service, change, error, match):
    reg = _register(service)
    batch = token_batch(reg, range(4))
    if batch.lengths is not None:
        batch.activations = batch.activations.copy()
    change(batch)
    if batch.lengths is None:  # a pivot-shaped upload from a token device
        batch.activations = batch.activations[:, :, 0]
    with pytest.raises(error, match=match) as exc:
        _ingest(service, reg, batch)
    assert exc.value.status in (400, 409)
    assert service.store.totals()["samples"] == 0


def test_lengths_beyond_max_seq_len_refused(service):
    reg = _register(service, manifest={**token_manifest(), "max_seq_len": 8})
    batch = token_batch(reg, range(8))  # lengths up to 12
    batch.lengths = np.minimum(batch.lengths, batch.activations.shape[2])
    assert batch.lengths.max() > 8
    with pytest.raises(BadRequest, match="max_seq_len is 8") as exc:
        _ingest(service, reg, batch)
    assert exc.value.status == 400


def test_fp16_tokens_beyond_the_bundle_range_refused(service):
    reg = _register(service)
    batch = token_batch(reg, range(3), encoding="fp16")
    batch.activations = batch.activations.copy()
    batch.activations[1, 1, 0, 0] = 60000.0  # > 256 x 127 x 0.05 on tap 1
    with pytest.raises(BadRequest, match="tap 1"):
        _ingest(service, reg, batch)


def test_pivot_batch_from_a_token_device_refused_with_its_layout(service):
    reg = _register(service)
    x = np.zeros((2, K, D), np.int8)
    batch = Batch(
        reg["device_id"], reg["bundle_sha256"], "k", "train", "int8", x,
        np.array([0, 1]), np.array([0, 1]), SCALES,
    )  # fmt: skip
    with pytest.raises(BadRequest, match=r"\[N, 2, T, 16\] with lengths"):
        _ingest(service, reg, batch)


def test_resent_token_sample_must_agree(service):
    """A sample id re-sent under a new key: the same taps and length are skipped; another
    length or other taps are a conflict (409), the stored sample kept."""
    reg = _register(service)
    first = token_batch(reg, range(4))
    _ingest(service, reg, first)
    again = token_batch(reg, range(4))  # same content, new key
    assert _ingest(service, reg, again)["skipped"] == 4
    shorter = token_batch(reg, range(4))
    shorter.lengths = shorter.lengths.copy()
    i = int(np.argmax(shorter.lengths < shorter.activations.shape[2]))
    shorter.lengths[i] -= 1  # one token fewer (zero its last position)
    shorter.activations = shorter.activations.copy()
    shorter.activations[i, :, shorter.lengths[i] :] = 0
    with pytest.raises(Conflict, match="length"):
        _ingest(service, reg, shorter)
    other = token_batch(reg, range(4))
    other.activations = other.activations.copy()
    other.activations[0, 0, 0] = np.clip(other.activations[0, 0, 0].astype(int) + 20, -127, 127)
    with pytest.raises(Conflict):
        _ingest(service, reg, other)
    assert service.store.totals()["samples"] == 4


# -- store migration -------------------------------------------------------------------


def test_store_from_before_tokens_migrates(tmp_path):
    """A store created before the tokens column gains it; its rows read as pivot samples and
    the data dir is pinned to a pivot federation."""
    path = tmp_path / "store.sqlite3"
    store = Store(path)
    pivot = Service(store)
    reg = pivot.register("old", make_manifest("tiny-p"), LABELS)
    x = quantize_int8(np.random.default_rng(0).normal(size=(3, K, D)).astype(np.float32), SCALES)
    body = encode_batch(
        Batch(reg["device_id"], reg["bundle_sha256"], "k", "train", "int8", x,
              np.array([0, 1, 0]), np.arange(3), SCALES)
    )  # fmt: skip
    pivot.ingest(store.device(reg["device_id"]), body)
    store.close()
    db = sqlite3.connect(path)  # make it an old store: no tokens column, no pinned kind
    db.execute("ALTER TABLE samples DROP COLUMN tokens")
    db.execute("DELETE FROM meta WHERE key = 'inputs'")
    db.commit()
    db.close()
    store = Store(path)
    try:
        cols = {r[1] for r in store._query("PRAGMA table_info(samples)")}
        assert "tokens" in cols
        read = store.read_samples(0)
        assert read.tokens == [None] * 3 and read.activations[0].shape == (K, D)
        with pytest.raises(FedMobiLLMError, match="holds a pivot federation"):
            Service(store, inputs="tokens")
    finally:
        store.close()


# -- trainer cache ---------------------------------------------------------------------


def test_cache_keeps_token_samples_compact_and_pads_per_batch(service):
    from fedmobillm.server.trainer import TokenSample, TrainingCache

    reg = _register(service)
    train = token_batch(reg, range(20))
    _ingest(service, reg, train)
    _ingest(service, reg, token_batch(reg, range(20, 26), split="validation", encoding="fp16"))
    cache = TrainingCache("tokens")
    assert cache.refresh(service.store) == 20
    a = cache.archs[reg["architecture"]]
    assert a.tokens and a.num_train == 20 and len(a.val_y) == 6
    cached = a.train_x[reg["device_id"]]
    assert all(isinstance(s, TokenSample) and s.q.dtype == np.int8 for s in cached)
    assert [s.tokens for s in cached] == train.lengths.tolist()
    assert a.val_x[0].q.dtype == np.float16
    stats = a.upload_stats()
    n_tokens = train.lengths.sum() + sum(s.tokens for s in a.val_x)
    assert stats["tokens_per_sample"] == pytest.approx(n_tokens / 26)
    groups = cache.sample(np.random.default_rng(0), 8)
    ((arch, x, y, mask),) = groups
    assert x.dtype == np.float32 and x.shape[:2] == (8, K) and x.shape[3] == D
    assert mask.shape == (8, x.shape[2]) and mask.sum(1).max() == x.shape[2]
    assert (x.transpose(0, 2, 1, 3)[mask == 0] == 0).all() and set(y.tolist()) <= {0, 1}
    lengths = set(train.lengths.tolist())
    assert set(mask.sum(1).tolist()) <= lengths


def test_cache_drops_stored_token_rows_outside_the_bundle_range(service):
    """A row stored before the checks (fp16 beyond the range) is dropped and counted."""
    from fedmobillm.server.trainer import TrainingCache

    reg = _register(service)
    device = service.store.device(reg["device_id"])
    x, y, lengths = token_data(range(3))
    act = x.astype(np.float16)
    act[0, 0, 0, 0] = np.float16(60000)
    with service.store.transaction() as db:
        service.store.insert_samples(db, device, "train", "b", "fp16", act, None, y,
                                     np.arange(3), lengths)  # fmt: skip
    cache = TrainingCache("tokens")
    assert cache.refresh(service.store) == 2
    assert cache.dropped == {reg["device_id"]: 1}


def test_pivot_cache_skips_token_rows(service):
    from fedmobillm.server.trainer import TrainingCache

    reg = _register(service)
    _ingest(service, reg, token_batch(reg, range(5)))
    cache = TrainingCache("pivot")
    assert cache.refresh(service.store) == 0 and cache.mismatched == 5


# -- a real server ---------------------------------------------------------------------


@pytest.mark.integration
def test_token_federation_trains_on_a_real_server(server_factory):
    """Two devices upload token batches to a real server started for tokens; the trainer
    learns (validation accuracy), status reports the kind and tokens / bytes per sample, and
    a personal model is exported; a pivot bundle is refused at registration."""
    settings = {
        **FAST,
        "idle_after_steps": 150,
        "side": {"inputs": "tokens", "heads": 2},
    }
    srv = server_factory(settings)
    m = token_manifest()
    r = httpx.post(
        f"{srv.url}/v1/devices",
        headers=admin_headers(),
        json={"name": "p", "manifest": make_manifest("tiny-p"), "label_names": LABELS},
    )
    assert r.status_code == 409 and "--pivot none" in r.json()["hint"]
    regs = [register(srv.url, f"phone-{i}", m, LABELS) for i in range(2)]
    for i, reg in enumerate(regs):
        for split, ids in (("train", range(i * 200, i * 200 + 200)), ("validation", range(60))):
            batch = token_batch(reg, ids, split=split, seed=i if split == "train" else 7 + i)
            assert upload(srv.url, reg, encode_batch(batch)).status_code == 200
    deadline = time.monotonic() + 120
    st: dict = {}
    while time.monotonic() < deadline:
        st = httpx.get(f"{srv.url}/v1/status", headers=admin_headers()).json()["trainer"]
        if st.get("idle") and st["step"] >= 100 and st["personal_models"]:
            break
        time.sleep(0.5)
    assert st["error"] is None and st["inputs"] == "tokens"
    arch = regs[0]["architecture"]
    a = st["architectures"][arch]
    assert a["train"] == 400 and a["validation"] == 120
    assert 3 <= a["tokens_per_sample"] <= 12
    assert a["bytes_per_sample"] == pytest.approx(a["tokens_per_sample"] * K * D)
    assert st["best_validation"][arch]["accuracy"] >= 0.9, st["history"][-3:]
    assert arch in st["personal_models"]


def test_inputs_flag_joins_the_config_files_side_table(tmp_path, monkeypatch):
    """`server start --inputs tokens` (the side override) keeps the config file's other side
    settings."""
    from fedmobillm.server.settings import load_settings

    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", "k3Vq9-tokens-settings-Zp7wXr2mT4")
    config = tmp_path / "server.toml"
    config.write_text("[server.side]\nwidth = 64\nheads = 2\n")
    settings, _ = load_settings(config, side={"inputs": "tokens"})
    assert settings.side.inputs == "tokens" and settings.side.width == 64
    assert load_settings(config)[0].side.inputs == "pivot"
