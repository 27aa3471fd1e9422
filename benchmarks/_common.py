"""Shared pieces of the headline benchmark: configuration (quick / full), the device
profiles of the simulated fleet, the data split across devices, and small helpers.

Torch-free: `_device_step` imports this module in a process that must not load torch.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmobillm.device_runtime.files import write_atomic
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks")

PROFILE_DIR = Path(__file__).resolve().parent / "baselines" / "profiles"
DEFAULT_PROFILES = ("fast", "mid", "slow")


@dataclass
class DeviceProfile:
    """One device class of the fleet (documented JSON under baselines/profiles/).

    compute time of W FLOPs = W / (effective_gflops * 1e9) seconds;
    transfer time of B bytes = 8 B / (mbps * 1e6) seconds."""

    name: str
    compute_factor: float
    effective_gflops: float
    uplink_mbps: float
    downlink_mbps: float
    quant: str = "int8"
    description: str = ""
    source: str = ""

    def compute_s(self, flops: float) -> float:
        return flops / (self.effective_gflops * 1e9)

    def up_s(self, nbytes: float) -> float:
        return 8.0 * nbytes / (self.uplink_mbps * 1e6)

    def down_s(self, nbytes: float) -> float:
        return 8.0 * nbytes / (self.downlink_mbps * 1e6)


def load_profile(path: Path, reference_gflops: float = 40.0) -> DeviceProfile:
    """A profile JSON: ours, or one written by `fedmobillm android profile` (then the keys
    we need are looked up under common names; compute_factor is derived from gflops)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise FedMobiLLMError(f"cannot read device profile {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise FedMobiLLMError(f"device profile {path} is not a JSON object")
    flat = dict(raw)
    for sub in ("profile", "bench", "benchmark", "link"):
        if isinstance(raw.get(sub), dict):
            flat = {**raw[sub], **flat}
    gflops = flat.get("effective_gflops") or flat.get("gflops")
    factor = flat.get("compute_factor")
    if gflops is None and factor is None:
        raise FedMobiLLMError(
            f"device profile {path} gives neither effective_gflops nor compute_factor",
            hint="see benchmarks/baselines/profiles/fast.json for the keys",
        )
    gflops = float(gflops) if gflops is not None else reference_gflops / float(factor)
    factor = float(factor) if factor is not None else reference_gflops / gflops
    bw = flat.get("bandwidth_mbps")
    up = flat.get("uplink_mbps", bw)
    down = flat.get("downlink_mbps", bw if bw is not None else up)
    if up is None or down is None:
        raise FedMobiLLMError(f"device profile {path} gives no uplink_mbps / downlink_mbps")
    return DeviceProfile(
        name=str(flat.get("name") or Path(path).stem),
        compute_factor=factor,
        effective_gflops=gflops,
        uplink_mbps=float(up),
        downlink_mbps=float(down),
        quant=str(flat.get("quant", "int8")),
        description=str(flat.get("description", "")),
        source=str(path),
    )


@dataclass
class BenchConfig:
    mode: str = "quick"
    seed: int = 0
    model: str = "minilm-l6"
    dataset: str = "movie-snippets"
    # Fleet: device class -> count (classes are profile names or JSON files)
    fleet: dict[str, int] = field(default_factory=lambda: {"fast": 2, "mid": 3, "slow": 3})
    samples_per_device: int = 80  # train records per device
    dirichlet_alpha: float | None = 1.0  # non-IID label skew; None = IID
    validation_samples: int = 600  # server-side validation (target accuracy)
    test_samples: int = 1057  # the whole test split: the accuracy gap is a difference of two
    # test accuracies, and 600 records left it +-2.5 points of noise
    max_seq_len: int = 64
    # Bundle taps: average-interval sampling of K blocks (3 of MiniLM-L6's 6: blocks 2, 4, 6),
    # as in bench_accuracy; None taps every block
    taps: int | None = 3
    # FedAvg (Flower)
    rounds: int = 6
    rounds_full: int = 3  # full FT is the slowest to simulate on 2 cores: fewer rounds in quick
    fraction_train: float = 0.5
    local_epochs: int = 2
    local_batch: int = 8
    lora_rank: int = 8
    # 1e-3: at 3e-3, 2 of 5 quick runs' FedAvg-LoRA pulled the shared head to one class and
    # never left 0.500 validation accuracy (Flower's device selection differs run to run);
    # in-process at 1e-3 it learned with both seeds tried (best 0.723 at round 4, 0.700 at 6),
    # and in Flower (run_q9: 0.738 at round 6)
    lora_lr: float = 1e-3
    full_lr: float = 5e-5
    # Forward-gradient (FwdLLM-style)
    fwd_perturbations: int = 8
    # fedmobillm / side-tuning
    side_steps: int = 0  # 0: the server's idle rule; N: idle N steps after the last upload
    side_batch: int | None = None  # None: the server's default batch size
    side_lr: float | None = None  # None: the server's default learning rate
    eval_every: int = 20  # trainer steps between validation evaluations
    upload_batch: int = 16  # device upload batch (samples)
    # Target: accuracy on the validation split; "auto" = target_fraction * the lower of the
    # best validation accuracies of FedAvg-LoRA and fedmobillm.
    target: float | str = "auto"
    target_fraction: float = 0.97
    use_flower_engine: bool = True
    memory_batch: int = 8

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> BenchConfig:
        if mode == "quick":
            cfg = cls(mode="quick")
        elif mode == "full":
            cfg = cls(
                mode="full",
                fleet={"fast": 5, "mid": 8, "slow": 7},
                samples_per_device=300,
                validation_samples=1057,
                test_samples=1057,
                max_seq_len=64,
                rounds=30,
                rounds_full=30,
                fraction_train=0.5,
                eval_every=50,
                fwd_perturbations=16,
            )
        else:
            raise FedMobiLLMError(f"mode must be quick or full, not {mode!r}")
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg

    @property
    def num_devices(self) -> int:
        return sum(self.fleet.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fleet_profiles(
    cfg: BenchConfig, profile_files: dict[str, Path] | None = None
) -> list[DeviceProfile]:
    """One profile per device, in device order (classes in the fleet's order)."""
    profile_files = profile_files or {}
    out = []
    for cls_name, count in cfg.fleet.items():
        path = profile_files.get(cls_name) or PROFILE_DIR / f"{cls_name}.json"
        if not Path(path).is_file():
            raise FedMobiLLMError(
                f"no device profile for class {cls_name!r} (looked for {path})",
                hint=f"use one of {', '.join(DEFAULT_PROFILES)} or pass --profile NAME=FILE.json",
            )
        prof = load_profile(Path(path))
        prof.name = cls_name
        out.extend([prof] * count)
    return out


@dataclass
class FleetData:
    label_names: list[str]
    devices: list[list[Any]]  # Records per device (train)
    validation: list[Any]
    test: list[Any]
    central_train: list[Any]  # the union of the devices' records

    def summary(self) -> dict[str, Any]:
        return {
            "label_names": self.label_names,
            "devices": len(self.devices),
            "train_per_device": [len(d) for d in self.devices],
            "validation": len(self.validation),
            "test": len(self.test),
        }


def load_fleet_data(cfg: BenchConfig) -> FleetData:
    """The named data set, split by fedmobillm's own loader; the train split is subsampled
    to devices * samples_per_device records and partitioned (Dirichlet(alpha) over labels)."""
    import numpy as np

    from fedmobillm.data import load_dataset, partition

    ds = load_dataset(cfg.dataset, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train = ds.splits["train"]
    want = cfg.num_devices * cfg.samples_per_device
    if want > len(train):
        raise FedMobiLLMError(
            f"{cfg.num_devices} devices x {cfg.samples_per_device} samples > {len(train)} "
            "train records",
            hint="lower --samples-per-device",
        )
    pick = rng.permutation(len(train))[:want]
    train = [train[i] for i in sorted(pick)]
    parts = partition(train, cfg.num_devices, cfg.dirichlet_alpha, cfg.seed)
    # The splits keep source order (sorted by label in the vader files): subsample at random.
    val = _subsample(ds.splits["validation"], cfg.validation_samples, rng)
    test = _subsample(ds.splits["test"], cfg.test_samples, rng)
    return FleetData(list(ds.label_names), parts, val, test, [r for p in parts for r in p])


def _subsample(records: list[Any], n: int, rng: Any) -> list[Any]:
    if n >= len(records):
        return list(records)
    return [records[i] for i in sorted(rng.permutation(len(records))[:n])]


class Timer:
    def __init__(self, what: str) -> None:
        self.what = what
        self.s = 0.0

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        log.info("%s ...", self.what)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0
        log.info("%s done in %.1f s", self.what, self.s)


def first_reach(curve: list[dict[str, float]], target: float, key: str = "accuracy") -> dict | None:
    """The first point of a curve (ordered by time) whose `key` >= target; the untrained
    starting point (round 0 / step 0) does not count."""
    for p in curve:
        if p.get("round", 1) == 0 or p.get("step", 1) == 0:
            continue
        if p.get(key) is not None and not math.isnan(p[key]) and p[key] >= target:
            return p
    return None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, default=jsonable))


def jsonable(o: Any) -> Any:
    """``json.dumps``'s ``default`` for benchmark results: paths as strings, numpy scalars
    (and one-element arrays) as Python numbers, other arrays as lists."""
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


# -- the benchmark commands' shared command line ------------------------------------------


def split_csv(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated option's items, blanks dropped; None where it is not given."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def write_report(
    out: Path,
    name: str,
    result: dict,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None] | None,
) -> None:
    """A benchmark's outputs: OUT/NAME.json (indent 1), OUT/NAME.md and, with ``plot``,
    OUT/NAME.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=jsonable))
    (out / f"{name}.md").write_text(markdown(result))
    if plot is not None:
        plot(result, out / f"{name}.png")


def merge_command(
    argv: list[str], merge: Callable[[list[Path], Path], dict], markdown: Callable[[dict], str]
) -> int:
    """``--merge DIR1,DIR2,... --out DIR``: ``merge`` the runs' folders into DIR and print
    the merged result's markdown; exit status 2 with the usage on other words."""
    if len(argv) != 4 or argv[2] != "--out":
        print("usage: --merge DIR1,DIR2,... --out DIR", file=sys.stderr)
        return 2
    folders = [Path(f) for f in argv[1].split(",")]
    try:
        result = merge(folders, Path(argv[3]))
    except FileNotFoundError as exc:
        print(
            f"error: cannot merge: {exc.filename} does not exist (each DIR must be the --out "
            "folder of a finished run)",
            file=sys.stderr,
        )
        return 2
    except (json.JSONDecodeError, KeyError) as exc:
        print(f"error: cannot merge: a run's result file is not one this command wrote ({exc})",
              file=sys.stderr)  # fmt: skip
        return 2
    print(markdown(result))
    return 0


def run_command(
    work: Callable[[], dict], markdown: Callable[[dict], str], verbose: bool = False
) -> int:
    """A benchmark command's run: logs to stderr (DEBUG with ``verbose``), then ``work``;
    its result's markdown on stdout (exit status 0), or a ``FedMobiLLMError`` as
    ``error: ...`` on stderr (exit status 2)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    try:
        result = work()
    except FedMobiLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0
