"""The torch side of the baselines: the real HF classifier (LoRA or full fine-tuning), local
training and evaluation, a forward-gradient (FwdLLM-style) step, and FLOP counting with
``torch.utils.flop_counter`` on the real model.

FLOP counting note: FlopCounterMode counts matrix products (linear, bmm, attention); element-
wise ops (norms, activations, optimiser updates) are not counted, for every method alike.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("benchmarks")

LORA_TARGETS = r".*attention\.(self\.(query|key|value)|output\.dense)"


@dataclass
class ClassifierSpec:
    model_dir: str
    num_labels: int
    method: str  # "lora" | "full" | "fwdgrad" (LoRA parameters, forward-only updates)
    lora_rank: int = 8
    max_seq_len: int = 64
    seed: int = 0


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def tokenize(tok: Any, texts: list[str], max_seq_len: int) -> dict[str, torch.Tensor]:
    enc = tok(texts, padding=True, truncation=True, max_length=max_seq_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # (B, S)


def build_classifier(spec: ClassifierSpec) -> nn.Module:
    """The real pretrained backbone + a classification head. LoRA r on the attention
    projections (query, key, value, output) with the head trained too (peft
    modules_to_save); full FT trains everything."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(spec.seed)
    # The new head's "newly initialized weights" warning is expected here; quieted for this
    # load only, so the process's transformers logging is left as the caller set it.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            spec.model_dir, num_labels=spec.num_labels
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    mean_pool(model)
    if spec.method in ("lora", "fwdgrad"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=2 * spec.lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, cfg)
    elif spec.method != "full":
        raise ValueError(f"unknown method {spec.method}")
    return model


class MeanPooler(nn.Module):
    """The masked mean of the last hidden states, (B, S, d) -> (B, d): the pooling the
    sentence-transformer backbones (MiniLM) were trained for, in place of BERT's first-token
    dense + tanh pooler (issue 22: the CLS pivot is 7-11 points worse for side-tuning here).
    The mask comes from the base model's call (``mean_pool`` hooks it)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None  # (B, S)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.shape != hidden.shape[:2]:
            return hidden.mean(1)
        m = self.mask.to(hidden.dtype).unsqueeze(-1)  # (B, S, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def mean_pool(model: nn.Module) -> None:
    """Swap the base model's pooler for ``MeanPooler``, fed the attention mask of each call
    (a forward pre-hook on the base model). A model without a pooler is left as it is (said)."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None or getattr(base, "pooler", None) is None:
        log.warning("%s has no pooler: the classifier keeps its own pooling", type(model).__name__)
        return
    pooler = MeanPooler()
    base.pooler = pooler

    def keep_mask(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.mask = mask

    base.register_forward_pre_hook(keep_mask, with_kwargs=True)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for _, p in model.named_parameters() if p.requires_grad]


def set_trainable(model: nn.Module, arrays: list[np.ndarray]) -> None:
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    if len(params) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(params)} trainable tensors")
    with torch.no_grad():
        for p, a in zip(params, arrays, strict=True):
            p.copy_(torch.from_numpy(np.asarray(a)))


def trainable_bytes(model: nn.Module, bytes_per_value: int = 4) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * bytes_per_value


def _batches(records: list[Any], batch: int, rng: np.random.Generator | None) -> list[list[Any]]:
    order = rng.permutation(len(records)) if rng is not None else np.arange(len(records))
    return [[records[i] for i in order[s : s + batch]] for s in range(0, len(records), batch)]


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, enc: dict, y: torch.Tensor) -> float:
    model.train()
    out = model(**enc)
    loss = nn.functional.cross_entropy(out.logits, y)  # logits (B, C)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_local(
    model: nn.Module,
    tok: Any,
    records: list[Any],
    *,
    epochs: int,
    batch: int,
    lr: float,
    max_seq_len: int,
    seed: int,
) -> tuple[int, float]:
    """Local epochs of AdamW (fresh optimiser each round, as a stateless FedAvg client)."""
    opt = make_optimizer(model, lr)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        for chunk in _batches(records, batch, rng):
            enc = tokenize(tok, [r.text for r in chunk], max_seq_len)
            y = torch.tensor([r.label for r in chunk], dtype=torch.long)  # (B,)
            losses.append(train_step(model, opt, enc, y))
    return len(records) * epochs, float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module, tok: Any, records: list[Any], max_seq_len: int, batch: int = 64
) -> dict:
    model.eval()
    correct, loss_sum = 0, 0.0
    for chunk in _batches(records, batch, None):
        enc = tokenize(tok, [r.text for r in chunk], max_seq_len)
        y = torch.tensor([r.label for r in chunk], dtype=torch.long)  # (B,)
        logits = model(**enc).logits  # (B, C)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    n = max(1, len(records))
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": len(records)}


