"""Which MatMuls of an ONNX graph are its deepest block (the ONNX 8da4w export keeps them
8-bit): read from the exporter's module scopes, not from the MatMuls' count."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedmobillm.export.graphs import deepest_block_matmuls


def _graph(scopes: list[list[str] | None]) -> tuple[onnx.ModelProto, list[str]]:
    """A chain of weight MatMuls, the i-th tagged with ``scopes[i]`` as the dynamo exporter
    tags its nodes (None: no metadata)."""
    nodes, inits, names = [], [], []
    prev = "x"
    for i, scope in enumerate(scopes):
        w = f"w{i}"
        inits.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), w))
        node = helper.make_node("MatMul", [prev, w], [f"y{i}"], name=f"node_linear_{i}")
        if scope is not None:
            prop = node.metadata_props.add()
            prop.key, prop.value = "pkg.torch.onnx.name_scopes", repr(scope)
        nodes.append(node)
        names.append(node.name)
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return helper.make_model(graph), names


def _block(i: int) -> list[str]:
    return ["", "model", f"model.layers.{i}", f"model.layers.{i}.mlp", "linear"]


def test_scopes_pick_the_deepest_block_past_a_matmul_outside_blocks():
    # 3 blocks of 2 MatMuls, then 3 weight MatMuls outside any block: 9 divides by 3, so
    # the count rule would take the last 3 (two of them no block's); the scopes do not.
    scopes = [_block(b) for b in range(3) for _ in range(2)] + [["", "proj", "linear"]] * 3
    model, names = _graph(scopes)
    assert deepest_block_matmuls(model, names, depth=3) == names[4:6]


def test_without_scopes_the_count_rule_decides():
    model, names = _graph([None] * 6)
    assert deepest_block_matmuls(model, names, depth=3) == names[4:]
    assert deepest_block_matmuls(model, names[:5], depth=3) == []


def test_scopes_disagreeing_with_the_depth_fall_back_to_the_count():
    model, names = _graph([_block(0)] * 2 + [_block(1)] * 2)  # 2 blocks named, 4 said
    assert deepest_block_matmuls(model, names, depth=4) == names[3:]
