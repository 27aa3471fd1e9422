"""Helpers for the token-path device tests (issue 15): tiny random HF models to export
with ``--pivot none``, and small personal models (token or pivot) written as the server
writes them (personal.onnx + personal.json), with a numpy reference for their logits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tiny_models import tiny_config


def tiny_folder(family: str) -> Path:
    """A saved HF folder ("bert" or "llama", hidden 32, 3 layers) with seeded random
    weights and the MiniLM tokenizer, cached under the fedmobillm cache."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fedmobillm.export.pipeline import resolve_model_folder
    from fedmobillm.paths import cache_dir

    out = cache_dir() / "test-models" / f"tiny-tokens-{family}-v1"
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(family))
    tmp = out.with_name(f"{out.name}.tmp{np.random.randint(1 << 30)}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_model_folder("minilm-l6")).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process made it first
        pass
    return out


@dataclass
class TinyPersonal:
    """A linear head over the masked mean of each tap: logits = mean_t(x)[K*d] @ w + b."""

    w: np.ndarray  # (K * d, C)
    b: np.ndarray  # (C,)
    tokens: bool

    def reference(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """numpy logits (B, C) of taps (B, K, d), or (B, K, T, d) with mask (B, T)."""
        if self.tokens:
            m = mask.astype(np.float32)[:, None, :, None]  # (B, 1, T, 1)
            x = (x * m).sum(axis=2) / m.sum(axis=2)  # (B, K, d)
        return x.reshape(x.shape[0], -1) @ self.w + self.b


def write_personal(
    out: Path, manifest: dict, label_names: list[str], tokens: bool, seed: int = 0
) -> TinyPersonal:
    """personal.onnx (torch -> ONNX, dynamic batch and, for tokens, sequence) and
    personal.json for the bundle ``manifest`` (its architecture, taps, width)."""
    import torch

    from fedmobillm.device_runtime.protocol import (
        PERSONAL_INPUT,
        PERSONAL_MASK,
        PERSONAL_OUTPUT,
        Manifest,
        bundle_digest,
    )
    from fedmobillm.export.graphs import write_onnx_torchscript

    m = Manifest.from_dict(manifest)
    k, d, c = m.num_taps, m.hidden_size, len(label_names)
    rng = np.random.default_rng(seed)
    ref = TinyPersonal(
        rng.normal(size=(k * d, c)).astype(np.float32),
        rng.normal(size=c).astype(np.float32),
        tokens,
    )

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(ref.w))
            self.b = torch.nn.Parameter(torch.from_numpy(ref.b))

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            if mask is not None:
                mf = mask.to(x.dtype)[:, None, :, None]  # (B, 1, T, 1)
                x = (x * mf).sum(dim=2) / mf.sum(dim=2)  # (B, K, d)
            return x.flatten(1) @ self.w + self.b

    out.mkdir(parents=True, exist_ok=True)
    if tokens:
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.int64)
        example: tuple = (torch.randn(2, k, 4, d), mask)
        names = [PERSONAL_INPUT, PERSONAL_MASK]
        axes = {PERSONAL_INPUT: {0: "batch", 2: "seq"}, PERSONAL_MASK: {0: "batch", 1: "seq"}}
        specs = [
            {"name": PERSONAL_INPUT, "dtype": "float32", "shape": ["batch", k, "seq", d]},
            {"name": PERSONAL_MASK, "dtype": "int64", "shape": ["batch", "seq"]},
        ]
    else:
        example, names = (torch.randn(2, k, d),), [PERSONAL_INPUT]
        axes = {PERSONAL_INPUT: {0: "batch"}}
        specs = [{"name": PERSONAL_INPUT, "dtype": "float32", "shape": ["batch", k, d]}]
    axes[PERSONAL_OUTPUT] = {0: "batch"}
    write_onnx_torchscript(Head().eval(), example, out / "personal.onnx", names,
                           [PERSONAL_OUTPUT], axes)  # fmt: skip
    info = {
        "format_version": 1,
        "architecture": m.architecture,
        "taps": m.taps,
        "hidden_size": d,
        "label_names": label_names,
        "num_labels": c,
        "bundle_sha256s": [bundle_digest(m)],
        "encoding": "int8",
        "inputs": specs,
        "outputs": [{"name": PERSONAL_OUTPUT, "dtype": "float32", "shape": ["batch", c]}],
        "side_inputs": "tokens" if tokens else "pivot",
    }
    (out / "personal.json").write_text(json.dumps(info))
    return ref
