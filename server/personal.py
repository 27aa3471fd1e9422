"""Personal models on disk: for each architecture, ``<personal_dir>/<slug>/`` (the folder the
trainer exported: personal.onnx [+ personal.pte], personal.safetensors, personal.json) and
``<slug>.zip`` next to it, replaced atomically, which is what devices download."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

from fedmobillm.device_runtime.files import replacing, sha256_file, write_atomic
from fedmobillm.device_runtime.messages import PERSONAL_FORMAT_VERSION, PersonalManifest
from fedmobillm.device_runtime.protocol import (
    PERSONAL_INPUT,
    PERSONAL_MASK,
    PERSONAL_ONNX,
    PERSONAL_OUTPUT,
    PERSONAL_PTE,
    PERSONAL_WEIGHTS,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)


def arch_slug(architecture: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", architecture).strip("_")


def personal_folder(root: Path, architecture: str) -> Path:
    return Path(root) / arch_slug(architecture)


GRAPHS = {"onnx": PERSONAL_ONNX, "pte": PERSONAL_PTE}


def read_personal_zip(
    root: Path, architecture: str, weights: bool = False, graph: str = "all"
) -> bytes | None:
    """The device zip (graphs + personal.json), or with ``weights`` also the safetensors.
    ``graph`` "onnx" or "pte" keeps only that graph: a device runs one runtime, and the
    download is then about half the size."""
    suffix = "-full.zip" if weights else ".zip"
    path = Path(root) / f"{arch_slug(architecture)}{suffix}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if graph == "all":
        return data
    drop = {name for g, name in GRAPHS.items() if g != graph}
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            if info.filename not in drop:
                dst.writestr(info, src.read(info.filename))
    return buf.getvalue()


def publish_folder(folder: Path, root: Path, architecture: str) -> Path:
    """Move an exported folder into place and publish its zip. Returns the zip path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = personal_folder(root, architecture)
    files = sorted(f for f in Path(folder).iterdir() if f.is_file())
    full = _zip(files)
    # What a device runs: the graph(s) and the manifest. The safetensors weights (the same
    # numbers again) stay on the server and come with ?weights=true.
    device = _zip([f for f in files if f.name != PERSONAL_WEIGHTS])
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(folder, target)
    shutil.rmtree(old, ignore_errors=True)
    write_atomic(root / f"{target.name}-full.zip", full)
    zip_path = root / f"{target.name}.zip"
    write_atomic(zip_path, device)
    return zip_path


