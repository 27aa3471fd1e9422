"""What `fedmobillm demo` reports: the final table and the validation plot (see fedmobillm.demo).

Pure functions of the run's rows and progress history, so they test without a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("fedmobillm.demo")

# Model names a reader knows, for the named backbones of fedmobillm.export.models
MODEL_NAMES = {
    "minilm-l3": "MiniLM-L3",
    "minilm-l6": "MiniLM-L6",
    "smollm2-135m": "SmolLM2-135M",
}


def model_name(backbone: str) -> str:
    """The model name a reader knows ("MiniLM-L6" for ``minilm-l6``), else the last part."""
    return MODEL_NAMES.get(backbone) or Path(backbone).name or backbone


def quant_change(requested: str, used: str, errors: list[str]) -> dict[str, Any]:
    """A backbone's quantization: the one its bundle has (``used``, from its manifest), the one
    asked for, and, when they differ, why (the export errors of the variants tried first)."""
    fallback = None
    if used != requested:
        fallback = "; ".join(errors) or f"no {requested} bundle"
    return {"quant": used, "quant_requested": requested, "quant_fallback": fallback}


def first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def table_lines(
    rows: list[dict[str, Any]], majority_rate: float, failed: dict[str, str] | None = None
) -> list[str]:
    """The final table: one line per backbone, then why a quantization changed (marked *), the
    backbones that could not be exported, and the majority-class rate to compare with."""
    lines = [
        f"{'backbone':<16} {'model':<14} {'quant':<6} {'accuracy':>9} {'bytes up/device':>16} "
        f"{'fwd ms/sample':>14} {'peak MB':>8}"
    ]
    notes = []
    for r in rows:
        quant = str(r.get("quant") or "?") + ("*" if r.get("quant_fallback") else "")
        head = f"{r['name']:<16} {model_name(r['name']):<14} {quant:<6}"
        if r.get("quant_fallback"):
            notes.append(
                f"* {r['name']}: {r.get('quant_requested')} -> {r.get('quant')}: "
                f"{first_line(r['quant_fallback'])}"
            )
        if "error" in r:
            lines.append(f"{head} error: {first_line(r['error'], 70)}")
            continue
        lines.append(
            f"{head} {100 * r['accuracy']:>8.1f}% {r['bytes_uploaded']:>16,.0f} "
            f"{r['forward_ms_per_sample']:>14.2f} {r['peak_mb']:>8.0f}"
        )
    for name, error in (failed or {}).items():
        lines.append(
            f"{name:<16} {model_name(name):<14} {'-':<6} not exported: {first_line(error)}"
        )
    lines += notes
    lines.append(f"majority-class rate: {100 * majority_rate:.1f}%")
    return lines


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only), or None (said) when matplotlib is
    not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    return plt


def plot_validation(
    history: list[dict[str, Any]],
    path: Path,
    *,
    names: dict[str, str],
    kept: dict[str, dict[str, Any]],
    test_accuracy: dict[str, float],
    majority_rate: float,
) -> bool:
    """Validation accuracy per architecture against seconds since the first upload, with the
    kept (best-validation) snapshot, the test accuracy reached on device and the majority-class
    rate marked. ``names``: architecture -> model name (legend); ``kept``: the server's
    ``best_validation`` (architecture -> step, accuracy); ``test_accuracy``: architecture ->
    on-device test accuracy. False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    t0 = first_upload_time(history)
    archs = sorted({a for h in history for a in h.get("val_per_architecture", {})} | set(kept))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    t_end = max([h["t"] - t0 for h in history] or [0.0])
    for i, arch in enumerate(archs):
        color = f"C{i}"
        pts = [
            (h["t"] - t0, 100 * h["val_per_architecture"][arch])
            for h in history
            if arch in h.get("val_per_architecture", {}) and h["t"] >= t0
        ]
        label = names.get(arch, arch)
        if arch in test_accuracy:
            acc = 100 * test_accuracy[arch]
            label += f" (test {acc:.1f}% on device)"
            ax.plot([t_end], [acc], "D", color=color, markersize=8)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", color=color, label=label)
        _mark_kept(ax, history, t0, kept.get(arch), color)
    ax.axhline(100 * majority_rate, color="grey", linestyle=":", linewidth=1)
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, min(low, 100 * majority_rate - 3)), min(100.0, high + 3))
    ax.set_xlim(left=0.0)
    _legend(ax, majority_rate)
    ax.set_xlabel("seconds since the first upload")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("fedmobillm demo: validation accuracy of the shared side network")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def first_upload_time(history: list[dict[str, Any]]) -> float:
    """The time of the first progress point with any upload stored (else of the first point)."""
    for h in history:
        if h.get("uploaded", h.get("samples", 0)):
            return float(h["t"])
    return float(history[0]["t"]) if history else 0.0


def _mark_kept(ax: Any, history: list[dict[str, Any]], t0: float, best: Any, color: str) -> None:
    """A ring at the kept snapshot: its validation accuracy, at the first progress point whose
    trainer step had reached the snapshot's step."""
    if not best or "step" not in best or "accuracy" not in best:
        return
    t = next((h["t"] - t0 for h in history if h.get("step", 0) >= best["step"]), None)
    if t is None:
        return
    ax.plot([t], [100 * best["accuracy"]], "o", markersize=13, markerfacecolor="none",
            markeredgecolor=color, markeredgewidth=1.8)  # fmt: skip


