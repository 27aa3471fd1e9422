"""The trainer cache holds samples as uploaded and within trainer_memory_mb: past the cap a
uniform random subset per (architecture, device), the sampler still balanced across devices
and architectures; the range screen is vectorised and agrees with the per-row check."""

from __future__ import annotations

import time

import httpx
import numpy as np
import psutil
import pytest
from server_helpers import LABELS, admin_headers, make_manifest, make_payload, register, upload

from fedmobillm.device_runtime.messages import ROUTE_STATUS
from fedmobillm.server.compact import PivotStream, screen_pivot
from fedmobillm.server.service import Service
from fedmobillm.server.store import Store, dequantize_sample
from fedmobillm.server.trainer import TrainingCache, _within

K, D = 3, 384  # a MiniLM-like pivot upload: 1,152 int8 values + 3 scales per sample
ARCHS = [("arch-a", 6, [2, 4, 6]), ("arch-b", 12, [4, 8, 12])]


@pytest.fixture
def service(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    yield Service(store)
    store.close()


def _fill(service: Service, devices: int, per_device: int, batch: int = 100) -> list[dict]:
    """``devices`` devices over two architectures, each ``per_device`` int8 training samples
    (ids 0..per_device-1) and 50 validation samples."""
    regs = []
    for i in range(devices):
        name, depth, taps = ARCHS[i % 2]
        m = make_manifest(name, depth, D, taps)
        reg = service.register(f"dev{i}", m, LABELS)
        dev = service.store.device(reg["device_id"])
        for start in range(0, per_device, batch):
            ids = range(start, min(start + batch, per_device))
            service.ingest(dev, make_payload(reg, m, ids, seed=i))
        service.ingest(dev, make_payload(reg, m, range(50), split="validation", seed=i))
        regs.append(reg)
    return regs


def test_cache_holds_pivot_samples_as_uploaded(service):
    """Without a cap every sample is held, int8 in a PivotStream, drawn as float32 equal to
    the dequantized upload."""
    (reg,) = _fill(service, 1, 200)
    cache = TrainingCache()
    assert cache.refresh(service.store) == 200
    a = cache.archs[reg["architecture"]]
    xs = a.train_x[reg["device_id"]]
    assert isinstance(xs, PivotStream) and xs.q.dtype == np.int8 and len(xs) == 200
    rows = service.store.read_samples(0, limit=1000)
    first = dequantize_sample(rows.raw[0], rows.scales[0])  # (K, d)
    assert np.array_equal(xs[np.array([0])][0], first)
    ((arch, x, y),) = cache.sample(np.random.default_rng(0), 16)
    assert arch == reg["architecture"] and x.dtype == np.float32 and x.shape == (16, K, D)
    # buffers grow by doubling: at most ~2x the int8 bytes, well under float32 (4 B a value)
    assert cache.held_bytes < 250 * K * D * 4 / 2 and len(a.val_y) == 50


def test_below_the_cap_every_sample_is_held(service):
    """A cap the data never reaches changes nothing: many devices (each stream's share of
    the cap would be smaller than a device's samples) keep every sample, as without a cap."""
    _fill(service, 7, 50)
    name, depth, taps = ARCHS[1]
    m = make_manifest(name, depth, D, taps)
    reg = service.register("big", m, LABELS)  # one device with far more than its share
    dev = service.store.device(reg["device_id"])
    for start in range(0, 3000, 500):
        service.ingest(dev, make_payload(reg, m, range(start, start + 500), seed=99))
    capped, free = TrainingCache(memory_mb=8.0, seed=1), TrainingCache()
    capped.refresh(service.store)
    free.refresh(service.store)
    # an equal share of the cap per stream would be ~700 samples, under the big device's 3,000
    assert capped.held_bytes < 8 * 2**20
    assert capped.held_samples() == free.held_samples() == capped.samples_read() == 7 * 100 + 3000
    assert len(capped.archs[reg["architecture"]].train_y[reg["device_id"]]) == 3000


def test_cap_keeps_a_uniform_subset_per_device_and_stays_balanced(service):
    """Prepare: 6 devices over two architectures, 1,500 samples each (~10.5 MB as uploaded).
    Execute: refresh a cache capped at 2 MB. Assert: held bytes within the cap; every device
    keeps the same number of samples within its architecture; each kept subset spreads over
    the whole id range (a uniform subset, not the first or last rows); a balanced draw picks
    every device about equally; status-like counts say held < read."""
    regs = _fill(service, 6, 1500)
    cache = TrainingCache(memory_mb=2.0, seed=1)
    cache.refresh(service.store)
    assert cache.held_bytes <= 2 * 2**20
    assert cache.held_samples() < cache.samples_read() == 6 * 1550
    assert len(cache.archs) == 2
    for a in cache.archs.values():
        counts = {d: len(ys) for d, ys in a.train_y.items()}
        assert len(counts) == 3 and len(set(counts.values())) == 1, counts
        assert 0 < next(iter(counts.values())) < 1500
        assert 0 < len(a.val_y) <= 150  # validation: its own share (all 150 fit in it)
    # uniform: the kept ids of each device have a mean near the middle of 0..1499
    rows = service.store.read_samples(0, limit=100_000)
    by_bytes = {}
    for dev, sid, q in zip(rows.device_ids, rows.sample_ids.tolist(), rows.raw, strict=True):
        by_bytes[(dev, q.tobytes())] = sid
    for reg in regs:
        xs = cache.archs[reg["architecture"]].train_x[reg["device_id"]]
        kept = [by_bytes[(reg["device_id"], xs.q[i].tobytes())] for i in range(len(xs))]
        assert abs(np.mean(kept) - 749.5) < 150, np.mean(kept)
        assert min(kept) < 300 and max(kept) > 1200
    # balanced: devices drawn about equally within each architecture, both architectures
    draws: dict[str, int] = {}
    rng = np.random.default_rng(0)
    for _ in range(50):
        for arch, x, _y in cache.sample(rng, 60):
            a = cache.archs[arch]
            draws[arch] = draws.get(arch, 0) + len(x)
    assert len(draws) == 2 and len(set(draws.values())) == 1, draws


def test_cap_holds_while_many_samples_arrive(service):
    """Refreshing after every upload round: held bytes never pass the cap while the store
    grows to ~12x the cap; new devices still get their share."""
    cache = TrainingCache(memory_mb=1.0, seed=2)
    peak = 0
    for round_ in range(4):
        _fill_round(service, round_)
        cache.refresh(service.store)
        peak = max(peak, cache.held_bytes)
    assert peak <= 2**20
    (a,) = cache.archs.values()
    assert len(a.train_y) == 8 and min(len(v) for v in a.train_y.values()) > 10


def _fill_round(service: Service, round_: int) -> None:
    """Two new arch-a devices with 1,500 samples each."""
    name, depth, taps = ARCHS[0]
    m = make_manifest(name, depth, D, taps)
    for j in range(2):
        reg = service.register(f"r{round_}-{j}", m, LABELS)
        dev = service.store.device(reg["device_id"])
        for start in range(0, 1500, 250):
            service.ingest(dev, make_payload(reg, m, range(start, start + 250), seed=round_))


def test_vectorised_screen_agrees_with_the_per_row_check():
    """screen_pivot says what dequantize + _within says, row by row, for int8 and fp16 rows
    with huge, infinite and NaN values or scales."""
    rng = np.random.default_rng(0)
    bound = np.array([10.0, 10.0, 10.0], np.float32)
    q = rng.integers(-127, 128, size=(8, K, 16)).astype(np.int8)
    scales = [
        np.full(K, s, np.float32) for s in (0.05, 0.05, 1.0, np.inf, np.nan, 0.07, 1e30, 0.01)
    ]
    x16 = rng.normal(size=(6, K, 16)).astype(np.float16)
    x16[1, 0, 0], x16[2, 1, 3], x16[3, 2, 2] = np.inf, np.nan, 11.0
    for raw, sc in (([*q], scales), ([*x16], [None] * 6)):
        got = screen_pivot(raw, sc, bound).tolist()
        want = [_within(dequantize_sample(r, s), bound) for r, s in zip(raw, sc, strict=True)]
        assert got == want


@pytest.mark.slow
def test_real_server_cache_within_cap_while_the_store_grows(server_factory):
    """A real server with trainer_memory_mb 4: 24,000 samples (~28 MB as uploaded) arrive
    through the API; the trainer's status says it holds at most the cap and fewer samples than
    the store, and the server's RSS grows by less than 3x the cap after the first 4,000."""
    srv = server_factory(
        {"train": True, "trainer_memory_mb": 4, "batch_size": 32, "side_width": 32}
    )
    m = make_manifest("arch-a", 6, D, [2, 4, 6])
    regs = [register(srv.url, f"d{i}", m) for i in range(4)]
    proc = psutil.Process(srv.proc.pid)
    rss = []
    for r in range(6):
        for i, reg in enumerate(regs):
            for start in range(r * 1000, (r + 1) * 1000, 250):
                assert (
                    upload(
                        srv.url, reg, make_payload(reg, m, range(start, start + 250), seed=i)
                    ).status_code
                    == 200
                )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            t = httpx.get(f"{srv.url}{ROUTE_STATUS}", headers=admin_headers(), timeout=30).json()[
                "trainer"
            ]
            if t["cache"]["samples_read"] >= (r + 1) * 4000:
                break
            time.sleep(0.5)
        rss.append(proc.memory_info().rss)
        assert t["cache"]["bytes"] <= 4 * 2**20
    assert t["cache"]["samples"] < t["cache"]["samples_read"] == 24_000
    assert rss[-1] - rss[0] < 3 * 4 * 2**20, [r // 2**20 for r in rss]
