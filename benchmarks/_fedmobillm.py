"""fedmobillm in the benchmark, and centralised side-tuning.

Real run (measured): bundles from `fedmobillm.export.pipeline.export_bundle`; the real
server (`fedmobillm serve`, uvicorn on loopback, SQLite store, trainer thread); each
simulated device registers and runs `fedmobillm.device_runtime.client.DeviceClient`
(onnxruntime forward at the device's quant, int8 pivot upload) through its own port of a
byte-counting proxy, then downloads its personal model; test accuracy is on-device
inference (bundle + personal.onnx). Bytes up/down per device are measured on the wire.

Simulated clock (replay): the same activations, the server's learning core
(`fedmobillm.server.side.SideTrainer`, the server's side-network settings) and its policies
(`fedmobillm.server.policies`: balanced sampling, idle rule), driven by an event clock: a
device's batch arrives after its forward FLOPs / device speed plus its measured upload bytes
/ uplink; the trainer steps continuously (each step costs its measured host time) on what
has arrived.

Centralised side-tuning: SideTrainer on the pooled fp32 activations of all train records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import BenchConfig, DeviceProfile, FleetData
from fedmobillm.device_runtime.messages import ROUTE_STATUS
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks")


# -- bundles --------------------------------------------------------------------------------


def bundle_for(cfg: BenchConfig, quant: str) -> Path:
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle
    from fedmobillm.paths import cache_dir

    taps = f"-k{cfg.taps}" if cfg.taps else ""
    out = cache_dir() / "bench-bundles" / f"{cfg.model}-{quant}{taps}-seq{cfg.max_seq_len}"
    if bundle_is_current(out, cfg.model):
        return out
    shutil.rmtree(out, ignore_errors=True)
    log.info("exporting %s bundle (%s, onnx) to %s", cfg.model, quant, out)
    export_bundle(
        cfg.model,
        out,
        num_taps=cfg.taps,
        quant=quant,
        formats=("onnx",),
        max_seq_len=cfg.max_seq_len,
    )
    return out


# -- server ---------------------------------------------------------------------------------


def server_settings(cfg: BenchConfig) -> dict[str, Any]:
    """The server's own defaults (side network, learning rate, batch size, idle rule), except:
    evaluation every `eval_every` steps (and, if `side_steps`, idle that many steps after the
    last upload instead of the server's idle rule)."""
    from fedmobillm.server.settings import ServerSettings

    fields = ServerSettings.model_fields
    s: dict[str, Any] = {
        "seed": cfg.seed,
        "eval_every": cfg.eval_every,
        "export_every": 100_000,
        "checkpoint_every": 100_000,
        "trainer_threads": 1,
    }
    if cfg.side_steps:  # a fixed number of steps after the last upload instead
        s["idle_after_steps"] = cfg.side_steps
        if "idle_after_epochs" in fields:
            s["idle_after_epochs"] = 0
    if cfg.side_lr is not None:
        s["side"] = {"lr": cfg.side_lr}
    if cfg.side_batch is not None:
        s["batch_size"] = cfg.side_batch
    return {k: v for k, v in s.items() if k in fields}


@contextlib.contextmanager
def real_server(cfg: BenchConfig, workdir: Path):
    """`fedmobillm serve` in a subprocess; yields (url, admin token, settings dict)."""
    from fedmobillm.server.local import LocalServer

    token = secrets.token_urlsafe(24)
    settings = server_settings(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "server.json").write_text(json.dumps(settings))
    with LocalServer(
        workdir / "data",
        admin_token=token,
        config=workdir / "server.json",
        log_path=workdir / "server.log",
        startup_timeout=120,
        grace=30,
    ) as srv:
        yield srv.url, token, settings


def _status(url: str, token: str) -> dict[str, Any]:
    import httpx

    return httpx.get(
        url + ROUTE_STATUS, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()


def _trainer(st: dict[str, Any]) -> dict[str, Any]:
    return st.get("trainer") or st


def wait_trained(url: str, token: str, min_step: int, timeout_s: float) -> dict[str, Any]:
    """Until the trainer went idle after its steps and exported personal models."""
    t0 = time.monotonic()
    st: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout_s:
        st = _status(url, token)
        tr = _trainer(st)
        if tr.get("error"):
            raise FedMobiLLMError(f"the server's trainer failed: {tr['error']}")
        if tr.get("idle") and tr.get("step", 0) >= min_step and tr.get("personal_models"):
            return st
        time.sleep(3)
    log.warning("trainer not idle after %.0f s; using its state as is", timeout_s)
    return st


# -- the real run ----------------------------------------------------------------------------


@dataclass
class RealRun:
    per_device: list[dict[str, Any]]
    test: dict[str, Any]
    server_history: list[dict[str, Any]]
    server_step: int
    host_wall_s: float
    bundles: dict[str, dict[str, Any]]


def run_real(
    cfg: BenchConfig,
    data: FleetData,
    profiles: list[DeviceProfile],
    bundles: dict[str, Path],
    workdir: Path,
) -> RealRun:
    """Bundles: quant -> bundle dir (each device runs the one of its profile's quant)."""
    from benchmarks._wire import WireMeter

    t0 = time.perf_counter()
    with real_server(cfg, workdir / "server") as (url, token, _):
        port = int(url.rsplit(":", 1)[1])
        meter = WireMeter("127.0.0.1", port)
        try:
            rows = _upload_all(cfg, data, profiles, bundles, workdir, meter, token)
            st = wait_trained(url, token, 1, timeout_s=1200)
            trained_wire = meter.snapshot()  # training traffic: before the model delivery
            test = _personal_test(rows, data, bundles, workdir, meter)
            wire = meter.snapshot()
        finally:
            meter.close()
    for row in rows:
        zero = {"up": 0, "down": 0, "connections": 0}
        w, t = wire.get(row["device"], zero), trained_wire.get(row["device"], zero)
        row.update(
            wire_bytes_up=t["up"],
            wire_bytes_down=t["down"],
            delivery_bytes_up=w["up"] - t["up"],
            delivery_bytes_down=w["down"] - t["down"],
            connections=w["connections"],
        )
    tr = _trainer(st)
    n_test = sum(v["samples"] for v in test.values())
    test["accuracy"] = sum(v["accuracy"] * v["samples"] for v in test.values()) / max(1, n_test)
    info = {
        q: {"path": str(b), "bytes": sum(f.stat().st_size for f in b.iterdir() if f.is_file())}
        for q, b in bundles.items()
    }
    return RealRun(
        rows, test, tr.get("history", []), int(tr.get("step", 0)), time.perf_counter() - t0, info
    )


def _upload_all(
    cfg: BenchConfig,
    data: FleetData,
    profiles: list[DeviceProfile],
    bundles: dict[str, Path],
    workdir: Path,
    meter: Any,
    token: str,
) -> list[dict[str, Any]]:
    """Register every device and upload its records, each through its own meter port; one
    row per device."""
    from fedmobillm.device_runtime.client import DeviceClient, RunConfig, register

    rows: list[dict[str, Any]] = []
    names = [f"dev{i:02d}-{p.name}" for i, p in enumerate(profiles)]
    # the validator uploads the server's validation split first, as in a deployment
    # where it is set up before the fleet: the trainer evaluates (and keeps its best
    # snapshot) from its first steps, as the replay below assumes
    jobs = [("validator", profiles[0], data.validation, "validation")]
    jobs += [
        (n, p, data.devices[i], "train")
        for i, (n, p) in enumerate(zip(names, profiles, strict=True))
    ]
    for name, prof, records, split in jobs:
        bundle = bundles[prof.quant]
        state = workdir / "devices" / name
        register(meter.url(name), token, name, bundle, data.label_names, state_dir=state)
        client = DeviceClient(
            state,
            bundle,
            RunConfig(threads=1, batch_size=cfg.upload_batch, split=split, server=meter.url(name)),
        )
        summary = client.run(records)
        rows.append(
            {
                "device": name,
                "profile": prof.name,
                "quant": prof.quant,
                "split": split,
                "samples": summary.samples,
                "batches": summary.batches,
                "http_body_bytes_up": summary.bytes_uploaded,
                "forward_ms_per_sample_host": summary.forward_ms_per_sample,
            }
        )
        log.info(
            "device %s uploaded %d samples (%d body bytes)",
            name,
            summary.samples,
            summary.bytes_uploaded,
        )
    return rows


def _personal_test(
    rows: list[dict[str, Any]],
    data: FleetData,
    bundles: dict[str, Path],
    workdir: Path,
    meter: Any,
) -> dict[str, Any]:
    """Every training device downloads its personal model; the test split through the
    first one of each quant (on-device inference: bundle + personal.onnx)."""
    from fedmobillm.device_runtime.backbone import Backbone
    from fedmobillm.device_runtime.personal import (
        PersonalModel,
        fetch_personal_model,
        predict_records,
    )

    test = {}
    for row in rows:
        if row["split"] != "train":
            continue
        state = workdir / "devices" / row["device"]
        out = workdir / "personal" / row["device"]
        fetch_personal_model(state, out, server=meter.url(row["device"]))
        if row["quant"] not in test:
            res = predict_records(
                Backbone(bundles[row["quant"]], "onnx", threads=1),
                _checked(PersonalModel(out), bundles[row["quant"]]),
                data.test,
            )
            test[row["quant"]] = {
                "accuracy": res.accuracy,
                "samples": res.samples,
                "ms_per_sample_host": res.ms_per_sample,
            }
    return test


def _checked(pm: Any, bundle: Path) -> Any:
    from fedmobillm.device_runtime.protocol import read_manifest

    pm.check_compatible(read_manifest(bundle))
    return pm


# -- activations ----------------------------------------------------------------------------


def activations(
    bundle: Path, records: list[Any], batch: int = 32
) -> tuple[np.ndarray, np.ndarray, Any]:
    """(x float32 (N, K, d) as the server sees them (int8 round trip for int8 uploads), y)."""
    from fedmobillm.device_runtime import serde
    from fedmobillm.device_runtime.backbone import Backbone

    bb = Backbone(bundle, "onnx", threads=1)
    xs = [bb([r.text for r in records[s : s + batch]]) for s in range(0, len(records), batch)]
    x = (
        np.concatenate(xs)
        if xs
        else np.zeros((0, bb.manifest.num_taps, bb.manifest.hidden_size), np.float32)
    )
    scales = np.asarray(bb.manifest.activation_scales, np.float32)  # (K,)
    x = serde.dequantize(serde.quantize_int8(x, scales), scales)  # (N, K, d)
    return x, np.asarray([r.label for r in records], np.int64), bb.manifest


def _side(cfg: BenchConfig, label_names: list[str], manifest: Any) -> Any:
    """A SideTrainer configured as the real server configures its own (ServerSettings.side)."""
    from fedmobillm.server.side import SideTrainer

    tr = SideTrainer(_settings(cfg).side, label_names, seed=cfg.seed)
    tr.add_architecture(
        manifest.architecture, list(manifest.taps), manifest.depth, manifest.hidden_size
    )
    return tr


def _settings(cfg: BenchConfig) -> Any:
    from fedmobillm.server.settings import ServerSettings

    return ServerSettings(**server_settings(cfg))


def _batch_size(cfg: BenchConfig) -> int:
    return int(_settings(cfg).batch_size)


# -- replay on the simulated clock -----------------------------------------------------------


def device_timeline(
    n: int,
    prof: DeviceProfile,
    fwd_flops_per_sample: float,
    upload_batch: int,
    bytes_per_batch: float,
) -> list[tuple[float, float, float, int, int]]:
    """[(forward start, forward done, arrival, start, stop)] of a device's batches: forward
    then upload; the upload of batch j overlaps the forward of batch j+1 (one link, one
    compute unit)."""
    out, t_fwd, t_link = [], 0.0, 0.0
    for s in range(0, n, upload_batch):
        b = min(upload_batch, n - s)
        start = t_fwd
        t_fwd += prof.compute_s(fwd_flops_per_sample * b)
        t_link = max(t_link, t_fwd) + prof.up_s(bytes_per_batch * b / upload_batch)
        out.append((start, t_fwd, t_link, s, s + b))
    return out


def device_arrivals(
    n: int,
    prof: DeviceProfile,
    fwd_flops_per_sample: float,
    upload_batch: int,
    bytes_per_batch: float,
) -> list[tuple[float, int, int]]:
    """[(arrival time, start, stop)] of a device's batches (see ``device_timeline``)."""
    return [
        (arrive, s, e)
        for _, _, arrive, s, e in device_timeline(
            n, prof, fwd_flops_per_sample, upload_batch, bytes_per_batch
        )
    ]


def replay(
    cfg: BenchConfig,
    data: FleetData,
    profiles: list[DeviceProfile],
    bundles: dict[str, Path],
    fwd_flops: float,
    bytes_per_sample: float,
    features: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The server's learning core over the devices' activations on the simulated clock.
    ``features``, when given, receives the activations (dev_x, dev_y, vx, vy, tx) for the
    rivals that run on the same single forward (``benchmarks._probe``)."""
    from fedmobillm.server.policies import balanced_sample

    rng = np.random.default_rng(cfg.seed)
    dev_x, dev_y, manifest = _device_activations(data, profiles, bundles)
    vx, vy, _ = activations(bundles[profiles[0].quant], data.validation)
    tx = {q: activations(b, data.test) for q, b in bundles.items()}
    if features is not None:
        features.update(dev_x=dev_x, dev_y=dev_y, vx=vx, vy=vy, tx=tx)
    timelines = [
        device_timeline(
            len(dev_y[d]), prof, fwd_flops, cfg.upload_batch, bytes_per_sample * cfg.upload_batch
        )
        for d, prof in enumerate(profiles)
    ]
    events = sorted((t, d, s, e) for d, tl in enumerate(timelines) for _, _, t, s, e in tl)
    tr = _side(cfg, data.label_names, manifest)
    settings = _settings(cfg)
    batch = settings.batch_size
    arch = manifest.architecture
    clock, curve = _SimClock(events, len(profiles)), []
    all_in = events[-1][0] if events else 0.0
    have = clock.have
    for ready in clock.steps(settings):
        groups = balanced_sample(  # [(arch, x (B, K, d), y (B,))]
            rng, batch, {arch: ready}, lambda _, d: (dev_x[d][: have[d]], dev_y[d][: have[d]])
        )
        t0 = time.perf_counter()
        tr.train_step(groups)
        clock.stepped(time.perf_counter() - t0)
        if tr.step % cfg.eval_every == 0:
            curve.append(_replay_point(tr, arch, vx, vy, clock.t, int(sum(have))))
            if tr.step % (10 * cfg.eval_every) == 0:
                log.info(
                    "replay step %d: sim clock %.1f s, %d samples in, validation %.4f",
                    tr.step,
                    clock.t,
                    int(sum(have)),
                    curve[-1]["accuracy"],
                )
    test = {q: tr.evaluate(arch, x, y) for q, (x, y, _) in tx.items()}
    return {
        "curve": curve,
        "timelines": timelines,
        "all_data_in_s": all_in,
        "server_step_s": float(np.median(clock.step_times)),
        "steps": tr.step,
        "test": test,
        "side_params": tr.num_parameters(arch),
    }


class _SimClock:
    """A replay's simulated server clock. ``events``: the devices' uploads, (arrival time,
    device, first row, end row) in time order; ``have[d]``: device d's samples arrived so far;
    ``t``: the clock; ``step_times``: each server step's measured host time."""

    def __init__(self, events: list[tuple], devices: int) -> None:
        self.events = events
        self.have = [0] * devices
        self.t = 0.0
        self.since = 0  # steps since the last upload arrived
        self.step_times: list[float] = []

    def steps(self, settings: Any) -> Iterator[list[int]]:
        """Before each server step, the devices with samples in. Uploads arrive as the clock
        passes them; while no device has data, or the server's idle rule (``should_idle``:
        idle after ``idle_after_epochs`` epochs without new data) holds, the clock jumps to
        the next upload, which wakes the trainer; idle with every upload in, it ends. The
        caller takes the step and reports its time (``stepped``)."""
        from fedmobillm.server.policies import should_idle

        events, have, ei = self.events, self.have, 0
        while True:
            arrived = False
            while ei < len(events) and events[ei][0] <= self.t:
                have[events[ei][1]] = max(have[events[ei][1]], events[ei][3])
                ei += 1
                arrived = True
            if arrived:
                self.since = 0
            ready = [d for d in range(len(have)) if have[d] > 0]
            if not ready or should_idle(settings, self.since, int(sum(have))):
                if ei >= len(events):
                    return  # idle with every upload in: the server's training is done
                self.t = events[ei][0]  # idle until the next upload wakes the trainer
                continue
            yield ready

    def stepped(self, host_s: float) -> None:
        """A server step took ``host_s`` on the host: the clock moves on by the median of
        the last 50 steps' times."""
        self.step_times.append(host_s)
        self.t += float(np.median(self.step_times[-50:]))
        self.since += 1


def _device_activations(
    data: FleetData, profiles: list[DeviceProfile], bundles: dict[str, Path]
) -> tuple[list[np.ndarray], list[np.ndarray], Any]:
    """Each device's (x (n, K, d), y (n,)) through the bundle of its quant, and a manifest."""
    dev_x, dev_y, manifest = [], [], None
    for recs, prof in zip(data.devices, profiles, strict=True):
        x, y, manifest = activations(bundles[prof.quant], recs)
        dev_x.append(x)
        dev_y.append(y)
    return dev_x, dev_y, manifest


def _replay_point(
    tr: Any, arch: str, vx: np.ndarray, vy: np.ndarray, clock: float, arrived: int
) -> dict[str, Any]:
    """One point of the replay's validation curve."""
    ev = tr.evaluate(arch, vx, vy)
    return {
        "step": tr.step,
        "time_s": clock,
        "accuracy": ev["accuracy"],
        "loss": ev["loss"],
        "samples_arrived": arrived,
    }


def centralised(cfg: BenchConfig, data: FleetData, bundle_fp32: Path, steps: int) -> dict[str, Any]:
    """Side-tuning on all train records pooled on one machine (fp32 activations)."""
    rng = np.random.default_rng(cfg.seed)
    x, y, manifest = activations_fp32(bundle_fp32, data.central_train)
    vx, vy, _ = activations_fp32(bundle_fp32, data.validation)
    tx, ty, _ = activations_fp32(bundle_fp32, data.test)
    tr = _side(cfg, data.label_names, manifest)
    batch = _batch_size(cfg)
    arch = manifest.architecture
    curve, tests = [], []
    for _ in range(steps):
        idx = rng.integers(len(y), size=batch)
        tr.train_step([(arch, x[idx], y[idx])])
        if tr.step % cfg.eval_every == 0:
            ev = tr.evaluate(arch, vx, vy)
            curve.append({"step": tr.step, "accuracy": ev["accuracy"], "loss": ev["loss"]})
            tests.append(tr.evaluate(arch, tx, ty))  # read only at the best validation point
    last = tr.evaluate(arch, tx, ty)
    # equal model selection (issue 22): the snapshot of the first best validation accuracy,
    # as fedmobillm's trainer keeps (its test is taken at each evaluation, read at that one)
    from benchmarks._fair import best_snapshot

    i = best_snapshot(curve)
    return {
        "curve": curve,
        "steps": tr.step,
        "test": tests[i] if i is not None else last,
        "test_last": last,
        "selection": f"best validation snapshot (step {curve[i]['step']})"
        if i is not None
        else "last step (no evaluation)",
        "train_samples": len(y),
    }


def activations_fp32(bundle: Path, records: list[Any]) -> tuple[np.ndarray, np.ndarray, Any]:
    from fedmobillm.device_runtime.backbone import Backbone

    bb = Backbone(bundle, "onnx", threads=1)
    xs = [bb([r.text for r in records[s : s + 32]]) for s in range(0, len(records), 32)]
    return np.concatenate(xs), np.asarray([r.label for r in records], np.int64), bb.manifest


# -- the per-token path (issue 15) on the simulated clock ------------------------------------


def token_bundle_for(cfg: BenchConfig, quant: str) -> Path:
    """The ``pivot="none"`` bundle of ``cfg.model`` at ``quant`` (cached, like ``bundle_for``;
    an int8 export that fails its check falls back to fp32 weights, logged, see
    ``benchmarks._activations.bundle_for``)."""
    from benchmarks._activations import BundleSpec
    from benchmarks._activations import bundle_for as spec_bundle

    return spec_bundle(
        BundleSpec(cfg.model, cfg.taps or 0, quant, cfg.max_seq_len, pivot="none")
        if cfg.taps
        else BundleSpec(cfg.model, quant=quant, max_seq_len=cfg.max_seq_len, pivot="none")
    )


def token_activations(bundle: Path, records: list[Any], batch: int = 32) -> Any:
    """``TokenActivations`` of ``records`` (int8 as uploaded, each sample unpadded)."""
    from benchmarks._activations import TokenActivations, _token_chunk, bundle_fields
    from fedmobillm.device_runtime.backbone import FORWARD_BATCH, Backbone

    bb = Backbone(bundle, "onnx", threads=1)
    m = bb.manifest
    scales = np.asarray(m.activation_scales, np.float32)  # (K,)
    q, lengths = _token_chunk(bb, records, scales, batch, FORWARD_BATCH)
    return TokenActivations(
        q=q,
        lengths=lengths,
        y=np.asarray([r.label for r in records], np.int64),
        index=np.arange(len(records), dtype=np.int64),
        scales=scales,
        **bundle_fields(m),
    )


def token_upload_bytes(acts: Any, upload_batch: int) -> list[int]:
    """serde-encoded body bytes of each upload batch of ``acts`` (in order), as the device
    sends it: int8 (N, K, T, d) padded to the batch's longest sample, lengths, scales,
    labels, ids and the JSON header."""
    from fedmobillm.device_runtime import serde

    out = []
    for s in range(0, len(acts), upload_batch):
        rows = np.arange(s, min(s + upload_batch, len(acts)))
        q = np.stack([_pad_q(x, int(acts.lengths[rows].max())) for x in acts.samples(rows)])
        b = serde.Batch(
            device_id="d" * 22,
            bundle_sha256=acts.bundle_sha256,
            idempotency_key="k" * 32,
            split="train",
            encoding="int8",
            activations=q,  # (n, K, T, d) int8
            labels=acts.y[rows],
            sample_ids=rows.astype(np.int64),
            scales=acts.scales,
            lengths=acts.lengths[rows],
        )
        out.append(len(serde.encode_batch(b)))
    return out


def _pad_q(x: np.ndarray, t: int) -> np.ndarray:
    """int8 (K, L, d) -> (K, t, d) zero-padded."""
    return np.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0)))


