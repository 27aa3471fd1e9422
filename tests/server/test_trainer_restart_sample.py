"""A trainer restarting on a store larger than its memory cap samples the store instead of
reading it back (issue 17): each (architecture, device) stream its equal share, validation its
share per architecture, anchors all kept, quarantined and deleted devices out, the range
screen on every row taken; O(cap) rows fetched, not the store; a store that fits in the cap is
read whole as before. On SQLite and on a real PostgreSQL (the fixture of test_postgres)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from server_helpers import LABELS, make_manifest, make_payload
from test_postgres import postgres  # noqa: F401 - the module's PostgreSQL fixture

from fedmobillm.server import trainer as trainer_mod
from fedmobillm.server.anchors import AnchorSet
from fedmobillm.server.service import Service
from fedmobillm.server.store import Store
from fedmobillm.server.store_sql import sample_order
from fedmobillm.server.trainer import TrainingCache

D = 384  # int8 K=3 x d=384: 1,152 B a sample
ARCHS = [("arch-a", 6, [2, 4, 6]), ("arch-b", 12, [4, 8, 12])]
ANCHORS = AnchorSet(tuple(f"anchor {i}" for i in range(40)), "a" * 64, per_device=20)


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request, tmp_path):
    if request.param == "sqlite":
        store = Store(tmp_path / "store.sqlite3")
    else:
        from fedmobillm.server.store_pg import PostgresStore

        store = PostgresStore(request.getfixturevalue("postgres").database())
    yield Service(store, anchors=ANCHORS)
    store.close()


def _fill(service: Service, devices: int, per_device: int, val: int = 60) -> list[dict]:
    """``devices`` devices over two architectures: ``per_device`` int8 training samples
    each (ids 0..per_device-1), ``val`` validation samples, anchors 0..19 (the same ids for
    every device of an architecture)."""
    regs = []
    for i in range(devices):
        name, depth, taps = ARCHS[i % 2]
        m = make_manifest(name, depth, D, taps)
        reg = service.register(f"dev{i}", m, LABELS)
        dev = service.store.device(reg["device_id"])
        for start in range(0, per_device, 500):
            ids = range(start, min(start + 500, per_device))
            service.ingest(dev, make_payload(reg, m, ids, seed=i))
        service.ingest(dev, make_payload(reg, m, range(val), split="validation", seed=i))
        anchor = make_payload(reg, m, range(20), split="anchor", seed=i, labels=[-1] * 20)
        service.ingest(dev, anchor)
        regs.append(reg)
    return regs


def _refresh_until_full(cache: TrainingCache, store, limit: int = 100) -> int:
    """Refresh until the sampled read-back is done; the refreshes it took."""
    for n in range(1, limit + 1):
        cache.refresh(store)
        if not cache.filling:
            return n
    raise AssertionError("the sampled read-back never finished")


def test_sampled_restart_keeps_the_shares_and_reads_o_cap_rows(service):
    """Prepare: 8 devices (two architectures) x 3,000 training + 60 validation + 20 anchor
    samples (~28 MB as uploaded); one device quarantined, one deleted. Execute: one refresh of
    a cache capped at 2 MB. Assert: sampled (not read back): the rows fetched are about what
    is held (<= 1.2x + the anchors) and under 1/8 of the store; every live stream holds the
    same share within its architecture, spread over its whole id range; validation within its
    share, from live devices only; anchors all kept; nothing of the quarantined or deleted
    device cached or drawn; the store's rows count as read (no backlog)."""
    regs = _fill(service, 8, 3000)
    store = service.store
    quarantined, deleted = regs[2]["device_id"], regs[3]["device_id"]
    assert store.add_offence(quarantined, "test", quarantine_after=1)
    store.revoke(deleted, delete_data=True)
    total = store.totals()["samples"]
    cache = TrainingCache(memory_mb=2.0, seed=1)
    cache.refresh(store)
    assert not cache.filling and cache.horizon is not None  # a small fill: done in one refresh
    held = cache.held_samples()
    assert cache.held_bytes <= 2 * 2**20 and held < cache.samples_read()
    assert cache.rows_fetched <= 1.2 * held + 40 and cache.rows_fetched < total / 8
    assert cache.rows_read >= total  # every stored row is accounted for: backlog 0
    live = [r for r in regs if r["device_id"] not in (quarantined, deleted)]
    for a in cache.archs.values():
        shares = {d: len(ys) for d, ys in a.train_y.items() if ys}
        assert len(set(shares.values())) == 1 and 100 < min(shares.values()) < 3000, shares
        assert 0 < len(a.val_y) and set(a.val_from) <= {r["device_id"] for r in live}
        assert sorted(a.anchor_x) == list(range(20))
        assert set(a.anchor_from.values()) <= {r["device_id"] for r in live}
    streams = {d for a in cache.archs.values() for d, ys in a.train_y.items() if ys}
    assert streams == {r["device_id"] for r in live}
    assert cache.samples_read() == 6 * 3060 + 2 * 20  # the live rows sampled + anchors held
    # spread: each stream's kept rows cover its whole id range (mean id near the middle)
    rows = store.read_samples_by_id(_stream_ids(store, live[0], cache.horizon))
    by_bytes = {q.tobytes(): int(s) for q, s in zip(rows.raw, rows.sample_ids, strict=True)}
    xs = cache.archs[live[0]["architecture"]].train_x[live[0]["device_id"]]
    kept = [by_bytes[xs.q[i].tobytes()] for i in range(len(xs))]
    assert abs(np.mean(kept) - 1499.5) < 300 and min(kept) < 300 and max(kept) > 2700
    drawn = set()
    rng = np.random.default_rng(0)
    for _ in range(40):
        for arch, _x, _y in cache.sample(rng, 64):
            drawn.add(arch)
    assert drawn == {r["architecture"] for r in live}


