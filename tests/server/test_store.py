"""The store's aggregate views that the status (and the dashboard) reads."""

from __future__ import annotations

from server_helpers import make_manifest

from fedmobillm.server.store import Store


def _fleet(store: Store) -> tuple[str, str]:
    with store.transaction() as db:
        a = store.add_device(db, "a", "token-a", "arch-a", "sha-a", make_manifest("tiny-a"))
        b = store.add_device(db, "b", "token-b", "arch-b", "sha-b", make_manifest("tiny-b"))
    return a, b


def _batch(store: Store, device_id: str, split: str, n: int, created: float) -> None:
    with store.transaction() as db:
        batch_id = f"b-{device_id}-{split}-{created}"
        store.add_batch(db, batch_id, device_id, batch_id, split, n, {})
        db.execute("UPDATE batches SET created = ? WHERE batch_id = ?", (created, batch_id))


def test_sample_series_is_cumulative_per_architecture_and_bounded(tmp_path):
    """Prepare batches of two architectures at known times; the series counts them
    cumulatively, in time order, in at most ``points`` points; last uploads per device."""
    store = Store(tmp_path / "store.sqlite3")
    a, b = _fleet(store)
    assert store.sample_series() == [] and store.last_uploads() == {}
    for t in range(9):
        _batch(store, a, "train", 10, 1000.0 + t)
    _batch(store, a, "validation", 5, 1004.5)
    _batch(store, b, "train", 7, 1009.0)

    series = store.sample_series(points=4)
    last = store.last_uploads()

    assert len(series) <= 4
    assert [p["time"] for p in series] == sorted(p["time"] for p in series)
    assert series[-1]["time"] == 1009.0
    assert series[-1]["architectures"] == {
        "arch-a": {"train": 90, "validation": 5},
        "arch-b": {"train": 7, "validation": 0},
    }
    trains = [p["architectures"]["arch-a"]["train"] for p in series]
    assert trains == sorted(trains) and trains[0] < 90
    assert last == {a: 1008.0, b: 1009.0}
    store.close()


def test_stored_samples_reads_every_chunk_of_a_large_upload(tmp_path):
    """More than 900 ids are read in chunks; a stored row must not cut the next chunk
    (its token-ids column once rebound the id list: TypeError on the second chunk)."""
    _check_stored_samples(Store(tmp_path / "store.sqlite3"))


def test_stored_samples_reads_every_chunk_on_postgres():
    import pytest
    from pg_helpers import Postgres, pg_bin

    from fedmobillm.server.store_pg import PostgresStore

    bindir = pg_bin()
    if bindir is None:
        pytest.skip("Debian's postgresql is not installed")
    pg = Postgres(bindir).start()
    try:
        _check_stored_samples(PostgresStore(pg.database()))
    finally:
        pg.stop()


def _check_stored_samples(store) -> None:
    """Store 1,000 int8 samples of one device; stored_samples gives all of them back."""
    import numpy as np

    a, _ = _fleet(store)
    device = store.device(a)
    n = 1000
    act = np.arange(n * 2 * 16, dtype=np.int64).reshape(n, 2, 16) % 100
    ids = np.arange(n, dtype=np.int64)
    labels = ids % 2
    with store.transaction() as db:
        store.add_batch(db, "b1", a, "k1", "train", n, {})
        store.insert_samples(
            db,
            device,
            "train",
            "b1",
            "int8",
            act.astype(np.int8),
            np.full(2, 0.05, np.float32),
            labels,
            ids,
        )
    with store.transaction() as db:
        stored = store.stored_samples(db, device, "train", ids)
    assert sorted(stored) == list(range(n))
    assert [stored[i][0] for i in range(n)] == labels.tolist()
    assert np.allclose(stored[999][1], act[999] * 0.05)
    store.close()