def replay_tokens(
    cfg: BenchConfig,
    data: FleetData,
    profiles: list[DeviceProfile],
    bundles: dict[str, Path],
    fwd_flops: float,
    side: dict[str, Any],
) -> dict[str, Any]:
    """``replay`` for a token federation: each device's token taps (``bundles``: quant ->
    pivot-none bundle) arrive after its forward and its upload (its measured serde body
    bytes over its uplink); the server's token side network (``side``: SideConfig
    overrides on top of the server's settings, inputs "tokens") steps on what arrived, with
    the same sampler and idle rule as the pivot replay."""
    from fedmobillm.server.policies import balanced_sample

    rng = np.random.default_rng(cfg.seed)
    devs = [
        token_activations(bundles[p.quant], recs)
        for recs, p in zip(data.devices, profiles, strict=True)
    ]
    val = token_activations(bundles[profiles[0].quant], data.validation)
    test = {q: token_activations(b, data.test) for q, b in bundles.items()}
    bodies = [token_upload_bytes(a, cfg.upload_batch) for a in devs]
    timelines = [
        _token_timeline(len(a), prof, fwd_flops, cfg.upload_batch, body)
        for a, prof, body in zip(devs, profiles, bodies, strict=True)
    ]
    events = sorted((t, d, s, e) for d, tl in enumerate(timelines) for _, _, t, s, e in tl)
    tr = _token_side(cfg, data.label_names, devs[0], side)
    settings = _settings(cfg)
    arch = devs[0].architecture
    clock, curve = _SimClock(events, len(profiles)), []
    have = clock.have
    for ready in clock.steps(settings):
        ((_, ids, y),) = balanced_sample(  # row ids of each device's arrived samples
            rng, settings.batch_size, {arch: ready},
            lambda _, d: (np.arange(have[d]) * len(profiles) + d, devs[d].y[: have[d]]),
        )  # fmt: skip
        x, mask = _token_batch(devs, ids, len(profiles))
        t0 = time.perf_counter()
        tr.train_step([(arch, x, y, mask)])
        clock.stepped(time.perf_counter() - t0)
        if tr.step % cfg.eval_every == 0:
            acc = _token_accuracy(tr, val)
            curve.append(
                {"step": tr.step, "time_s": clock.t, "accuracy": acc, "samples_arrived": sum(have)}
            )
    return {
        "curve": curve,
        "timelines": timelines,
        "all_data_in_s": events[-1][0] if events else 0.0,
        "server_step_s": float(np.median(clock.step_times)) if clock.step_times else math.nan,
        "steps": tr.step,
        "test": {q: {"accuracy": _token_accuracy(tr, a), "n": len(a)} for q, a in test.items()},
        "side_params": tr.num_parameters(arch),
        "upload_body_bytes": [int(sum(b)) for b in bodies],
        "samples": [len(a) for a in devs],
        "mean_tokens": float(np.mean(np.concatenate([a.lengths for a in devs]))),
        "stored_bytes_per_sample": float(np.mean([a.bytes_per_sample() for a in devs])),
    }


