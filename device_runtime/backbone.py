"""Run a bundle's frozen backbone: tokenize with the bundle's tokenizer, forward with
onnxruntime (no torch) or the ExecuTorch runtime (imports torch, lazily), return the
tapped pivot activations ``(B, K, d)`` (``Backbone(texts)``), or, for a token bundle
(exported with ``--pivot none``), the taps at every real token ``(B, K, T, d)`` with the
token count of each text (``Backbone.forward_tokens``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.device_runtime.graph import Graph, OnnxOptions
from fedmobillm.device_runtime.protocol import TOKENIZER_NAME, Manifest, load_verified_bundle
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "pte")
GRAPH_FILES = {"onnx": "backbone.onnx", "pte": "backbone.pte"}
# Files a graph loads at run time from beside it: an ONNX graph's weights (external data,
# which onnxruntime maps into memory rather than copying). Bundles exported before this
# layout keep their ONNX weights inline and have none; they still run.
GRAPH_DATA = {"onnx": "backbone.onnx.data"}
MIN_SEQ = 2  # shortest sequence the exported graphs accept
FORWARD_BATCH = 8  # default texts per forward pass (Backbone.__call__'s forward_batch)


def forward_passes(lengths: np.ndarray, forward_batch: int) -> list[np.ndarray]:
    """Rows of each forward pass a device makes over texts of these token ``lengths``:
    ``forward_batch`` at a time in order of length (stable), shortest first."""
    order = np.argsort(np.asarray(lengths), kind="stable")  # (B,)
    return [order[s : s + forward_batch] for s in range(0, len(order), forward_batch)]


def choose_backend(manifest: Manifest, bundle_dir: Path, backend: str) -> str:
    """``auto`` = onnx if the bundle has it, else pte."""
    if backend not in BACKENDS:
        raise FedMobiLLMError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    present = [b for b, f in GRAPH_FILES.items() if f in manifest.files]
    if backend == "auto":
        if not present:
            raise FedMobiLLMError(
                f"bundle {bundle_dir} has neither backbone.onnx nor backbone.pte",
                hint="re-export it with `fedmobillm export MODEL --format onnx`",
            )
        return present[0]
    if backend not in present:
        raise FedMobiLLMError(
            f"bundle {bundle_dir} has no {GRAPH_FILES[backend]} (it has: "
            f"{', '.join(GRAPH_FILES[b] for b in present) or 'no graph'})",
            hint=f"use --backend auto, or re-export with --format {backend}",
        )
    return backend


def _static_dims(manifest: Manifest) -> tuple[int | None, int | None]:
    """(batch, seq) when the graph was exported with fixed input shapes, else None each."""
    for spec in manifest.inputs:
        if spec.get("name") == "input_ids":
            shape = list(spec.get("shape") or [None, None]) + [None, None]
            batch, seq = shape[0], shape[1]
            return (
                batch if isinstance(batch, int) else None,
                seq if isinstance(seq, int) else None,
            )
    return None, None


class _Tokenizer:
    """The bundle's tokenizer.json via the `tokenizers` library: right padding to the
    longest text of the batch (or a fixed length), truncation to max_seq_len."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, fixed_len: int | None) -> None:
        from tokenizers import Tokenizer

        spec = manifest.tokenizer
        path = bundle_dir / str(spec.get("file", TOKENIZER_NAME))
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise FedMobiLLMError(f"cannot load tokenizer {path}: {exc}") from exc
        pad_id = self.pad_id = int(spec.get("pad_token_id", 0))
        self.add_special_tokens = bool(spec.get("add_special_tokens", True))
        self._tok.enable_truncation(max_length=fixed_len or manifest.max_seq_len)
        pad_token = self._tok.id_to_token(pad_id) or "[PAD]"
        self._tok.enable_padding(
            direction="right", pad_id=pad_id, pad_token=pad_token, length=fixed_len
        )

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        ids = np.array([e.ids for e in encs], dtype=np.int64)  # (B, S)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)  # (B, S)
        if ids.shape[1] < MIN_SEQ:  # exported graphs' dynamic seq dim starts at 2
            extra = MIN_SEQ - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=self.pad_id)  # (B, 2)
            mask = np.pad(mask, ((0, 0), (0, extra)))  # (B, 2)
        return ids, mask


