"""Versioned contracts shared by exporter, device and server: the bundle manifest and the
batch-upload wire format. No torch, no pickle.

Bundle manifest (``manifest.json`` in a bundle directory), format version 1::

    {
      "format_version": 1,
      "source_model": "minilm-l6",              # name, HF id or path given to `export`
      "source_sha256": "...",                   # hash of the source weights (revision)
      "family": "bert",                         # HF config.model_type
      "kind": "encoder" | "decoder",
      "depth": 6,                               # blocks in the source model
      "hidden_size": 384,
      "taps": [2, 4, 6],                        # 1-based block indices, ascending
      "pivot": "first" | "last" | "mean" | "none",   # mean: masked mean over real tokens
      "quant": "fp32" | "int8" | "8da4w",
      "max_seq_len": 128,
      "activation_scales": [0.05, 0.07, 0.1],   # per tap: int8 scale = clip / 127
      "graph_params": 22713216,                 # parameters kept in the graph (truncated)
      "num_labels": null,
      "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                 {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}],
      "outputs": [{"name": "taps", "dtype": "float32", "shape": ["batch", 3, 384]}],
      "tokenizer": {"file": "tokenizer.json", "pad_token_id": 0, "padding_side": "right",
                     "add_special_tokens": true},
      "files": {"backbone.onnx": {"sha256": "...", "bytes": 123},
                "backbone.pte": {...}, "tokenizer.json": {...}},
      "created_by": "fedmobillm 0.1.0"
    }

Batch upload (``POST /v1/batches``): the body is one safetensors file (``application/
octet-stream``). Its ``__metadata__`` is the JSON header (all values strings)::

    protocol         "1"
    device_id        the id the server returned at registration
    bundle_sha256    bundle_digest(manifest) of the bundle the device runs
    idempotency_key  stable per batch: re-sending the same batch is a no-op
    split            "train" | "validation" | "anchor" (public anchor texts, label -1,
                     sample id = the text's id in the server's anchor set, GET /v1/anchors)
    encoding         "int8" | "fp16"

and its tensors::

    activations  int8 or float16  [N, K, d]   pivot activations, one vector per tap
                                  [N, K, T, d] token activations (with ``lengths``)
    scales       float32          [K]         int8 only: value = int8 * scale (per tap)
    labels       int64            [N]         class index; -1 = unlabelled
    sample_ids   int64            [N]         device-local record index, unique per split
                                              (anchor: the anchor id)
    lengths      int64            [N]         token batches only: real tokens per sample
    token_ids    int64            [N, T]      lm batches only: the sample's token ids
    loss_mask    uint8            [N, T]      lm batches only: 1 = this token is a target

Two layouts, one per bundle kind (a federation is either pivot or tokens):

- pivot bundle (manifest ``pivot`` first/last/mean): no ``lengths``; ``activations`` is
  ``[N, K, d]``, one vector per tap per sample.
- token bundle (manifest ``pivot == "none"``): ``lengths`` is present, ``1 <= lengths[i]
  <= T`` and ``T = max(lengths)`` (a batch is padded only to its longest sample);
  ``activations`` is ``[N, K, T, d]`` with the taps at every real token in the sample's
  token order (padding side of the tokenizer removed: position 0 is the first real
  token), and every position ``t >= lengths[i]`` is exactly zero (the server refuses
  non-zero padding). ``scales`` stays ``[K]``.

An lm batch (task ``lm``: causal language modelling on the device's own text) is a token
batch that also carries ``token_ids`` and ``loss_mask``, both ``[N, T]`` like the token
positions of ``activations``: ``token_ids[i, t]`` is the id of the token whose taps are at
position t, and ``loss_mask[i, t] == 1`` makes that token a next-token target (predicted
from positions < t). ``loss_mask`` is 0 at t = 0 and at padding, and ``token_ids`` is 0 at
padding; every lm sample has at least one target. ``labels`` are all -1. A ``text`` record
puts 1 on every token but the first; a ``prompt``/``response`` record on the response's
tokens only. The ids are the device's text: local-DP noise on the taps does not cover them.

Bytes per sample (what ``bytes_per_sample`` reports): ``K * d * b`` for a pivot sample and
``K * lengths[i] * d * b`` for a token sample, b = 1 for int8 and 2 for fp16; padding is
not counted (the server stores each sample unpadded). The bound for a token sample is
``K * max_seq_len * d * b``.

The ``Authorization: Bearer <device token>`` header authenticates the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmobillm.device_runtime.files import sha256_file
from fedmobillm.errors import FedMobiLLMError

PROTOCOL_VERSION = 1
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"  # a bundle's tokenizer, unless the manifest names another

PIVOTS = ("first", "last", "mean", "none")
QUANTS = ("fp32", "int8", "8da4w")
ENCODINGS = ("int8", "fp16")
SPLITS = ("train", "validation", "anchor")
TOKEN_PIVOT = "none"  # manifest pivot of a token bundle (taps at every token)
BYTES_PER_VALUE = {"int8": 1, "fp16": 2}  # per encoding

# Tensor names in an upload payload.
T_ACTIVATIONS = "activations"
T_SCALES = "scales"
T_LABELS = "labels"
T_SAMPLE_IDS = "sample_ids"
T_LENGTHS = "lengths"  # token batches only: int64 [N], real tokens per sample
T_TOKEN_IDS = "token_ids"  # lm batches only: int64 [N, T], 0 at padding
T_LOSS_MASK = "loss_mask"  # lm batches only: uint8 [N, T], 1 = next-token target
TASKS = ("classify", "lm")  # a federation's task, chosen once (server setting ``task``)

# Personal model (what the server hands a device): a zip of a folder with
PERSONAL_ONNX = "personal.onnx"  # PERSONAL_INPUT float32 [B, K, d] -> PERSONAL_OUTPUT [B, C]
#   token personal model (personal.json inputs == "tokens"): PERSONAL_INPUT float32
#   [B, K, T, d] and PERSONAL_MASK int64 [B, T] (1 = real token) -> PERSONAL_OUTPUT [B, C]
PERSONAL_PTE = "personal.pte"  # same graph for ExecuTorch, when it lowers
PERSONAL_WEIGHTS = "personal.safetensors"
PERSONAL_MANIFEST = "personal.json"  # messages.PersonalManifest
PERSONAL_INPUT = "activations"  # the personal graph's input and output names
PERSONAL_OUTPUT = "logits"
PERSONAL_MASK = "attention_mask"  # token personal models only: int64 [B, T]

# Generation graphs of a decoder bundle (`fedmobillm export MODEL --generate`), listed in
# the manifest under GEN_MANIFEST_KEY and in `files`; inputs and outputs are described in
# fedmobillm.export.generate, run by fedmobillm.device_runtime.generate.
GEN_MANIFEST_KEY = "generation"
GEN_STEP_ONNX = "decoder_step.onnx"  # input_ids, attention_mask, past.* -> hidden, taps, present.*
GEN_STEP_DATA = "decoder_step.onnx.data"
GEN_HEAD_ONNX = "lm_head.onnx"  # hidden [B, S, d] -> logits [B, S, V]
GEN_HEAD_DATA = "lm_head.onnx.data"
# ExecuTorch generation graphs (``--format pte``): the step keeps its KV cache in the program
# (input_ids [1, S], start_pos [1] -> hidden, taps); listed under the entry's "pte" key
GEN_STEP_PTE = "decoder_step.pte"
GEN_HEAD_PTE = "lm_head.pte"  # hidden [1, S, d] -> logits [1, S, V]


def gen_past_names(depth: int) -> list[str]:
    """The step graph's cache inputs: past.{i}.key, past.{i}.value for each layer i."""
    return [f"past.{i}.{kv}" for i in range(int(depth)) for kv in ("key", "value")]


