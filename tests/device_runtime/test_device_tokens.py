"""The device role on a token bundle (issue 15), with torch unimportable in the device
process: `fedmobillm device run` uploads every real token's taps ([N, K, T, d] int8 +
lengths) to a loopback HTTP server that decodes each payload as the wire format says, and
reports the bytes per sample against the T x K x d bound; `fedmobillm device predict` runs
the bundle and a token personal model; a personal model and a bundle of the other kind are
refused with a message that says why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from device_stand_in import DeviceStandIn, cli_without_torch
from token_helpers import tiny_folder, write_personal

from fedmobillm.device_runtime import serde
from fedmobillm.device_runtime.backbone import Backbone
from fedmobillm.device_runtime.client import DeviceClient, DeviceState, RunConfig
from fedmobillm.device_runtime.journal import Entry, records_hash
from fedmobillm.device_runtime.personal import PersonalModel, token_mask
from fedmobillm.device_runtime.protocol import bundle_digest, read_manifest
from fedmobillm.device_runtime.records import Record
from fedmobillm.errors import FedMobiLLMError

LABELS = ["negative", "positive"]
WORDS = ["great", "dull", "moving", "tedious", "sharp", "clumsy", "warm", "cold"]
TOKENS = {"layers": [1, 3], "pivot": "none", "formats": ("onnx",), "max_seq_len": 64}


def texts(n: int, seed: int) -> list[tuple[str, int]]:
    """Reviews of 1..12 words (token counts vary a lot within a batch), labels 0/1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 13)))
        out.append((" ".join(words), int(rng.integers(0, 2))))
    return out


