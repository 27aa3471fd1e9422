"""On-device inference with the personal model the server trained: the backbone bundle's
taps ``(B, K, d)`` go through ``personal.onnx`` (alignment + side network + head) to
logits ``(B, C)``. A token personal model (personal.json ``side_inputs`` "tokens") takes a
token bundle's taps ``(B, K, T, d)`` and their ``attention_mask`` ``(B, T)`` instead.
Torch-free (onnxruntime)."""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.device_runtime import serde
from fedmobillm.device_runtime.backbone import FORWARD_BATCH, Backbone
from fedmobillm.device_runtime.dp_projection import bundle_projection
from fedmobillm.device_runtime.graph import Graph, OnnxOptions
from fedmobillm.device_runtime.messages import (
    ROUTE_PERSONAL_MODEL,
    ErrorBody,
    MessageError,
    PersonalManifest,
)
from fedmobillm.device_runtime.protocol import (
    PERSONAL_INPUT,
    PERSONAL_MANIFEST,
    PERSONAL_MASK,
    PERSONAL_ONNX,
    PERSONAL_OUTPUT,
    Manifest,
    bundle_digest,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)


def _read_members(path: Path) -> dict[str, bytes]:
    """personal.json and personal.onnx from a zip or a folder."""
    path = Path(path)
    names = (PERSONAL_MANIFEST, PERSONAL_ONNX)
    if path.is_dir():
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FedMobiLLMError(f"{path} is not a personal model: {', '.join(missing)} missing")
        return {n: (path / n).read_bytes() for n in names}
    if not path.is_file():
        raise FedMobiLLMError(
            f"personal model {path} does not exist",
            hint="download it with `fedmobillm device fetch-model --out DIR`",
        )
    try:
        with zipfile.ZipFile(path) as zf:
            have = set(zf.namelist())
            missing = [n for n in names if n not in have]
            if missing:
                raise FedMobiLLMError(f"{path} is not a personal model: {missing} missing")
            return {n: zf.read(n) for n in names}
    except zipfile.BadZipFile as exc:
        raise FedMobiLLMError(f"{path} is neither a folder nor a zip file: {exc}") from exc


def read_personal(path: str | Path, activations: str) -> tuple[PersonalManifest, bytes, bool]:
    """A personal model (folder or zip) of either task: its personal.json, personal.onnx's
    bytes, and whether the side network was trained on int8 taps. ``activations``: "int8",
    "fp32", or "auto" (personal.json's "encoding" if it says fp16/fp32, else int8, the
    default upload encoding)."""
    if activations not in ("auto", "int8", "fp32"):
        raise FedMobiLLMError(f"activations must be auto, int8 or fp32, not {activations!r}")
    members = _read_members(Path(path))
    try:
        info = PersonalManifest.from_dict(json.loads(members[PERSONAL_MANIFEST]))
    except ValueError as exc:
        raise FedMobiLLMError(f"{path}: {PERSONAL_MANIFEST} is not JSON: {exc}") from exc
    except MessageError as exc:
        raise FedMobiLLMError(f"{path}: {PERSONAL_MANIFEST}: {exc.message}") from exc
    if activations == "auto":
        activations = "fp32" if info.encoding in ("fp16", "fp32") else "int8"
    return info, members[PERSONAL_ONNX], activations == "int8"


def side_inputs(info: PersonalManifest) -> str:
    """What the personal graph takes, "tokens" or "pivot", as personal.json says
    (``side_inputs``; older files: an ``attention_mask`` among its input specs)."""
    declared = getattr(info, "side_inputs", None)
    if declared in ("pivot", "tokens"):
        return str(declared)
    if declared is not None:
        raise FedMobiLLMError(
            f"{PERSONAL_MANIFEST}: side_inputs must be pivot or tokens, not {declared!r}"
        )
    names = {spec.get("name") for spec in info.inputs if isinstance(spec, dict)}
    return "tokens" if PERSONAL_MASK in names else "pivot"


