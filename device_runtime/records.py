"""Where a device's records and state come from: ``Record``, a local .jsonl / .csv file read
with ``read_records`` (torch-free, no numpy), and for the CLI a local data file (or a named
data set's split, via ``fedmobillm.data``) with its labels mapped onto the task's label
names, and the state folder."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)

MAX_REPORTED_ROWS = 20


@dataclass(frozen=True)
class Record:
    text: str
    label: int  # index into the dataset's label_names


def resolve_state_dir(state: Path | None, name: str | None) -> Path:
    """--state, else cache/devices/--name, else the only device registered in the cache."""
    if state:
        return Path(state)
    root = cache_dir() / "devices"
    if name:
        return root / name
    found = sorted(p.parent for p in root.glob("*/device.json")) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    names = ", ".join(p.name for p in found) or "none"
    raise FedMobiLLMError(
        f"which device? pass --state DIR or --name NAME (devices in {root}: {names})"
    )


def label_names_from(labels_csv: str | None, data: str | None) -> list[str]:
    """Label names from ``--labels a,b`` or from a data set / local file."""
    if labels_csv:
        names = [s.strip() for s in labels_csv.split(",") if s.strip()]
        if len(names) < 2 or len(set(names)) != len(names):
            raise FedMobiLLMError(
                f"--labels {labels_csv!r}: give at least two distinct names, comma-separated"
            )
        return names
    if data is None:
        raise FedMobiLLMError("pass --labels a,b,... or --data FILE_OR_NAME")
    if Path(data).is_file():
        records, names = read_records(Path(data))
        names = list(names) or sorted({str(r.label) for r in records})
    else:
        names = list(_load_named(data).label_names)
    if len(names) < 2:
        raise FedMobiLLMError(
            f"{data} has fewer than two label names ({names})",
            hint="pass the task's labels with --labels a,b,...",
        )
    return names


def _load_named(name: str):  # -> fedmobillm.data.Dataset
    from fedmobillm.data import load_dataset

    return load_dataset(name)


def device_records(
    data: str,
    split: str,
    task_labels: Sequence[str],
    skip_bad_rows: bool = False,
    limit: int | None = None,
) -> list:
    """The records a device uploads: a local file's rows (labels mapped onto the task's
    label names), or a named data set's ``split``; the first ``limit`` of them."""
    if limit is not None and limit < 1:
        raise FedMobiLLMError("--limit must be at least 1")
    if Path(data).is_file():
        records, _ = read_records(  # labels index the task's names (the server's order)
            Path(data), skip_bad_rows=skip_bad_rows, label_names=list(task_labels) or None
        )
    elif Path(data).suffix in (".jsonl", ".csv", ".json", ".tsv") or "/" in data:
        raise FedMobiLLMError(f"data file {data} does not exist")
    else:
        ds = _load_named(data)
        if split not in ds.splits:
            raise FedMobiLLMError(f"data set {data} has no split {split!r} ({list(ds.splits)})")
        records = _map_labels(list(ds.splits[split]), list(ds.label_names), list(task_labels), data)
    if not records:
        raise FedMobiLLMError(f"{data} holds no records")
    return records[:limit] if limit else records


def _map_labels(records: list, source: list[str], task: list[str], where: str) -> list:
    """Re-index labels from the source's label names onto the task's (server's) order."""
    if not source or not task or source == task:
        return records
    unknown = sorted(set(source) - set(task))
    if unknown:
        raise FedMobiLLMError(
            f"{where} uses labels {unknown} that the task does not have ({task})",
            hint="fix the data, or register the device for a task with these labels",
        )
    remap = {i: task.index(name) for i, name in enumerate(source)}
    return [type(r)(r.text, remap.get(r.label, r.label)) for r in records]


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


# --------------------------------------------------------------------------- task lm


def lm_device_records(
    data: str, skip_bad_rows: bool = False, limit: int | None = None, split: str = "train"
) -> list:
    """The text of an lm device (``fedmobillm.data.lm.LmRecord``: ``text``, ``prompt``):
    a local .jsonl file with ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` per
    line (an empty text is a bad row: an error naming its line, or skipped and logged with
    ``skip_bad_rows``), or a named lm corpus (all of it, so only for ``split`` train: its
    validation would be the same records); the first ``limit`` records."""
    from fedmobillm.data.lm import LM_CORPORA, load_lm_corpus

    if limit is not None and limit < 1:
        raise FedMobiLLMError("--limit must be at least 1")
    if split != "train" and str(data) in LM_CORPORA:
        raise FedMobiLLMError(
            f"--split {split} with the named corpus {data}: a named lm corpus is read whole, "
            "so its validation would be the same records as its train",
            hint="split it into per-device train and held-out .jsonl files first (as "
            "`fedmobillm demo --task lm` does with fedmobillm.data.lm.write_lm_devices) and "
            "pass the held-out file with --split validation",
        )
    if Path(data).suffix.lower() == ".csv":
        raise FedMobiLLMError(
            f"{data}: task lm reads .jsonl files",
            hint='one JSON object per line: {"text": ...} or {"prompt": ..., "response": ...}',
        )
    records = list(load_lm_corpus(data, skip_bad_rows=skip_bad_rows).records)
    return records[:limit] if limit else records
