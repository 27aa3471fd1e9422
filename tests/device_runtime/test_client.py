"""Uploader retries/backoff/throttling against a scripted loopback HTTP server, the journal's
crash tolerance, and the DeviceClient's resume plan. The real server is exercised in
test_device_e2e.py."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from device_stand_in import LoopbackServer

from fedmobillm.device_runtime.client import DeviceClient, DeviceState, RunConfig
from fedmobillm.device_runtime.journal import Entry, Journal, records_hash
from fedmobillm.device_runtime.protocol import bundle_digest, read_manifest
from fedmobillm.device_runtime.serde import decode_batch
from fedmobillm.device_runtime.uploader import (
    RetryPolicy,
    ServerRejected,
    ServerUnavailable,
    Uploader,
    parse_retry_after,
)

ACK = {"batch_id": "b1", "samples": 1, "duplicate": False, "device_samples": {"train": 1}}


class ScriptedServer(LoopbackServer):
    """A real HTTP server on loopback that answers POSTs from a script of
    (status, headers, json body) and records each request body it received."""

    def __init__(self, script: list[tuple[int, dict[str, str], dict]]) -> None:
        self.script, self.bodies = list(script), []
        super().__init__()

    def post(self, path: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        self.bodies.append(body)
        status, headers, reply = self.script.pop(0) if self.script else (200, {}, ACK)
        return status, reply, headers


@pytest.fixture
def scripted():
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _uploader(url: str, sleeps: list[float], **kw) -> Uploader:
    policy = RetryPolicy(attempts=kw.pop("attempts", 4), base_s=0.5, cap_s=4.0)
    return Uploader(url, "tok", policy, sleep=sleeps.append, seed=0, **kw)


def test_full_jitter_bounds_and_retry_after():
    policy, rng = RetryPolicy(base_s=0.5, cap_s=4.0), random.Random(0)
    for attempt in range(8):
        ceiling = min(4.0, 0.5 * 2**attempt)
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > 0.5 * ceiling  # spread over the whole window, not fixed
    assert policy.delay(0, 7.0, rng) >= 7.0  # Retry-After is a floor


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1  # in the past


def test_retries_5xx_and_429_then_succeeds(scripted):
    """503, then 429 with Retry-After: 2, then 200: three requests, two waits, the second
    at least the server's Retry-After."""
    server = scripted([(503, {}, {"detail": "busy"}), (429, {"Retry-After": "2"}, {})])
    sleeps: list[float] = []
    with _uploader(server.url, sleeps) as up:
        ack = up.post_batch(b"x" * 100)
    assert ack == ACK and len(server.bodies) == 3 and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5 and sleeps[1] >= 2.0
    assert up.stats.retries == 2 and up.stats.bytes_sent == 100


def test_4xx_is_final_with_server_message(scripted):
    server = scripted(
        [(409, {}, {"detail": "payload comes from bundle abc", "hint": "re-register"})]
    )
    sleeps: list[float] = []
    with _uploader(server.url, sleeps) as up, pytest.raises(ServerRejected) as err:
        up.post_batch(b"x")
    assert len(server.bodies) == 1 and sleeps == []
    assert "HTTP 409" in str(err.value) and "payload comes from bundle abc" in str(err.value)
    assert err.value.status == 409


def test_unreachable_server_gives_up_after_attempts():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    with _uploader(f"http://127.0.0.1:{port}", sleeps, attempts=3) as up:
        with pytest.raises(ServerUnavailable, match="after 3 attempts.*ConnectError"):
            up.post_batch(b"x")
    assert len(sleeps) == 2


def test_bandwidth_throttle_simulates_link(scripted):
    """125,000 bytes at 1 Mbit/s take 1 s: the uploader waits out the difference."""
    server = scripted([])
    sleeps: list[float] = []
    with _uploader(server.url, sleeps, bandwidth_mbps=1.0) as up:
        up.post_batch(b"x" * 125_000)
    assert len(sleeps) == 1 and 0.5 < sleeps[0] <= 1.0
    assert up.stats.seconds == pytest.approx(1.0, abs=1e-6)
    assert up.stats.measured_seconds < 1.0


