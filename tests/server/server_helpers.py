"""Server test helpers (imported by the tests as `server_helpers`): synthetic manifests and payloads built with serde, and a real
`fedmobillm serve` process (uvicorn on loopback) with a real SQLite store."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np

from fedmobillm.device_runtime.messages import (
    ROUTE_BATCHES,
    ROUTE_DEVICES,
    RegisterRequest,
    RegisterResponse,
)
from fedmobillm.device_runtime.protocol import BUNDLE_FORMAT_VERSION
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8
from fedmobillm.server.local import LocalServer

ADMIN = "test-admin-token-0123456789abcdef"
LABELS = ["negative", "positive"]
# Trainer settings that make a real server train, evaluate and export within seconds
FAST = {
    "train": True,
    "batch_size": 32,
    "checkpoint_every": 20,
    "eval_every": 20,
    "export_every": 40,
    "idle_after_epochs": 0,
    "side_width": 32,
}


def synthetic_by_id(ids: np.ndarray, k: int, d: int, seed: int, num_labels: int = 2):
    """``synthetic``, one record per sample id: a re-sent id carries the same content."""
    rows = [synthetic(1, k, d, seed * 1_000_003 + int(i), num_labels) for i in ids]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def make_manifest(
    name: str = "tiny-a",
    depth: int = 4,
    hidden: int = 16,
    taps: list[int] | None = None,
    family: str = "bert",
) -> dict:
    taps = taps or [depth // 2, depth]
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "source_model": name,
        "family": family,
        "kind": "encoder",
        "depth": depth,
        "hidden_size": hidden,
        "taps": taps,
        "pivot": "first",
        "quant": "fp32",
        "max_seq_len": 32,
        "activation_scales": [0.05] * len(taps),
        "graph_params": 1000,
        "files": {
            "backbone.onnx": {"sha256": uuid.uuid5(uuid.NAMESPACE_DNS, name).hex, "bytes": 1}
        },
        "tokenizer": {"file": "tokenizer.json", "pad_token_id": 0, "add_special_tokens": True},
    }


def synthetic(n: int, k: int, d: int, seed: int, num_labels: int = 2):
    """Learnable synthetic activations: the label shifts a fixed direction per tap."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_labels, size=n)
    direction = np.random.default_rng(1234 + d).normal(size=(num_labels, k, d))
    x = rng.normal(size=(n, k, d)) + 1.5 * direction[y]  # (N, K, d)
    return x.astype(np.float32), y.astype(np.int64)


def make_payload(
    reg: dict,
    manifest: dict,
    sample_ids,
    *,
    key: str | None = None,
    split: str = "train",
    encoding: str = "int8",
    seed: int = 0,
    labels=None,
) -> bytes:
    ids = np.asarray(sample_ids, dtype=np.int64)
    k, d = len(manifest["taps"]), manifest["hidden_size"]
    x, y = synthetic_by_id(ids, k, d, seed)
    if labels is not None:
        y = np.asarray(labels, dtype=np.int64)
    scales = np.full(k, 0.05, np.float32)
    act = quantize_int8(x, scales) if encoding == "int8" else x.astype(np.float16)
    return encode_batch(
        Batch(
            device_id=reg["device_id"],
            bundle_sha256=reg["bundle_sha256"],
            idempotency_key=key or uuid.uuid4().hex,
            split=split,
            encoding=encoding,
            activations=act,
            labels=y,
            sample_ids=ids,
            scales=scales if encoding == "int8" else None,
        )
    )


class ServerProc(LocalServer):
    """`fedmobillm serve` with ADMIN as its admin token and ``settings`` as its config.
    ``start()`` again after ``kill()`` (SIGKILL: no shutdown hooks, no final checkpoint) or
    ``stop()`` (SIGTERM: graceful, final checkpoint; SIGKILL after 60 s) reuses the port and
    data dir."""

    def __init__(self, data_dir: Path, settings: dict | None = None) -> None:
        super().__init__(
            data_dir,
            admin_token=ADMIN,
            config=settings or {},
            env={"OMP_NUM_THREADS": "1"},
            startup_timeout=60.0,
            grace=60.0,
        )


def metric_values(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's ``/metrics``, parsed by prometheus_client's own text parser (so a
    malformed exposition fails here): {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def admin_headers() -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def register(url: str, name: str, manifest: dict, labels=LABELS) -> dict:
    """POST a RegisterRequest; the RegisterResponse as a dict."""
    body = RegisterRequest(name, manifest, labels).to_dict()
    r = httpx.post(f"{url}{ROUTE_DEVICES}", headers=admin_headers(), json=body)
    assert r.status_code == 201, r.text
    return RegisterResponse.from_dict(r.json()).to_dict()


def upload(url: str, reg: dict, payload: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{url}{ROUTE_BATCHES}",
        content=payload,
        timeout=timeout,
        headers={
            "Authorization": f"Bearer {reg['token']}",
            "Content-Type": "application/octet-stream",
        },
    )
