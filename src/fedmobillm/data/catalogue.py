"""The named data sets, their cache, and ``load_dataset`` for a name, a local file or a
Hugging Face ``datasets`` folder."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmobillm.data.fetch import ORANGE, VADER, orange_tab, publish, staging, vader_file
from fedmobillm.data.splits import (
    DATASET_SPLITS,
    SPLIT_RULE_A,
    SPLIT_RULE_B,
    split_parts,
    stratified_split,
)
from fedmobillm.device_runtime.records import Record, read_records
from fedmobillm.errors import FedMobiLLMError, did_you_mean
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


@dataclass
class Dataset:
    name: str
    label_names: list[str]
    splits: dict[str, list[Record]]  # "train" / "validation" / "test"
    description: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {label name: records}}."""
        return {s: label_counts(recs, self.label_names) for s, recs in self.splits.items()}

    def total(self) -> int:
        return sum(len(r) for r in self.splits.values())


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str
    summary: str
    load: Callable[[], tuple[list[str], dict[str, list[Record]]]]  # -> names, {part: records}


def label_counts(records: Iterable[Record], label_names: list[str]) -> dict[str, int]:
    counts = np.bincount([r.label for r in records], minlength=len(label_names))  # (C,)
    return {name: int(c) for name, c in zip(label_names, counts, strict=False)}


# --------------------------------------------------------------------------- named sets

SENTIMENT = ["negative", "positive"]


def _vader_loader(filename: str) -> Callable[[], tuple[list[str], dict[str, list[Record]]]]:
    def load() -> tuple[list[str], dict[str, list[Record]]]:
        records = []
        for line in vader_file(filename).splitlines():
            parts = line.split("\t", 2)
            if len(parts) != 3 or not parts[2].strip():
                continue
            rating = float(parts[1])
            if rating != 0:
                records.append(Record(parts[2].strip(), int(rating > 0)))
        return list(SENTIMENT), {"all": records}

    return load


def _by_name(*parts: Iterable[tuple[str, str]]) -> tuple[list[str], list[list[Record]]]:
    """Label names (sorted) and records for each part of (text, label name) rows."""
    clean = [[(t.strip(), y.strip()) for t, y in rows if t.strip() and y.strip()] for rows in parts]
    names = sorted({y for rows in clean for _, y in rows})
    index = {n: i for i, n in enumerate(names)}
    return names, [[Record(t, index[y]) for t, y in rows] for rows in clean]


def _orange_columns(filename: str, text_col: str, label_col: str) -> list[tuple[str, str]]:
    header, rows = orange_tab(filename)
    ti, li = header.index(text_col), header.index(label_col)
    return [(r[ti], r[li]) for r in rows if len(r) > max(ti, li)]


def _orange_official(stem: str) -> Callable[[], tuple[list[str], dict[str, list[Record]]]]:
    def load() -> tuple[list[str], dict[str, list[Record]]]:
        train = _orange_columns(f"{stem}-train.tab", "Text", "Category")
        test = _orange_columns(f"{stem}-test.tab", "Text", "Category")
        names, (train_recs, test_recs) = _by_name(train, test)
        return names, {"train": train_recs, "test": test_recs}

    return load


def _election() -> tuple[list[str], dict[str, list[Record]]]:
    names, (records,) = _by_name(_orange_columns("election-tweets-2016.tab", "Content", "Author"))
    return names, {"all": records}


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "movie-snippets",
            VADER,
            "Rotten Tomatoes sentences, negative/positive",
            _vader_loader("movieReviewSnippets_GroundTruth.txt"),
        ),
        DatasetSpec(
            "tweets", VADER, "tweets, negative/positive", _vader_loader("tweets_GroundTruth.txt")
        ),
        DatasetSpec(
            "nyt-snippets",
            VADER,
            "NYT editorial snippets, negative/positive",
            _vader_loader("nytEditorialSnippets_GroundTruth.txt"),
        ),
        DatasetSpec(
            "election-tweets", ORANGE, "2016 US election tweets, label = author", _election
        ),
        DatasetSpec(
            "20newsgroups",
            ORANGE,
            "20 Newsgroups posts (lowercased), 20 topics",
            _orange_official("20newsgroups"),
        ),
        DatasetSpec(
            "reuters-r8",
            ORANGE,
            "Reuters-21578 R8 newswire, 8 topics",
            _orange_official("reuters-r8"),
        ),
    )
}


# --------------------------------------------------------------------------- cache


def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r.text, "label": r.label}, ensure_ascii=False) + "\n")


def _cache_path(name: str, seed: int) -> Path:
    return cache_dir() / "data" / name / f"seed-{seed}"


def _read_cached(folder: Path, name: str) -> Dataset | None:
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        splits = {}
        for s in DATASET_SPLITS:
            with (folder / f"{s}.jsonl").open(encoding="utf-8") as f:
                splits[s] = [Record(d["text"], int(d["label"])) for d in map(json.loads, f)]
        if (
            meta.get("format") != FORMAT_VERSION
            or {s: len(v) for s, v in splits.items()} != meta["sizes"]
        ):
            return None
    except (OSError, ValueError, KeyError):
        log.warning("cached data in %s is damaged: rebuilding", folder)
        return None
    return Dataset(name, meta["label_names"], splits, meta.get("description", ""))