def write_data(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": LABELS[y]}) + "\n" for t, y in rows))
    return path


@pytest.fixture(scope="module")
def token_bundle(make_bundle) -> Path:
    return make_bundle(str(tiny_folder("bert")), **TOKENS)


def test_device_run_uploads_token_taps_without_torch(token_bundle, tmp_path):
    """Prepare 40 texts of 1..12 words and a device state; Execute `device run` (batches of
    16, forward passes of 4) with torch blocked; Assert every payload is a token batch whose
    lengths are the texts' token counts, whose int8 taps are the bundle's forward_tokens
    quantized per tap, padding zero, and the summary's bytes per sample = mean L x K x d."""
    m = read_manifest(token_bundle)
    rows = texts(40, seed=3)
    data = write_data(tmp_path / "d.jsonl", rows)
    server = DeviceStandIn("dev-tok")
    state = tmp_path / "state"
    DeviceState(server.url, "tok", "dev-tok", "t", bundle_digest(m), m.architecture,
                 LABELS).save(state)  # fmt: skip
    try:
        r = cli_without_torch(
            ["device", "run", "--bundle", str(token_bundle), "--data", str(data), "--state",
             str(state), "--batch-size", "16", "--forward-batch", "4", "--threads", "1",
             "--summary-json", str(tmp_path / "s.json")], tmp_path,
        )  # fmt: skip
    finally:
        server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TORCH_LOADED False" in r.stdout
    assert [b.num_samples for b in server.batches] == [16, 16, 8]

    backbone = Backbone(token_bundle, threads=1)
    scales = np.asarray(m.activation_scales, np.float32)
    all_lengths = []
    for batch in server.batches:
        ids = [int(i) for i in batch.sample_ids]
        assert batch.tokens and batch.encoding == "int8" and batch.activations.ndim == 4
        x, lengths = backbone.forward_tokens([rows[i][0] for i in ids], forward_batch=4)
        np.testing.assert_array_equal(batch.lengths, lengths)
        np.testing.assert_array_equal(batch.labels, [rows[i][1] for i in ids])
        want = serde.quantize_int8(x, scales)  # (N, K, T, d)
        assert batch.activations.shape == want.shape == (len(ids), 2, lengths.max(), 32)
        assert np.abs(batch.activations.astype(int) - want).max() <= 1
        np.testing.assert_array_equal(batch.scales, scales)
        all_lengths += list(lengths)
    assert min(all_lengths) < max(all_lengths)
    # upload batches in order of token length: each padded only to similar lengths
    for a, b in zip(server.batches, server.batches[1:], strict=False):
        assert a.lengths.max() <= b.lengths.min()
    assert sorted(int(i) for b in server.batches for i in b.sample_ids) == list(range(40))

    summary = json.loads((tmp_path / "s.json").read_text())
    k, d = m.num_taps, m.hidden_size
    assert summary["inputs"] == "tokens" and summary["samples"] == 40
    assert summary["tokens_per_sample"] == pytest.approx(np.mean(all_lengths))
    assert summary["activation_bytes_per_sample"] == pytest.approx(np.mean(all_lengths) * k * d)
    assert summary["token_bound_bytes"] == m.max_seq_len * k * d
    assert "of the T x K x d bound" in r.stdout and "tokens x K=2 x d=32 x 1 B" in r.stdout


def test_token_personal_model_predicts_on_device(token_bundle, tmp_path):
    """Prepare a token personal model (masked mean + linear); Execute logits on the token
    bundle's taps and `device predict` with torch blocked; Assert logits equal the numpy
    reference on the int8 round-tripped taps, and the command's labels and accuracy agree."""
    m = read_manifest(token_bundle)
    ref = write_personal(tmp_path / "personal", m.to_dict(), LABELS, tokens=True)
    personal = PersonalModel(tmp_path / "personal")
    assert personal.tokens
    backbone = Backbone(token_bundle, threads=1)
    personal.check_compatible(backbone.manifest)
    rows = texts(24, seed=4)
    x, lengths = backbone.forward_tokens([t for t, _ in rows], forward_batch=4)
    mask = token_mask(lengths)
    scales = np.asarray(m.activation_scales, np.float32)
    x8 = serde.dequantize(serde.quantize_int8(x, scales), scales)  # as uploads are
    want = ref.reference(x8, mask)  # (B, C)
    np.testing.assert_allclose(personal.logits(x, mask), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FedMobiLLMError, match="attention mask"):
        personal.logits(x)
    labels = [LABELS[i] for i in want.argmax(-1)]
    assert personal.predict_texts(backbone, [t for t, _ in rows]) == labels

    data = write_data(tmp_path / "test.jsonl", rows)
    r = cli_without_torch(
        ["device", "predict", "--bundle", str(token_bundle), "--side", str(tmp_path / "personal"),
         "--data", str(data), "--json", str(tmp_path / "p.json")], tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TORCH_LOADED False" in r.stdout
    acc = json.loads((tmp_path / "p.json").read_text())["accuracy"]
    assert acc == pytest.approx(np.mean(want.argmax(-1) == [y for _, y in rows]))
    r = cli_without_torch(
        ["device", "predict", "--bundle", str(token_bundle), "--side", str(tmp_path / "personal"),
         "--text", rows[0][0], "--text", rows[1][0]], tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[:2] == [f"{labels[0]}\t{rows[0][0]}", f"{labels[1]}\t{rows[1][0]}"]


def test_personal_model_and_bundle_of_other_kinds_are_refused(make_bundle, token_bundle, tmp_path):
    pivot_bundle = make_bundle(str(tiny_folder("bert")), layers=[1, 3], formats=("onnx",))
    tok, piv = read_manifest(token_bundle), read_manifest(pivot_bundle)
    write_personal(tmp_path / "tok", tok.to_dict(), LABELS, tokens=True)
    write_personal(tmp_path / "piv", piv.to_dict(), LABELS, tokens=False)
    with pytest.raises(FedMobiLLMError, match="reads token taps .* but the bundle is a pivot"):
        PersonalModel(tmp_path / "tok").check_compatible(piv)
    with pytest.raises(FedMobiLLMError, match="reads pivot taps .* but the bundle is a token"):
        PersonalModel(tmp_path / "piv").check_compatible(tok)
    r = cli_without_torch(
        ["device", "predict", "--bundle", str(pivot_bundle), "--side", str(tmp_path / "tok"),
         "--text", "great"], tmp_path,
    )  # fmt: skip
    assert r.returncode != 0 and "but the bundle is a pivot bundle" in r.stderr, r.stderr
    assert "--pivot none" in r.stderr  # the hint
    # a pivot personal model still runs on its pivot bundle
    assert PersonalModel(tmp_path / "piv").predict_texts(Backbone(pivot_bundle), ["great"])


def test_token_plan_batches_by_length_and_resumes(token_bundle, tmp_path):
    """Prepare 30 records and a journal with one acknowledged and one pending batch;
    Execute plan with batch size 8; Assert the pending batch goes first as it was, then the
    rest in batches of ascending token length, every record exactly once, and the same plan
    again (a resumed run keys the same batches)."""
    m = read_manifest(token_bundle)
    recs = [Record(t, y) for t, y in texts(30, seed=5)]
    DeviceState("http://127.0.0.1:9", "d", "dev-1", "t", bundle_digest(m), "", LABELS).save(
        tmp_path
    )
    client = DeviceClient(tmp_path, token_bundle, RunConfig(batch_size=8))
    for ids, acked in (([3, 7, 11], True), ([0, 5], False)):
        data = records_hash([(i, recs[i].text, recs[i].label) for i in ids])
        e = Entry("pending", f"key-{ids[0]}", "train", client.digest, ids, data)
        client.journal.pending(e)
        if acked:
            client.journal.ack(e, {})
    batches, already = client.plan(recs)
    assert already == 3 and batches[0] == [0, 5]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == [i for i in range(30) if i not in (3, 7, 11)]
    _, mask = client.backbone.encode([r.text for r in recs])
    lengths = mask.sum(axis=1)
    rest = batches[1:]
    assert [len(b) for b in rest] == [8, 8, 8, 1]
    for a, b in zip(rest, rest[1:], strict=False):
        assert lengths[a].max() <= lengths[b].min()
    assert client.plan(recs) == (batches, already)


@pytest.mark.parametrize("encoding,private", [("fp16", False), ("int8", True)])
def test_token_batch_encodings_and_privacy(token_bundle, tmp_path, encoding, private):
    """Prepare a device on the token bundle, fp16 uploads or int8 with local differential
    privacy; Execute encode_batch; Assert a valid token payload (padding exactly zero after
    the noise too), its lengths, and activation bytes = sum(L) x K x d x b."""
    from fedmobillm.device_runtime.privacy import PrivacyConfig

    m = read_manifest(token_bundle)
    recs = [Record(t, y) for t, y in texts(6, seed=6)]
    DeviceState("http://127.0.0.1:9", "d", "dev-1", "t", bundle_digest(m), "", LABELS).save(
        tmp_path
    )
    privacy = PrivacyConfig(epsilon=8.0) if private else None
    config = RunConfig(encoding=encoding, privacy=privacy)
    client = DeviceClient(tmp_path, token_bundle, config)
    enc = client.encode_batch(recs, list(range(6)))
    batch = serde.decode_batch(enc.body)  # checks the layout and the zero padding
    _, lengths = client.backbone.forward_tokens([r.text for r in recs])
    np.testing.assert_array_equal(batch.lengths, lengths)
    assert batch.activations.dtype == (np.float16 if encoding == "fp16" else np.int8)
    b = 2 if encoding == "fp16" else 1
    assert enc.activation_bytes == int(lengths.sum()) * m.num_taps * m.hidden_size * b
    assert enc.tokens == int(lengths.sum())
    if private:  # noise on every real token, none on the padding
        x, _ = client.backbone.forward_tokens([r.text for r in recs])
        plain = serde.quantize_int8(x, np.asarray(m.activation_scales, np.float32))
        real = np.arange(x.shape[2])[None, None, :, None] < lengths[:, None, None, None]
        changed = batch.activations != plain  # (N, K, T, d)
        assert changed[np.broadcast_to(real, changed.shape)].mean() > 0.5
