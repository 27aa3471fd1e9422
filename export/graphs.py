"""Write and quantise graphs: ONNX (torch.onnx dynamo for backbones, the TorchScript exporter
for personal models; onnxruntime dynamic int8, MatMulNBits 8da4w) and ExecuTorch .pte
(torch.export -> XNNPACK lowering; fp32, PT2E int8, torchao 8da4w). The one place graphs are written: the bundle
exporter and the server's personal-model export call it. They run through
``fedmobillm.device_runtime.graph``.

Imports torch: import this module lazily from anything that must start without it."""

from __future__ import annotations

import ast
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmobillm.device_runtime.backbone import GRAPH_DATA, GRAPH_FILES
from fedmobillm.device_runtime.files import replacing
from fedmobillm.device_runtime.graph import BACKBONE_INPUTS, BACKBONE_OUTPUT, FORMATS, onnx_session
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

FILE_NAMES = GRAPH_FILES  # the device runtime's names, which the manifest lists
# The ONNX graph's weights live beside it (ONNX external data): onnxruntime maps this file
# into memory instead of parsing the weights out of the graph and copying them, which takes
# a device step's peak RSS on MiniLM-L6 from 117 to 104-111 MiB (int8), 206 to 146-172 (fp32).
ONNX_DATA = GRAPH_DATA["onnx"]
EXTERNAL_MIN_BYTES = 1024  # smaller tensors (scales, zero points, shapes) stay in the graph

# quant -> formats that can carry it, and why not otherwise (every combination is carried
# today; the check stays for the next quantization one backend lacks)
UNSUPPORTED: dict[tuple[str, str], str] = {}


@dataclass
class Shapes:
    """Dynamic-dimension bounds the graphs accept (ExecuTorch plans memory for the uppers)."""

    max_batch: int
    max_seq_len: int

    def dynamic_shapes(self) -> dict:
        batch = torch.export.Dim("batch", min=1, max=self.max_batch)
        seq = torch.export.Dim("seq", min=2, max=self.max_seq_len)
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def check_combination(quant: str, formats: tuple[str, ...]) -> None:
    for fmt in formats:
        if fmt not in FORMATS:
            raise FedMobiLLMError(
                f"unknown format {fmt!r}", hint=f"choose from {', '.join(FORMATS)}"
            )
        reason = UNSUPPORTED.get((quant, fmt))
        if reason:
            raise FedMobiLLMError(
                f"--quant {quant} cannot be exported to {fmt}: {reason}",
                hint=f"use --format pte for {quant}, or --quant int8 for {fmt}",
            )


def torch_export(module: nn.Module, args: tuple, shapes: Shapes) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=shapes.dynamic_shapes())


def graph_param_count(ep: torch.export.ExportedProgram) -> int:
    """Parameters and constant tensors the graph actually reads."""
    sig = ep.graph_signature
    used = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    total = 0
    for placeholder, name in names.items():
        if placeholder in used:
            tensor = ep.state_dict.get(name)
            if tensor is None:
                tensor = ep.constants.get(name)
            if tensor is not None and tensor.is_floating_point():
                total += tensor.numel()
    return total


# ---------------------------------------------------------------- ONNX


