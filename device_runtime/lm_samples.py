"""The lm task's samples on the device (torch-free): records ``{"text": ...}`` or
``{"prompt": ..., "response": ...}`` (``fedmobillm.data.lm.LmRecord``) tokenized exactly as
``device_runtime.generate.Generator`` tokenizes what it scores (the bundle's tokenizer,
the manifest's ``add_special_tokens``, no truncation): a text is ``encode(text)``; a
prompt/response pair is ``encode(prompt + "\\n") + encode(response, special=False)`` with
the loss on the response's tokens only.

A sequence longer than the bundle's ``max_seq_len`` (T) is split into windows of at most
T tokens that overlap by one token (starts 0, T-1, 2(T-1), ...): a window's first token has
nothing before it and is no target, so every target token of the record is a target in
exactly one window, seen with the context of its own window only. A window with no target
(one that holds only prompt tokens) is dropped. A record with no target at all (a text of
one token) is skipped and counted; nothing is truncated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmobillm.data.lm import PROMPT_SEPARATOR  # as LmRecord.scored() joins them
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

SHOWN_SKIPPED = 10  # record indices of skipped records named in the log

Encode = Callable[[str, "bool | None"], list[int]]  # (text, add special tokens?) -> ids


@dataclass(frozen=True)
class LmSample:
    """One upload sample of the lm task: a window of one record's token ids.

    ``text`` names the window for the journal's data check (the record's text and the
    window's place); ``label`` is -1 (the targets are the tokens)."""

    text: str
    token_ids: tuple[int, ...]  # (L,), 2 <= L <= max_seq_len
    first: int  # positions first..L-1 are next-token targets; 1 <= first < L
    record: int  # index of the record it comes from
    label: int = -1

    def loss_mask(self) -> np.ndarray:
        """uint8 (L,): 1 at the target positions."""
        mask = np.zeros(len(self.token_ids), np.uint8)
        mask[self.first :] = 1
        return mask


@dataclass
class LmPrepared:
    """The samples of a run's records and what happened to the records on the way."""

    samples: list[LmSample]
    records: int  # records read
    max_seq_len: int
    windowed: int = 0  # records longer than max_seq_len, split into several windows
    skipped: int = 0  # records without any target token (one token), not uploaded
    skipped_records: list[int] = field(default_factory=list)  # their indices
    target_tokens: int = 0  # next-token targets over all samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "samples": len(self.samples),
            "windowed_records": self.windowed,
            "skipped_records": self.skipped,
            "truncated_records": 0,
            "target_tokens": self.target_tokens,
            "max_seq_len": self.max_seq_len,
            "windowing": "records longer than max_seq_len are split into windows of at most "
            "max_seq_len tokens overlapping by one token; nothing is truncated",
        }

    def line(self) -> str:
        return (
            f"{self.records} records -> {len(self.samples)} samples: {self.windowed} records "
            f"longer than max_seq_len {self.max_seq_len} split into windows (none truncated), "
            f"{self.skipped} skipped (one token: nothing to predict); "
            f"{self.target_tokens:,} target tokens"
        )


def record_ids(record: Any, encode: Encode) -> tuple[list[int], int]:
    """(token ids, first target position) of one record as the generator scores it: a
    text from position 1; a prompt/response pair from the response's first token."""
    prompt = getattr(record, "prompt", None)
    if prompt is None:
        return encode(record.text, None), 1
    head = encode(prompt + PROMPT_SEPARATOR, None)
    return head + encode(record.text, False), max(1, len(head))


def windows(ids: Sequence[int], first: int, max_len: int) -> list[tuple[list[int], int]]:
    """(window ids, window's first target) of a sequence whose targets are positions >=
    ``first``: windows of at most ``max_len`` tokens starting at 0, max_len-1, ...; the
    windows without a target are left out."""
    if max_len < 2:
        raise FedMobiLLMError(f"max_seq_len {max_len} is too short for lm windows (>= 2)")
    out, n, step = [], len(ids), max_len - 1
    for start in range(0, max(n - 1, 0), step):
        window = list(ids[start : start + max_len])
        local = max(1, first - start)
        if local < len(window):
            out.append((window, local))
    return out


def record_key(record: Any) -> str:
    """The record's text as the journal's data check sees it (prompt and response)."""
    prompt = getattr(record, "prompt", None)
    return record.text if prompt is None else f"{prompt}{PROMPT_SEPARATOR}\x1d{record.text}"


def lm_samples(records: Sequence[Any], encode: Encode, max_len: int) -> LmPrepared:
    """Every record's windows, in record order (sample id = position in the list: stable
    while records are appended). ``records`` have ``text`` and ``prompt`` (None or str)."""
    prep = LmPrepared([], len(records), int(max_len))
    for r, record in enumerate(records):
        ids, first = record_ids(record, encode)
        parts = windows(ids, first, prep.max_seq_len)
        if not parts:
            prep.skipped += 1
            prep.skipped_records.append(r)
            continue
        prep.windowed += int(len(parts) > 1)
        key = record_key(record)
        for w, (window, local) in enumerate(parts):
            prep.samples.append(LmSample(f"{key}\x1e{w}", tuple(window), local, r))
            prep.target_tokens += len(window) - local
    if prep.skipped:
        shown = ", ".join(map(str, prep.skipped_records[:SHOWN_SKIPPED]))
        log.warning(
            "skipping %d of %d records with nothing to predict (a single token): record(s) %s%s",
            prep.skipped, prep.records, shown, " ..." if prep.skipped > SHOWN_SKIPPED else "",
        )  # fmt: skip
    if not prep.samples:
        raise FedMobiLLMError(
            f"none of the {prep.records} records has a token to predict (each is one token)",
            hint="an lm record needs at least two tokens (a response at least one)",
        )
    return prep


def lm_arrays(samples: Sequence[LmSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token_ids int64 [N, T], loss_mask uint8 [N, T], lengths int64 [N]) of a batch, T =
    its longest sample, 0 at padding (the wire's lm layout, ``serde.check_lm``)."""
    lengths = np.array([len(s.token_ids) for s in samples], dtype=np.int64)  # (N,)
    t = int(lengths.max())
    ids = np.zeros((len(samples), t), np.int64)  # (N, T)
    mask = np.zeros((len(samples), t), np.uint8)  # (N, T)
    for i, s in enumerate(samples):
        ids[i, : lengths[i]] = s.token_ids
        mask[i, : lengths[i]] = s.loss_mask()
    return ids, mask, lengths
