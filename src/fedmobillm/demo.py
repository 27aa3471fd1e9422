"""`fedmobillm demo`: a heterogeneous federation end to end on one machine.

Stages, each logged with its time:
  data       load and split the data, partition the train split over the devices
  export     one bundle per backbone, pre-scaled (int8, K taps) and cached
  server     `fedmobillm serve` on a free loopback port, SQLite under RUN_DIR/server
  register   every device registers its bundle and gets a token
  devices    one process per device (`fedmobillm device run`), each with its own compute
             slowdown and uplink bandwidth; validators upload the validation split
  train      the server trains asynchronously; live progress until the target accuracy,
             the time limit, or the trainer settles after the last upload
  evaluate   each architecture's personal model is downloaded and run on the test split
             through the device runtime (bundle + personal model)
  report     a table, RUN_DIR/summary.json and RUN_DIR/validation.png
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedmobillm.demo_report import model_name, plot_validation, quant_change, table_lines
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.local import LocalServer, free_port, stop_process_group

log = logging.getLogger("fedmobillm.demo")

# Device classes of the simulated fleet: compute slowdown x, uplink Mbit/s.
DEVICE_CLASSES = (
    ("fast", 1.0, 50.0),
    ("mid", 3.0, 10.0),
    ("slow", 10.0, 2.0),
)

# What a run writes in its folder; a new run in the same folder removes them first
RUN_STATE = (
    "server", "devices", "personal", "logs", "data", "server.log", "summary.json",
    "validation.png",
)  # fmt: skip
RUN_MARKER = "demo-run.json"  # {"pid": the demo running there, or null once it ended}

# Unless --debug: libraries log below ERROR, warn (deprecations, user warnings) and draw
# progress bars into the demo's output; records of these loggers (and their children) below
# ERROR are dropped, and the children's environment quiets them
THIRD_PARTY_LOGGERS = (
    "transformers", "torch", "torchao", "onnx", "onnxruntime", "onnxscript", "executorch",
    "huggingface_hub", "urllib3", "filelock", "httpx", "matplotlib", "PIL",
)  # fmt: skip
QUIET_CHILD_ENV = {
    "PYTHONWARNINGS": "ignore",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
EVAL_HEARTBEAT_S = 15.0  # a progress line while one evaluation step runs


@dataclass
class DemoConfig:
    backbones: list[str] = field(default_factory=lambda: ["minilm-l3", "minilm-l6", "smollm2-135m"])
    devices: int = 6
    data: str = "movie-snippets"
    alpha: float | None = None  # None = IID; else Dirichlet(alpha) over labels
    quick: bool = True
    out: Path = Path("runs/demo")
    seed: int = 0
    train_limit: int | None = None  # train records used in all (quick: 1,200)
    eval_limit: int | None = None  # test records evaluated (quick: 400)
    val_limit: int | None = None  # validation records uploaded per backbone (quick: 200)
    time_limit_s: float = 300.0  # training (devices + trainer), after export
    target_accuracy: float | None = None
    max_seq_len: int = 64
    quant: str = "int8"
    taps: int | None = None  # default: depth of the shallowest backbone
    port: int | None = None
    settle_steps: int = 400  # trainer steps after the last upload before stopping
    # public anchor texts (server --anchors): train records left out of the devices' data,
    # unlabelled; the first device of each backbone forwards them all. None: 400 quick,
    # 1,000 full; 0: no anchors
    anchors: int | None = None
    debug: bool = False  # keep third-party warnings and log lines (quiet otherwise)

    def __post_init__(self) -> None:
        if not self.backbones:
            raise FedMobiLLMError(
                "no backbones given", hint="e.g. --backbones minilm-l3,minilm-l6,smollm2-135m"
            )
        if self.devices < len(self.backbones):
            raise FedMobiLLMError(
                f"--devices {self.devices} is fewer than the {len(self.backbones)} backbones",
                hint="give at least one device per backbone",
            )
        if self.alpha is not None and self.alpha <= 0:
            raise FedMobiLLMError("--alpha must be positive", hint="e.g. --alpha 0.5, or --iid")
        if self.quick:
            self.train_limit = self.train_limit or 1200
            self.eval_limit = self.eval_limit or 400
            self.val_limit = self.val_limit or 200
        if self.anchors is None:
            self.anchors = 400 if self.quick else 1000
        if self.anchors < 0:
            raise FedMobiLLMError("--anchors must be 0 (none) or more")


@dataclass
class DeviceSpec:
    name: str
    backbone: str
    klass: str
    slowdown: float
    bandwidth_mbps: float
    data_file: Path
    state_dir: Path
    records: int
    split: str = "train"


class Stage:
    """Logs a stage's start and its duration."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Stage:
        self.t0 = time.monotonic()
        log.info("[%s] ...", self.name)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            log.info("[%s] done in %.1f s", self.name, time.monotonic() - self.t0)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmobillm.cli", *args]


