"""ExecuTorch (.pte) generation graphs for decoder bundles, written beside the ONNX ones when
``--generate`` is asked with ``pte`` in ``--format``.

``decoder_step.pte`` (``GEN_STEP_PTE``) keeps its KV cache inside the program, as mutable
buffers of a fixed length ``max_context`` (ExecuTorch's own Llama runner does the same), so
no cache crosses the call boundary::

    input_ids   int64 [1, S]    the new tokens, 1 <= S <= max_context - start_pos
    start_pos   int64 [1]       the position of the first of them (0: a new context)
  ->
    hidden      float32 [1, S, d]      last kept block's output after the final norm
    taps        float32 [1, K, S, d]   the bundle's tapped block outputs (pre-norm)

Each call writes the new tokens' keys and values at ``start_pos ..`` and attends to positions
``<= `` each query's own, so entries past the current context (left from an earlier, longer
one) are never read: a new prompt starts at ``start_pos`` 0 without clearing anything.

``lm_head.pte`` (``GEN_HEAD_PTE``): ``hidden [1, S, d] -> logits [1, S, V]``, the frozen head.

Quantizations (``PTE_QUANT``): fp32; int8 (torchao 8-bit dynamic activations per token,
8-bit weights per channel, embedding 8-bit); 8da4w (4-bit HQQ weights in groups of 32,
embedding and head 8-bit), lowered to XNNPACK like the backbone's .pte.

Imports torch: import it lazily from anything that must start without it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from fedmobillm.device_runtime.protocol import GEN_HEAD_PTE, GEN_STEP_PTE
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.export.generate import MASKED, DecoderStep, GenerationExport, LmHead, StepShape

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 512  # cache length of the .pte step: prompt + new tokens
PTE_QUANT = {
    "fp32": "fp32",
    "int8": "8-bit dynamic activations per token, 8-bit weights per channel; embedding 8-bit",
    "8da4w": "8-bit dynamic activations, step weights 4-bit HQQ in groups of 32; embedding "
    "and head 8-bit",
}
GROUP_SIZE = 32


class CachedDecoderStep(nn.Module):
    """(input_ids [1, S], start_pos [1]) -> (hidden [1, S, d], taps [1, K, S, d]) over a
    ``DecoderStep``'s blocks, with the KV cache as buffers of ``context`` positions."""

    def __init__(self, step: DecoderStep, shape: StepShape, context: int) -> None:
        super().__init__()
        self.step, self.context = step, int(context)
        kv = (1, shape.num_kv_heads, self.context, shape.head_dim)
        for i in range(step.depth):  # not persistent: the program starts with zeros
            self.register_buffer(f"key_{i}", torch.zeros(kv), persistent=False)
            self.register_buffer(f"value_{i}", torch.zeros(kv), persistent=False)

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor):
        s = self.step
        positions = start_pos + torch.arange(input_ids.shape[1], dtype=torch.int64)  # (S,)
        cos, sin = s._rope(positions[None])
        keys = torch.arange(self.context, dtype=torch.int64)  # (T,)
        allowed = keys[None, :] <= positions[:, None]  # (S, T): causal, and written entries
        bias = torch.where(allowed, torch.zeros(()), torch.full((), MASKED))[None, None]

        def attend(i, attn, x):
            q, k, v = s._qkv(attn, x, cos, sin)
            cache_k, cache_v = getattr(self, f"key_{i}"), getattr(self, f"value_{i}")
            cache_k.index_copy_(2, positions, k)  # (1, H_kv, T, D) in place
            cache_v.index_copy_(2, positions, v)
            return s._mix(attn, q, cache_k, cache_v, bias)

        return s.blocks(s.embed(input_ids), attend)


def check_context(context: int, model_limit: int) -> int:
    """The .pte cache length: at least 2, at most what the model reproduces."""
    if not 2 <= int(context) <= model_limit:
        raise FedMobiLLMError(
            f"--generate-context {context} is out of range: 2 .. {model_limit} for this model",
            hint=f"e.g. --generate-context {min(DEFAULT_CONTEXT, model_limit)}",
        )
    return int(context)


def write_generation_pte(made: GenerationExport, out: Path, quant: str, context: int) -> dict:
    """Write ``decoder_step.pte`` and ``lm_head.pte`` into ``out`` for the generation entry
    ``made`` (from ``write_generation``) at ``quant``; returns the entry's "pte" part, less
    its verification. The eager model in ``made`` is left untouched (quantization works on
    copies), so it still serves as the reference."""
    from fedmobillm.export.graphs import write_pte

    if quant not in PTE_QUANT:
        raise FedMobiLLMError(
            f"--generate has no .pte graphs at {quant}",
            hint=f"use --quant {' or '.join(PTE_QUANT)}",
        )
    info = made.info
    context = check_context(context, int(info["max_context"]))
    step = DecoderStep(made.model, made.taps).eval()
    shape = StepShape(
        step.depth,
        int(info["num_kv_heads"]),
        int(info["head_dim"]),
        int(info["hidden_size"]),
        int(info["vocab_size"]),
    )
    cached = _quantized(CachedDecoderStep(copy.deepcopy(step), shape, context), quant, head=False)
    head = _quantized(LmHead(made.model), quant, head=True)
    seq = torch.export.Dim("seq", min=1, max=context)
    ids = torch.randint(5, shape.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    log.info("generate: .pte decoder step (%s, KV cache of %d positions)", quant, context)
    with torch.no_grad():
        step_ep = torch.export.export(
            cached, (ids, torch.zeros(1, dtype=torch.int64)), dynamic_shapes=({1: seq}, None)
        )
        head_ep = torch.export.export(
            head, (torch.zeros(1, 4, shape.hidden_size),), dynamic_shapes=({1: seq},)
        )
    write_pte(step_ep, out / GEN_STEP_PTE, split_dynamic=quant != "fp32")
    write_pte(head_ep, out / GEN_HEAD_PTE, split_dynamic=quant != "fp32")
    return {
        "step": GEN_STEP_PTE,
        "head": GEN_HEAD_PTE,
        "format": "pte",
        "quant": quant,
        "max_context": context,
        "weights": PTE_QUANT[quant],
    }


def _quantized(module: nn.Module, quant: str, head: bool) -> nn.Module:
    """``module`` as it is (fp32), or a quantized copy: 8-bit embeddings, and linears with
    8-bit dynamic activations and 8-bit (int8, and the 8da4w head) or 4-bit weights."""
    if quant == "fp32":
        return module
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    from fedmobillm.export.quantize import _int8_embeddings

    module = copy.deepcopy(module)
    _int8_embeddings(module)
    if quant == "int8" or head:
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=PerAxis(0)
        )
    else:
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4,
            weight_granularity=PerGroup(GROUP_SIZE),
            intx_choose_qparams_algorithm="hqq_scale_only",
        )
    if head:  # LmHead holds a bare weight: quantize it as the Linear it is
        module = _HeadLinear(module)
    quantize_(module, config, filter_fn=lambda m, fqn: _quantizable(m, quant, head))
    return module


def _quantizable(m: nn.Module, quant: str, head: bool) -> bool:
    if not isinstance(m, nn.Linear):
        return False
    return quant == "int8" or head or m.in_features % GROUP_SIZE == 0


class _HeadLinear(nn.Module):
    """An ``LmHead`` as an ``nn.Linear`` (what torchao quantizes)."""

    def __init__(self, head: LmHead) -> None:
        super().__init__()
        v, d = head.weight.shape
        self.linear = nn.Linear(d, v, bias=head.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(head.weight)
            if head.bias is not None:
                self.linear.bias.copy_(head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)
