"""The server side of the lm task (issue 16) with a real `fedmobillm serve` (uvicorn on
loopback) and real weights: a 2-block truncation of SmolLM2-135M exported as a decoder token
bundle (--layers 1,2 --pivot none --quant fp32, max_seq_len 64, --generate: the one lm bundle
the tests share, conftest.py smollm2_lm_bundle), the uploads built from its
real taps (device_runtime.Backbone) and the ids of its tokenizer.

Checked: the task setting and its pin on the data dir; registration (task, decoder token
bundle, the server's own copy of the source weights and their sha256); ingest (lm batches
only in an lm federation and never in a classify one, ids below the vocabulary, ids and mask
stored durably over kill -9); training (validation perplexity below the frozen model's, the
best snapshot by perplexity, checkpoints resumed) and the personal model a device fetches,
which device_runtime.lm_personal.PersonalLM loads and runs."""

from __future__ import annotations

import io
import json
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_helpers import admin_headers, make_manifest, upload

from fedmobillm.device_runtime.messages import (
    ROUTE_DEVICES,
    ROUTE_PERSONAL_MODEL,
    ROUTE_QUARANTINE,
    ROUTE_STATUS,
    RegisterRequest,
)
from fedmobillm.device_runtime.serde import Batch, encode_batch
from fedmobillm.errors import FedMobiLLMError

SUBJECTS = ["The cat", "My phone", "A small robot", "The old man", "Our team"]
VERBS = ["walks to", "writes to", "talks with", "waits for", "looks at"]
OBJECTS = ["the station", "a friend", "the garden", "the sea", "my brother"]
LM_FAST = {
    "train": True,
    "task": "lm",
    "batch_size": 16,
    "checkpoint_every": 10,
    "eval_every": 10,
    "export_every": 1000,
    "idle_after_epochs": 0,
    "idle_after_steps": 60,
    "side": {"width": 64, "blocks": 1, "lr": 3e-3, "warmup_steps": 5, "ema": 0.0},
    "personal_quant": "int8",
}


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return [f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}." for _ in range(n)]


def friends_lines(speaker: str) -> tuple[list[str], list[str]]:
    """One speaker's lines of the friends corpus (5 to 25 words): 48 from seasons 1-2 for
    training, 12 from season 3 on, held out."""
    from fedmobillm.data.lm import load_lm_corpus

    lines = [
        r for r in load_lm_corpus("friends").records
        if r.author == speaker and 5 <= len(r.text.split()) <= 25
    ]  # fmt: skip
    train = [r.text for r in lines if (r.group or "") < "0300"][:48]
    val = [r.text for r in lines if (r.group or "") >= "0300"][:12]
    return train, val


@pytest.fixture(scope="module")
def bundle(smollm2_lm_bundle) -> Path:
    return smollm2_lm_bundle  # exported once for every lm test (its generation graphs unused here)


@pytest.fixture(scope="module")
def manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def backbone(bundle):
    from fedmobillm.device_runtime.backbone import Backbone

    return Backbone(bundle, backend="onnx", threads=1)


def lm_payload(
    backbone, reg: dict, texts: list[str], ids: list[int], split: str = "train", **change
) -> bytes:
    """An lm batch of real taps (fp16) with the tokenizer's ids; loss on every token but the
    first. ``change``: Batch fields to replace (e.g. token_ids)."""
    x, lengths = backbone.forward_tokens(texts)  # (N, K, T, d), (N,)
    n, t = len(texts), x.shape[2]
    token_ids = np.zeros((n, t), np.int64)
    for i, text in enumerate(texts):
        row = backbone.encode_ids(text)
        assert len(row) == lengths[i]
        token_ids[i, : len(row)] = row
    loss_mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.uint8)
    loss_mask[:, 0] = 0
    fields = dict(
        device_id=reg["device_id"],
        bundle_sha256=reg["bundle_sha256"],
        idempotency_key=uuid.uuid4().hex,
        split=split,
        encoding="fp16",
        activations=x.astype(np.float16),
        labels=np.full(n, -1, np.int64),
        sample_ids=np.asarray(ids, np.int64),
        scales=None,
        lengths=lengths.astype(np.int64),
        token_ids=token_ids,
        loss_mask=loss_mask,
    )
    fields.update(change)
    return encode_batch(Batch(**fields))


