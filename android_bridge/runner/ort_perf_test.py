"""Host stand-in for onnxruntime_perf_test (ONNX Runtime's benchmark tool), in Python.

Same command line subset and the same summary lines, so that the bridge parses either:

    ort_perf_test.py [-m times] [-r N] [-x intra_threads] [-y inter_threads] [-e cpu]
                     [-I] [-f dim:value]... [-s] model.onnx [result_file]

Like the real tool it runs one untimed warm-up ("First inference time cost") then N timed
runs. Inputs with -I: int64 inputs are filled with 1 (the real tool fills random values),
float inputs with random numbers; free dimensions default to 1 unless -f overrides them.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="onnxruntime_perf_test", add_help=True)
    p.add_argument("-m", dest="mode", default="times", choices=("times", "duration"))
    p.add_argument("-r", dest="repeat", type=int, default=1000)
    p.add_argument("-t", dest="seconds", type=float, default=600)
    p.add_argument("-x", dest="intra", type=int, default=0)
    p.add_argument("-y", dest="inter", type=int, default=0)
    p.add_argument("-e", dest="ep", default="cpu")
    p.add_argument("-I", dest="generate", action="store_true")
    p.add_argument("-f", dest="free_dims", action="append", default=[])
    p.add_argument("-s", dest="stats", action="store_true")
    p.add_argument("-S", dest="seed", type=int, default=-1)
    p.add_argument("model")
    p.add_argument("result_file", nargs="?")
    return p.parse_args(argv)


def _inputs(sess, free: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(None if seed < 0 else seed)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else free.get(str(d), 1) for d in i.shape]
        if "int64" in i.type:
            feed[i.name] = np.ones(shape, dtype=np.int64)
        elif "int32" in i.type:
            feed[i.name] = np.ones(shape, dtype=np.int32)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from fedmobillm.device_runtime.graph import OnnxOptions, onnx_session

    t0 = time.perf_counter()
    sess = onnx_session(args.model, OnnxOptions(args.intra or None, args.inter or None))
    created = time.perf_counter() - t0
    free = dict((kv.split(":")[0], int(kv.split(":")[1])) for kv in args.free_dims)
    feed = _inputs(sess, free, args.seed)
    t0 = time.perf_counter()
    sess.run(None, feed)
    first = time.perf_counter() - t0
    lat: list[float] = []
    start = time.perf_counter()
    while (
        len(lat) < args.repeat
        if args.mode == "times"
        else (time.perf_counter() - start < args.seconds)
    ):
        t0 = time.perf_counter()
        sess.run(None, feed)
        lat.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    _report(created, first, lat, total)
    return 0


def _report(created: float, first: float, lat: list[float], total: float) -> None:
    s = sorted(lat)
    n = len(s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def pct(q: float) -> float:
        return s[min(n - 1, int(q * n))]

    print(f"Session creation time cost: {created:.6f} s")
    print(f"First inference time cost: {first * 1000:.0f} ms")
    print(f"Total inference time cost: {sum(s):.6f} s")
    print(f"Total inference requests: {n}")
    print(f"Average inference time cost: {sum(s) / n * 1000:.6f} ms")
    print(f"Total inference run time: {total:.6f} s")
    print(f"Number of inferences per second: {n / total:.2f}")
    print(f"Peak working set size: {peak} bytes")
    print(f"Runs:{n}")
    print(f"Min Latency: {s[0]:.6f} s")
    print(f"Max Latency: {s[-1]:.6f} s")
    print(f"P50 Latency: {pct(0.5):.6f} s")
    print(f"P90 Latency: {pct(0.9):.6f} s")
    print(f"P95 Latency: {pct(0.95):.6f} s")
    print(f"P99 Latency: {pct(0.99):.6f} s")
    print(f"P999 Latency: {pct(0.999):.6f} s")


if __name__ == "__main__":
    sys.exit(main())