def _legend(ax: Any, majority_rate: float) -> None:
    """Backbones by model name, then what the marks mean (black proxies)."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="o", markersize=10, markerfacecolor="none", color="black",
               linestyle="none"),
        Line2D([], [], marker="D", color="black", linestyle="none"),
        Line2D([], [], color="grey", linestyle=":"),
    ]  # fmt: skip
    labels += ["kept snapshot (best validation)", "test accuracy on device",
               f"majority class ({100 * majority_rate:.1f}%)"]  # fmt: skip
    ax.legend(handles, labels, fontsize=7, loc="lower right")


# ---- the lm demo (fedmobillm.demo_lm) ----------------------------------------------------
def lm_model_name(backbone: str, layers: list[int] | None) -> str:
    """The name in tables: "SmolLM2-135M 1-4" for a truncation whose deepest tap is 4."""
    base = model_name(backbone.rsplit("-b", 1)[0])
    return f"{base} 1-{layers[-1]}" if layers else base


def _ppl(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if x < 1e6 else f"{x:.2e}"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def lm_table_lines(backbones: list[dict[str, Any]], devices: list[dict[str, Any]]) -> list[str]:
    """The lm demo's final table: held-out perplexity and next-token top-1 per backbone,
    frozen -> personal, with upload bytes per token; one line per device; then each shown
    device's prompt and its completions before (frozen) and after (personal)."""
    lines = [
        f"{'backbone':<20} {'devices':>7} {'frozen ppl':>11} {'personal ppl':>13} {'lower by':>9} "
        f"{'top-1 frozen':>12} {'personal':>9} {'taps B/token':>13}"
    ]
    for b in backbones:
        f, p = b.get("frozen_perplexity"), b.get("personal_perplexity")
        change = (
            f"{f / p:,.0f}x" if f and p and f / p >= 10 else f"{f / p:.2f}x" if f and p else "-"
        )
        bpt = b.get("bytes_per_token")
        lines.append(
            f"{lm_model_name(b['backbone'], b.get('layers')):<20} {b['devices']:>7} "
            f"{_ppl(f):>11} {_ppl(p):>13} {change:>9} {_pct(b.get('frozen_top1')):>12} "
            f"{_pct(b.get('personal_top1')):>9} {f'{bpt:,.0f}' if bpt else '-':>13}"
        )
    lines.append("held-out perplexity per device (test half of its held-out episodes, "
                 "never uploaded):")  # fmt: skip
    for d in devices:
        if "error" in d:
            lines.append(f"  {d['device']:<24} error: {first_line(d['error'], 90)}")
            continue
        lines.append(
            f"  {d['device']:<24} {lm_model_name(d['backbone'], d['layers']):<18} "
            f"{_ppl(d['frozen']['perplexity']):>11} -> {_ppl(d['personal']['perplexity']):>9} "
            f"({d['personal']['tokens']} tokens)"
        )
    for d in devices:
        c = d.get("completion")
        if not c:
            continue
        lines.append(f"{d['device']} ({d.get('speaker')}, {lm_model_name(d['backbone'], d['layers'])}) "
                     f"prompt: {shown(c['prompt'].strip())}")  # fmt: skip
        lines.append(f"  said:     {shown(c.get('reference', ''))}")
        for key in ("frozen", "personal"):
            g = c.get(key) or {}
            text = g.get("text") if "error" not in g else f"error: {first_line(g['error'], 80)}"
            lines.append(f"  {key + ':':<9} {shown(first_line(str(text), 110))}")
    return lines


# The friends transcripts keep Windows-1252 quotes and dashes as C1 control characters
# (U+0091-U+0097), and the models learn to write them: shown as the marks they stand for
CP1252_MARKS = str.maketrans({0x91: "‘", 0x92: "’", 0x93: "“", 0x94: "”",
                              0x96: "–", 0x97: "—"})  # fmt: skip


def shown(text: str) -> str:
    """Text in quotes for the table: Windows-1252 marks shown, other control characters
    and new lines escaped."""
    return repr(text.translate(CP1252_MARKS))


def plot_lm_validation(
    history: list[dict[str, Any]], path: Path, *, names: dict[str, str], frozen: dict[str, float]
) -> bool:
    """Validation perplexity (log scale) per architecture against seconds since the first
    upload, each architecture's frozen held-out perplexity dashed. ``names``: architecture
    -> backbone; ``frozen``: architecture -> frozen perplexity on the devices' test text.
    False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    t0 = first_upload_time(history)
    archs = sorted({a for h in history for a in h.get("val_per_architecture", {})} | set(frozen))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, arch in enumerate(archs):
        pts = [(h["t"] - t0, h["val_per_architecture"][arch]) for h in history
               if arch in h.get("val_per_architecture", {}) and h["t"] >= t0]  # fmt: skip
        new = [p for j, p in enumerate(pts) if j == 0 or p[1] != pts[j - 1][1]]  # evaluations
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{i}",
                drawstyle="steps-post", label=f"{names.get(arch, arch)}: validation")  # fmt: skip
        ax.plot([p[0] for p in new], [p[1] for p in new], ".", color=f"C{i}")
        if arch in frozen:
            ax.axhline(frozen[arch], color=f"C{i}", linestyle="--", linewidth=1,
                       label=f"{names.get(arch, arch)}: frozen (held-out, on device)")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlim(left=0.0)
    ax.set_xlabel("seconds since the first upload")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("fedmobillm demo --task lm: validation perplexity of the personal models")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
