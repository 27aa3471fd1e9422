"""Upload compression for the lm task (issue 16, with issue 15's options): bytes per token
against the K x d int8 limit, and each option's perplexity cost.

``python -m benchmarks.bench_lm --quick ... --compression none,int8,taps-2,int4,pca-64`` trains,
for every option, the **centralised** side network on the full SmolLM2 backbone (all
devices' lines pooled, the bench's ``centralised`` method: one architecture, the cheapest
run that sees every device's text) on the taps as a device using that option would upload
them, keeps its best checkpoint on the validation lines (``--select-every``) and scores the
validation and test lines as the phone scores them (fp32 hidden of the deepest block + delta
of the taps as uploaded). Nothing is chosen on test.

Options (``+`` composes, left to right; the issue's names in brackets):

- ``none`` (``fp16``): the lm default upload, float16 taps (K x d x 2 bytes a token);
- ``int8``: int8 per tap with the export's scales (``encode_lines``), the classify upload;
- ``taps-N``, ``int4``, ``pca-R`` (``proj-R``): ``benchmarks._compress``'s options (issue 15),
  applied to the fp16 taps (``int8+...`` applies them to the int8 taps); fitted on the train
  split. ``pca-R`` sends R int8 values per tap and token; the server, which holds the fixed
  per-architecture projection, trains on the reconstruction mean + z W^T (d wide): the lm
  loss needs the deepest tap at full width for the frozen head's input, and the side
  network sees the same information either way (the reconstruction is a fixed linear map
  of z);
- ``seg-S`` (segment pooling) is refused: the lm loss predicts every next token from that
  position's hidden state; pooled segments carry no per-token state to train or score.

Bytes per token: K x d' x bits / 8 of the taps as uploaded (``bytes_per_token``), beside
the 9 bytes of token id and loss mask, and its ratio to K x d (the T x K x d int8 limit of
issue 15, per token).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.lm")

BASES = {"none": "fp16", "fp16": "fp16", "int8": "int8"}
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Plan:
    """A parsed option: the upload encoding it starts from and issue 15's steps after it."""

    name: str
    base: str
    steps: list[str]


def parse(name: str) -> Plan:
    """``none`` / ``int8+taps-2`` / ``pca-64+int4`` ... -> Plan; bad options refused by name."""
    from benchmarks._compress import Option

    parts = [p.strip() for p in name.split("+") if p.strip()]
    if not parts:
        raise FedMobiLLMError(f"empty compression option {name!r}")
    base = "fp16"
    if parts[0] in BASES:
        base = BASES[parts.pop(0)]
    steps, seen_pca = [], False
    for p in parts:
        p = "pca" + p[4:] if p.startswith("proj-") else p
        kind = Option(p).kind
        if kind in BASES:
            raise FedMobiLLMError(f"{name!r}: {p} must come first (it is the upload encoding)")
        if kind == "seg":
            raise FedMobiLLMError(
                f"{name!r}: segment pooling does not apply to the lm task",
                hint="the lm loss predicts each next token from that position's hidden state; "
                "pooled segments have none (use taps-N, int4, pca-R, int8)",
            )
        if kind not in ("tokens", "taps", "int4", "pca"):
            raise FedMobiLLMError(f"unknown compression option {p!r} in {name!r}",
                                  hint="none, int8, taps-N, int4, pca-R, joined with +")  # fmt: skip
        if kind == "taps" and seen_pca:
            raise FedMobiLLMError(f"{name!r}: put taps-N before pca-R")
        Option(p).value  # noqa: B018  (refuses a bad number by name)
        seen_pca |= kind == "pca"
        steps.append(p)
    return Plan(name, base, steps)


def reconstruct(acts: Any, pca: Any) -> Any:
    """Projected taps (sum L, K, R) as uploaded -> the server's d-wide reconstruction
    mean_k + z W_k^T, kept as float16 (what the trainer reads)."""
    z = acts.q.astype(np.float32) * acts.scales.reshape(1, -1, 1)  # (sum L, K, R)
    f = pca.fitted
    x = np.einsum("nkr,kdr->nkd", z, f["proj"]) + f["means"][None]
    return dataclasses.replace(acts, q=x.astype(np.float16), scales=np.ones(len(acts.scales),
                               np.float32), hidden=int(f["means"].shape[1]), bits=16)  # fmt: skip


