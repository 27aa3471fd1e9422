"""The lm task (issue 16): held-out next-token perplexity of personal language models.

``python -m benchmarks.bench_lm [--quick] --out DIR [--taps-from bundle|torch]`` writes
``lm.json`` (``{"rows": [{"method", "backbone", "perplexity", "next_token_top1",
"next_token_top3", "bytes_per_token", ...}]}``), ``lm.md`` and ``lm.png``.

Data: the friends transcripts, one device per speaker (the most prolific ``devices``),
each with its own held-out episodes (``fedmobillm.data.lm.lm_devices``); plain text, every
token after the first scored. Fleet: SmolLM2-135M with taps [10, 20, 30] of 30 blocks
(``smollm2-135m``) and a 12-block truncation with taps [4, 8, 12] (``smollm2-135m-l12``),
devices alternating between them. Each device's token taps are int8 per tap with the
bundle's scales, as uploaded; the server trains on their dequantised values and computes
``hidden`` as the final norm of the deepest (int8) tap. Held-out text is scored as the phone
scores it: ``hidden`` is the fp32 final-norm output of the deepest block, the personal
model reads the int8 round-tripped taps, logits = frozen head(hidden + delta).

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
- ``fedavg-lora``: not run yet (listed in lm.md as such).
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
    max_len: int = 64
    seed: int = 0
    taps_from: str = "bundle"
    threads: int = 2
    centralised: list[str] = field(default_factory=lambda: list(BACKBONES))

    @classmethod
    def quick(cls) -> LmBenchConfig:
        return cls(devices=4, train_lines=64, heldout_lines=24, steps=40, batch_lines=8)


@dataclass
class Texts:
    """One backbone's token taps of a set of lines: int8 (sum L, K, d) + lengths, ids, the
    fp32 deepest tap of each line (for the phone's hidden) and the owning device."""

    acts: Any  # benchmarks._activations.TokenActivations
    ids: list[np.ndarray]
    deepest: list[np.ndarray] | None
    device: np.ndarray


# -- data ------------------------------------------------------------------------------------


def fleet(cfg: LmBenchConfig) -> list[Any]:
    """Devices (speakers) with their first ``train_lines`` / ``heldout_lines`` lines."""
    from fedmobillm.data.lm import lm_devices, load_lm_corpus

    devices = lm_devices(load_lm_corpus("friends").records, num_devices=cfg.devices, seed=cfg.seed)
    for d in devices:
        d.train, d.heldout = d.train[: cfg.train_lines], d.heldout[: cfg.heldout_lines]
    return devices


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


def encode_lines(source: Any, lines: list[str], device: np.ndarray) -> dict[str, Texts]:
    """backbone -> Texts of ``lines`` (int8 with the backbone's scales, as uploaded)."""
    from benchmarks._activations import TokenActivations
    from fedmobillm.device_runtime.serde import quantize_int8

    per = source.taps(lines)
    out = {}
    for b, items in per.items():
        taps = BACKBONES[b]
        qs = [quantize_int8(t[None], source.scales[b])[0].transpose(1, 0, 2) for t, _ in items]
        acts = TokenActivations(
            q=np.concatenate(qs),
            lengths=np.asarray([q.shape[0] for q in qs], np.int64),
            y=np.zeros(len(items), np.int64),
            index=np.arange(len(items)),
            scales=source.scales[b],
            architecture=source.architecture[b],
            taps=list(taps),
            depth=int(taps[-1]),
            hidden=int(items[0][0].shape[-1]),
            bundle_sha256=source.digest[b],
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

    trainer = LMSideTrainer(
        lm_config(width=cfg.width, blocks=cfg.blocks, lr=cfg.lr, ema=0.95), seed=cfg.seed
    )
    for b in archs:
        a = data[b].acts
        trainer.add_architecture(a.architecture, a.taps, a.depth, a.hidden, heads[b], MODEL)
    return trainer


def train(
    cfg: LmBenchConfig, trainer: Any, pools: dict[str, tuple[Texts, np.ndarray]], batch: int
) -> list[float]:
    """``cfg.steps`` steps; each draws ``batch`` lines per architecture from its pool rows."""
    losses = []
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        groups = []
        for texts, rows in pools.values():
            pick = rng.choice(rows, min(batch, len(rows)), replace=False)
            groups.append(group(texts, np.sort(pick)))
        losses.append(trainer.train_step(groups))
    return losses


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


def run(cfg: LmBenchConfig, out: Path) -> dict[str, Any]:
    import torch

    from fedmobillm.server.lm import FrozenLMHead

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    devices = fleet(cfg)
    arch_of = {i: list(BACKBONES)[i % 2] for i in range(len(devices))}  # alternate
    source = BundleTaps(cfg) if cfg.taps_from == "bundle" else TorchTaps(cfg)
    t_source = time.perf_counter() - t0
    train_lines = [r.text for d in devices for r in d.train]
    train_dev = np.asarray([i for i, d in enumerate(devices) for _ in d.train])
    held_lines = [r.text for d in devices for r in d.heldout]
    held_dev = np.asarray([i for i, d in enumerate(devices) for _ in d.heldout])
    tr, he = (
        encode_lines(source, train_lines, train_dev),
        encode_lines(source, held_lines, held_dev),
    )
    t_extract = time.perf_counter() - t0 - t_source
    log.info("taps of %d + %d lines in %.0f s", len(train_lines), len(held_lines), t_extract)
    head = FrozenLMHead.from_model(MODEL)
    heads = dict.fromkeys(BACKBONES, head)
    rows: list[dict[str, Any]] = []
    timing: dict[str, float] = {"source_s": t_source, "extract_s": t_extract}

    def held_rows(b: str) -> np.ndarray:
        return np.flatnonzero(np.isin(held_dev, [i for i, a in arch_of.items() if a == b]))

    def add(method: str, b: str, trainer: Any, rows_b: np.ndarray, **extra: Any) -> dict:
        r = evaluate(trainer, he[b], rows_b, head, frozen=trainer is None)
        row = {"method": method, "backbone": b, **r, **extra}
        row.update(_bytes(he[b]))
        rows.append(row)
        log.info("%-12s %-18s ppl %.2f top1 %.3f", method, b, r["perplexity"], r["next_token_top1"])
        return row

    for b in BACKBONES:  # frozen, scored as the phone scores (fp32 hidden) and from int8 taps
        row = add("frozen", b, None, held_rows(b))
        row["perplexity_int8_hidden"] = evaluate(None, he[b], held_rows(b), head, True, False)[
            "perplexity"
        ]
        row["perplexity_all_devices"] = evaluate(None, he[b], np.arange(len(held_dev)), head, True)[
            "perplexity"
        ]
    t = time.perf_counter()
    fed = new_trainer(cfg, heads, tr, list(BACKBONES))
    pools = {b: (tr[b], np.flatnonzero(np.isin(train_dev, [i for i, a in arch_of.items() if a == b])))
             for b in BACKBONES}  # fmt: skip
    losses = train(cfg, fed, pools, cfg.batch_lines)
    timing["fedmobillm_s"] = time.perf_counter() - t
    for b in BACKBONES:
        row = add("fedmobillm", b, fed, held_rows(b), train_loss_last=float(np.mean(losses[-10:])))
        row["perplexity_all_devices"] = evaluate(fed, he[b], np.arange(len(held_dev)), head)[
            "perplexity"
        ]
        row["side_params"] = fed.num_parameters()
        row["personal_params"] = fed.num_parameters(tr[b].acts.architecture)
    for b in cfg.centralised:
        t = time.perf_counter()
        cen = new_trainer(cfg, heads, tr, [b])
        train(cfg, cen, {b: (tr[b], np.arange(len(train_dev)))}, cfg.batch_lines * 2)
        timing[f"centralised_{b}_s"] = time.perf_counter() - t
        add("centralised", b, cen, held_rows(b), data="all devices' text through this backbone")
    local = _local(cfg, heads, tr, he, devices, arch_of, train_dev, held_dev, timing)
    for b in BACKBONES:
        add_local = _pool_stats([s for i, s in local.items() if arch_of[i] == b])
        row = {"method": "local", "backbone": b, **add_local, **_bytes(he[b])}
        rows.append(row)
        log.info("%-12s %-18s ppl %.2f", "local", b, row["perplexity"])
    timing["total_s"] = time.perf_counter() - t0
    result = {"config": asdict(cfg), "rows": rows, "timing": timing,
              "devices": [{**d.summary(), "backbone": arch_of[i]} for i, d in enumerate(devices)],
              "targets": targets(rows), "machine": _machine(), "fedmobillm_losses": losses}  # fmt: skip
    return result


def _local(cfg, heads, tr, he, devices, arch_of, train_dev, held_dev, timing) -> dict[int, dict]:
    """One side network per device on its own lines; raw sums per device for pooling."""
    from fedmobillm.server.lm import NextTokenStats

    t = time.perf_counter()
    out = {}
    for i in range(len(devices)):
        b = arch_of[i]
        trainer = new_trainer(cfg, heads, tr, [b])
        train(cfg, trainer, {b: (tr[b], np.flatnonzero(train_dev == i))}, cfg.batch_lines)
        r = evaluate(trainer, he[b], np.flatnonzero(held_dev == i), heads[b])
        s = NextTokenStats(r["nll_per_token"] * r["tokens"], r["tokens"],
                           round(r["next_token_top1"] * r["tokens"]), round(r["next_token_top3"] * r["tokens"]))  # fmt: skip
        out[i] = s
    timing["local_s"] = time.perf_counter() - t
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
    """Upload bytes per token: K * d at int8 (and what int4 would be: half; not measured)."""
    k, d = texts.acts.q.shape[1], texts.acts.q.shape[2]
    return {"bytes_per_token": float(k * d), "bytes_per_token_int4": float(k * d / 2),
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
        f"Command: `{command}`; taps from {result['config']['taps_from']}; load average at the "
        f"end {', '.join(f'{x:.1f}' for x in result['machine']['load_avg'])} on "
        f"{result['machine']['cpus']} CPUs; {result['timing']['total_s']:.0f} s.", "",
        "| method | backbone | perplexity | top-1 | top-3 | tokens | bytes/token (int8) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['backbone']} | {r['perplexity']:.2f} | "
            f"{r['next_token_top1']:.3f} | {r['next_token_top3']:.3f} | {r['tokens']} | "
            f"{r['bytes_per_token']:.0f} |"
        )
    lines += ["", "fedavg-lora: not run yet.", "", "## Targets (full SmolLM2)", ""]
    for name, t in result["targets"].items():
        lines.append(f"- {name}: {json.dumps(t)}")
    (out / "lm.md").write_text("\n".join(lines) + "\n")
    _plot(result, out / "lm.png")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["frozen", "local", "fedmobillm", "centralised"]
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
    p.add_argument("--steps", type=int)
    p.add_argument("--devices", type=int)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = LmBenchConfig.quick() if a.quick else LmBenchConfig()
    cfg.taps_from, cfg.threads = a.taps_from, a.threads
    if a.steps:
        cfg.steps = a.steps
    if a.devices:
        cfg.devices = a.devices
    result = run(cfg, a.out)
    write_report(
        result,
        a.out,
        "python -m benchmarks.bench_lm " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print((a.out / "lm.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
