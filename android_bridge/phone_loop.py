"""`android run-device`: phone-in-the-loop.

The host tokenizes the device's records with the bundle's tokenizer; the phone runs the
backbone (.pte) with executor_runner, which writes the graph's output ("taps", float32
[B, K, d]) to a file; the host pulls it and hands it to the device runtime's client, which
quantizes, journals and uploads exactly as `fedmobillm device run` does. The server sees an
ordinary device.

The forward pass is plugged into the device runtime as a ``Backbone`` whose graph runs on
the phone (``PhoneBackbone``): batching, padding and chunking are the device runtime's own,
so the uploads are those of `device run --backend pte` on the same data.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.android_bridge.adb import Adb, Device
from fedmobillm.android_bridge.bench import write_input_files
from fedmobillm.android_bridge.session import (
    WorkDir,
    check_free_space,
    check_runner_abi,
    device_abis,
)
from fedmobillm.device_runtime.backbone import (
    GRAPH_FILES,
    Backbone,
    _static_dims,
    _Tokenizer,
    choose_backend,
)
from fedmobillm.device_runtime.protocol import load_verified_bundle
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

RUNNER = "executor_runner"


@dataclass
class PhoneRunConfig:
    data: str
    server: str
    state: Path | None = None
    name: str | None = None
    admin_token: str | None = None
    runner: Path | None = None
    split: str = "train"
    batch_size: int = 32
    encoding: str = "int8"
    threads: int | None = None
    limit: int | None = None
    timeout_s: float = 600


@dataclass
class PhoneStats:
    batches: int = 0
    phone_forward_ms: float = 0.0  # the runner's own execution time
    round_trip_s: float = 0.0  # push inputs + run (incl. model load) + pull outputs


class PhoneBackbone(Backbone):
    """A bundle's backbone whose forward pass runs on a phone over adb."""

    def __init__(
        self, bundle_dir: Path, work: WorkDir, threads: int | None, timeout_s: float
    ) -> None:
        # Backbone.__init__ would load the graph on the host: set up everything else.
        self.bundle_dir = Path(bundle_dir)
        self.manifest = load_verified_bundle(self.bundle_dir)
        self.backend = choose_backend(self.manifest, self.bundle_dir, "pte")
        self.static_batch, self.static_seq = _static_dims(self.manifest)
        max_batch = self.manifest.extra.get("max_batch")
        self.max_batch = max_batch if isinstance(max_batch, int) else None
        self._tokenize = _Tokenizer(self.bundle_dir, self.manifest, self.static_seq)
        self.work = work
        self.threads = threads
        self.timeout_s = timeout_s
        self.stats = PhoneStats()
        self._graph = Path(GRAPH_FILES["pte"]).name
        self._run = self._forward_on_phone

    def _forward_on_phone(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, S) int64 ids and mask -> (B, K, d) float32, computed on the phone."""
        start = time.perf_counter()
        b, s = ids.shape
        device, work = self.work.device, self.work
        with tempfile.TemporaryDirectory(prefix="fedmobillm-phone-") as tmp:
            inputs = write_input_files(np.stack([ids, mask]), Path(tmp))  # (2, B, S)
            names = [Path(work.push(p)).name for p in inputs]
            argv = [
                f"./{RUNNER}",
                f"--model_path={self._graph}",
                f"--inputs={','.join(names)}",
                f"--input_shapes={b}x{s},{b}x{s}",
                "--output_file=taps",
                "--num_executions=1",
                "--print_output=none",
            ]
            if self.threads:
                argv.append(f"--cpu_threads={self.threads}")
            output = work.run(argv, timeout=self.timeout_s)
            local = Path(tmp) / "taps-0.bin"
            device.pull(f"{work.path}/taps-0.bin", local)
            taps = np.fromfile(local, dtype="<f4")
        want = (b, self.manifest.num_taps, self.manifest.hidden_size)
        if taps.size != int(np.prod(want)):
            raise FedMobiLLMError(
                f"the runner wrote {taps.size} floats, expected {want} = {int(np.prod(want))}",
                hint="the runner and the bundle do not match; re-export or rebuild the runner",
            )
        self.stats.batches += 1
        self.stats.phone_forward_ms += sum(
            float(x) for x in re.findall(r"Iteration \d+ of \d+: ([\d.]+) ms", output)
        )
        self.stats.round_trip_s += time.perf_counter() - start
        return taps.reshape(want)  # (B, K, d)


@dataclass
class PhoneRunSummary:
    run: Any  # device_runtime.client.RunSummary
    stats: PhoneStats
    serial: str
    extra: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        n = max(1, self.run.samples)
        return [
            f"phone:              {self.serial}, {self.stats.batches} batches run there",
            f"on-phone forward:   {self.stats.phone_forward_ms / n:.2f} ms/sample (runner); "
            f"{1000 * self.stats.round_trip_s / n:.2f} ms/sample with adb round trips",
            *self.run.lines(),
        ]


def _state_dir(cfg: PhoneRunConfig, serial: str, bundle: Path) -> Path:
    from fedmobillm.device_runtime.client import STATE_NAME, register, registration_labels
    from fedmobillm.device_runtime.records import resolve_state_dir

    name = cfg.name or "android-" + re.sub(r"[^A-Za-z0-9_.-]", "-", serial)
    state_dir = resolve_state_dir(cfg.state, name)
    if (state_dir / STATE_NAME).is_file():
        return state_dir
    if not cfg.admin_token:
        raise FedMobiLLMError(
            f"the phone is not registered yet (no {STATE_NAME} in {state_dir})",
            hint="pass --admin-token to register it now, or run `fedmobillm device register "
            f"--state {state_dir} ...` first",
        )
    # the labels `device register --data` would take: a 0/1 file indexes the server's task
    labels = registration_labels(cfg.server, cfg.admin_token, None, cfg.data)
    state, _ = register(cfg.server, cfg.admin_token, name, bundle, labels, state_dir)
    log.info("registered the phone as device %s (%s)", state.name, state.device_id)
    return state_dir


def run_on_phone(
    serial: str, bundle: Path, cfg: PhoneRunConfig, adb_port: int | None = None
) -> PhoneRunSummary:
    from fedmobillm.android_bridge.runners import host_pte_runner
    from fedmobillm.device_runtime.client import DeviceClient, RunConfig
    from fedmobillm.device_runtime.records import device_records

    bundle = Path(bundle)
    manifest = load_verified_bundle(bundle)
    if GRAPH_FILES["pte"] not in manifest.files:
        raise FedMobiLLMError(
            f"bundle {bundle} has no backbone.pte: the phone runs .pte",
            hint="re-export with --format pte (or onnx,pte)",
        )
    device: Device = Adb(server_port=adb_port).device(serial)
    runner = Path(cfg.runner) if cfg.runner else host_pte_runner()
    check_runner_abi(runner, device_abis(device))
    state_dir = _state_dir(cfg, serial, bundle)
    config = RunConfig(
        backend="pte",
        threads=cfg.threads,
        batch_size=cfg.batch_size,
        encoding=cfg.encoding,
        split=cfg.split,
        server=cfg.server,
    )
    graph = bundle / GRAPH_FILES["pte"]
    check_free_space(device, graph.stat().st_size + Path(runner).stat().st_size)
    with WorkDir(device) as work:
        work.push(Path(runner), RUNNER)
        device.shell(f"chmod 755 {work.path}/{RUNNER}")
        work.push(graph)
        phone = PhoneBackbone(bundle, work, cfg.threads, cfg.timeout_s)
        client = DeviceClient(state_dir, bundle, config, backbone=phone)
        records = device_records(cfg.data, cfg.split, client.state.label_names, limit=cfg.limit)
        summary = client.run(records)
    return PhoneRunSummary(summary, phone.stats, serial)
