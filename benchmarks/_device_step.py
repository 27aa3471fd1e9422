"""One device step in a fresh process, to measure its peak RSS (VmHWM).

    python -m benchmarks._device_step fedmobillm --bundle DIR --texts FILE.json --batch 8
    python -m benchmarks._device_step lora|full|fwdgrad|mezo --model DIR --texts FILE.json ...

fedmobillm: the bundle forward with onnxruntime at the bundle's quant, int8 quantisation
and upload encoding of the taps, in a process that never imports torch (checked).
lora / full: one AdamW training step of the real classifier. fwdgrad: one forward-gradient
step (1 + P forward passes, no backprop). mezo: one MeZO step (``benchmarks._mezo``: 2 P
forwards, z regenerated from its seed, no gradient, no optimiser state). infer: one forward
of the same LoRA + head model under no_grad (torch inference, the floor for forward-only
methods). Prints one JSON line.

    python -m benchmarks._device_step imports-onnx|imports-torch --texts FILE.json

The runtime alone: the imports a method's step needs (onnxruntime, numpy, tokenizers and our
device runtime; or torch, transformers, peft and ``benchmarks._models``) and nothing run, so
``benchmarks.run`` can report each method's own share (its peak minus its runtime's).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _peak_mb() -> float:
    """VmHWM of this process image. (ru_maxrss survives exec: a child of a big parent would
    report the parent's peak, so it is only the fallback off Linux.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _fedmobillm(args: argparse.Namespace, texts: list[str]) -> dict:
    import numpy as np

    from fedmobillm.device_runtime import serde
    from fedmobillm.device_runtime.backbone import Backbone

    bb = Backbone(args.bundle, backend="onnx", threads=args.threads)
    t0 = time.perf_counter()
    taps = bb(texts)  # (B, K, d)
    scales = np.asarray(bb.manifest.activation_scales, np.float32)  # (K,)
    q = serde.quantize_int8(taps, scales)  # (B, K, d) int8
    body = serde.encode_batch(
        serde.Batch(
            "dev",
            "0" * 64,
            "k",
            "train",
            "int8",
            q,
            np.zeros(len(texts), np.int64),
            np.arange(len(texts), dtype=np.int64),
            scales,
        )
    )
    return {
        "step_s": time.perf_counter() - t0,
        "quant": bb.manifest.quant,
        "upload_bytes": len(body),
        "torch_imported": "torch" in sys.modules,
    }


def _torch_step(args: argparse.Namespace, texts: list[str]) -> dict:
    import torch

    from benchmarks import _models as M

    torch.set_num_threads(args.threads)
    spec = M.ClassifierSpec(
        args.model,
        args.num_labels,
        "fwdgrad" if args.method in ("mezo", "infer") else args.method,  # LoRA + head
        args.lora_rank,
        args.max_seq_len,
    )
    model = M.build_classifier(spec)
    tok = M.load_tokenizer(args.model)
    enc = M.tokenize(tok, texts, args.max_seq_len)
    y = torch.zeros(len(texts), dtype=torch.long)  # (B,)
    t0 = time.perf_counter()
    if args.method == "fwdgrad":
        M.fwdgrad_step(model, enc, y, perturbations=args.perturbations, lr=1e-4)
    elif args.method == "mezo":
        from benchmarks import _mezo

        seeds = list(range(1, args.perturbations + 1))
        _mezo.mezo_step(model, enc, y, seeds, eps=_mezo.EPS, lr=_mezo.LR)
    elif args.method == "infer":  # the same model's inference: the floor a forward-only step
        with torch.no_grad():
            model.eval()
            model(**enc)
    else:
        M.train_step(model, M.make_optimizer(model, 1e-4), enc, y)
    return {"step_s": time.perf_counter() - t0, "torch_imported": True}


def _imports_only(method: str) -> dict:
    """Import what a step of the runtime needs, run nothing (the runtime's baseline)."""
    if method == "imports-onnx":
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401

        from fedmobillm.device_runtime import backbone, serde  # noqa: F401
    else:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from benchmarks import _models  # noqa: F401
    return {"step_s": 0.0, "torch_imported": "torch" in sys.modules}


RUNTIMES = ("imports-onnx", "imports-torch")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument(
        "method", choices=["fedmobillm", "lora", "full", "fwdgrad", "mezo", "infer", *RUNTIMES]
    )
    p.add_argument("--bundle")
    p.add_argument("--model")
    p.add_argument("--texts", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--perturbations", type=int, default=8)
    args = p.parse_args()
    with open(args.texts) as f:
        texts = json.load(f)[: args.batch]
    base = _peak_mb()
    if args.method in RUNTIMES:
        res = _imports_only(args.method)
    elif args.method == "fedmobillm":
        res = _fedmobillm(args, texts)
    else:
        res = _torch_step(args, texts)
    res.update(
        {
            "method": args.method,
            "batch": len(texts),
            "peak_rss_mb": _peak_mb(),
            "rss_at_start_mb": base,
        }
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
