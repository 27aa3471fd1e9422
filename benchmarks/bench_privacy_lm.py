"""What per-token ``lm`` uploads reveal, and what the device's noise costs (issue 19).

    python -m benchmarks.bench_privacy_lm [--quick] [--epsilons inf,16,8,4,2,1]
        [--public N] [--no-utility] --out DIR

Writes DIR/privacy_lm.json, privacy_lm.md and privacy_lm.png. The threat model of
docs/privacy.md: an honest-but-curious server holding the backbone and plenty of public
text. For task ``lm`` a device uploads every real token's taps (``bench_lm``'s fleet:
SmolLM2-135M with taps [10, 20, 30] of 30 blocks and a 12-block truncation tapped at
[4, 8, 12]; fp16, the lm upload).

- Victims: the lines the devices of ``bench_lm --quick`` upload (their training lines, the
  friends transcripts, one device per speaker), with the device's mechanism at each epsilon:
  every tap vector clipped and Gaussian noise per sample (``device_runtime.privacy``:
  ``clip_and_noise`` with ``sample_sigma(z, K, T)`` and the default clip a device computes
  from the bundle's scales, ``int8_clip``), noise drawn per line.
- Attacker: public text of other corpora (tweets, NYT and Amazon snippets: ``benchmarks.
  _privacy_data.public_texts``), forwarded through the same backbone and passed through the
  same mechanism (noise-aware, a fresh draw), so every position gives a (tap vector, token)
  pair. It standardises the K x d vector of a position, projects it on the top 256 principal
  directions of its public vectors and then (a) ``inverter``: a softmax regression onto the
  public vocabulary's most frequent ``vocab`` tokens (Adam lr 3e-3, batches of 256, epochs
  chosen on a held-out tenth of the public text), (b) ``nearest``: the token of the nearest
  public position (cosine), and (c) ``prior``: the most frequent public token everywhere.
- Per attack: token recovery (the share of the victims' positions whose token id is
  recovered), the exact-line rate (every token of a line recovered) and content-word
  precision / recall / F1 of the decoded line (``benchmarks._privacy_attack``'s words, as the
  pivot attack of ``bench_privacy`` counts them).
- Utility (unless ``--no-utility``): ``bench_lm --quick``'s fedmobillm fleet trained on the
  noisy uploads (the server computes the frozen head's input from the noisy deepest tap, as
  it does), each personal model kept at its best validation perplexity (validation lines
  scored as the phone scores them, clean), then held-out test perplexity per backbone as the
  phone scores it, beside the frozen model.

Taps come from the eager PyTorch model (``bench_lm --taps-from torch``, cached per set of
lines). Nothing here is chosen on the victims' text: the attacker's choices use its public
text, the side network's its validation lines."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import write_report
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.privacy_lm")

EPSILONS = (math.inf, 16.0, 8.0, 4.0, 2.0, 1.0)


@dataclass
class PrivacyLmConfig:
    epsilons: list[float] = field(default_factory=lambda: list(EPSILONS))
    delta: float = 1e-5
    public: int = 1500  # public texts the attacker forwards
    vocab: int = 4000  # the inverter's classes: the most frequent public tokens
    dims: int = 256  # principal directions kept of a position's K x d vector
    epochs: int = 12  # at most; the best on the held-out public tenth is kept
    patience: int = 2  # epochs without a better held-out accuracy before stopping
    utility: bool = True
    attack: bool = True
    seed: int = 0
    threads: int = 2

    @classmethod
    def quick(cls) -> PrivacyLmConfig:
        return cls(epsilons=[math.inf, 8.0, 1.0], public=600, epochs=8)


# -- data ------------------------------------------------------------------------------------


def lm_config() -> Any:
    from benchmarks.bench_lm import LmBenchConfig

    cfg = LmBenchConfig.quick()
    cfg.taps_from, cfg.fedavg_lora = "torch", False
    return cfg


def mechanism(eps: float, delta: float, scales: np.ndarray, k: int, max_len: int) -> Any:
    """The device's mechanism at ``eps``: (taps (K, T, d) float32, rng) -> uploaded taps, or
    None for no noise (epsilon infinite: fp16 as uploaded)."""
    from fedmobillm.device_runtime.privacy import (
        clip_and_noise,
        int8_clip,
        noise_multiplier,
        sample_sigma,
    )

    if math.isinf(eps):
        return None
    z = noise_multiplier(eps, delta)
    clip = int8_clip(scales, z, k, max_len)

    def apply(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = t[None]  # (1, K, T, d)
        sigma = sample_sigma(z, k, np.asarray([t.shape[1]]))
        mask = np.ones((1, t.shape[1]), bool)
        return clip_and_noise(x, clip, sigma, rng, mask)[0]

    apply.z, apply.clip = z, clip  # type: ignore[attr-defined]
    return apply


def uploaded(taps: list[np.ndarray], mech: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """Each line's (K, T, d) taps as the device uploads them (fp16 values)."""
    out = []
    for t in taps:
        x = t if mech is None else mech(t, rng)
        out.append(x.astype(np.float16).astype(np.float32))
    return out


def positions(taps: list[np.ndarray]) -> np.ndarray:
    """(sum T, K * d): each position's tap vectors side by side."""
    return np.concatenate([t.transpose(1, 0, 2).reshape(t.shape[1], -1) for t in taps])


# -- the attacker ----------------------------------------------------------------------------


class Attacker:
    """Standardise, PCA to ``dims``, then the inverter, the nearest public position, the prior."""

    def __init__(self, cfg: PrivacyLmConfig, feats: np.ndarray, tokens: np.ndarray) -> None:
        self.cfg = cfg
        self.mu = feats.mean(0)
        self.sd = feats.std(0) + 1e-6
        z = (feats - self.mu) / self.sd
        rng = np.random.default_rng([cfg.seed, 7])
        fit = z[rng.choice(len(z), min(len(z), 20000), replace=False)]
        _, _, vt = np.linalg.svd(fit - fit.mean(0), full_matrices=False)
        self.basis = vt[: cfg.dims].T.astype(np.float32)  # (K*d, dims)
        self.pool = self.project(feats)
        self.pool_tokens = tokens
        ids, counts = np.unique(tokens, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        self.classes = ids[order][: cfg.vocab]
        self.prior = int(self.classes[0])
        self.model = self._fit(self.pool, tokens)

    def project(self, feats: np.ndarray) -> np.ndarray:
        return (((feats - self.mu) / self.sd) @ self.basis).astype(np.float32)

    def _fit(self, x: np.ndarray, tokens: np.ndarray) -> Any:
        import torch

        index = {int(t): i for i, t in enumerate(self.classes)}
        y = np.asarray([index.get(int(t), -1) for t in tokens], np.int64)
        keep = y >= 0  # positions of a token outside the classes cannot be learned
        rng = np.random.default_rng([self.cfg.seed, 11])
        held = rng.random(len(y)) < 0.1
        xt = torch.from_numpy(x)
        yt = torch.from_numpy(y)
        train = torch.from_numpy(np.flatnonzero(keep & ~held))
        val = torch.from_numpy(np.flatnonzero(held))
        torch.manual_seed(self.cfg.seed)
        model = torch.nn.Linear(x.shape[1], len(self.classes))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-5)
        best, best_state, since = -1.0, None, 0
        for epoch in range(self.cfg.epochs):
            perm = train[torch.randperm(len(train))]
            for i in range(0, len(perm), 256):
                b = perm[i : i + 256]
                loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc = float((model(xt[val]).argmax(1) == yt[val]).float().mean())
            log.info("inverter epoch %d: held-out public token accuracy %.3f", epoch + 1, acc)
            if acc > best:
                best, since = acc, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                since += 1
                if since >= self.cfg.patience:
                    break
        model.load_state_dict(best_state)
        self.public_heldout_accuracy = best
        return model

    def invert(self, feats: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            pred = self.model(torch.from_numpy(self.project(feats))).argmax(1).numpy()
        return self.classes[pred]

    def nearest(self, feats: np.ndarray) -> np.ndarray:
        q = self.project(feats)
        q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-9
        pool = self.pool / (np.linalg.norm(self.pool, axis=1, keepdims=True) + 1e-9)
        out = np.empty(len(q), np.int64)
        for i in range(0, len(q), 2048):
            out[i : i + 2048] = self.pool_tokens[np.argmax(q[i : i + 2048] @ pool.T, axis=1)]
        return out


def scores(pred: np.ndarray, true: np.ndarray, lengths: np.ndarray, decode: Any) -> dict:
    """Token recovery, exact lines and content-word P/R/F1 of the decoded lines."""
    from benchmarks._privacy_attack import bow_scores, stop_words, words

    stop = stop_words()
    off = np.concatenate([[0], np.cumsum(lengths)])
    exact, got, want = [], [], []
    for i in range(len(lengths)):
        p, t = pred[off[i] : off[i + 1]], true[off[i] : off[i + 1]]
        exact.append(bool((p == t).all()))
        got.append(words(decode(p), stop))
        want.append(words(decode(t), stop))
    bow = bow_scores(got, want)
    return {
        "token_recovery": float((pred == true).mean()),
        "exact_lines": float(np.mean(exact)),
        "precision": bow["precision"],
        "recall": bow["recall"],
        "f1": bow["f1"],
    }


# -- the run ---------------------------------------------------------------------------------


def run(cfg: PrivacyLmConfig) -> dict[str, Any]:
    import torch

    from benchmarks._privacy_data import public_texts
    from benchmarks.bench_lm import BACKBONES, MODEL, CachedTaps, fleet, splits

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    lcfg = lm_config()
    devices, val = fleet(lcfg)
    victims = [r.text for d in devices for r in d.train]
    public = public_texts(set(victims), cfg.public, cfg.seed).texts
    source = CachedTaps(lcfg)
    vt, pt = source.taps(victims), source.taps(public)
    from tokenizers import Tokenizer

    from fedmobillm.export.models import resolve_model

    tok = Tokenizer.from_file(str(Path(resolve_model(MODEL)) / "tokenizer.json"))

    def decode(ids: np.ndarray) -> str:
        return tok.decode([int(i) for i in ids])

    log.info("taps of %d victim and %d public lines in %.0f s", len(victims), len(public),
             time.perf_counter() - t0)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for b, taps in BACKBONES.items() if cfg.attack else ():
        v_taps = [t for t, _ in vt[b]]
        v_ids = np.concatenate([i for _, i in vt[b]])
        v_len = np.asarray([len(i) for _, i in vt[b]])
        p_taps = [t for t, _ in pt[b]]
        p_ids = np.concatenate([i for _, i in pt[b]])
        for eps in cfg.epsilons:
            t = time.perf_counter()
            mech = mechanism(eps, cfg.delta, source.scales[b], len(taps), lcfg.max_len)
            rng = np.random.default_rng([cfg.seed, len(rows), 1])
            att = Attacker(cfg, positions(uploaded(p_taps, mech, rng)), p_ids)
            feats = positions(uploaded(v_taps, mech, rng))
            row: dict[str, Any] = {
                "backbone": b,
                "epsilon": eps,
                "z": getattr(mech, "z", None),
                "clip": getattr(mech, "clip", None),
                "inverter": scores(att.invert(feats), v_ids, v_len, decode),
                "nearest": scores(att.nearest(feats), v_ids, v_len, decode),
                "prior": scores(np.full_like(v_ids, att.prior), v_ids, v_len, decode),
                "inverter_public_heldout": att.public_heldout_accuracy,
                "victim_positions": int(len(v_ids)),
                "victim_tokens_in_classes": float(np.isin(v_ids, att.classes).mean()),
                "attack_s": round(time.perf_counter() - t, 1),
            }
            log.info("%s epsilon %s: %s", b, eps, {k: row[k] for k in ("inverter", "nearest")})
            rows.append(row)
    utility = utility_rows(cfg, lcfg, devices, val, splits, source.scales) if cfg.utility else []
    return {
        "config": asdict(cfg) | {"epsilons": [_eps(e) for e in cfg.epsilons]},
        "victims": {"lines": len(victims), "corpus": "friends (bench_lm --quick training lines)"},
        "public": {"lines": len(public), "corpus": "tweets + NYT + Amazon snippets"},
        "attack": rows,
        "utility": utility,
        "seconds": round(time.perf_counter() - t0, 1),
        "load_avg_end": [round(x, 2) for x in __import__("os").getloadavg()],
    }


def utility_rows(
    cfg: PrivacyLmConfig, lcfg: Any, devices: list, val: list, splits: Any, scales: dict
) -> list:
    """bench_lm --quick's fedmobillm fleet on uploads noised at each epsilon: test
    perplexity per backbone (as the phone scores it), and the frozen model's. ``scales``:
    each backbone's tap scales (the device's default clip comes from them)."""
    from benchmarks.bench_lm import BACKBONES, MODEL, Bench
    from fedmobillm.server.lm import FrozenLMHead

    head = FrozenLMHead.from_model(MODEL)
    arch_of = {i: list(BACKBONES)[i % 2] for i in range(len(devices))}
    out = []
    for eps in cfg.epsilons:
        data = splits(lcfg, devices, val)
        for b, texts in data["train"].texts.items():  # the server sees noisy uploads
            mech = mechanism(eps, cfg.delta, scales[b], len(BACKBONES[b]), lcfg.max_len)
            if mech is None:
                continue
            acts = texts.acts
            rng = np.random.default_rng([cfg.seed, 3, int(eps * 1000)])
            off = np.concatenate([[0], np.cumsum(acts.lengths)])
            q = acts.q.astype(np.float32)
            for i in range(len(acts.lengths)):
                line = q[off[i] : off[i + 1]].transpose(1, 0, 2)  # (K, T, d)
                q[off[i] : off[i + 1]] = mech(line, rng).transpose(1, 0, 2)
            acts.q = q.astype(acts.q.dtype)
        bench = Bench(lcfg, data, arch_of, head)
        t = time.perf_counter()
        fed, _ = bench.fit(list(BACKBONES), "fleet", lcfg.batch_lines)
        for b in BACKBONES:
            r = bench.row("fedmobillm", b, fed)
            frozen = bench.score(None, "test", b)["perplexity"]
            out.append({"epsilon": _eps(eps), "backbone": b, "perplexity": r["perplexity"],
                        "val_perplexity": r.get("val_perplexity"), "frozen_perplexity": frozen,
                        "next_token_top1": r["next_token_top1"],
                        "train_s": round(time.perf_counter() - t, 1)})  # fmt: skip
    return out


def _eps(e: float) -> str | float:
    return "inf" if math.isinf(e) else e


# -- report ----------------------------------------------------------------------------------


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# What per-token lm uploads reveal (bench_privacy_lm)",
        "",
        f"Command: `{command}`; {result['victims']['lines']} victim lines "
        f"({result['victims']['corpus']}), {result['public']['lines']} public lines "
        f"({result['public']['corpus']}); {result['seconds']:.0f} s, load average at the end "
        f"{' / '.join(map(str, result['load_avg_end']))}.",
    ]
    if result["attack"]:
        lines += [
            "",
            "| backbone | epsilon | z | inverter token recovery | inverter exact lines | "
            "inverter word F1 | nearest token recovery | nearest word F1 | prior token recovery | "
            "prior word F1 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in result["attack"]:
        z = "-" if r["z"] is None else f"{r['z']:.3g}"
        inv, nn, pr = r["inverter"], r["nearest"], r["prior"]
        lines.append(
            f"| {r['backbone']} | {_eps(r['epsilon'])} | {z} | {inv['token_recovery']:.3f} | "
            f"{inv['exact_lines']:.3f} | {inv['f1']:.3f} | {nn['token_recovery']:.3f} | "
            f"{nn['f1']:.3f} | {pr['token_recovery']:.3f} | {pr['f1']:.3f} |"
        )
    if result["utility"]:
        lines += [
            "",
            "| backbone | epsilon | fedmobillm test perplexity | frozen | validation perplexity |",
            "|---|---|---|---|---|",
        ]
        for u in result["utility"]:
            lines.append(
                f"| {u['backbone']} | {u['epsilon']} | {u['perplexity']:.2f} | "
                f"{u['frozen_perplexity']:.2f} | {u['val_perplexity']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(7, 4))
    for k, b in enumerate(sorted({r["backbone"] for r in result["attack"]})):
        rows = [r for r in result["attack"] if r["backbone"] == b]
        xs = [64.0 if math.isinf(r["epsilon"]) else r["epsilon"] for r in rows]
        for attack, style in (("inverter", "-"), ("nearest", "--")):
            ax.plot(xs, [r[attack]["token_recovery"] for r in rows], f"C{k}{style}o",
                    label=f"{b} {attack}")  # fmt: skip
        ax.plot(xs, [r["prior"]["token_recovery"] for r in rows], f"C{k}:", label=f"{b} prior")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon per line (64 = no noise)")
    ax.set_ylabel("token recovery")
    ax.set_title("Per-token lm uploads: tokens an attacker recovers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_epsilons(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            e = math.inf if part in ("inf", "none") else float(part)
        except ValueError:
            raise FedMobiLLMError(
                f"--epsilons: {part!r} is not a number", hint="e.g. --epsilons inf,16,8,4,2,1"
            ) from None
        if e <= 0:
            raise FedMobiLLMError(f"--epsilons: {e} must be above 0 (inf: no noise)")
        out.append(e)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_privacy_lm", description=__doc__)
    p.add_argument("--quick", action="store_true", help="epsilons inf, 8, 1; 600 public lines")
    p.add_argument("--epsilons", default=None, help="comma-separated, inf = no noise")
    p.add_argument("--public", type=int, default=None, help="public lines the attacker forwards")
    p.add_argument("--no-utility", action="store_true", help="the attack only")
    p.add_argument("--no-attack", action="store_true", help="the utility only")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = PrivacyLmConfig.quick() if a.quick else PrivacyLmConfig()
    try:
        if a.epsilons:
            cfg.epsilons = parse_epsilons(a.epsilons)
        if a.public is not None:
            if a.public < 100:
                raise FedMobiLLMError(f"--public {a.public}: at least 100 lines")
            cfg.public = a.public
        cfg.utility, cfg.attack = not a.no_utility, not a.no_attack
        if not (cfg.utility or cfg.attack):
            raise FedMobiLLMError("--no-utility with --no-attack leaves nothing to run")
        result = run(cfg)
    except FedMobiLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python -m benchmarks.bench_privacy_lm " + " ".join(argv or sys.argv[1:])
    text = markdown(result, command)
    write_report(a.out, "privacy_lm", result, lambda _: text, plot if result["attack"] else None)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