def _zip(files: list[Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f.name)
    return buf.getvalue()


# -- export (torch imported lazily: the API process reads zips only) ----------------------


def export_personal_model(
    model: Any,
    spec: Any,
    out_dir: Path,
    bundle_sha256s: list[str],
    *,
    label_names: list[str],
    step: int,
    pte: bool = False,
    quant: str = "int8",
) -> Path:
    """Write personal.onnx (+ .pte), personal.safetensors and personal.json into out_dir.

    ``model`` is a ``side.PersonalModel``: activations float32 (B, K, d) -> logits (B, C),
    or with ``model.tokens`` activations (B, K, T, d) + attention_mask int64 (B, T) ->
    logits (B, C), dynamic B and T. ``quant`` "int8": personal.onnx gets int8 weights
    (onnxruntime dynamic quantization, per channel), what devices download; the .pte and
    the safetensors stay fp32."""
    if quant not in ("int8", "fp32"):
        raise FedMobiLLMError(f"personal model quant must be int8 or fp32, not {quant!r}")
    import copy

    from safetensors.torch import save_file

    from fedmobillm.device_runtime.protocol import PERSONAL_MANIFEST

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval()
    tokens = bool(getattr(model, "tokens", False))
    k, d = len(spec.taps), spec.hidden
    example = _example(tokens, k, d)
    _export_onnx(model, example, out_dir / PERSONAL_ONNX)
    max_diff = _check_onnx(model, out_dir / PERSONAL_ONNX, k, d)
    int8_diff = None
    if quant == "int8":
        int8_diff = _quantize_onnx(model, out_dir / PERSONAL_ONNX, k, d)
    weights = {n: v.detach().contiguous() for n, v in model.state_dict().items()}
    save_file(weights, str(out_dir / PERSONAL_WEIGHTS))
    files = [PERSONAL_ONNX, PERSONAL_WEIGHTS]
    pte_info = _try_pte(model, example, out_dir / PERSONAL_PTE, spec.name) if pte else None
    if pte_info is not None:
        files.append(PERSONAL_PTE)
    manifest = PersonalManifest(
        format_version=PERSONAL_FORMAT_VERSION,
        architecture=spec.name,
        bundle_sha256s=list(bundle_sha256s),
        taps=list(spec.taps),
        hidden_size=d,
        num_labels=len(label_names),
        label_names=list(label_names),
        trainer_step=step,
        encoding=getattr(spec, "encoding", "int8"),
        inputs=_input_specs(tokens, k, d),
        outputs=[
            {"name": PERSONAL_OUTPUT, "dtype": "float32", "shape": ["batch", len(label_names)]}
        ],
        side_inputs="tokens" if tokens else "pivot",
        onnx_max_abs_diff=max_diff,
        weights=quant,
        int8_max_abs_logit_diff=int8_diff,
        files={
            f: {
                "sha256": sha256_file(out_dir / f),
                "bytes": (out_dir / f).stat().st_size,
                **(pte_info if pte_info and f == PERSONAL_PTE else {}),
            }
            for f in files
        },
    )
    (out_dir / PERSONAL_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
    return out_dir


def _try_pte(model: Any, example: tuple, path: Path, arch: str) -> dict[str, Any] | None:
    """``_export_pte``, or None (and a warning saying so) when it does not lower: lowering
    is best effort, personal.onnx is the contract."""
    try:
        return _export_pte(model, example, path)
    except Exception as exc:
        kind = "token" if len(example) == 2 else "pivot"
        log.warning(
            "personal .pte export failed for %s (%s inputs): %s; the model ships "
            "personal.onnx only",
            arch,
            kind,
            exc,
        )
        return None


def _input_specs(tokens: bool, k: int, d: int) -> list[dict[str, Any]]:
    """personal.json "inputs": the graph's input names, dtypes and shapes."""
    if not tokens:
        return [{"name": PERSONAL_INPUT, "dtype": "float32", "shape": ["batch", k, d]}]
    return [
        {"name": PERSONAL_INPUT, "dtype": "float32", "shape": ["batch", k, "seq", d]},
        {"name": PERSONAL_MASK, "dtype": "int64", "shape": ["batch", "seq"]},
    ]


def _example(tokens: bool, k: int, d: int) -> tuple:
    """Export example inputs: (x (2, K, d),) or (x (2, K, 5, d), mask (2, 5)) with padding."""
    import torch

    if not tokens:
        return (torch.randn(2, k, d),)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
    return (torch.randn(2, k, 5, d) * mask[:, None, :, None], mask)


def _inputs(tokens: bool, n: int, k: int, d: int, t: int, seed: int = 0) -> dict[str, Any]:
    """Seeded unit-normal activations (n, K, d), or (n, K, t, d) zero-padded past random
    lengths in 1..t with their attention_mask (n, t)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if not tokens:
        return {PERSONAL_INPUT: rng.normal(size=(n, k, d)).astype(np.float32)}
    lengths = rng.integers(1, t + 1, size=n)
    lengths[0] = t
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)  # (n, t)
    x = (rng.normal(size=(n, k, t, d)) * mask[:, None, :, None]).astype(np.float32)
    return {PERSONAL_INPUT: x, PERSONAL_MASK: mask}


def _export_onnx(model: Any, example: tuple, path: Path) -> None:
    from fedmobillm.export.graphs import write_onnx_torchscript

    axes = {PERSONAL_INPUT: {0: "batch"}, PERSONAL_OUTPUT: {0: "batch"}}
    names = [PERSONAL_INPUT]
    if len(example) == 2:  # tokens: activations (B, K, T, d), attention_mask (B, T)
        axes = {
            PERSONAL_INPUT: {0: "batch", 2: "seq"},
            PERSONAL_MASK: {0: "batch", 1: "seq"},
            PERSONAL_OUTPUT: {0: "batch"},
        }
        names.append(PERSONAL_MASK)
    write_onnx_torchscript(model, example, path, names, [PERSONAL_OUTPUT], axes)


def _logit_diff(model: Any, path: Path, n: int, k: int, d: int) -> float:
    """Max |logit difference| between the graph at ``path`` (onnxruntime) and ``model``
    (torch) on ``n`` seeded unit-normal activations (n, K, d); token models: on two batch
    sizes (n and n // 2 + 1) and sequence lengths (7 and 19), padded at random."""
    import numpy as np
    import torch

    from fedmobillm.device_runtime.graph import Graph

    tokens = bool(getattr(model, "tokens", False))
    names = [PERSONAL_INPUT, PERSONAL_MASK] if tokens else [PERSONAL_INPUT]
    graph = Graph(path, names, [PERSONAL_OUTPUT])
    cases = [(n, 7, 0), (n // 2 + 1, 19, 1)] if tokens else [(n, 0, 0)]
    diff = 0.0
    for rows, t, seed in cases:
        feeds = _inputs(tokens, rows, k, d, t, seed)
        (got,) = graph.run(feeds)  # (rows, C)
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[name]) for name in names)).numpy()
        diff = max(diff, float(np.abs(got - want).max()))
    return diff


def _check_onnx(model: Any, path: Path, k: int, d: int) -> float:
    """Run the exported graph with onnxruntime against torch; returns max |diff|."""
    diff = _logit_diff(model, path, 5, k, d)
    if diff > 1e-3:
        raise RuntimeError(f"exported personal.onnx differs from torch by {diff}")
    return diff


def _quantize_onnx(model: Any, path: Path, k: int, d: int) -> float:
    """Replace the fp32 graph at ``path`` by its int8-weight version (dynamic quantization,
    per channel); returns the max |logit diff| against torch on unit-normal activations
    (recorded in personal.json; accuracy through the int8 graph is what the benchmarks and
    the device measure)."""
    from fedmobillm.export.graphs import quantize_onnx_int8

    with replacing(path) as tmp:
        quantize_onnx_int8(path, tmp, quiet=True)  # every op type onnxruntime quantizes
    return _logit_diff(model, path, 64, k, d)


def _export_pte(model: Any, example: tuple, path: Path) -> dict[str, Any]:
    """Lower to ExecuTorch (XNNPACK). Pivot: dynamic batch. Tokens: batch fixed at 1 and
    dynamic seq (1..4096): XNNPACK lowers no reshape with two dynamic dimensions ("XNNPACK
    reshape only supports 1 dynamic dimension"), so a device runs it one text at a time;
    checked against torch on two lengths. Returns what personal.json records beside the
    file ({} or {"batch": 1})."""
    import torch

    from fedmobillm.export.graphs import write_pte

    if len(example) == 1:
        batch = torch.export.Dim("batch", min=1, max=64)
        ep = torch.export.export(model, example, dynamic_shapes=({0: batch},))
        write_pte(ep, path, split_dynamic=False)
        return {}
    seq = torch.export.Dim("seq", min=1, max=4096)
    x, mask = example[0][:1], torch.ones_like(example[1][:1])  # (1, K, T, d), (1, T)
    ep = torch.export.export(model, (x, mask), dynamic_shapes=({2: seq}, {1: seq}))
    write_pte(ep, path, split_dynamic=False)
    diff = _pte_diff(model, path, x.shape[1], x.shape[3])
    if diff > 1e-3:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"personal.pte (tokens, batch 1) differs from torch by {diff}")
    return {"batch": 1, "max_abs_diff": diff}


def _pte_diff(model: Any, path: Path, k: int, d: int) -> float:
    """Max |logit diff| of a batch-1 token .pte against torch on lengths 7 and 19."""
    import numpy as np
    import torch

    from fedmobillm.device_runtime.graph import Graph

    names = [PERSONAL_INPUT, PERSONAL_MASK]
    graph = Graph(path, names, [PERSONAL_OUTPUT], fmt="pte")
    diff = 0.0
    for t, seed in ((7, 0), (19, 1)):
        feeds = _inputs(True, 1, k, d, t, seed)
        (got,) = graph.run(feeds)  # (1, C)
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
        diff = max(diff, float(np.abs(got - want).max()))
    return diff
