# Owner: G2.
"""What an inversion attacker recovers from pivot uploads, and what the device-side defence
costs in accuracy (issue 19).

    python -m benchmarks.bench_privacy [--quick] --out DIR

writes DIR/privacy.json, DIR/privacy.md and DIR/privacy.png.

Victim: movie-snippets (the devices' data) through a real MiniLM-L6 int8 bundle (3 taps,
the model's default mean pivot), uploaded as devices upload: float taps -> [clip each tap
vector to a norm bound, Gaussian noise calibrated to (epsilon, delta) by the device runtime's
``privacy`` module] -> int8 with the manifest's scales. The attacker (an honest-but-curious
server) holds the bundle and public text of other corpora (``_privacy_data``) and knows the
mechanism. For each epsilon:

- inversion: the bag-of-words MLP of ``_privacy_attack`` trained on the attacker's public
  activations passed through the same mechanism (noise-aware), against the nearest public
  sentence's words and the unigram prior; micro token precision / recall / F1, stop words
  removed;
- re-identification: top-1 of the true sentence among ``reid_candidates`` victim sentences
  the attacker forwards itself (clipped as the device clips);
- task quality: the side network (``server.side.SideTrainer``, SideConfig defaults with
  bench_accuracy's lr 2e-3, one architecture, all uploads: bench_accuracy's
  ``centralised`` row, uniform mini-batches of 32) trained on the noised train uploads;
  model selection and the noise-aware learning rate (2e-3 or 5e-4) on the devices' clean
  validation records (a device evaluates the personal model locally); test accuracy
  through the exported personal model on the device's clean taps (the device path).
- labels: the accuracy cost of the device's label randomised response alone (activations
  undefended) at each ``label_epsilons``.

The clip rule is chosen on validation accuracy at epsilon 8 and used at every epsilon; the
default setting is chosen from the curve on validation data (``choose_default``).

Project before noise (``device_runtime.dp_projection``, ``export --dp-projection R``): the
same rows for the projected mechanism, its per-tap PCA basis fitted on the attacker's public
training sentences (public text, never the victim's), the rank R and plain-or-whitened
chosen on the victims' clean VALIDATION accuracy at epsilon 8 (never the test split), the
personal model scored on the projection's noise-free view (as ``personal.backbone_taps``
feeds it on the phone); its inf row is the projection alone. ``--projected-only`` skips the
unprojected rows except the undefended reference.

Per-token ``lm`` uploads: the attack on them is not built (no row is reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import run_command, split_csv, write_report
from benchmarks._privacy_attack import InverterConfig
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.privacy")

EPSILONS = (math.inf, 16.0, 8.0, 4.0, 2.0, 1.0)
TARGET_EPSILON = 8.0
TARGET_ACC_GAP = 0.02  # accuracy within 2 points of non-private at epsilon 8
TARGET_F1_RATIO = 0.25  # attack token F1 at most a quarter of undefended
REID_LIMIT = 0.10
LM_NOTE = (
    "per-token `lm` uploads: the attack (token recovery, exact-sentence rate) is not built; "
    "no row is reported"
)


@dataclass
class PrivacyConfig:
    mode: str = "quick"
    seed: int = 0
    model: str = "minilm-l6"
    dataset: str = "movie-snippets"
    taps: int = 3
    quant: str = "int8"
    max_seq_len: int = 64
    delta: float = 1e-5
    epsilons: tuple[float, ...] = EPSILONS
    # re-identification only (cheap): more points to find where it falls under 10%
    reid_epsilons: tuple[float, ...] = (1024.0, 512.0, 256.0, 128.0, 64.0, 32.0)
    # label randomised response alone (activations undefended): its accuracy cost
    label_epsilons: tuple[float, ...] = (2.0,)
    train_limit: int | None = 2000  # victim uploads (train split), seeded subset
    val_limit: int | None = 300
    test_limit: int | None = 500
    public_limit: int | None = 4000  # the attacker's public sentences
    public_val: float = 0.1  # share of public text the attacker holds out
    attack_eval: int = 1000  # victim uploads the attack is scored on
    reid_candidates: int = 1000
    # clip bound rules (see setting_for), the one with the best validation accuracy at
    # TARGET_EPSILON is used at every epsilon
    clip_rules: tuple[str, ...] = ("int8", "q0.5")
    # project before noise (device_runtime.dp_projection): per-tap PCA ranks tried at
    # TARGET_EPSILON on validation; the best is used at every epsilon ((): not measured)
    projection_ranks: tuple[int, ...] = (8, 16, 32, 64)
    projection_whiten: tuple[bool, ...] = (False, True)  # plain PCA and/or whitened, tried
    # discriminant directions of the public labels first (0: plain PCA), tried
    projection_supervised: tuple[int, ...] = (0,)
    plain: bool = True  # also the unprojected mechanism's rows (False: only its inf row)
    side_lrs: tuple[float, ...] = (2e-3, 5e-4)  # noise-aware choice on validation, per eps
    steps: int = 300
    batch: int = 32
    eval_every: int = 50
    inverter: InverterConfig = field(
        default_factory=lambda: InverterConfig(hidden=512, vocab=1500, epochs=10)
    )
    threads: int = 1
    bundle: str | None = None  # an existing bundle folder instead of exporting

    @classmethod
    def for_mode(cls, quick: bool, **overrides: Any) -> PrivacyConfig:
        cfg = (
            cls()
            if quick
            else cls(
                mode="full",
                train_limit=None,
                val_limit=None,
                test_limit=None,
                public_limit=None,
                attack_eval=2000,
                label_epsilons=(4.0, 2.0, 1.0),
                steps=800,
                inverter=InverterConfig(hidden=512, vocab=2000, epochs=12),
            )
        )
        return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# -- data ------------------------------------------------------------------------------------


@dataclass
class Data:
    """Float taps (N, K, d) of the victim's splits and of the attacker's public text."""

    bundle: Path
    scales: np.ndarray  # (K,)
    meta: dict[str, Any]  # architecture, taps, depth, hidden, bundle_sha256
    label_names: list[str]
    taps: dict[str, np.ndarray]  # train / validation / test / public / public_val
    # train / validation / test: (N,) int64; public / public_val: the public corpora's own
    # sentiment (-1: none), for a supervised projection
    labels: dict[str, np.ndarray]
    sets: dict[str, list[frozenset[str]]]  # content words: train / validation / public / public_val


def prepare(cfg: PrivacyConfig) -> Data:
    from benchmarks._activations import BundleSpec, bundle_for
    from benchmarks._privacy_attack import stop_words, words
    from benchmarks._privacy_data import float_taps, public_texts, victim_split
    from fedmobillm.data import load_dataset
    from fedmobillm.device_runtime.backbone import load_verified_bundle
    from fedmobillm.device_runtime.protocol import bundle_digest

    if cfg.bundle:
        bundle = Path(cfg.bundle)
    else:
        bundle = bundle_for(BundleSpec(cfg.model, cfg.taps, cfg.quant, cfg.max_seq_len))
    m = load_verified_bundle(bundle)
    limits = {"train": cfg.train_limit, "validation": cfg.val_limit, "test": cfg.test_limit}
    victim = {s: victim_split(cfg.dataset, s, n, cfg.seed) for s, n in limits.items()}
    full = load_dataset(cfg.dataset, seed=cfg.seed)
    every = {r.text for recs in full.splits.values() for r in recs}
    public = public_texts(every, cfg.public_limit, cfg.seed)
    texts = {s: v.texts for s, v in victim.items()}
    texts["public_all"] = public.texts
    taps = {}
    for s, t in texts.items():  # one list per corpus: a quick run's chunks are a full run's
        t0 = time.perf_counter()
        taps[s] = float_taps(bundle, t, cfg.threads)
        log.info("%s: %d texts forwarded in %.0f s", s, len(t), time.perf_counter() - t0)
    n_val = max(1, int(round(cfg.public_val * len(public.texts))))
    both, every_public = taps.pop("public_all"), texts.pop("public_all")
    taps["public"], taps["public_val"] = both[n_val:], both[:n_val]
    public_labels = {"public": public.labels[n_val:], "public_val": public.labels[:n_val]}
    texts["public"], texts["public_val"] = every_public[n_val:], every_public[:n_val]
    stop = stop_words()
    return Data(
        bundle=bundle,
        scales=np.asarray(m.activation_scales, np.float32),
        meta={
            "architecture": m.architecture,
            "taps": list(m.taps),
            "depth": int(m.depth),
            "hidden": int(m.hidden_size),
            "bundle_sha256": bundle_digest(m),
            "pivot": m.pivot,
            "quant": m.quant,
            "public_source": public.source,
        },
        label_names=list(full.label_names),
        taps=taps,
        labels={**{s: v.labels for s, v in victim.items()}, **public_labels},
        sets={
            s: [words(x, stop) for x in texts[s]]
            for s in ("train", "validation", "public", "public_val")
        },
    )


@dataclass
class Setting:
    """One defence setting (``device_runtime.privacy``): epsilon (inf: none), the clip
    bound of every tap vector, the noise std in units of the clip (``sample_sigma``)."""

    epsilon: float
    clip: float | None  # None: no clipping (no defence)
    sigma: float  # noise std / clip (0: none)
    noise_multiplier: float
    scales: np.ndarray  # (K,) the manifest's int8 scales
    projection: Any = None  # dp_projection.DpProjection: clip + noise in its subspace

    @property
    def std(self) -> float:
        """The noise standard deviation per coordinate, in activation units."""
        return 0.0 if self.clip is None else self.sigma * self.clip

    def upload(self, taps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Float taps (N, K, d) -> what the server stores, dequantized (N, K, d): the
        device's ``clip_and_noise``, then int8 with the manifest's scales."""
        from fedmobillm.device_runtime.privacy import clip_and_noise
        from fedmobillm.device_runtime.serde import dequantize, quantize_int8

        if self.clip is None:
            x = self.view(taps)
        else:
            x = clip_and_noise(taps, self.clip, self.sigma, rng, projection=self.projection)
        return dequantize(quantize_int8(x, self.scales), self.scales)

    def view(self, taps: np.ndarray) -> np.ndarray:
        """What the personal model reads on the phone (N, K, d): the bundle's noise-free
        projection, unclipped (``DpProjection.view``, as ``personal.backbone_taps`` does);
        the taps themselves without a projection."""
        if self.projection is None:
            return taps
        return self.projection.view(taps)

    def clipped(self, taps: np.ndarray) -> np.ndarray:
        """The clipping alone, as the attacker computes it for texts it forwards (N, K, d)."""
        if self.clip is None:
            return self.upload(taps, np.random.default_rng(0))
        if self.projection is not None:
            return self.projection.clean(taps, self.clip)
        norms = np.linalg.norm(taps, axis=-1, keepdims=True)  # (N, K, 1)
        return taps * np.minimum(1.0, self.clip / np.maximum(norms, 1e-12))


