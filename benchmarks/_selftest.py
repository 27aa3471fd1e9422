"""Tiny real pieces of the headline benchmark, for CI (well under a minute on 2 cores).

    python -m benchmarks._selftest --out DIR      # prints one JSON line

On a tiny randomly initialised BERT (the minilm-l6 tokenizer): FLOP counting of every
method, one FedAvg round (two devices), the simulated clock, a real ONNX bundle and a
fresh-process device step that must not import torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide random BERT saved with the minilm-l6 tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from benchmarks._models import model_dir_of

    if (out / "config.json").is_file():
        return out
    src = Path(model_dir_of("minilm-l6"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    out.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def records(n: int, seed: int) -> list[Any]:
    from fedmobillm.data import Record

    words = ["good", "bad", "great", "awful", "fine", "dull", "fun", "boring"]
    return [Record(f"a {words[(i * 7 + seed) % 8]} film number {i}", i % 2) for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import torch

    from benchmarks import _models as M
    from benchmarks._common import BenchConfig, fleet_profiles
    from benchmarks._fedmobillm import device_arrivals

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    model = str(tiny_model(args.out / "tiny-bert"))
    texts = [r.text for r in records(8, 0)]
    out["flops"] = M.flops_per_sample(
        model,
        2,
        texts,
        max_seq_len=32,
        deepest_tap=2,
        lora_rank=4,
        perturbations=2,
        batch=4,
        forward_batch=2,
        upload_batch=8,
    )

    cfg = BenchConfig.for_mode("quick")
    profiles = fleet_profiles(cfg)[:1] + fleet_profiles(cfg)[-1:]  # one fast, one slow
    out["fedavg"] = _fedavg_round(args.out, model, profiles, out["flops"]["lora_train_step"])
    out["fedavg_deadline"] = _fedavg_round(
        args.out, model, profiles, out["flops"]["lora_train_step"], deadline_quantile=0.5
    )
    out["arrivals"] = {p.name: device_arrivals(40, p, 1e9, 16, 2000.0) for p in profiles}

    step = _device_step(args.out, model, texts)
    if step is None:
        return 1
    out["device_step"] = step
    print(json.dumps(out, default=float))
    return 0


def _fedavg_round(
    work: Path,
    model: str,
    profiles: list,
    lora_step_flops: float,
    deadline_quantile: float | None = None,
) -> dict:
    """One in-process FedAvg-LoRA round over two tiny devices (``deadline_quantile``: with
    straggler-tolerant rounds)."""
    from benchmarks import _fedavg as FA

    data = work / "fedavg-data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        FA.write_records(data / f"device-{i}.jsonl", records(8, i))
    FA.write_records(data / "validation.jsonl", records(6, 5))
    FA.write_records(data / "test.jsonl", records(6, 6))
    job = FA.FedAvgJob(
        method="lora",
        model_dir=model,
        num_labels=2,
        data_dir=str(data),
        num_devices=2,
        profiles=[asdict(p) for p in profiles],
        train_flops_per_sample=lora_step_flops,
        rounds=1,
        fraction_train=1.0,
        local_epochs=1,
        local_batch=4,
        lr=1e-3,
        lora_rank=4,
        max_seq_len=32,
        seed=0,
        deadline_quantile=deadline_quantile,
    )
    return FA.run_inprocess(job)


def _device_step(work: Path, model: str, texts: list[str]) -> dict | None:
    """One fedmobillm device step on an int8 bundle of ``model`` in a fresh process (its
    JSON line), or None (stderr printed) when it failed."""
    from fedmobillm.export.pipeline import export_bundle

    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        export_bundle(model, bundle, quant="int8", formats=("onnx",), max_seq_len=32)
    (work / "texts.json").write_text(json.dumps(texts))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks._device_step",
            "fedmobillm",
            "--bundle",
            str(bundle),
            "--texts",
            str(work / "texts.json"),
            "--batch",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    raise SystemExit(main())
