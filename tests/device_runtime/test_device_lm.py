"""Task lm on the device (issue 16) with a real decoder: a 2-block truncation of
SmolLM2-135M exported as a token bundle with generation graphs (``--layers 1,2 --pivot
none --quant fp32 --format onnx --max-seq-len 64 --generate``, cached under the test
bundles), real onnxruntime, and a loopback HTTP stand-in for the server's device routes
(``device_stand_in.DeviceStandIn``) that decodes every payload as the wire format says
(``serde.decode_batch``, which runs ``check_lm``) and deduplicates by idempotency key.

Checked: the uploaded token ids are the ids ``device_runtime.generate.Generator`` gives
the same text (what generation and perplexity read), the loss mask covers exactly the
response's tokens of a prompt/response record and every token but the first of a text,
texts longer than max_seq_len become overlapping windows (every target once, none
truncated), a one-token record is skipped and counted, an empty text is an error naming
its line; fp16 by default, int8 when asked; a run stopped after the server stored a batch
but before the ack resumes with the same keys (the server answers duplicate, nothing
lost); registration sends task lm with no labels and fails clearly when the server
answers another task; --epsilon is refused for lm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from device_stand_in import DeviceStandIn, cli_without_torch

from fedmobillm.data.lm import LmRecord
from fedmobillm.device_runtime.backbone import Backbone
from fedmobillm.device_runtime.client import (
    DeviceClient,
    DeviceState,
    RunConfig,
    check_lm_bundle,
    register,
)
from fedmobillm.device_runtime.generate import Generator
from fedmobillm.device_runtime.journal import Journal
from fedmobillm.device_runtime.lm_samples import lm_samples, windows
from fedmobillm.device_runtime.privacy import PrivacyConfig
from fedmobillm.device_runtime.protocol import bundle_digest, read_manifest
from fedmobillm.device_runtime.uploader import RetryPolicy, ServerUnavailable
from fedmobillm.errors import FedMobiLLMError

LONG = " ".join(f"line {i} of a long story told by the fire" for i in range(20))  # > 64 tokens
RECORDS = [
    {"text": "I'll be there for you, when the rain starts to pour."},
    {"prompt": "How you doin'?", "response": "Fine, thanks. And you?"},
    {"text": "Hi"},  # one token: nothing to predict
    {"text": LONG},
    {"prompt": "", "response": "We were on a break!"},
    {"text": "Could this be any more of a test?"},
    {"prompt": "Pivot!", "response": "Shut up, shut up, shut up!"},
]


@pytest.fixture(scope="module")
def lm_bundle(smollm2_lm_bundle) -> Path:
    return smollm2_lm_bundle  # conftest.py: SmolLM2 blocks 1-2, an lm token bundle


@pytest.fixture(scope="module")
def generator(lm_bundle) -> Generator:
    return Generator(lm_bundle, threads=1)


@pytest.fixture
def stand_in():
    servers: list[DeviceStandIn] = []

    def start(**kw) -> DeviceStandIn:
        servers.append(DeviceStandIn(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def lm_records(rows: list[dict]) -> list[LmRecord]:
    return [LmRecord(r["response"], r["prompt"]) if "prompt" in r else LmRecord(r["text"])
            for r in rows]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scored(generator: Generator, row: dict) -> tuple[list[int], int]:
    """(ids, first target) of a record as the generator's perplexity scores it (no cut; a
    record with nothing to predict: its ids and 1)."""
    item = (row["prompt"] + "\n", row["response"]) if "prompt" in row else row["text"]
    got = generator._scored_ids(item, 10_000)
    return got if got is not None else (generator.encode(row["text"]), 1)


def lm_state(path: Path, server: str, lm_bundle: Path, task: str = "lm") -> Path:
    m = read_manifest(lm_bundle)
    DeviceState(server, "lm", "dev-lm", "tok", bundle_digest(m), m.architecture, [],
                task=task).save(path)  # fmt: skip
    return path


def test_samples_are_the_generators_ids_with_the_response_as_targets(lm_bundle, generator):
    """Prepare the records; Execute lm_samples with the bundle's tokenizer; Assert each
    window's ids are the generator's ids of that record (cut into windows of <= 64 with
    one token of overlap), the loss covers the response only (prompt/response) or all but
    the first token (text), every target exactly once, the one-token record skipped."""
    backbone = Backbone(lm_bundle, threads=1)
    assert backbone.encode_ids(LONG) == generator.encode(LONG)
    prep = lm_samples(lm_records(RECORDS), backbone.encode_ids, 64)
    assert prep.records == len(RECORDS) and prep.skipped_records == [2]
    assert prep.windowed == 1 and prep.to_dict()["truncated_records"] == 0
    for r, row in enumerate(RECORDS):
        ids, first = scored(generator, row)
        parts = [s for s in prep.samples if s.record == r]
        if r == 2:
            assert len(ids) == 1 and parts == []
            continue
        targets = []
        for w, s in enumerate(parts):  # windows start at 0, 63, 126 ...
            start = 63 * w
            assert list(s.token_ids) == ids[start : start + 64] and len(s.token_ids) <= 64
            mask = s.loss_mask()
            assert mask[0] == 0 and mask.sum() == len(s.token_ids) - s.first
            targets += [start + t for t in np.flatnonzero(mask)]
        assert targets == list(range(first, len(ids)))  # every target once, in order
        if "prompt" in row:  # exactly the response's tokens
            response = generator.encode(row["response"], special=False)
            assert ids[first:] == response and len(response) >= 1
    n_long = len(generator.encode(LONG))
    assert n_long > 64 and len([s for s in prep.samples if s.record == 3]) == -(-(n_long - 1) // 63)
    assert prep.target_tokens == sum(len(s.token_ids) - s.first for s in prep.samples)
    assert windows([5, 6, 7], 1, 2) == [([5, 6], 1), ([6, 7], 1)]
    assert windows([5, 6, 7, 8], 3, 2) == [([7, 8], 1)]  # prompt-only windows left out
    with pytest.raises(FedMobiLLMError, match="none of the 1 records has a token to predict"):
        lm_samples([LmRecord("Hi")], backbone.encode_ids, 64)


def test_device_run_task_lm_uploads_ids_and_loss_mask_without_torch(
    lm_bundle, generator, stand_in, tmp_path
):
    """Prepare a stand-in server and a jsonl of texts and prompt/response pairs; Execute
    `device register --task lm` and `device run --task lm` (batches of 3) with torch
    blocked, then `--split validation` on held-out text; Assert registration sent task lm
    and no labels, every payload is an fp16 lm batch whose token ids are the generator's,
    loss mask as the record says, taps the backbone's forward of those ids, labels -1, and
    the summary reports the windows, the skipped record, bytes per token and the privacy
    of the ids."""
    server = stand_in()
    data = write_jsonl(tmp_path / "me.jsonl", RECORDS)
    state = tmp_path / "state"
    r = cli_without_torch(
        ["device", "register", "--server", server.url, "--admin-token", "a", "--name", "lm",
         "--bundle", str(lm_bundle), "--state", str(state), "--task", "lm"], tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task lm" in r.stdout
    (reg,) = server.registrations
    assert reg["task"] == "lm" and reg["label_names"] == [] and reg.get("privacy") is None
    assert DeviceState.load(state).task == "lm"
    r = cli_without_torch(
        ["device", "run", "--task", "lm", "--bundle", str(lm_bundle), "--data", str(data),
         "--state", str(state), "--batch-size", "3", "--forward-batch", "2", "--threads", "1",
         "--summary-json", str(tmp_path / "s.json")], tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TORCH_LOADED False" in r.stdout

    backbone = Backbone(lm_bundle, threads=1)
    prep = lm_samples(lm_records(RECORDS), backbone.encode_ids, 64)
    assert sum(b.num_samples for b in server.batches) == len(prep.samples) > len(RECORDS)
    for batch in server.batches:
        assert batch.lm and batch.encoding == "fp16" and batch.split == "train"
        assert (batch.labels == -1).all()
        samples = [prep.samples[int(i)] for i in batch.sample_ids]
        for row, s in enumerate(samples):
            n = len(s.token_ids)
            ids, first = scored(generator, RECORDS[s.record])
            assert batch.token_ids[row, :n].tolist() == list(s.token_ids)
            if n == len(ids):  # a record in one window: the generator's ids, its targets
                assert batch.token_ids[row, :n].tolist() == ids
                assert np.flatnonzero(batch.loss_mask[row]).tolist() == list(range(first, n))
            assert batch.lengths[row] == n and not batch.token_ids[row, n:].any()
        taps, lengths = backbone.forward_token_ids([s.token_ids for s in samples])
        np.testing.assert_array_equal(batch.lengths, lengths)
        np.testing.assert_allclose(batch.activations.astype(np.float32), taps.astype(np.float16),
                                   rtol=1e-2, atol=1e-2)  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["task"] == "lm" and summary["encoding"] == "fp16"
    assert summary["lm"]["skipped_records"] == 1 and summary["lm"]["windowed_records"] == 1
    assert summary["target_tokens"] == prep.target_tokens
    assert summary["tokens"] == sum(len(s.token_ids) for s in prep.samples)
    assert summary["tap_bytes_per_token"] == 2 * 576 * 2  # K x d x 2 B (fp16)
    assert summary["wire_bytes_per_token"] == summary["bytes_uploaded"] / summary["tokens"]
    assert "1 skipped: one token" in r.stdout and "split into windows of <= 64" in r.stdout
    assert "bytes per token:    2,304 B of taps" in r.stdout  # K=2 x d=576 x 2 B
    assert "privacy:            none for the text" in r.stdout

    held = write_jsonl(tmp_path / "held.jsonl", RECORDS[:2])
    r = cli_without_torch(
        ["device", "run", "--task", "lm", "--bundle", str(lm_bundle), "--data", str(held),
         "--state", str(state), "--split", "validation", "--threads", "1"], tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.counts() == {"train": len(prep.samples), "validation": 2}
    assert server.batches[-1].split == "validation" and server.batches[-1].lm

    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"text": "  "}])
    r = cli_without_torch(
        ["device", "run", "--task", "lm", "--bundle", str(lm_bundle), "--data", str(bad),
         "--state", str(state), "--threads", "1"], tmp_path,
    )  # fmt: skip
    assert r.returncode != 0 and "line 2" in r.stderr and "non-empty" in r.stderr, r.stderr


def test_lm_run_resumes_with_the_same_keys_after_a_lost_ack(lm_bundle, stand_in, tmp_path):
    """Prepare a stand-in that stores the second batch but never answers it (503), and a
    device uploading int8 (asked for); Execute a run (it stops), then the same run again;
    Assert the second run re-sends the unacknowledged batch first under its key (the
    server answers duplicate), then the rest: every sample stored exactly once, every key
    the same as a fresh plan makes."""
    server = stand_in()
    server.lose_ack_after = 1
    state = lm_state(tmp_path / "state", server.url, lm_bundle)
    records = lm_records(RECORDS)
    config = RunConfig(task="lm", encoding="int8", batch_size=2, threads=1,
                       retry=RetryPolicy(attempts=1))  # fmt: skip
    with pytest.raises(ServerUnavailable):
        DeviceClient(state, lm_bundle, config).run(records)
    assert len(server.batches) == 2 and len(server.keys_seen) == 2
    lost_key = server.keys_seen[1]
    journal = Journal(state)
    assert [e.event for e in journal.entries] == ["pending", "ack", "pending"]

    server.lose_ack_after = None
    client = DeviceClient(state, lm_bundle, config)
    samples = client.prepare_lm(records)
    batches, already = client.plan(samples)
    assert already == 2 and batches[0] == journal.entries[-1].ids
    assert client.plan(samples) == (batches, already)  # deterministic
    summary = client.run(records)
    assert server.keys_seen[2] == lost_key and summary.duplicates == 1
    stored = sorted(int(i) for b in server.batches for i in b.sample_ids)
    assert stored == list(range(len(samples)))  # each sample once, none lost
    assert all(b.encoding == "int8" and b.scales is not None for b in server.batches)
    fresh = tmp_path / "fresh"
    lm_state(fresh, server.url, lm_bundle)
    again = DeviceClient(fresh, lm_bundle, config)
    plan, _ = again.plan(again.prepare_lm(records))
    from fedmobillm.device_runtime.client import idempotency_key

    keys = {idempotency_key("dev-lm", again.digest, "train", ids) for ids in plan}
    assert keys == {b.idempotency_key for b in server.batches}


def test_lm_registration_and_run_refusals(lm_bundle, stand_in, tmp_path):
    """A server that answers another task, labels or --epsilon with lm, a pivot or encoder
    bundle, and a run whose task is not the registered one: clear errors, nothing saved."""
    server = stand_in(task="classify")
    with pytest.raises(FedMobiLLMError, match="for task 'classify', not 'lm'") as err:
        register(server.url, "a", "lm", lm_bundle, [], tmp_path / "s1", task="lm")
    assert "--task lm" in err.value.hint and not (tmp_path / "s1").exists()
    assert server.registrations[0]["task"] == "lm"
    with pytest.raises(FedMobiLLMError, match="task lm has no labels"):
        register(server.url, "a", "lm", lm_bundle, ["a", "b"], tmp_path / "s2", task="lm")
    with pytest.raises(FedMobiLLMError, match="refused for task lm: an lm upload carries"):
        register(server.url, "a", "lm", lm_bundle, [], tmp_path / "s3",
                 privacy=PrivacyConfig(epsilon=4.0), task="lm")  # fmt: skip
    m = read_manifest(lm_bundle)
    import dataclasses

    with pytest.raises(FedMobiLLMError, match="needs a decoder token bundle") as err:
        check_lm_bundle(dataclasses.replace(m, pivot="last"), lm_bundle)
    assert "--pivot none" in err.value.hint
    with pytest.raises(FedMobiLLMError, match="is an encoder token bundle"):
        check_lm_bundle(dataclasses.replace(m, kind="encoder"), lm_bundle)

    assert RunConfig(task="lm").encoding == "fp16" and RunConfig().encoding == "int8"
    classify = lm_state(tmp_path / "c", server.url, lm_bundle, task="classify")
    with pytest.raises(FedMobiLLMError, match="registered for task 'classify'"):
        DeviceClient(classify, lm_bundle, RunConfig(task="lm", threads=1))
    lm = lm_state(tmp_path / "l", server.url, lm_bundle)
    with pytest.raises(FedMobiLLMError, match="registered for task 'lm'") as err:
        DeviceClient(lm, lm_bundle, RunConfig(threads=1))
    assert "--task lm" in err.value.hint
    with pytest.raises(FedMobiLLMError, match="refused for task lm"):
        DeviceClient(lm, lm_bundle, RunConfig(task="lm", privacy=PrivacyConfig(epsilon=4.0)))
    with pytest.raises(FedMobiLLMError, match="no anchor set"):
        DeviceClient(lm, lm_bundle, RunConfig(task="lm", split="anchor"))


def test_a_named_corpus_is_refused_as_validation(monkeypatch, tmp_path):
    """A named lm corpus is read whole: as --split validation it would upload the train
    records again, so `device run --task lm --data friends --split validation` is refused
    with a hint (a held-out .jsonl file, as demo --task lm writes, is accepted)."""
    import argparse

    from fedmobillm.commands import device as cmd
    from fedmobillm.device_runtime import client as client_mod
    from fedmobillm.device_runtime.records import lm_device_records

    with pytest.raises(FedMobiLLMError, match="same records as its train") as err:
        lm_device_records("friends", split="validation")
    assert "write_lm_devices" in err.value.hint and "held-out" in err.value.hint
    held = tmp_path / "device_00.heldout.jsonl"
    held.write_text('{"text": "a held-out line"}\n')
    assert [r.text for r in lm_device_records(str(held), split="validation")] == ["a held-out line"]

    ran = []

    class FakeClient:  # the command's records reach run(); no bundle or server needed
        def __init__(self, *a, **kw):
            pass

        def run(self, records):
            ran.append(records)
            raise FedMobiLLMError("stop here")

    monkeypatch.setattr(client_mod, "DeviceClient", FakeClient)
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    base = ["run", "--task", "lm", "--bundle", str(tmp_path), "--state", str(tmp_path / "s")]
    with pytest.raises(FedMobiLLMError, match="same records as its train"):
        cmd.run(p.parse_args([*base, "--data", "friends", "--split", "validation"]))
    with pytest.raises(FedMobiLLMError, match="stop here"):
        cmd.run(p.parse_args([*base, "--data", str(held), "--split", "validation"]))
    assert [r.text for r in ran[0]] == ["a held-out line"]
