"""Weight quantization for the ExecuTorch graph.

int8:  PT2E with the XNNPACK quantizer: dynamic (per-token) int8 activations, symmetric
       per-channel int8 weights, applied to the exported graph.
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

    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    with torch.no_grad():
        graph = torch.export.export(wrapped, example, dynamic_shapes=shapes.dynamic_shapes())
        prepared = prepare_pt2e(graph.module(), quantizer)
        for i in range(CALIBRATION_BATCHES):  # dynamic: observers need no data, but run anyway
            rows = slice(i * 8, (i + 1) * 8)
            if len(ids[rows]):
                prepared(torch.from_numpy(ids[rows]), torch.from_numpy(mask[rows]))
        converted = convert_pt2e(prepared)
        return torch.export.export(converted, example, dynamic_shapes=shapes.dynamic_shapes())


def torchao_8da4w(wrapped: nn.Module, example: tuple, shapes) -> torch.export.ExportedProgram:
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )

    model = copy.deepcopy(wrapped)
    quantize_(
        model,
        IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        filter_fn=lambda m, fqn: isinstance(m, nn.Embedding) and m.weight.shape[0] >= 1024,
    )
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
    quantize_(
        model,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE)
        ),
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE == 0,
    )
    with torch.no_grad():
        return torch.export.export(model, example, dynamic_shapes=shapes.dynamic_shapes())
