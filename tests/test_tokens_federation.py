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


# Two architectures, two rules (pool/skip "auto": by the backbone's kind)
MIXED_SIDE = {"width": 32, "blocks": 1, "heads": 4, "lr": 0.002, "pool": "auto", "skip": "auto"}
N_MIXED_TRAIN, N_MIXED_VAL, N_COMPARE = 160, 40, 48


def test_two_architectures_each_read_by_its_own_rule_on_device(
    make_bundle, smollm2_lm_bundle, tmp_path
):
    """A MiniLM-L6 (encoder) and a 2-block SmolLM2 (decoder) token device in one federation
    whose side network pools each architecture by its kind: the server records mean / no
    skip for the encoder and last token + linear skip for the decoder, and each device's
    downloaded personal model (fp32 personal.onnx, run by `fedmobillm device predict` and
    the device runtime) gives the server-side model's predictions, not those of the same
    weights under the other rule."""
    from fedmobillm.data import load_dataset
    from fedmobillm.device_runtime.protocol import read_manifest

    bundles = {"encoder": make_bundle("minilm-l6", **BUNDLE), "decoder": smollm2_lm_bundle}
    ds = load_dataset("movie-snippets", seed=0)
    names = ds.label_names
    rng = np.random.default_rng(1)
    train = [ds.splits["train"][i] for i in rng.permutation(len(ds.splits["train"]))]
    val = [ds.splits["validation"][i] for i in rng.permutation(len(ds.splits["validation"]))]
    texts = [r.text for r in ds.splits["test"][:N_COMPARE]]
    server = LocalServer(
        tmp_path / "server",
        admin_token=ADMIN,
        config={
            **SERVER,
            "idle_after_steps": 120,
            "export_every": 50,
            "personal_quant": "fp32",  # the device's graph holds the server's exact weights
            "side": MIXED_SIDE,
        },
        args=["--inputs", "tokens"],
        env={"OMP_NUM_THREADS": "1"},
        startup_timeout=60.0,
    )
    states = {k: tmp_path / f"device-{k}" for k in bundles}
    with server:
        for d, (kind, bundle) in enumerate(bundles.items()):
            cli("device", "register", "--server", server.url, "--admin-token", ADMIN,
                "--name", f"{kind}-0", "--bundle", bundle, "--state", states[kind],
                "--labels", ",".join(names))  # fmt: skip
            part = slice(d * N_MIXED_TRAIN, (d + 1) * N_MIXED_TRAIN)
            vpart = slice(d * N_MIXED_VAL, (d + 1) * N_MIXED_VAL)
            write_jsonl(tmp_path / f"train-{kind}.jsonl", train[part], names)
            write_jsonl(tmp_path / f"val-{kind}.jsonl", val[vpart], names)
        for split, stem in (("train", "train"), ("validation", "val")):
            run_devices([run_cmd(b, tmp_path / f"{stem}-{k}.jsonl", states[k], split, 32)
                         for k, b in bundles.items()], split)  # fmt: skip
        st = wait_trained(server.url, ADMIN, timeout=240)["trainer"]
        for kind in bundles:
            cli("device", "fetch-model", "--state", states[kind], "--out", tmp_path / f"p-{kind}")
        predicted = {
            kind: cli(
                "device",
                "predict",
                "--bundle",
                b,
                "--side",
                tmp_path / f"p-{kind}",
                *[a for t in texts for a in ("--text", t)],
            ).stdout  # fmt: skip
            for kind, b in bundles.items()
        }
    assert len(st["architectures"]) == 2
    rules = saved_rules(tmp_path / "server" / "checkpoints")
    for kind, bundle in bundles.items():
        arch = read_manifest(bundle).architecture
        assert (
            rules[arch]
            == {
                "encoder": ("encoder", "mean", "none"),
                "decoder": ("decoder", "last", "linear"),
            }[kind]
        )
        labels = [line.split("\t", 1)[0] for line in predicted[kind].strip().splitlines()]
        assert_personal_model_is_the_servers(
            tmp_path / f"p-{kind}", bundle, tmp_path / "server", texts, labels
        )


def saved_rules(checkpoints: Path) -> dict[str, tuple[str, str, str]]:
    """architecture -> (kind, pool, skip) the server's latest checkpoint records."""
    latest = sorted(checkpoints.glob("step-*"))[-1]
    state = json.loads((latest / "side.json").read_text())
    return {a["name"]: (a["kind"], a["pool"], a["skip"]) for a in state["archs"]}


def assert_personal_model_is_the_servers(
    folder: Path, bundle: Path, data_dir: Path, texts: list[str], labels: list[str]
) -> None:
    """The downloaded personal model is the server's export; its weights (the server's
    personal.safetensors) in the server's side network (the checkpoint's config and
    architecture record) give, in torch, the logits the device runtime gives (within 2e-3)
    and the labels the device process printed; the same weights pooled by the other rule
    give other logits."""
    import torch
    from safetensors.torch import load_file

    from fedmobillm.device_runtime import serde
    from fedmobillm.device_runtime.backbone import Backbone
    from fedmobillm.device_runtime.files import sha256_file
    from fedmobillm.device_runtime.personal import PersonalModel, backbone_taps
    from fedmobillm.server.personal import personal_folder
    from fedmobillm.server.side import SideConfig, SideTrainer

    backbone = Backbone(bundle)
    device = PersonalModel(folder)
    device.check_compatible(backbone.manifest)
    served = personal_folder(data_dir / "personal", device.info.architecture)
    assert sha256_file(served / "personal.onnx") == sha256_file(folder / "personal.onnx")
    latest = sorted((data_dir / "checkpoints").glob("step-*"))[-1]
    state = json.loads((latest / "side.json").read_text())
    ref = SideTrainer(SideConfig(**state["config"]), state["label_names"])
    (spec,) = [a for a in state["archs"] if a["name"] == device.info.architecture]
    ref.add_architecture(spec["name"], spec["taps"], spec["depth"], spec["hidden"], spec["kind"])
    model = ref._model(spec["name"]).eval()
    model.load_state_dict(load_file(str(served / "personal.safetensors")))
    x, mask = backbone_taps(backbone, texts)
    got = np.asarray(device.logits(x, mask))  # (n, C)
    if device.trained_on_int8:  # what the device runtime feeds its graph: int8 as uploaded
        scales = np.asarray(backbone.manifest.activation_scales, np.float32)
        x = serde.dequantize(serde.quantize_int8(x, scales), scales, tokens=True)
    xt, mt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(mask)
    with torch.no_grad():
        want = model(xt, mt).numpy()
        model.align.pool = "mean" if spec["pool"] == "last" else "last"
        other = model(xt, mt).numpy()
    own_diff, other_diff = np.abs(got - want).max(), np.abs(got - other).max()
    assert own_diff < 2e-3 and other_diff > 0.1, (spec["pool"], own_diff, other_diff)
    names = state["label_names"]
    agree = np.mean([names[i] == lab for i, lab in zip(want.argmax(1), labels, strict=True)])
    assert len(labels) == len(texts) and agree >= 0.95, agree
