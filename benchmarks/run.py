"""The paper's headline comparison, in one run.

    python -m benchmarks.run --quick --out DIR      # ~10-30 min on 2 cores
    python -m benchmarks.run --quick --seeds 3 --out DIR   # DIR/seed-<N>/ each, mean +- spread
    python -m benchmarks.run --full --out DIR

Writes DIR/headline.json, DIR/report.md, DIR/results.json and plots (DIR/*.png).
Methods on the same backbone (real minilm-l6 weights), data (movie-snippets), fleet
(fast/mid/slow device profiles) and target accuracy: fedmobillm (real server + device
runtime), FedAvg + LoRA and FedAvg full fine-tuning (Flower), a forward-gradient
FwdLLM-style step (per-step cost), and centralised side-tuning (accuracy reference).
See report.md for what is measured and what is simulated.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _report as R
from benchmarks._common import (
    BenchConfig,
    DeviceProfile,
    FleetData,
    Timer,
    fleet_profiles,
    load_fleet_data,
    write_json,
)
from benchmarks._mezo import KEYS as MEZO_KEYS
from fedmobillm.device_runtime.backbone import FORWARD_BATCH
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parent.parent
MIN_LEARNED = 0.02  # best validation accuracy this far above the majority rate = learned
# fedmobillm, FedAvg-LoRA and FedAvg full FT always run (the headline compares them);
# fedmobillm-tokens (issue 15) is the per-token upload, on the simulated clock;
# fedavg-lora-deadline is FedAvg-LoRA with straggler-tolerant rounds (benchmarks._fedavg)
# mezo is federated zeroth-order tuning (MeZO steps, seeds and scalars on the wire,
# benchmarks._mezo)
# fedavg-hetlora is heterogeneous-rank LoRA by device class (FlexLoRA, benchmarks._hetlora)
OPTIONAL_METHODS = ("fedmobillm-tokens", "fedavg-lora-deadline", "mezo", "fedavg-hetlora")
DEADLINE_QUANTILE = 0.75  # not tuned: the slowest quarter of the fleet misses each deadline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small fleet and data (default)")
    mode.add_argument("--full", action="store_true", help="larger fleet, data and rounds")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=None, help="(first) seed, default 0")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run N seeds (--seed, --seed+1, ...) into DIR/seed-<N>/ and write the mean +- "
        "spread of every headline figure to DIR/headline.json and DIR/report.md",
    )
    p.add_argument("--model", default=None, help="backbone (default minilm-l6)")
    p.add_argument("--dataset", default=None, help="data set name or file (default movie-snippets)")
    p.add_argument("--rounds", type=int, default=None, help="FedAvg-LoRA rounds")
    p.add_argument("--rounds-full", type=int, default=None, help="FedAvg full fine-tuning rounds")
    p.add_argument("--samples-per-device", type=int, default=None)
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="target validation accuracy (default: auto, see report)",
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="CLASS=FILE.json",
        help="device profile JSON for a fleet class (e.g. from `fedmobillm android "
        "profile`); repeatable",
    )
    p.add_argument("--fleet", default=None, metavar="fast=2,mid=3,slow=3", help="devices per class")
    p.add_argument(
        "--no-flower",
        action="store_true",
        help="run FedAvg in-process even if Flower's simulation engine is available",
    )
    p.add_argument(
        "--methods",
        default="",
        metavar="fedmobillm-tokens",
        help="extra methods beside fedmobillm, FedAvg-LoRA and FedAvg full FT: "
        "fedmobillm-tokens (every token's taps uploaded; device cost and bytes against LoRA), "
        "fedavg-lora-deadline (FedAvg-LoRA whose rounds cut devices past a fixed deadline), "
        "mezo (federated zeroth-order: MeZO steps on FedAvg-LoRA's model, seeds and scalars up), "
        "fedavg-hetlora (LoRA rank by device class, fast 8 / mid 4 / slow 2, FlexLoRA SVD)",
    )
    p.add_argument(
        "--mezo",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"mezo override, KEY one of {', '.join(MEZO_KEYS)} (default: benchmarks._mezo's, "
        "chosen on validation)",
    )
    p.add_argument(
        "--deadline-quantile",
        type=float,
        default=DEADLINE_QUANTILE,
        metavar="Q",
        help="fedavg-lora-deadline's round deadline: the Q-quantile of the fleet's expected "
        f"round times (default {DEADLINE_QUANTILE})",
    )
    p.add_argument(
        "--token-side",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="token side-network override for fedmobillm-tokens (default: bench_accuracy's)",
    )
    p.add_argument(
        "--install-flower",
        action="store_true",
        help="pip install flwr[simulation] into a private folder if missing",
    )
    return p.parse_args(argv)


def make_config(a: argparse.Namespace) -> tuple[BenchConfig, dict[str, Path]]:
    cfg = BenchConfig.for_mode(
        "full" if a.full else "quick",
        seed=a.seed,
        model=a.model,
        dataset=a.dataset,
        rounds=a.rounds,
        rounds_full=a.rounds_full,
        samples_per_device=a.samples_per_device,
        target=a.target,
    )
    if a.fleet:
        try:
            cfg.fleet = {k: int(v) for k, v in (x.split("=") for x in a.fleet.split(","))}
        except ValueError as exc:
            raise FedMobiLLMError(f"--fleet {a.fleet!r} is not CLASS=N,...") from exc
    files = {}
    for item in a.profile:
        if "=" not in item:
            raise FedMobiLLMError(f"--profile {item!r} must be CLASS=FILE.json")
        k, v = item.split("=", 1)
        files[k] = Path(v)
    cfg.use_flower_engine = not a.no_flower
    extra = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in extra if m not in OPTIONAL_METHODS]
    if unknown:
        raise FedMobiLLMError(
            f"unknown method(s) {', '.join(unknown)}", hint=f"use {', '.join(OPTIONAL_METHODS)}"
        )
    if not 0.0 < a.deadline_quantile <= 1.0:
        raise FedMobiLLMError(
            f"--deadline-quantile {a.deadline_quantile} is not in (0, 1]",
            hint="0.75: the slowest quarter of the fleet misses each round's deadline",
        )
    if "fedavg-hetlora" in extra:  # before minutes of work: every class needs its rank
        from benchmarks._hetlora import RANKS

        missing = sorted(set(cfg.fleet) - set(RANKS))
        if missing:
            raise FedMobiLLMError(
                f"fedavg-hetlora has no LoRA rank for device class(es) {', '.join(missing)}",
                hint=f"classes with a rank: {', '.join(f'{k}={v}' for k, v in RANKS.items())}",
            )
    a.extra_methods = extra
    a.mezo_overrides = parse_mezo(a.mezo)
    return cfg, files


def parse_mezo(items: list[str]) -> dict[str, Any]:
    """``--mezo KEY=VALUE`` items as typed overrides of ``benchmarks._mezo.MezoJob``."""
    from benchmarks._mezo import parse_overrides

    return parse_overrides(items, "--mezo")


# -- stages --------------------------------------------------------------------------------


def measure_memory(
    cfg: BenchConfig, model_dir: str, bundles: dict[str, Path], work: Path, texts: list[str]
) -> dict[str, Any]:
    """Peak RSS of a fresh process doing one device step of each method."""
    tfile = work / "memory_texts.json"
    tfile.write_text(json.dumps(texts[: cfg.memory_batch]))
    runs = {f"fedmobillm-{q}": ["fedmobillm", "--bundle", str(b)] for q, b in bundles.items()}
    for m in ("lora", "full", "fwdgrad"):
        runs[m] = [m, "--model", model_dir]
    for m in ("imports-onnx", "imports-torch"):  # each runtime alone: the methods' baselines
        runs[m] = [m]
    return {name: peak_rss(cfg, name, args, tfile) for name, args in runs.items()}


def peak_rss(
    cfg: BenchConfig, name: str, args: list[str], tfile: Path, perturbations: int | None = None
) -> dict[str, Any]:
    """One ``benchmarks._device_step`` run in a fresh process: its JSON line (peak RSS)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._device_step",
        *args,
        "--texts",
        str(tfile),
        "--batch",
        str(cfg.memory_batch),
        "--max-seq-len",
        str(cfg.max_seq_len),
        "--lora-rank",
        str(cfg.lora_rank),
        "--perturbations",
        str(perturbations or cfg.fwd_perturbations),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise FedMobiLLMError(f"device step {name} failed: {r.stderr[-1500:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    log.info("peak RSS %s: %.0f MiB", name, out["peak_rss_mb"])
    return out


def write_fedavg_data(data: FleetData, d: Path) -> None:
    from benchmarks._fedavg import write_records

    d.mkdir(parents=True, exist_ok=True)
    for i, recs in enumerate(data.devices):
        write_records(d / f"device-{i}.jsonl", recs)
    write_records(d / "validation.jsonl", data.validation)
    write_records(d / "test.jsonl", data.test)


def run_fedavg(
    cfg: BenchConfig,
    method: str,
    model_dir: str,
    data: FleetData,
    profiles: list[DeviceProfile],
    flops: dict,
    work: Path,
    install: bool,
    deadline_quantile: float | None = None,
) -> dict:
    """One FedAvg run (``method`` lora | full); ``deadline_quantile``: the straggler-tolerant
    rounds of ``benchmarks._fedavg``, which only the in-process engine runs."""
    from dataclasses import asdict

    from benchmarks._fedavg import FedAvgJob, run_inprocess
    from benchmarks._flower_env import flower_pythonpath, subprocess_env

    job = FedAvgJob(
        method=method,
        model_dir=model_dir,
        num_labels=len(data.label_names),
        data_dir=str(work / "fedavg-data"),
        num_devices=len(profiles),
        profiles=[asdict(p) for p in profiles],
        train_flops_per_sample=flops[f"{method}_train_step"],
        rounds=cfg.rounds if method == "lora" else cfg.rounds_full,
        fraction_train=cfg.fraction_train,
        local_epochs=cfg.local_epochs,
        local_batch=cfg.local_batch,
        lr=cfg.lora_lr if method == "lora" else cfg.full_lr,
        lora_rank=cfg.lora_rank,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed,
        deadline_quantile=deadline_quantile,
    )
    flower = cfg.use_flower_engine and deadline_quantile is None
    path = flower_pythonpath(install) if flower else None
    if path is None:
        why = (
            "--no-flower"
            if not cfg.use_flower_engine
            else "round deadlines are run in-process only"
            if deadline_quantile is not None
            else "flwr is not importable and no private install exists (--install-flower)"
        )
        log.info("FedAvg-%s in-process (%s)", method, why)
        res = run_inprocess(job)
        res["engine_note"] = why
        return res
    job_file, out_file = work / f"fedavg-{method}-job.json", work / f"fedavg-{method}-result.json"
    job.save(job_file)
    out_file.unlink(missing_ok=True)
    logf = work / f"fedavg-{method}-flower.log"
    with open(logf, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "benchmarks._flower", str(job_file), str(out_file)],
            cwd=REPO,
            env=subprocess_env(path, REPO),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if r.returncode != 0 or not out_file.is_file():
        log.warning("Flower simulation failed (see %s); FedAvg-%s runs in-process", logf, method)
        res = run_inprocess(job)
        res["engine_note"] = f"Flower simulation failed, see {logf.name}"
        return res
    return json.loads(out_file.read_text())


def class_breakdown(
    fm: dict, lora: dict, mem: dict, profiles: list[DeviceProfile]
) -> dict[str, dict]:
    """Per device class: each method's work and traffic to the target (mean per device of
    the class) and its measured peak memory (fedmobillm at the class's bundle quant)."""
    ours = R.per_class(fm["classes"], fm["per_device"])
    theirs = R.per_class([p.name for p in profiles], lora["per_device"])
    quant = {p.name: p.quant for p in profiles}
    out = {}
    for name, o in ours.items():
        t = theirs.get(name, {})
        out[name] = {
            "devices": o["devices"],
            "quant": quant.get(name),
            "fedmobillm_flops": o["flops"],
            "fedmobillm_bytes": o["bytes"],
            "fedmobillm_records_forwarded": o["records_forwarded"],
            "lora_flops": t.get("flops", math.nan),
            "lora_bytes": t.get("bytes", math.nan),
            "fedmobillm_peak_rss_mb": mem.get(f"fedmobillm-{quant.get(name)}", {}).get(
                "peak_rss_mb", math.nan
            ),
            "lora_peak_rss_mb": mem["lora"]["peak_rss_mb"],
        }
    return out


def fwdgrad_cost(flops: dict, mem: dict, profiles: list[DeviceProfile], batch: int) -> dict:
    per_class = {}
    for p in profiles:
        per_class[p.name] = {
            "step_sim_s": p.compute_s(flops["fwdgrad_step"] * batch),
            "lora_step_sim_s": p.compute_s(flops["lora_train_step"] * batch),
        }
    return {
        "flops_per_sample_step": flops["fwdgrad_step"],
        "perturbations": flops["fwdgrad_perturbations"],
        "vs_lora_step": flops["fwdgrad_step"] / flops["lora_train_step"],
        "peak_rss_mb": mem["fwdgrad"]["peak_rss_mb"],
        "per_class": per_class,
        "batch": batch,
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for d in ("fedmobillm", "torch", "transformers", "peft", "onnxruntime", "flwr", "ray", "numpy"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            from benchmarks._flower_env import site_dir

            hits = sorted(site_dir().glob(f"{d}-*.dist-info")) if site_dir().is_dir() else []
            out[d] = (
                hits[0].name.removesuffix(".dist-info").split("-")[1] + " (private bench site)"
                if hits
                else "not installed"
            )
    return out


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "fedmobillm.device_runtime.client", "fedmobillm.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        a = parse_args(argv)
        preflight(a)
        return _main(a) if a.seeds == 1 else _main_seeds(a)
    except FedMobiLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def preflight(a: argparse.Namespace) -> None:
    """Before minutes of work: the packages every method needs, and say up front how the
    FedAvg baselines will run (Flower's engine or in-process, and why)."""
    import importlib.util

    from benchmarks._flower_env import flower_pythonpath

    if a.seeds < 1:
        raise FedMobiLLMError(f"--seeds must be >= 1, not {a.seeds}")
    missing = [
        m for m in ("torch", "peft", "matplotlib", "onnxruntime") if not importlib.util.find_spec(m)
    ]
    if missing:
        raise FedMobiLLMError(
            f"benchmarks.run needs {', '.join(missing)}, not installed here",
            hint='pip install -e ".[all,dev]" -c constraints.txt (README, Install)',
        )
    if a.no_flower:
        log.info("FedAvg-LoRA and FedAvg full FT run in-process (--no-flower)")
    elif flower_pythonpath(False) is None and not a.install_flower:
        log.warning(
            "Flower is not installed (no flwr release resolves with constraints.txt, see "
            "docs/benchmarks.md#flower): FedAvg-LoRA and FedAvg full FT run in-process with the "
            "same client work and Flower's aggregation rule (num-examples weighted mean); "
            "--install-flower puts Flower's simulation engine in a private folder instead"
        )
    else:
        log.info("FedAvg-LoRA and FedAvg full FT run in Flower's simulation engine")


def _main_seeds(a: argparse.Namespace) -> int:
    """``--seeds N``: one full run per seed into ``out/seed-<N>``, then the mean +- spread of
    every headline figure in ``out/headline.json`` and ``out/report.md``."""
    from benchmarks import _fair

    load = _load_average()
    first = 0 if a.seed is None else a.seed
    out, rcs, heads = a.out, [], []
    for seed in range(first, first + a.seeds):
        sub = argparse.Namespace(**vars(a))
        sub.seed, sub.out = seed, out / f"seed-{seed}"
        log.info("seed %d of %d..%d into %s", seed, first, first + a.seeds - 1, sub.out)
        rcs.append(_main(sub))
        heads.append(json.loads((sub.out / "headline.json").read_text()))
    summary = _fair.seeds_summary(heads)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    summary |= {"command": command, "load_average_at_start": load, "exit_codes": rcs}
    write_json(out / "headline.json", summary)
    (out / "report.md").write_text("\n".join(_fair.summary_markdown(summary, command, load)) + "\n")
    log.info("wrote %s over seeds %s", out / "headline.json", summary["seeds"])
    return max(rcs)


def _load_average() -> str:
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _main(a: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # 2 shared cores: more threads only spin (OpenMP)
    t_start = time.perf_counter()
    load = _load_average()
    cfg, profile_files = make_config(a)
    out = a.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    profiles = fleet_profiles(cfg, profile_files)
    m = _measure(cfg, profiles, work, a.install_flower)
    _extra_methods(a, cfg, m, work)

    # -- target and headline --
    target, best, majority = _target(cfg, m)
    fm = R.fedmobillm_to_target(m.rep, m.real, m.flops["fedmobillm_forward"], target)
    lora = R.fedavg_to_target(m.fedavg["lora"], target, len(profiles))
    full = R.fedavg_to_target(m.fedavg["full"], target, len(profiles))
    probe = R.fedavg_to_target(m.probe, target, len(profiles))
    fair = _fairness(m, fm, lora)
    head = _headline(m, fm, lora, fair)
    results = _results(cfg, m, target, best, majority, fm, lora, full)
    results["fair"] = fair
    if "lora-deadline" in m.fedavg:
        results["fedavg_to_target"]["lora-deadline"] = R.fedavg_to_target(
            m.fedavg["lora-deadline"], target, len(profiles)
        )
    results["linear_probe"] = {"run": m.probe, "to_target": probe}
    if "hetlora" in m.fedavg:
        results["fedavg_to_target"]["hetlora"] = R.fedavg_to_target(
            m.fedavg["hetlora"], target, len(profiles)
        )
    if m.mezo is not None:
        results["mezo"] = {
            "run": m.mezo,
            "to_target": R.fedavg_to_target(m.mezo, target, len(profiles)),
        }
    if m.tokens is not None:
        results["fedmobillm_tokens"] = _tokens_result(m, target, lora)
        head["tokens"] = results["fedmobillm_tokens"]["versus_lora"]
    warning = R.not_learning_warning(best, majority, MIN_LEARNED)
    if warning:
        head["warning"] = results["warning"] = warning
        log.warning("%s", warning)
    write_json(out / "results.json", results)
    headline_json = _headline_json(cfg, m, head, target, results["versions"], t_start)
    headline_json["figures"] = _figures(m, fm, lora, fair) | _probe_figures(m, fm, probe, fair)
    if m.mezo is not None:
        headline_json["figures"] |= _mezo_figures(m, results["mezo"]["to_target"], lora)
    headline_json["load_average_at_start"] = load
    write_json(out / "headline.json", headline_json)
    pngs = _plots(out, m, fm, lora, full, target)
    from benchmarks import _curves

    _curves.write(out, results)  # cost_to_target.{json,md,png}: several targets, not one
    pngs.append("cost_to_target.png")
    from benchmarks._report_md import write_report

    write_report(out / "report.md", results, headline_json, pngs)
    print(
        json.dumps(
            {
                k: (v["value"] if isinstance(v, dict) and "value" in v else v)
                for k, v in headline_json.items()
                if k not in ("versions",)
            },
            indent=2,
            default=str,
        )
    )
    log.info("wrote %s (%.0f s)", out / "headline.json", time.perf_counter() - t_start)
    return (
        0
        if all(
            not (isinstance(v, dict) and "value" in v and math.isnan(v["value"]))
            for v in head.values()
        )
        else 1
    )


def _extra_methods(a: argparse.Namespace, cfg: BenchConfig, m: Measured, work: Path) -> None:
    """The ``--methods`` beyond the core ones, each timed into ``m.stages``."""
    profiles = m.profiles
    if "fedavg-lora-deadline" in a.extra_methods:
        with Timer("FedAvg-lora with round deadlines") as t:
            m.fedavg["lora-deadline"] = run_fedavg(
                cfg, "lora", _model_dir(cfg), m.data, profiles, m.flops, work, False,
                deadline_quantile=a.deadline_quantile,
            )  # fmt: skip
        m.stages["fedavg_lora_deadline"] = t.s
    if "fedavg-hetlora" in a.extra_methods:
        from benchmarks import _hetlora as H

        with Timer("FedAvg-LoRA at heterogeneous ranks (FlexLoRA)") as t:
            job = H.job_for(cfg, _model_dir(cfg), m.data, profiles, m.flops, work)
            m.fedavg["hetlora"] = H.run_hetlora(job, H.ranks_of(profiles))
        m.stages["fedavg_hetlora"] = t.s
    if "mezo" in a.extra_methods:
        with Timer("mezo: federated zeroth-order") as t:
            m.mezo = _mezo_run(cfg, m, work, a.mezo_overrides)
        m.stages["mezo"] = t.s
    if "fedmobillm-tokens" in a.extra_methods:
        with Timer("fedmobillm-tokens: replay on the simulated clock") as t:
            m.tokens = _tokens_replay(cfg, m, _token_side(a.token_side, cfg.model))
        m.stages["fedmobillm_tokens_replay"] = t.s


@dataclass
class Measured:
    """Every method's measurements on one fleet (``_measure``)."""

    profiles: list[DeviceProfile]
    data: FleetData
    flops: dict[str, Any]
    mem: dict[str, Any]
    real: Any  # benchmarks._fedmobillm.RealRun
    rep: dict[str, Any]
    cen: dict[str, Any]
    fedavg: dict[str, Any]
    fwd: dict[str, Any]
    stages: dict[str, float]
    probe: dict[str, Any]  # the federated linear probe (``benchmarks._probe``)
    tokens: dict[str, Any] | None = None  # fedmobillm-tokens' replay (``--methods``)
    mezo: dict[str, Any] | None = None  # federated zeroth-order (``--methods mezo``)


def _measure(
    cfg: BenchConfig, profiles: list[DeviceProfile], work: Path, install_flower: bool
) -> Measured:
    """Data, bundles, FLOPs, memory, then each method in turn, timing every stage."""
    from benchmarks import _fedmobillm as F
    from benchmarks import _models as M

    stages: dict[str, float] = {}
    with Timer("data") as t:
        data = load_fleet_data(cfg)
        write_fedavg_data(data, work / "fedavg-data")
    stages["data"] = t.s
    model_dir = M.model_dir_of(cfg.model)
    with Timer("bundles") as t:
        quants = sorted({p.quant for p in profiles} | {"fp32"})
        bundles = {q: F.bundle_for(cfg, q) for q in quants}
    stages["bundles"] = t.s
    from fedmobillm.device_runtime.protocol import read_manifest

    manifest = read_manifest(bundles["fp32"])
    sample_texts = [r.text for r in data.central_train[:32]]
    with Timer("FLOP counting") as t:
        flops = M.flops_per_sample(
            model_dir,
            len(data.label_names),
            sample_texts,
            max_seq_len=cfg.max_seq_len,
            deepest_tap=max(manifest.taps),
            lora_rank=cfg.lora_rank,
            perturbations=cfg.fwd_perturbations,
            batch=cfg.local_batch,
            forward_batch=FORWARD_BATCH,
            upload_batch=cfg.upload_batch,
        )
    stages["flops"] = t.s
    with Timer("peak memory (fresh processes)") as t:
        mem = measure_memory(cfg, model_dir, bundles, work, [r.text for r in data.central_train])
    stages["memory"] = t.s
    with Timer("fedmobillm: real server + devices") as t:
        real = F.run_real(cfg, data, profiles, bundles, work / "fedmobillm")
    stages["fedmobillm_real"] = t.s
    train_rows = [r for r in real.per_device if r["split"] == "train"]
    body_per_sample = sum(r["http_body_bytes_up"] for r in train_rows) / max(
        1, sum(r["samples"] for r in train_rows)
    )
    feats: dict[str, Any] = {}
    with Timer("fedmobillm: replay on the simulated clock") as t:
        rep = F.replay(
            cfg, data, profiles, bundles, flops["fedmobillm_forward"], body_per_sample, feats
        )
    stages["fedmobillm_replay"] = t.s
    with Timer("federated linear probe (same forward)") as t:
        probe = _probe(cfg, data, profiles, flops, feats)
    stages["linear_probe"] = t.s
    with Timer("centralised side-tuning") as t:
        cen = F.centralised(cfg, data, bundles["fp32"], rep["steps"])
    stages["centralised"] = t.s
    fedavg = {}
    for method in ("lora", "full"):
        with Timer(f"FedAvg-{method}") as t:
            fedavg[method] = run_fedavg(
                cfg, method, model_dir, data, profiles, flops, work, install_flower
            )
        stages[f"fedavg_{method}"] = t.s
    fwd = fwdgrad_cost(flops, mem, profiles, cfg.local_batch)
    return Measured(profiles, data, flops, mem, real, rep, cen, fedavg, fwd, stages, probe)


def _model_dir(cfg: BenchConfig) -> str:
    from benchmarks import _models as M

    return M.model_dir_of(cfg.model)


def _probe(
    cfg: BenchConfig,
    data: FleetData,
    profiles: list[DeviceProfile],
    flops: dict[str, Any],
    feats: dict[str, Any],
) -> dict[str, Any]:
    """The federated linear probe on the replay's activations, FedAvg-LoRA's round settings
    (fraction, local epochs, batch) and 5x its rounds (a head round costs next to nothing)."""
    from benchmarks import _probe as P

    job = P.ProbeJob(
        num_labels=len(data.label_names),
        profiles=profiles,
        fwd_flops_per_sample=flops["fedmobillm_forward"],
        rounds=5 * cfg.rounds,
        fraction_train=cfg.fraction_train,
        local_epochs=cfg.local_epochs,
        local_batch=cfg.local_batch,
        seed=cfg.seed,
    )
    return P.federated_probe(job, P.from_replay(feats), [p.quant for p in profiles])


def _mezo_run(
    cfg: BenchConfig, m: Measured, work: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Federated MeZO (``benchmarks._mezo``) on FedAvg-LoRA's model, data, fleet, device
    selection and batch; its hyperparameters ``benchmarks._mezo``'s (chosen on validation)
    unless ``overrides``; its one-step peak RSS measured as the other methods' are."""
    from benchmarks import _mezo as Z

    fwd = m.flops["lora_forward"]
    job = Z.job_for(cfg, _model_dir(cfg), m.data, m.profiles, work, fwd, overrides)
    m.mem["mezo"] = peak_rss(
        cfg,
        "mezo",
        ["mezo", "--model", _model_dir(cfg)],
        work / "memory_texts.json",
        perturbations=job.perturbations,
    )
    res = Z.run_mezo(job)
    res["overrides"] = overrides
    return res


def _mezo_figures(m: Measured, z: dict[str, Any], lora: dict[str, Any]) -> dict[str, float]:
    """MeZO against FedAvg-LoRA at the headline target: FLOPs, all-in bytes (the log a device
    replays counted as its model delivery), time, peak RSS, test accuracy."""
    run = m.mezo
    delivery = _curves_delivery(run, z)
    return {
        "mezo_reached_target": float(z["reached"]),
        "mezo_flops_per_device": z["flops_per_device"],
        "mezo_bytes_per_device_all_in": z["bytes_per_device"] + delivery,
        "mezo_time_to_target_s": z["time_s"],
        "mezo_best_round": float(run["best_round"]),
        "mezo_best_validation": run["best_validation"],
        "mezo_peak_rss_mb": m.mem["mezo"]["peak_rss_mb"],
        "mezo_flops_vs_lora": z["flops_per_device"] / lora["flops_per_device"],
        "test_accuracy_mezo": run["test"]["accuracy"],
    }


def _curves_delivery(run: dict[str, Any], cut: dict[str, Any]) -> float:
    from benchmarks._curves import delivery_bytes

    return delivery_bytes(run, cut)


def _token_side(items: list[str], model: str) -> dict[str, Any]:
    """The token side network's options for backbone ``model``: bench_accuracy's TOKEN_SIDE,
    its TOKEN_SIDE_BACKBONE entry (chosen on validation), ``--token-side`` items on top."""
    from benchmarks.bench_accuracy import parse_side, token_side_for

    return token_side_for((model,), parse_side(items, "--token-side"))


def _tokens_replay(cfg: BenchConfig, m: Measured, side: dict[str, Any]) -> dict[str, Any]:
    """fedmobillm-tokens on the simulated clock: the same fleet, records, device profiles,
    forward FLOPs (the same backbone forward) and sampler as fedmobillm; every token's taps
    uploaded (serde-encoded body bytes per batch, padded to the batch's longest sample)."""
    from benchmarks import _fedmobillm as F

    bundles = {q: F.token_bundle_for(cfg, q) for q in sorted({p.quant for p in m.profiles})}
    side = _token_rule(cfg, side, next(iter(bundles.values())))
    rep = F.replay_tokens(cfg, m.data, m.profiles, bundles, m.flops["fedmobillm_forward"], side)
    rep["bundles"] = {q: str(b) for q, b in bundles.items()}
    rep["side"] = side
    return rep


def _token_rule(cfg: BenchConfig, side: dict[str, Any], bundle: Path) -> dict[str, Any]:
    """``side`` with the backbone's own pool and skip spelled out (SideConfig.token_rule
    for the bundle's architecture and kind: "auto" and per_arch entries resolved), as the
    server's trainer resolves them from the manifest its devices registered with."""
    from dataclasses import asdict

    from benchmarks import _fedmobillm as F
    from fedmobillm.device_runtime.protocol import read_manifest
    from fedmobillm.server.side import SideConfig

    manifest = read_manifest(bundle)
    base = asdict(F._settings(cfg).side)
    # the bench's per-backbone table (in ``side``) replaces the server's default by kind
    config = SideConfig(**{**base, "per_arch": {}, **side, "inputs": "tokens"})
    pool, skip = config.token_rule(manifest.architecture, manifest.kind)
    return {**{k: v for k, v in side.items() if k != "per_arch"}, "pool": pool, "skip": skip}


def _tokens_result(m: Measured, target: float, lora: dict[str, Any]) -> dict[str, Any]:
    """fedmobillm-tokens to the target, in the terms of ``R.fedmobillm_to_target``: its
    per-device upload is the serde bodies plus the HTTP framing and the download the pivot
    run measured on the wire for the same number of batches (acks, personal model)."""
    rep = m.tokens
    rows = []
    train = [r for r in m.real.per_device if r["split"] == "train"]
    for r, body, n in zip(train, rep["upload_body_bytes"], rep["samples"], strict=True):
        framing = r["wire_bytes_up"] - r["http_body_bytes_up"]
        rows.append(
            {**r, "samples": n, "http_body_bytes_up": body, "wire_bytes_up": body + framing}
        )
    real = type("TokenRun", (), {"per_device": rows})()
    fm = R.fedmobillm_to_target(rep, real, m.flops["fedmobillm_forward"], target)
    test = list(rep["test"].values())[0]["accuracy"]
    return {
        "to_target": fm,
        "replay": {k: v for k, v in rep.items() if k != "timelines"},
        "test_accuracy": test,
        "versus_lora": {
            "reached_target": fm["reached"],
            "bytes_per_device": fm["bytes_per_device"],
            "lora_bytes_per_device": lora["bytes_per_device"],
            "comm_reduction_vs_lora": 1.0 - fm["bytes_per_device"] / lora["bytes_per_device"],
            "flops_per_device": fm["flops_per_device"],
            "compute_reduction_vs_lora": 1.0 - fm["flops_per_device"] / lora["flops_per_device"],
            "upload_bytes_per_sample": float(
                np.sum(rep["upload_body_bytes"]) / max(1, np.sum(rep["samples"]))
            ),
            "stored_bytes_per_sample": rep["stored_bytes_per_sample"],
            "time_to_target_s": fm["time_s"],
            "lora_time_to_target_s": lora["time_s"],
            "test_accuracy": test,
        },
    }


def _target(cfg: BenchConfig, m: Measured) -> tuple[float, dict[str, float], float]:
    """(target validation accuracy, each method's best, the validation majority rate)."""
    best = {
        "fedmobillm": max(p["accuracy"] for p in R.smoothed(m.rep["curve"])),
        "fedavg-lora": max(
            (p["accuracy"] for p in m.fedavg["lora"]["curve"] if p["round"] > 0), default=0.0
        ),
    }
    data = m.data
    counts = [sum(r.label == c for r in data.validation) for c in range(len(data.label_names))]
    majority = max(counts) / max(1, len(data.validation))
    if isinstance(cfg.target, float):
        target = cfg.target
    else:  # a fraction of the weaker method's best, but above always guessing one class
        target = max(cfg.target_fraction * min(best.values()), majority + MIN_LEARNED)
    return target, best, majority


def _fairness(m: Measured, fm: dict[str, Any], lora: dict[str, Any]) -> dict[str, Any]:
    """Everything counted (validator, model delivery) and memory apart from the runtime."""
    from benchmarks import _fair

    shares = _fair.memory_shares(m.mem)
    return {
        "comm": _fair.comm_all_in(fm, lora, m.real.per_device, m.fedavg["lora"]["trainable_bytes"]),
        "memory": shares,
        "memory_ratios": _fair.memory_ratios(shares, {p.quant for p in m.profiles}),
        "selection": {
            "fedmobillm": "the trainer's best-validation snapshot (personal model)",
            "centralised": m.cen.get("selection", "last step"),
            "fedavg_lora": m.fedavg["lora"].get("selection", "last round"),
            "fedavg_full": m.fedavg["full"].get("selection", "last round"),
        },
    }


def _figures(
    m: Measured, fm: dict[str, Any], lora: dict[str, Any], fair: dict[str, Any]
) -> dict[str, float]:
    """Flat numbers beside the headline (averaged over seeds by ``--seeds``)."""
    c, mr, mem = fair["comm"], fair["memory_ratios"], fair["memory"]
    out = {
        "comm_reduction_training_only": c["reduction"]["training_only"],
        "comm_reduction_with_validator": c["reduction"]["with_validator"],
        "comm_reduction_all_in": c["reduction"]["all_in"],
        "fedmobillm_training_bytes_per_device": c["fedmobillm"]["training"],
        "fedmobillm_validator_bytes_total": c["fedmobillm"]["validator_total"],
        "fedmobillm_delivery_bytes_per_device": c["fedmobillm"]["delivery"],
        "lora_training_bytes_per_device": c["fedavg_lora"]["training"],
        "lora_delivery_bytes_per_device": c["fedavg_lora"]["delivery"],
        "fedmobillm_flops_per_device": fm["flops_per_device"],
        "lora_flops_per_device": lora["flops_per_device"],
        "fedmobillm_time_to_target_s": fm["time_s"],
        "lora_time_to_target_s": lora["time_s"],
        "lora_reached_target": float(lora["reached"]),
        "lora_best_round": float(m.fedavg["lora"].get("best_round", math.nan)),
        "test_accuracy_lora_last": m.fedavg["lora"].get("test_last", {}).get("accuracy", math.nan),
        "test_accuracy_centralised_last": m.cen.get("test_last", {}).get("accuracy", math.nan),
    }
    for q, r in mr.items():
        out[f"memory_ratio_{q}_whole_process"] = r["whole_process"]
        out[f"memory_ratio_{q}_method_share"] = r["method_share"]
    for k, v in mem.items():
        out[f"peak_rss_mb_{k}"] = v["peak_rss_mb"]
        out[f"method_share_mb_{k}"] = v["method_share_mb"]
    return out


def _probe_figures(
    m: Measured, fm: dict[str, Any], probe: dict[str, Any], fair: dict[str, Any]
) -> dict[str, float]:
    """The federated linear probe against fedmobillm (both on the same single forward):
    FLOPs and bytes per device to the target (the probe's final head delivered to every
    device counted, as fedmobillm's personal model is), time to target, test accuracy."""
    bytes_all = probe["bytes_per_device"] + m.probe["trainable_bytes"]
    return {
        "probe_reached_target": float(probe["reached"]),
        "probe_flops_per_device": probe["flops_per_device"],
        "probe_bytes_per_device_all_in": bytes_all,
        "probe_time_to_target_s": probe["time_s"],
        "probe_lr": m.probe["lr"],
        "probe_best_round": float(m.probe["best_round"]),
        "fedmobillm_bytes_per_device_all_in": fair["comm"]["fedmobillm"]["total"],
        "fedmobillm_vs_probe_flops_ratio": fm["flops_per_device"] / probe["flops_per_device"],
    }


def _headline(
    m: Measured, fm: dict[str, Any], lora: dict[str, Any], fair: dict[str, Any]
) -> dict[str, Any]:
    """The headline metrics; communication with everything counted (validator and model
    delivery on both sides; ``fair['comm']`` has each part); memory over the bundle quants
    the fleet runs (whole process; ``fair['memory_ratios']`` has the method shares)."""
    fleet_quants = {p.quant for p in m.profiles}
    c = fair["comm"]
    return R.headline(
        dict(fm, bytes_per_device=c["fedmobillm"]["total"]),
        dict(lora, bytes_per_device=c["fedavg_lora"]["total"]),
        {
            k: v
            for k, v in m.mem.items()
            if not k.startswith(("fedmobillm-", "imports-")) or k.split("-", 1)[1] in fleet_quants
        },
        m.real.test["accuracy"],
        m.cen["test"]["accuracy"],
    )


def _results(
    cfg: BenchConfig,
    m: Measured,
    target: float,
    best: dict[str, float],
    majority: float,
    fm: dict[str, Any],
    lora: dict[str, Any],
    full: dict[str, Any],
) -> dict[str, Any]:
    """results.json: every measurement."""
    by_class = class_breakdown(fm, lora, m.mem, m.profiles)
    return {
        "config": cfg.to_dict(),
        "profiles": [p.__dict__ for p in m.profiles],
        "data": m.data.summary(),
        "target": target,
        "best_validation": best,
        "validation_majority_rate": majority,
        "flops_per_sample": m.flops,
        "memory": m.mem,
        "fedmobillm": {"real": m.real.__dict__, "replay": m.rep, "to_target": fm},
        "centralised": m.cen,
        "fedavg": m.fedavg,
        "fedavg_to_target": {"lora": lora, "full": full},
        "per_class": by_class,
        "fwdgrad": m.fwd,
        "stages_s": m.stages,
        "versions": versions(),
    }


def _headline_json(
    cfg: BenchConfig,
    m: Measured,
    head: dict[str, Any],
    target: float,
    versions_: dict[str, str],
    t_start: float,
) -> dict[str, Any]:
    """headline.json: the headline metrics, test accuracies, command and wall time."""
    return {
        **{k: v for k, v in head.items()},
        "seed": cfg.seed,
        "mode": cfg.mode,
        "target_accuracy": target,
        "test_accuracy": {
            "fedmobillm": m.real.test["accuracy"],
            "centralised": m.cen["test"]["accuracy"],
            "fedavg_lora": m.fedavg["lora"]["test"]["accuracy"],
            "fedavg_full": m.fedavg["full"]["test"]["accuracy"],
            "linear_probe": m.probe["test"]["accuracy"],
        }
        | (
            {"fedavg_lora_deadline": m.fedavg["lora-deadline"]["test"]["accuracy"]}
            if "lora-deadline" in m.fedavg
            else {}
        )
        | ({"mezo": m.mezo["test"]["accuracy"]} if m.mezo is not None else {})
        | (
            {"fedavg_hetlora": m.fedavg["hetlora"]["test"]["accuracy"]}
            if "hetlora" in m.fedavg
            else {}
        ),
        "versions": versions_,
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - t_start,
    }


def _plots(
    out: Path,
    m: Measured,
    fm: dict[str, Any],
    lora: dict[str, Any],
    full: dict[str, Any],
    target: float,
) -> list[str]:
    """The accuracy curves and the per-device bars as PNGs in ``out``; their file names."""
    fedavg, flops = m.fedavg, m.flops
    curves = {
        "fedmobillm (async, 3-eval mean)": R.smoothed(m.rep["curve"]),
        "FedAvg-LoRA (sync)": fedavg["lora"]["curve"],
        "FedAvg full FT (sync)": fedavg["full"]["curve"],
        "federated linear probe (sync)": m.probe["curve"],
    }
    if "lora-deadline" in fedavg:
        curves["FedAvg-LoRA (sync, round deadline)"] = fedavg["lora-deadline"]["curve"]
    if m.mezo is not None:
        curves["MeZO (sync, zeroth-order)"] = m.mezo["curve"]
    if "hetlora" in fedavg:
        curves["FedAvg-LoRA, ranks by class (sync, FlexLoRA)"] = fedavg["hetlora"]["curve"]
    bars = {
        "bytes": {
            "fedmobillm": fm["bytes_per_device"] / 1e6,
            "FedAvg-LoRA": lora["bytes_per_device"] / 1e6,
            "FedAvg-full": full["bytes_per_device"] / 1e6,
        },
        "memory": {k: v["peak_rss_mb"] for k, v in m.mem.items()},
        "compute": {
            "fedmobillm": fm["flops_per_device"] / 1e9,
            "FedAvg-LoRA": lora["flops_per_device"] / 1e9,
            "FedAvg-full": full["flops_per_device"] / 1e9,
        },
        "flops_per_sample": {
            "fedmobillm fwd": flops["fedmobillm_forward"] / 1e9,
            "LoRA step": flops["lora_train_step"] / 1e9,
            "full FT step": flops["full_train_step"] / 1e9,
            f"fwd-grad step (P={flops['fwdgrad_perturbations']})": flops["fwdgrad_step"] / 1e9,
        },
    }
    return R.plots(out, curves, target, m.cen["test"]["accuracy"], bars)


if __name__ == "__main__":
    raise SystemExit(main())
