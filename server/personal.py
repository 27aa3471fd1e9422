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

    ``model`` is a ``side.PersonalModel``: activations float32 (B, K, d) -> logits (B, C).
    ``quant`` "int8": personal.onnx gets int8 weights (onnxruntime dynamic quantization,
    per channel), what devices download; the .pte and the safetensors stay fp32."""
    if quant not in ("int8", "fp32"):
        raise FedMobiLLMError(f"personal model quant must be int8 or fp32, not {quant!r}")
    import copy

    import torch
    from safetensors.torch import save_file

    from fedmobillm.device_runtime.protocol import PERSONAL_MANIFEST

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval()
    example = torch.randn(2, len(spec.taps), spec.hidden)  # (B, K, d)
    _export_onnx(model, example, out_dir / PERSONAL_ONNX)
    max_diff = _check_onnx(model, out_dir / PERSONAL_ONNX, len(spec.taps), spec.hidden)
    int8_diff = None
    if quant == "int8":
        int8_diff = _quantize_onnx(model, out_dir / PERSONAL_ONNX, len(spec.taps), spec.hidden)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out_dir / PERSONAL_WEIGHTS))
    files = [PERSONAL_ONNX, PERSONAL_WEIGHTS]
    if pte:
        try:
            _export_pte(model, example, out_dir / PERSONAL_PTE)
            files.append(PERSONAL_PTE)
        except Exception as exc:  # lowering is best effort; ONNX is the contract
            log.warning("personal .pte export failed for %s: %s", spec.name, exc)
    manifest = PersonalManifest(
        format_version=PERSONAL_FORMAT_VERSION,
        architecture=spec.name,
        bundle_sha256s=list(bundle_sha256s),
        taps=list(spec.taps),
        hidden_size=spec.hidden,
        num_labels=len(label_names),
        label_names=list(label_names),
        trainer_step=step,
        encoding=getattr(spec, "encoding", "int8"),
        inputs=[
            {
                "name": PERSONAL_INPUT,
                "dtype": "float32",
                "shape": ["batch", len(spec.taps), spec.hidden],
            }
        ],
        outputs=[
            {"name": PERSONAL_OUTPUT, "dtype": "float32", "shape": ["batch", len(label_names)]}
        ],
        onnx_max_abs_diff=max_diff,
        weights=quant,
        int8_max_abs_logit_diff=int8_diff,
        files={
            f: {"sha256": sha256_file(out_dir / f), "bytes": (out_dir / f).stat().st_size}
            for f in files
        },
    )
    (out_dir / PERSONAL_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
    return out_dir


def _export_onnx(model: Any, example: Any, path: Path) -> None:
    from fedmobillm.export.graphs import write_onnx_torchscript

    axes = {PERSONAL_INPUT: {0: "batch"}, PERSONAL_OUTPUT: {0: "batch"}}
    write_onnx_torchscript(model, (example,), path, [PERSONAL_INPUT], [PERSONAL_OUTPUT], axes)


def _logit_diff(model: Any, path: Path, n: int, k: int, d: int) -> float:
    """Max |logit difference| between the graph at ``path`` (onnxruntime) and ``model``
    (torch) on ``n`` seeded unit-normal activations (n, K, d)."""
    import numpy as np
    import torch

    from fedmobillm.device_runtime.graph import Graph

    x = np.random.default_rng(0).normal(size=(n, k, d)).astype(np.float32)  # (n, K, d)
    (got,) = Graph(path, [PERSONAL_INPUT], [PERSONAL_OUTPUT]).run({PERSONAL_INPUT: x})  # (n, C)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()  # (n, C)
    return float(np.abs(got - want).max())


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


def _export_pte(model: Any, example: Any, path: Path) -> None:
    import torch

    from fedmobillm.export.graphs import write_pte

    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    write_pte(ep, path, split_dynamic=False)