def setting_for(
    epsilon: float, clip_rule: str, data: Data, delta: float, projection: Any = None
) -> Setting:
    """The device's setting at ``epsilon`` (one release per sample): the accountant's noise
    multiplier z, the clip by ``clip_rule`` ("int8": the device's default ``int8_clip``, the
    largest clip keeping 4 noise std inside every tap's int8 range; "qX": the X quantile of
    the public text's tap-vector norms, projected ones with a projection), sigma = z * 2 *
    sqrt(K). ``projection``: the projected mechanism (inf: the projection alone)."""
    if math.isinf(epsilon):
        return Setting(epsilon, None, 0.0, 0.0, data.scales, projection)
    from fedmobillm.device_runtime.privacy import int8_clip, noise_multiplier, sample_sigma

    k = data.taps["public"].shape[1]
    z = float(noise_multiplier(epsilon, delta, 1))
    if clip_rule == "int8":
        spread = 1.0 if projection is None else projection.spread
        clip = int8_clip(data.scales.tolist(), z, k, spread=spread)
    else:
        pub = data.taps["public"] if projection is None else projection.coords(data.taps["public"])
        norms = np.linalg.norm(pub, axis=2)  # (N, K)
        clip = float(np.quantile(norms, float(clip_rule[1:])))
    sigma = float(sample_sigma(z, k)[0])
    return Setting(epsilon, float(clip), sigma, z, data.scales, projection)