def gen_present_names(depth: int) -> list[str]:
    """The step graph's cache outputs, in the order of ``gen_past_names``."""
    return [f"present.{i}.{kv}" for i in range(int(depth)) for kv in ("key", "value")]


@dataclass
class Manifest:
    """The bundle manifest. ``from_dict`` validates; unknown keys are kept in ``extra``."""

    format_version: int
    source_model: str
    family: str
    kind: str
    depth: int
    hidden_size: int
    taps: list[int]
    pivot: str
    quant: str
    max_seq_len: int
    activation_scales: list[float]
    graph_params: int
    files: dict[str, dict[str, Any]]
    tokenizer: dict[str, Any]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    source_sha256: str = ""
    num_labels: int | None = None
    created_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_taps(self) -> int:
        return len(self.taps)

    @property
    def tokens(self) -> bool:
        """A token bundle (``pivot == "none"``): its graph emits taps at every token."""
        return self.pivot == TOKEN_PIVOT

    @property
    def architecture(self) -> str:
        """Alignment key: one set of alignment parameters per architecture (not device).

        Same source model, same taps and width => same architecture, whatever the quant."""
        name = Path(self.source_model).name or self.source_model
        taps = ",".join(str(t) for t in self.taps)
        return f"{self.family}/{name}/d{self.hidden_size}/L{self.depth}/taps{taps}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise FedMobiLLMError("manifest is not a JSON object")
        version = data.get("format_version")
        if version != BUNDLE_FORMAT_VERSION:
            raise FedMobiLLMError(
                f"bundle format version {version!r} is not supported (this fedmobillm "
                f"reads version {BUNDLE_FORMAT_VERSION})",
                hint="re-export the bundle with this version of `fedmobillm export`",
            )
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        required = [
            "source_model",
            "family",
            "kind",
            "depth",
            "hidden_size",
            "taps",
            "pivot",
            "quant",
            "max_seq_len",
            "activation_scales",
            "graph_params",
            "files",
            "tokenizer",
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise FedMobiLLMError(f"manifest lacks required keys: {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        m = cls(**kwargs)
        m.validate()
        return m

    def validate(self) -> None:
        problems = []
        if self.kind not in ("encoder", "decoder"):
            problems.append(f"kind must be encoder or decoder, not {self.kind!r}")
        if self.pivot not in PIVOTS:
            problems.append(f"pivot must be one of {PIVOTS}, not {self.pivot!r}")
        if self.quant not in QUANTS:
            problems.append(f"quant must be one of {QUANTS}, not {self.quant!r}")
        if not self.taps or any(not isinstance(t, int) for t in self.taps):
            problems.append("taps must be a non-empty list of integers")
        elif sorted(set(self.taps)) != list(self.taps) or not (
            1 <= self.taps[0] and self.taps[-1] <= self.depth
        ):
            problems.append(f"taps {self.taps} must be ascending, unique, within 1..{self.depth}")
        if len(self.activation_scales) != len(self.taps):
            problems.append("activation_scales must have one entry per tap")
        elif any(not (isinstance(s, (int, float)) and s > 0) for s in self.activation_scales):
            problems.append("activation_scales must be positive numbers")
        if self.hidden_size <= 0 or self.max_seq_len <= 0:
            problems.append("hidden_size and max_seq_len must be positive")
        if problems:
            raise FedMobiLLMError("invalid manifest: " + "; ".join(problems))


def bytes_per_sample(
    num_taps: int, hidden_size: int, encoding: str = "int8", tokens: int | None = None
) -> int:
    """Upload bytes of one sample's activations: ``K * d * b`` for a pivot sample, ``K *
    tokens * d * b`` for a token sample with ``tokens`` real tokens (b = 1 for int8, 2 for
    fp16). Padding is not counted. With ``tokens = max_seq_len`` it is the T x K x d bound."""
    if encoding not in BYTES_PER_VALUE:
        raise FedMobiLLMError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    per_token = int(num_taps) * int(hidden_size) * BYTES_PER_VALUE[encoding]
    return per_token if tokens is None else per_token * int(tokens)


def bundle_digest(manifest: Manifest | dict[str, Any]) -> str:
    """The bundle's identity: sha256 over its files' sha256s and the fields that define
    what its output means. Two bundles with the same digest produce the same uploads."""
    m = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    core = {
        "files": {name: info["sha256"] for name, info in sorted(m["files"].items())},
        "taps": m["taps"],
        "pivot": m["pivot"],
        "hidden_size": m["hidden_size"],
        "activation_scales": m["activation_scales"],
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FedMobiLLMError(
            f"{bundle_dir} is not a bundle: {MANIFEST_NAME} is missing",
            hint="create one with `fedmobillm export MODEL --out DIR`",
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedMobiLLMError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)


def verify_bundle(bundle_dir: Path) -> tuple[Manifest, list[str]]:
    """Check every file's sha256 against the manifest. Returns (manifest, problems)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    problems = []
    for name, info in manifest.files.items():
        f = bundle_dir / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(f) != info.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (file changed since export)")
    return manifest, problems


def load_verified_bundle(bundle_dir: Path) -> Manifest:
    manifest, problems = verify_bundle(bundle_dir)
    if problems:
        raise FedMobiLLMError(
            f"bundle {bundle_dir} failed verification: " + "; ".join(problems),
            hint="re-export the bundle or copy it again; do not edit bundle files",
        )
    return manifest