def compressed(plan: Plan, base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """split -> Texts of the full backbone as a device using ``plan`` uploads them (what the
    server trains on: pca reconstructed), and the upload's bytes per token."""
    from benchmarks._compress import Option

    acts = {s: base[s].acts for s in SPLITS}
    pca = None
    for step in plan.steps:
        opt = Option(step).fit(acts["train"])
        acts = {s: opt.apply(a) for s, a in acts.items()}
        if opt.kind == "pca":  # int8 projections (Option keeps the input's bits: fp16 here)
            pca = opt
            acts = {s: dataclasses.replace(a, bits=8) for s, a in acts.items()}
    up = acts["train"]
    k, d = up.q.shape[1], up.q.shape[2]
    full_k, full_d = base["train"].acts.q.shape[1], base["train"].acts.q.shape[2]
    info = {"bytes_per_token": k * d * up.bits / 8, "taps_uploaded": k, "dims_per_tap": d,
            "bits": up.bits, "limit_bytes_per_token": float(full_k * full_d),
            "id_bytes_per_token": 9.0}  # fmt: skip
    info["ratio_to_limit"] = info["bytes_per_token"] / info["limit_bytes_per_token"]
    if pca is not None:
        acts = {s: reconstruct(a, pca) for s, a in acts.items()}
    return {s: dataclasses.replace(base[s], acts=a) for s, a in acts.items()}, info


def compression_rows(cfg: Any, data: dict[str, Any], arch_of: dict[int, str], head: Any,
                     options: list[str], same: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One row per option: centralised on the full backbone, validation and test perplexity,
    bytes per token. ``same``: the run's own centralised row of the full backbone, reused
    for the option that is the run's upload unchanged (the same training, not run twice)."""
    from benchmarks.bench_lm import MODEL, Bench, CachedTaps, Split, encode_lines

    plans = [parse(o) for o in options]  # all refused before any training
    bases: dict[str, dict[str, Any]] = {}
    for enc in sorted({p.base for p in plans}):
        if enc == cfg.encoding:
            bases[enc] = {s: data[s].texts[MODEL] for s in SPLITS}
        else:
            source = CachedTaps(cfg)
            bases[enc] = {s: encode_lines(source, data[s].lines, data[s].device, enc)[MODEL]
                          for s in SPLITS}  # fmt: skip
    rows = []
    for plan in plans:
        t = time.perf_counter()
        texts, info = compressed(plan, bases[plan.base])
        if same is not None and plan.base == cfg.encoding and not plan.steps:
            rows.append({**same, **info, "compression": plan.name, "upload": plan.base,
                         "seconds": 0.0, "reused": "the centralised row above"})  # fmt: skip
            continue
        split = {s: Split({MODEL: texts[s]}, data[s].device, data[s].lines) for s in SPLITS}
        bench = Bench(cfg, split, arch_of, head)
        trainer, _ = bench.fit([MODEL], "all", cfg.batch_lines * 2)
        row = bench.row("centralised", MODEL, trainer)
        row.update(info, compression=plan.name, upload=plan.base, seconds=time.perf_counter() - t)
        chosen = getattr(trainer, "chosen", None)
        if chosen:
            row["chosen_step"] = next(iter(chosen.values()))[0]
        log.info("compression %-16s %6.0f bytes/token: validation %.2f, test %.2f", plan.name,
                 row["bytes_per_token"], row.get("val_perplexity", math.nan), row["perplexity"])  # fmt: skip
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    limit = rows[0]["limit_bytes_per_token"]
    out = [
        "## Upload compression (centralised side network, full backbone)",
        "",
        f"Bytes per token of taps as uploaded (plus 9 of token id and loss mask) against the "
        f"K x d int8 limit ({limit:.0f} bytes a token); perplexity of the centralised side "
        "network trained on them, its checkpoint chosen on validation.",
        "",
        "| option | bytes/token | x limit | validation perplexity | test perplexity | "
        "top-1 | chosen step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['compression']} | {r['bytes_per_token']:.0f} | "
                   f"{r['ratio_to_limit']:.2f} | {r.get('val_perplexity', math.nan):.2f} | "
                   f"{r['perplexity']:.2f} | {r['next_token_top1']:.3f} | "
                   f"{r.get('chosen_step', '-')} |")  # fmt: skip
    return out


def plot(rows: list[dict[str, Any]], frozen: dict[str, float], path: Path) -> None:
    """Perplexity (validation and test) against bytes per token, log x, with the K x d
    int8 limit and the frozen model's perplexities as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["bytes_per_token"] for r in rows]
    for key, label, marker in (("val_perplexity", "validation", "o"), ("perplexity", "test", "s")):
        y = [r.get(key, math.nan) for r in rows]
        ax.scatter(x, y, marker=marker, label=f"centralised, {label}")
        if key == "val_perplexity":
            for xi, yi, r in zip(x, y, rows, strict=True):
                ax.annotate(r["compression"], (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)  # fmt: skip
    for key, label, style in (("val_perplexity", "frozen, validation", ":"),
                              ("perplexity", "frozen, test", "--")):  # fmt: skip
        if key in frozen:
            ax.axhline(frozen[key], color="grey", linestyle=style, label=label)
    ax.axvline(rows[0]["limit_bytes_per_token"], color="red", linestyle="-.",
               label="K x d int8 limit")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("upload bytes per token (taps)")
    ax.set_ylabel("perplexity")
    ax.set_title("lm upload compression (full SmolLM2)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
