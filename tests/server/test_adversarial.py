"""A device is authenticated, not trusted: against a real server, impossible uploads are
refused and counted, a repeated offender is quarantined and released, conflicts answer 409,
poisoned rows already in a store never reach the model, a label-flipping flooder costs the
honest devices little, and no request costs the server more than a bound."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import psutil
import pytest
from server_helpers import (
    ADMIN,
    admin_headers,
    make_manifest,
    make_payload,
    metric_values,
    register,
    synthetic_by_id,
    upload,
)

from benchmarks.bench_robustness import overlapping
from fedmobillm.device_runtime.messages import (
    ROUTE_BATCHES,
    ROUTE_DEVICES,
    ROUTE_QUARANTINE,
    ROUTE_QUARANTINE_DEVICE,
    ROUTE_STATUS,
)
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8

pytestmark = pytest.mark.integration

SCALE = 0.05  # make_manifest's activation pre-scale for every tap


def forged(reg: dict, m: dict, ids, *, x=None, scales=None, encoding="int8", labels=None):
    """A payload with chosen activations (float, before encoding), scales and labels."""
    ids = np.asarray(list(ids), np.int64)
    k, d = len(m["taps"]), m["hidden_size"]
    x0, y = synthetic_by_id(ids, k, d, seed=7)
    x = x0 if x is None else np.broadcast_to(np.asarray(x, np.float32), x0.shape)
    y = y if labels is None else np.full(len(ids), labels, np.int64)
    if encoding == "int8":
        s = np.full(k, SCALE, np.float32) if scales is None else np.full(k, scales, np.float32)
        act = quantize_int8(x, s)
    else:
        s, act = None, x.astype(np.float16)
    batch = Batch(
        reg["device_id"], reg["bundle_sha256"], uuid.uuid4().hex, "train", encoding, act, y, ids, s
    )
    return encode_batch(batch)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from server_helpers import ServerProc

    s = ServerProc(tmp_path_factory.mktemp("adv") / "data", {"train": False}).start()
    yield s
    s.stop()


def _device(srv, manifest=None) -> tuple[dict, dict]:
    m = manifest or make_manifest("tiny-a")
    return register(srv.url, f"phone-{uuid.uuid4().hex[:8]}", m), m


BAD_UPLOADS = {
    "nan": (dict(x=float("nan"), encoding="fp16"), "NaN or infinity"),
    "inf": (dict(x=float("inf"), encoding="fp16"), "NaN or infinity"),
    "huge-scales": (dict(scales=1e30), "activation pre-scales"),
    "other-scales": (dict(scales=0.06), "activation pre-scales"),
    "fp16-overflow": (dict(x=60000.0, encoding="fp16"), "range for that tap"),
    "label-out-of-range": (dict(labels=5), "labels must be in"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_impossible_uploads_are_refused(srv, case):
    """Prepare a fresh device; upload values its bundle cannot produce; 400 with a message
    naming the problem, and nothing stored."""
    reg, m = _device(srv)
    kwargs, message = BAD_UPLOADS[case]

    r = upload(srv.url, reg, forged(reg, m, range(4), **kwargs))

    assert r.status_code == 400, r.text
    assert message in r.json()["detail"], r.json()
    state = httpx.get(
        f"{srv.url}{ROUTE_DEVICES}/{reg['device_id']}",
        headers={"Authorization": f"Bearer {reg['token']}"},
    ).json()
    assert state["samples"]["train"] == 0


def test_repeat_offender_is_quarantined_then_released(srv):
    reg, m = _device(srv)
    answers = [upload(srv.url, reg, forged(reg, m, range(4), scales=1e30)) for _ in range(3)]
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert "quarantined" in answers[-1].json()["hint"]

    honest = upload(srv.url, reg, make_payload(reg, m, range(10)))
    listed = httpx.get(f"{srv.url}{ROUTE_QUARANTINE}", headers=admin_headers()).json()
    cli = subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", "server", "quarantine", "--json"]
        + ["--server", srv.url, "--admin-token", ADMIN],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert honest.status_code == 403 and "quarantined" in honest.json()["detail"]
    mine = [f for f in listed if f["device_id"] == reg["device_id"]]
    assert mine and mine[0]["offences"] == 3 and mine[0]["quarantined"] is not None
    assert "pre-scales" in mine[0]["last_reason"]
    assert cli.returncode == 0, cli.stderr
    assert reg["device_id"] in {f["device_id"] for f in json.loads(cli.stdout)}

    route = ROUTE_QUARANTINE_DEVICE.format(device_id=reg["device_id"])
    assert httpx.delete(f"{srv.url}{route}", headers=admin_headers()).status_code == 204
    assert httpx.delete(f"{srv.url}{route}", headers=admin_headers()).status_code == 404
    assert upload(srv.url, reg, make_payload(reg, m, range(10))).status_code == 200


def test_conflicting_resends_answer_409(srv):
    """Same key with other labels, or known sample ids with other activations: 409 and the
    first upload kept; the same content under a new key is still a harmless skip."""
    reg, m = _device(srv)
    first = make_payload(reg, m, range(10), key="k-1")
    assert upload(srv.url, reg, first).status_code == 200

    same_key = upload(srv.url, reg, make_payload(reg, m, range(10), key="k-1", labels=[1] * 10))
    other_acts = upload(srv.url, reg, forged(reg, m, range(5, 15), x=0.5))
    resent = upload(srv.url, reg, make_payload(reg, m, range(5, 15), key="k-2"))

    assert same_key.status_code == 409 and "idempotency key" in same_key.json()["detail"]
    assert other_acts.status_code == 409 and "other content" in other_acts.json()["detail"]
    assert resent.status_code == 200 and resent.json()["skipped"] == 5
    assert resent.json()["device_samples"]["train"] == 15


# -- resource bounds ------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def _raw_request(port: int, head: str, body_bytes: int, chunked: bool = False) -> bytes:
    """Send ``head`` and up to ``body_bytes`` of body (stop when the server closes); the
    server's answer."""
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        sent = 0
        try:
            while sent < body_bytes:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
        except OSError:  # the server answered and closed: it stopped reading
            pass
        s.settimeout(10)
        try:
            return s.recv(65536)
        except OSError:
            return b""


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_unauthenticated_200mb_costs_under_20mb(srv, chunked):
    size = 200 * 2**20
    before = _rss_mb(srv.proc.pid)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = (
        f"POST {ROUTE_DEVICES} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{length}\r\n\r\n"
    )

    answer = _raw_request(srv.port, head, size, chunked)
    batches = _raw_request(
        srv.port,
        f"POST {ROUTE_BATCHES} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n",
        size,
    )
    after = _rss_mb(srv.proc.pid)

    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert batches.startswith(b"HTTP/1.1 401"), batches[:200]
    assert after - before < 20, (before, after)
    assert httpx.get(f"{srv.url}/healthz").status_code == 200


