"""Size choice under a memory budget, by measurement.

Each candidate (quantization first, then fewer/shallower taps) is exported to a scratch
bundle and run once, batch 1 at max-seq-len, in a fresh process; its peak RSS decides.
The ONNX measurement imports only onnxruntime (as a phone-side Python process would);
the ExecuTorch one carries torch with it, as the Python runtime does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

QUANT_ORDER = ("fp32", "int8", "8da4w")
PROFILE_RAM_SHARE = 0.25  # of total RAM, when the profile gives no explicit budget
PROFILE_AVAILABLE_SHARE = 0.5  # of available RAM
MEASURE_TIMEOUT_S = 600  # one measurement process, start to finish


def measure_process(
    graph: Path, fmt: str, batch: int, seq: int, threads: int = 2, repeats: int = 1
) -> dict:
    """Run a bundle graph in a fresh Python process (``fedmobillm.device_runtime.measure``);
    returns its peak RSS (MiB) and run times. Gives up after MEASURE_TIMEOUT_S."""
    args = [str(graph), fmt, *(str(n) for n in (batch, seq, threads, repeats))]
    cmd = [sys.executable, "-m", "fedmobillm.device_runtime.measure", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MEASURE_TIMEOUT_S)
    if proc.returncode != 0:
        raise FedMobiLLMError(f"measuring {graph.name} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def budget_from_profile(path: Path, budget_mb: float | None) -> float:
    """Memory budget from a device profile JSON (budget_mb, or shares of ram/available)."""
    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedMobiLLMError(f"cannot read device profile {path}: {exc}") from exc
    candidates = [budget_mb] if budget_mb is not None else []
    if "budget_mb" in profile:
        candidates.append(float(profile["budget_mb"]))
    else:
        ram = profile.get("ram_mb", profile.get("total_ram_mb"))
        avail = profile.get("available_mb", profile.get("avail_ram_mb"))
        if ram:
            candidates.append(float(ram) * PROFILE_RAM_SHARE)
        if avail:
            candidates.append(float(avail) * PROFILE_AVAILABLE_SHARE)
    if not candidates:
        raise FedMobiLLMError(
            f"device profile {path} has no memory figure",
            hint='give "ram_mb", "available_mb" or "budget_mb" in the profile',
        )
    budget = min(candidates)
    log.info("budget: %.0f MB from device profile %s", budget, path)
    return budget


def candidate_quants(opts) -> list[str]:
    from fedmobillm.export.graphs import UNSUPPORTED

    start = QUANT_ORDER.index(opts.quant)
    return [q for q in QUANT_ORDER[start:] if not any((q, f) in UNSUPPORTED for f in opts.formats)]


def choose_for_budget(opts, budget_mb: float):
    """Build candidates until one fits; leaves it in opts.out_dir. Returns the manifest."""
    from fedmobillm.export.pipeline import build_bundle

    if budget_mb <= 0:
        raise FedMobiLLMError(f"--budget-mb must be positive, not {budget_mb}")
    scratch = Path(tempfile.mkdtemp(prefix=".budget.", dir=opts.out_dir.parent))
    tried = []
    try:
        taps_plan = None
        while True:
            for quant in candidate_quants(opts):
                trial = dataclasses.replace(
                    opts, quant=quant, out_dir=scratch / "b", stage_seconds={}
                )
                if taps_plan is not None:
                    trial = dataclasses.replace(trial, num_taps=None, layers=taps_plan)
                manifest = build_bundle(trial)
                peak = max(
                    measure_process(trial.out_dir / _graph(fmt), fmt, 1, opts.max_seq_len)[
                        "peak_rss_mib"
                    ]
                    for fmt in opts.formats
                )
                tried.append({"quant": quant, "taps": manifest.taps, "peak_rss_mib": round(peak)})
                log.info(
                    "budget: %s taps %s -> peak %.0f MiB (budget %.0f)",
                    quant,
                    manifest.taps,
                    peak,
                    budget_mb,
                )
                if peak <= budget_mb:
                    return _accept(trial, opts.out_dir, manifest, budget_mb, peak, tried)
            taps_plan = _shallower(manifest.taps)
            if taps_plan is None:
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raise FedMobiLLMError(
        f"no variant fits {budget_mb:.0f} MB: tried "
        + "; ".join(f"{t['quant']} taps {t['taps']} = {t['peak_rss_mib']} MiB" for t in tried),
        hint="raise --budget-mb, or use a smaller model",
    )


def _graph(fmt: str) -> str:
    from fedmobillm.export.graphs import FILE_NAMES

    return FILE_NAMES[fmt]


def _shallower(taps: list[int]) -> list[int] | None:
    """Drop the deepest tap (the graph then ends at the next one)."""
    return taps[:-1] if len(taps) > 1 else ([taps[0] // 2] if taps[0] > 1 else None)


def _accept(trial, out_dir: Path, manifest, budget_mb: float, peak: float, tried: list):
    from fedmobillm.device_runtime.protocol import MANIFEST_NAME
    from fedmobillm.export.pipeline import _replace_dir

    choice = {
        "budget_mb": budget_mb,
        "chosen_quant": trial.quant,
        "chosen_taps": manifest.taps,
        "peak_rss_mib": round(peak, 1),
        "measured": "fresh process, batch 1, max-seq-len",
        "tried": tried,
    }
    manifest.extra["budget"] = choice
    (trial.out_dir / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    _replace_dir(trial.out_dir, out_dir)
    log.info(
        "budget: chose %s taps %s, peak %.0f MiB <= %.0f MB",
        trial.quant,
        manifest.taps,
        peak,
        budget_mb,
    )
    return manifest
