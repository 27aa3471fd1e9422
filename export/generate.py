"""Generation graphs for decoder bundles: a decoder step with a KV cache and the frozen LM
head, both ONNX, run torch-free by ``fedmobillm.device_runtime.generate``.

``decoder_step.onnx`` (``GEN_STEP_ONNX``)::

    input_ids        int64   [B, S]             the new tokens
    attention_mask   int64   [B, P + S]         1 = real token, over past and new tokens
    past.{i}.key     float32 [B, H_kv, P, D]    one pair per layer i = 0 .. depth-1
    past.{i}.value   float32 [B, H_kv, P, D]    (P = 0 on the first step)
  ->
    hidden           float32 [B, S, d]          last kept block's output after the final norm
    taps             float32 [B, K, S, d]       the bundle's tapped block outputs (pre-norm)
    present.{i}.key  float32 [B, H_kv, P + S, D]
    present.{i}.value

``lm_head.onnx`` (``GEN_HEAD_ONNX``): ``hidden [B, S, d] -> logits [B, S, V]``, the frozen
head (the tied input embedding for tied models). A personal lm model adds a residual to
``hidden`` and reads out through this head, so the head is never shipped in it.

The step graph is a re-implementation of the Llama-style forward (Llama, Mistral, Qwen2:
pre-norm blocks, rotary positions, grouped-query attention) over the Hugging Face
model's own modules (projections, norms, MLPs), with explicit past tensors: Hugging Face's
cache objects do not trace. It keeps the bundle's depth: a truncated bundle (taps up to
block 12 of 30) generates through 12 blocks, the final norm and the head (docs/lm.md).
Verified at export against Hugging Face's eager logits and, for a full-depth bundle, its
own greedy ``generate``.

Imports torch: import it lazily from anything that must start without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmobillm.device_runtime.protocol import (
    GEN_HEAD_DATA,
    GEN_HEAD_ONNX,
    GEN_STEP_DATA,
    GEN_STEP_ONNX,
    gen_past_names,
    gen_present_names,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")  # pre-norm blocks, rotary, grouped-query attention
MASKED = -1e9  # additive attention bias of a masked key (finite: no NaN on all-masked rows)
FP32_MIN_COSINE = 0.9999  # step logits vs eager Hugging Face, fp32 graph
INT8_MIN_COSINE = 0.98  # and for the int8 and 8da4w graphs (docs/lm.md: measured values)
# --generate's quantizations -> what the manifest's generation entry says of the weights
GEN_QUANT = {
    "fp32": "fp32",
    "int8": "MatMul weights 8-bit in blocks of 32 (MatMulNBits), fp32 activations; embedding 8-bit",
    "8da4w": "step MatMul weights 4-bit HQQ in blocks of 32 (MatMulNBits), fp32 activations, "
    "embedding 8-bit; head 8-bit",
}
VERIFY_NEW_TOKENS = 8  # greedy tokens compared with Hugging Face's generate at export


@dataclass(frozen=True)
class StepShape:
    """What the device needs to build a step's inputs."""

    depth: int  # blocks in the step graph (the bundle's deepest tap)
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