def test_journal_ignores_a_line_cut_by_a_kill(tmp_path):
    """Prepare a journal whose last line was cut mid-write; Execute reload and append;
    Assert the complete entries survive and new lines are readable."""
    j = Journal(tmp_path)
    e = Entry("pending", "k1", "train", "d", [0, 1], "h")
    j.pending(e)
    j.ack(e, {"batch_id": "b"})
    with open(j.path, "ab") as f:
        f.write(b'{"event":"pending","key":"k2","spl')
    j2 = Journal(tmp_path)
    assert [x.event for x in j2.entries] == ["pending", "ack"]
    j2.pending(Entry("pending", "k2", "train", "d", [2, 3], "h"))
    assert [x.key for x in Journal(tmp_path).entries] == ["k1", "k1", "k2"]
    assert Journal(tmp_path).unacked_pending("train", "d").key == "k2"


def test_every_unacked_batch_stays_pending_and_keys_name_their_ids(tmp_path):
    """A run stopped with batch k2 pending; a later run (smaller --limit) acked another
    batch: k2 is still pending for the next run (re-sent under its key, never re-batched).
    A batch of non-consecutive ids (token bundles batch by length) has a key of its own."""
    from fedmobillm.device_runtime.client import idempotency_key

    j = Journal(tmp_path)
    j.pending(Entry("pending", "k2", "train", "d", [4, 9, 11], "h"))
    later = Entry("pending", "k3", "train", "d", [0, 1], "h")
    j.pending(later)
    j.ack(later, {"batch_id": "b"})
    assert Journal(tmp_path).unacked_pending("train", "d") is None  # the last run's only
    assert [e.key for e in Journal(tmp_path).unacked_pendings("train", "d")] == ["k2"]
    a = idempotency_key("dev", "0" * 64, "train", [4, 9, 11])
    b = idempotency_key("dev", "0" * 64, "train", [4, 7, 11])
    assert a != b and a == idempotency_key("dev", "0" * 64, "train", [4, 9, 11])
    assert idempotency_key("dev", "0" * 64, "train", [5, 6, 7]) == f"dev:{'0' * 16}:train:5-7:3"


@dataclass
class Rec:
    text: str
    label: int


@pytest.fixture(scope="module")
def bundle(make_bundle) -> Path:
    return make_bundle("minilm-l3", num_taps=3, formats=("onnx",))


def _client(bundle: Path, state: Path, batch_size: int) -> DeviceClient:
    digest = bundle_digest(read_manifest(bundle))
    if not (state / "device.json").is_file():
        DeviceState("http://127.0.0.1:9", "d", "dev-1", "tok", digest, "", ["a", "b"]).save(state)
    return DeviceClient(state, bundle, RunConfig(batch_size=batch_size))


def _journal_batch(client: DeviceClient, recs, ids: list[int], acked: bool) -> Entry:
    data = records_hash([(i, recs[i].text, recs[i].label) for i in ids])
    e = Entry("pending", f"key-{ids[0]}", "train", client.digest, ids, data)
    client.journal.pending(e)
    if acked:
        client.journal.ack(e, {})
    return e


def test_plan_resends_pending_batch_then_continues(bundle, tmp_path):
    """After a kill between send and ack, the same batch (same ids, same key) goes first,
    even when the batch size changed; acknowledged samples are never planned again."""
    recs = [Rec(f"text {i}", i % 2) for i in range(50)]
    client = _client(bundle, tmp_path, batch_size=16)
    _journal_batch(client, recs, list(range(16)), acked=True)
    _journal_batch(client, recs, list(range(16, 32)), acked=False)

    batches, already = _client(bundle, tmp_path, batch_size=10).plan(recs)

    assert already == 16
    assert batches[0] == list(range(16, 32))
    assert [len(b) for b in batches[1:]] == [10, 8]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(16, 50)) and len(flat) == len(set(flat))


def test_plan_refuses_changed_data(bundle, tmp_path):
    recs = [Rec(f"text {i}", 0) for i in range(20)]
    client = _client(bundle, tmp_path, batch_size=8)
    _journal_batch(client, recs, list(range(8)), acked=True)
    recs[3] = Rec("something else", 0)
    with pytest.raises(Exception, match="differ from what this device already uploaded"):
        client.plan(recs)


def test_idempotency_keys_are_deterministic(bundle, tmp_path):
    recs = [Rec(f"text {i}", i % 2) for i in range(5)]
    client = _client(bundle, tmp_path, batch_size=8)
    body1, e1, _ = client.encode(recs, [0, 1, 2])
    body2, e2, _ = client.encode(recs, [0, 1, 2])
    assert e1.key == e2.key and client.digest[:16] in e1.key and e1.key.endswith(":train:0-2:3")
    b1, b2 = decode_batch(body1), decode_batch(body2)  # header key order may vary
    assert b1.idempotency_key == b2.idempotency_key == e1.key
    assert (b1.activations == b2.activations).all() and (b1.sample_ids == [0, 1, 2]).all()