def fit_public_projection(
    data: Data, rank: int, whiten: bool, supervised: int = 0
) -> tuple[Any, list[float]]:
    """The per-tap basis of rank ``rank`` on the attacker's public training sentences (public
    text of other corpora, never the victim's), as ``export --dp-projection`` fits it on
    public calibration text: PCA, or with ``supervised`` S the first S rows the discriminant
    directions of the public corpora's own sentiment labels (``export
    --dp-projection-supervised S``). Returns (projection, variance share kept per tap)."""
    from fedmobillm.device_runtime.dp_projection import fit_projection

    labels = data.labels["public"] if supervised else None
    return fit_projection(data.taps["public"], rank, whiten, labels, supervised)


def saturation(setting: Setting, uploads: np.ndarray) -> float:
    """Fraction of upload values at the int8 limits (+-127 x scale)."""
    limit = 127.0 * setting.scales.reshape(1, -1, 1)  # (1, K, 1)
    return float((np.abs(uploads) >= limit * (1 - 1e-6)).mean())


# -- task quality ----------------------------------------------------------------------------


def train_side_network(
    cfg: PrivacyConfig,
    data: Data,
    uploads: np.ndarray,
    lr: float,
    work: Path,
    labels: np.ndarray | None = None,
    setting: Setting | None = None,
) -> dict:
    """The side network (SideConfig defaults, learning rate ``lr``; the ``centralised`` row
    of bench_accuracy: one architecture, every upload) trained ``steps`` steps on uniform
    mini-batches of the noised train uploads (N, K, d); every ``eval_every`` steps the
    devices' clean validation records pick the snapshot (saved under ``work``). ``labels``
    (N,): the uploaded labels when they differ from the true ones (randomised response)."""
    from fedmobillm.server.side import SideConfig, SideTrainer

    m, t0 = data.meta, time.perf_counter()
    trainer = SideTrainer(SideConfig(lr=lr), data.label_names, seed=cfg.seed)
    trainer.add_architecture(m["architecture"], m["taps"], m["depth"], m["hidden"])
    y = data.labels["train"] if labels is None else labels
    val = clean(data, "validation", setting)
    rng = np.random.default_rng([cfg.seed, 29])
    best = {"val_accuracy": -1.0, "selected_step": 0}
    for step in range(cfg.steps):
        rows = rng.integers(0, len(y), cfg.batch)  # (B,)
        trainer.train_step([(m["architecture"], uploads[rows], y[rows])])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = trainer.evaluate(m["architecture"], val, data.labels["validation"])["accuracy"]
            if acc > best["val_accuracy"]:
                best = {"val_accuracy": float(acc), "selected_step": step + 1}
                trainer.save(work)
    return {"lr": lr, **best, "snapshot": work, "seconds": time.perf_counter() - t0}


def clean(data: Data, split: str, setting: Setting | None = None) -> np.ndarray:
    """(N, K, d) the device's own int8 taps of ``split``, dequantized (no noise; through the
    projection and clip of ``setting`` when it has a projection: what the phone's personal
    model sees)."""
    from fedmobillm.device_runtime.serde import dequantize, quantize_int8

    x = data.taps[split] if setting is None else setting.view(data.taps[split])
    return dequantize(quantize_int8(x, data.scales), data.scales)


def device_accuracy(data: Data, run: dict, work: Path, setting: Setting | None = None) -> dict:
    """Test accuracy of the selected snapshot through the exported personal model
    (personal.onnx on onnxruntime, as a device runs it) on the device's clean taps (through
    the projection without noise, ``Setting.view``, for the projected mechanism)."""
    from fedmobillm.device_runtime.backbone import load_verified_bundle
    from fedmobillm.device_runtime.personal import PersonalModel
    from fedmobillm.server.side import SideTrainer

    m = data.meta
    chosen = SideTrainer.load(run["snapshot"])
    model = PersonalModel(chosen.export_personal(m["architecture"], work, [m["bundle_sha256"]]))
    model.check_compatible(load_verified_bundle(data.bundle))
    x, y = data.taps["test"], data.labels["test"]
    if setting is not None:
        x = setting.view(x)
    logits = np.concatenate([model.logits(x[s : s + 256]) for s in range(0, len(y), 256)])
    torch_acc = chosen.evaluate(m["architecture"], clean(data, "test", setting), y)["accuracy"]
    return {
        "accuracy": float((logits.argmax(1) == y).mean()),
        "accuracy_torch": float(torch_acc),
        "majority_class_rate": float(np.bincount(y).max() / len(y)),
    }


# -- attacks ---------------------------------------------------------------------------------


def attack(
    cfg: PrivacyConfig, data: Data, setting: Setting, uploads: dict[str, np.ndarray]
) -> dict:
    """The noise-aware inversion attack and its baselines on ``uploads`` (train: the scored
    uploads; validation: for choosing the default), and re-identification."""
    from benchmarks._privacy_attack import (
        Inverter,
        bow_scores,
        build_vocab,
        nearest_sets,
    )

    t0 = time.perf_counter()
    vocab = build_vocab(data.sets["public"], cfg.inverter.vocab)
    features = int(np.prod(data.taps["public"].shape[1:]))
    inv = Inverter(cfg.inverter, vocab, features, cfg.seed)
    fit = inv.fit(
        data.taps["public"], data.sets["public"], data.taps["public_val"], data.sets["public_val"],
        setting.upload,
    )  # fmt: skip
    n = min(cfg.attack_eval, len(uploads["train"]))
    truth = data.sets["train"][:n]
    x = uploads["train"][:n]
    public_clipped = setting.clipped(data.taps["public"])
    out = {
        "inverter": bow_scores(inv.predict(x), truth),
        "nearest_neighbour": bow_scores(
            nearest_sets(x, public_clipped, data.sets["public"]), truth
        ),
        "inverter_validation": bow_scores(
            inv.predict(uploads["validation"]), data.sets["validation"]
        ),
        "inverter_fit": fit,
        "vocab": len(vocab),
    }
    out["reid_top1"] = reid(cfg, data, setting, uploads["train"])
    out["attack_seconds"] = time.perf_counter() - t0
    log.info(
        "eps %s: inversion F1 %.3f (P %.3f R %.3f), nearest F1 %.3f, re-id %.3f",
        setting.epsilon, out["inverter"]["f1"], out["inverter"]["precision"],
        out["inverter"]["recall"], out["nearest_neighbour"]["f1"], out["reid_top1"],
    )  # fmt: skip
    return out