def register(url: str, name: str, manifest: dict, task: str, labels=None) -> httpx.Response:
    labels = ([] if task == "lm" else ["a", "b"]) if labels is None else labels
    body = RegisterRequest(name, manifest, labels, task=task).to_dict()
    return httpx.post(f"{url}{ROUTE_DEVICES}", headers=admin_headers(), json=body, timeout=120)


def status(url: str) -> dict:
    return httpx.get(f"{url}{ROUTE_STATUS}", headers=admin_headers(), timeout=30).json()


def test_lm_setting_implies_tokens_and_refuses_contradictions(tmp_path):
    from fedmobillm.server.settings import load_settings

    settings, _ = load_settings(None, dev=True, task="lm", data_dir=tmp_path)
    assert settings.side.inputs == "tokens" and settings.side.causal
    with pytest.raises(FedMobiLLMError, match="side.inputs must be tokens"):
        load_settings(None, dev=True, task="lm", side={"inputs": "pivot"})
    with pytest.raises(FedMobiLLMError, match="anchors are classify-only"):
        load_settings(None, dev=True, task="lm", anchors=tmp_path / "a.txt")


def test_lm_max_seq_len_setting_reads_the_environment(monkeypatch):
    from fedmobillm.server.settings import ServerSettings

    assert ServerSettings(task="lm").lm_max_seq_len == 512
    monkeypatch.setenv("FEDMOBILLM_LM_MAX_SEQ_LEN", "128")
    assert ServerSettings(task="lm").lm_max_seq_len == 128


def test_data_dir_keeps_its_task(tmp_path):
    from fedmobillm.server.service import Service
    from fedmobillm.server.store import Store

    Service(Store(tmp_path / "s.sqlite3"), inputs="tokens", task="lm").store.close()
    with pytest.raises(FedMobiLLMError, match="holds an lm federation") as err:
        Service(Store(tmp_path / "s.sqlite3"), inputs="tokens", task="classify")
    assert "--task lm" in (err.value.hint or "")


def test_registration_checks_task_bundle_and_weights(server_factory, manifest, tmp_path):
    lm = server_factory({"train": False, "task": "lm"}, tmp_path / "lm")
    r = register(lm.url, "c", manifest, "classify")
    assert r.status_code == 409 and "lm federation" in r.text and "--task lm" in r.text
    enc = make_manifest("encoder-x")  # a pivot encoder bundle
    assert register(lm.url, "e", enc, "lm").status_code == 409
    r = register(lm.url, "w", {**manifest, "source_sha256": "0" * 64}, "lm")
    assert r.status_code == 409 and "sha256" in r.text
    r = register(lm.url, "m", {**manifest, "source_model": str(tmp_path / "nowhere")}, "lm")
    assert r.status_code == 409 and "no local copy" in r.text
    assert register(lm.url, "l", manifest, "lm", labels=["a", "b"]).status_code == 400
    r = register(lm.url, "long", {**manifest, "max_seq_len": 4096}, "lm")  # past lm_max_seq_len
    assert r.status_code == 409 and "--max-seq-len 512" in r.text, r.text
    ok = register(lm.url, "ok", manifest, "lm")
    assert ok.status_code == 201, ok.text
    assert ok.json()["task"] == "lm"
    assert status(lm.url)["trainer"].get("running") is False
    cls = server_factory({"train": False, "side": {"inputs": "tokens"}}, tmp_path / "cls")
    r = register(cls.url, "x", manifest, "lm")
    assert r.status_code == 409 and "classify federation" in r.text
    assert register(cls.url, "y", manifest, "classify").json()["task"] == "classify"