def token_mask(lengths: np.ndarray, t: int | None = None) -> np.ndarray:
    """int64 ``(B, T)`` attention mask, 1 at the first ``lengths[i]`` positions."""
    t = int(lengths.max()) if t is None else t
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def backbone_taps(
    backbone: Backbone, texts: list[str], forward_batch: int | None = FORWARD_BATCH
) -> tuple[np.ndarray, np.ndarray | None]:
    """Texts -> (taps, mask): pivot bundle ``(B, K, d)`` and None; token bundle ``(B, K,
    T, d)`` zero-padded and its attention mask int64 ``(B, T)``. A bundle with a dp
    projection (``export --dp-projection``): the taps through its noise-free view
    (``DpProjection.view``), as every upload of that bundle was (the side network learnt
    from vectors in that subspace)."""
    projection = bundle_projection(backbone.bundle_dir, backbone.manifest)
    if backbone.tokens:
        x, lengths = backbone.forward_tokens(texts, forward_batch)  # (B, K, T, d), (B,)
        mask = token_mask(lengths, x.shape[2])
        return (x if projection is None else projection.view(x, mask)), mask
    x = backbone(texts, forward_batch)  # (B, K, d)
    return (x if projection is None else projection.view(x)), None


class PersonalModel:
    """personal.onnx: input "activations" float32 ``(B, K, d)`` -> "logits" ``(B, C)``;
    a token model (``tokens``): "activations" ``(B, K, T, d)`` and "attention_mask" int64
    ``(B, T)`` -> "logits" ``(B, C)``."""

    def __init__(self, path: str | Path, activations: str = "auto") -> None:
        """``activations``: what the side network was trained on and so what it should
        see: "int8" (quantize/dequantize with the bundle's scales, as uploads do),
        "fp32", or "auto" (personal.json's "encoding" if it says, else int8, the default
        upload encoding)."""
        self.info, onnx, self.trained_on_int8 = read_personal(path, activations)
        self.label_names: list[str] = list(self.info.label_names)
        self.tokens = side_inputs(self.info) == "tokens"
        self._graph = Graph(
            onnx,
            [PERSONAL_INPUT, PERSONAL_MASK] if self.tokens else [PERSONAL_INPUT],
            [PERSONAL_OUTPUT],
            options=OnnxOptions(quiet=True),
            name=f"{path}/{PERSONAL_ONNX}",
        )
        self._scales: np.ndarray | None = None

    def check_compatible(self, manifest: Manifest) -> None:
        """Refuses a bundle this model cannot read: another architecture, or pivot taps
        for a token model (and token taps for a pivot model)."""
        if self.tokens != manifest.tokens:
            have = "token taps (B, K, T, d)" if self.tokens else "pivot taps (B, K, d)"
            bundle = "a token bundle (pivot none)" if manifest.tokens else "a pivot bundle"
            raise FedMobiLLMError(
                f"this personal model reads {have}, but the bundle is {bundle} (pivot "
                f"{manifest.pivot})",
                hint="use the bundle the device registered with: a token federation "
                "(`serve --inputs tokens`) trains on bundles exported with --pivot none, a "
                "pivot federation on the others",
            )
        arch = self.info.architecture
        if arch and arch != manifest.architecture:
            raise FedMobiLLMError(
                f"this personal model is for architecture {arch}, the bundle is "
                f"{manifest.architecture}",
                hint="fetch the personal model with this bundle's registered device",
            )
        digests = self.info.bundle_sha256s
        if digests and bundle_digest(manifest) not in digests:
            log.warning("personal model was trained on other bundles of architecture %s", arch)
        self._scales = np.asarray(manifest.activation_scales, np.float32)  # (K,)

    def logits(self, taps: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """taps float32 (B, K, d) -> logits (B, C); a token model: taps (B, K, T, d) and
        mask int (B, T) (1 = real token; see ``token_mask``) -> logits (B, C)."""
        feeds = self._feeds(taps, mask)
        if self.trained_on_int8 and self._scales is not None:
            q = serde.quantize_int8(taps, self._scales)  # int8, as uploaded (padding 0)
            feeds[PERSONAL_INPUT] = serde.dequantize(q, self._scales, tokens=self.tokens)
        (logits,) = self._graph.run(feeds)
        return logits  # (B, C)

    def _feeds(self, taps: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        """The graph's inputs, shapes checked against what the model reads."""
        if not self.tokens:
            if mask is not None or taps.ndim != 3:
                raise FedMobiLLMError(
                    f"this personal model reads pivot taps (B, K, d) without a mask, got "
                    f"taps {list(taps.shape)}{' and a mask' if mask is not None else ''}",
                    hint="token taps need a personal model trained by a token federation",
                )
            return {PERSONAL_INPUT: taps.astype(np.float32)}
        if mask is None or taps.ndim != 4 or mask.shape != (taps.shape[0], taps.shape[2]):
            raise FedMobiLLMError(
                f"this personal model reads token taps (B, K, T, d) with an attention mask "
                f"(B, T), got taps {list(taps.shape)} and mask "
                f"{None if mask is None else list(mask.shape)}",
                hint="get both from a token bundle: personal.backbone_taps(backbone, texts)",
            )
        return {PERSONAL_INPUT: taps.astype(np.float32), PERSONAL_MASK: mask.astype(np.int64)}

    def label_of(self, index: int) -> str:
        return self.label_names[index] if index < len(self.label_names) else str(index)

    def predict_texts(self, backbone: Backbone, texts: list[str]) -> list[str]:
        """Label names of texts, through the backbone (pivot or token bundle) and this."""
        pred = self.logits(*backbone_taps(backbone, texts)).argmax(-1)  # (B,)
        return [self.label_of(int(i)) for i in pred]


@dataclass
class PredictResult:
    samples: int
    labelled: int
    correct: int
    ms_per_sample: float

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}

    def lines(self) -> list[str]:
        acc = f"{self.accuracy:.4f}" if self.accuracy is not None else "n/a (no labels)"
        return [
            f"samples:  {self.samples} ({self.labelled} labelled)",
            f"accuracy: {acc}",
            f"latency:  {self.ms_per_sample:.2f} ms/sample (backbone + personal model)",
        ]


def predict_records(
    backbone: Backbone,
    personal: PersonalModel,
    records: Sequence[Any],
    batch_size: int = 32,
    forward_batch: int = FORWARD_BATCH,
) -> PredictResult:
    """Accuracy over ``records``, with the backbone batched as a device's uploads are
    (``batch_size`` records, forwarded ``forward_batch`` at a time by token length)."""
    correct = labelled = 0
    start = time.perf_counter()
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        taps, mask = backbone_taps(backbone, [r.text for r in chunk], forward_batch)
        pred = personal.logits(taps, mask).argmax(-1)  # (B,)
        labels = np.array([int(r.label) for r in chunk])  # (B,)
        mask = labels >= 0
        labelled += int(mask.sum())
        correct += int((pred[mask] == labels[mask]).sum())
    ms = 1000 * (time.perf_counter() - start) / max(1, len(records))
    return PredictResult(len(records), labelled, correct, ms)


def fetch_personal_model(
    state_dir: Path, out: Path, server: str | None = None, graph: str = "onnx", tls: Any = None
) -> Path:
    """GET /v1/personal-model with the device token; unpack into ``out``. ``graph``: which
    graph to download, "onnx" (what ``PersonalModel`` runs), "pte" or "all"."""
    if graph not in ("onnx", "pte", "all"):
        raise FedMobiLLMError(f"graph must be onnx, pte or all, not {graph!r}")
    from fedmobillm.device_runtime.client import DeviceState
    from fedmobillm.device_runtime.uploader import Uploader, rejected

    state = DeviceState.load(state_dir)
    with Uploader(server or state.server, state.token, tls=tls or state.tls()) as up:
        resp = up.request("GET", ROUTE_PERSONAL_MODEL, params={"graph": graph})
    if resp.status_code == 409:
        raise FedMobiLLMError(
            f"the server has no personal model for {state.architecture} yet: "
            f"{ErrorBody.from_dict(resp.json()).detail if resp.content else ''}",
            hint="wait until the trainer has taken steps (see `fedmobillm server status`)",
        )
    if resp.status_code != 200:
        raise rejected(resp, "personal-model download")
    return _unpack(resp.content, Path(out))


def _unpack(data: bytes, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                if "/" in name or "\\" in name or name.startswith("."):
                    raise FedMobiLLMError(f"refusing personal-model zip member {name!r}")
                (out / name).write_bytes(zf.read(name))
    except zipfile.BadZipFile as exc:
        raise FedMobiLLMError(f"the server sent a damaged personal model: {exc}") from exc
    (out / "personal.zip").write_bytes(data)
    return out
