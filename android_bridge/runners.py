"""Host builds of the two runners, made on demand into the cache.

- pte: ``runner/executor_runner.cpp`` compiled with the system C++ compiler against the
  executorch wheel's ``include/`` and ``lib/`` (the flags below); if no compiler works, the
  Python fallback ``runner/executor_runner.py`` (same flags and output) is installed instead.
- onnx: ``runner/ort_perf_test.py``, a Python stand-in for onnxruntime_perf_test.

Host builds are right for the emulated device only; a phone needs NDK builds (docs/android.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
CPP_SOURCE = RUNNER_DIR / "executor_runner.cpp"
BACKEND_LIBS = (
    "executorch_backend_xnnpack",
    "executorch_kernels_optimized",
    "executorch_kernels_quantized",
    "executorch_threadpool",
)


def executorch_root() -> Path:
    try:
        import executorch
    except ImportError as exc:
        raise FedMobiLLMError(
            "building the pte runner needs the executorch wheel (its include/ and lib/)",
            hint="pip install 'fedmobillm[export]', or pass --runner PATH",
        ) from exc
    for p in executorch.__path__:
        if (Path(p) / "include").is_dir() and (Path(p) / "lib").is_dir():
            return Path(p)
    raise FedMobiLLMError(
        "the installed executorch has no include/ and lib/ folders",
        hint="install the executorch wheel from the package index",
    )


def compile_command(source: Path, out: Path, et: Path, cxx: str = "c++") -> list[str]:
    """The host build line (the NDK build for a phone uses the same flags; see docs/android.md)."""
    libs = [f"-l{lib}" for lib in BACKEND_LIBS if (et / "lib" / f"lib{lib}.so").exists()]
    return [
        cxx,
        "-std=c++17",
        "-O2",
        "-DC10_USING_CUSTOM_GENERATED_MACROS",  # else torch/headeronly/macros/cmake_macros.h
        "-DET_EVENT_TRACER_ENABLED",  # what the wheel's libraries were built with
        f"-I{et / 'include'}",
        f"-I{et / 'include' / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}",
        str(source),
        "-o",
        str(out),
        f"-L{et / 'lib'}",
        "-lexecutorch",
        # backends register themselves in static initialisers: keep them linked
        "-Wl,--push-state,--no-as-needed",
        *libs,
        "-Wl,--pop-state",
        f"-Wl,-rpath,{et / 'lib'}",
    ]


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _install_script(src: Path, dest: Path) -> Path:
    """Copy a Python runner with a shebang naming this interpreter."""
    body = src.read_text()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.write_text(f"#!{sys.executable}\n{body}")
    tmp.chmod(0o755)
    tmp.replace(dest)
    return dest


def host_pte_runner(rebuild: bool = False) -> Path:
    """The host executor_runner, built once per source/executorch version into the cache."""
    et = executorch_root()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    out_dir = cache_dir() / "runners"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _key(
        CPP_SOURCE.read_text(),
        str(et),
        (et / "version.py").read_text() if (et / "version.py").exists() else "",
        str(cxx),
    )
    out = out_dir / f"executor_runner-{key}"
    if out.is_file() and not rebuild:
        return out
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel tests: build once
        if out.is_file() and not rebuild:
            return out
        if cxx:
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            cmd = compile_command(CPP_SOURCE, tmp, et, cxx)
            log.info("building the host executor_runner: %s", shlex.join(cmd[:3]) + " ...")
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                res = subprocess.CompletedProcess(cmd, 1, "", str(exc))
            if res.returncode == 0:
                tmp.replace(out)
                return out
            log.warning(
                "C++ build of executor_runner failed; using the Python fallback:\n%s",
                res.stderr[-2000:],
            )
        else:
            log.warning("no C++ compiler found; using the Python fallback executor_runner")
        return _install_script(RUNNER_DIR / "executor_runner.py", out_dir / "executor_runner.py")


def host_onnx_runner() -> Path:
    """The Python stand-in for onnxruntime_perf_test."""
    src = RUNNER_DIR / "ort_perf_test.py"
    dest = (
        cache_dir() / "runners" / f"onnxruntime_perf_test-{_key(src.read_text(), sys.executable)}"
    )
    return dest if dest.is_file() else _install_script(src, dest)


def host_runner(backend: str) -> Path:
    return host_pte_runner() if backend == "pte" else host_onnx_runner()


def main() -> None:
    """`python -m fedmobillm.android_bridge.runners [--rebuild]`: build and print the paths."""
    import argparse

    p = argparse.ArgumentParser(description="build the host runners into the cache")
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(f"pte:  {host_pte_runner(rebuild=args.rebuild)}")
    print(f"onnx: {host_onnx_runner()}")


if __name__ == "__main__":
    main()
