"""Server test helpers (imported by the tests as `server_helpers`): synthetic manifests and payloads built with serde, and a real
`fedmobillm serve` process (uvicorn on loopback) with a real SQLite store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from fedmobillm.device_runtime.protocol import BUNDLE_FORMAT_VERSION
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8

ADMIN = "test-admin-token-0123456789abcdef"
LABELS = ["negative", "positive"]


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
    x, y = synthetic(len(ids), k, d, seed)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    data_dir: Path
    settings: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProc:
        self.port = self.port or free_port()
        cfg = self.data_dir.parent / f"{self.data_dir.name}-config.json"
        cfg.write_text(json.dumps(self.settings))
        env = {**os.environ, "FEDMOBILLM_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "1"}
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedmobillm.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--config",
                str(cfg),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no final checkpoint."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM: graceful (uvicorn runs the lifespan shutdown: final checkpoint)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def admin_headers() -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def register(url: str, name: str, manifest: dict, labels=LABELS) -> dict:
    r = httpx.post(
        f"{url}/v1/devices",
        headers=admin_headers(),
        json={"name": name, "manifest": manifest, "label_names": labels},
    )
    assert r.status_code == 201, r.text
    return r.json()


def upload(url: str, reg: dict, payload: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/batches",
        content=payload,
        timeout=timeout,
        headers={
            "Authorization": f"Bearer {reg['token']}",
            "Content-Type": "application/octet-stream",
        },
    )
