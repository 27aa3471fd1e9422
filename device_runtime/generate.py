"""On-device text generation and perplexity with a bundle's generation graphs (no torch):
``decoder_step.onnx`` with a KV cache and the frozen ``lm_head.onnx`` (see
``fedmobillm.export.generate`` for their inputs and outputs).

A personal lm model plugs in as ``delta(taps [B, K, S, d], hidden [B, S, d]) -> [B, S, d]``,
added to ``hidden`` before the head (None = the frozen model). By default the delta sees
the new positions only, one step at a time (``DeltaContext "new"``); a delta that needs
every earlier position without a state of its own asks for ``"all"`` and is given the
whole context's taps and hidden states each step (its last S rows are used).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.device_runtime.graph import Graph, OnnxOptions
from fedmobillm.device_runtime.memory import peak_rss_mb
from fedmobillm.device_runtime.protocol import (
    GEN_MANIFEST_KEY,
    TOKENIZER_NAME,
    Manifest,
    gen_past_names,
    gen_present_names,
    load_verified_bundle,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

Delta = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (taps, hidden) -> hidden residual
DELTA_CONTEXTS = ("new", "all")


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (``temperature`` 0) or top-k sampling at a
    temperature, seeded."""

    temperature: float = 0.0
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise FedMobiLLMError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise FedMobiLLMError(f"top-k must be >= 0, not {self.top_k}")


@dataclass
class Generation:
    """One completion and what it cost."""

    prompt: str
    text: str  # the completion (special tokens removed)
    prompt_tokens: int
    token_ids: list[int]  # new tokens, an EOS included when one ended the completion
    stopped: str  # "eos" | "max_new_tokens" | "context"
    use_cache: bool
    seconds: float  # prompt + every new token
    first_token_s: float  # prompt forward + first token
    tokens_per_s: float  # new tokens / seconds
    peak_rss_mib: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Perplexity:
    """Next-token loss over a set of texts."""

    nll: float = 0.0  # summed negative log-likelihood (nats)
    tokens: int = 0  # predicted tokens
    top1: int = 0  # next token was the arg max
    top3: int = 0  # next token among the 3 most likely
    texts: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        n = max(self.tokens, 1)
        return {
            "perplexity": self.perplexity,
            "nll_per_token": self.nll / n,
            "tokens": self.tokens,
            "texts": self.texts,
            "next_token_top1": self.top1 / n,
            "next_token_top3": self.top3 / n,
        }


@dataclass
class _Cache:
    """The growing context of a generation: ids and mask [B, T], the KV cache, and (for
    ``DeltaContext "all"``) the taps and hidden states of every position so far."""

    mask: np.ndarray
    past: list[np.ndarray]
    taps: list[np.ndarray] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)


def generation_info(manifest: Manifest, bundle_dir: Path, backend: str = "onnx") -> dict[str, Any]:
    """The manifest's generation entry; a clear error for a bundle exported without it (or,
    for ``backend`` "pte", without its ExecuTorch graphs)."""
    info = manifest.extra.get(GEN_MANIFEST_KEY)
    if not isinstance(info, dict):
        raise FedMobiLLMError(
            f"bundle {bundle_dir} has no generation graphs",
            hint=f"re-export it with `fedmobillm export {manifest.source_model} --generate "
            "--format onnx` (decoders only)",
        )
    for key in ("step", "head", "depth", "num_kv_heads", "head_dim", "vocab_size"):
        if key not in info:
            raise FedMobiLLMError(f"bundle {bundle_dir}: generation entry lacks {key!r}")
    if backend == "pte" and not isinstance(info.get("pte"), dict):
        raise FedMobiLLMError(
            f"bundle {bundle_dir} has no ExecuTorch (.pte) generation graphs",
            hint=f"re-export it with `fedmobillm export {manifest.source_model} --generate "
            "--format onnx,pte`, or generate with --backend onnx",
        )
    return info