def reid(cfg: PrivacyConfig, data: Data, setting: Setting, uploads: np.ndarray) -> float:
    """Top-1 re-identification among the first ``reid_candidates`` victim sentences: the
    attacker forwards them itself and clips them as the device does."""
    from benchmarks._privacy_attack import reidentify

    n = min(cfg.reid_candidates, len(uploads))
    return reidentify(uploads[:n], setting.clipped(data.taps["train"][:n]))


def prior_scores(data: Data, n: int) -> dict:
    from benchmarks._privacy_attack import bow_scores, build_vocab, prior_set

    vocab = build_vocab(data.sets["public"], 10**9)
    guess = prior_set(data.sets["public"], data.sets["public_val"], vocab)
    out = bow_scores([guess] * n, data.sets["train"][:n])
    out["words"] = sorted(guess)
    return out


# -- the sweep -------------------------------------------------------------------------------


def victim_uploads(cfg: PrivacyConfig, data: Data, setting: Setting) -> dict[str, np.ndarray]:
    """One noise draw of the train and validation uploads at ``setting`` (seeded per eps)."""
    tag = 0 if math.isinf(setting.epsilon) else int(round(setting.epsilon * 1000))
    rng = np.random.default_rng([cfg.seed, 23, tag])
    return {s: setting.upload(data.taps[s], rng) for s in ("train", "validation")}


def choose_clip(cfg: PrivacyConfig, data: Data, work: Path) -> tuple[str, dict, list[dict]]:
    """The clip rule with the best validation accuracy at TARGET_EPSILON (first side
    learning rate). Returns (rule, its run, every candidate's summary)."""
    tried, best = [], None
    for rule in cfg.clip_rules:
        s = setting_for(TARGET_EPSILON, rule, data, cfg.delta)
        up = victim_uploads(cfg, data, s)["train"]
        run = train_side_network(cfg, data, up, cfg.side_lrs[0], work / f"clip-{rule}")
        tried.append(
            {
                "rule": rule,
                "clip": s.clip,
                "lr": cfg.side_lrs[0],
                "val_accuracy": run["val_accuracy"],
            }
        )
        log.info(
            "clip %s (%.4g): val accuracy %.4f at eps %g",
            rule,
            s.clip,
            run["val_accuracy"],
            TARGET_EPSILON,
        )
        if best is None or run["val_accuracy"] > best[1]["val_accuracy"]:
            best = (rule, run)
    if best is None:
        raise FedMobiLLMError("no clip rule to try", hint="give --clip-rules, e.g. int8,q0.5")
    return best[0], best[1], tried


def choose_rank(cfg: PrivacyConfig, data: Data, work: Path) -> tuple[Any, dict, dict]:
    """The projection rank with the best clean-VALIDATION accuracy at TARGET_EPSILON (the
    device's default int8 clip rule, first side learning rate; the test split is never
    looked at). Returns (projection, its run, the choice's summary)."""
    tried, best = [], None
    grid = [
        (r, w, sup)
        for r in cfg.projection_ranks
        for w in cfg.projection_whiten
        for sup in cfg.projection_supervised
        if sup <= r
    ]
    for rank, whiten, sup in grid:
        proj, kept = fit_public_projection(data, rank, whiten, sup)
        s = setting_for(TARGET_EPSILON, "int8", data, cfg.delta, proj)
        up = victim_uploads(cfg, data, s)["train"]
        tag = f"rank-{rank}{'-whitened' if whiten else ''}-sup{sup}"
        run = train_side_network(cfg, data, up, cfg.side_lrs[0], work / tag, setting=s)
        tried.append(
            {
                "rank": rank,
                "whiten": whiten,
                "supervised": sup,
                "clip": s.clip,
                "variance_kept": kept,
                "lr": cfg.side_lrs[0],
                "val_accuracy": run["val_accuracy"],
            }
        )
        log.info(
            "projection rank %d%s, %d supervised (variance kept %s, clip %.4g): val accuracy "
            "%.4f at eps %g", rank, " whitened" if whiten else "", sup,
            [round(v, 3) for v in kept], s.clip, run["val_accuracy"], TARGET_EPSILON,
        )  # fmt: skip
        if best is None or run["val_accuracy"] > best[1]["val_accuracy"]:
            best = (proj, run, sup)
    if best is None:
        raise FedMobiLLMError("no projection rank to try", hint="give --projection-ranks")
    how = (
        f"the rank with the best clean-validation accuracy at epsilon {TARGET_EPSILON:g} "
        f"(side lr {cfg.side_lrs[0]:g}, the device's int8 clip rule), used at every epsilon; "
        "per-tap basis of the attacker's public training sentences (PCA, or its first "
        "directions the discriminants of their own sentiment labels: never the victim's data "
        "or labels); the test split is not used for the choice"
    )
    choice = {
        "rank": best[0].rank,
        "whiten": best[0].whitened,
        "supervised": best[2],
        "tried": tried,
        "how": how,
    }
    return best[0], best[1], choice


def projected_rows(
    cfg: PrivacyConfig, data: Data, work: Path
) -> tuple[list[dict], dict, list[dict]]:
    """The projected mechanism at every epsilon of the grid (inf: the projection alone,
    no noise) with the rank chosen on validation. Returns (rows, the choice, re-id curve)."""
    if not cfg.projection_ranks:
        return [], {}, []
    t0 = time.perf_counter()
    proj, run8, choice = choose_rank(cfg, data, work / "ranks")
    proj_sup = choice["supervised"]
    choice["seconds"] = time.perf_counter() - t0
    rows, curve = [], []
    for eps in cfg.epsilons:
        s = setting_for(eps, "int8", data, cfg.delta, proj)
        reuse = run8 if eps == TARGET_EPSILON else None
        row = sweep_row(cfg, data, s, work / f"proj-eps-{eps}", reuse)
        rows.append({**row, "projection_supervised": proj_sup})
    for eps in sorted({*cfg.epsilons, *cfg.reid_epsilons}, reverse=True):
        s = setting_for(eps, "int8", data, cfg.delta, proj)
        up = victim_uploads(cfg, data, s)["train"]
        curve.append({"epsilon": eps, "noise_std": s.std, "reid_top1": reid(cfg, data, s, up)})
    return rows, choice, curve


