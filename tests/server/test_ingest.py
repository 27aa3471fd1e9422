"""Ingest over a real uvicorn server: validation, durable acks, idempotency, auth."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from server_helpers import (
    ADMIN,
    LABELS,
    ServerProc,
    admin_headers,
    make_manifest,
    make_payload,
    metric_values,
    register,
    upload,
)

from fedmobillm.device_runtime.serde import Batch, encode_batch
from fedmobillm.errors import FedMobiLLMError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def srv(tmp_path_factory):

    s = ServerProc(
        tmp_path_factory.mktemp("ingest") / "data", {"train": False, "max_body_bytes": 200_000}
    ).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dev_a(srv):
    m = make_manifest("tiny-a")
    return register(srv.url, "phone-a", m), m


@pytest.fixture(scope="module")
def dev_b(srv):
    m = make_manifest("tiny-b", depth=6, hidden=24, taps=[2, 4, 6])
    return register(srv.url, "phone-b", m), m


def test_ack_then_duplicate_replay(srv, dev_a):
    """A re-sent batch returns the original ack with duplicate=true and stores nothing."""
    reg, m = dev_a
    payload = make_payload(reg, m, range(10), key="k-dup")
    first = upload(srv.url, reg, payload)
    again = upload(srv.url, reg, payload)
    assert first.status_code == 200, first.text
    assert first.json()["samples"] == 10 and first.json()["duplicate"] is False
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["batch_id"] == first.json()["batch_id"]
    state = httpx.get(
        f"{srv.url}/v1/devices/{reg['device_id']}",
        headers={"Authorization": f"Bearer {reg['token']}"},
    ).json()
    assert state["samples"]["train"] == 10
    assert "k-dup" in state["acked_keys"]


def test_sample_ids_unique_across_batches(srv, dev_a):
    reg, m = dev_a
    r = upload(srv.url, reg, make_payload(reg, m, range(5, 15), key="k-overlap"))
    assert r.status_code == 200
    assert r.json()["samples"] == 5 and r.json()["skipped"] == 5
    r = upload(srv.url, reg, make_payload(reg, m, range(5), split="validation", encoding="fp16"))
    assert r.json()["device_samples"] == {"train": 15, "validation": 5, "anchor": 0}


def test_anchor_upload_needs_an_anchor_set(srv, dev_a):
    """Split ``anchor`` is refused (400, nothing stored) by a server started without
    --anchors: its ids would name texts the server never handed out."""
    reg, m = dev_a
    payload = make_payload(reg, m, range(3), split="anchor", key="k-anchor")
    r = upload(srv.url, reg, payload)
    assert r.status_code == 400 and "no anchor set" in r.json()["detail"], r.text
    assert "--anchors" in r.json()["hint"]


@pytest.mark.parametrize(
    "mutate, status, words",
    [
        (lambda b: setattr(b, "activations", b.activations[:, :, :5]), 400, "registered bundle"),
        (lambda b: setattr(b, "bundle_sha256", "0" * 64), 409, "bundle"),
        (lambda b: setattr(b, "device_id", "dev-other"), 403, "token belongs"),
        (lambda b: setattr(b, "labels", np.full(len(b.labels), 7)), 400, "labels must be"),
        (lambda b: setattr(b, "protocol", 99), 400, "protocol version"),
        (lambda b: setattr(b, "activations", b.activations.astype(np.float16)), 400, "dtype"),
    ],
)
def test_bad_batches_are_refused_and_store_nothing(srv, dev_b, mutate, status, words):
    reg, m = dev_b
    before = httpx.get(f"{srv.url}/v1/devices/{reg['device_id']}", headers=admin_headers())
    good = make_payload(reg, m, range(1000, 1004))
    from fedmobillm.device_runtime.serde import decode_batch

    b = decode_batch(good)
    mutate(b)
    r = upload(srv.url, reg, encode_batch(b))
    after = httpx.get(f"{srv.url}/v1/devices/{reg['device_id']}", headers=admin_headers())
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert after.json()["samples"] == before.json()["samples"]


def test_nan_and_size_limit_and_garbage(srv, dev_b):
    reg, m = dev_b
    k, d = len(m["taps"]), m["hidden_size"]
    act = np.zeros((2, k, d), np.float16)
    act[0, 0, 0] = np.nan
    nan = encode_batch(
        Batch(
            reg["device_id"],
            reg["bundle_sha256"],
            "k-nan",
            "train",
            "fp16",
            act,
            np.zeros(2, np.int64),
            np.arange(2, dtype=np.int64),
        )
    )
    assert upload(srv.url, reg, nan).status_code == 400
    big = make_payload(reg, m, range(3000), encoding="fp16")
    r = upload(srv.url, reg, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert upload(srv.url, reg, b"not a payload at all").status_code == 400
    r = httpx.post(
        f"{srv.url}/v1/batches",
        content=b"{}",
        headers={"Authorization": f"Bearer {reg['token']}", "Content-Type": "application/json"},
    )
    assert r.status_code == 415


def test_auth_401_403(srv, dev_a, dev_b):
    reg_a, _ = dev_a
    reg_b, _ = dev_b
    dev = {"Authorization": f"Bearer {reg_a['token']}"}
    calls = [
        ("POST", "/v1/devices", {"json": {"name": "x", "manifest": {}, "label_names": LABELS}}),
        ("GET", f"/v1/devices/{reg_b['device_id']}", {}),
        ("POST", "/v1/batches", {"content": b"x"}),
        ("GET", "/v1/personal-model", {}),
        ("GET", "/v1/status", {}),
    ]
    for method, path, kw in calls:
        assert httpx.request(method, srv.url + path, **kw).status_code == 401, path
        bad = {"Authorization": "Bearer nope"}
        assert httpx.request(method, srv.url + path, headers=bad, **kw).status_code == 401
    # another device's state, admin-only endpoints, device-only endpoints
    assert httpx.get(f"{srv.url}/v1/devices/{reg_b['device_id']}", headers=dev).status_code == 403
    assert httpx.get(f"{srv.url}/v1/status", headers=dev).status_code == 403
    assert httpx.get(f"{srv.url}/v1/personal-model", headers=admin_headers()).status_code == 403
    for path in ("/healthz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(srv.url + path).status_code == 200


def test_registration_conflicts(srv, dev_a):
    m = make_manifest("tiny-c")
    r = httpx.post(
        f"{srv.url}/v1/devices",
        headers=admin_headers(),
        json={"name": "phone-a", "manifest": m, "label_names": LABELS},
    )
    assert r.status_code == 409 and "taken" in r.json()["detail"]
    r = httpx.post(
        f"{srv.url}/v1/devices",
        headers=admin_headers(),
        json={"name": "phone-z", "manifest": m, "label_names": ["a", "b", "c"]},
    )
    assert r.status_code == 409
    r = httpx.post(
        f"{srv.url}/v1/devices",
        headers=admin_headers(),
        json={"name": "phone-z", "manifest": {"format_version": 1}, "label_names": LABELS},
    )
    assert r.status_code == 400 and "manifest" in r.json()["detail"]


def test_personal_model_409_before_training(srv, dev_a):
    reg, _ = dev_a
    r = httpx.get(
        f"{srv.url}/v1/personal-model", headers={"Authorization": f"Bearer {reg['token']}"}
    )
    assert r.status_code == 409


def test_status_and_metrics(srv, dev_a):
    st = httpx.get(f"{srv.url}/v1/status", headers=admin_headers()).json()
    assert st["label_names"] == LABELS
    assert st["totals"]["devices"] >= 1
    r = httpx.get(f"{srv.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=")
    assert ADMIN not in r.text
    before = metric_values(srv.url)
    reg, m = dev_a
    assert upload(srv.url, reg, make_payload(reg, m, range(900, 907), key="k-metrics")).is_success
    after = metric_values(srv.url)
    for name, step in [("acked_batches", 1), ("acked_samples", 7), ("ingest_commits", 1)]:
        key = (f"fedmobillm_{name}_total", ())
        assert after[key] - before[key] == step, name
    assert after[("fedmobillm_stored_samples", ())] == before[("fedmobillm_stored_samples", ())] + 7
    assert after[("process_resident_memory_bytes", ())] > 0  # the standard process metrics


def test_server_status_command(srv, dev_a):
    import json
    import subprocess
    import sys

    def status(token: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = ["server", "status", "--server", srv.url, "--admin-token", token, *extra]
        return subprocess.run(
            [sys.executable, "-m", "fedmobillm.cli", *cmd],
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = status(ADMIN, "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert any(d["name"] == "phone-a" for d in st["devices"])
    table = status(ADMIN)
    assert table.returncode == 0 and "phone-a" in table.stdout
    bad = status("wrong")
    assert bad.returncode == 1 and "refused" in bad.stderr


def test_anchor_shares_and_anchor_upload_validation(server_factory, tmp_path):
    """A server with 5 anchor texts, 3 per device: the first device of an architecture gets
    ids 0-2, the second 3-4, the third none, a device of another architecture 0-2 again.
    Anchor uploads need ids inside the set and label -1; a changed anchor file for the same
    data dir, or a bad one, stops start-up with a message naming the problem."""
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(f'{{"text": "anchor text {i}"}}\n' for i in range(5)))
    srv = server_factory({"train": False, "anchors": str(anchors), "anchors_per_device": 3})
    ma, mb = make_manifest("tiny-a"), make_manifest("tiny-b")
    regs = [register(srv.url, f"a{i}", ma) for i in range(3)] + [register(srv.url, "b0", mb)]

    def share(reg: dict) -> dict:
        auth = {"Authorization": f"Bearer {reg['token']}"}
        r = httpx.get(f"{srv.url}/v1/anchors", headers=auth)
        assert r.status_code == 200, r.text
        return r.json()

    shares = [share(r) for r in regs]
    assert [s["ids"] for s in shares] == [[0, 1, 2], [3, 4], [], [0, 1, 2]]
    assert shares[1]["texts"] == ["anchor text 3", "anchor text 4"]
    assert {s["total"] for s in shares} == {5} and len({s["anchor_set"] for s in shares}) == 1
    assert httpx.get(f"{srv.url}/v1/anchors", headers=admin_headers()).status_code == 403

    reg = regs[0]
    for ids, labels in (([3, 5], [-1, -1]), ([0, 1], [-1, 1])):
        r = upload(srv.url, reg, make_payload(reg, ma, ids, split="anchor", labels=labels))
        assert r.status_code == 400 and "0..4" in r.json()["detail"], r.text
    r = upload(srv.url, reg, make_payload(reg, ma, [0, 1, 2], split="anchor", labels=[-1] * 3))
    assert r.status_code == 200 and r.json()["device_samples"]["anchor"] == 3, r.text

    srv.stop()
    anchors.write_text('{"text": "another anchor set"}\n{"text": "of two texts"}\n')
    with pytest.raises(FedMobiLLMError, match="another anchor set"):
        srv.start()

    bad = tmp_path / "dup.txt"
    bad.write_text("same\nsame\n")
    proc = ServerProc(tmp_path / "data-bad", {"train": False, "anchors": str(bad)})
    with pytest.raises(FedMobiLLMError, match="repeats texts"):
        proc.start()
