"""The trainer of an lm federation (settings ``task = "lm"``): everything the ``lm`` task does
differently from ``trainer.Trainer`` lives here, the rest (the cache, the balanced sampler,
checkpoints and resume, export and publication, idle, quarantine, status) is the classify
trainer's own.

- The side network is ``server.lm.LMSideTrainer`` (causal body, per-architecture alignment
  and a zero-initialised residual projection shared by the architectures of one source
  model, the loss balanced across architectures (``share_out``, ``arch_balance``: its
  defaults), read out through each architecture's frozen LM head),
  behind ``LMSide``, which gives it the interface the trainer steps.
- Each architecture's frozen head comes from the server's own copy of its bundle's source
  model (``lm_heads.head_for``, checked at registration). An architecture whose bundle
  ends before the model's last block (a truncation) starts at a tuned lens fitted on
  public text with the same weights (``server.lm_lens``; logged, cached on disk; the
  first fit of a (model, depth) takes minutes on 2 cores; ``FEDMOBILLM_LM_LENS=off``
  turns it off); a full-depth one starts exactly at the frozen model.
- Lines a step: each architecture's equal share of ``batch_size``, or what
  ``lm_arch_batch`` gives it (``server.lm_batch``; e.g. more for the full model than for
  its truncations); ``status()["lines_per_step"]`` says what each draws.
- Validation (the devices' validation split, per architecture): ``perplexity``,
  ``nll_per_token``, ``next_token_top1``, ``next_token_top3`` over the scored tokens, and
  the frozen model's perplexity on the same set (``frozen_perplexity``: what the personal
  model must beat; step 0 is the frozen model exactly, delta = 0). The best snapshot is the
  one of lowest validation perplexity.
- Not for lm: anchors (classify-only: refused by settings and ingest), label skew and the
  anchor ranking (no labels). Quarantine applies as for classify: uploads of impossible
  values (activations, or token ids past the vocabulary) are offences, stored rows are
  screened, and a non-finite step is blamed on the devices whose samples give a non-finite
  residual.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmobillm.device_runtime.files import write_atomic
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.lm import (
    FrozenLMHead,
    LMArch,
    LMGroup,
    LMSideTrainer,
    NextTokenStats,
    scored_logits,
)
from fedmobillm.server.lm_batch import step_batches
from fedmobillm.server.lm_heads import head_for
from fedmobillm.server.store import Store
from fedmobillm.server.trainer import ArchData, Trainer, collate_lm

log = logging.getLogger(__name__)

SOURCES_FILE = "lm_sources.json"  # in a checkpoint: each architecture's source model
# Scored tokens per validation forward: the head's logits are (tokens, vocab) float64
EVAL_TOKENS = 512


class LMSide:
    """``LMSideTrainer`` with the interface ``Trainer`` drives (``SideTrainer``'s): step,
    samples_seen, config, archs, label_names ([]), arch_quality, num_parameters, is_finite,
    train_step(groups, anchors), predict, save, export_personal. ``sources``: arch -> the
    bundle manifest fields its head comes from (source_model, source_sha256, hidden_size)."""

    label_names: list[str] = []

    def __init__(self, inner: LMSideTrainer) -> None:
        self.inner = inner
        self.samples_seen = 0
        self.arch_quality: dict[str, float] = {}
        self.sources: dict[str, dict[str, Any]] = {}

    @property
    def step(self) -> int:
        return self.inner.step

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def archs(self) -> dict[str, LMArch]:
        return self.inner.archs

    def num_parameters(self, arch: str | None = None) -> int:
        return self.inner.num_parameters(arch)

    @torch.no_grad()
    def is_finite(self) -> bool:
        """Every weight, live and averaged, is finite."""
        mods = [m for _, m in self.inner._live_modules()] + list((self.inner.ema or {}).values())
        return all(bool(torch.isfinite(p).all()) for m in mods for p in m.parameters())

    def add_architecture(
        self, arch: str, a: ArchData, head: FrozenLMHead, source: dict[str, Any],
        lens: Any = None,
    ) -> None:  # fmt: skip
        self.inner.add_architecture(
            arch, a.taps, a.depth, a.hidden, head, str(source.get("source_model", "")), lens
        )
        self.sources[arch] = source

    def train_step(self, groups: list[tuple], anchors: Any = None) -> float:
        """One step on [(arch, x (B, K, T, d), y, mask (B, T), ids (B, T), loss_mask (B, T))]
        (``TrainingCache.sample`` of an lm cache); ``anchors`` unused (classify-only)."""
        lm = [LMGroup(arch, x, ids, mask, lmask) for arch, x, _, mask, ids, lmask in groups]
        loss = self.inner.train_step(lm)
        self.samples_seen += sum(len(g[2]) for g in groups)
        return loss

    @torch.no_grad()
    def predict(self, arch: str, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n, 1): the largest |delta| of each sample of x (n, K, T, d), mask (n, T) under the
        averaged model (the trainer's finiteness check when it blames devices)."""
        model = self.inner.model(arch, averaged=True).eval()
        delta = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(mask))
        return delta.abs().amax(dim=(1, 2)).numpy()[:, None]

    def save(self, directory: Path) -> None:
        self.inner.save(directory)
        extra = {"samples_seen": self.samples_seen, "sources": self.sources}
        write_atomic(Path(directory) / SOURCES_FILE, json.dumps(extra, indent=1).encode())

    @classmethod
    def load(cls, directory: Path) -> LMSide:
        """A checkpoint's lm side network, each architecture's head checked again against the
        server's copy of its source model (``lm_heads.head_for``)."""
        try:
            extra = json.loads((Path(directory) / SOURCES_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise FedMobiLLMError(f"{directory}: no readable {SOURCES_FILE}: {exc}") from exc
        sources = extra["sources"]
        side = cls(
            LMSideTrainer.load(directory, head_for=lambda spec: head_for(sources[spec.name]))
        )
        side.samples_seen, side.sources = int(extra["samples_seen"]), dict(sources)
        return side

    def export_personal(
        self, arch: str, out_dir: Path, bundle_sha256s: list[str], pte: bool = False,
        quant: str = "int8",
    ) -> Path:  # fmt: skip
        """personal.onnx / .json / .safetensors of ``arch``'s averaged model (task "lm");
        ``pte`` is not built for lm personal models (said once in the log)."""
        if pte and not getattr(self, "_said_pte", False):
            self._said_pte = True
            log.warning("export_pte: lm personal models are exported as ONNX only")
        return self.inner.export_personal(arch, out_dir, bundle_sha256s, quant)


class LMTrainer(Trainer):
    """``Trainer`` for ``task = "lm"`` (see the module docstring)."""

    BEST_METRIC = ("perplexity", -1.0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # arch -> the frozen model's metrics on the validation set of n samples (cached)
        self.frozen: dict[str, dict[str, Any]] = {}
        self._unknown_batch: list[str] = []  # lm_arch_batch names not cached yet (logged)

    def _arch_batch(self) -> dict[str, int] | None:
        """``lm_arch_batch``; its names that no cached architecture has are logged (once
        per change: a misspelt name would otherwise leave that model at its equal share)."""
        per = self.settings.lm_arch_batch
        unknown = sorted(set(per) - set(self.cache.archs))
        if unknown != self._unknown_batch:
            self._unknown_batch = unknown
            if unknown:
                log.warning("lm_arch_batch names %s, which no cached architecture is (yet): "
                            "cached: %s", unknown, sorted(self.cache.archs))  # fmt: skip
        return per or None

    def _create(self, store: Store) -> bool:
        if not any(a.num_train for a in self.cache.archs.values()):
            return False
        self.side = LMSide(LMSideTrainer(self._side_config(), seed=self.settings.seed))  # type: ignore[assignment]
        log.info("lm side network created: %d parameters", self.side.num_parameters())
        return True

    def _sync_archs(self) -> None:
        side: LMSide = self.side  # type: ignore[assignment]
        for name, a in list(self.cache.archs.items()):
            if name not in side.archs:
                source = {
                    k: a.manifest.get(k) for k in ("source_model", "source_sha256", "hidden_size")
                }
                head = head_for(source)
                side.add_architecture(name, a, head, source, _lens(source, a.depth, head))
            spec = side.archs[name]
            spec.bundle_sha256s = sorted(set(spec.bundle_sha256s) | a.bundle_sha256s)
            spec.encoding = "int8" if "int8" in a.encodings or not a.encodings else "fp16"

    def _load_side(self, directory: Path) -> Any:
        return LMSide.load(directory)

    def _after_evaluate(self, val: dict[str, dict[str, float]]) -> None:
        """No anchor ranking in an lm federation (anchors are classify-only)."""

    @torch.no_grad()
    def _evaluate_arch(self, name: str, a: ArchData) -> dict[str, float]:
        """Perplexity, nll_per_token, next_token_top1/top3 and scored tokens of the averaged
        (exported) model on the architecture's validation samples, n, and the frozen model's
        perplexity on them (``frozen_perplexity``)."""
        side: LMSide = self.side  # type: ignore[assignment]
        personal = side.inner.model(name, averaged=True).eval()
        head = side.inner.heads[name]
        n = len(a.val_x)
        frozen = self.frozen.get(name)
        # keyed on the validation rows' version, not their count (a replaced row keeps n)
        stale = frozen is None or frozen.get("version") != a.val_version
        stats, fstats = NextTokenStats(), NextTokenStats()
        for idx in _token_chunks([s.tokens for s in a.val_x]):
            x, mask, ids, lmask = (
                torch.from_numpy(v) for v in collate_lm([a.val_x[i] for i in idx])
            )
            scored_logits(stats, personal, head, x.float(), ids, mask, lmask)
            if stale:
                scored_logits(fstats, None, head, x.float(), ids, mask, lmask)
        if stale:
            self.frozen[name] = frozen = {"n": n, "version": a.val_version, **fstats.to_dict()}
        assert frozen is not None
        return {**stats.to_dict(), "n": n, "frozen_perplexity": frozen["perplexity"]}

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["frozen_validation"] = {k: dict(v) for k, v in list(self.frozen.items())}
        training = sorted(k for k, a in list(self.cache.archs.items()) if a.num_train > 0)
        out["lines_per_step"] = step_batches(
            training, self.settings.batch_size, self.settings.lm_arch_batch
        )
        out["not_applicable"] = {
            "anchors": "classify-only: an lm federation takes no anchor set",
            "labels": "an lm sample's targets are its own tokens",
        }
        return out


def _lens(source: dict[str, Any], depth: int, head: FrozenLMHead) -> Any:
    """The tuned lens of an architecture whose bundle ends before its model's last block
    (``server.lm_lens``; fitted once on public text with the server's own copy of the
    weights, then cached on disk), None at full depth or with FEDMOBILLM_LM_LENS=off."""
    from fedmobillm.server.lm_heads import local_source
    from fedmobillm.server.lm_lens import lens_for

    folder = local_source(str(source.get("source_model", "")))
    if folder is None:  # head_for has refused this already; say it again if not
        raise FedMobiLLMError(f"no local copy of {source.get('source_model')!r} for its lens")
    return lens_for(folder, depth, head.norm, str(source.get("source_sha256") or "") or None)


def _token_chunks(lengths: list[int], budget: int = EVAL_TOKENS) -> list[list[int]]:
    """Sample indices sorted by length, cut into chunks of at most ``budget`` padded tokens
    (one sample at least per chunk)."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks
