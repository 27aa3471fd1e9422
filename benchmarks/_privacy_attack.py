# Owner: G2.
"""The attacker of ``bench_privacy`` (issue 19): an honest-but-curious server that holds the
backbone bundle and public text, facing pivot uploads.

- ``words``: the bag of words of a sentence: lowercased ``[a-z0-9]`` runs (an inner
  apostrophe kept: "don't"), two characters or more, English stop words removed
  (scikit-learn's ``ENGLISH_STOP_WORDS``, 318 words). Every metric counts content words only.
- ``Inverter``: an MLP (activation (K*d) -> 1024 -> vocabulary logits, sigmoid) trained on
  the attacker's (public activation, bag of words) pairs; noise-aware: it is trained on
  public activations passed through the same mechanism as the uploads (fresh noise every
  epoch). Its decision rule (a probability threshold, or the k most probable words of each
  sentence) is chosen on the attacker's own held-out public text.
- ``nearest_sets``: the words of the nearest public sentence (Euclidean); ``prior_set``: the
  k most frequent public words (k chosen on public text), the same for every sentence.
- ``reidentify``: top-1 rate of the true sentence among candidates the attacker forwarded
  itself (row i of the uploads is candidate i).

Precision, recall and F1 are micro-averaged over sentences against each sentence's complete
set of content words (words outside the attacker's vocabulary count as misses)."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.privacy.attack")

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
THRESHOLDS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
TOP_K = (1, 2, 3, 4, 5, 6, 8, 10)

# noise: float taps (N, K, d) -> uploads as the server sees them (N, K, d), fresh each call
Mechanism = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def words(text: str, stop: frozenset[str]) -> frozenset[str]:
    """Content words of ``text`` (see the module docstring)."""
    toks = _TOKEN.findall(text.lower())
    return frozenset(t for t in toks if len(t) >= 2 and t not in stop)


def build_vocab(sets: Sequence[frozenset[str]], size: int, min_df: int = 2) -> list[str]:
    """The ``size`` words of most sentences (document frequency >= min_df)."""
    df = Counter(w for s in sets for w in s)
    ranked = sorted((w for w, c in df.items() if c >= min_df), key=lambda w: (-df[w], w))
    return ranked[:size]


def multi_hot(sets: Sequence[frozenset[str]], vocab: list[str]) -> np.ndarray:
    """(N, V) float32: 1 where the vocabulary word is in the sentence."""
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(sets), len(vocab)), np.float32)
    for r, s in enumerate(sets):
        for w in s:
            j = index.get(w)
            if j is not None:
                out[r, j] = 1.0
    return out


def bow_scores(pred: Sequence[frozenset[str]], true: Sequence[frozenset[str]]) -> dict:
    """Micro precision / recall / F1 over sentences, and the mean per-sentence F1."""
    if len(pred) != len(true):
        raise FedMobiLLMError(f"{len(pred)} predictions for {len(true)} sentences")
    hit = sum(len(p & t) for p, t in zip(pred, true, strict=True))
    n_pred = sum(len(p) for p in pred)
    n_true = sum(len(t) for t in true)
    prec = hit / n_pred if n_pred else 0.0
    rec = hit / n_true if n_true else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    per = [
        2 * len(p & t) / (len(p) + len(t)) if len(p) + len(t) else 1.0
        for p, t in zip(pred, true, strict=True)
    ]
    return {
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "sentence_f1": float(np.mean(per)) if per else 0.0,
        "words_predicted_per_sentence": n_pred / max(1, len(pred)),
        "sentences": len(pred),
    }


# -- baselines -------------------------------------------------------------------------------


def prior_set(
    public: Sequence[frozenset[str]], val: Sequence[frozenset[str]], vocab: list[str]
) -> frozenset[str]:
    """The unigram prior: the k most frequent public words, k in 0..20 maximising F1 on
    the attacker's held-out public sentences ``val``."""
    df = Counter(w for s in public for w in s)
    ranked = [w for w, _ in df.most_common(20)]
    best = max(
        range(0, 21), key=lambda k: bow_scores([frozenset(ranked[:k])] * len(val), val)["f1"]
    )
    return frozenset(ranked[:best])


def nearest_sets(
    queries: np.ndarray, public: np.ndarray, public_sets: Sequence[frozenset[str]], batch: int = 512
) -> list[frozenset[str]]:
    """Words of the nearest public sentence (Euclidean over the flattened taps) for each
    query; queries (n, K, d), public (m, K, d)."""
    return [public_sets[j] for j in nearest(queries, public, batch)]