def _token_timeline(
    n: int, prof: DeviceProfile, fwd_flops: float, upload_batch: int, bodies: list[int]
) -> list[tuple[float, float, float, int, int]]:
    """``device_timeline`` with each batch's own upload bytes (token batches differ)."""
    out, t_fwd, t_link = [], 0.0, 0.0
    for j, s in enumerate(range(0, n, upload_batch)):
        b = min(upload_batch, n - s)
        start = t_fwd
        t_fwd += prof.compute_s(fwd_flops * b)
        t_link = max(t_link, t_fwd) + prof.up_s(bodies[j])
        out.append((start, t_fwd, t_link, s, s + b))
    return out


def _token_side(cfg: BenchConfig, label_names: list[str], acts: Any, side: dict[str, Any]) -> Any:
    """A token-mode SideTrainer: the server's side settings with ``side`` on top."""
    from fedmobillm.server.side import SideConfig, SideTrainer

    base = dataclasses.asdict(_settings(cfg).side)
    tr = SideTrainer(SideConfig(**{**base, **side, "inputs": "tokens"}), label_names, seed=cfg.seed)
    tr.add_architecture(acts.architecture, acts.taps, acts.depth, acts.hidden)
    return tr


def _token_batch(devs: list[Any], ids: np.ndarray, n_dev: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded x (B, K, T, d) and mask (B, T) of encoded ids (row * n_dev + device)."""
    from fedmobillm.server.side import pad_tokens

    parts = [
        devs[i % n_dev].samples(np.array([i // n_dev]))[0].astype(np.float32)
        * devs[i % n_dev].scales.reshape(-1, 1, 1)
        for i in ids
    ]  # (K, L, d) each
    return pad_tokens(parts)


def _token_accuracy(tr: Any, acts: Any) -> float:
    from benchmarks._tokens import evaluate

    return evaluate(tr, acts)