class Backbone:
    """A verified bundle, ready to turn texts into tapped activations: ``(B, K, d)`` pivot
    vectors, or ``(B, K, T, d)`` token taps for a token bundle (``tokens``)."""

    def __init__(
        self, bundle_dir: str | Path, backend: str = "auto", threads: int | None = None
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        if not self.bundle_dir.is_dir():
            raise FedMobiLLMError(
                f"bundle folder {self.bundle_dir} does not exist",
                hint="create a bundle with `fedmobillm export MODEL --out DIR`",
            )
        self.manifest: Manifest = load_verified_bundle(self.bundle_dir)
        self.backend = choose_backend(self.manifest, self.bundle_dir, backend)
        self.static_batch, self.static_seq = _static_dims(self.manifest)
        max_batch = self.manifest.extra.get("max_batch")
        self.max_batch: int | None = max_batch if isinstance(max_batch, int) else None
        self._tokenize = _Tokenizer(self.bundle_dir, self.manifest, self.static_seq)
        self._plain_tokenizer: Any = None  # generate's tokenizer (encode_ids), loaded when used
        graph = self.bundle_dir / GRAPH_FILES[self.backend]
        options = OnnxOptions(threads, low_memory=True, quiet=True)
        self._forward_graph = Graph(graph, fmt=self.backend, options=options)
        log.debug("backbone %s (%s) loaded from %s", self.architecture, self.backend, graph)

    @property
    def architecture(self) -> str:
        return self.manifest.architecture

    @property
    def tokens(self) -> bool:
        """A token bundle (manifest pivot "none"): taps at every token, ``forward_tokens``."""
        return self.manifest.tokens

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int64 ``(B, S)``, right-padded."""
        if not texts:
            raise FedMobiLLMError("nothing to encode: the list of texts is empty")
        return self._tokenize(texts)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 ``(B, K, d)``: the pivot activation at each tap; a token bundle: ``(B,
        K, S, d)``, every position of the ``(B, S)`` inputs (padding not zeroed here)."""
        if (self.static_batch and input_ids.shape[0] != self.static_batch) or (
            self.max_batch and input_ids.shape[0] > self.max_batch
        ):
            return self._forward_chunked(input_ids, attention_mask)
        taps = self._run(input_ids, attention_mask)  # (B, K, d) or (B, K, S, d)
        self._check(taps, input_ids.shape)
        return taps

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        (taps,) = self._forward_graph.run({"input_ids": ids, "attention_mask": mask})
        return np.asarray(taps, dtype=np.float32)  # (B, K, d) or (B, K, S, d)

    def _forward_chunked(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A graph with a fixed or bounded batch size: run in chunks; with a fixed size,
        pad the last chunk by repeating its last row."""
        b, out = int(self.static_batch or self.max_batch or 1), []
        for start in range(0, ids.shape[0], b):
            chunk_ids, chunk_mask = ids[start : start + b], mask[start : start + b]  # (b', S)
            n = chunk_ids.shape[0]
            if n < b and self.static_batch:
                chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[-1:], b - n, 0)])
                chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[-1:], b - n, 0)])
            taps = self._run(chunk_ids, chunk_mask)  # (b, K, d) or (b, K, S, d)
            out.append(taps[:n])
        taps = np.concatenate(out)  # (B, K, d) or (B, K, S, d)
        self._check(taps, ids.shape)
        return taps

    def _check(self, taps: np.ndarray, inputs: tuple[int, ...]) -> None:
        """The graph's output against the manifest: ``(B, K, d)``, or ``(B, K, S, d)`` for
        a token bundle, given the ``(B, S)`` shape of its inputs."""
        m = self.manifest
        if m.tokens:
            want: tuple[int, ...] = (inputs[0], m.num_taps, inputs[1], m.hidden_size)
        else:
            want = (inputs[0], m.num_taps, m.hidden_size)
        if taps.shape != want:
            raise FedMobiLLMError(
                f"backbone graph returned taps of shape {list(taps.shape)}, the manifest "
                f"promises {list(want)}",
                hint="the bundle is inconsistent; re-export it",
            )

    def __call__(self, texts: list[str], forward_batch: int | None = None) -> np.ndarray:
        """Texts -> float32 ``(B, K, d)``, in the order given.

        With ``forward_batch``, the texts are forwarded that many at a time in order of
        token length, each pass padded only to its own longest text: less padded compute
        (the order does not matter to a forward-only device). Without it, one pass padded
        to the longest text. A token bundle: use ``forward_tokens``."""
        if self.tokens:
            raise FedMobiLLMError(
                f"bundle {self.bundle_dir} is a token bundle (pivot none): its taps are "
                "(B, K, T, d), one vector per token, not one per text",
                hint="call Backbone.forward_tokens(texts) for token taps and lengths, or "
                "export a pivot bundle (`fedmobillm export MODEL --pivot auto`)",
            )
        ids, mask = self.encode(texts)  # (B, S)
        if forward_batch is not None and forward_batch < 1:
            raise FedMobiLLMError(f"forward_batch must be at least 1, not {forward_batch}")
        if not forward_batch or forward_batch >= len(texts):
            return self.forward(ids, mask)
        out = np.empty((len(texts), self.manifest.num_taps, self.manifest.hidden_size), np.float32)
        for rows in forward_passes(mask.sum(axis=1), forward_batch):
            chunk_ids, chunk_mask = ids[rows], mask[rows]  # (b, S)
            if not self.static_seq:  # right padding: drop the columns no text here reaches
                width = max(MIN_SEQ, int(chunk_mask.sum(axis=1).max()))
                chunk_ids, chunk_mask = chunk_ids[:, :width], chunk_mask[:, :width]
            out[rows] = self.forward(chunk_ids, chunk_mask)  # (b, K, d)
        return out

    def forward_tokens(
        self, texts: list[str], forward_batch: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (taps float32 ``(B, K, T, d)``, lengths int64 ``(B,)``), in the order
        given: the taps at every real token of each text (position 0 = its first token),
        zero at ``t >= lengths[i]``, T = the longest text's token count. A token bundle only.

        Forward passes as ``__call__``'s: ``forward_batch`` texts at a time in order of
        token length, each padded only to its own longest text (None: one pass)."""
        if not self.tokens:
            raise FedMobiLLMError(
                f"bundle {self.bundle_dir} is a pivot bundle (pivot "
                f"{self.manifest.pivot}): it emits one vector per tap and text, not per token",
                hint="call the backbone (Backbone(texts)) for (B, K, d), or export a token "
                "bundle with `fedmobillm export MODEL --pivot none`",
            )
        if forward_batch is not None and forward_batch < 1:
            raise FedMobiLLMError(f"forward_batch must be at least 1, not {forward_batch}")
        ids, mask = self.encode(texts)  # (B, S)
        lengths = mask.sum(axis=1).astype(np.int64)  # (B,)
        if (lengths < 1).any():
            i = int(np.flatnonzero(lengths < 1)[0])
            raise FedMobiLLMError(
                f"text {i} ({texts[i][:40]!r}) has no tokens: a token bundle uploads at least "
                "one per text",
                hint="drop empty texts from the data",
            )
        return self._token_taps(ids, mask, lengths, forward_batch), lengths

    def encode_ids(self, text: str, special: bool | None = None) -> list[int]:
        """A text's token ids exactly as ``generate.Generator.encode`` gives them (the
        bundle's tokenizer, no padding or truncation; ``special`` None: the manifest's
        add_special_tokens): what the lm task trains on and generation reads."""
        if self._plain_tokenizer is None:
            from fedmobillm.device_runtime.generate import _load_tokenizer

            self._plain_tokenizer = _load_tokenizer(self.bundle_dir, self.manifest)
        add = self._tokenize.add_special_tokens if special is None else special
        return list(self._plain_tokenizer.encode(text, add_special_tokens=add).ids)

    def forward_token_ids(
        self, sequences: list[list[int]] | list[tuple[int, ...]], forward_batch: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token id sequences (each 1..max_seq_len long) -> (taps float32 ``(B, K, T, d)``,
        lengths int64 ``(B,)``) as ``forward_tokens``: position t of row i holds the taps
        of ``sequences[i][t]``, zero at ``t >= lengths[i]``. A token bundle only (the lm
        task forwards exactly the ids it uploads)."""
        if not self.tokens:
            raise FedMobiLLMError(
                f"bundle {self.bundle_dir} is a pivot bundle: it has no per-token taps",
                hint="export a token bundle with `fedmobillm export MODEL --pivot none`",
            )
        if not sequences:
            raise FedMobiLLMError("nothing to forward: the list of token sequences is empty")
        if forward_batch is not None and forward_batch < 1:
            raise FedMobiLLMError(f"forward_batch must be at least 1, not {forward_batch}")
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)  # (B,)
        width = int(self.static_seq or max(MIN_SEQ, int(lengths.max())))
        if lengths.min() < 1 or lengths.max() > width or lengths.max() > self.manifest.max_seq_len:
            raise FedMobiLLMError(
                f"token sequences must hold 1..{self.manifest.max_seq_len} ids (the bundle's "
                f"max_seq_len), got {int(lengths.min())}..{int(lengths.max())}"
            )
        ids = np.full((len(sequences), width), self._tokenize.pad_id, np.int64)  # (B, S)
        mask = np.zeros_like(ids)  # (B, S)
        for i, seq in enumerate(sequences):
            ids[i, : lengths[i]], mask[i, : lengths[i]] = seq, 1
        return self._token_taps(ids, mask, lengths, forward_batch), lengths

    def _token_taps(
        self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, forward_batch: int | None
    ) -> np.ndarray:
        """float32 ``(B, K, T, d)`` taps of right-padded ``(B, S)`` inputs with ``lengths``
        (B,) real tokens each, T = max(lengths), padding exactly zero; ``forward_batch``
        rows per pass in order of length, each pass cut to its own longest row."""
        m, t = self.manifest, int(lengths.max())
        out = np.zeros((len(ids), m.num_taps, t, m.hidden_size), np.float32)  # (B, K, T, d)
        rows_per_pass = forward_batch if forward_batch else len(ids)
        for rows in forward_passes(lengths, rows_per_pass):
            chunk_ids, chunk_mask = ids[rows], mask[rows]  # (b, S)
            if not self.static_seq:  # right padding: drop the columns no text here reaches
                width = max(MIN_SEQ, int(lengths[rows].max()))
                chunk_ids, chunk_mask = chunk_ids[:, :width], chunk_mask[:, :width]
            taps = self.forward(chunk_ids, chunk_mask)  # (b, K, S', d)
            w = min(t, taps.shape[2])
            out[rows, :, :w] = taps[:, :, :w]
        padding = np.arange(t)[None, :] >= lengths[:, None]  # (B, T)
        out.transpose(0, 2, 1, 3)[padding] = 0.0  # a view: padding exactly 0 (even if NaN)
        return out
