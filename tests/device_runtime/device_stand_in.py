"""Loopback stand-ins for the server, shared by the device tests (test_client.py,
test_device_tokens.py, test_device_lm.py), and the CLI run with torch unimportable.

``LoopbackServer``: a real HTTP server on 127.0.0.1 (a free port, a daemon thread) whose
subclasses answer with ``get(path)`` / ``post(path, body)`` -> (status, json body[, headers]).
``DeviceStandIn``: the server's device routes (register, GET the device, POST a batch decoded
and checked with ``serde.decode_batch``, deduplicated by idempotency key)."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from torch_blocker import python_without_torch

from fedmobillm.device_runtime import serde
from fedmobillm.device_runtime.messages import ROUTE_BATCHES, ROUTE_DEVICES, device_route

Answer = tuple[Any, ...]  # (status, json body) or (status, json body, headers)
NOT_FOUND: Answer = (404, {"detail": "not found"})


class LoopbackServer:
    """A real HTTP server on loopback; subclasses override ``get`` and ``post``. A method
    they do not answer gets 501."""

    def __init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self.answer(*outer.get(self.path))

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.answer(*outer.post(self.path, body))

            def answer(self, status: int, body: Any, headers: dict[str, str] | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {**(headers or {}), "Content-Type": "application/json"}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def get(self, path: str) -> Answer:
        return 501, {"detail": "GET is not answered here"}

    def post(self, path: str, body: bytes) -> Answer:
        return 501, {"detail": "POST is not answered here"}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class DeviceStandIn(LoopbackServer):
    """The server's device routes: register (answers ``task``), GET the device, POST a
    batch (decoded and checked with serde.decode_batch, deduplicated by idempotency key).
    ``lose_ack_after``: store that many batches, then store the next one and answer 503 (the
    device never sees its ack) until ``lose_ack_after`` is None."""

    def __init__(self, device_id: str = "dev-lm", task: str = "lm") -> None:
        self.batches: list[serde.Batch] = []  # every batch stored, duplicates not repeated
        self.keys_seen: list[str] = []  # every key posted, in order
        self.registrations: list[dict] = []
        self.task, self.device_id = task, device_id
        self.lose_ack_after: int | None = None
        super().__init__()

    def get(self, path: str) -> Answer:
        if path != device_route(self.device_id):
            return NOT_FOUND
        return 200, {"device_id": self.device_id, "name": "d", "architecture": "a",
                     "bundle_sha256": "x", "batches": len(self.batches),
                     "samples": self.counts(), "acked_keys": []}  # fmt: skip

    def post(self, path: str, body: bytes) -> Answer:
        if path == ROUTE_DEVICES:
            self.registrations.append(json.loads(body))
            return 201, {"device_id": self.device_id, "token": "tok", "architecture": "a",
                         "bundle_sha256": "", "task": self.task}  # fmt: skip
        if path != ROUTE_BATCHES:
            return NOT_FOUND
        try:
            batch = serde.decode_batch(body)
        except serde.PayloadError as exc:
            return 422, {"detail": exc.message}
        return self.store(batch)

    def counts(self) -> dict[str, int]:
        out = {"train": 0, "validation": 0}
        for b in self.batches:
            out[b.split] += b.num_samples
        return out

    def store(self, batch: serde.Batch) -> Answer:
        self.keys_seen.append(batch.idempotency_key)
        duplicate = any(b.idempotency_key == batch.idempotency_key for b in self.batches)
        if not duplicate:
            self.batches.append(batch)
        if self.lose_ack_after is not None and len(self.batches) > self.lose_ack_after:
            return 503, {"detail": "stored, but the answer is lost"}
        ack = {"batch_id": f"b{len(self.batches)}", "split": batch.split,
               "samples": batch.num_samples, "duplicate": duplicate,
               "device_samples": self.counts()}  # fmt: skip
        return 200, ack


def cli_without_torch(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m fedmobillm.cli ARGS` in a process where torch cannot be imported; its
    stdout ends with ``TORCH_LOADED False`` when torch stayed out."""
    code = (
        "import sys; from fedmobillm.cli import main; rc = main(sys.argv[1:]); "
        "print('TORCH_LOADED', 'torch' in sys.modules); sys.exit(rc)"
    )
    return python_without_torch(["-c", code, *args], tmp_path, timeout=300, OMP_NUM_THREADS="1")
