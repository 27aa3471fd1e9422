"""A token-path federation end to end (issue 15): real weights (MiniLM-L6 exported with
``--pivot none``, int8 ONNX), a real server (`fedmobillm serve --inputs tokens`, uvicorn on
loopback), real device processes (`fedmobillm device register/run/fetch-model/predict`) on
movie-snippets; the personal model a device downloads runs on the device runtime on held-out
text and must beat the majority rate by 10 points."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import cli, register_devices, run_cmd, run_devices, wait_trained

from fedmobillm.server.local import LocalServer

pytestmark = pytest.mark.integration

ADMIN = "tokens-e2e-admin-token-7c2f9a1b4e6d"
# Small and short: 2 devices x 240 training texts, 60 validation texts each, 200 held out
N_TRAIN, N_VAL, N_TEST = 240, 60, 200
BUNDLE = {"num_taps": 3, "quant": "int8", "formats": ("onnx",), "pivot": "none", "max_seq_len": 64}
SERVER = {
    "train": True,
    "batch_size": 32,
    "eval_every": 25,
    "checkpoint_every": 100,
    "export_every": 100,
    "idle_after_steps": 300,
    "idle_after_epochs": 0,
    "side": {"width": 64, "blocks": 2, "heads": 4, "lr": 0.002},
}


def write_jsonl(path: Path, records: list, names: list[str]) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"text": r.text, "label": names[r.label]}) + "\n")
    return path


def test_token_federation_end_to_end_beats_majority(make_bundle, tmp_path):
    from fedmobillm.data import load_dataset
    from fedmobillm.device_runtime.protocol import read_manifest

    start = time.monotonic()
    bundle = make_bundle("minilm-l6", **BUNDLE)
    phases = {"bundle": time.monotonic() - start}
    manifest = read_manifest(bundle)
    assert manifest.pivot == "none" and manifest.quant == "int8"
    ds = load_dataset("movie-snippets", seed=0)
    names = ds.label_names
    rng = np.random.default_rng(0)  # the splits are not shuffled: a seeded sample of each
    train = [ds.splits["train"][i] for i in rng.permutation(len(ds.splits["train"]))]
    val = [ds.splits["validation"][i] for i in rng.permutation(len(ds.splits["validation"]))]
    test = [ds.splits["test"][i] for i in rng.permutation(len(ds.splits["test"]))[:N_TEST]]
    files = {}
    for d in range(2):
        files[d] = (
            write_jsonl(
                tmp_path / f"train-{d}.jsonl", train[d * N_TRAIN : (d + 1) * N_TRAIN], names
            ),
            write_jsonl(tmp_path / f"val-{d}.jsonl", val[d * N_VAL : (d + 1) * N_VAL], names),
        )
    test_file = write_jsonl(tmp_path / "test.jsonl", test, names)
    majority = max(np.bincount([r.label for r in test])) / len(test)

    server = LocalServer(
        tmp_path / "server",
        admin_token=ADMIN,
        config=SERVER,
        args=["--inputs", "tokens"],
        env={"OMP_NUM_THREADS": "1"},
        startup_timeout=60.0,
    )
    with server:
        labels = ",".join(names)
        states = register_devices(server.url, ADMIN, bundle, tmp_path, "--labels", labels)
        for split, which in (("train", 0), ("validation", 1)):  # both devices at once
            run_devices([run_cmd(bundle, files[d][which], state, split, 32)
                         for d, state in enumerate(states)], split)  # fmt: skip
        phases["uploads"] = time.monotonic() - start
        st = wait_trained(server.url, ADMIN, timeout=240)["trainer"]
        phases["trained"] = time.monotonic() - start
        model = tmp_path / "personal"
        cli("device", "fetch-model", "--state", states[0], "--out", model)
        result = tmp_path / "predict.json"
        cli("device", "predict", "--bundle", bundle, "--side", model, "--data", test_file,
            "--json", result)  # fmt: skip

    assert st["inputs"] == "tokens"
    (arch,) = st["architectures"]
    a = st["architectures"][arch]
    assert a["train"] == 2 * N_TRAIN and a["validation"] == 2 * N_VAL and a["devices"] == 2
    k, d = len(manifest.taps), manifest.hidden_size
    assert 5 < a["tokens_per_sample"] < manifest.max_seq_len
    assert a["bytes_per_sample"] == pytest.approx(a["tokens_per_sample"] * k * d)  # int8
    acc = json.loads(result.read_text())["accuracy"]
    phases["predicted"] = time.monotonic() - start
    print(
        f"token federation e2e: on-device accuracy {acc:.4f} vs majority {majority:.4f} "
        f"(validation best {st['best_validation'][arch]['accuracy']:.4f}, step "
        f"{st['step']}), {a['tokens_per_sample']:.1f} tokens and "
        f"{a['bytes_per_sample']:.0f} bytes per sample; seconds since start: "
        + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
    )
    assert acc >= majority + 0.10, (acc, majority)