def _stream_ids(store, reg: dict, horizon: int) -> np.ndarray:
    return store.stream_sample(reg["device_id"], "train", horizon, 10**6)


def test_new_rows_after_the_restart_and_a_release_flow_in(service):
    """After the sampled read-back, rows stored later are read as before (the cursor moved
    past the sample); a device quarantined at the restart and released later gets its share
    sampled then (never all its rows)."""
    regs = _fill(service, 4, 2500)
    store = service.store
    q = regs[1]["device_id"]
    assert store.add_offence(q, "test", quarantine_after=1)
    cache = TrainingCache(memory_mb=1.5, seed=1)
    _refresh_until_full(cache, store)
    fetched = cache.rows_fetched
    a = cache.archs[regs[0]["architecture"]]
    share = len(a.train_y[regs[0]["device_id"]])
    m = make_manifest(*ARCHS[0][:1], ARCHS[0][1], D, ARCHS[0][2])
    dev = store.device(regs[0]["device_id"])
    service.ingest(dev, make_payload(regs[0], m, range(2500, 2800), seed=0))
    read = cache.rows_read
    cache.refresh(store)
    assert cache.rows_read == read + 300 and cache.rows_fetched == fetched + 300
    assert len(a.train_y[regs[0]["device_id"]]) <= share + 1  # Algorithm R from the population
    assert cache.reservoir.seen[(regs[0]["architecture"], regs[0]["device_id"])] == 2800
    assert store.release(q)
    cache.set_quarantined(store.quarantined())
    _refresh_until_full(cache, store)
    b = cache.archs[regs[1]["architecture"]]
    got = len(b.train_y[q])
    assert 0 < got < 2500 and got == len(b.train_y[regs[3]["device_id"]]), got
    assert cache.held_bytes <= 1.5 * 2**20


def test_a_store_within_the_cap_is_read_whole_as_before(service):
    """A cap the store fits in: no sampling; every row read, the same cache as with the
    sampled read-back switched off."""
    _fill(service, 4, 300)
    total = service.store.totals()["samples"]
    on, off = TrainingCache(memory_mb=64.0, seed=1), TrainingCache(memory_mb=64.0, seed=1)
    off.sampled_restart = False
    on.refresh(service.store)
    off.refresh(service.store)
    assert on.horizon is None and on.rows_fetched == off.rows_fetched == total
    assert on.held_samples() == off.held_samples() == 4 * 360 + 2 * 20


def test_a_large_fill_lets_training_start_after_its_first_round(service, monkeypatch):
    """A fill of more than FILL_EAGER_ROWS rows returns after its first round (FIRST_ROWS
    rows: every stream has some, the sampler can draw a batch) and tops up over the next
    refreshes (one round each here) to the same equal shares."""
    monkeypatch.setattr(trainer_mod, "FILL_EAGER_ROWS", 200)
    monkeypatch.setattr(trainer_mod, "FIRST_ROWS", 128)
    monkeypatch.setattr(trainer_mod, "ROUND_ROWS", 256)
    monkeypatch.setattr(trainer_mod, "FILL_SLICE_S", 0.0)  # one round per refresh
    _fill(service, 4, 2000)
    cache = TrainingCache(memory_mb=2.0, seed=1)
    cache.refresh(service.store)
    assert cache.filling
    first = cache.rows_fetched
    assert first <= 128 + 4 + 2 * 20  # the first round (rounded up per stream) and the anchors
    assert all(ys for a in cache.archs.values() for ys in a.train_y.values())
    assert cache.sample(np.random.default_rng(0), 32)
    assert _refresh_until_full(cache, service.store) > 2
    for a in cache.archs.values():
        assert len({len(ys) for ys in a.train_y.values()}) == 1


