"""Probe on the token cache: logistic regression on the masked mean / last token of the last tap
(validation only), C grid as bench_accuracy's."""

import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from benchmarks._activations import BundleSpec, bundle_for, extract_tokens
from benchmarks.bench_accuracy import AccuracyConfig

b = sys.argv[1]
cfg = AccuracyConfig.for_mode(True)
bundle = bundle_for(BundleSpec(b, cfg.taps, cfg.quant, cfg.max_seq_len, pivot="none"))
tr = extract_tokens(bundle, "movie-snippets", "train", 1000, seed=cfg.seed)
va = extract_tokens(bundle, "movie-snippets", "validation", 500, seed=cfg.seed)


def feats(a, how):
    off = a.offsets
    out = []
    for i in range(len(a)):
        t = a.q[off[i] : off[i + 1], -1].astype(np.float32) * a.scales[-1]  # (L, d)
        out.append(t.mean(0) if how == "mean" else t[-1])
    return np.stack(out)


print("probe_cs", cfg.probe_cs)
for how in ("mean", "last"):
    xtr, xva = feats(tr, how), feats(va, how)
    sc = StandardScaler().fit(xtr)
    for c in cfg.probe_cs:
        clf = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(xtr), tr.y)
        print(b, how, c, round(100 * clf.score(sc.transform(xva), va.y), 2))
