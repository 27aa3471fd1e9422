"""Back-pressure (server/limits.py IngestGate): past a bound an upload gets 429 + Retry-After
before anything of it is stored; acknowledged samples are all in the store; the device client
retries 429s to completion; /v1/status stays responsive during the flood."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_helpers import admin_headers, make_manifest, make_payload, register, upload

from fedmobillm.device_runtime.messages import ROUTE_STATUS
from fedmobillm.device_runtime.uploader import RetryPolicy, Uploader
from fedmobillm.server.limits import IngestGate, TooManyRequests
from fedmobillm.server.store import Store

BATCH = 16


def _flood(url: str, regs: list[dict], manifest: dict, rounds: int) -> list[tuple]:
    """Every device uploads ``rounds`` batches at once from its own thread, no retry:
    [(device index, sample ids, status, Retry-After header or None)]."""
    out: list[tuple] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        for r in range(rounds):
            ids = range(r * BATCH, (r + 1) * BATCH)
            resp = upload(url, regs[i], make_payload(regs[i], manifest, ids, seed=i), 60)
            with lock:
                out.append((i, list(ids), resp.status_code, resp.headers.get("Retry-After")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(regs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _stored(data_dir) -> dict[str, set[int]]:
    """device id -> stored train sample ids, read from the SQLite file."""
    store = Store(data_dir / "store.sqlite3")
    try:
        rows = store.read_samples(0, limit=1_000_000)
    finally:
        store.close()
    got: dict[str, set[int]] = {}
    for dev, sid in zip(rows.device_ids, rows.sample_ids.tolist(), strict=True):
        got.setdefault(dev, set()).add(sid)
    return got


def test_flood_past_a_low_bound_gets_429_and_every_ack_is_stored(server_factory, tmp_path):
    """Prepare: a server that admits 2 uploads at a time and waits 20 ms for the writer.
    Execute: 24 devices upload 4 batches each at once, while an operator polls status.
    Assert: some 429s with an integer Retry-After >= 1, the rest acknowledged, every
    acknowledged sample stored and no refused batch's samples stored; status answered fast."""
    srv = server_factory(
        {"train": False, "max_inflight_uploads": 2, "max_write_wait_s": 0.02, "retry_after_s": 1}
    )
    m = make_manifest()
    regs = [register(srv.url, f"d{i}", m) for i in range(24)]
    status_s: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            r = httpx.get(f"{srv.url}{ROUTE_STATUS}", headers=admin_headers(), timeout=30)
            assert r.status_code == 200
            status_s.append(time.perf_counter() - t0)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        results = _flood(srv.url, regs, m, rounds=4)
    finally:
        done.set()
        poller.join()
    codes = [r[2] for r in results]
    assert set(codes) <= {200, 429}, codes
    refused = [r for r in results if r[2] == 429]
    assert refused and codes.count(200) > 0
    assert all(r[3] is not None and r[3].isdigit() and 1 <= int(r[3]) <= 2 for r in refused)
    srv.stop()
    stored = _stored(srv.data_dir)
    for i, ids, code, _ in results:
        held = stored.get(regs[i]["device_id"], set())
        if code == 200:
            assert set(ids) <= held
        else:
            assert not set(ids) & held  # 429 before anything was stored
    assert status_s and max(status_s) < 5.0, max(status_s)


def test_device_client_retries_429s_to_completion(server_factory):
    """Prepare: a server that admits one upload at a time. Execute: 12 devices each upload 3
    batches through the device Uploader (honours Retry-After). Assert: every batch ends
    acknowledged, retries happened, the store holds every sample exactly once."""
    srv = server_factory(
        {"train": False, "max_inflight_uploads": 1, "max_write_wait_s": 0.02, "retry_after_s": 1}
    )
    m = make_manifest()
    regs = [register(srv.url, f"c{i}", m) for i in range(12)]
    retries, acks, errors = [], [], []

    def device(i: int) -> None:
        policy = RetryPolicy(attempts=30, base_s=0.05, cap_s=0.5)
        try:
            with Uploader(srv.url, regs[i]["token"], policy, seed=i) as up:
                for r in range(3):
                    body = make_payload(regs[i], m, range(r * BATCH, (r + 1) * BATCH), seed=i)
                    acks.append(up.post_batch(body))
                retries.append(up.stats.retries)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(len(regs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(acks) == 36 and all(a["samples"] == BATCH for a in acks)
    assert sum(retries) > 0
    srv.stop()
    stored = _stored(srv.data_dir)
    assert {d: len(ids) for d, ids in stored.items()} == {r["device_id"]: 3 * BATCH for r in regs}


def test_gate_refuses_past_the_backlog_and_jitters_retry_after():
    """The backlog bound and the in-flight bound refuse with TooManyRequests; Retry-After is
    base + jitter in [base, 2 base] and not constant; the write slot times out."""
    backlog = [0]
    gate = IngestGate(2, 0.01, 100, 3, backlog=lambda: backlog[0], seed=0)
    with gate.admit(), gate.admit():
        with pytest.raises(TooManyRequests, match="uploads in flight"), gate.admit():
            pass
    assert gate.inflight == 0
    backlog[0] = 101
    with pytest.raises(TooManyRequests, match="101 samples behind") as exc, gate.admit():
        pass
    assert 3 <= exc.value.retry_after <= 6
    waits = {gate.retry_after() for _ in range(50)}
    assert waits <= set(range(3, 7)) and len(waits) > 1
    backlog[0] = 0
    with gate.write_slot():
        blocked = threading.Thread(target=_expect_busy, args=(gate,))
        blocked.start()
        blocked.join()
    assert gate.stats()["refused"] == {"inflight": 1, "backlog": 1, "write_wait": 1}


def _expect_busy(gate: IngestGate) -> None:
    with pytest.raises(TooManyRequests, match="writer is busy"), gate.write_slot():
        pass