def test_stream_sample_is_the_bottom_k_of_the_fixed_order(service):
    """``stream_sample`` returns a stream's rows in SAMPLE_ORDER (the keys the numpy twin
    computes), only rows at or before the horizon, and pages on from ``after_key``."""
    regs = _fill(service, 2, 1000)
    store = service.store
    dev = regs[0]["device_id"]
    horizon = store.sample_horizon()
    every = store.stream_sample(dev, "train", horizon, 10**6)
    keys = sample_order(every)
    assert len(every) == 1000 and np.all(np.diff(keys) > 0)
    first = store.stream_sample(dev, "train", horizon, 100)
    rest = store.stream_sample(dev, "train", horizon, 10**6, int(sample_order(first[-1:])[0]))
    assert np.array_equal(np.concatenate([first, rest]), every)
    m = make_manifest(*ARCHS[0][:1], ARCHS[0][1], D, ARCHS[0][2])
    service.ingest(store.device(dev), make_payload(regs[0], m, range(1000, 1100), seed=0))
    assert len(store.stream_sample(dev, "train", horizon, 10**6)) == 1000
    assert len(store.read_samples(horizon).ids) == 100  # the rows after: the cursor's


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_real_trainer_restarts_on_a_sample(tmp_path, backend):
    """A real Trainer on a data dir whose store is ~9x its cap: it steps, and what it
    fetched from the store is O(cap), not the store."""
    from fedmobillm.server.settings import load_settings

    data = tmp_path / "data"
    store = Store(data / "store.sqlite3")
    try:
        _fill(Service(store, anchors=ANCHORS), 4, 4000)
        total = store.totals()["samples"]
    finally:
        store.close()
    settings, _ = load_settings(
        None, dev=True, data_dir=data, trainer_memory_mb=2.0, batch_size=16, side_width=32,
        eval_every=1000,
    )  # fmt: skip
    t = trainer_mod.create_trainer(settings)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (t.side is None or t.side.step < 2):
            assert t.error is None, t.error
            time.sleep(0.1)
        assert t.side is not None and t.side.step >= 2
        while time.monotonic() < deadline and t.cache.filling:
            time.sleep(0.1)
        assert not t.cache.filling and t.cache.rows_fetched < total / 5
        assert t.cache.held_bytes <= 2 * 2**20
    finally:
        t.stop()


def test_a_token_federation_restarts_on_a_sample(tmp_path):
    """Token samples (K, L_i, d) too: a store over the cap is sampled, every device's stream
    the same share of TokenSamples, what was fetched well under the store, and a drawn batch
    is padded token arrays."""
    from test_tokens import token_batch, token_manifest

    from fedmobillm.device_runtime.serde import encode_batch

    store = Store(tmp_path / "store.sqlite3")
    try:
        service = Service(store, inputs="tokens")
        for i in range(4):
            reg = service.register(f"tok{i}", token_manifest(), LABELS)
            dev = store.device(reg["device_id"])
            for start in range(0, 1000, 250):
                batch = token_batch(reg, range(start, start + 250), seed=i)
                service.ingest(dev, encode_batch(batch))
        cache = TrainingCache("tokens", memory_mb=0.5, seed=1)
        _refresh_until_full(cache, store)
        assert cache.horizon is not None and cache.rows_fetched < 4000 / 2
        (a,) = cache.archs.values()
        shares = {len(ys) for ys in a.train_y.values()}
        assert len(a.train_y) == 4 and len(shares) == 1 and 0 < shares.pop() < 1000
        assert cache.held_bytes <= 0.5 * 2**20
        ((_arch, x, y, mask),) = cache.sample(np.random.default_rng(0), 16)
        assert x.ndim == 4 and x.shape[0] == 16 == len(y) and mask.shape == (16, x.shape[2])
    finally:
        store.close()


def test_the_sampled_rows_are_screened_and_a_dropped_row_is_replaced(service):
    """Rows stored before the checks with values the bundle cannot produce (fp16 60,000):
    the sampled read-back drops and counts them as the read-back does, and the stream takes
    more rows of its order instead, so both devices still hold the same share, all of it
    within range."""
    store = service.store
    name, depth, taps = ARCHS[0]
    m = make_manifest(name, depth, D, taps)
    regs = [service.register(f"s{i}", m, LABELS) for i in range(2)]
    rng = np.random.default_rng(0)
    for i, reg in enumerate(regs):
        dev = store.device(reg["device_id"])
        x = rng.normal(size=(1500, 3, D)).astype(np.float16)  # (N, K, d)
        if i == 1:
            x[::3, 0, 0] = 60000  # a third of its rows impossible
        with store.transaction() as db:
            store.insert_samples(db, dev, "train", "b", "fp16", x, None,
                                 rng.integers(0, 2, 1500), np.arange(1500))  # fmt: skip
    cache = TrainingCache(memory_mb=1.0, seed=1)
    _refresh_until_full(cache, store)
    assert cache.horizon is not None
    (a,) = cache.archs.values()
    shares = {d: len(ys) for d, ys in a.train_y.items()}
    assert len(set(shares.values())) == 1 and 0 < shares[regs[1]["device_id"]] < 1000, shares
    bad = regs[1]["device_id"]
    assert 0 < cache.dropped[bad] < 1500 / 2 and bad in cache.offences
    assert float(np.abs(a.train_x[bad][np.arange(len(a.train_x[bad]))]).max()) < 100
