"""Peak memory and run times of one backbone graph, in a process of its own:

    python -m fedmobillm.device_runtime.measure GRAPH FORMAT BATCH SEQ THREADS REPEATS

prints one JSON line, ``{"peak_rss_mib": ..., "seconds": [...]}``. The exporter's budget
choice (``fedmobillm.export.budget``) runs it in a fresh subprocess, so that the peak is
this graph's alone: the ONNX path imports onnxruntime only (as a phone-side Python process
would), the .pte path carries torch with it, as ExecuTorch's Python runtime does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from fedmobillm.device_runtime.graph import FORMATS, Graph, OnnxOptions
from fedmobillm.device_runtime.memory import peak_rss_mb

VOCAB_HI = 1000  # random token ids in [5, VOCAB_HI): valid for every bundled tokenizer


def measure(graph: str, fmt: str, batch: int, seq: int, threads: int, repeats: int) -> dict:
    """Run the graph ``repeats`` times on random ids ``(batch, seq)``, no padding."""
    ids = np.random.default_rng(0).integers(5, VOCAB_HI, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)  # (B, S)
    if fmt == "pte":
        import torch

        torch.set_num_threads(threads)
    run = Graph(graph, fmt=fmt, options=OnnxOptions(threads)).run
    feeds = {"input_ids": ids, "attention_mask": mask}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(feeds)  # (B, K, d)
        times.append(time.perf_counter() - t)
    return {"peak_rss_mib": peak_rss_mb(), "seconds": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmobillm.device_runtime.measure")
    p.add_argument("graph")
    p.add_argument("format", choices=FORMATS)
    for name in ("batch", "seq", "threads", "repeats"):
        p.add_argument(name, type=int)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.graph, a.format, a.batch, a.seq, a.threads, a.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