def test_oversized_headers_answer_431(srv):
    r = httpx.get(f"{srv.url}{ROUTE_STATUS}", headers={**admin_headers(), "X-Big": "y" * 20000})
    assert r.status_code == 431, r.text


def test_failed_authentication_ends_in_429(server_factory):
    srv = server_factory({"train": False})
    codes = []
    with httpx.Client(base_url=srv.url) as client:
        for i in range(1000):
            r = client.get(ROUTE_STATUS, headers={"Authorization": f"Bearer wrong-{i}"})
            codes.append(r.status_code)
        blocked = client.get(ROUTE_STATUS, headers=admin_headers())

    assert set(codes[:30]) == {401}
    assert codes[30:] == [429] * 970
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    metrics = metric_values(srv.url)
    assert metrics[("fedmobillm_rejected_requests_total", (("status", "429"),))] == 971


# -- training under attack ------------------------------------------------------------

TRAIN = {
    "train": True,
    "batch_size": 64,
    "checkpoint_every": 50,
    "eval_every": 50,
    "export_every": 100,
    "idle_after_epochs": 0,
    "side_width": 32,
}


def _status(url: str) -> dict:
    return httpx.get(f"{url}{ROUTE_STATUS}", headers=admin_headers()).json()["trainer"]


def _wait(url: str, pred, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _status(url)
        if pred(st):
            return st
        time.sleep(0.5)
    raise AssertionError(f"trainer never got there: {st}")


def test_poisoned_store_and_attacks_never_reach_the_model(server_factory, tmp_path):
    """Prepare: a store that already holds rows with scales of 1e30 (as stored before
    uploads were checked) beside honest data. Execute: train while attackers send every
    impossible upload. Assert: the rows are dropped and counted, the weights stay finite,
    the personal model is served, validation is learnt."""
    from fedmobillm.server.store import Store

    data = tmp_path / "poisoned"
    srv = server_factory({"train": False}, data_dir=data)
    honest, m = _device(srv)
    bad, _ = _device(srv, m)
    assert upload(srv.url, honest, make_payload(honest, m, range(300), seed=1)).status_code == 200
    v = make_payload(honest, m, range(100), split="validation", seed=2)
    assert upload(srv.url, honest, v).status_code == 200
    srv.stop()
    store = Store(data / "store.sqlite3")
    device = store.device(bad["device_id"])
    x, y = synthetic_by_id(np.arange(50), 2, 16, seed=3)
    with store.transaction() as db:  # what the unchecked server used to accept
        store.insert_samples(
            db,
            device,
            "train",
            "b-poison",
            "int8",
            quantize_int8(x, np.full(2, SCALE)),
            np.full(2, 1e30, np.float32),
            y,
            np.arange(50),
        )
    store.close()

    srv = server_factory(TRAIN, data_dir=data)
    for kwargs, _ in BAD_UPLOADS.values():
        attacker, _ = _device(srv, m)
        assert upload(srv.url, attacker, forged(attacker, m, range(4), **kwargs)).status_code == 400
    st = _wait(srv.url, lambda s: s["step"] >= 150 and s["personal_models"])
    model = httpx.get(
        f"{srv.url}/v1/personal-model", headers={"Authorization": f"Bearer {honest['token']}"}
    )

    assert st["dropped_samples"] == {bad["device_id"]: 50}
    assert st["weights_finite"] is True and st["error"] is None
    assert math.isfinite(st["loss"]) and st["skipped_steps"] == 0
    assert st["architectures"][honest["architecture"]]["train"] == 300
    assert st["history"][-1]["validation"][honest["architecture"]]["accuracy"] > 0.9
    assert model.status_code == 200
    metrics = metric_values(srv.url)
    assert metrics[("fedmobillm_trainer_weights_finite", ())] == 1
    assert metrics[("fedmobillm_trainer_dropped_samples_total", ())] == 50


def _upload_hard(url, reg, m, ids, seed, split="train", flip=False):
    x, y = overlapping(ids, len(m["taps"]), m["hidden_size"], seed, flip)
    s = np.full(len(m["taps"]), SCALE, np.float32)
    batch = Batch(
        reg["device_id"],
        reg["bundle_sha256"],
        uuid.uuid4().hex,
        split,
        "int8",
        quantize_int8(x, s),
        y,
        np.asarray(list(ids), np.int64),
        s,
    )
    r = upload(url, reg, encode_batch(batch))
    assert r.status_code == 200, r.text


def _fleet_accuracy(server_factory, tmp_path, name: str, flipper: bool) -> float:
    """Ten devices of 200 samples (the tenth, with ``flipper``, uploads 2,000 flipped ones:
    a label-flipping flooder); honest validation; the mean of the last four evaluations."""
    srv = server_factory({**TRAIN, "eval_every": 25}, data_dir=tmp_path / name)
    m = make_manifest("tiny-a")
    devices = [register(srv.url, f"{name}-{i}", m) for i in range(10)]
    for i, reg in enumerate(devices):
        flips = flipper and i == 9
        ids = range(2000) if flips else range(200)
        _upload_hard(srv.url, reg, m, ids, seed=100 + i, flip=flips)
    _upload_hard(srv.url, devices[0], m, range(3000), seed=999, split="validation")
    arch = devices[0]["architecture"]

    def scored(s):  # evaluations after the validation upload arrived (the trainer may run
        # its first ones before it: it starts training on the first train upload)
        return [h["validation"][arch]["accuracy"] for h in s["history"]
                if arch in h.get("validation", {})]  # fmt: skip

    st = _wait(srv.url, lambda s: s["step"] >= 400 and len(scored(s)) >= 4)
    srv.stop()
    return float(np.mean(scored(st)[-4:]))


def test_label_flipping_flooder_costs_honest_devices_little(server_factory, tmp_path):
    clean = _fleet_accuracy(server_factory, tmp_path, "clean", flipper=False)
    attacked = _fleet_accuracy(server_factory, tmp_path, "attacked", flipper=True)

    assert clean > 0.8, clean
    assert clean - attacked <= 0.02, (clean, attacked)
