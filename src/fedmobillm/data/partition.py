"""Partitions of records across simulated devices: IID or Dirichlet over labels, written
as one jsonl file per device."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmobillm.data.catalogue import label_counts, write_jsonl
from fedmobillm.device_runtime.records import Record
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import ensure_dir

OUT_HINT = "pass --out a folder (created if missing), not a file"


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
    ensure_dir(out, "output folder", hint=OUT_HINT)
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
