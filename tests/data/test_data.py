"""Labelled text: named sets, local files with bad rows, seeded splits and partitions."""

from __future__ import annotations

import json

import pytest

from fedmobillm import data
from fedmobillm.data import Record
from fedmobillm.errors import FedMobiLLMError


@pytest.fixture(scope="module")
def movies() -> data.Dataset:
    return data.load_dataset("movie-snippets")


def test_movie_snippets_has_10568_labelled_sentences(movies):
    assert movies.total() == 10_568
    assert movies.label_names == ["negative", "positive"]
    assert {s: len(r) for s, r in movies.splits.items()} == {
        "train": 8454,
        "validation": 1057,
        "test": 1057,
    }
    totals = {n: sum(c[n] for c in movies.counts().values()) for n in movies.label_names}
    assert totals == {"negative": 5326, "positive": 5242}


def test_splits_are_disjoint_and_seeded(movies):
    texts = [{r.text for r in movies.splits[s]} for s in data.DATASET_SPLITS]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    labels = [i % 3 for i in range(100)]
    assert data.stratified_split(labels, (0.8, 0.1, 0.1), 5) == data.stratified_split(
        labels, (0.8, 0.1, 0.1), 5
    )
    assert data.stratified_split(labels, (0.8, 0.1, 0.1), 5) != data.stratified_split(
        labels, (0.8, 0.1, 0.1), 6
    )


def test_dirichlet_partition_is_identical_across_runs(movies):
    train = movies.splits["train"]
    first = data.partition(train, 10, alpha=0.5, seed=3)
    second = data.partition(train, 10, alpha=0.5, seed=3)
    other = data.partition(train, 10, alpha=0.5, seed=4)
    assert first == second and first != other
    assert len(first) == 10 and all(first)
    assert sorted(r.text for part in first for r in part) == sorted(r.text for r in train)


def test_iid_partition_is_balanced():
    records = [Record(f"t{i}", i % 2) for i in range(101)]
    parts = data.partition(records, 4, alpha=None, seed=0)
    assert [len(p) for p in parts] == [26, 25, 25, 25]


def test_tiny_alpha_still_gives_every_device_a_record():
    records = [Record(f"t{i}", i % 2) for i in range(12)]
    parts = data.partition(records, 10, alpha=0.01, seed=0)
    assert all(parts) and sum(map(len, parts)) == 12


@pytest.mark.parametrize(
    ("devices", "alpha", "match"), [(0, None, ">= 1"), (5, None, "one record"), (2, 0.0, "> 0")]
)
def test_partition_rejects_bad_arguments(devices, alpha, match):
    with pytest.raises(FedMobiLLMError, match=match):
        data.partition([Record("a", 0), Record("b", 1)], devices, alpha, seed=0)


def test_bad_jsonl_rows_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "local.jsonl"
    path.write_text(
        '{"text": "good", "label": "positive"}\n'
        "not json\n"
        '{"text": "", "label": "negative"}\n'
        "\n"
        '{"text": "fine", "label": "negative"}\n'
        '{"text": "odd", "label": "sideways"}\n'
    )
    with pytest.raises(FedMobiLLMError) as err:
        data.read_records(path, label_names=["negative", "positive"])
    message = str(err.value)
    assert "3 bad row(s)" in message
    assert "line 2: not valid JSON" in message and "line 3: missing or empty text" in message
    assert "line 6: unknown label 'sideways'" in message

    records, names = data.read_records(
        path, skip_bad_rows=True, label_names=["negative", "positive"]
    )
    assert records == [Record("good", 1), Record("fine", 0)] and names == ["negative", "positive"]


def test_bad_csv_rows_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "local.csv"
    path.write_text('text,label\n"multi\nline",1\nplain,\nok,0\nbig,7\n')
    with pytest.raises(FedMobiLLMError) as err:
        data.read_records(path)
    assert "line 4: missing label" in str(err.value)
    assert "line 6: label index 7 out of range" not in str(err.value)  # 0..7 inferred
    records, names = data.read_records(path, skip_bad_rows=True)
    assert names == [str(i) for i in range(8)] and records[0] == Record("multi\nline", 1)


def test_csv_without_label_column_says_so(tmp_path):
    path = tmp_path / "local.csv"
    path.write_text("sentence,y\nhi,1\n")
    with pytest.raises(FedMobiLLMError, match="no column"):
        data.read_records(path)


def test_labels_json_beside_a_device_file_names_labels(tmp_path, movies):
    parts = data.partition(movies.splits["validation"], 3, alpha=1.0, seed=0)
    summary = data.write_partition(parts, movies.label_names, tmp_path)
    records, names = data.read_records(tmp_path / "device_01.jsonl")
    assert records == parts[1] and names == movies.label_names
    saved = json.loads((tmp_path / "summary.json").read_text())["devices"]
    assert saved == summary.rows and sum(r["records"] for r in saved) == 1057


def test_local_file_loads_as_split_dataset(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"s{i}", "label": ["a", "b"][i % 2]}) + "\n" for i in range(50))
    )
    ds = data.load_dataset(path, seed=0)
    assert ds.label_names == ["a", "b"] and ds.total() == 50
    assert {s: len(r) for s, r in ds.splits.items()} == {"train": 40, "validation": 5, "test": 5}


def test_unknown_dataset_lists_known_names():
    with pytest.raises(FedMobiLLMError) as err:
        data.load_dataset("imdb")
    assert all(name in str(err.value) for name in data.DATASETS)


def test_hf_folder_without_datasets_package_is_a_clear_error(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(FedMobiLLMError, match="needs the `datasets` package"):
            data.load_dataset(tmp_path)
    else:
        with pytest.raises(FedMobiLLMError, match="not a Hugging Face datasets folder"):
            data.load_dataset(tmp_path)
