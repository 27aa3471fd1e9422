"""Fallback host runner over executorch.runtime (Python, loaded through
``fedmobillm.device_runtime.graph``), used only when the C++ runner (executor_runner.cpp)
cannot be built here (no C++ compiler). Same flags and log lines as
ExecuTorch's executor_runner; it carries torch in the process, so its peak memory is much
higher than the native runner's.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

# ExecuTorch ScalarType codes (as TensorInfo.dtype() returns them) -> numpy.
DTYPES = {0: np.uint8, 1: np.int8, 3: np.int32, 4: np.int64, 6: np.float32, 11: np.bool_}
T0 = time.perf_counter()


def et_log(msg: str, level: str = "I") -> None:
    print(
        f"{level} 00:00:{time.perf_counter() - T0:09.6f} executorch:executor_runner.py] {msg}",
        file=sys.stderr,
        flush=True,
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="executor_runner", prefix_chars="-")
    p.add_argument("--model_path", default="model.pte")
    p.add_argument("--inputs", default="")
    p.add_argument("--input_shapes", default="")
    p.add_argument("--output_file", default="")
    p.add_argument("--num_executions", type=int, default=1)
    p.add_argument("--cpu_threads", type=int, default=-1)
    p.add_argument("--method_name", default="forward")
    p.add_argument("--print_output", default="summary")
    return p.parse_args(argv)


def _inputs(method, args) -> list:
    import torch

    meta = method.metadata
    files = args.inputs.split(",") if args.inputs else []
    shapes = args.input_shapes.split(",") if args.input_shapes else []
    out = []
    for i in range(meta.num_inputs()):
        info = meta.input_tensor_meta(i)
        sizes = list(info.sizes())
        if shapes and shapes[i]:
            sizes = [int(d) for d in shapes[i].split("x")]
        dtype = DTYPES.get(int(info.dtype()), np.float32)
        if files:
            n = int(np.prod(sizes))
            arr = np.fromfile(files[i], dtype=dtype, count=n).reshape(sizes)
        else:
            arr = np.ones(sizes, dtype=dtype)
        out.append(torch.from_numpy(arr))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from fedmobillm.device_runtime.graph import pte_method

    t0 = time.perf_counter()
    # quantized kernels not registered (the C++ build links them: 8da4w graphs need it)
    method = pte_method(args.model_path, args.method_name, quantized_kernels=False)
    et_log(f"Model file {args.model_path} is loaded.")
    et_log(f"Using method {args.method_name}")
    et_log(f"Model loaded in {(time.perf_counter() - t0) * 1000:f} ms.")
    inputs = _inputs(method, args)
    total = 0.0
    outputs = []
    for i in range(args.num_executions):
        t0 = time.perf_counter()
        outputs = method.execute(inputs)
        ms = (time.perf_counter() - t0) * 1000
        total += ms
        et_log(f"Iteration {i + 1} of {args.num_executions}: {ms:f} ms")
    et_log(f"Model executed successfully {args.num_executions} time(s) in {total:f} ms.")
    et_log(f"{len(outputs)} outputs: ")
    for i, t in enumerate(outputs):
        if args.output_file:
            name = f"{args.output_file}-{i}.bin"
            et_log(f"Writing output to file: {name}")
            t.detach().numpy().tofile(name)
        if args.print_output != "none":
            print(f"OutputX {i}: tensor(sizes={list(t.shape)})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    et_log(f"Peak memory: {peak} kB (VmHWM).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