def load_causal_lm(folder: Path) -> nn.Module:
    """The full causal LM (with its head) of a local Hugging Face folder, fp32, eval."""
    from transformers import AutoModelForCausalLM

    from fedmobillm.export.wrapper import hf_load_kwargs

    model = AutoModelForCausalLM.from_pretrained(
        Path(folder), dtype=torch.float32, **hf_load_kwargs(Path(folder))
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config._attn_implementation = "eager"
    return model.eval()


def check_family(model: nn.Module) -> None:
    family = getattr(model.config, "model_type", "?")
    if family not in FAMILIES:
        raise FedMobiLLMError(
            f"--generate supports {', '.join(FAMILIES)} decoders, not {family!r}",
            hint="export without --generate; the bundle still uploads activations",
        )
    rope = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope == "dynamic":
        raise FedMobiLLMError(
            "--generate cannot export dynamic rope scaling (its frequencies depend on length)",
            hint="export without --generate",
        )


def step_shape(model: nn.Module, depth: int) -> StepShape:
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return StepShape(depth, kv, head_dim, int(cfg.hidden_size), int(cfg.vocab_size))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderStep(nn.Module):
    """(input_ids [B,S], attention_mask [B,P+S], *past) -> (hidden, taps, *present); see the
    module docstring. Shares the Hugging Face model's weights (nothing is copied)."""

    def __init__(self, causal_lm: nn.Module, taps: list[int]) -> None:
        super().__init__()
        check_family(causal_lm)
        base = causal_lm.model
        self.depth = int(taps[-1])
        self.taps = [int(t) for t in taps]
        self.embed = base.embed_tokens
        self.layers = nn.ModuleList(list(base.layers)[: self.depth])
        self.norm = base.norm
        shape = step_shape(causal_lm, self.depth)
        self.heads = int(causal_lm.config.num_attention_heads)
        self.kv_heads, self.head_dim = shape.num_kv_heads, shape.head_dim
        rotary = base.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, 1, S, D]."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)
        return (emb.cos() * self.rope_scale)[:, None], (emb.sin() * self.rope_scale)[:, None]

    def _bias(self, attention_mask: torch.Tensor, new: int) -> torch.Tensor:
        """attention_mask [B, T] -> additive bias [B, 1, S, T]: causal over the last S of T
        positions and padding."""
        total = attention_mask.shape[1]
        keys = torch.arange(total, device=attention_mask.device)  # (T,)
        queries = keys[total - new :]  # (S,): absolute positions of the new tokens
        causal = keys[None, :] <= queries[:, None]  # (S, T)
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # (B,1,S,T)
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(allowed, zero, torch.full((), MASKED, dtype=torch.float32))

    def _qkv(self, attn, x, cos, sin):
        """x [B,S,d] -> q [B,H,S,D], k and v [B,H_kv,S,D], rotated at their positions."""
        b, s = x.shape[0], x.shape[1]
        q = attn.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B,H,S,D)
        k = attn.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _mix(self, attn, q, k, v, bias):
        """Attention of q [B,H,S,D] over k, v [B,H_kv,T,D] with bias [B,1,S,T] -> [B,S,d]."""
        b, s = q.shape[0], q.shape[2]
        rep = self.heads // self.kv_heads
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k  # (B, H, T, D)
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.matmul(q, kk.transpose(2, 3)) * (self.head_dim**-0.5) + bias  # (B,H,S,T)
        probs = torch.softmax(scores.float(), dim=-1)
        out = torch.matmul(probs, vv).transpose(1, 2).reshape(b, s, -1)  # (B, S, H*D)
        return attn.o_proj(out)

    def _attend(self, attn, x, cos, sin, bias, past_k, past_v):
        """One attention sub-block with explicit past: x [B,S,d] -> ([B,S,d], k, v)."""
        q, k, v = self._qkv(attn, x, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # (B, H_kv, P+S, D)
        v = torch.cat([past_v, v], dim=2)
        return self._mix(attn, q, k, v, bias), k, v

    def blocks(self, h: torch.Tensor, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept blocks over embeddings h [B,S,d], ``attend(i, attn, x) -> [B,S,d]`` the
        attention of block i -> (final-norm hidden [B,S,d], taps [B,K,S,d])."""
        captured = {}
        for i, layer in enumerate(self.layers):
            h = h + attend(i, layer.self_attn, layer.input_layernorm(h))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            captured[i + 1] = h
        taps = torch.stack([captured[t] for t in self.taps], dim=1)  # (B, K, S, d)
        return self.norm(h), taps

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        new = input_ids.shape[1]
        positions = attention_mask.long().cumsum(-1) - 1  # (B, T)
        positions = positions.masked_fill(attention_mask == 0, 1)[:, -new:]  # (B, S)
        cos, sin = self._rope(positions)
        bias = self._bias(attention_mask, new)
        presents: list[torch.Tensor] = []

        def attend(i, attn, x):
            a, k, v = self._attend(attn, x, cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents.extend((k, v))
            return a

        hidden, taps = self.blocks(self.embed(input_ids), attend)
        return (hidden, taps, *presents)


class LmHead(nn.Module):
    """hidden [B, S, d] -> logits [B, S, V]: the model's own output projection."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        head = causal_lm.get_output_embeddings()
        if head is None:
            raise FedMobiLLMError(f"{type(causal_lm).__name__} has no output embeddings (LM head)")
        self.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # (V, d)
        bias = getattr(head, "bias", None)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)


def step_example(shape: StepShape, batch: int = 2, new: int = 3, past: int = 2):
    """Example inputs of the step graph (random ids below 5 avoided, all real tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, shape.vocab_size, (batch, new), generator=g)  # (B, S)
    mask = torch.ones(batch, past + new, dtype=torch.int64)  # (B, P+S)
    kv = (batch, shape.num_kv_heads, past, shape.head_dim)
    pasts = [torch.randn(kv, generator=g) for _ in range(2 * shape.depth)]
    return (ids, mask, *pasts)


def write_step_onnx(step: DecoderStep, shape: StepShape, path: Path) -> None:
    from fedmobillm.export.graphs import write_onnx_torchscript

    past_names, present_names = gen_past_names(shape.depth), gen_present_names(shape.depth)
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "hidden": {0: "batch", 1: "seq"},
        "taps": {0: "batch", 2: "seq"},
    }
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    with torch.no_grad():
        write_onnx_torchscript(
            step,
            step_example(shape),
            path,
            ["input_ids", "attention_mask", *past_names],
            ["hidden", "taps", *present_names],
            axes,
        )


def write_head_onnx(head: LmHead, hidden_size: int, path: Path) -> None:
    from fedmobillm.export.graphs import write_onnx_torchscript

    example = torch.zeros(1, 2, hidden_size)
    axes = {"hidden": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    with torch.no_grad():
        write_onnx_torchscript(head, (example,), path, ["hidden"], ["logits"], axes)


# ---------------------------------------------------------------- bundle stages


@dataclass
class GenerationExport:
    """What ``write_generation`` made: the manifest entry and the model it came from
    (kept for ``verify_generation``)."""

    info: dict
    model: nn.Module
    taps: list[int]


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        values = value if isinstance(value, (list, tuple)) else [value]
        found += [int(v) for v in values if isinstance(v, int) and int(v) not in found]
    return found


def write_generation(
    folder: Path,
    taps: list[int],
    quant: str,
    out: Path,
    tokenizer,
) -> GenerationExport:
    """Write ``decoder_step.onnx`` and ``lm_head.onnx`` (weights as external data) into
    ``out`` at ``quant`` (``GEN_QUANT``; none of them needs calibration data). Returns the
    manifest's generation entry, less its verification."""
    from fedmobillm.export.graphs import externalize_onnx

    if quant not in GEN_QUANT:
        raise FedMobiLLMError(
            f"--generate writes ONNX graphs, which have no {quant} quantization",
            hint=f"use --quant {' or '.join(GEN_QUANT)} with --generate",
        )
    model = load_causal_lm(folder)
    step = DecoderStep(model, taps).eval()
    shape = step_shape(model, step.depth)
    step_path, head_path = out / GEN_STEP_ONNX, out / GEN_HEAD_ONNX
    raw_step = step_path if quant == "fp32" else out / "decoder_step.fp32.onnx.tmp"
    raw_head = head_path if quant == "fp32" else out / "lm_head.fp32.onnx.tmp"
    log.info(
        "generate: decoder step, %d blocks, KV cache %d x %d heads x %d",
        shape.depth,
        2 * shape.depth,
        shape.num_kv_heads,
        shape.head_dim,
    )
    write_step_onnx(step, shape, raw_step)
    write_head_onnx(LmHead(model), shape.hidden_size, raw_head)
    if quant != "fp32":
        quantize_generation(raw_step, step_path, raw_head, head_path, quant)
        raw_step.unlink()
        raw_head.unlink()
    externalize_onnx(step_path, GEN_STEP_DATA)
    externalize_onnx(head_path, GEN_HEAD_DATA)
    info = {
        "step": GEN_STEP_ONNX,
        "head": GEN_HEAD_ONNX,
        "format": "onnx",
        "quant": quant,
        "depth": shape.depth,
        "full_depth": int(model.config.num_hidden_layers),
        "taps": [int(t) for t in taps],
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_size": shape.hidden_size,
        "vocab_size": shape.vocab_size,
        "max_context": max_context(model.config),
        "eos_token_ids": eos_token_ids(model, tokenizer),
        "tied_head": bool(getattr(model.config, "tie_word_embeddings", False)),
        "weights": GEN_QUANT[quant],
    }
    return GenerationExport(info, model, [int(t) for t in taps])


def max_context(config) -> int:
    """Longest context the step graph reproduces: the model's positions, and no more than
    a sliding attention window (the graph attends to the whole context)."""
    limit = int(getattr(config, "max_position_embeddings", None) or 2048)
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    if isinstance(window, int) and window > 0 and uses_window:
        limit = min(limit, window)
    return limit


def quantize_generation(
    raw_step: Path, step_path: Path, raw_head: Path, head_path: Path, quant: str
) -> None:
    """The step and head graphs at ``quant`` (onnxruntime MatMulNBits, blocks of 32).

    int8: weight-only 8-bit (activations fp32). onnxruntime's dynamic int8 (one activation
    scale per tensor, as for backbones) failed SmolLM2's check (logits min cosine 0.814,
    greedy agreement 6%) even with its outlier MatMuls kept fp32; 8-bit weights pass it
    (0.984). 8da4w: 4-bit HQQ weights in the step graph (0.987), activations fp32 as on every
    ONNX 8da4w graph (``graphs.quantize_backbone_onnx_8da4w`` says why). The step graph's
    embedding table is 8-bit in both; the head (the tied embedding's copy) keeps 8-bit
    weights, as ExecuTorch's 8da4w keeps 8-bit embeddings."""
    from fedmobillm.export.graphs import (
        quantize_onnx_nbits,
        quantize_onnx_weights,
    )

    if quant == "8da4w":
        log.info("generate: 8da4w step graph (4-bit HQQ weights, fp32 activations)")
        quantize_onnx_weights(raw_step, step_path, bits=4)
    else:
        log.info("generate: int8 step graph (8-bit weights, fp32 activations)")
        quantize_onnx_weights(raw_step, step_path, bits=8)
    quantize_onnx_nbits(raw_head, head_path, bits=8)


def reference_logits(
    model: nn.Module, depth: int, ids: torch.Tensor, mask: torch.Tensor
) -> np.ndarray:
    """Eager Hugging Face logits [B, T, V] of the model cut after block ``depth``: the
    untouched model when it is full depth, else block ``depth``'s output through the final
    norm and the head."""
    with torch.no_grad():
        if depth == int(model.config.num_hidden_layers):
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()
        out = model.model(
            input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True
        )
        hidden = model.model.norm(out.hidden_states[depth])
        return model.get_output_embeddings()(hidden).float().numpy()


def hf_greedy(
    model: nn.Module, prompt_ids: list[int], new_tokens: int, eos: list[int]
) -> list[int]:
    """Hugging Face's own greedy ``generate`` (with its cache): the new token ids."""
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def verify_generation(
    made: GenerationExport,
    out: Path,
    ids: np.ndarray,
    mask: np.ndarray,
    prompts: int = 2,
    backend: str = "onnx",
) -> dict:
    """Run the written graphs (onnxruntime, or ExecuTorch for ``backend`` "pte") against
    eager Hugging Face: logits of a whole-context forward on ``ids``/``mask`` [N, T] (cosine
    per real position, max abs), cache vs no cache, and (full depth only) greedy tokens
    against ``generate``.

    Raises (``stage verify``-style, so an export with a fallback quant retries) when the
    logits disagree beyond the quant's floor, or an fp32 graph's greedy tokens differ."""
    from fedmobillm.device_runtime.generate import DecoderGraphs

    info, model = made.info, made.model
    graphs = DecoderGraphs(out, info, threads=2, backend=backend)
    got = graphs.forward_logits(ids, mask)  # (N, T, V)
    want = reference_logits(model, info["depth"], torch.from_numpy(ids), torch.from_numpy(mask))
    real = mask.astype(bool)  # (N, T)
    a, b = got[real].astype(np.float64), want[real].astype(np.float64)  # (n, V)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    result = {
        "logits_max_abs": float(np.abs(a - b).max()),
        "logits_min_cosine": float(cos.min()),
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
    }
    result.update(_greedy_checks(graphs, model, info, ids, mask, prompts))
    log.info("verify %s generation (%s): %s", backend, info["quant"], result)
    floor = FP32_MIN_COSINE if info["quant"] == "fp32" else INT8_MIN_COSINE
    if not result["logits_min_cosine"] >= floor:
        raise FedMobiLLMError(
            f"stage verify: the {info['quant']} {backend} generation graph disagrees with eager "
            f"PyTorch "
            f"(logits min cosine {result['logits_min_cosine']:.5f} < {floor})",
            hint="export without --generate, or with --quant fp32",
        )
    # Only fp32 must give Hugging Face's greedy tokens: quantized weights move the logits,
    # and greedy decoding parts at the first near tie; the quantized graphs are held to the
    # logits floor above, and their cache/no-cache and Hugging Face agreement is recorded.
    if info["quant"] == "fp32" and (
        not result["cache_matches_no_cache"] or result.get("hf_greedy_agreement", 1.0) < 1.0
    ):
        raise FedMobiLLMError(
            f"stage verify: greedy generation of the {info['quant']} {backend} graph differs: "
            f"{result}",
            hint="export without --generate; please report this model",
        )
    return result


def _greedy_checks(graphs, model, info: dict, ids, mask, prompts: int) -> dict:
    """Greedy tokens with and without the cache and, at full depth, Hugging Face's."""
    prompt_rows = [
        ids[r, : max(2, min(int(mask[r].sum()), 12))].tolist()
        for r in range(min(prompts, len(ids)))
    ]
    same_cache, agree, total, hf_rows = True, 0, 0, []
    for row in prompt_rows:
        cached, _, _ = graphs.generate_ids(row, VERIFY_NEW_TOKENS, use_cache=True)
        fresh, _, _ = graphs.generate_ids(row, VERIFY_NEW_TOKENS, use_cache=False)
        same_cache = same_cache and cached == fresh
        if info["depth"] == info["full_depth"]:
            hf = hf_greedy(model, row, VERIFY_NEW_TOKENS, info["eos_token_ids"])
            agree += sum(x == y for x, y in zip(cached, hf, strict=False))
            total += max(len(cached), len(hf))
            hf_rows.append({"prompt": row, "onnx": cached, "hf": hf})
    out: dict = {"cache_matches_no_cache": bool(same_cache), "greedy_new_tokens": VERIFY_NEW_TOKENS}
    if total:
        out["hf_greedy_agreement"] = agree / total
    return out
