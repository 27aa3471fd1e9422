"""The lm task (issue 16): held-out next-token perplexity of personal language models.

``python -m benchmarks.bench_lm [--quick] --out DIR [--taps-from bundle|torch]`` writes
``lm.json`` (``{"rows": [{"method", "backbone", "perplexity", "next_token_top1",
"next_token_top3", "bytes_per_token", ...}]}``), ``lm.md`` and ``lm.png``.

Data: the friends transcripts, one device per speaker (the most prolific ``devices``),
each with its own held-out episodes (``fedmobillm.data.lm.lm_devices``); plain text, every
token after the first scored. Fleet: SmolLM2-135M with taps [10, 20, 30] of 30 blocks
(``smollm2-135m``) and a 12-block truncation with taps [4, 8, 12] (``smollm2-135m-l12``),
devices alternating between them. Each device's token taps are uploaded as ``--encoding``
fp16 (the lm default: the server computes ``hidden`` as the final norm of the deepest
uploaded tap, and int8 per-tap scales clip SmolLM2's outlier channels there) or int8 per
tap with the bundle's scales; the server trains on them as uploaded. Held-out text is scored
as the phone scores it: ``hidden`` is the fp32 final-norm output of the deepest block, the
personal model reads the taps in the uploaded encoding, logits = frozen head(hidden + delta).

Splits per device: the first ``train_lines`` lines of its training episodes (train), the
last ``val_lines`` lines of its training episodes from other episodes (validation: settings
are chosen on these, ``benchmarks._lm_tune``), the first ``heldout_lines`` of its held-out
episodes (test: the rows). Taps are cached per set of lines (``CachedTaps``).

``--taps-from bundle`` (default): taps from exported ``pivot none`` bundles run by the
device runtime (onnxruntime), scales from their manifests. ``torch``: the same taps from
the eager PyTorch model's hidden states and the exporter's own scale rule
(``export.calibrate.tap_scales`` on its calibration texts), for machines where the export
is too slow; each row says which.

Methods, on the same held-out text of each backbone's devices:
- ``frozen``: the backbone as it is (delta 0);
- ``fedmobillm``: one shared causal body over the heterogeneous fleet, a personal model per
  architecture;
- ``centralised``: the same side network on every device's data pooled, one backbone;
- ``local``: one side network per device on its own text only;
- ``fedavg-lora``: peft LoRA on the whole full decoder, FedAvg rounds over the same speakers
  and lines (in-process FedAvg, not Flower: ``benchmarks._lm_lora``), as many training tokens
  as fedmobillm's steps drew for the full decoder; with ``device_cost``: each method's device
  FLOPs, bytes and peak memory to reach the worse one's best validation perplexity.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.lm")

MODEL = "smollm2-135m"
BACKBONES = {"smollm2-135m": [10, 20, 30], "smollm2-135m-l12": [4, 8, 12]}


@dataclass
class LmBenchConfig:
    devices: int = 6
    train_lines: int = 600  # per device (at most)
    heldout_lines: int = 100  # per device (at most)
    steps: int = 300
    batch_lines: int = 16  # per architecture per step
    width: int = 128
    blocks: int = 3
    lr: float = 2e-3
    warmup: int = 20
    ema: float = 0.95
    dropout: float = 0.1
    max_len: int = 64
    seed: int = 0
    taps_from: str = "bundle"
    encoding: str = "fp16"  # what devices upload for lm (int8: per-tap scales, as classify)
    val_lines: int = 24  # per device, from its training episodes: for choosing settings
    # every this many steps (and at the end) each personal model (EMA) is scored on its
    # devices' validation lines and the best one kept, as the server keeps the checkpoint of
    # lowest validation perplexity; 0: the last model
    select_every: int = 0
    threads: int = 2
    centralised: list[str] = field(default_factory=lambda: list(BACKBONES))
    # fedavg-lora (benchmarks._lm_lora): run it; its settings tried, "rank:targets:lr"
    fedavg_lora: bool = True
    lora_sweep: list[str] = field(default_factory=lambda: ["4:qv:2e-3", "16:qv:2e-3"])
    # its token budget: this fraction of the scored tokens fedmobillm's steps drew for the
    # full decoder (1: the same budget); sampled clients and local steps per round
    lora_budget: float = 1.0
    lora_clients: int = 2
    lora_local_steps: int = 2
    # without select_every, fedmobillm's validation perplexity is still logged every this
    # many steps (its perplexity-vs-device-cost curve); 0: not logged
    curve_every: int = 10
    # 1: an architecture whose graph ends before the model's last block (l12) starts at its
    # tuned lens (server.lm_lens: fitted on public text, cached); 0: at the logit lens
    lens: int = 1
    # upload compression options measured for their perplexity cost (benchmarks._lm_compress:
    # none, int8, taps-N, int4, pca-R, joined with +); empty: not run (the default)
    compression: list[str] = field(default_factory=list)
    # the side network's per-architecture parts (server.lm.LMSideTrainer): 1 = architectures
    # of one model share the output projection; 1 = a step's loss is the mean of each
    # architecture's mean NLL (0: of every token). Both on: chosen on validation in --quick
    # (full backbone / 12 blocks: neither 42.85 / 113.85, share_out 40.35 / 110.83,
    # arch_balance 42.71 / 114.24, both 40.01 / 110.46; docs/lm.md). The alignment and
    # projection lr x align_lr_scale
    share_out: int = 1
    arch_balance: int = 1
    align_lr_scale: float = 1.0
    # fedmobillm: lines per step drawn for the full backbone (0: batch_lines, as the others;
    # the server's lm_arch_batch). 16 in --quick tied with 0 on validation over two seeds
    # (full backbone 39.63 / 40.48 vs 40.01 / 40.14; docs/lm.md): off
    full_batch_lines: int = 0
    # 0: no local rows (they do not depend on fedmobillm's settings: a rerun of fedmobillm
    # and fedavg-lora alone can skip them and centralised, --no-local --no-centralised)
    local: int = 1

    @classmethod
    def quick(cls) -> LmBenchConfig:
        # 96 held-out lines per device (24 gave the full backbone 541 test tokens: too few).
        # lr 5e-4: chosen on the validation lines with the tuned lens and --select-every 10
        # (lowest mean validation NLL of the two backbones; 2e-3, 1.5e-3, 1e-3, 5e-4 tried;
        # docs/lm.md). 80 steps with each personal model kept at its best of every 10 on
        # validation: chosen the same way (40, 60, 80 steps; width, warm-up, dropout, blocks,
        # batch, lr 3e-4 tried); the full backbone's best stays at step 40, the 12-block one
        # improves to step 70
        return cls(devices=4, train_lines=64, heldout_lines=96, steps=80, batch_lines=8,
                   lr=5e-4, select_every=10, lora_budget=0.25, lora_local_steps=1)  # fmt: skip


@dataclass
class Texts:
    """One backbone's token taps of a set of lines: int8 (sum L, K, d) + lengths, ids, the
    fp32 deepest tap of each line (for the phone's hidden) and the owning device."""

    acts: Any  # benchmarks._activations.TokenActivations
    ids: list[np.ndarray]
    deepest: list[np.ndarray] | None
    device: np.ndarray


# -- data ------------------------------------------------------------------------------------


def fleet(cfg: LmBenchConfig) -> tuple[list[Any], list[list[Any]]]:
    """Devices (speakers) with their first ``train_lines`` training lines and first
    ``heldout_lines`` held-out (test) lines, and per device its validation lines: the last
    ``val_lines`` lines of its training episodes, from episodes none of its training lines
    come from (checked), never from the held-out episodes. Settings are chosen on these."""
    from fedmobillm.data.lm import lm_devices, load_lm_corpus

    devices = lm_devices(load_lm_corpus("friends").records, num_devices=cfg.devices, seed=cfg.seed)
    val = []
    for d in devices:
        train = d.train[: cfg.train_lines]
        seen = {r.group for r in train}
        rest = [r for r in d.train[cfg.train_lines :] if r.group not in seen]
        val.append(rest[len(rest) - cfg.val_lines :] if cfg.val_lines else [])
        d.train, d.heldout = train, d.heldout[: cfg.heldout_lines]
    return devices, val


class TorchTaps:
    """Token taps of both backbones from one eager forward of the full model: hidden states
    after blocks 4, 8, 12 and 10, 20, 30, scales by the exporter's calibration rule."""

    def __init__(self, cfg: LmBenchConfig) -> None:
        import torch

        from fedmobillm.export.generate import load_causal_lm
        from fedmobillm.export.models import resolve_model

        torch.set_num_threads(cfg.threads)
        self.folder = Path(resolve_model(MODEL))
        self.model = load_causal_lm(self.folder)
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tok.no_padding()
        self.max_len = cfg.max_len
        from fedmobillm.export.calibrate import calibration_texts, tap_scales

        cal = self.forward(calibration_texts(None, 64))
        self.scales = {}
        for b, taps in BACKBONES.items():
            x = np.stack([np.pad(h[taps], ((0, 0), (0, self.max_len - h.shape[1]), (0, 0)))
                          for h, _ in cal])  # fmt: skip
            m = np.stack([np.arange(self.max_len) < h.shape[1] for h, _ in cal])
            self.scales[b] = np.asarray(tap_scales(x, m.astype(np.int64)), np.float32)
        self.architecture = {b: f"{MODEL}:{'-'.join(map(str, t))}" for b, t in BACKBONES.items()}
        self.digest = {b: "torch" for b in BACKBONES}

    def forward(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: hidden states (L+1 layers, T, d) float32 and its ids (T,)."""
        import torch

        rows = [self.tok.encode(text).ids[: self.max_len] or [0] for text in texts]
        out: list = [None] * len(rows)
        order = np.argsort([len(r) for r in rows], kind="stable")  # little padding
        for s in range(0, len(order), 16):
            part = order[s : s + 16]
            width = max(len(rows[i]) for i in part)
            ids = torch.zeros((len(part), width), dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(part):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            stack = self._block_outputs(ids, mask)  # (b, L+1, T, d)
            for j, i in enumerate(part):
                n = len(rows[i])
                out[i] = (stack[j, :, :n].copy(), np.asarray(rows[i], np.int64))
        return out

    def _block_outputs(self, ids: Any, mask: Any) -> np.ndarray:
        """(b, L+1, T, d): row t = block t's output, pre-norm, as a bundle taps it (Hugging
        Face's last hidden state is after the final norm, so forward hooks capture them);
        row 0 unused. Right padding: causal, real positions never see it."""
        import torch

        layers = self.model.model.layers
        got: dict[int, Any] = {}
        hooks = [
            layer.register_forward_hook(
                lambda _m, _i, o, t=t: got.__setitem__(t, o[0] if isinstance(o, tuple) else o)
            )
            for t, layer in enumerate(layers, 1)
        ]
        try:
            with torch.no_grad():
                self.model.model(input_ids=ids, attention_mask=mask)
        finally:
            for h in hooks:
                h.remove()
        zero = torch.zeros_like(got[1])
        return torch.stack([zero] + [got[t] for t in range(1, len(layers) + 1)], 1).numpy()

    def taps(self, texts: list[str]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """backbone -> per text (taps float32 (K, L, d), ids (L,))."""
        got = self.forward(texts)
        return {b: [(h[taps], ids) for h, ids in got] for b, taps in BACKBONES.items()}


class BundleTaps:
    """Token taps from exported pivot-none bundles (device runtime, onnxruntime)."""

    def __init__(self, cfg: LmBenchConfig) -> None:
        from fedmobillm.device_runtime.backbone import Backbone
        from fedmobillm.device_runtime.protocol import bundle_digest

        self.backbones = {b: Backbone(lm_bundle(b, cfg), backend="onnx", threads=cfg.threads)
                          for b in BACKBONES}  # fmt: skip
        self.scales = {
            b: np.asarray(bb.manifest.activation_scales, np.float32)
            for b, bb in self.backbones.items()
        }
        self.architecture = {b: bb.manifest.architecture for b, bb in self.backbones.items()}
        self.digest = {b: bundle_digest(bb.manifest) for b, bb in self.backbones.items()}

    def taps(self, texts: list[str]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        from benchmarks._activations import token_taps

        out = {}
        for b, bb in self.backbones.items():
            ids, mask = bb.encode(texts)
            taps = token_taps(bb, texts, 16)
            out[b] = [(t, ids[i, : int(mask[i].sum())]) for i, t in enumerate(taps)]
        return out


class CachedTaps:
    """A taps source (``BundleTaps`` or ``TorchTaps``) built only when a set of lines is not
    in the cache: ``cache_dir()/bench-lm-taps/<source>-<max_len>/`` holds the scales and
    architectures (meta.json) and, per set of lines (sha256 of the lines), the fp32 taps of
    each backbone (npz, no pickle). The cache is keyed by the lines, the source and max_len
    (a cache made by another source is emptied when the source is next built: a set of
    lines already cached is not recomputed, so delete the folder after re-exporting)."""

    def __init__(self, cfg: LmBenchConfig) -> None:
        from fedmobillm.paths import cache_dir

        self.cfg, self._src = cfg, None
        self.dir = cache_dir() / "bench-lm-taps" / f"{cfg.taps_from}-{cfg.max_len}"
        meta = self.dir / "meta.json"
        if not meta.exists():
            self._build()
        m = json.loads(meta.read_text())
        self.scales = {b: np.asarray(v, np.float32) for b, v in m["scales"].items()}
        self.architecture, self.digest = m["architecture"], m["digest"]

    def _build(self) -> Any:
        if self._src is None:
            cfg = self.cfg
            self._src = BundleTaps(cfg) if cfg.taps_from == "bundle" else TorchTaps(cfg)
            meta = {"scales": {b: v.tolist() for b, v in self._src.scales.items()},
                    "architecture": self._src.architecture, "digest": self._src.digest}  # fmt: skip
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "meta.json"
            if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(meta)):
                log.warning("taps cache %s was made by another source: rebuilt", self.dir)
                for f in self.dir.glob("*.npz"):
                    f.unlink()
            path.write_text(json.dumps(meta))
        return self._src

    def taps(self, texts: list[str]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """backbone -> per text (taps float32 (K, L, d), ids (L,)), from the cache if there."""
        import hashlib

        key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:24]
        path = self.dir / f"{key}.npz"
        if path.exists():
            z = np.load(path, allow_pickle=False)
            out = {}
            for b in BACKBONES:
                off = np.concatenate([[0], np.cumsum(z[f"{b}.lengths"])])
                taps, ids = z[f"{b}.taps"], z[f"{b}.ids"]
                out[b] = [(taps[:, off[i] : off[i + 1]], ids[off[i] : off[i + 1]])
                          for i in range(len(off) - 1)]  # fmt: skip
            log.info("taps of %d lines from the cache %s", len(texts), path)
            return out
        out = self._build().taps(texts)
        arrays = {}
        for b, items in out.items():
            arrays[f"{b}.taps"] = np.concatenate([t for t, _ in items], 1).astype(np.float32)
            arrays[f"{b}.ids"] = np.concatenate([i for _, i in items]).astype(np.int64)
            arrays[f"{b}.lengths"] = np.asarray([len(i) for _, i in items], np.int64)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return out


def lm_bundle(backbone: str, cfg: LmBenchConfig) -> Path:
    """The pivot-none bundle of ``backbone`` (cached; int8 unless its check fails)."""
    from benchmarks._activations import BundleSpec, bundle_for

    if backbone == MODEL:
        return bundle_for(BundleSpec(MODEL, 3, "int8", cfg.max_len, pivot="none"))
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle
    from fedmobillm.paths import cache_dir

    out = cache_dir() / "bench-bundles" / f"lm-{MODEL}-l4-8-12-int8"
    if not bundle_is_current(out, MODEL, "none"):
        export_bundle(MODEL, out, layers=BACKBONES[backbone], pivot="none", quant="int8",
                      formats=("onnx",), max_seq_len=cfg.max_len, fallback_quant="fp32")  # fmt: skip
    return out


def encode_lines(
    source: Any, lines: list[str], device: np.ndarray, encoding: str = "fp16"
) -> dict[str, Texts]:
    """backbone -> Texts of ``lines`` as uploaded: ``encoding`` "int8" (per-tap scales of
    the backbone) or "fp16" (float16 as it is; scales 1)."""
    from benchmarks._activations import TokenActivations
    from fedmobillm.device_runtime.serde import quantize_int8

    if encoding not in ("int8", "fp16"):
        raise FedMobiLLMError(f"encoding must be int8 or fp16, not {encoding!r}")
    per = source.taps(lines)
    out = {}
    for b, items in per.items():
        taps = BACKBONES[b]
        if encoding == "int8":
            scales = source.scales[b]
            qs = [quantize_int8(t[None], scales)[0].transpose(1, 0, 2) for t, _ in items]
        else:
            scales = np.ones(len(taps), np.float32)
            qs = [t.transpose(1, 0, 2).astype(np.float16) for t, _ in items]
        acts = TokenActivations(
            q=np.concatenate(qs),
            lengths=np.asarray([q.shape[0] for q in qs], np.int64),
            y=np.zeros(len(items), np.int64),
            index=np.arange(len(items)),
            scales=scales,
            architecture=source.architecture[b],
            taps=list(taps),
            depth=int(taps[-1]),
            hidden=int(items[0][0].shape[-1]),
            bundle_sha256=source.digest[b],
            bits=8 if encoding == "int8" else 16,
        )
        deepest = [t[-1] for t, _ in items]  # (L, d) fp32 each
        out[b] = Texts(acts, [ids for _, ids in items], deepest, device)
    return out


# -- training and evaluation -------------------------------------------------------------------


def group(texts: Texts, rows: np.ndarray, head: Any = None, phone: bool = False) -> Any:
    """An LMGroup of ``rows``; ``phone``: extra["hidden"] = final norm of the fp32 tap."""
    import torch

    from fedmobillm.server.lm import LMGroup

    x, mask = texts.acts.batch(rows)  # (n, K, T, d), (n, T)
    ids = np.zeros(mask.shape, np.int64)
    for j, i in enumerate(rows):
        ids[j, : len(texts.ids[i])] = texts.ids[i]
    g = LMGroup(texts.acts.architecture, x, ids, mask)
    if phone and texts.deepest is not None:
        deep = np.zeros((len(rows), mask.shape[1], x.shape[-1]), np.float32)
        for j, i in enumerate(rows):
            deep[j, : len(texts.deepest[i])] = texts.deepest[i]
        with torch.no_grad():
            g.extra["hidden"] = head.hidden(torch.from_numpy(deep)).numpy()
    return g


def new_trainer(
    cfg: LmBenchConfig, heads: dict[str, Any], data: dict[str, Texts], archs: list[str]
):
    from fedmobillm.server.lm import LMSideTrainer, lm_config

    side = lm_config(width=cfg.width, blocks=cfg.blocks, lr=cfg.lr, ema=cfg.ema,
                     warmup_steps=cfg.warmup, dropout=cfg.dropout,
                     align_lr_scale=cfg.align_lr_scale)  # fmt: skip
    trainer = LMSideTrainer(side, seed=cfg.seed, share_out=bool(cfg.share_out),
                            arch_balance=bool(cfg.arch_balance))  # fmt: skip
    for b in archs:
        a = data[b].acts
        lens = bench_lens(a.depth, heads[b]) if cfg.lens else None
        trainer.add_architecture(a.architecture, a.taps, a.depth, a.hidden, heads[b], MODEL, lens)
    return trainer


_LENSES: dict[int, Any] = {}


def bench_lens(depth: int, head: Any) -> Any:
    """The tuned lens of SmolLM2 truncated after block ``depth`` (None at full depth):
    ``server.lm_lens.lens_for`` on the local model folder, fitted once (cached on disk)."""
    if depth not in _LENSES:
        from fedmobillm.export.models import resolve_model
        from fedmobillm.server.lm_lens import lens_for

        _LENSES[depth] = lens_for(Path(resolve_model(MODEL)), depth, head.norm)
        if _LENSES[depth] is not None:
            log.info("tuned lens for %d blocks: %s", depth, _LENSES[depth].meta)
    return _LENSES[depth]


def train(
    cfg: LmBenchConfig,
    trainer: Any,
    pools: dict[str, tuple[Texts, np.ndarray]],
    batch: dict[str, int],
    on_select: Any = None,
    every: int = 0,
) -> list[float]:
    """``cfg.steps`` steps; each draws ``batch[arch]`` lines of each architecture from its
    pool rows (``Bench.batches``).
    ``on_select(step)`` runs every ``every`` (default ``cfg.select_every``) steps and after
    the last. (``benchmarks._lm_lora.fedmobillm_draws`` repeats these draws.)"""
    every = every or cfg.select_every
    losses = []
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        groups = []
        for b, (texts, rows) in pools.items():
            pick = rng.choice(rows, min(batch[b], len(rows)), replace=False)
            groups.append(group(texts, np.sort(pick)))
        losses.append(trainer.train_step(groups))
        last = step + 1 == cfg.steps
        if on_select is not None and (last or (step + 1) % every == 0):
            on_select(step + 1)
    return losses


class Selected:
    """A trainer's personal models as chosen on validation: ``model(arch, averaged)`` gives
    the kept copy (``evaluate`` reads models through this), ``chosen[arch]`` = (step, val
    perplexity) of each."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.best: dict[str, Any] = {}
        self.chosen: dict[str, tuple[int, float]] = {}

    def offer(self, arch: str, step: int, ppl: float) -> None:
        """Keep ``arch``'s current averaged model if ``ppl`` is its lowest so far."""
        import copy

        if arch not in self.chosen or ppl < self.chosen[arch][1]:
            self.best[arch] = copy.deepcopy(self.trainer.model(arch, averaged=True))
            self.chosen[arch] = (step, ppl)

    def model(self, arch: str, averaged: bool = True) -> Any:
        return self.best[arch]

    def num_parameters(self, arch: str | None = None) -> int:
        return self.trainer.num_parameters(arch)


def evaluate(trainer: Any, texts: Texts, rows: np.ndarray, head: Any, frozen: bool = False,
             phone: bool = True) -> dict[str, float]:  # fmt: skip
    """Perplexity etc. of ``rows`` (length-sorted batches of 16)."""
    import torch

    from fedmobillm.server.lm import NextTokenStats, scored_logits

    stats = NextTokenStats()
    order = rows[np.argsort(texts.acts.lengths[rows], kind="stable")]
    arch = texts.acts.architecture
    personal = None if frozen else trainer.model(arch, averaged=True).eval()
    for s in range(0, len(order), 16):
        g = group(texts, order[s : s + 16], head, phone)
        x, mask = torch.from_numpy(g.x), torch.from_numpy(g.mask)
        hid = g.extra.get("hidden")
        hidden = None if hid is None else torch.from_numpy(hid)
        with torch.no_grad():
            scored_logits(stats, personal, head, x, torch.from_numpy(g.ids), mask, None, hidden)
    return stats.to_dict()


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split of the fleet's lines: backbone -> Texts, and each line's device."""

    texts: dict[str, Texts]
    device: np.ndarray
    lines: list[str] = field(default_factory=list)  # the text of each line, in order


def splits(cfg: LmBenchConfig, devices: list[Any], val: list[list[Any]],
           names: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Split]:  # fmt: skip
    """The splits ``names`` of "train", "val", "test" (held-out episodes) through every
    backbone, as uploaded (``benchmarks._lm_tune`` never computes the test split's taps)."""
    source = CachedTaps(cfg)
    out = {}
    every = {"train": [d.train for d in devices], "val": val,
             "test": [d.heldout for d in devices]}  # fmt: skip
    for name, per in ((n, every[n]) for n in names):
        lines = [r.text for recs in per for r in recs]
        dev = np.asarray([i for i, recs in enumerate(per) for _ in recs], np.int64)
        out[name] = Split(encode_lines(source, lines, dev, cfg.encoding), dev, lines)
        _check_finite(out[name], name)
    return out


def _check_finite(split: Split, name: str) -> None:
    for b, t in split.texts.items():
        if not np.isfinite(t.acts.q.astype(np.float32)).all():
            raise FedMobiLLMError(f"{name} taps of {b} overflow {t.acts.q.dtype}",
                                  hint="upload int8 (--encoding int8) for this model")  # fmt: skip


def run(cfg: LmBenchConfig, out: Path, command: str = "") -> dict[str, Any]:
    """Every method's rows; with fedavg-lora (the longest part) and a ``command``, the
    report of everything before it is written first to ``out/before-fedavg-lora/``."""
    import torch

    from fedmobillm.server.lm import FrozenLMHead

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    devices, val = fleet(cfg)
    arch_of = {i: list(BACKBONES)[i % 2] for i in range(len(devices))}  # alternate
    data = splits(cfg, devices, val)
    tr = data["train"].texts
    train_dev, held_dev = data["train"].device, data["test"].device
    t_extract = time.perf_counter() - t0
    log.info("taps of %d + %d + %d lines in %.0f s", len(train_dev), len(data["val"].device),
             len(held_dev), t_extract)  # fmt: skip
    head = FrozenLMHead.from_model(MODEL)
    rows: list[dict[str, Any]] = []
    timing: dict[str, float] = {"extract_s": t_extract}
    bench = Bench(cfg, data, arch_of, head)
    for b in BACKBONES:  # frozen: as the phone scores (fp32 hidden) and as the server sees it
        row = bench.row("frozen", b, None)
        row["perplexity_server_hidden"] = bench.score(None, "test", b, phone=False)["perplexity"]
        rows.append(row)
        lens = bench_lens(BACKBONES[b][-1], head) if cfg.lens else None
        if lens is not None:  # the truncated backbone through its tuned lens (step 0)
            start = new_trainer(cfg, dict.fromkeys(BACKBONES, head), tr, [b])
            rows.append(bench.row("frozen-tuned-lens", b, start, lens=lens.meta))
    t = time.perf_counter()
    fed, losses = bench.fit(list(BACKBONES), "fleet", cfg.batch_lines)
    timing["fedmobillm_s"] = time.perf_counter() - t
    for b in BACKBONES:
        row = bench.row("fedmobillm", b, fed, train_loss_first=float(np.mean(losses[:5])),
                        train_loss_last=float(np.mean(losses[-10:])))  # fmt: skip
        if isinstance(fed, Selected):
            row["chosen_step"] = fed.chosen[tr[b].acts.architecture][0]
        row["side_params"] = fed.num_parameters()
        row["personal_params"] = fed.num_parameters(tr[b].acts.architecture)
        rows.append(row)
    for b in cfg.centralised:
        t = time.perf_counter()
        cen, _ = bench.fit([b], "all", cfg.batch_lines * 2)
        timing[f"centralised_{b}_s"] = time.perf_counter() - t
        rows.append(
            bench.row("centralised", b, cen, data="all devices' text through this backbone")
        )
    if cfg.local:
        t = time.perf_counter()
        rows += bench.local_rows()
        timing["local_s"] = time.perf_counter() - t
    extra: dict[str, Any] = {"fedmobillm_curve": bench.curve}
    if cfg.compression:
        from benchmarks._lm_compress import compression_rows

        t = time.perf_counter()
        same = next((r for r in rows if r["method"] == "centralised" and r["backbone"] == MODEL),
                    None)  # fmt: skip
        extra["compression"] = compression_rows(cfg, data, arch_of, head, cfg.compression, same)
        timing["compression_s"] = time.perf_counter() - t

    def result() -> dict[str, Any]:
        timing["total_s"] = time.perf_counter() - t0
        return {"config": asdict(cfg), "rows": list(rows), "timing": dict(timing),
                "devices": [{**d.summary(), "val": len(v), "backbone": arch_of[i]}
                            for i, (d, v) in enumerate(zip(devices, val, strict=True))],
                "targets": targets(rows), "machine": _machine(), "fedmobillm_losses": losses,
                **extra}  # fmt: skip

    if cfg.fedavg_lora:
        if command:
            part = result() | {"partial": "written before fedavg-lora ran"}
            write_report(part, out / "before-fedavg-lora", command + " (before fedavg-lora)")
        t = time.perf_counter()
        lora_row, got = fedavg_lora(cfg, bench, rows, fed)
        rows.append(lora_row)
        extra |= got
        timing["fedavg_lora_s"] = time.perf_counter() - t
    return result()


def fedavg_lora(cfg: LmBenchConfig, bench: Bench, rows: list[dict], fed: Any) -> tuple[dict, dict]:
    """The fedavg-lora row and the device-cost comparison (``benchmarks._lm_lora``) on the
    bench's own lines; fedmobillm's side from its full-decoder curve and rows."""
    from benchmarks._lm_lora import BenchInputs, Lines, LoraFedConfig, bench_fedavg_lora

    d = bench.data
    lines = {s: Lines(d[s].texts[MODEL].ids, d[s].device) for s in ("train", "val", "test")}
    row = {r["method"]: r for r in rows if r["backbone"] == MODEL}
    curve = [p for p in bench.curve if p["backbone"] == MODEL]
    if not curve:  # no validation curve logged: the final model only
        curve = [{"step": cfg.steps, "val_perplexity": row["fedmobillm"]["val_perplexity"]}]
    sweep = []
    for spec in cfg.lora_sweep:
        try:
            r, t, lr = spec.split(":")
            sweep.append((int(r), t, float(lr)))
        except ValueError:
            raise FedMobiLLMError(f"--lora-sweep {spec!r} is not RANK:TARGETS:LR",
                                  hint="e.g. 8:qv:2e-3 (targets qv or attn)") from None  # fmt: skip
    inp = BenchInputs(
        lines["train"], lines["val"], lines["test"],
        [i for i, a in bench.arch_of.items() if a == MODEL],
        [bench.rows_of("train", b) for b in BACKBONES], list(BACKBONES).index(MODEL), curve,
        row["frozen"]["val_perplexity"], row["fedmobillm"]["bytes_per_token"] + 9.0,
        4 * fed.num_parameters(d["train"].texts[MODEL].acts.architecture),
        cfg.steps, cfg.batch_lines, cfg.seed, MODEL, BACKBONES[MODEL][-1],
        list(bench.batches(list(BACKBONES), "fleet", cfg.batch_lines).values()),
    )  # fmt: skip
    lcfg = LoraFedConfig(sweep=sweep, clients=cfg.lora_clients, local_steps=cfg.lora_local_steps,
                         batch_lines=cfg.batch_lines, budget_fraction=cfg.lora_budget,
                         seed=cfg.seed, threads=cfg.threads)  # fmt: skip
    return bench_fedavg_lora(inp, lcfg)


class Bench:
    """Training and scoring on the prepared splits: ``fit`` a side network on a pool of
    training lines, ``score`` it on a split's lines of one backbone as the phone scores."""

    def __init__(self, cfg: LmBenchConfig, data: dict[str, Split], arch_of: dict[int, str],
                 head: Any) -> None:  # fmt: skip
        self.cfg, self.data, self.arch_of, self.head = cfg, data, arch_of, head
        self.curve: list[dict[str, Any]] = []  # fedmobillm's validation perplexity per step

    def rows_of(self, split: str, b: str, device: int | None = None) -> np.ndarray:
        """Line indices of ``split`` on backbone ``b``'s devices (or on ``device`` only)."""
        dev = self.data[split].device
        if device is not None:
            return np.flatnonzero(dev == device)
        return np.flatnonzero(np.isin(dev, [i for i, a in self.arch_of.items() if a == b]))

    def fit(self, archs: list[str], pool: str | int, batch: Any) -> tuple[Any, list[float]]:
        """A trainer on ``archs``' training lines: pool "fleet" (each backbone its own
        devices' lines), "all" (every device's lines) or a device index (its lines)."""
        tr = self.data["train"].texts
        trainer = new_trainer(self.cfg, dict.fromkeys(BACKBONES, self.head), tr, archs)
        pools = {}
        for b in archs:
            if pool == "all":
                rows = np.arange(len(self.data["train"].device))
            else:
                rows = self.rows_of("train", b, None if pool == "fleet" else int(pool))
            pools[b] = (tr[b], rows)
        batch = self.batches(archs, pool, batch)
        every = self.cfg.select_every or (self.cfg.curve_every if pool == "fleet" else 0)
        if not every or not len(self.data["val"].device):
            return trainer, train(self.cfg, trainer, pools, batch)
        chosen = Selected(trainer)
        device = None if pool in ("fleet", "all") else int(pool)

        def select(step: int) -> None:
            for b in archs:
                a = tr[b].acts.architecture
                ppl = self.score(trainer, "val", b, device=device)["perplexity"]
                if pool == "fleet":  # fedmobillm's curve (fedavg-lora's device cost)
                    self.curve.append({"step": step, "backbone": b, "val_perplexity": ppl})
                if self.cfg.select_every:
                    chosen.offer(a, step, ppl)

        losses = train(self.cfg, trainer, pools, batch, select, every)
        if not self.cfg.select_every:
            return trainer, losses
        log.info("chosen on validation (step, perplexity): %s", chosen.chosen)
        return chosen, losses

    def batches(self, archs: list[str], pool: str | int, batch: int) -> dict[str, int]:
        """Lines a step per architecture (``server.lm_batch``, the server's rule): ``batch``,
        or ``cfg.full_batch_lines`` for the full backbone in the fleet (``pool`` "fleet")."""
        from fedmobillm.server.lm_batch import arch_batches

        full = self.cfg.full_batch_lines
        return arch_batches(archs, batch, {MODEL: full} if pool == "fleet" and full else None)

    def score(self, trainer: Any, split: str, b: str, phone: bool = True,
              device: int | None = None) -> dict[str, float]:  # fmt: skip
        rows = self.rows_of(split, b, device)
        return evaluate(trainer, self.data[split].texts[b], rows, self.head, trainer is None, phone)

    def row(self, method: str, b: str, trainer: Any, **extra: Any) -> dict[str, Any]:
        """The test row of ``method`` on ``b`` with its validation perplexity beside it."""
        r = self.score(trainer, "test", b)
        row = {"method": method, "backbone": b, **r, **extra, **_bytes(self.data["test"].texts[b])}
        if len(self.data["val"].device):
            row["val_perplexity"] = self.score(trainer, "val", b)["perplexity"]
        log.info("%-12s %-18s ppl %.2f top1 %.3f (validation %.2f)", method, b, r["perplexity"],
                 r["next_token_top1"], row.get("val_perplexity", math.nan))  # fmt: skip
        return row

    def local_rows(self) -> list[dict[str, Any]]:
        """One side network per device on its own lines, pooled per backbone."""
        from fedmobillm.server.lm import NextTokenStats

        test: dict[str, list] = {b: [] for b in BACKBONES}
        val: dict[str, list] = {b: [] for b in BACKBONES}
        for i, b in self.arch_of.items():
            trainer, _ = self.fit([b], i, self.cfg.batch_lines)
            for split, acc in (("test", test), ("val", val)):
                if not len(self.rows_of(split, b, i)):
                    continue
                r = self.score(trainer, split, b, device=i)
                acc[b].append(NextTokenStats(r["nll_per_token"] * r["tokens"], r["tokens"],
                              round(r["next_token_top1"] * r["tokens"]),
                              round(r["next_token_top3"] * r["tokens"])))  # fmt: skip
        out = []
        for b in BACKBONES:
            row = {"method": "local", "backbone": b, **_pool_stats(test[b]),
                   **_bytes(self.data["test"].texts[b])}  # fmt: skip
            if val[b]:
                row["val_perplexity"] = _pool_stats(val[b])["perplexity"]
            log.info("%-12s %-18s ppl %.2f", "local", b, row["perplexity"])
            out.append(row)
        return out


def _pool_stats(stats: list[Any]) -> dict[str, float]:
    from fedmobillm.server.lm import NextTokenStats

    total = NextTokenStats()
    for s in stats:
        total.nll += s.nll
        total.tokens += s.tokens
        total.top1 += s.top1
        total.top3 += s.top3
    return total.to_dict()


def _bytes(texts: Texts) -> dict[str, float]:
    """Upload bytes per token: K * d * bits / 8 of the encoding (+ 8 bytes of token id and
    1 of loss mask, counted apart), and K * d at int8 and K * d / 2 at int4 for reference."""
    k, d = texts.acts.q.shape[1], texts.acts.q.shape[2]
    return {"bytes_per_token": float(k * d * texts.acts.bits / 8),
            "encoding": "int8" if texts.acts.bits == 8 else "fp16",
            "bytes_per_token_int8": float(k * d), "bytes_per_token_int4": float(k * d / 2),
            "id_bytes_per_token": 9.0,
            "mean_tokens": float(np.mean(texts.acts.lengths))}  # fmt: skip


def targets(rows: list[dict]) -> dict[str, Any]:
    """Issue 16's targets on the full backbone: fedmobillm >= 20% below frozen, below
    local, within 5% of centralised."""
    ppl = {(r["method"], r["backbone"]): r["perplexity"] for r in rows}
    b = MODEL
    fed, fro = ppl.get(("fedmobillm", b)), ppl.get(("frozen", b))
    loc, cen = ppl.get(("local", b)), ppl.get(("centralised", b))
    out: dict[str, Any] = {}
    if fed and fro:
        drop = 1 - fed / fro
        out["below_frozen_20pct"] = {"met": drop >= 0.2, "reduction": drop}
    if fed and loc:
        out["below_local"] = {"met": fed < loc, "ratio": fed / loc}
    if fed and cen:
        out["within_5pct_of_centralised"] = {"met": fed <= 1.05 * cen, "ratio": fed / cen}
    small = ppl.get(("fedmobillm", "smollm2-135m-l12"))
    if small and fro:
        out["l12_personal_vs_full_frozen"] = {"ratio": small / fro}
    lens = ppl.get(("frozen-tuned-lens", "smollm2-135m-l12"))
    if lens and fro:
        out["l12_tuned_lens_vs_full_frozen"] = {"ratio": lens / fro}
    return out


def _machine() -> dict[str, Any]:
    return {
        "load_avg": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


# -- report ----------------------------------------------------------------------------------------


def write_report(result: dict[str, Any], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.json").write_text(json.dumps(result, indent=1, default=float))
    lines = [
        "# lm benchmark (issue 16)", "",
        f"Command: `{command}`; taps from {result['config']['taps_from']}, uploaded as "
        f"{result['config'].get('encoding', 'int8')}; load average at the "
        f"end {', '.join(f'{x:.1f}' for x in result['machine']['load_avg'])} on "
        f"{result['machine']['cpus']} CPUs; {result['timing']['total_s']:.0f} s.", "",
        "| method | backbone | perplexity | top-1 | top-3 | tokens | bytes/token | "
        "validation perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['backbone']} | {r['perplexity']:.2f} | "
            f"{r['next_token_top1']:.3f} | {r['next_token_top3']:.3f} | {r['tokens']} | "
            f"{r['bytes_per_token']:.0f} | {r.get('val_perplexity', math.nan):.2f} |"
        )
    for r in result["rows"]:
        if "perplexity_server_hidden" in r:
            lines.append(f"\nfrozen {r['backbone']}: {r['perplexity']:.2f} with the phone's fp32 "
                         f"hidden, {r['perplexity_server_hidden']:.2f} with the hidden the server "
                         "computes from the uploaded taps.")  # fmt: skip
    for r in result["rows"]:
        if r["method"] == "frozen-tuned-lens":
            m = r.get("lens", {})
            lines.append(f"\nfrozen-tuned-lens {r['backbone']}: the truncated model read through "
                         "an affine map to the full model's last block, fitted by ridge on "
                         f"public text ({', '.join(m.get('corpora', []))}; {m.get('rows')} "
                         f"tokens, ridge {m.get('ridge')}, held-out R^2 "
                         f"{m.get('heldout_r2', math.nan):.3f}): its personal model's start "
                         "(the frozen row is the logit lens).")  # fmt: skip
    if result.get("compression"):
        from benchmarks._lm_compress import markdown as compression_markdown

        lines += ["", *compression_markdown(result["compression"])]
    lines += [
        "",
        *_lora_lines(result),
        "",
        "## Targets (full SmolLM2)",
        "",
    ]
    for name, t in result["targets"].items():
        lines.append(f"- {name}: {json.dumps(t)}")
    (out / "lm.md").write_text("\n".join(lines) + "\n")
    _plot(result, out / "lm.png")
    if result.get("compression"):
        from benchmarks._lm_compress import plot as plot_compression

        frozen = next((r for r in result["rows"]
                       if r["method"] == "frozen" and r["backbone"] == MODEL), {})  # fmt: skip
        plot_compression(result["compression"], frozen, out / "lm_compression.png")
    if "device_cost" in result:
        from benchmarks._lm_lora import plot_cost

        plot_cost(result["device_cost"], out / "lm_cost.png")


def _lora_lines(result: dict[str, Any]) -> list[str]:
    if "partial" in result:
        return [f"fedavg-lora: this report was {result['partial']}."]
    if "device_cost" not in result:
        return ["fedavg-lora: not run yet (--no-fedavg-lora)."]
    from benchmarks._lm_lora import markdown

    return markdown(result)


def plotted_methods(rows: list[dict[str, Any]], order: list[str]) -> list[str]:
    """The methods of ``order`` that have a row (a method not run, e.g. fedavg-lora with
    --no-fedavg-lora, gets no empty group on the plot), then any others in row order."""
    ran = list(dict.fromkeys(r["method"] for r in rows))
    return [m for m in order if m in ran] + [m for m in ran if m not in order]


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["frozen", "frozen-tuned-lens", "local", "fedmobillm", "centralised", "fedavg-lora"]
    methods = plotted_methods(result["rows"], order)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j, b in enumerate(BACKBONES):
        vals = [next((r["perplexity"] for r in result["rows"]
                      if r["method"] == m and r["backbone"] == b), math.nan) for m in methods]  # fmt: skip
        ax.bar(np.arange(len(methods)) + 0.4 * j, vals, 0.4, label=b)
    ax.set_xticks(np.arange(len(methods)) + 0.2, methods)
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("friends, one device per speaker")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_lm", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--taps-from", choices=("bundle", "torch"), default="bundle")
    p.add_argument("--encoding", choices=("fp16", "int8"), default="fp16",
                   help="how devices upload taps (lm devices upload fp16 by default)")  # fmt: skip
    for name, kind in (("steps", int), ("devices", int), ("train-lines", int), ("lr", float),
                       ("width", int), ("warmup", int), ("ema", float), ("dropout", float),
                       ("batch-lines", int), ("select-every", int),
                       ("heldout-lines", int), ("share-out", int), ("arch-balance", int),
                       ("full-batch-lines", int), ("align-lr-scale", float)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, help="overrides the (--quick) setting")
    p.add_argument("--centralised", nargs="+", choices=list(BACKBONES),
                   help="backbones the centralised method runs on (default: both)")  # fmt: skip
    p.add_argument("--no-centralised", action="store_true", help="skip the centralised rows")
    p.add_argument("--no-local", action="store_true", help="skip the local rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fedavg-lora", action="store_true", help="skip the fedavg-lora baseline")
    p.add_argument("--compression", metavar="OPT,OPT,...",
                   help="upload compression options measured for their perplexity cost "
                   "(centralised, full backbone): none, int8, taps-N, int4, pca-R, joined "
                   "with + (benchmarks._lm_compress); default: not run")  # fmt: skip
    p.add_argument("--no-lens", action="store_true",
                   help="the 12-block backbone starts at the logit lens, not its tuned lens")  # fmt: skip
    p.add_argument(
        "--lora-sweep",
        nargs="+",
        metavar="RANK:TARGETS:LR",
        help="fedavg-lora settings tried (targets qv or attn), chosen on validation",
    )
    p.add_argument("--lora-budget", type=float,
                   help="fedavg-lora's training tokens as a fraction of those fedmobillm's "
                   "steps drew for the full decoder (--quick: 0.25; 1: the same budget)")  # fmt: skip
    p.add_argument(
        "--curve-every",
        type=int,
        help="log fedmobillm's validation perplexity every N steps (default 10)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = LmBenchConfig.quick() if a.quick else LmBenchConfig()
    cfg.taps_from, cfg.threads, cfg.encoding = a.taps_from, a.threads, a.encoding
    for name in ("steps", "devices", "train_lines", "lr", "width", "warmup", "ema", "dropout",
                 "batch_lines", "select_every", "heldout_lines", "share_out", "arch_balance",
                 "full_batch_lines", "align_lr_scale"):  # fmt: skip
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if a.centralised and a.no_centralised:
        p.error("--centralised and --no-centralised contradict: give one")
    if a.centralised or a.no_centralised:
        cfg.centralised = list(a.centralised or [])
    cfg.local = 0 if a.no_local else 1
    cfg.fedavg_lora = not a.no_fedavg_lora
    if a.compression:
        from benchmarks._lm_compress import parse

        cfg.compression = [o.strip() for o in a.compression.split(",") if o.strip()]
        for o in cfg.compression:  # refused before the run, not after an hour
            try:
                parse(o)
            except FedMobiLLMError as exc:
                p.error(f"--compression: {exc}")
    cfg.lens = 0 if a.no_lens else 1
    if a.lora_sweep:
        cfg.lora_sweep = list(a.lora_sweep)
    if a.curve_every is not None:
        cfg.curve_every = a.curve_every
    if a.lora_budget is not None:
        cfg.lora_budget = a.lora_budget
    command = "python -m benchmarks.bench_lm " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(cfg, a.out, command)
    write_report(result, a.out, command)
    print((a.out / "lm.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