def _write_jsonl(path: Path, records: list[Any]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"text": r.text, "label": int(r.label)}) + "\n")


def fresh_run_dir(out: Path) -> list[str]:
    """Make ``out`` ready for a new run; returns what of an earlier run it removed.

    An earlier run leaves its server data, device states and tokens there: a run on top of
    them would find its devices registered already. So every run starts afresh: what
    RUN_STATE names is removed when a demo wrote it (RUN_MARKER, or, from before the marker,
    the server log or the test split). Refused while another demo runs there, and when the
    folder holds those names but no demo wrote them."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / RUN_MARKER
    present = [n for n in RUN_STATE if (out / n).exists() or (out / n).is_symlink()]
    earlier = _read_json(marker) or {}
    if _demo_alive(earlier.get("pid")):
        raise FedMobiLLMError(
            f"another fedmobillm demo (pid {earlier['pid']}) is running in {out}",
            hint="wait for it, stop it (Ctrl-C), or pass another --out",
        )
    ours = marker.exists() or (out / "server.log").is_file() or (out / "data/test.jsonl").is_file()
    if present and not ours:
        raise FedMobiLLMError(
            f"{out} holds {', '.join(present)}, which no demo run wrote",
            hint="pass a new or empty folder as --out",
        )
    for name in present:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    _mark_run(out, running=True)
    return present


def _mark_run(out: Path, running: bool) -> None:
    info = {"pid": os.getpid() if running else None, "time": time.time()}
    (out / RUN_MARKER).write_text(json.dumps(info) + "\n")


def _demo_alive(pid: Any) -> bool:
    """Whether ``pid`` is another process running a fedmobillm demo (where /proc tells)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        return b"demo" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if Path("/proc/self").exists():
            return False  # no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def quiet_third_party(debug: bool) -> Iterator[None]:
    """Unless ``debug``: while the demo runs, warnings are ignored, other libraries' log
    records below ERROR are dropped (``quiet_loggers``) and transformers draws no progress
    bars; all as it was afterwards. Libraries that add their own handlers on import are
    quieted by calling ``quiet_loggers`` again once they are imported."""
    if debug:
        yield
        return
    bars_on = "transformers" not in sys.modules or _hf_logging().is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quiet_loggers()
            yield
        finally:
            for h in _log_handlers():
                h.removeFilter(_OURS_OR_ERRORS)
            if bars_on and "transformers" in sys.modules:
                _hf_logging().enable_progress_bar()


def quiet_loggers() -> None:
    """Drop third-party records below ERROR at every handler they reach: the root's and the
    libraries' own (torch and transformers log through their own handlers and set their
    loggers' levels themselves, so levels would not hold); transformers' progress bars off."""
    for h in _log_handlers():
        if _OURS_OR_ERRORS not in h.filters:
            h.addFilter(_OURS_OR_ERRORS)
    if "transformers" in sys.modules:
        _hf_logging().disable_progress_bar()


def _log_handlers() -> set[logging.Handler]:
    """The root's handlers and those of the THIRD_PARTY_LOGGERS and their children."""
    loggers = [logging.getLogger()] + [
        lg
        for name, lg in list(logging.root.manager.loggerDict.items())
        if isinstance(lg, logging.Logger) and name.split(".")[0] in THIRD_PARTY_LOGGERS
    ]
    return {h for lg in loggers for h in lg.handlers}