@torch.no_grad()
def fwdgrad_step(
    model: nn.Module,
    enc: dict,
    y: torch.Tensor,
    *,
    perturbations: int,
    lr: float,
    eps: float = 1e-3,
    gen: torch.Generator | None = None,
) -> float:
    """FwdLLM-style step: forward passes only, no backprop. The gradient along P random
    directions v is estimated from forward differences (L(w + eps v) - L(w)) / eps and
    the update is w -= lr * mean_p(dL_p * v_p)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    base = float(nn.functional.cross_entropy(model(**enc).logits, y))
    grads = [torch.zeros_like(p) for p in params]
    for _ in range(perturbations):
        vs = [torch.randn(p.shape, generator=gen) for p in params]
        for p, v in zip(params, vs, strict=True):
            p.add_(v, alpha=eps)
        loss = float(nn.functional.cross_entropy(model(**enc).logits, y))
        for p, v, g in zip(params, vs, grads, strict=True):
            p.sub_(v, alpha=eps)
            g.add_(v, alpha=(loss - base) / eps / perturbations)
    for p, g in zip(params, grads, strict=True):
        p.sub_(g, alpha=lr)
    return base


# -- FLOPs ------------------------------------------------------------------------------


def _count(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def truncated_backbone(model_dir: str, deepest_tap: int) -> nn.Module:
    """The bundle's graph as a torch module: the encoder cut after the deepest tap, no
    pooler, no head (what `export` keeps)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    layers = model.encoder.layer
    model.encoder.layer = nn.ModuleList(list(layers)[:deepest_tap])
    model.config.num_hidden_layers = deepest_tap
    return model.eval()


def flops_per_sample(
    model_dir: str,
    num_labels: int,
    texts: list[str],
    *,
    max_seq_len: int,
    deepest_tap: int,
    lora_rank: int,
    perturbations: int,
    batch: int = 16,
    forward_batch: int = 8,
    upload_batch: int = 16,
) -> dict[str, Any]:
    """FLOPs per sample, averaged over real texts, each method batched as it runs: training
    steps on `batch` texts in the order given (a shuffled local epoch), padded to the
    longest; the fedmobillm forward as the device runtime does it, each upload batch of
    `upload_batch` texts in order of token length, `forward_batch` at a time, each pass
    padded to its own longest."""
    tok = load_tokenizer(model_dir)
    chunks = [texts[s : s + batch] for s in range(0, len(texts), batch)]
    encs = [tokenize(tok, c, max_seq_len) for c in chunks]
    fwd_encs = [
        tokenize(tok, c, max_seq_len)
        for c in device_forward_batches(tok, texts, max_seq_len, forward_batch, upload_batch)
    ]
    ys = [torch.zeros(len(c), dtype=torch.long) for c in chunks]
    n = len(texts)
    out: dict[str, Any] = {
        "samples": n,
        "mean_tokens": float(
            np.mean([int(e["attention_mask"].sum()) / e["attention_mask"].shape[0] for e in encs])
        ),
        "padded_len": float(np.mean([e["input_ids"].shape[1] for e in encs])),
    }

    out["device_padded_len"] = float(np.mean([e["input_ids"].shape[1] for e in fwd_encs]))
    out["device_forward_batch"] = forward_batch
    trunc = truncated_backbone(model_dir, deepest_tap)
    with torch.no_grad():
        out["fedmobillm_forward"] = sum(_count(partial(_call, trunc, e)) for e in fwd_encs) / n
    for method in ("lora", "full"):
        out.update(_train_flops(model_dir, num_labels, method, lora_rank, encs, ys, perturbations))
    out["total_params"] = _total_params(model_dir)
    return out


def device_forward_batches(
    tok: Any, texts: list[str], max_seq_len: int, forward_batch: int, upload_batch: int
) -> list[list[str]]:
    """The texts of each forward pass a device makes (``Backbone(texts, forward_batch)`` on
    each upload batch): within an upload batch, in order of token length (stable)."""
    from fedmobillm.device_runtime.backbone import forward_passes

    out = []
    for s in range(0, len(texts), upload_batch):
        window = texts[s : s + upload_batch]
        lengths = [min(len(ids), max_seq_len) for ids in tok(window)["input_ids"]]
        out += [[window[i] for i in rows] for rows in forward_passes(lengths, forward_batch)]
    return out


def _call(model: nn.Module, enc: dict) -> Any:
    return model(**enc)


def _train_flops(
    model_dir: str,
    num_labels: int,
    method: str,
    lora_rank: int,
    encs: list[dict],
    ys: list[torch.Tensor],
    perturbations: int,
) -> dict[str, Any]:
    model = build_classifier(ClassifierSpec(model_dir, num_labels, method, lora_rank))
    opt = make_optimizer(model, 1e-4)
    n = sum(len(y) for y in ys)
    total = sum(
        _count(partial(train_step, model, opt, e, y)) for e, y in zip(encs, ys, strict=True)
    )
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out: dict[str, Any] = {
        # AdamW touches each trainable value ~10 times per step (elementwise, not counted by
        # FlopCounterMode); added analytically, per sample.
        f"{method}_train_step": total / n + 10.0 * n_train * len(encs) / n,
        f"{method}_trainable_params": n_train,
    }
    with torch.no_grad():
        out[f"{method}_forward"] = sum(_count(partial(_call, model, e)) for e in encs) / n
    if method == "lora":
        gen = torch.Generator().manual_seed(0)
        step = partial(
            fwdgrad_step, model, encs[0], ys[0], perturbations=perturbations, lr=1e-4, gen=gen
        )
        out["fwdgrad_step"] = _count(step) / len(ys[0])
        out["fwdgrad_perturbations"] = perturbations
    return out


def _total_params(model_dir: str) -> int:
    from transformers import AutoModel

    return sum(p.numel() for p in AutoModel.from_pretrained(model_dir).parameters())


def rounds_to_float(x: float) -> float:
    return float("nan") if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def model_dir_of(name: str) -> str:
    from fedmobillm.export.models import resolve_model

    return str(Path(resolve_model(name)))
