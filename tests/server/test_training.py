"""The trainer thread in a real server: learns from two architectures, evaluates on
validation uploads, checkpoints, exports personal models that devices download."""

from __future__ import annotations

import io
import json
import time
import zipfile

import httpx
import onnxruntime as ort
import pytest
from server_helpers import (
    FAST,
    admin_headers,
    make_manifest,
    make_payload,
    register,
    synthetic,
    upload,
)

pytestmark = pytest.mark.integration


def wait_status(url: str, pred, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/v1/status", headers=admin_headers()).json()
        if pred(st):
            return st
        time.sleep(0.3)
    raise AssertionError(f"status never satisfied the condition: {st['trainer']}")


def test_trains_two_architectures_and_serves_personal_models(server_factory):
    srv = server_factory(FAST)
    ma = make_manifest("tiny-a", depth=4, hidden=16, taps=[2, 4])
    mb = make_manifest("tiny-b", depth=6, hidden=24, taps=[2, 4, 6])
    ra, rb = register(srv.url, "a", ma), register(srv.url, "b", mb)
    r = httpx.get(
        f"{srv.url}/v1/personal-model", headers={"Authorization": f"Bearer {ra['token']}"}
    )
    assert r.status_code == 409
    for reg, m, seed in ((ra, ma, 1), (rb, mb, 2)):
        assert upload(srv.url, reg, make_payload(reg, m, range(300), seed=seed)).status_code == 200
        v = make_payload(reg, m, range(100), split="validation", seed=seed + 10)
        assert upload(srv.url, reg, v).status_code == 200

    st = wait_status(
        srv.url, lambda s: s["trainer"]["step"] >= 80 and len(s["trainer"]["personal_models"]) == 2
    )

    last = st["trainer"]["history"][-1]["validation"]
    assert set(last) == {ra["architecture"], rb["architecture"]}
    assert all(m["accuracy"] > 0.9 for m in last.values()), last
    r = httpx.get(
        f"{srv.url}/v1/personal-model", headers={"Authorization": f"Bearer {rb['token']}"}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert {"personal.onnx", "personal.json"} <= set(zf.namelist())
    assert "personal.safetensors" not in zf.namelist()  # the device runs the graph only
    full = httpx.get(
        f"{srv.url}/v1/personal-model",
        params={"weights": "true"},
        headers={"Authorization": f"Bearer {rb['token']}"},
    )
    assert full.status_code == 200
    assert "personal.safetensors" in zipfile.ZipFile(io.BytesIO(full.content)).namelist()
    assert len(r.content) < len(full.content)
    only = httpx.get(
        f"{srv.url}/v1/personal-model",
        params={"graph": "onnx"},
        headers={"Authorization": f"Bearer {rb['token']}"},
    )
    assert set(zipfile.ZipFile(io.BytesIO(only.content)).namelist()) == set(zf.namelist())
    bad = httpx.get(
        f"{srv.url}/v1/personal-model",
        params={"graph": "tflite"},
        headers={"Authorization": f"Bearer {rb['token']}"},
    )
    assert bad.status_code == 422 and "graph" in bad.text
    meta = json.loads(zf.read("personal.json"))
    assert meta["bundle_sha256s"] == [rb["bundle_sha256"]]
    sess = ort.InferenceSession(zf.read("personal.onnx"), providers=["CPUExecutionProvider"])
    x, y = synthetic(200, 3, 24, seed=99)
    logits = sess.run(["logits"], {"activations": x})[0]  # (200, 2)
    assert logits.shape == (200, 2)
    assert (logits.argmax(1) == y).mean() > 0.9
    assert "fedmobillm_trainer_step" in httpx.get(f"{srv.url}/metrics").text


def test_validation_arriving_while_idle_is_evaluated(server_factory):
    """A validator that uploads after the trainer went idle still gets evaluated: history,
    status and the best-validation snapshot a device downloads reflect its records."""
    srv = server_factory({**FAST, "idle_after_epochs": 2})
    m = make_manifest("tiny-a", depth=4, hidden=16, taps=[2, 4])
    reg = register(srv.url, "a", m)
    assert upload(srv.url, reg, make_payload(reg, m, range(200), seed=1)).status_code == 200
    wait_status(srv.url, lambda s: s["trainer"]["idle"] and s["trainer"]["personal_models"])
    v = make_payload(reg, m, range(80), split="validation", seed=11)
    assert upload(srv.url, reg, v).status_code == 200
    st = wait_status(
        srv.url,
        lambda s: (
            s["trainer"]["best_validation"].get(reg["architecture"], {}).get("n") == 80
            and s["trainer"]["personal_models"].get(reg["architecture"], -1)
            == s["trainer"]["best_validation"][reg["architecture"]]["step"]
        ),
    )
    tr = st["trainer"]
    assert tr["idle"]
    assert tr["history"][-1]["validation"][reg["architecture"]]["n"] == 80
    assert tr["best_validation"][reg["architecture"]]["accuracy"] > 0.9


def test_best_snapshot_starts_afresh_when_the_training_set_grows(server_factory):
    """The device gets the best snapshot among those trained on (nearly) all its data: once
    the training set has grown by more than 10%, the comparison starts again."""
    srv = server_factory({**FAST, "idle_after_epochs": 2})
    m = make_manifest("tiny-a", depth=4, hidden=16, taps=[2, 4])
    reg = register(srv.url, "a", m)
    v = make_payload(reg, m, range(80), split="validation", seed=11)
    assert upload(srv.url, reg, v).status_code == 200
    first = make_payload(reg, m, range(100), seed=1, key="first")
    assert upload(srv.url, reg, first).status_code == 200
    arch = reg["architecture"]
    wait_status(srv.url, lambda s: s["trainer"]["idle"] and arch in s["trainer"]["best_validation"])
    more = make_payload(reg, m, range(100, 300), seed=2, key="more")
    assert upload(srv.url, reg, more).status_code == 200
    st = wait_status(srv.url, lambda s: s["trainer"]["best_validation"][arch].get("train") == 300)
    assert st["trainer"]["best_validation"][arch]["step"] > 0


def test_personal_zip_keeps_only_the_graph_asked_for(tmp_path):
    """A device runs one runtime: graph=onnx / graph=pte drop the other graph's bytes."""
    from fedmobillm.server.personal import arch_slug, read_personal_zip

    arch = "bert/x/d8/L2/taps1,2"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, size in (("personal.onnx", 5000), ("personal.pte", 7000), ("personal.json", 9)):
            z.writestr(name, bytes(size))
    (tmp_path / f"{arch_slug(arch)}.zip").write_bytes(buf.getvalue())
    names = {
        g: set(zipfile.ZipFile(io.BytesIO(read_personal_zip(tmp_path, arch, graph=g))).namelist())
        for g in ("all", "onnx", "pte")
    }
    assert names["all"] == {"personal.onnx", "personal.pte", "personal.json"}
    assert names["onnx"] == {"personal.onnx", "personal.json"}
    assert names["pte"] == {"personal.pte", "personal.json"}
    assert len(read_personal_zip(tmp_path, arch, graph="onnx")) < len(buf.getvalue())
    assert read_personal_zip(tmp_path, "other", graph="onnx") is None
