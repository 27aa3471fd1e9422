"""The personal lm model on the phone (no torch): ``personal.onnx`` maps a context's taps
to a residual on the backbone's last hidden state, ``activations`` float32 (B, K, T, d) +
``attention_mask`` int64 (B, T) -> ``delta`` float32 (B, T, d) (``fedmobillm.server.lm``).

``PersonalLM.delta`` is the ``device_runtime.generate`` hook ``delta(taps, hidden)``. The
side network is causal and small, so it is recomputed over the whole context at every
generated token (``DELTA_CONTEXT = "all"``) instead of keeping a cache of its own
(docs/lm.md measures the cost). ``hidden`` is not an input of the graph: it is the final
norm of the deepest tap, which the graph already reads. Taps are round-tripped through int8
with the bundle's scales first when the model was trained on int8 uploads, as for the
classify task's personal model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fedmobillm.device_runtime import serde
from fedmobillm.device_runtime.graph import Graph, OnnxOptions
from fedmobillm.device_runtime.messages import PersonalManifest
from fedmobillm.device_runtime.personal import read_personal
from fedmobillm.device_runtime.protocol import (
    PERSONAL_INPUT,
    PERSONAL_MASK,
    PERSONAL_ONNX,
    Manifest,
    bundle_digest,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

DELTA_OUTPUT = "delta"
DELTA_CONTEXT = "all"  # the generate hook gets every position's taps at every step


def is_lm_personal(info: PersonalManifest) -> bool:
    """personal.json describes an lm model (its graph's output is ``delta``)."""
    return any(isinstance(o, dict) and o.get("name") == DELTA_OUTPUT for o in info.outputs)


class PersonalLM:
    """personal.onnx of the lm task, loaded from a folder or a zip."""

    def __init__(self, path: str | Path, activations: str = "auto", threads: int | None = None):
        self.info, onnx, self.trained_on_int8 = read_personal(path, activations)
        if not is_lm_personal(self.info):
            raise FedMobiLLMError(
                f"{path} is a classification personal model, not an lm one",
                hint="`device predict --side` runs classification models; generate needs the "
                "personal model of an lm federation",
            )
        self._graph = Graph(
            onnx,
            [PERSONAL_INPUT, PERSONAL_MASK],
            [DELTA_OUTPUT],
            options=OnnxOptions(threads, quiet=True),
            name=f"{path}/{PERSONAL_ONNX}",
        )
        self.lens = _lens_note(Path(path), self.info)
        if self.lens is not None:
            log.info("personal lm model %s starts from a tuned lens: %s", path, self.lens)
        self._scales: np.ndarray | None = None

    def check_compatible(self, manifest: Manifest) -> None:
        """Refuses a bundle of another architecture or tap layout; keeps its int8 scales."""
        arch = self.info.architecture
        if arch and arch != manifest.architecture:
            raise FedMobiLLMError(
                f"this personal lm model is for architecture {arch}, the bundle is "
                f"{manifest.architecture}",
                hint="use the bundle the device registered with",
            )
        if list(self.info.taps) != list(manifest.taps) or self.info.hidden_size != int(
            manifest.hidden_size
        ):
            raise FedMobiLLMError(
                f"personal lm model taps {self.info.taps} x {self.info.hidden_size} do not "
                f"match the bundle's {manifest.taps} x {manifest.hidden_size}"
            )
        if self.info.bundle_sha256s and bundle_digest(manifest) not in self.info.bundle_sha256s:
            log.warning("personal lm model was trained on other bundles of %s", arch)
        self._scales = np.asarray(manifest.activation_scales, np.float32)  # (K,)

    def run(self, taps: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """taps (B, K, T, d) [+ mask (B, T), default all real] -> delta (B, T, d)."""
        if taps.ndim != 4 or taps.shape[1] != len(self.info.taps):
            raise FedMobiLLMError(
                f"the personal lm model reads taps (B, {len(self.info.taps)}, T, "
                f"{self.info.hidden_size}), got {list(taps.shape)}"
            )
        if mask is None:
            mask = np.ones((taps.shape[0], taps.shape[2]), np.int64)
        x = taps.astype(np.float32)
        if self.trained_on_int8:
            if self._scales is None:
                raise FedMobiLLMError(
                    "the personal lm model was trained on int8 taps: call "
                    "check_compatible(bundle manifest) first (it reads the bundle's scales)"
                )
            x = serde.dequantize(serde.quantize_int8(x, self._scales), self._scales, tokens=True)
        (delta,) = self._graph.run({PERSONAL_INPUT: x, PERSONAL_MASK: mask.astype(np.int64)})
        return delta

    def delta(self, taps: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """The generate hook: taps (B, K, S, d), hidden (B, S, d) -> delta (B, S, d).
        Right-padded batches are fine: the model is causal, so padding never reaches a
        real position."""
        return self.run(taps)


LENS_FILE = "lens.json"


def _lens_note(path: Path, info: PersonalManifest) -> dict | None:
    """lens.json of a personal lm model whose graph holds a tuned lens (a truncated bundle's
    model: its delta includes the lens's move from the logit lens), None without one."""
    if LENS_FILE not in (info.files or {}):
        return None
    try:
        if path.is_dir():
            raw = (path / LENS_FILE).read_bytes()
        else:
            import zipfile

            with zipfile.ZipFile(path) as zf:
                raw = zf.read(LENS_FILE)
        return dict(json.loads(raw))
    except (OSError, KeyError, ValueError) as exc:
        log.warning("%s: personal.json lists %s but it cannot be read: %s", path, LENS_FILE, exc)
        return {"unreadable": str(exc)}