def nearest(queries: np.ndarray, pool: np.ndarray, batch: int = 512) -> np.ndarray:
    """(n,) index of the nearest row of ``pool`` (m, ...) for each of ``queries`` (n, ...)."""
    import torch

    p = torch.from_numpy(pool.reshape(len(pool), -1).astype(np.float32))  # (m, F)
    p2 = (p * p).sum(1)  # (m,)
    out = []
    for s in range(0, len(queries), batch):
        q = torch.from_numpy(queries[s : s + batch].reshape(-1, p.shape[1]).astype(np.float32))
        d = p2[None, :] - 2.0 * q @ p.T  # (b, m): squared distance up to |q|^2
        out.append(d.argmin(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def reidentify(uploads: np.ndarray, candidates: np.ndarray) -> float:
    """Top-1 rate: upload i (n, K, d) is nearest to candidate i among all n (n, K, d)."""
    return float((nearest(uploads, candidates) == np.arange(len(uploads))).mean())


# -- the inversion model ---------------------------------------------------------------------


@dataclass
class InverterConfig:
    hidden: int = 1024
    vocab: int = 3000
    epochs: int = 30
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    patience: int = 4  # epochs without a better public-validation loss


class Inverter:
    """activation -> bag of words, trained on public text through ``mechanism``."""

    def __init__(self, cfg: InverterConfig, vocab: list[str], features: int, seed: int) -> None:
        import torch
        from torch import nn

        torch.manual_seed(seed)
        self.cfg, self.vocab, self.seed = cfg, vocab, seed
        self.net = nn.Sequential(
            nn.Linear(features, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, len(vocab)),
        )
        self.mean = np.zeros(features, np.float32)
        self.std = np.ones(features, np.float32)
        self.rule: tuple[str, float] = ("threshold", 0.5)  # or ("top-k", k)

    def _inputs(self, x: np.ndarray) -> object:
        import torch

        flat = x.reshape(len(x), -1).astype(np.float32)  # (N, K*d)
        return torch.from_numpy((flat - self.mean) / self.std)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, V) logits for uploads x (N, K, d)."""
        import torch

        self.net.eval()
        with torch.no_grad():
            return torch.cat(
                [self.net(self._inputs(x[s : s + 1024])) for s in range(0, len(x), 1024)]
            ).numpy()

    def predict(self, x: np.ndarray) -> list[frozenset[str]]:
        return self._decide(self.logits(x), self.rule)

    def _decide(self, logits: np.ndarray, rule: tuple[str, float]) -> list[frozenset[str]]:
        """Word sets from logits (N, V) by ``rule``."""
        kind, value = rule
        if kind == "top-k":
            top = np.argsort(-logits, axis=1)[:, : int(value)]  # (N, k)
            return [frozenset(self.vocab[j] for j in row) for row in top]
        keep = logits >= np.log(value / (1.0 - value))  # (N, V): sigmoid(logit) >= value
        return [frozenset(self.vocab[j] for j in np.flatnonzero(row)) for row in keep]

    def fit(
        self,
        taps: np.ndarray,
        sets: Sequence[frozenset[str]],
        val_taps: np.ndarray,
        val_sets: Sequence[frozenset[str]],
        mechanism: Mechanism,
    ) -> dict:
        """Train on public float taps (N, K, d) passed through ``mechanism`` with fresh noise
        every epoch; early stopping and the threshold on the held-out public ``val_*``
        (noised once). Returns a summary."""
        import torch
        import torch.nn.functional as F

        cfg, rng = self.cfg, np.random.default_rng([self.seed, 11])
        y = torch.from_numpy(multi_hot(sets, self.vocab))  # (N, V)
        yv = torch.from_numpy(multi_hot(val_sets, self.vocab))
        xv = mechanism(val_taps, rng)
        first = mechanism(taps, rng)
        flat = first.reshape(len(first), -1)
        self.mean, self.std = flat.mean(0), flat.std(0) + 1e-6
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best, best_state, bad, epochs = np.inf, None, 0, 0
        for epoch in range(cfg.epochs):
            x = self._inputs(first if epoch == 0 else mechanism(taps, rng))
            self.net.train()
            order = torch.from_numpy(rng.permutation(len(y)))
            for s in range(0, len(y), cfg.batch):
                rows = order[s : s + cfg.batch]
                loss = F.binary_cross_entropy_with_logits(self.net(x[rows]), y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            epochs = epoch + 1
            vl = float(F.binary_cross_entropy_with_logits(torch.from_numpy(self.logits(xv)), yv))
            if vl < best - 1e-5:
                best, bad = vl, 0
                best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.rule = self._choose_rule(xv, val_sets)
        return {"epochs": epochs, "val_bce": best, "rule": list(self.rule)}

    def _choose_rule(self, xv: np.ndarray, val_sets: Sequence[frozenset[str]]) -> tuple[str, float]:
        """The threshold or top-k with the best micro F1 on the attacker's public ``xv``."""
        logits = self.logits(xv)  # (n, V)
        rules = [("threshold", float(t)) for t in THRESHOLDS] + [("top-k", float(k)) for k in TOP_K]
        return max(rules, key=lambda r: bow_scores(self._decide(logits, r), val_sets)["f1"])
