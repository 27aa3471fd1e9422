"""Where a device's records and state come from, for the CLI: a local data file (or a named
data set's split), its labels mapped onto the task's label names, the state folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)


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
        from fedmobillm.device_runtime.data import read_records

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


def _load_named(name: str):  # -> data.Dataset
    from fedmobillm.device_runtime.data import load_dataset

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
        from fedmobillm.device_runtime.data import read_records

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