def _write_cached(folder: Path, ds: Dataset, source: str, rule: str, seed: int) -> None:
    tmp = staging(folder)
    tmp.mkdir(parents=True)
    for s in DATASET_SPLITS:
        write_jsonl(tmp / f"{s}.jsonl", ds.splits[s])
    meta = {
        "format": FORMAT_VERSION,
        "name": ds.name,
        "label_names": ds.label_names,
        "source": source,
        "split": rule,
        "seed": seed,
        "description": ds.description,
        "sizes": {s: len(ds.splits[s]) for s in DATASET_SPLITS},
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    publish(tmp, folder)


def fetch_dataset(name: str, seed: int = 0) -> Dataset:
    """A named set: downloaded, normalised and split once per seed, then read from cache."""
    spec = DATASETS.get(name)
    if spec is None:
        raise unknown_dataset_error(name)
    folder = _cache_path(name, seed)
    cached = _read_cached(folder, name)
    if cached is not None:
        return cached
    label_names, parts = spec.load()
    rule = SPLIT_RULE_A if "all" in parts else SPLIT_RULE_B
    ds = Dataset(name, label_names, split_parts(parts, seed), spec.summary)
    _write_cached(folder, ds, spec.source, rule, seed)
    log.info("%s: %d records cached in %s", name, ds.total(), folder)
    return ds


def unknown_dataset_error(name: str) -> FedMobiLLMError:
    return FedMobiLLMError(
        f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known datasets: "
        f"{', '.join(DATASETS)}",
        hint="pass a known name, a local .jsonl/.csv file (columns text,label), "
        "or a Hugging Face datasets folder",
    )


def load_dataset(
    name_or_path: str | os.PathLike, seed: int = 0, *, skip_bad_rows: bool = False
) -> Dataset:
    """A named set, a local .jsonl / .csv file (split A), or a HF ``datasets`` folder.
    ``skip_bad_rows`` applies to local files (see ``read_records``)."""
    text = str(name_or_path)
    if text in DATASETS:
        return fetch_dataset(text, seed)
    path = Path(text).expanduser()
    if path.is_file():
        records, names = read_records(path, skip_bad_rows=skip_bad_rows)
        idx = stratified_split([r.label for r in records], (0.8, 0.1, 0.1), seed)
        splits = {s: [records[i] for i in ix] for s, ix in zip(DATASET_SPLITS, idx, strict=True)}
        return Dataset(path.stem, names, splits, f"local file {path}")
    if path.is_dir():
        return _load_hf_folder(path, seed)
    if path.suffix.lower() in (".jsonl", ".csv") or "/" in text or os.sep in text:
        raise FedMobiLLMError(
            f"data file {path} does not exist",
            hint=f"check the path, or use a named set: {', '.join(DATASETS)}",
        )
    raise unknown_dataset_error(text)


# --------------------------------------------------------------------------- HF datasets


def _load_hf_folder(path: Path, seed: int) -> Dataset:
    try:
        import datasets as hf  # optional
    except ImportError as exc:
        raise FedMobiLLMError(
            f"{path} is a folder; reading Hugging Face datasets folders needs the `datasets` package",
            hint="pip install datasets, or pass a .jsonl/.csv file with columns text,label",
        ) from exc
    try:
        loaded = hf.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise FedMobiLLMError(f"{path} is not a Hugging Face datasets folder: {exc}") from exc
    parts = dict(loaded) if isinstance(loaded, hf.DatasetDict) else {"all": loaded}
    first = next(iter(parts.values()))
    text_col = next((c for c in ("text", "sentence", "content") if c in first.column_names), None)
    if text_col is None or "label" not in first.column_names:
        raise FedMobiLLMError(
            f"{path}: needs columns text (or sentence) and label; has {first.column_names}"
        )
    feature = first.features["label"]
    names = list(feature.names) if hasattr(feature, "names") else None
    raw = {
        k: [(str(t), lab) for t, lab in zip(v[text_col], v["label"], strict=True)]
        for k, v in parts.items()
    }
    if names is None:
        names = sorted({str(lab) for rows in raw.values() for _, lab in rows})
    index = {n: i for i, n in enumerate(names)}
    recs = {
        k: [Record(t, lab if isinstance(lab, int) else index[str(lab)]) for t, lab in rows]
        for k, rows in raw.items()
    }
    aliases = {"valid": "validation", "dev": "validation"}
    recs = {aliases.get(k, k): v for k, v in recs.items()}
    if set(DATASET_SPLITS) <= set(recs):
        splits = {s: recs[s] for s in DATASET_SPLITS}
    elif "train" in recs and "test" in recs:
        splits = split_parts({"train": recs["train"], "test": recs["test"]}, seed)
    else:
        splits = split_parts({"all": [r for v in recs.values() for r in v]}, seed)
    return Dataset(path.name, names, splits, f"Hugging Face datasets folder {path}")