class PteStep:
    """The ExecuTorch step and head of a generation entry (``info["pte"]``). The step
    program keeps the KV cache of one sequence (``context`` positions): ``run`` feeds the new
    tokens at position P (mask [1, P+S], all real) or, with P = 0, each right-padded row of a
    batch in turn (a new context each)."""

    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        from fedmobillm.device_runtime.graph import pte_method

        entry = info["pte"]
        self.context = int(entry["max_context"])
        self._step = pte_method(folder / str(entry["step"]))
        self._head = pte_method(folder / str(entry["head"]))

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """ids [B, S], mask [B, P+S] -> hidden [B, S, d], taps [B, K, S, d]."""
        new = input_ids.shape[1]
        start = attention_mask.shape[1] - new
        if start == 0:  # a new context per row; padding (right) is not fed
            rows = [self._run(input_ids[r : r + 1, : max(1, int(m.sum()))], 0)
                    for r, m in enumerate(attention_mask)]  # fmt: skip
            return _padded(rows, new)
        if len(input_ids) != 1 or not attention_mask.all():
            raise FedMobiLLMError("the .pte step continues one unpadded sequence at a time")
        return self._run(input_ids, start)

    def _run(self, ids: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if start + ids.shape[1] > self.context:
            raise FedMobiLLMError(
                f"{start + ids.shape[1]} tokens do not fit the .pte step's KV cache of "
                f"{self.context}",
                hint="use --backend onnx, or re-export with a larger --generate-context",
            )
        feeds = [torch.from_numpy(np.ascontiguousarray(ids, np.int64)), torch.tensor([start])]
        hidden, taps = self._step.execute(feeds)[:2]
        return hidden.numpy().copy(), taps.numpy().copy()

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """hidden [B, S, d] -> logits [B, S, V], one row at a time."""
        import torch

        rows = [self._head.execute([torch.from_numpy(h[None])])[0].numpy().copy() for h in hidden]
        return np.concatenate(rows, axis=0)


def _padded(rows: list[tuple[np.ndarray, np.ndarray]], width: int):
    """Per-row (hidden [1, s, d], taps [1, K, s, d]) -> zero-padded [B, width, ...] arrays."""
    h0, t0 = rows[0]
    hidden = np.zeros((len(rows), width, h0.shape[-1]), np.float32)
    taps = np.zeros((len(rows), t0.shape[1], width, t0.shape[-1]), np.float32)
    for r, (h, t) in enumerate(rows):
        hidden[r, : h.shape[1]], taps[r, :, : t.shape[2]] = h[0], t[0]
    return hidden, taps


class DecoderGraphs:
    """The step and head graphs of a generation entry (``info``) in ``folder``, and the
    token loops over them (token ids in, token ids out; no tokenizer). ``backend`` "onnx"
    (torch-free) or "pte": the entry's ExecuTorch graphs (``info["pte"]``), whose step keeps
    its KV cache inside the program (``PteStep``)."""

    def __init__(
        self,
        folder: str | Path,
        info: dict[str, Any],
        threads: int | None = None,
        backend: str = "onnx",
    ) -> None:
        self.folder, self.info, self.backend = Path(folder), info, backend
        self.depth, self.kv_heads = int(info["depth"]), int(info["num_kv_heads"])
        self.head_dim, self.vocab = int(info["head_dim"]), int(info["vocab_size"])
        self.max_context = int(info.get("max_context", 2048))
        self.eos = {int(t) for t in info.get("eos_token_ids", [])}
        self._past_names = gen_past_names(self.depth)
        if backend == "pte":
            self._pte = PteStep(self.folder, info)
            self.max_context = self._pte.context
            return
        if backend != "onnx":
            raise FedMobiLLMError(f"generation backend must be onnx or pte, not {backend!r}")
        options = OnnxOptions(threads, low_memory=True, quiet=True)
        self._step = Graph(
            self.folder / str(info["step"]),
            ["input_ids", "attention_mask", *self._past_names],
            ["hidden", "taps", *gen_present_names(self.depth)],
            options=options,
        )
        self._head = Graph(self.folder / str(info["head"]), ["hidden"], ["logits"], options=options)

    # ------------------------------------------------------------------ graphs

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The cache before the first step: ``2 * depth`` arrays [B, H_kv, 0, D]."""
        if self.backend == "pte":  # the program holds its own cache
            return []
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in self._past_names]

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """ids [B, S], mask [B, P+S], past -> hidden [B, S, d], taps [B, K, S, d], present
        (on pte: the program's own cache, from position P; no present)."""
        if self.backend == "pte":
            hidden, taps = self._pte.run(input_ids, attention_mask)
            return hidden, taps, []
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        feeds.update(zip(self._past_names, past, strict=True))
        hidden, taps, *present = self._step.run(feeds)
        return hidden, taps, present

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """hidden [B, S, d] -> logits [B, S, V] through the frozen head."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        if self.backend == "pte":
            return self._pte.logits(hidden)
        (out,) = self._head.run({"hidden": hidden})
        return out

    def forward_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, delta: Delta | None = None
    ) -> np.ndarray:
        """A whole-context forward (no cache): ids, mask [B, S] -> logits [B, S, V]."""
        hidden, taps, _ = self.step(input_ids, attention_mask, self.empty_past(len(input_ids)))
        return self.logits(_with_delta(hidden, taps, delta))

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        use_cache: bool = True,
        sampling: Sampling | None = None,
        delta: Delta | None = None,
        delta_context: str = "new",
    ) -> tuple[list[int], str, float | None]:
        """New token ids for one prompt, why it stopped, and seconds to the first token."""
        if max_new_tokens < 1:
            raise FedMobiLLMError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if delta_context not in DELTA_CONTEXTS:
            raise FedMobiLLMError(f"delta_context must be one of {DELTA_CONTEXTS}")
        sampling = sampling or Sampling()
        rng = np.random.default_rng(sampling.seed)
        context = [int(i) for i in prompt_ids]
        start, first = time.perf_counter(), None
        cache, pending, out = None, list(context), []
        for _ in range(max_new_tokens):
            if len(context) >= self.max_context:
                return out, "context", first
            if use_cache:
                hidden, cache = self._cached_step(pending, cache, delta, delta_context)
            else:
                hidden = self._full_step(context, delta)
            token = _pick(self.logits(hidden[:, -1:])[0, -1], sampling, rng)
            first = time.perf_counter() - start if first is None else first
            out.append(token)
            context.append(token)
            pending = [token]
            if token in self.eos:
                return out, "eos", first
        return out, "max_new_tokens", first

    def _cached_step(
        self, pending: list[int], cache: _Cache | None, delta: Delta | None, delta_context: str
    ) -> tuple[np.ndarray, _Cache]:
        """Feed the new tokens with the cache; hidden [1, S, d] (delta added) and the cache."""
        ids = np.asarray([pending], dtype=np.int64)  # (1, S)
        if cache is None:
            cache = _Cache(np.zeros((1, 0), np.int64), self.empty_past(1))
        mask = np.concatenate([cache.mask, np.ones_like(ids)], axis=1)  # (1, P+S)
        hidden, taps, present = self.step(ids, mask, cache.past)
        cache = _Cache(mask, present, cache.taps, cache.hidden)
        if delta is None:
            return hidden, cache
        if delta_context == "new":
            return _with_delta(hidden, taps, delta), cache
        cache.taps.append(taps)
        cache.hidden.append(hidden)
        all_taps = np.concatenate(cache.taps, axis=2)  # (1, K, T, d)
        all_hidden = np.concatenate(cache.hidden, axis=1)  # (1, T, d)
        full = _with_delta(all_hidden, all_taps, delta)
        return full[:, -hidden.shape[1] :], cache

    def _full_step(self, context: list[int], delta: Delta | None) -> np.ndarray:
        """No cache: the whole context again; hidden [1, T, d] (delta added)."""
        ids = np.asarray([context], dtype=np.int64)  # (1, T)
        hidden, taps, _ = self.step(ids, np.ones_like(ids), self.empty_past(1))
        return _with_delta(hidden, taps, delta)


class Generator(DecoderGraphs):
    """A verified bundle's generation graphs with its tokenizer: text in, text out."""

    def __init__(
        self, bundle_dir: str | Path, threads: int | None = None, backend: str = "onnx"
    ) -> None:
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise FedMobiLLMError(
                f"bundle folder {bundle_dir} does not exist",
                hint="create one with `fedmobillm export MODEL --generate --out DIR`",
            )
        self.bundle_dir = bundle_dir
        self.manifest = load_verified_bundle(bundle_dir)
        info = generation_info(self.manifest, bundle_dir, backend)
        super().__init__(bundle_dir, info, threads, backend)
        self._tok = _load_tokenizer(bundle_dir, self.manifest)
        self.add_special_tokens = bool(self.manifest.tokenizer.get("add_special_tokens", True))

    # ------------------------------------------------------------------ text

    def encode(self, text: str, special: bool | None = None) -> list[int]:
        add = self.add_special_tokens if special is None else special
        return list(self._tok.encode(text, add_special_tokens=add).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        use_cache: bool = True,
        sampling: Sampling | None = None,
        delta: Delta | None = None,
        delta_context: str = "new",
    ) -> Generation:
        """Complete ``prompt`` with up to ``max_new_tokens`` tokens, stopping at EOS."""
        ids = self.encode(prompt)
        if not ids:
            raise FedMobiLLMError("the prompt is empty after tokenization", hint="pass some text")
        start = time.perf_counter()
        new, stopped, first = self.generate_ids(
            ids,
            max_new_tokens,
            use_cache=use_cache,
            sampling=sampling,
            delta=delta,
            delta_context=delta_context,
        )
        seconds = time.perf_counter() - start
        return Generation(
            prompt=prompt,
            text=self.decode(new),
            prompt_tokens=len(ids),
            token_ids=new,
            stopped=stopped,
            use_cache=use_cache,
            seconds=seconds,
            first_token_s=first if first is not None else seconds,
            tokens_per_s=len(new) / seconds if seconds > 0 else float("nan"),
            peak_rss_mib=peak_rss_mb(),
        )

    # ------------------------------------------------------------------ perplexity

    def perplexity(
        self,
        texts: Sequence[str | tuple[str, str]],
        delta: Delta | None = None,
        *,
        max_len: int | None = None,
        batch: int = 4,
    ) -> Perplexity:
        """Next-token loss of ``texts`` (a str: every token; a (prompt, response) pair:
        the response's tokens only), each cut to ``max_len`` tokens (default: the bundle's
        max_seq_len). Right-padded batches: a causal model's real positions never see the
        padding."""
        max_len = int(max_len or self.manifest.max_seq_len)
        rows = [r for r in (self._scored_ids(t, max_len) for t in texts) if r is not None]
        result = Perplexity(texts=len(rows))
        for i in range(0, len(rows), max(1, batch)):
            _score_batch(self, rows[i : i + batch], delta, result)
        return result

    def _scored_ids(self, item: str | tuple[str, str], max_len: int):
        """(ids, first scored position) of one text, or None when nothing is predicted."""
        if isinstance(item, str):
            ids, first = self.encode(item), 1
        else:
            prompt, response = item
            head = self.encode(prompt)
            ids, first = head + self.encode(response, special=False), max(1, len(head))
        ids = ids[:max_len]
        return (ids, first) if len(ids) > first else None


def _score_batch(gen: Generator, rows: list, delta: Delta | None, result: Perplexity) -> None:
    """Add one right-padded batch's next-token loss to ``result``."""
    width = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), width), np.int64)  # (B, T)
    mask = np.zeros_like(ids)
    for r, (row, _) in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
    logits = gen.forward_logits(ids, mask, delta)  # (B, T, V)
    for r, (row, first) in enumerate(rows):
        pred = logits[r, first - 1 : len(row) - 1].astype(np.float64)  # (n, V)
        target = np.asarray(row[first:])  # (n,)
        top = pred.max(axis=1, keepdims=True)
        logz = np.log(np.exp(pred - top).sum(axis=1)) + top[:, 0]  # (n,)
        picked = pred[np.arange(len(target)), target]
        result.nll += float((logz - picked).sum())
        result.tokens += len(target)
        rank = (pred > picked[:, None]).sum(axis=1)  # (n,): tokens scored strictly higher
        result.top1 += int((rank == 0).sum())
        result.top3 += int((rank < 3).sum())


