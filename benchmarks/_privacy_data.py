# Owner: G2.
"""Texts and float taps of ``bench_privacy`` (issue 19).

- Victim: a data set's split (``movie-snippets``: the devices' data), in the order
  ``benchmarks._activations.split_order`` reads it, so a subset is the same records
  ``extract`` covers.
- Public (the attacker's): other corpora of the same archive, never the victim's
  (NYT editorial snippets, tweets and Amazon review snippets of vaderSentiment's
  ground-truth files), de-duplicated against the victim's texts.

``float_taps`` forwards texts through a bundle exactly as ``_activations`` does (the device
runtime's ``Backbone``, batches of 32, ``FORWARD_BATCH`` at a time in order of token length)
but keeps the float32 taps, because the device clips and noises before it quantizes. Cached
under ``cache_dir()/privacy-taps/`` in chunks keyed by (bundle digest, texts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.privacy.data")

CHUNK = 500
CACHE_VERSION = 1
PUBLIC_SETS = ("nyt-snippets", "tweets")
AMAZON_FILE = "amazonReviewSnippets_GroundTruth.txt"


@dataclass
class Texts:
    texts: list[str]
    labels: np.ndarray  # (N,) int64 (-1: none)
    source: str


def victim_split(dataset: str, split: str, limit: int | None, seed: int) -> Texts:
    """The first ``limit`` records of ``split`` in ``split_order``."""
    from benchmarks._activations import split_order
    from fedmobillm.data import load_dataset

    recs = load_dataset(dataset, seed=seed).splits[split]
    order = split_order(len(recs), seed)[: limit if limit is not None else len(recs)]
    return Texts(
        [recs[i].text for i in order],
        np.asarray([recs[i].label for i in order], np.int64),
        f"{dataset}/{split}",
    )


def _amazon_texts() -> list[tuple[str, int]]:
    """(text, label) of the Amazon snippets: label 1 for a mean rating above 0, 0 below, -1
    for a zero rating (as the vader data sets label theirs)."""
    from fedmobillm.data.fetch import vader_file

    out = []
    for line in vader_file(AMAZON_FILE).splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[2].strip():
            rating = float(parts[1])
            out.append((parts[2].strip(), int(rating > 0) if rating != 0 else -1))
    return out


def public_texts(exclude: set[str], limit: int | None, seed: int) -> Texts:
    """The attacker's public text (see the module docstring), shuffled (seeded), texts in
    ``exclude`` (the victim corpus) and duplicates dropped, the first ``limit``. Its labels
    are the public corpora's own sentiment (1 positive, 0 negative, -1 a zero Amazon
    rating): public, like the texts (a supervised projection is fitted on them)."""
    from fedmobillm.data import load_dataset

    pool: list[tuple[str, int]] = []
    for name in PUBLIC_SETS:
        ds = load_dataset(name, seed=seed)
        if list(ds.label_names) != ["negative", "positive"]:
            raise FedMobiLLMError(f"{name}: labels {ds.label_names}, not negative/positive")
        pool += [
            (r.text, int(r.label)) for s in ("train", "validation", "test") for r in ds.splits[s]
        ]
    pool += _amazon_texts()
    seen = set(exclude)
    unique = []
    for t, y in pool:
        if t not in seen:
            seen.add(t)
            unique.append((t, y))
    order = np.random.default_rng([seed, 19]).permutation(len(unique))
    chosen = [unique[i] for i in order[: limit if limit is not None else len(unique)]]
    return Texts(
        [t for t, _ in chosen],
        np.asarray([y for _, y in chosen], np.int64),
        "+".join((*PUBLIC_SETS, "amazon-snippets")),
    )


def float_taps(bundle_dir: Path, texts: list[str], threads: int = 1, batch: int = 32) -> np.ndarray:
    """(N, K, d) float32 pivot taps of ``texts`` through the bundle, as a device computes
    them before quantizing (cached in chunks)."""
    from fedmobillm.device_runtime.backbone import FORWARD_BATCH, Backbone

    if not texts:
        raise FedMobiLLMError("float_taps: no texts to forward")
    backbone: Backbone | None = None
    out = []
    for s in range(0, len(texts), CHUNK):
        chunk = texts[s : s + CHUNK]
        path = _chunk_path(bundle_dir, chunk)
        x = _read(path, len(chunk))
        if x is None:
            if backbone is None:
                backbone = Backbone(bundle_dir, backend="onnx", threads=threads)
            x = np.concatenate(
                [backbone(chunk[b : b + batch], FORWARD_BATCH) for b in range(0, len(chunk), batch)]
            )  # (n, K, d)
            _write(path, x)
            log.info("forwarded %d/%d texts", min(s + CHUNK, len(texts)), len(texts))
        out.append(x)
    return np.concatenate(out)


def _chunk_path(bundle_dir: Path, chunk: list[str]) -> Path:
    from fedmobillm.device_runtime.backbone import load_verified_bundle
    from fedmobillm.device_runtime.protocol import bundle_digest
    from fedmobillm.paths import cache_dir

    digest = _digest_cache.get(bundle_dir)
    if digest is None:
        digest = bundle_digest(load_verified_bundle(bundle_dir))
        _digest_cache[bundle_dir] = digest
    h = hashlib.sha256(json.dumps([CACHE_VERSION, digest, chunk]).encode()).hexdigest()[:20]
    return cache_dir() / "privacy-taps" / f"{h}.safetensors"


_digest_cache: dict[Path, str] = {}


def _read(path: Path, n: int) -> np.ndarray | None:
    from safetensors.numpy import load_file

    if not path.is_file():
        return None
    try:
        x = load_file(str(path))["taps"]
    except Exception as exc:  # a torn or foreign file: recompute it
        log.warning("ignoring unreadable cache file %s: %s", path, exc)
        return None
    return x if len(x) == n else None


def _write(path: Path, x: np.ndarray) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file({"taps": np.ascontiguousarray(x, np.float32)}, str(tmp))
    os.replace(tmp, path)