def test_ingest_refuses_the_other_task_and_ids_past_the_vocab_and_survives_kill(
    server_factory, manifest, backbone, tmp_path
):
    from fedmobillm.server.store import Store

    lm = server_factory({"train": False, "task": "lm"}, tmp_path / "lm")
    reg = register(lm.url, "phone", manifest, "lm").json()
    texts = sentences(6, 0)
    r = upload(lm.url, reg, lm_payload(backbone, reg, texts, range(6)))
    assert r.status_code == 200, r.text
    plain = lm_payload(backbone, reg, texts[:2], [10, 11], token_ids=None, loss_mask=None)
    r = upload(lm.url, reg, plain)
    assert r.status_code == 400 and "lm federation" in r.text
    big = lm_payload(backbone, reg, texts[:2], [12, 13])
    from fedmobillm.device_runtime.serde import decode_batch

    b = decode_batch(big)
    b.token_ids[0, 1] = 49152  # SmolLM2's vocabulary is 0..49151
    r = upload(lm.url, reg, encode_batch(b))
    assert r.status_code == 400 and "vocabulary" in r.text
    flags = httpx.get(f"{lm.url}{ROUTE_QUARANTINE}", headers=admin_headers()).json()
    assert [f["offences"] for f in flags] == [1] and "vocabulary" in flags[0]["last_reason"]
    # a classify token federation refuses lm batches
    cls = server_factory({"train": False, "side": {"inputs": "tokens"}}, tmp_path / "cls")
    creg = register(cls.url, "c", manifest, "classify").json()
    r = upload(cls.url, creg, lm_payload(backbone, creg, texts[:2], [0, 1]))
    assert r.status_code == 400 and "classify federation" in r.text
    # acknowledged lm samples survive kill -9, ids and mask included
    lm.kill()
    lm.start()
    st = status(lm.url)
    assert st["totals"]["samples"] == 6 and st["task"] == "lm"
    store = Store(tmp_path / "lm" / "store.sqlite3")
    rows = store.read_samples(0)
    store.close()
    assert len(rows.ids) == 6
    for i, text in enumerate(texts):
        want = backbone.encode_ids(text)
        assert rows.token_ids[i].tolist() == want
        assert rows.loss_mask[i].tolist() == [0] + [1] * (len(want) - 1)
        assert rows.raw[i].shape == (2, len(want), manifest["hidden_size"])
    # sample 0 re-sent (new key) with the same taps but one other (valid) token id: a
    # conflict, the stored sample kept
    again = decode_batch(lm_payload(backbone, reg, texts[:1], [0]))
    assert upload(lm.url, reg, encode_batch(again)).json()["skipped"] == 1  # same: skipped
    again.token_ids[0, 1] = (again.token_ids[0, 1] + 1) % 49152
    again.idempotency_key = uuid.uuid4().hex
    r = upload(lm.url, reg, encode_batch(again))
    assert r.status_code == 409 and "token ids" in r.text
    assert status(lm.url)["totals"]["samples"] == 6