def _hf_logging() -> Any:
    from transformers.utils import logging as hf_logging

    return hf_logging


class _OursOrErrors(logging.Filter):
    """fedmobillm's own records, and errors from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("fedmobillm") or record.levelno >= logging.ERROR


_OURS_OR_ERRORS = _OursOrErrors()


class DemoRun:
    """What both demos (classify: ``Demo``, lm: ``demo_lm.LmDemo``) keep of a run: the
    processes they started, the progress history, the device processes that failed."""

    def __init__(self, out: Path, debug: bool) -> None:
        self.out = out
        self.procs: list[subprocess.Popen] = []  # server and device shells: stopped at the end
        self.t_start = time.monotonic()
        self.history: list[dict[str, Any]] = []
        self.architectures: dict[str, str] = {}  # backbone -> its bundle's architecture
        self.kept: dict[str, dict[str, Any]] = {}  # server's best_validation, last seen
        self.dead: dict[str, int] = {}  # device name -> exit code of a failed device process
        # the environment of every process the demo starts
        self.child_env = {**os.environ, **({} if debug else QUIET_CHILD_ENV)}

    def _reap(self, running: dict[str, subprocess.Popen]) -> set[str]:
        """The device processes that ended; a failed one is logged once and kept in dead."""
        done = {n for n, p in running.items() if p.poll() is not None}
        for n in sorted(done - set(self.dead)):
            if running[n].returncode != 0:
                self.dead[n] = running[n].returncode
                log.error("device %s exited with %d; carrying on with the rest (log: %s)",
                          n, running[n].returncode, self.out / "logs" / f"{n}.log")  # fmt: skip
        return done

    def _end_devices(self, running: dict[str, subprocess.Popen]) -> None:
        """After training: an error when every device process died, else the ones still
        running stopped."""
        if len(self.dead) == len(running):
            raise FedMobiLLMError(
                "every device process died; see the logs in " + str(self.out / "logs")
            )
        for p in running.values():
            if p.poll() is None:
                stop_process_group(p, grace=15.0)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                stop_process_group(p, grace=15.0)


class Demo(DemoRun):
    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__(cfg.out, cfg.debug)
        self.cfg = cfg
        self.failed_backbones: dict[str, str] = {}
        self.quants: dict[str, dict[str, Any]] = {}  # backbone -> quant_change(...)

    # ---- stages -------------------------------------------------------------------
    def prepare_data(self) -> list[DeviceSpec]:
        from fedmobillm.data import load_dataset, partition

        cfg = self.cfg
        ds = load_dataset(cfg.data, seed=cfg.seed)
        self.dataset = ds
        anchors = cfg.anchors or 0
        train = self._train_records(list(ds.splits["train"]), anchors)
        parts = partition(train, cfg.devices, alpha=cfg.alpha, seed=cfg.seed)
        data_dir = self.out / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.anchor_file = None
        if anchors:
            self.anchor_file = data_dir / "anchors.jsonl"
            self.anchor_file.write_text(
                "".join(
                    json.dumps({"text": t}) + "\n"
                    for t in dict.fromkeys(t.strip() for t in self.anchor_texts)
                    if t
                )
            )
        specs = self._training_specs(parts, data_dir)
        val, validators = self._validator_specs(list(ds.splits["validation"]), data_dir)
        specs += validators
        test = list(ds.splits["test"])
        if cfg.eval_limit:
            test = _subsample(test, cfg.eval_limit, cfg.seed)
        self.test_file = data_dir / "test.jsonl"
        _write_jsonl(self.test_file, test)
        counts = [0] * len(ds.label_names)
        for r in test:
            counts[r.label] += 1
        self.majority_rate = max(counts) / len(test)
        log.info(
            "data %s: %d train records over %d devices (%s), %d validation, %d test "
            "(majority class %.1f%%), %d unlabelled anchor texts",
            cfg.data,
            len(train),
            cfg.devices,
            "IID" if cfg.alpha is None else f"Dirichlet alpha={cfg.alpha}",
            len(val),
            len(test),
            100 * self.majority_rate,
            anchors,
        )
        return specs

    def _validator_specs(
        self, val: list[Any], data_dir: Path
    ) -> tuple[list[Any], list[DeviceSpec]]:
        """The validation records (--val-limit) and one validator device per backbone."""
        cfg = self.cfg
        specs = []
        if cfg.val_limit:
            val = _subsample(val, cfg.val_limit, cfg.seed)
        for backbone in cfg.backbones:
            name = f"val-{backbone}"
            f = data_dir / f"{name}.jsonl"
            _write_jsonl(f, val)
            specs.append(
                DeviceSpec(
                    name,
                    backbone,
                    "validator",
                    1.0,
                    50.0,
                    f,
                    self.out / "devices" / name,
                    len(val),
                    split="validation",
                )
            )
        return val, specs

    def _train_records(self, train: list[Any], anchors: int) -> list[Any]:
        """The devices' labelled records: ``anchors`` records held out as unlabelled anchor
        texts (``self.anchor_texts``), else --train-limit of them."""
        import numpy as np

        cfg = self.cfg
        if anchors:  # held out of the devices' records, labels dropped
            n_lab = min(cfg.train_limit or len(train), len(train) - anchors)
            if n_lab < cfg.devices:
                raise FedMobiLLMError(
                    f"{len(train)} train records leave too few for the devices after "
                    f"{anchors} anchors",
                    hint="pass a smaller --anchors (or 0)",
                )
            order = np.random.default_rng(cfg.seed).permutation(len(train))
            self.anchor_texts = [train[i].text for i in order[n_lab : n_lab + anchors]]
            train = [train[i] for i in sorted(order[:n_lab])]
        elif cfg.train_limit:
            train = _subsample(train, cfg.train_limit, cfg.seed)
        return train

    def _training_specs(self, parts: list[list[Any]], data_dir: Path) -> list[DeviceSpec]:
        """One training device per partition, backbones and device classes in turn; each
        device's records in ``data_dir``."""
        cfg = self.cfg
        specs = []
        for i, part in enumerate(parts):
            backbone = cfg.backbones[i % len(cfg.backbones)]
            klass, slowdown, mbps = DEVICE_CLASSES[(i // len(cfg.backbones)) % 3]
            name = f"dev{i:02d}-{backbone}-{klass}"
            f = data_dir / f"{name}.jsonl"
            _write_jsonl(f, part)
            specs.append(
                DeviceSpec(
                    name, backbone, klass, slowdown, mbps, f, self.out / "devices" / name, len(part)
                )
            )
        return specs

    def export_bundles(self) -> dict[str, Path]:
        cfg = self.cfg
        if not cfg.debug:  # torch adds its own log handlers on import (before the models are
            import torch  # noqa: F401  # resolved, which imports torchao): quiet them too

            quiet_loggers()
        num_taps = cfg.taps or self._shallowest_depth()
        bundles: dict[str, Path] = {}
        for backbone in cfg.backbones:
            bundle = self._export_one(backbone, num_taps)
            if bundle is not None:
                bundles[backbone] = bundle
        if not bundles:
            raise FedMobiLLMError("no backbone could be exported; see the errors above")
        return bundles

    def _export_one(self, backbone: str, num_taps: int) -> Path | None:
        """Pre-scale one backbone: the configured quant, else fp32 when the quantized graph
        fails verification (SmolLM2's outlier activations defeat int8 dynamic ONNX)."""
        from fedmobillm.export.pipeline import export_bundle, failed_before, remember_failure
        from fedmobillm.paths import cache_dir

        cfg = self.cfg
        quants = [cfg.quant] + (["fp32"] if cfg.quant != "fp32" else [])
        errors: list[str] = []
        for quant in quants:
            key = f"{backbone}-{quant}-k{num_taps}-s{cfg.max_seq_len}".replace("/", "_")
            out = cache_dir() / "bundles" / key
            if _bundle_ok(out, backbone):
                log.info("bundle for %s (%s) is cached at %s", backbone, quant, out)
                return self._exported(backbone, out, errors)
            failed = out.with_name(out.name + ".failed")
            before = failed_before(failed)
            if before:  # an earlier demo found this variant unusable with this exporter
                errors.append(f"{quant}: {before}")
                log.info("skipping %s at %s: failed before (%s)", backbone, quant, failed)
                continue
            log.info("exporting %s (%s, %d taps, onnx) -> %s", backbone, quant, num_taps, out)
            try:
                export_bundle(
                    backbone,
                    out,
                    num_taps=num_taps,
                    quant=quant,
                    formats=("onnx",),
                    max_seq_len=cfg.max_seq_len,
                )
                return self._exported(backbone, out, errors)
            except FedMobiLLMError as exc:
                errors.append(f"{quant}: {exc}")
                log.warning("export of %s at %s failed: %s", backbone, quant, exc)
                if "stage verify" in str(exc):  # deterministic: remember, do not retry
                    remember_failure(failed, str(exc))
        self.failed_backbones[backbone] = "; ".join(errors)
        log.error("backbone %s could not be exported; carrying on without it", backbone)
        return None

    def _exported(self, backbone: str, bundle: Path, errors: list[str]) -> Path:
        """Note the bundle's architecture and quantization (from its manifest), and why the
        quantization is not the one asked for, if it is not: never a silent fallback. The
        reason: the variants this demo tried first, and the manifest's ``quant_fallback``
        (when the exporter fell back by itself)."""
        from fedmobillm.device_runtime.protocol import MANIFEST_NAME, Manifest

        manifest = Manifest.from_dict(json.loads((bundle / MANIFEST_NAME).read_text()))
        if manifest.extra.get("quant_fallback"):
            errors = [*errors, str(manifest.extra["quant_fallback"])]
        self.architectures[backbone] = manifest.architecture
        self.quants[backbone] = change = quant_change(self.cfg.quant, manifest.quant, errors)
        if change["quant_fallback"]:
            log.warning(
                "%s runs at %s, not %s: %s",
                backbone,
                manifest.quant,
                self.cfg.quant,
                change["quant_fallback"],
            )
        return bundle

    def _shallowest_depth(self) -> int:
        from transformers import AutoConfig

        from fedmobillm.export.models import resolve_model

        depths = []
        for b in self.cfg.backbones:
            with contextlib.suppress(Exception):
                c = AutoConfig.from_pretrained(str(resolve_model(b)))
                depths.append(int(getattr(c, "num_hidden_layers", 0) or c.n_layer))
        return min(depths) if depths else 3

    @contextlib.contextmanager
    def server(self) -> Iterator[str]:
        self.admin_token = secrets.token_urlsafe(24)
        self.server_log = self.out / "server.log"
        anchor_args: list[str] = []
        anchor_env = {} if self.cfg.debug else dict(QUIET_CHILD_ENV)
        if self.anchor_file is not None:  # one device per backbone forwards every anchor
            anchor_args = ["--anchors", str(self.anchor_file)]
            anchor_env["FEDMOBILLM_ANCHORS_PER_DEVICE"] = str(self.cfg.anchors)
        srv = LocalServer(
            self.out / "server",
            admin_token=self.admin_token,
            args=anchor_args,
            env=anchor_env,
            port=free_port(self.cfg.port),
            log_path=self.server_log,
            startup_timeout=90.0,
            grace=15.0,
        )
        with srv:
            assert srv.proc is not None
            self.procs.append(srv.proc)
            log.info("server up at %s (log: %s)", srv.url, self.server_log)
            yield srv.url

    def register(
        self, url: str, specs: list[DeviceSpec], bundles: dict[str, Path]
    ) -> list[DeviceSpec]:
        from fedmobillm.device_runtime.client import register

        labels = list(self.dataset.label_names)
        live = []
        for s in specs:
            if s.backbone not in bundles:
                continue
            register(
                server=url,
                admin_token=self.admin_token,
                name=s.name,
                bundle_dir=bundles[s.backbone],
                label_names=labels,
                state_dir=s.state_dir,
            )
            live.append(s)
        log.info("registered %d devices", len(live))
        return live

    def launch(
        self, url: str, specs: list[DeviceSpec], bundles: dict[str, Path]
    ) -> dict[str, subprocess.Popen]:
        running = {}
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for s in specs:
            device = [
                "--bundle",
                str(bundles[s.backbone]),
                "--state",
                str(s.state_dir),
                "--server",
                url,
                "--bandwidth-mbps",
                str(s.bandwidth_mbps),
                "--slowdown",
                str(s.slowdown),
                "--threads",
                "1",
            ]
            cmd = _cli(
                "device",
                "run",
                *device,
                "--data",
                str(s.data_file),
                "--split",
                s.split,
                "--batch-size",
                "16",
                "--summary-json",
                str(s.state_dir / "summary.json"),
            )
            if self.anchor_file is not None and s.split == "train":
                # its share of the anchor texts first (empty but for a backbone's first device)
                anchor = _cli("device", "run", *device, "--split", "anchor", "--batch-size", "16",
                              "--summary-json", str(s.state_dir / "anchor-summary.json"))  # fmt: skip
                cmd = ["/bin/sh", "-c", f"{shlex.join(anchor)} && exec {shlex.join(cmd)}"]
            with open(logs / f"{s.name}.log", "wb") as f:
                p = subprocess.Popen(
                    cmd,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=self.child_env,
                    start_new_session=True,
                )
            self.procs.append(p)
            running[s.name] = p
        log.info("launched %d device processes", len(running))
        return running

    def train(
        self, url: str, specs: list[DeviceSpec], running: dict[str, subprocess.Popen]
    ) -> None:
        import httpx

        from fedmobillm.device_runtime.messages import ROUTE_STATUS

        cfg = self.cfg
        deadline = time.monotonic() + cfg.time_limit_s
        last_upload_step: int | None = None
        idle_polls = 0
        with httpx.Client(
            base_url=url, timeout=10.0, headers={"Authorization": f"Bearer {self.admin_token}"}
        ) as http:
            while True:
                time.sleep(2.0)
                done = self._reap(running)
                st = http.get(ROUTE_STATUS).json()
                self.kept = (st.get("trainer") or {}).get("best_validation") or self.kept
                row = _progress_row(st, len(running), len(done), time.monotonic() - self.t_start)
                self.history.append(row)
                log.info(
                    "devices %d running / %d done | samples %d | step %d | loss %s | val acc %s",
                    len(running) - len(done),
                    len(done),
                    row["samples"],
                    row["step"],
                    _fmt(row["loss"]),
                    _fmt(row["val_accuracy"]),
                )
                if len(done) == len(running):
                    if last_upload_step is None:
                        last_upload_step = row["step"]
                    idle_polls = idle_polls + 1 if row["trainer_idle"] else 0
                    if idle_polls >= 2:  # idle twice in a row after the last device finished
                        log.info("trainer idle at step %d: no new uploads to learn", row["step"])
                        break
                    if row["step"] - last_upload_step >= cfg.settle_steps:
                        log.info(
                            "trainer settled: %d steps after the last upload", cfg.settle_steps
                        )
                        break
                if cfg.target_accuracy and (row["val_accuracy"] or 0) >= cfg.target_accuracy:
                    log.info("target validation accuracy %.3f reached", cfg.target_accuracy)
                    break
                if time.monotonic() > deadline:
                    log.warning("time limit of %.0f s reached; stopping", cfg.time_limit_s)
                    break
        self._end_devices(running)

    def evaluate(
        self, url: str, specs: list[DeviceSpec], bundles: dict[str, Path]
    ) -> list[dict[str, Any]]:
        """Each backbone's personal model on the test split, one progress line per backbone."""
        rows = []
        t0 = time.monotonic()
        todo = [b for b in bundles if any(s.backbone == b and s.split == "train" for s in specs)]
        for i, backbone in enumerate(todo, 1):
            devs = [s for s in specs if s.backbone == backbone and s.split == "train"]
            t1 = time.monotonic()
            row = {"name": backbone, **self.quants.get(backbone, {})}
            row.update(self._evaluate_one(url, backbone, bundles[backbone], devs))
            rows.append(row)
            took, since = time.monotonic() - t1, time.monotonic() - t0
            if "error" in row:
                log.error("[evaluate] %s (%d/%d): %s", backbone, i, len(todo), row["error"])
            else:
                log.info(
                    "[evaluate] %s (%d/%d): test accuracy %.1f%% over %d records on device "
                    "in %.1f s (%.0f s since evaluation began)",
                    backbone, i, len(todo), 100 * row["accuracy"], row["test_samples"] or 0,
                    took, since,
                )  # fmt: skip
        return rows

    def _evaluate_one(
        self, url: str, backbone: str, bundle: Path, devs: list[DeviceSpec]
    ) -> dict[str, Any]:
        """Download ``backbone``'s personal model with a device token, run `device predict`
        over the test split; its test accuracy and its devices' upload statistics."""
        side = self.out / "personal" / backbone
        pred_json = self.out / "personal" / f"{backbone}-predict.json"
        steps = [
            ("downloading the personal model",
             ["fetch-model", "--state", str(devs[0].state_dir), "--server", url,
              "--out", str(side)]),
            (f"on-device inference over {self.test_file.name}",
             ["predict", "--bundle", str(bundle), "--side", str(side),
              "--data", str(self.test_file), "--json", str(pred_json)]),
        ]  # fmt: skip
        for what, args in steps:
            error = self._run_step(backbone, what, _cli("device", *args))
            if error:
                return {"error": error}
        pred = json.loads(pred_json.read_text())
        return {
            "accuracy": pred["accuracy"],
            "test_samples": pred.get("samples"),
            "devices": len(devs),
            **_upload_stats(devs),
            "device_failures": [n for n in self.dead if n in {d.name for d in devs}],
        }

    def _run_step(self, backbone: str, what: str, cmd: list[str]) -> str | None:
        """Run one evaluation step as a child process, a line every EVAL_HEARTBEAT_S while it
        runs; None, or what failed with the child's stderr."""
        t0 = time.monotonic()
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.child_env,
            start_new_session=True,
        )
        self.procs.append(p)
        while True:
            try:
                _, err = p.communicate(timeout=EVAL_HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                log.info("[evaluate] %s: %s, %.0f s so far", backbone, what, time.monotonic() - t0)
        return None if p.returncode == 0 else f"{what} failed: {err.strip()}"

    def report(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json, validation.png and the final table; each backbone's quantization,
        and why it is not the one asked for, in all three."""
        arch = self.architectures
        for r in rows:
            r.update(model=model_name(r["name"]), architecture=arch.get(r["name"]))
            r["kept_snapshot"] = self.kept.get(arch.get(r["name"], ""))
        summary = {
            "config": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()
            },
            "majority_rate": self.majority_rate,
            "label_names": list(self.dataset.label_names),
            "backbones": rows,
            "failed_backbones": self.failed_backbones,
            "history": self.history,
            "wall_s": time.monotonic() - self.t_start,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_validation(
            self.history,
            self.out / "validation.png",
            names={a: _legend_name(b, self.quants.get(b, {})) for b, a in arch.items()},
            kept=self.kept,
            test_accuracy={arch[r["name"]]: r["accuracy"] for r in rows if "accuracy" in r},
            majority_rate=self.majority_rate,
        )
        print()
        print("\n".join(table_lines(rows, self.majority_rate, self.failed_backbones)))
        print(f"summary: {self.out / 'summary.json'}  |  plot: {self.out / 'validation.png'}")
        return summary


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """One run in ``cfg.out``: a new run each time, what an earlier one left there removed."""
    return run_fresh(cfg.out, cfg.debug, lambda: Demo(cfg), _stages)


D = TypeVar("D", bound=DemoRun)


def run_fresh(
    out: Path, debug: bool, make: Callable[[], D], stages: Callable[[D], dict[str, Any]]
) -> dict[str, Any]:
    """A demo's run in ``out`` (``fresh_run_dir``: what an earlier run left there removed):
    ``stages(make())`` with SIGTERM as Ctrl-C and third-party output quiet (unless
    ``debug``); every process it started is stopped at the end, whatever happens."""
    removed = fresh_run_dir(out)
    if removed:
        log.info("new run in %s: removed the previous run's %s", out, ", ".join(sorted(removed)))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per status poll is noise
    demo = make()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with quiet_third_party(debug):
            return stages(demo)
    finally:
        demo.stop_all()
        signal.signal(signal.SIGTERM, previous)
        _mark_run(out, running=False)


def _stages(demo: Demo) -> dict[str, Any]:
    with Stage("data"):
        specs = demo.prepare_data()
    with Stage("export"):
        bundles = demo.export_bundles()
    with demo.server() as url:
        with Stage("register"):
            specs = demo.register(url, specs, bundles)
        with Stage("devices + train"):
            running = demo.launch(url, specs, bundles)
            demo.train(url, specs, running)
        with Stage("evaluate"):
            rows = demo.evaluate(url, specs, bundles)
    return demo.report(rows)


# ---- helpers ---------------------------------------------------------------------------
def _subsample(records: list[Any], n: int, seed: int) -> list[Any]:
    import numpy as np

    if n >= len(records):
        return records
    idx = np.random.default_rng(seed).permutation(len(records))[:n]
    return [records[i] for i in sorted(idx)]


def _bundle_ok(path: Path, backbone: str) -> bool:
    from fedmobillm.export.pipeline import bundle_is_current

    return bundle_is_current(path, backbone)


def _progress_row(st: dict[str, Any], n_dev: int, n_done: int, t: float) -> dict[str, Any]:
    """One progress point from the server's /v1/status."""
    trainer = st.get("trainer") or {}
    per_arch: dict[str, float] = {}
    for h in reversed(trainer.get("history") or []):
        if h.get("validation"):
            per_arch = {a: v["accuracy"] for a, v in h["validation"].items()}
            break
    samples = sum(int(d["samples"].get("train", 0)) for d in st.get("devices", []))
    uploaded = sum(int(n) for d in st.get("devices", []) for n in d["samples"].values())
    return {
        "t": round(t, 1),
        "samples": samples,
        "uploaded": uploaded,  # every split: train, validation, anchor
        "step": int(trainer.get("step", 0)),
        "trainer_idle": bool(trainer.get("idle")),
        "loss": trainer.get("loss"),
        "val_accuracy": sum(per_arch.values()) / len(per_arch) if per_arch else None,
        "val_per_architecture": per_arch,
        "devices_running": n_dev - n_done,
        "devices_done": n_done,
    }


def _legend_name(backbone: str, quant: dict[str, Any]) -> str:
    """The model name, with its quantization when that fell back ("SmolLM2-135M, fp32")."""
    name = model_name(backbone)
    return f"{name}, {quant['quant']}" if quant.get("quant_fallback") else name


def _upload_stats(devs: list[DeviceSpec]) -> dict[str, Any]:
    """What the devices' summaries say: bytes uploaded, forward time and peak memory, and the
    anchor texts they forwarded and uploaded, in all."""
    sums = [x for x in (_read_json(s.state_dir / "summary.json") for s in devs) if x]
    anchors = [x for x in (_read_json(s.state_dir / "anchor-summary.json") for s in devs) if x]
    return {
        "bytes_uploaded": _mean([x.get("bytes_uploaded", 0) for x in sums]),
        "bytes_per_sample": _mean(
            [x.get("bytes_uploaded", 0) / max(1, x.get("samples", 1)) for x in sums]
        ),
        "forward_ms_per_sample": _mean([x.get("forward_ms_per_sample", 0) for x in sums]),
        "peak_mb": max([x.get("peak_rss_mb", 0) for x in sums] or [0]),
        "anchor_samples": sum(x.get("samples", 0) for x in anchors),
        "anchor_bytes_uploaded": sum(x.get("bytes_uploaded", 0) for x in anchors),
    }


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
