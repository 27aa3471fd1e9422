"""Run exported graphs: ``.onnx`` with onnxruntime (no torch) and ``.pte`` with ExecuTorch's
Python runtime (which takes and returns torch tensors, so torch is imported there, lazily).
Named numpy inputs in, numpy outputs out.

The one place graphs are loaded and run: the device runtime (backbone and personal model),
the exporter's verification, the budget measurement (``fedmobillm.device_runtime.measure``)
and the Android bridge's Python runners. ``fedmobillm.export.graphs`` writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.errors import FedMobiLLMError

FORMATS = ("onnx", "pte")
BACKBONE_INPUTS = ("input_ids", "attention_mask")  # int64 (B, S) each
BACKBONE_OUTPUT = "taps"  # float32 (B, K, d)


@dataclass(frozen=True)
class OnnxOptions:
    """How onnxruntime runs a graph (None and False: onnxruntime's defaults)."""

    threads: int | None = None  # intra-op threads; then one inter-op thread
    inter_threads: int | None = None  # inter-op threads, when not one
    low_memory: bool = False  # initializers neither copied nor prepacked (onnx_session)
    quiet: bool = False  # onnxruntime logs errors only


def onnx_session(
    model: str | Path | bytes, options: OnnxOptions | None = None, name: str | None = None
) -> Any:
    """An onnxruntime CPU session over a graph file (its external data beside it) or the
    graph's bytes. ``name``: the graph in error messages."""
    import onnxruntime as ort

    o = options or OnnxOptions()
    opts = ort.SessionOptions()
    if o.threads:
        opts.intra_op_num_threads = o.threads
        opts.inter_op_num_threads = 1
    if o.inter_threads:
        opts.inter_op_num_threads = o.inter_threads
    if o.quiet:
        opts.log_severity_level = 3
    if o.low_memory:
        # A phone's memory is the scarce resource: initializers go straight to the CPU
        # allocator and are not prepacked (a second copy of every int8 weight). Measured on
        # the int8 MiniLM-L6 bundle: peak 109 -> 105 MiB, batch forward time unchanged.
        opts.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        opts.add_session_config_entry("session.disable_prepacking", "1")
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        what = name or ("the graph" if isinstance(model, bytes) else model)
        raise FedMobiLLMError(f"onnxruntime cannot load {what}: {exc}") from exc


def pte_method(path: str | Path, method: str = "forward", *, quantized_kernels: bool = True) -> Any:
    """A loaded method of an ExecuTorch program. ``quantized_kernels`` registers the
    quantized kernel library first (embedding_byte etc., which 8da4w graphs call)."""
    try:
        if quantized_kernels:
            import executorch.kernels.quantized  # noqa: F401 - registers the kernels
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise FedMobiLLMError(
            "the .pte backend needs the ExecuTorch runtime (and torch)",
            hint="pip install 'fedmobillm[export]', or use --backend onnx",
        ) from exc
    try:
        return Runtime.get().load_program(Path(path)).load_method(method)
    except Exception as exc:  # pybind errors are RuntimeError or bare Exception
        raise FedMobiLLMError(f"ExecuTorch cannot load {path}: {exc}") from exc


def graph_format(path: str | Path) -> str:
    """The format of a graph file from its name: onnx or pte."""
    fmt = Path(path).suffix.lstrip(".")
    if fmt not in FORMATS:
        raise FedMobiLLMError(f"{path} is neither an .onnx nor a .pte graph")
    return fmt


class Graph:
    """One loaded graph. ``run(feeds)`` takes numpy arrays by input name and returns the
    outputs named in ``outputs``, in that order. An ONNX graph is given only the inputs it
    declares; a .pte graph takes ``inputs`` in order."""

    def __init__(
        self,
        source: str | Path | bytes,
        inputs: Sequence[str] = BACKBONE_INPUTS,
        outputs: Sequence[str] = (BACKBONE_OUTPUT,),
        *,
        fmt: str | None = None,
        options: OnnxOptions | None = None,
        name: str | None = None,
    ) -> None:
        """``source``: a graph file, or an ONNX graph's bytes. ``fmt``: "onnx" or "pte",
        else from the file name. ``options``, ``name``: see ``onnx_session`` (ONNX only)."""
        self.format = fmt or ("onnx" if isinstance(source, bytes) else graph_format(source))
        self.inputs, self.outputs = list(inputs), list(outputs)
        if self.format == "onnx":
            self._sess = onnx_session(source, options, name)
            self._takes = {i.name for i in self._sess.get_inputs()}
        elif self.format == "pte" and not isinstance(source, bytes):
            self._method = pte_method(source)
        else:
            raise FedMobiLLMError(f"cannot run a {self.format!r} graph from {name or 'bytes'}")

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self.format == "onnx":
            feed = {k: v for k, v in feeds.items() if k in self._takes}
            return list(self._sess.run(self.outputs, feed))
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.inputs]
        outputs = self._method.execute(args)
        return [np.asarray(t.detach().numpy()) for t in outputs[: len(self.outputs)]]


def run_taps(
    path: str | Path,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    fmt: str | None = None,
    threads: int | None = 2,
) -> np.ndarray:
    """One forward of a backbone graph in a new session: int64 ``(B, S)`` ids and mask ->
    float32 taps ``(B, K, d)``."""
    feeds = {
        "input_ids": input_ids.astype(np.int64),  # (B, S)
        "attention_mask": attention_mask.astype(np.int64),  # (B, S)
    }
    return Graph(path, fmt=fmt, options=OnnxOptions(threads)).run(feeds)[0]  # (B, K, d)
