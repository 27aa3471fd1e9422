"""End to end with a real backbone: a MiniLM-L6 bundle (export pipeline) run by the device
runtime's Backbone on real movie snippets; int8 uploads; the trainer learns; the personal
model a device downloads classifies the backbone's taps through onnxruntime."""

from __future__ import annotations

import io
import time
import zipfile

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from server_helpers import admin_headers, register, upload

from fedmobillm.device_runtime.protocol import read_manifest
from fedmobillm.device_runtime.serde import Batch, dequantize, encode_batch, quantize_int8

pytestmark = pytest.mark.integration

N_TRAIN, N_VAL = 800, 300


def taps_of(bundle, texts: list[str]) -> np.ndarray:
    from fedmobillm.device_runtime.backbone import Backbone

    bb = Backbone(bundle, backend="onnx", threads=1)
    out = [bb.forward(*bb.encode(texts[i : i + 32])) for i in range(0, len(texts), 32)]
    return np.concatenate(out)  # (N, K, d)


def test_real_minilm_bundle_trains_and_personal_model_predicts(make_bundle, server_factory):
    from fedmobillm.data import load_dataset

    bundle = make_bundle("minilm-l6", num_taps=3, quant="int8", formats=("onnx",))
    manifest = read_manifest(bundle)
    ds = load_dataset("movie-snippets", seed=0)
    rng = np.random.default_rng(0)  # the splits are not shuffled: draw a seeded sample
    train = [ds.splits["train"][i] for i in rng.permutation(len(ds.splits["train"]))[:N_TRAIN]]
    val = [
        ds.splits["validation"][i] for i in rng.permutation(len(ds.splits["validation"]))[:N_VAL]
    ]
    x = taps_of(bundle, [r.text for r in train + val])  # (N, K, d)
    y = np.array([r.label for r in train + val], np.int64)
    scales = np.asarray(manifest.activation_scales, np.float32)
    q = quantize_int8(x, scales)  # (N, K, d) int8

    srv = server_factory(
        {
            "train": True,
            "batch_size": 64,
            "eval_every": 50,
            "checkpoint_every": 100,
            "export_every": 100,
            "idle_after_epochs": 5,
        }
    )
    reg = register(srv.url, "pixel", manifest.to_dict(), ds.label_names)
    for split, sl in (("train", slice(0, N_TRAIN)), ("validation", slice(N_TRAIN, None))):
        ids = np.arange(len(y))[sl]
        body = encode_batch(
            Batch(
                reg["device_id"],
                reg["bundle_sha256"],
                f"k-{split}",
                split,
                "int8",
                q[sl],
                y[sl],
                ids,
                scales,
            )
        )
        assert upload(srv.url, reg, body).status_code == 200

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = httpx.get(f"{srv.url}/v1/status", headers=admin_headers()).json()["trainer"]
        if st["idle"] and st["step"] >= 50 and st["personal_models"]:
            break
        time.sleep(0.5)
    # the device downloads the snapshot with the best validation accuracy
    acc = st["best_validation"][reg["architecture"]]["accuracy"]
    assert acc > 0.6, st["history"][-3:]

    r = httpx.get(
        f"{srv.url}/v1/personal-model", headers={"Authorization": f"Bearer {reg['token']}"}
    )
    assert r.status_code == 200
    onnx = zipfile.ZipFile(io.BytesIO(r.content)).read("personal.onnx")
    sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    xv = dequantize(q[N_TRAIN:], scales)  # (N_VAL, K, d) as the server saw it
    logits = sess.run(["logits"], {"activations": xv})[0]  # (N_VAL, C)
    # int8 personal.onnx weights (the default download) against the trainer's fp32 snapshot
    assert abs((logits.argmax(1) == y[N_TRAIN:]).mean() - acc) < 0.02
