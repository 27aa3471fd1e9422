"""Weight quantization for the ExecuTorch graph.

int8:  PT2E with the XNNPACK quantizer: dynamic (per-token) int8 activations, symmetric
       per-channel int8 weights, applied to the exported graph; embedding tables 8-bit
       weight-only (per row).
8da4w: torchao source transform: 8-bit dynamic activations, 4-bit weights grouped by 32;
       embedding tables 8-bit weight-only (they dominate file size and are only gathered).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

GROUP_SIZE = 32
CALIBRATION_BATCHES = 2


def quantize_for_pte(
    wrapped: nn.Module, quant: str, example: tuple, shapes, ids: np.ndarray, mask: np.ndarray
) -> torch.export.ExportedProgram:
    if quant == "int8":
        return pt2e_int8(wrapped, example, shapes, ids, mask)
    if quant == "8da4w":
        return torchao_8da4w(wrapped, example, shapes)
    raise FedMobiLLMError(f"no ExecuTorch quantization for {quant!r}")


def pt2e_int8(
    wrapped: nn.Module, example: tuple, shapes, ids: np.ndarray, mask: np.ndarray
) -> torch.export.ExportedProgram:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = copy.deepcopy(wrapped)
    _int8_embeddings(model)  # the PT2E quantizer leaves embedding tables fp32
    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    with torch.no_grad():
        graph = torch.export.export(model, example, dynamic_shapes=shapes.dynamic_shapes())
        module = _integer_scalar_ops(graph.module())
        prepared = prepare_pt2e(module, quantizer)
        for i in range(CALIBRATION_BATCHES):  # dynamic: observers need no data, but run anyway
            rows = slice(i * 8, (i + 1) * 8)
            if len(ids[rows]):
                prepared(torch.from_numpy(ids[rows]), torch.from_numpy(mask[rows]))
        converted = convert_pt2e(prepared)
        return torch.export.export(converted, example, dynamic_shapes=shapes.dynamic_shapes())


def torchao_8da4w(wrapped: nn.Module, example: tuple, shapes) -> torch.export.ExportedProgram:
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    model = copy.deepcopy(wrapped)
    _int8_embeddings(model)
    skipped = [
        fqn
        for fqn, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE
    ]
    if skipped:
        log.warning(
            "quantize: %d linear layers keep fp32 weights (in_features not a multiple of %d): %s",
            len(skipped),
            GROUP_SIZE,
            skipped[:3],
        )
    # The deepest tapped block keeps 8-bit weights: its output is the last tap and, with
    # 4-bit weights, loses the most (MiniLM-L6 last tap cosine 0.969 -> 0.98 with it 8-bit).
    deepest = f"model.{wrapped._paths[-1]}."
    eight_bit = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int8, weight_granularity=PerAxis(0)
    )
    four_bit = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4,
        weight_granularity=PerGroup(GROUP_SIZE),
        intx_choose_qparams_algorithm="hqq_scale_only",
    )
    quantize_(model, eight_bit, filter_fn=lambda m, fqn: _linear(m) and fqn.startswith(deepest))
    quantize_(
        model,
        four_bit,
        filter_fn=lambda m, fqn: (
            _linear(m) and m.in_features % GROUP_SIZE == 0 and not fqn.startswith(deepest)
        ),
    )
    log.info("quantize: 8da4w (group %d, HQQ scales); %s* keeps 8-bit weights", GROUP_SIZE, deepest)
    with torch.no_grad():
        return torch.export.export(model, example, dynamic_shapes=shapes.dynamic_shapes())


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _integer_scalar_ops(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """aten.add/mul.Tensor(int_tensor, python_scalar) -> the .Scalar overloads.

    The XNNPACK quantizer turns every scalar operand of add/mul into a *float* tensor
    constant, which silently turns integer index arithmetic (e.g. mask positions) float."""
    overloads = {
        torch.ops.aten.add.Tensor: torch.ops.aten.add.Scalar,
        torch.ops.aten.mul.Tensor: torch.ops.aten.mul.Scalar,
    }
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in overloads or len(node.args) != 2:
            continue
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        scalars = [a for a in node.args if isinstance(a, (int, float, bool))]
        if len(tensors) != 1 or len(scalars) != 1 or node.kwargs:
            continue
        val = tensors[0].meta.get("val")
        if val is None or val.is_floating_point():
            continue
        node.target = overloads[node.target]
        node.args = (tensors[0], scalars[0])
    gm.recompile()
    return gm


class Int8Embedding(nn.Module):
    """Embedding table with int8 weights, one symmetric scale per row, read through
    ExecuTorch's ``quantized_decomposed::embedding_byte`` kernel."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401 - op defs

        w = embedding.weight.detach().float()  # (V, d)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # (V,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (V, d)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scale)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.default(
            self.weight_int8, self.scales, None, -127, 127, indices
        )  # (..., d)


def _int8_embeddings(model: nn.Module, min_rows: int = 1024) -> None:
    """Replace large embedding tables (token vocabularies) by int8 weight-only ones."""
    from fedmobillm.export.wrapper import set_submodule

    targets = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and m.num_embeddings >= min_rows
    ]
    for name in targets:
        set_submodule(model, name, Int8Embedding(model.get_submodule(name)))
    log.info("quantize: int8 weight-only embeddings: %s", targets)