def sweep_row(
    cfg: PrivacyConfig, data: Data, setting: Setting, work: Path, reuse: dict | None
) -> dict:
    """Task quality and attacks at one setting."""
    uploads = victim_uploads(cfg, data, setting)
    work.mkdir(parents=True, exist_ok=True)
    runs = [] if reuse is None else [reuse]
    for lr in cfg.side_lrs:
        if reuse is None or lr != reuse["lr"]:
            runs.append(
                train_side_network(
                    cfg, data, uploads["train"], lr, work / f"lr-{lr}", setting=setting
                )
            )
    best = max(runs, key=lambda r: r["val_accuracy"])
    row = {
        "epsilon": setting.epsilon,
        "delta": None if math.isinf(setting.epsilon) else cfg.delta,
        "projection_rank": None if setting.projection is None else setting.projection.rank,
        "projection_whitened": None if setting.projection is None else setting.projection.whitened,
        "clip": setting.clip,
        "noise_multiplier": setting.noise_multiplier,
        "sigma": setting.sigma,  # noise std / clip
        "noise_std": setting.std,  # per coordinate, activation units
        "int8_saturation": saturation(setting, uploads["train"]),
        "side_lr": best["lr"],
        "val_accuracy": best["val_accuracy"],
        "side_runs": [
            {"lr": r["lr"], "val_accuracy": r["val_accuracy"], "selected_step": r["selected_step"]}
            for r in runs
        ],
        **device_accuracy(data, best, work / "personal", setting),
        **attack(cfg, data, setting, uploads),
    }
    log.info(
        "eps %s: test accuracy %.4f (val %.4f, lr %g)",
        setting.epsilon,
        row["accuracy"],
        row["val_accuracy"],
        row["side_lr"],
    )
    return row


def run(cfg: PrivacyConfig, out: Path) -> dict:
    """Prepare the data and bundle, run every sweep, write privacy.json/.md under ``out``."""
    import torch

    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    data = prepare(cfg)
    timings = {"data": time.perf_counter() - t_start}
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        parts = _sweeps(cfg, data, Path(tmp), timings)
    result = _result(cfg, data, parts, timings, t_start)
    write_outputs(result, out)
    return result


