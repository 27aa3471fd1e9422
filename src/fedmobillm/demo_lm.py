"""`fedmobillm demo --task lm`: a federation of personal language models on one machine.

Stages, each logged with its time (the classify demo's, ``fedmobillm.demo``, for text):
  data       the friends transcripts, one device per speaker (the most prolific first):
             each device trains on its speaker's lines as replies (``prompt`` = the line
             spoken just before, loss on the reply only); whole held-out episodes are split
             into a validation half (uploaded: the server picks its checkpoint by it) and a
             test half that never leaves the device
  export     one SmolLM2-135M token bundle per device class, truncated by its taps
             (``--pivot none --generate --quant fp32``: the deepest tap ends the graph),
             cached under ``cache_dir()/bundles``
  server     `fedmobillm serve --task lm` on a free loopback port
  register   every device registers its bundle (task lm, no labels)
  devices    one `fedmobillm device run --task lm` process per device: train split, then
             validation split; live progress (step, loss, validation perplexity)
  evaluate   each device fetches its personal model; on the device runtime (torch-free
             ``device_runtime.generate``): held-out perplexity of its test half, frozen
             (bundle alone) and personal (the personal model's residual before the frozen
             head), and for a few devices a prompt's completion by `fedmobillm device
             generate` without and with ``--personal``
  report     a table, RUN_DIR/summary.json and RUN_DIR/validation.png
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmobillm.demo import (
    QUIET_CHILD_ENV,
    DemoRun,
    Stage,
    _cli,
    _fmt,
    _mean,
    _read_json,
    quiet_loggers,
    run_fresh,
)
from fedmobillm.demo_report import lm_model_name, lm_table_lines, plot_lm_validation
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.local import LocalServer, free_port

log = logging.getLogger("fedmobillm.demo")

LM_MODEL = "smollm2-135m"
# Device classes: the taps of each SmolLM2 truncation, shallowest (slow phones) first
QUICK_FLEET: tuple[tuple[int, ...], ...] = ((4, 8), (4, 8, 12))
FULL_FLEET: tuple[tuple[int, ...], ...] = ((4, 8, 12), (10, 20, 30))
CLASS_NAMES = {1: ("phone",), 2: ("slow", "fast"), 3: ("slow", "mid", "fast")}
CLASS_MBPS = {"slow": 10.0, "mid": 20.0, "fast": 50.0, "phone": 20.0}  # simulated uplink
# The server's settings for the demo (docs/server.md); task and inputs come from --task lm
LM_SERVER = {
    "train": True,
    "batch_size": 16,  # each step reads out through every architecture's 49,152-token head
    "eval_every": 25,
    "checkpoint_every": 100,
    "export_every": 25,
    "idle_after_steps": 150,
    "idle_after_epochs": 0,
    "side": {"width": 128, "blocks": 2, "heads": 4, "lr": 0.002},
}


@dataclass
class LmDemoConfig:
    fleet: list[tuple[int, ...]] = field(default_factory=lambda: list(QUICK_FLEET))
    devices: int = 4  # speakers, most lines first
    data: str = "friends"
    quick: bool = True
    out: Path = Path("runs/demo-lm")
    seed: int = 0
    lines: int | None = None  # train lines per device (quick 300; full 2,000)
    heldout_lines: int | None = None  # per device, half validation, half test (80; 400)
    time_limit_s: float = 600.0
    settle_steps: int = 300
    samples: int = 3  # devices whose completions are shown
    max_new_tokens: int = 20
    max_seq_len: int = 64
    port: int | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        if not self.fleet:
            raise FedMobiLLMError("no device class given", hint="e.g. --fleet 2,4/4,8")
        if len(self.fleet) > 3:
            raise FedMobiLLMError(
                f"{len(self.fleet)} device classes: the lm demo takes 1 to 3",
                hint="e.g. --fleet 2,4/4,8 (slow, fast)",
            )
        if self.devices < len(self.fleet):
            raise FedMobiLLMError(
                f"--devices {self.devices} is fewer than the {len(self.fleet)} device classes",
                hint="give at least one device per class",
            )
        self.lines = self.lines or (300 if self.quick else 2000)
        self.heldout_lines = self.heldout_lines or (80 if self.quick else 400)
        for n, what in ((self.lines, "--lines"), (self.heldout_lines, "--heldout-lines")):
            if n is not None and n < 2:
                raise FedMobiLLMError(f"{what} must be at least 2, not {n}")


def parse_fleet(text: str) -> list[tuple[int, ...]]:
    """``"2,4/4,8"`` -> [(2, 4), (4, 8)]: one device class per ``/``, its 1-based tapped
    blocks in increasing order (the deepest ends the truncated graph)."""
    fleet = []
    for part in text.split("/"):
        try:
            layers = tuple(int(x) for x in part.split(",") if x.strip())
        except ValueError:
            layers = ()
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1:
            raise FedMobiLLMError(
                f"--fleet: {part!r} is not increasing block numbers",
                hint="e.g. --fleet 2,4/4,8 (classes separated by /, blocks by commas)",
            )
        fleet.append(layers)
    return sorted(fleet, key=lambda layers: layers[-1])


def lm_bundle(layers: tuple[int, ...] | list[int], max_seq_len: int = 64) -> Path:
    """SmolLM2-135M as a generation token bundle truncated after block ``layers[-1]`` (taps
    at ``layers``), fp32 ONNX, exported once and cached under ``cache_dir()/bundles``."""
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle
    from fedmobillm.paths import cache_dir

    key = f"{LM_MODEL}-lm-fp32-L{'_'.join(map(str, layers))}-s{max_seq_len}"
    out = cache_dir() / "bundles" / key
    if bundle_is_current(out, LM_MODEL, "none"):
        log.info("bundle %s (blocks 1-%d) is cached at %s", LM_MODEL, layers[-1], out)
        return out
    log.info("exporting %s, taps %s (blocks 1-%d, fp32 onnx, generation graphs) -> %s",
             LM_MODEL, list(layers), layers[-1], out)  # fmt: skip
    export_bundle(LM_MODEL, out, layers=list(layers), pivot="none", quant="fp32",
                  formats=("onnx",), max_seq_len=max_seq_len, generate=True)  # fmt: skip
    return out


def backbone_name(layers: tuple[int, ...]) -> str:
    """The name of a truncation in tables and summaries: "smollm2-135m-b4"."""
    return f"{LM_MODEL}-b{layers[-1]}"


@dataclass
class LmDeviceSpec:
    name: str
    speaker: str | None
    klass: str
    layers: tuple[int, ...]
    bandwidth_mbps: float
    state_dir: Path
    files: dict[str, Path]  # split -> jsonl: train, validation (uploaded), test (kept)
    counts: dict[str, int]

    @property
    def backbone(self) -> str:
        return backbone_name(self.layers)


def split_heldout(records: list[Any], n: int, seed: int) -> tuple[list[Any], list[Any]]:
    """A device's held-out records -> (validation, test): whole groups (episodes) alternate
    between the two halves in a seeded order, so no scene is in both; each half cut to
    ``n // 2`` records (seeded)."""
    groups = sorted({r.group or "" for r in records})
    random.Random(seed).shuffle(groups)
    val_groups = set(groups[0::2])
    val = [r for r in records if (r.group or "") in val_groups]
    test = [r for r in records if (r.group or "") not in val_groups]
    if not val or not test:  # one group: alternate records instead, said
        log.warning("the %d held-out records are from %d group(s): validation and test "
                    "alternate by record, not by episode (lines of one scene may be in both)",
                    len(records), len(groups))  # fmt: skip
        val, test = records[0::2], records[1::2]
    rng = random.Random(seed + 1)
    half = max(1, n // 2)
    return _sample(val, half, rng), _sample(test, half, rng)


def _sample(records: list[Any], n: int, rng: random.Random) -> list[Any]:
    if len(records) <= n:
        return list(records)
    keep = sorted(rng.sample(range(len(records)), n))
    return [records[i] for i in keep]


class LmDemo(DemoRun):
    def __init__(self, cfg: LmDemoConfig) -> None:
        super().__init__(cfg.out, cfg.debug)
        self.cfg = cfg
        self.trainer: dict[str, Any] = {}  # the last status' trainer entry

    # ---- data --------------------------------------------------------------------------
    def prepare_data(self) -> list[LmDeviceSpec]:
        """One device per speaker; its train, validation and test jsonl in RUN_DIR/data."""
        from fedmobillm.data.lm import lm_devices, load_lm_corpus, write_lm_jsonl

        cfg = self.cfg
        corpus = load_lm_corpus(cfg.data)
        by = "author" if corpus.authors else "iid"
        devices = lm_devices(corpus.records, by=by, num_devices=cfg.devices, seed=cfg.seed)
        if len(devices) < len(cfg.fleet):
            raise FedMobiLLMError(
                f"{cfg.data} gives {len(devices)} devices, fewer than the device classes"
            )
        data_dir = self.out / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        names = CLASS_NAMES[len(cfg.fleet)]
        specs = []
        for i, dev in enumerate(devices):
            rng = random.Random(cfg.seed + i)
            train = _sample(dev.train, cfg.lines, rng) if cfg.lines else dev.train
            n_held = cfg.heldout_lines or len(dev.heldout)
            val, test = split_heldout(dev.heldout, n_held, cfg.seed + i)
            c = i % len(cfg.fleet)
            who = (dev.author or dev.name).lower().replace(" ", "_")
            name = f"dev{i:02d}-{who}-{names[c]}"
            files = {s: data_dir / f"{name}.{s}.jsonl" for s in ("train", "validation", "test")}
            for split, recs in (("train", train), ("validation", val), ("test", test)):
                write_lm_jsonl(files[split], recs)
            counts = {"train": len(train), "validation": len(val), "test": len(test)}
            specs.append(LmDeviceSpec(name, dev.author, names[c], cfg.fleet[c],
                                      CLASS_MBPS[names[c]], self.out / "devices" / name,
                                      files, counts))  # fmt: skip
            log.info("%s: speaker %s, %s, SmolLM2 blocks 1-%d, %d train / %d validation / "
                     "%d test lines", name, dev.author, names[c], cfg.fleet[c][-1],
                     counts["train"], counts["validation"], counts["test"])  # fmt: skip
        self.specs = specs
        return specs

    # ---- export ------------------------------------------------------------------------
    def export_bundles(self) -> dict[str, Path]:
        from fedmobillm.device_runtime.protocol import read_manifest

        if not self.cfg.debug:
            import torch  # noqa: F401  # its log handlers exist once imported: quiet them too

            quiet_loggers()
        bundles = {}
        for layers in self.cfg.fleet:
            path = lm_bundle(layers, self.cfg.max_seq_len)
            bundles[backbone_name(layers)] = path
            self.architectures[backbone_name(layers)] = read_manifest(path).architecture
        return bundles

    # ---- server, devices ---------------------------------------------------------------
    @contextmanager
    def server(self) -> Iterator[str]:
        self.admin_token = secrets.token_urlsafe(24)
        srv = LocalServer(
            self.out / "server",
            admin_token=self.admin_token,
            config=LM_SERVER,
            args=["--task", "lm"],
            env={} if self.cfg.debug else dict(QUIET_CHILD_ENV),
            port=free_port(self.cfg.port),
            log_path=self.out / "server.log",
            startup_timeout=120.0,
            grace=15.0,
        )
        with srv:
            if srv.proc is not None:
                self.procs.append(srv.proc)
            log.info("server up at %s, task lm (log: %s)", srv.url, self.out / "server.log")
            yield srv.url

    def register(self, url: str, bundles: dict[str, Path]) -> None:
        """Every device registers its bundle for task lm (no labels)."""
        from fedmobillm.device_runtime.client import register

        for s in self.specs:
            register(server=url, admin_token=self.admin_token, name=s.name,
                     bundle_dir=bundles[s.backbone], label_names=[], state_dir=s.state_dir,
                     task="lm")  # fmt: skip
        log.info("registered %d devices (task lm)", len(self.specs))

    def launch(self, url: str, bundles: dict[str, Path]) -> dict[str, subprocess.Popen]:
        """One shell per device: `device run --task lm` on its train split, then on its
        validation split."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        running = {}
        for s in self.specs:
            steps = []
            for split in ("train", "validation"):
                steps.append(shlex.join(_cli(
                    "device", "run", "--task", "lm", "--bundle", str(bundles[s.backbone]),
                    "--state", str(s.state_dir), "--server", url, "--data",
                    str(s.files[split]), "--split", split, "--threads", "1",
                    "--batch-size", "16", "--bandwidth-mbps", str(s.bandwidth_mbps),
                    "--summary-json", str(s.state_dir / f"{split}-summary.json"),
                )))  # fmt: skip
            with open(logs / f"{s.name}.log", "wb") as f:
                p = subprocess.Popen(["/bin/sh", "-c", " && ".join(steps)], stdout=f,
                                     stderr=subprocess.STDOUT, env=self.child_env,
                                     start_new_session=True)  # fmt: skip
            self.procs.append(p)
            running[s.name] = p
        log.info("launched %d device processes", len(running))
        return running

    def train(self, url: str, running: dict[str, subprocess.Popen]) -> None:
        """Progress every 2 s until the trainer settles after the last upload (idle twice,
        or ``settle_steps`` steps), or the time limit."""
        import httpx

        from fedmobillm.device_runtime.messages import ROUTE_STATUS

        deadline = time.monotonic() + self.cfg.time_limit_s
        last_upload_step, idle = None, 0
        auth = {"Authorization": f"Bearer {self.admin_token}"}
        with httpx.Client(base_url=url, timeout=10.0, headers=auth) as http:
            while True:
                time.sleep(2.0)
                done = self._reap(running)
                st = http.get(ROUTE_STATUS).json()
                self.trainer = st.get("trainer") or {}
                if self.trainer.get("error"):
                    raise FedMobiLLMError(f"the server's trainer failed: {self.trainer['error']}")
                self.kept = self.trainer.get("best_validation") or self.kept
                row = lm_progress_row(st, len(running), len(done), time.monotonic() - self.t_start)
                self.history.append(row)
                log.info("devices %d running / %d done | samples %d | step %d | loss %s | "
                         "val ppl %s", row["devices_running"], len(done), row["samples"],
                         row["step"], _fmt(row["loss"]), _fmt_ppl(row["val_perplexity"]))  # fmt: skip
                if len(done) == len(running):
                    last_upload_step = row["step"] if last_upload_step is None else last_upload_step
                    idle = idle + 1 if row["trainer_idle"] else 0
                    if idle >= 2 and self.trainer.get("personal_models"):
                        log.info("trainer idle at step %d: no new uploads to learn", row["step"])
                        break
                    if row["step"] - last_upload_step >= self.cfg.settle_steps:
                        log.info("trainer settled: %d steps after the last upload",
                                 self.cfg.settle_steps)  # fmt: skip
                        break
                if time.monotonic() > deadline:
                    log.warning("time limit of %.0f s reached; stopping", self.cfg.time_limit_s)
                    break
        self._end_devices(running)

    # ---- evaluate ----------------------------------------------------------------------
    def evaluate(self, url: str, bundles: dict[str, Path]) -> list[dict[str, Any]]:
        """Per device: fetch its personal model, held-out (test half) perplexity frozen and
        personal on the device runtime, and for the first ``samples`` devices a completion
        before and after."""
        rows = []
        for i, s in enumerate(self.specs):
            if s.name in self.dead:
                rows.append({"device": s.name, "error": "its device process failed"})
                continue
            t0 = time.monotonic()
            model = self.out / "personal" / s.name
            err = self._device_cli("fetch-model", "--state", str(s.state_dir), "--server", url,
                                   "--out", str(model))  # fmt: skip
            if err:
                rows.append({"device": s.name, "error": f"fetch-model failed: {err}"})
                continue
            try:  # a test half with nothing to predict is this device's error, not the run's
                ppl = heldout_perplexity(bundles[s.backbone], model, s.files["test"])
            except FedMobiLLMError as exc:
                log.error("[evaluate] %s: no held-out perplexity: %s", s.name, exc)
                rows.append({"device": s.name, "error": f"held-out perplexity: {exc}"})
                continue
            row = {"device": s.name, "speaker": s.speaker, "class": s.klass,
                   "backbone": s.backbone, "layers": list(s.layers), **s.counts, **ppl,
                   **upload_stats(s.state_dir)}  # fmt: skip
            if i < self.cfg.samples:
                row["completion"] = self._completion(bundles[s.backbone], model, s.files["test"])
            rows.append(row)
            log.info("[evaluate] %s (%s, blocks 1-%d): held-out perplexity %s frozen -> %s "
                     "personal over %d tokens, on device in %.1f s", s.name, s.speaker,
                     s.layers[-1], _fmt_ppl(row["frozen"]["perplexity"]),
                     _fmt_ppl(row["personal"]["perplexity"]), row["personal"]["tokens"],
                     time.monotonic() - t0)  # fmt: skip
        return rows

    def _completion(self, bundle: Path, model: Path, test_file: Path) -> dict[str, Any]:
        """A held-out prompt (the line before one of the speaker's test lines) completed by
        `device generate`, frozen and with --personal."""
        from fedmobillm.data.lm import PROMPT_SEPARATOR, read_lm_records

        records, _ = read_lm_records(test_file)
        pick = next((r for r in records if r.prompt and 20 <= len(r.prompt) <= 120), None)
        pick = pick or next((r for r in records if r.prompt), records[0])
        prompt = (pick.prompt + PROMPT_SEPARATOR) if pick.prompt else pick.text.split(" ")[0]
        out: dict[str, Any] = {"prompt": prompt, "reference": pick.text}
        for key, extra in (("frozen", []), ("personal", ["--personal", str(model)])):
            res = self._generate(bundle, prompt, extra)
            out[key] = res
        return out

    def _generate(self, bundle: Path, prompt: str, extra: list[str]) -> dict[str, Any]:
        cmd = _cli("device", "generate", "--bundle", str(bundle), "--prompt", prompt,
                   "--max-new-tokens", str(self.cfg.max_new_tokens), "--threads", "2",
                   "--json", *extra)  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.child_env)
        if r.returncode != 0:
            return {"error": r.stderr.strip()[-500:]}
        g = json.loads(r.stdout.strip().splitlines()[-1])
        return {k: g.get(k) for k in ("text", "tokens_per_s", "stopped", "peak_rss_mib")}

    def _device_cli(self, *args: str) -> str | None:
        r = subprocess.run(_cli("device", *args), capture_output=True, text=True,
                           env=self.child_env)  # fmt: skip
        return None if r.returncode == 0 else r.stderr.strip()[-1500:]

    # ---- report ------------------------------------------------------------------------
    def report(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        backbones = per_backbone(rows, self.architectures, self.trainer)
        summary = {
            "task": "lm",
            "config": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()
            },  # fmt: skip
            "data": self.cfg.data,
            "devices": rows,
            "backbones": backbones,
            "kept": self.kept,
            "trainer_step": self.trainer.get("step"),
            "history": self.history,
            "wall_s": time.monotonic() - self.t_start,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_lm_validation(self.history, self.out / "validation.png",
                           names={a: lm_model_name(b, self._layers(b))
                                  for b, a in self.architectures.items()},
                           frozen={self.architectures[b["backbone"]]: b["frozen_perplexity"]
                                   for b in backbones if b.get("frozen_perplexity")})  # fmt: skip
        print()
        print("\n".join(lm_table_lines(backbones, rows)))
        print(f"summary: {self.out / 'summary.json'}  |  plot: {self.out / 'validation.png'}")
        return summary

    def _layers(self, backbone: str) -> list[int] | None:
        return next((list(s.layers) for s in self.specs if s.backbone == backbone), None)


def heldout_perplexity(bundle: Path, model: Path, test_file: Path) -> dict[str, Any]:
    """Next-token perplexity of the test half on the device runtime (torch-free: the bundle's
    step graph and frozen head), frozen and with the personal model's residual
    (``PersonalLM.delta``) added before the head, on the same target tokens: every target of
    every record once (``score_heldout``); replies are scored on the reply's tokens after
    the previous line."""
    from fedmobillm.data.lm import read_lm_records
    from fedmobillm.device_runtime.generate import Generator
    from fedmobillm.device_runtime.lm_personal import PersonalLM

    records, _ = read_lm_records(test_file)
    gen = Generator(bundle, threads=2)
    personal = PersonalLM(model)
    personal.check_compatible(gen.manifest)
    frozen = score_heldout(gen, records).to_dict()
    mine = score_heldout(gen, records, delta=personal.delta).to_dict()
    return {"frozen": frozen, "personal": mine}


def score_heldout(gen: Any, records: list[Any], delta: Any = None, batch: int = 4) -> Any:
    """``generate.Perplexity`` of lm records (``text``, ``prompt``) on ``gen`` (a
    ``generate.Generator``) over every target token once: each record in the windows a
    device uploads (``lm_samples``: the generator's tokens, at most max_seq_len per window,
    overlapping by one; a reply's tokens only). ``Generator.perplexity`` would cut a record
    to max_seq_len tokens and drop one whose prompt fills them (~5% of the friends test
    targets at 64 tokens), silently. ``delta``: the personal model's residual, or None."""
    from fedmobillm.device_runtime.generate import Perplexity, _score_batch
    from fedmobillm.device_runtime.lm_samples import lm_samples

    prep = lm_samples(records, gen.encode, gen.manifest.max_seq_len)
    rows = [(list(s.token_ids), s.first) for s in prep.samples]  # (ids (L,), first target)
    result = Perplexity(texts=prep.records - prep.skipped)
    for i in range(0, len(rows), max(1, batch)):
        _score_batch(gen, rows[i : i + batch], delta, result)
    return result


def upload_stats(state_dir: Path) -> dict[str, Any]:
    """What the device's run summaries say (both splits): bytes uploaded (on the wire: taps,
    token ids, loss masks, framing), tokens and next-token targets sent, wire bytes per token,
    forward time and peak memory."""
    sums = [x for x in (_read_json(state_dir / f"{s}-summary.json")
                        for s in ("train", "validation")) if x]  # fmt: skip
    up = sum(int(x.get("bytes_uploaded", 0)) for x in sums)
    tokens = sum(x.get("tokens") or x.get("samples", 0) * (x.get("tokens_per_sample") or 0)
                 for x in sums)  # fmt: skip
    return {
        "bytes_uploaded": up,
        "tokens_uploaded": round(tokens),
        "target_tokens": sum(int(x.get("target_tokens", 0)) for x in sums),
        "wire_bytes_per_token": up / tokens if tokens else None,
        "forward_ms_per_sample": _mean([x.get("forward_ms_per_sample", 0) for x in sums]),
        "peak_mb": max([x.get("peak_rss_mb", 0) for x in sums] or [0]),
    }


def per_backbone(
    rows: list[dict[str, Any]], archs: dict[str, str], trainer: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per backbone: the token-weighted held-out perplexity and top-1 of its devices, frozen
    and personal, their upload bytes per token, and the server's view (architecture stats)."""
    out = []
    for backbone in sorted({r["backbone"] for r in rows if "backbone" in r},
                           key=lambda b: int(b.rsplit("-b", 1)[1])):  # fmt: skip
        mine = [r for r in rows if r.get("backbone") == backbone and "frozen" in r]
        row: dict[str, Any] = {"backbone": backbone, "architecture": archs.get(backbone),
                               "devices": len(mine), "layers": mine[0]["layers"] if mine else None}  # fmt: skip
        for key in ("frozen", "personal"):
            nll = sum(r[key]["nll_per_token"] * r[key]["tokens"] for r in mine)
            tokens = sum(r[key]["tokens"] for r in mine)
            top1 = sum(r[key]["next_token_top1"] * r[key]["tokens"] for r in mine)
            row[f"{key}_perplexity"] = math.exp(nll / tokens) if tokens else None
            row[f"{key}_top1"] = top1 / tokens if tokens else None
            row["heldout_tokens"] = tokens
        server = (trainer.get("architectures") or {}).get(archs.get(backbone, ""), {})
        tps, bps = server.get("tokens_per_sample"), server.get("bytes_per_sample")
        row["bytes_per_token"] = bps / tps if tps and bps else None  # taps, as stored
        wire = [r["wire_bytes_per_token"] for r in mine if r.get("wire_bytes_per_token")]
        row["wire_bytes_per_token"] = _mean(wire) if wire else None
        row["tokens_per_sample"] = tps
        out.append(row)
    return out


def lm_progress_row(st: dict[str, Any], n_dev: int, n_done: int, t: float) -> dict[str, Any]:
    """One progress point from /v1/status: the latest validation perplexity per
    architecture (and their geometric mean)."""
    trainer = st.get("trainer") or {}
    per_arch: dict[str, float] = {}
    for h in reversed(trainer.get("history") or []):
        val = h.get("validation") or {}
        if val:
            per_arch = {a: float(v["perplexity"]) for a, v in val.items()
                        if isinstance(v, dict) and v.get("perplexity") is not None}  # fmt: skip
            break
    devices = st.get("devices", [])
    mean = (math.exp(sum(math.log(p) for p in per_arch.values()) / len(per_arch))
            if per_arch else None)  # fmt: skip
    return {
        "t": round(t, 1),
        "samples": sum(int(d.get("samples", {}).get("train", 0)) for d in devices),
        "uploaded": sum(int(n) for d in devices for n in d.get("samples", {}).values()),
        "step": int(trainer.get("step", 0)),
        "trainer_idle": bool(trainer.get("idle")),
        "loss": trainer.get("loss"),
        "val_perplexity": mean,
        "val_per_architecture": per_arch,
        "devices_running": n_dev - n_done,
        "devices_done": n_done,
    }


def run_lm_demo(cfg: LmDemoConfig) -> dict[str, Any]:
    """One run in ``cfg.out``: a new run each time (see ``fedmobillm.demo.run_fresh``)."""
    return run_fresh(cfg.out, cfg.debug, lambda: LmDemo(cfg), _stages)


def _stages(demo: LmDemo) -> dict[str, Any]:
    with Stage("data"):
        demo.prepare_data()
    with Stage("export"):
        bundles = demo.export_bundles()
    with demo.server() as url:
        with Stage("register"):
            demo.register(url, bundles)
        with Stage("devices + train"):
            running = demo.launch(url, bundles)
            demo.train(url, running)
        with Stage("evaluate"):
            rows = demo.evaluate(url, bundles)
    return demo.report(rows)


def _fmt_ppl(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 1e5 else f"{x:.2e}"