def wait_for(url: str, check, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(url)
        if check(st):
            return st
        assert not st["trainer"].get("error"), st["trainer"]["error"]
        time.sleep(2)
    raise AssertionError(f"timed out; trainer: {json.dumps(st['trainer'])[:2000]}")


@pytest.mark.slow
def test_lm_federation_trains_below_the_frozen_perplexity_and_serves_the_model(
    server_factory, manifest, backbone, tmp_path
):
    from fedmobillm.device_runtime.lm_personal import PersonalLM
    from fedmobillm.device_runtime.protocol import Manifest

    srv = server_factory(LM_FAST, tmp_path / "lm")
    t0 = time.monotonic()
    regs = [register(srv.url, f"phone-{i}", manifest, "lm").json() for i in range(2)]
    for reg, speaker in zip(regs, ["Monica", "Chandler"], strict=True):
        train, val = friends_lines(speaker)
        for start in range(0, 48, 16):
            ids = range(start, start + 16)
            r = upload(srv.url, reg, lm_payload(backbone, reg, train[start : start + 16], ids))
            assert r.status_code == 200, r.text
        r = upload(srv.url, reg, lm_payload(backbone, reg, val, range(12), split="validation"))
        assert r.status_code == 200, r.text
    arch = regs[0]["architecture"]
    st = wait_for(srv.url, lambda s: (s["trainer"].get("step") or 0) >= 40, 900)
    t = st["trainer"]
    assert t["task"] == "lm" and t["best_metric"] == "perplexity"
    # evaluations after the validation lines arrived (the trainer starts on the first train
    # upload, so its first evaluations may come before them)
    scored = [h for h in t["history"] if arch in h.get("validation", {})]
    first, last = scored[0]["validation"][arch], scored[-1]["validation"][arch]
    frozen = first["frozen_perplexity"]
    best = t["best_validation"][arch]
    print(
        f"\nfrozen {frozen:.4g} step {scored[0]['step']} {first['perplexity']:.4g} last "
        f"{last['perplexity']:.4g} top1 {last['next_token_top1']:.3f} top3 "
        f"{last['next_token_top3']:.3f} best {best} after {time.monotonic() - t0:.0f} s"
    )
    assert best["perplexity"] < 0.8 * frozen
    assert last["next_token_top1"] >= first["next_token_top1"]
    assert t["architectures"][arch]["labels"] is None
    # the personal model a device fetches: PersonalLM loads and runs it
    reg = regs[0]
    r = httpx.get(
        f"{srv.url}{ROUTE_PERSONAL_MODEL}",
        headers={"Authorization": f"Bearer {reg['token']}"},
        params={"graph": "onnx"},  # what `fedmobillm device fetch-model` asks for
        timeout=300,
    )
    assert r.status_code == 200, r.text
    out = tmp_path / "personal"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    info = json.loads((out / "personal.json").read_text())
    assert info["task"] == "lm" and info["weights"] == "int8"
    personal = PersonalLM(out)
    personal.check_compatible(Manifest.from_dict(manifest))
    x, lengths = backbone.forward_tokens(sentences(2, 7))
    delta = personal.run(x)
    assert delta.shape == (2, x.shape[2], manifest["hidden_size"]) and np.isfinite(delta).all()
    assert np.abs(delta).max() > 0  # trained: no longer the frozen model
    # resume after kill -9: the checkpointed step and best snapshot come back
    srv.kill()
    srv.start()
    st = wait_for(srv.url, lambda s: s["trainer"].get("resumed_from") is not None, 300)
    assert st["trainer"]["resumed_from"] >= 10
    assert st["trainer"]["best_validation"][arch]["perplexity"] <= best["perplexity"]


def test_server_status_prints_the_task_and_lm_metrics():
    from fedmobillm.commands.server import format_status

    val = {"perplexity": 12.5, "frozen_perplexity": 40.0, "next_token_top1": 0.31}
    val |= {"next_token_top3": 0.52, "n": 24}
    st = {
        "task": "lm",
        "architectures": {},
        "devices": [],
        "trainer": {
            "task": "lm",
            "best_metric": "perplexity",
            "history": [{"step": 10, "train_loss": 2.0, "validation": {"llama/x": val}}],
            "best_validation": {"llama/x": {"perplexity": 12.5, "step": 10}},
        },
    }
    text = format_status(st)
    assert text.startswith("task: lm")
    assert "ppl 12.50 (frozen 40.0000) top1 0.310 top3 0.520 (n=24)" in text
    assert "best llama/x: perplexity 12.5000 at step 10" in text


def _store_lm_rows(store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert 3 lm samples (K=2, d=16, lengths 5/3/4) of one device; (ids, mask, lengths)."""
    m = {**make_manifest("tiny-lm", hidden=16), "pivot": "none", "kind": "decoder"}
    with store.transaction() as db:
        device_id = store.add_device(db, "lm-phone", uuid.uuid4().hex, "arch-lm", "sha", m)
    device = store.device(device_id)
    rng = np.random.default_rng(0)
    lengths = np.array([5, 3, 4])
    pad = np.arange(5)[None, :] >= lengths[:, None]  # (3, 5)
    act = rng.normal(size=(3, 2, 5, 16)).astype(np.float16)
    act[np.broadcast_to(pad[:, None, :, None], act.shape)] = 0
    ids = np.where(pad, 0, rng.integers(0, 49152, size=(3, 5)))
    mask = np.where(pad, 0, 1).astype(np.uint8)
    mask[:, 0] = 0
    with store.transaction() as db:
        new = store.insert_samples(
            db, device, "train", "b-1", "fp16", act, None, np.full(3, -1), np.arange(3),
            lengths, ids, mask,
        )  # fmt: skip
    assert new == 3
    return ids, mask, lengths


def _check_lm_rows(rows, ids, mask, lengths) -> None:
    assert len(rows.ids) == 3
    for i, n in enumerate(lengths.tolist()):
        assert (
            rows.token_ids[i].dtype == np.int64
            and rows.token_ids[i].tolist() == ids[i, :n].tolist()
        )
        assert rows.loss_mask[i].tolist() == mask[i, :n].tolist()
        assert rows.raw[i].shape == (2, n, 16)


def test_sqlite_stores_lm_ids_and_mask_and_migrates_an_old_store(tmp_path):
    import sqlite3

    from fedmobillm.server.store import Store

    old = tmp_path / "old.sqlite3"
    db = sqlite3.connect(old)  # a store from before the lm columns
    db.execute(
        "CREATE TABLE samples (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, "
        "architecture TEXT NOT NULL, split TEXT NOT NULL, sample_id INTEGER NOT NULL, "
        "label INTEGER NOT NULL, batch_id TEXT NOT NULL, encoding TEXT NOT NULL, "
        "act BLOB NOT NULL, scales BLOB, UNIQUE (device_id, split, sample_id))"
    )
    db.close()
    store = Store(old)
    ids, mask, lengths = _store_lm_rows(store)
    _check_lm_rows(store.read_samples(0), ids, mask, lengths)
    store.close()


def test_postgres_stores_lm_ids_and_mask(tmp_path):
    from pg_helpers import Postgres, pg_bin

    from fedmobillm.server.store_pg import SCHEMA_VERSION, PostgresStore

    bindir = pg_bin()
    if bindir is None:
        pytest.skip("Debian's postgresql is not installed")
    pg = Postgres(bindir).start()
    try:
        url = pg.database()
        store = PostgresStore(url)
        ids, mask, lengths = _store_lm_rows(store)
        _check_lm_rows(store.read_samples(0), ids, mask, lengths)
        # a schema of version 1 (before the lm columns) gains them at the next open
        with store._connection() as conn:
            conn.execute("ALTER TABLE samples DROP COLUMN token_ids, DROP COLUMN loss_mask")
            conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        store.close()
        store = PostgresStore(url)
        assert store.meta("schema_version") == str(SCHEMA_VERSION)  # every migration ran
        assert store.read_samples(0).token_ids == [None] * 3  # old rows: no ids
        store.close()
    finally:
        pg.stop()


@pytest.mark.slow
def test_lm_on_postgres_with_two_workers_keeps_ids_over_kill9(manifest, backbone, tmp_path):
    """`serve --task lm --database URL --workers 2`: lm uploads spread over two ingest
    workers (each checks ids against the vocabulary registration stored), a classify-style
    upload is refused, and every acknowledged sample comes back with its ids after kill -9."""
    from pg_helpers import Postgres, pg_bin
    from server_helpers import ServerProc

    from fedmobillm.server.store_pg import PostgresStore

    bindir = pg_bin()
    if bindir is None:
        pytest.skip("Debian's postgresql is not installed")
    pg = Postgres(bindir).start()
    srv = ServerProc(tmp_path / "data", {"train": False, "task": "lm"})
    try:
        url = pg.database()
        srv.args = ["--database", url, "--workers", "2"]
        srv.start()
        regs = [register(srv.url, f"p{i}", manifest, "lm").json() for i in range(2)]
        texts = sentences(16, 3)
        for reg in regs:
            for start in (0, 8):
                ids = range(start, start + 8)
                r = upload(srv.url, reg, lm_payload(backbone, reg, texts[start : start + 8], ids))
                assert r.status_code == 200, r.text
            plain = lm_payload(backbone, reg, texts[:1], [99], token_ids=None, loss_mask=None)
            assert upload(srv.url, reg, plain).status_code == 400
        srv.kill()
        srv.start()
        assert status(srv.url)["totals"]["samples"] == 32
        store = PostgresStore(url)
        rows = store.read_samples(0)
        store.close()
        assert len(rows.ids) == 32
        want = {t: backbone.encode_ids(t) for t in texts}
        got = sorted(
            (int(s), r.tolist()) for s, r in zip(rows.sample_ids, rows.token_ids, strict=True)
        )
        assert got == sorted((i, want[texts[i]]) for i in range(16) for _ in range(2))
    finally:
        srv.stop()
        pg.stop()