def _timed(timings: dict[str, float], key: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, its wall seconds stored as ``timings[key]``."""
    t0 = time.perf_counter()
    got = fn(*args)
    timings[key] = time.perf_counter() - t0
    return got


def _sweeps(cfg: PrivacyConfig, data: Data, work: Path, timings: dict[str, float]) -> dict:
    """Every measurement, in this order: the plain mechanism per epsilon (after the clip
    choice), the re-identification curve, the projected mechanism, label noise alone."""
    if cfg.plain:
        rule, clip_run, clip_tried = _timed(timings, "clip_choice", choose_clip, cfg, data, work)
    else:  # the projected mechanism only: the undefended reference row, no clip choice
        rule, clip_run, clip_tried = "int8", None, []
        timings["clip_choice"] = 0.0
    rows = []
    for eps in cfg.epsilons if cfg.plain else (math.inf,):
        s = setting_for(eps, rule, data, cfg.delta)
        reuse = clip_run if eps == TARGET_EPSILON else None
        rows.append(
            _timed(timings, f"eps-{eps}", sweep_row, cfg, data, s, work / f"eps-{eps}", reuse)
        )
    reid_curve = _reid_curve(cfg, data, rule)
    proj_rows, proj_choice, proj_curve = _timed(
        timings, "projected", projected_rows, cfg, data, work
    )
    labels = _timed(timings, "labels", label_rows, cfg, data, work)
    return {"rows": rows, "rule": rule, "clip_tried": clip_tried, "reid_curve": reid_curve,
            "proj_rows": proj_rows, "proj_choice": proj_choice, "proj_curve": proj_curve,
            "labels": labels}  # fmt: skip


def _reid_curve(cfg: PrivacyConfig, data: Data, rule: str) -> list[dict]:
    """Re-identification top-1 of the plain mechanism per epsilon, loosest first."""
    curve = []
    for eps in sorted({*cfg.epsilons, *cfg.reid_epsilons}, reverse=True):
        s = setting_for(eps, rule, data, cfg.delta)
        top1 = reid(cfg, data, s, victim_uploads(cfg, data, s)["train"])
        curve.append({"epsilon": eps, "noise_std": s.std, "reid_top1": top1})
    return curve


def _result(
    cfg: PrivacyConfig, data: Data, parts: dict, timings: dict[str, float], t_start: float
) -> dict:
    """privacy.json's content from the sweeps' ``parts``; the total time runs to now."""
    from benchmarks.bench_accuracy import versions

    rows, proj_rows, proj_curve = parts["rows"], parts["proj_rows"], parts["proj_curve"]
    n_eval = min(cfg.attack_eval, len(data.labels["train"]))
    prior = prior_scores(data, n_eval)
    return {
        "rows": rows,
        "prior": prior,
        "reid_curve": parts["reid_curve"],
        "reid_below_10pct_under": reid_threshold(parts["reid_curve"]),
        "label_rows": parts["labels"],
        "clip_choice": {
            "rule": parts["rule"],
            "tried": parts["clip_tried"],
            "how": (
                f"the clip rule with the best clean-validation accuracy at epsilon "
                f"{TARGET_EPSILON:g} (side lr {cfg.side_lrs[0]:g}), used at every epsilon"
            ),
        },
        "targets": targets(rows, prior["f1"]),
        "projected_rows": proj_rows,
        "projection_choice": parts["proj_choice"],
        "projected_reid_curve": proj_curve,
        "projected_reid_below_10pct_under": reid_threshold(proj_curve) if proj_curve else None,
        # the undefended reference is the plain inf row (no projection, no noise)
        "projected_targets": targets(
            [r for r in rows if math.isinf(r["epsilon"])]
            + [r for r in proj_rows if not math.isinf(r["epsilon"])],
            prior["f1"],
        ),
        "default": choose_default(rows, proj_rows),
        "lm": LM_NOTE,
        "data": _data_counts(cfg, data, n_eval),
        "bundle": {
            "path": str(data.bundle),
            **{k: v for k, v in data.meta.items() if k != "public_source"},
        },
        "config": asdict(cfg),
        "timings_s": {**timings, "total": time.perf_counter() - t_start},
        "versions": versions(),
    }


def _data_counts(cfg: PrivacyConfig, data: Data, n_eval: int) -> dict:
    """The victim and public sets' sources and sizes."""
    return {
        "victim": cfg.dataset,
        "public": data.meta["public_source"],
        "train_uploads": int(len(data.labels["train"])),
        "validation": int(len(data.labels["validation"])),
        "test": int(len(data.labels["test"])),
        "public_train": len(data.sets["public"]),
        "public_val": len(data.sets["public_val"]),
        "attack_eval": n_eval,
        "reid_candidates": min(cfg.reid_candidates, len(data.labels["train"])),
    }


def label_rows(cfg: PrivacyConfig, data: Data, work: Path) -> list[dict]:
    """The accuracy cost of label randomised response alone (activations undefended, first
    side learning rate): the device's ``randomized_response`` at each label epsilon."""
    from fedmobillm.device_runtime.privacy import keep_probability, randomized_response

    out = []
    if not cfg.label_epsilons:
        return out
    s = setting_for(math.inf, "int8", data, cfg.delta)
    x = victim_uploads(cfg, data, s)["train"]
    k = len(data.label_names)
    for eps in cfg.label_epsilons:
        rng = np.random.default_rng([cfg.seed, 31, int(round(eps * 1000))])
        y = randomized_response(data.labels["train"], k, eps, rng)
        run = train_side_network(cfg, data, x, cfg.side_lrs[0], work / f"label-{eps}", y)
        row = {
            "label_epsilon": eps,
            "keep_probability": keep_probability(eps, k),
            "labels_flipped": float((y != data.labels["train"]).mean()),
            "side_lr": cfg.side_lrs[0],
            "val_accuracy": run["val_accuracy"],
            **device_accuracy(data, run, work / f"label-{eps}-personal"),
        }
        log.info("label epsilon %g: test accuracy %.4f", eps, row["accuracy"])
        out.append(row)
    return out


def _row(rows: list[dict], eps: float) -> dict | None:
    return next((r for r in rows if r["epsilon"] == eps), None)


def reid_threshold(curve: list[dict]) -> float | None:
    """The largest epsilon at which re-identification is under REID_LIMIT with every smaller
    epsilon of the curve also under it (None: never under)."""
    best = None
    for p in sorted(curve, key=lambda p: p["epsilon"]):
        if p["reid_top1"] >= REID_LIMIT:
            break
        best = p["epsilon"]
    return best


def targets(rows: list[dict], prior_f1: float) -> dict:
    """Issue 19's target at epsilon 8 against the undefended row; also the attack's
    advantage over the unigram prior, (F1 - prior) / (F1 undefended - prior)."""
    base, at = _row(rows, math.inf), _row(rows, TARGET_EPSILON)
    if base is None or at is None:
        return {}
    gap = base["accuracy"] - at["accuracy"]
    f1, f1_base = at["inverter"]["f1"], base["inverter"]["f1"]
    ratio = f1 / f1_base if f1_base else float("nan")
    lift = f1_base - prior_f1
    return {
        "epsilon": TARGET_EPSILON,
        "accuracy_gap": gap,
        "accuracy_within_2pt": bool(gap <= TARGET_ACC_GAP + 1e-9),
        "attack_f1_ratio": ratio,
        "attack_f1_at_most_quarter": bool(ratio <= TARGET_F1_RATIO + 1e-9),
        "attack_advantage_over_prior_ratio": (f1 - prior_f1) / lift if lift > 0 else float("nan"),
    }


def choose_default(rows: list[dict], proj_rows: list[dict] | None = None) -> dict:
    """The default from the curve on validation data: the smallest epsilon whose validation
    accuracy is within 2 points of the non-private one and whose inversion F1 on the
    validation uploads is at most a quarter of the undefended one, over both mechanisms
    (plain and projected; at equal epsilon the better validation accuracy). If no epsilon
    keeps the accuracy, the default is no noise (privacy opt-in per device, its cost in the
    table)."""
    base = _row(rows, math.inf)
    if base is None:
        return {}
    f1_base = base["inverter_validation"]["f1"]
    both = [
        r
        for r in rows + list(proj_rows or [])
        if not math.isinf(r["epsilon"])
        and r["inverter_validation"]["f1"] <= TARGET_F1_RATIO * f1_base
        and base["val_accuracy"] - r["val_accuracy"] <= TARGET_ACC_GAP
    ]
    summary = {
        "val_accuracy_non_private": base["val_accuracy"],
        "val_inversion_f1_undefended": f1_base,
    }
    if not both:
        return {
            "epsilon": None,
            "why": "no epsilon of the grid keeps validation accuracy within 2 points of "
            "non-private: no noise by default, a device opts in with its epsilon",
            **summary,
        }
    pick = min(both, key=lambda r: (r["epsilon"], -r["val_accuracy"]))
    return {
        "epsilon": pick["epsilon"],
        "projection_rank": pick.get("projection_rank"),
        "clip": pick["clip"],
        "side_lr": pick["side_lr"],
        "why": "the smallest epsilon meeting both bounds on validation",
        "val_accuracy": pick["val_accuracy"],
        "val_inversion_f1": pick["inverter_validation"]["f1"],
        **summary,
    }


# -- outputs ---------------------------------------------------------------------------------


def _eps(e: float | None) -> str:
    return "∞" if e is not None and math.isinf(e) else ("-" if e is None else f"{e:g}")


TABLE_HEAD = (
    "| epsilon | z | clip | noise std | test acc (%) | val acc (%) | side lr | inversion P / R / F1 | "
    "nearest-neighbour F1 | unigram prior F1 | re-id top-1 (%) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
)


def _table_row(r: dict, prior_f1: float) -> str:
    inv = r["inverter"]
    return (
        f"| {_eps(r['epsilon'])} | {r['noise_multiplier']:.3g} | "
        f"{'-' if r['clip'] is None else format(r['clip'], '.3g')} | {r['noise_std']:.3g} | "
        f"{100 * r['accuracy']:.2f} | "
        f"{100 * r['val_accuracy']:.2f} | {r['side_lr']:g} | "
        f"{inv['precision']:.3f} / {inv['recall']:.3f} / {inv['f1']:.3f} | "
        f"{r['nearest_neighbour']['f1']:.3f} | {prior_f1:.3f} | {100 * r['reid_top1']:.1f} |"
    )


def _target_line(t: dict) -> str:
    return (
        f"Target at epsilon {t['epsilon']:g}: accuracy gap {100 * t['accuracy_gap']:+.2f} pt "
        f"({'met' if t['accuracy_within_2pt'] else 'NOT met'}: within 2), inversion F1 ratio "
        f"{t['attack_f1_ratio']:.2f} ({'met' if t['attack_f1_at_most_quarter'] else 'NOT met'}: "
        f"<= 0.25); its advantage over the unigram prior, (F1 - prior) / (F1 undefended - "
        f"prior): {t['attack_advantage_over_prior_ratio']:.2f}."
    )


def _basis_name(choice: dict) -> str:
    sup = choice.get("supervised") or 0
    return f"{sup} discriminant + PCA basis" if sup else "PCA basis"


def projected_markdown(result: dict) -> list[str]:
    """The projected mechanism's section of privacy.md (empty when not measured)."""
    rows, c = result.get("projected_rows") or [], result.get("projection_choice") or {}
    if not rows:
        return []
    lines = [
        "",
        f"### Projected before noise (rank {c['rank']} per tap, public {_basis_name(c)}"
        f"{', whitened' if c.get('whiten') else ''})",
        "",
        "Rank chosen on validation: "
        + ", ".join(
            f"R {t['rank']}{' whitened' if t.get('whiten') else ''}"
            f"{', ' + str(t['supervised']) + ' supervised' if t.get('supervised') else ''}: val "
            f"{100 * t['val_accuracy']:.2f}% (variance kept "
            f"{min(t['variance_kept']):.2f}-{max(t['variance_kept']):.2f}, clip {t['clip']:.3g})"
            for t in c["tried"]
        )
        + f"; {c['how']}. The inf row is the projection alone (no noise); noise std is per "
        "coordinate of the subspace.",
        "",
        *TABLE_HEAD,
    ]
    lines += [_table_row(r, result["prior"]["f1"]) for r in rows]
    curve = result.get("projected_reid_curve") or []
    lines += ["", "Re-identification (projected): " + ", ".join(
        f"eps {_eps(q['epsilon'])}: {100 * q['reid_top1']:.1f}%" for q in curve
    ) + f". Under 10% for every epsilon <= {_eps(result.get('projected_reid_below_10pct_under'))}."]  # fmt: skip
    if result.get("projected_targets"):
        lines += ["", "Projected, against the undefended row: " + _target_line(
            result["projected_targets"])]  # fmt: skip
    return lines


def markdown(result: dict) -> str:
    d, p = result["data"], result["prior"]
    lines = [
        f"### Inversion of pivot uploads ({result['bundle'].get('architecture')}, "
        f"{result['config']['model']}, pivot {result['bundle'].get('pivot')}, "
        f"{d['victim']} -> attacker's public text {d['public']})",
        "",
        f"Token F1 etc. on {d['attack_eval']} victim uploads (content words, stop words removed); "
        f"re-identification top-1 among {d['reid_candidates']}; accuracy on {d['test']} test "
        f"records through the personal model; delta = {result['config']['delta']:g}.",
        "",
        *TABLE_HEAD,
    ]
    lines += [_table_row(r, p["f1"]) for r in result["rows"]]
    lines += ["", "Re-identification: " + ", ".join(
        f"eps {_eps(c['epsilon'])}: {100 * c['reid_top1']:.1f}%" for c in result["reid_curve"]
    ) + f". Under 10% for every epsilon <= {_eps(result['reid_below_10pct_under'])}.", ""]  # fmt: skip
    t = result["targets"]
    if t:
        lines.append(_target_line(t))
    lines += projected_markdown(result)
    if result.get("label_rows"):
        lines += [
            "",
            "Labels by randomised response alone (activations undefended):",
            "",
            "| label epsilon | labels flipped (%) | test acc (%) | val acc (%) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['label_epsilon']:g} | {100 * r['labels_flipped']:.1f} | "
            f"{100 * r['accuracy']:.2f} | {100 * r['val_accuracy']:.2f} |"
            for r in result["label_rows"]
        ]
    c, df = result["clip_choice"], result["default"]
    lines += [
        "",
        f"Clip: rule {c['rule']} ("
        + ", ".join(
            f"{t['rule']}: clip {t['clip']:.3g}, val {100 * t['val_accuracy']:.2f}%"
            for t in c["tried"]
        )
        + f" at epsilon {TARGET_EPSILON:g}); {c['how']}.",
        f"Default: {'no noise' if df.get('epsilon') is None else 'epsilon ' + _eps(df['epsilon'])}"
        f"{'' if not df.get('projection_rank') else ', projected to rank ' + str(df['projection_rank'])}"
        f" ({df.get('why', '')}).",
        "",
        f"Note: {result['lm']}.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    finite = [r["epsilon"] for r in rows if not math.isinf(r["epsilon"])]
    inf_x = 2 * max(
        finite
        + [c["epsilon"] for c in result["reid_curve"] if not math.isinf(c["epsilon"])]
        + [1.0]
    )

    def xs(eps: list[float]) -> list[float]:
        return [inf_x if math.isinf(e) else e for e in eps]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(
        xs([r["epsilon"] for r in rows]),
        [100 * r["accuracy"] for r in rows],
        "o-",
        label="test accuracy",
    )
    a1.plot(
        xs([r["epsilon"] for r in rows]),
        [100 * r["val_accuracy"] for r in rows],
        "s--",
        label="validation accuracy",
    )
    prow = result.get("projected_rows") or []
    if prow:
        a1.plot(
            xs([r["epsilon"] for r in prow]), [100 * r["accuracy"] for r in prow], "D-",
            label=f"test accuracy, projected (R {prow[0]['projection_rank']})",
        )  # fmt: skip
        a2.plot(
            xs([r["epsilon"] for r in prow]), [r["inverter"]["f1"] for r in prow], "D-",
            label="inversion F1, projected",
        )  # fmt: skip
    a1.axhline(100 * rows[0]["majority_class_rate"], color="grey", ls=":", label="majority class")
    a1.set_ylabel("accuracy (%)")
    a2.plot(
        xs([r["epsilon"] for r in rows]),
        [r["inverter"]["f1"] for r in rows],
        "o-",
        label="inversion F1",
    )
    a2.plot(
        xs([r["epsilon"] for r in rows]),
        [r["nearest_neighbour"]["f1"] for r in rows],
        "^-",
        label="nearest-neighbour F1",
    )
    a2.axhline(result["prior"]["f1"], color="grey", ls=":", label="unigram prior F1")
    c = result["reid_curve"]
    a2.plot(xs([p["epsilon"] for p in c]), [p["reid_top1"] for p in c], "s-", label="re-id top-1")
    a2.set_ylabel("F1 / top-1 rate")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (rightmost: no defence)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    write_report(out, "privacy", result, markdown, plot)  # inf and nan as JSON's Infinity, NaN
    log.info("wrote %s/privacy.{json,md,png}", out)


# -- command line ----------------------------------------------------------------------------


def _floats(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        return tuple(
            math.inf if v.strip() in ("inf", "∞") else float(v)
            for v in value.split(",")
            if v.strip()
        )
    except ValueError as exc:
        raise FedMobiLLMError(f"not a list of numbers: {value!r}", hint="e.g. inf,16,8,4") from exc


def _ranks(value: str | None) -> tuple[int, ...] | None:
    if value == "none":
        return ()
    try:
        return tuple(int(v) for v in split_csv(value) or ()) or None
    except ValueError as exc:
        raise FedMobiLLMError(f"--projection-ranks {value!r}", hint="e.g. 8,16,32") from exc


def _ranks0(value: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(v) for v in split_csv(value) or ()) or None
    except ValueError as exc:
        raise FedMobiLLMError(f"--projection-supervised {value!r}", hint="e.g. 0,1") from exc


def _quantile(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 1.0
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_privacy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="subsets of the data, small budgets")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--epsilons", help="comma-separated, inf = no defence (default inf,16,8,4,2,1)")
    p.add_argument("--reid-epsilons", help="further epsilons for the re-identification curve")
    p.add_argument("--delta", type=float)
    p.add_argument(
        "--label-epsilons", help="label randomised-response epsilons to measure alone, or none"
    )
    p.add_argument("--train-limit", type=int, help="victim uploads (train records)")
    p.add_argument("--val-limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--public-limit", type=int, help="the attacker's public sentences")
    p.add_argument("--attack-eval", type=int, help="victim uploads the attack is scored on")
    p.add_argument("--reid-candidates", type=int)
    p.add_argument(
        "--clip-rules",
        help="comma-separated: int8 (the device default), qX (quantile X of public tap norms)",
    )
    p.add_argument(
        "--projection-ranks",
        help="project-before-noise ranks tried on validation at epsilon 8 (default "
        "8,16,32,64), or none",
    )
    p.add_argument(
        "--projection-whiten",
        choices=["both", "yes", "no"],
        default="both",
        help="try whitened PCA bases, plain ones, or both (default both)",
    )
    p.add_argument(
        "--projection-supervised",
        help="comma-separated counts of discriminant directions of the public labels to try "
        "first in the basis (default 0: plain PCA; 1: export --dp-projection-supervised 1)",
    )
    p.add_argument(
        "--projected-only",
        action="store_true",
        help="measure the projected mechanism only (the plain one's inf row as the reference)",
    )
    p.add_argument("--side-lrs", help="comma-separated side-network learning rates")
    p.add_argument("--steps", type=int, help="side-network steps")
    p.add_argument("--inverter-epochs", type=int)
    p.add_argument("--inverter-vocab", type=int)
    p.add_argument("--inverter-hidden", type=int)
    p.add_argument("--bundle", help="an existing MiniLM-L6 int8 bundle folder instead of exporting")
    p.add_argument("--seed", type=int)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _config(a: argparse.Namespace) -> PrivacyConfig:
    cfg = PrivacyConfig.for_mode(
        a.quick, epsilons=_floats(a.epsilons), reid_epsilons=_floats(a.reid_epsilons), delta=a.delta,
        train_limit=a.train_limit, val_limit=a.val_limit, test_limit=a.test_limit,
        public_limit=a.public_limit, attack_eval=a.attack_eval, reid_candidates=a.reid_candidates,
        clip_rules=split_csv(a.clip_rules),
        projection_ranks=_ranks(a.projection_ranks), plain=False if a.projected_only else None,
        projection_whiten={"both": (False, True), "yes": (True,), "no": (False,)}[
            a.projection_whiten],
        projection_supervised=_ranks0(a.projection_supervised),
        label_epsilons=() if a.label_epsilons == "none" else _floats(a.label_epsilons), side_lrs=_floats(a.side_lrs), steps=a.steps,
        bundle=a.bundle, seed=a.seed,
    )  # fmt: skip
    inv = {"epochs": a.inverter_epochs, "vocab": a.inverter_vocab, "hidden": a.inverter_hidden}
    cfg = dataclasses.replace(
        cfg,
        inverter=dataclasses.replace(
            cfg.inverter, **{k: v for k, v in inv.items() if v is not None}
        ),
    )
    check(cfg)
    return cfg


def check(cfg: PrivacyConfig) -> None:
    """Options that would make the run meaningless, refused before any work."""
    if math.inf not in cfg.epsilons:
        raise FedMobiLLMError("--epsilons must include inf (the undefended reference)")
    if any(e <= 0 for e in cfg.epsilons + cfg.reid_epsilons + cfg.label_epsilons):
        raise FedMobiLLMError("every epsilon must be positive")
    for rule in cfg.clip_rules:
        if rule != "int8" and not (rule.startswith("q") and _quantile(rule[1:])):
            raise FedMobiLLMError(f"unknown clip rule {rule!r}", hint="int8 or qX, 0 < X <= 1")
    if not cfg.clip_rules:
        raise FedMobiLLMError("--clip-rules is empty", hint="e.g. int8,q0.5")
    if any(s < 0 for s in cfg.projection_supervised) or not cfg.projection_supervised:
        raise FedMobiLLMError("--projection-supervised must be counts >= 0", hint="e.g. 0,1")
    if any(r < 1 for r in cfg.projection_ranks):
        raise FedMobiLLMError("--projection-ranks must be positive", hint="e.g. 8,16,32")
    if not cfg.plain and not cfg.projection_ranks:
        raise FedMobiLLMError("--projected-only needs --projection-ranks")
    if not cfg.side_lrs or any(lr <= 0 for lr in cfg.side_lrs):
        raise FedMobiLLMError("--side-lrs must be positive", hint="e.g. 0.002,0.0005")
    if not 0 < cfg.delta < 1:
        raise FedMobiLLMError(f"--delta {cfg.delta} must be in (0, 1)")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    return run_command(lambda: run(_config(a), a.out), markdown, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