def write_onnx(ep: torch.export.ExportedProgram, path: Path, args: tuple, shapes: Shapes) -> None:
    program = torch.onnx.export(
        ep,
        args,
        dynamo=True,
        input_names=list(BACKBONE_INPUTS),
        output_names=[BACKBONE_OUTPUT],
        external_data=False,
        optimize=True,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def write_onnx_torchscript(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """The TorchScript exporter (opset 17), for small modules such as a personal model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )


def externalize_onnx(path: Path, data_name: str) -> None:
    """Rewrite the ONNX file at ``path`` with its weights in ``data_name`` beside it (ONNX
    external data), replacing both files atomically enough for an export's temp folder."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path))
    tmp_graph, data = path.with_name(path.name + ".tmp"), path.with_name(data_name)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(tmp_graph),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=EXTERNAL_MIN_BYTES,
    )
    tmp_graph.replace(path)


# A MatMul whose input range is this many times the median MatMul input range stays fp32:
# onnxruntime's dynamic int8 uses one activation scale per tensor, and a few huge outliers
# (SmolLM2's MLP down-projections reach ~26,000) leave no resolution for everything else.
OUTLIER_RATIO = 6.0


BACKBONE_QUANT_OPS = ("MatMul", "Gemm", "Gather")


def quantize_backbone_onnx(
    src: Path, dst: Path, ids: np.ndarray | None = None, mask: np.ndarray | None = None
) -> None:
    """A backbone's int8 graph. With calibration inputs, MatMuls whose activation range is
    an outlier are kept in fp32 (see OUTLIER_RATIO)."""
    exclude = outlier_matmuls(src, ids, mask) if ids is not None and mask is not None else []
    if exclude:
        log.info("quantize: %d MatMul(s) with outlier inputs stay fp32", len(exclude))
    quantize_onnx_int8(src, dst, op_types=BACKBONE_QUANT_OPS, exclude=exclude)


# ONNX 8da4w and weight-only int8: onnxruntime's MatMulNBits (com.microsoft), weights in
# blocks of NBITS_BLOCK along the input dimension, one scale (and zero point) per block.
NBITS_BLOCK = 32


def quantize_backbone_onnx_8da4w(src: Path, dst: Path, depth: int) -> None:
    """A backbone's ``8da4w`` ONNX graph: weight MatMuls 4-bit (HQQ, blocks of 32),
    embedding tables 8-bit (``quantize_onnx_weights``), and the deepest block (the graph ends
    at the deepest tap) at 8-bit weights, as the ExecuTorch 8da4w keeps it: on MiniLM-L6
    (mean pivot) that lifts the last tap's worst cosine against the fp32 graph from 0.950
    to 0.959. Unlike the .pte, activations stay fp32 (weight-only): onnxruntime's int8
    activations need integer zero points, which HQQ does not write, and round-to-nearest
    4-bit with them broke SmolLM2 (logits min cosine 0.12 against fp32, docs/export.md)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    nodes = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights
    ]
    gemms = [
        n.name
        for n in model.graph.node
        if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in weights
    ]
    if gemms:
        log.warning(
            "quantize: %d Gemm node(s) with weights stay fp32 (MatMulNBits takes MatMuls): %s",
            len(gemms), gemms[:3],
        )  # fmt: skip
    last = deepest_block_matmuls(model, nodes, depth)
    if not last:
        log.warning(
            "quantize: %d weight MatMuls over %d blocks: the deepest block is not told apart, "
            "every MatMul gets 4-bit weights", len(nodes), depth,
        )  # fmt: skip
    four = dst.with_name(dst.name + ".4bit.tmp")
    try:
        quantize_onnx_weights(src, four, bits=4, exclude=last)
        if last:
            quantize_onnx_nbits(four, dst, bits=8)
        else:
            four.replace(dst)
    finally:
        four.unlink(missing_ok=True)


def _block_index(node: Any) -> int | None:
    """The index of the block a node of a dynamo-exported graph belongs to: the outermost
    module scope ending in an integer (``model.layers.29``, ``encoder.layer.5``) in the
    node's ``pkg.torch.onnx.name_scopes`` metadata; None outside any block or without it."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            for scope in scopes if isinstance(scopes, list) else ():
                last = str(scope).rsplit(".", 1)[-1]
                if last.isdigit():
                    return int(last)
            return None
    return None


def deepest_block_matmuls(model: Any, nodes: Sequence[str], depth: int) -> list[str]:
    """The weight MatMuls (names in ``nodes``, graph order) of the deepest block of
    ``model``'s ``depth`` blocks. From the exporter's module scopes where every weight
    MatMul of a block carries one (MatMuls outside any block, e.g. a projection, are never
    taken); otherwise, for graphs without that metadata, the last ``len // depth`` in graph
    order when the count divides evenly (the blocks are then the only weight MatMuls, true
    of every family exported today); [] when neither tells the block apart."""
    by_name = {n.name: n for n in model.graph.node}
    index = {name: _block_index(by_name[name]) for name in nodes}
    known = [i for i in index.values() if i is not None]
    if known:
        deepest = max(known)
        if len(set(known)) == depth or depth <= 0:
            return [name for name in nodes if index[name] == deepest]
        log.warning(
            "quantize: the graph's module scopes name %d blocks, the bundle %d: falling back "
            "to the MatMul count", len(set(known)), depth,
        )  # fmt: skip
    if depth > 0 and nodes and len(nodes) % depth == 0:
        return list(nodes[-(len(nodes) // depth) :])
    return []


def quantize_onnx_weights(
    src: Path,
    dst: Path,
    bits: int,
    exclude: Sequence[str] = (),
) -> None:
    """Embedding tables (Gather) to 8-bit weights, one scale and zero point per table
    (``quantize_onnx_int8``, 8 bits: a table is only gathered, so the 7-bit rule for MatMuls
    does not apply; a table with outlier channels would lose resolution everywhere, which
    the export's check then reports), then the weight MatMuls to ``bits``-bit MatMulNBits
    (``quantize_onnx_nbits``; ``exclude``: MatMuls it keeps fp32). Without the first step
    MiniLM-L6's 8da4w weights were 53 MiB, its fp32 word embeddings 45 of them."""
    gathered = dst.with_name(dst.name + ".gather.tmp")
    try:
        quantize_onnx_int8(src, gathered, op_types=("Gather",), quiet=True, reduce_range=False)
        quantize_onnx_nbits(gathered, dst, bits, exclude=exclude)
    finally:
        gathered.unlink(missing_ok=True)


def quantize_onnx_nbits(src: Path, dst: Path, bits: int, exclude: Sequence[str] = ()) -> None:
    """Weight MatMuls of ``src`` to ``bits``-bit MatMulNBits (onnxruntime
    ``MatMulNBitsQuantizer``), blocks of ``NBITS_BLOCK`` input channels, activations fp32;
    ``exclude``: node names kept fp32.

    4 bits use HQQ (half-quadratic scales and zero points, no calibration data): plain
    round-to-nearest 4-bit broke SmolLM2's generation graph (logits min cosine -0.04 against
    fp32, 0.56 with its 10 outlier MatMuls kept fp32) where HQQ kept 0.9994 (docs/lm.md).
    8 bits use symmetric round-to-nearest (onnxruntime's CPU kernel takes no float zero
    points at 8 bits, which HQQ writes)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if bits not in (4, 8):
        raise FedMobiLLMError(f"MatMulNBits quantization takes 4 or 8 bits, not {bits}")
    algo = HQQWeightOnlyQuantConfig(block_size=NBITS_BLOCK, bits=4) if bits == 4 else None
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per node
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HQQ's torch.from_numpy on read-only arrays
            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(src)),
                bits=bits,
                block_size=NBITS_BLOCK,
                is_symmetric=bits == 8,
                nodes_to_exclude=list(exclude),
                op_types_to_quantize=("MatMul",),
                algo_config=algo,
            )
            quantizer.process()
    finally:
        root.setLevel(level)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_onnx_int8(
    src: Path,
    dst: Path,
    op_types: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    quiet: bool = False,
    reduce_range: bool = True,
) -> None:
    """Dynamic int8 with per-channel weights (onnxruntime ``quantize_dynamic``).
    ``op_types``: node types to quantize (None: every type onnxruntime can); ``exclude``:
    node names kept fp32; ``quiet``: silence the quantizer's line per tensor;
    ``reduce_range``: 7-bit weights (below), which only MatMuls need.

    Weights use 7 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2, AVX-512 without
    VNNI) onnxruntime multiplies uint8 activations by int8 weights with VPMADDUBSW, which
    sums pairs of products into int16 and saturates past 32,767 (255 * 127 * 2 = 64,770).
    With 8-bit weights SmolLM2's int8 graph fell to min cosine 0.49 on such a CPU and passed
    on one with VNNI; with 7-bit weights no pair can saturate (255 * 63 * 2 = 32,130).
    See docs/export.md, "int8 on CPUs without VNNI"."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    if quiet:
        root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,  # no int16 saturation without VNNI (see above)
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=list(exclude),
        )
    finally:
        root.setLevel(level)


def matmul_input_probe(src: Path) -> tuple[Any, dict[str, str], list[str]] | None:
    """The graph at ``src`` with the input of every weight MatMul/Gemm node added to its
    outputs: (onnxruntime session, node name -> its input tensor, the tensors added), or
    None with fewer than two such nodes (nothing to compare)."""
    import onnx

    model = onnx.load(str(src))
    weights = {init.name for init in model.graph.initializer}
    inputs = {
        node.name: node.input[0]
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in weights
    }
    if len(inputs) < 2:
        return None
    known = {o.name for o in model.graph.output}
    tensors = sorted(set(inputs.values()) - known)
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    sess = onnx_session(model.SerializeToString(), name=f"{src} with its MatMul inputs")
    return sess, inputs, tensors


def outlier_nodes(ranges: dict[str, float]) -> list[str]:
    """Nodes whose input max |x| is more than OUTLIER_RATIO times the median of all."""
    median = float(np.median(list(ranges.values())))
    return sorted(n for n, r in ranges.items() if median > 0 and r > OUTLIER_RATIO * median)


def outlier_matmuls(src: Path, ids: np.ndarray, mask: np.ndarray, batch: int = 8) -> list[str]:
    """Names of weight MatMul/Gemm nodes whose input max |x| on the calibration inputs is
    more than OUTLIER_RATIO times the median over all such nodes."""
    probe = matmul_input_probe(src)
    if probe is None:
        return []
    sess, inputs, _ = probe
    names = [o.name for o in sess.get_outputs()]
    amax = dict.fromkeys(names, 0.0)
    for i in range(0, min(len(ids), 4 * batch), batch):
        feeds = {"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch]}
        for name, value in zip(names, sess.run(names, feeds), strict=True):
            amax[name] = max(amax[name], float(np.abs(value).max()) if value.size else 0.0)
    return outlier_nodes({node: amax.get(t, 0.0) for node, t in inputs.items()})


# ---------------------------------------------------------------- ExecuTorch


def write_pte(ep: torch.export.ExportedProgram, path: Path, split_dynamic: bool = True) -> None:
    """Lower to XNNPACK and write the ExecuTorch program to ``path`` atomically.
    ``split_dynamic``: lower dynamically quantized linears first, as partitions of their own
    (what backbones need, below); False lowers with the one plain partitioner (the
    personal model, an fp32 graph whose program the split makes larger)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner,
        XnnpackPartitioner,
    )
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )

    # Dynamically quantized linears first, as their own partitions, then everything else:
    # one partitioner over both makes cyclic partitions on dynamic-shape PT2E int8 graphs.
    partitioners = [XnnpackDynamicallyQuantizedPartitioner()] if split_dynamic else []
    partitioners.append(XnnpackPartitioner())
    # No edge IR validity check: its op-argument validator calls len() on the first tensor
    # of an op returning Tensor[] (split_with_sizes_copy of GPT-NeoX's fused qkv, GPT-2's
    # c_attn split), which pins the batch dimension to the example's (2): the program then
    # plans static batch-2 buffers and fails at any other batch ("Attempted to resize a
    # static/bounded tensor"). torch.export has checked the graph already.
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=partitioners,
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    program = edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True))
    with replacing(path) as tmp, open(tmp, "wb") as f:
        program.write_to_file(f)