def _with_delta(hidden: np.ndarray, taps: np.ndarray, delta: Delta | None) -> np.ndarray:
    """hidden [B, S, d] + delta(taps [B, K, S, d], hidden) (checked), or hidden."""
    if delta is None:
        return hidden
    residual = np.asarray(delta(taps, hidden), dtype=np.float32)
    if residual.shape != hidden.shape:
        raise FedMobiLLMError(
            f"the personal model returned a residual of shape {list(residual.shape)}, "
            f"not {list(hidden.shape)} like the hidden state",
        )
    if not np.isfinite(residual).all():
        raise FedMobiLLMError("the personal model returned non-finite values")
    return hidden + residual


def _pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """logits [V] -> the next token: arg max, or a top-k sample at the temperature."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature  # (V,)
    if 0 < sampling.top_k < len(z):
        keep = np.argpartition(z, -sampling.top_k)[-sampling.top_k :]  # (k,)
    else:
        keep = np.arange(len(z))
    p = np.exp(z[keep] - z[keep].max())
    return int(keep[rng.choice(len(keep), p=p / p.sum())])


def _load_tokenizer(bundle_dir: Path, manifest: Manifest):
    """The bundle's tokenizer.json, without the padding and truncation the upload path uses."""
    from tokenizers import Tokenizer

    path = bundle_dir / str(manifest.tokenizer.get("file", TOKENIZER_NAME))
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise FedMobiLLMError(f"cannot load tokenizer {path}: {exc}") from exc
    tok.no_padding()
    tok.no_truncation()
    return tok
