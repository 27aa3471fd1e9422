"""The device role: register once, then forward local records through the frozen backbone
in batches, quantize the tapped pivot activations and upload them, exactly once. A token
bundle (``--pivot none``) uploads every real token's taps ``[N, K, T, d]`` with the
lengths (see ``protocol``); the summary reports the bytes per sample against the
T x K x d bound.

State lives in a folder (default ``cache_dir()/devices/<name>``): ``device.json`` (server,
device id, token, bundle digest, label names) and ``journal.jsonl`` (see ``journal``).
Torch-free on the ONNX path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.device_runtime import serde
from fedmobillm.device_runtime.backbone import FORWARD_BATCH, Backbone
from fedmobillm.device_runtime.dp_projection import load_projection
from fedmobillm.device_runtime.files import write_atomic
from fedmobillm.device_runtime.journal import Entry, Journal, records_hash, release_settings
from fedmobillm.device_runtime.lm_samples import LmPrepared, LmSample, lm_arrays, lm_samples
from fedmobillm.device_runtime.memory import peak_rss_mb
from fedmobillm.device_runtime.messages import (
    ROUTE_ANCHORS,
    ROUTE_DEVICES,
    ROUTE_STATUS,
    Ack,
    AnchorShare,
    PrivacyDeclaration,
    RegisterRequest,
    RegisterResponse,
    device_route,
)
from fedmobillm.device_runtime.messages import DeviceState as ServerDeviceState
from fedmobillm.device_runtime.privacy import (
    PrivacyBudgetExceeded,
    device_secret,
    effective_config,
    int8_saturation,
    privatize,
    sample_sigma,
    text_fingerprint,
)
from fedmobillm.device_runtime.protocol import (
    ENCODINGS,
    SPLITS,
    TASKS,
    bundle_digest,
    bytes_per_sample,
    load_verified_bundle,
)
from fedmobillm.device_runtime.uploader import (
    RetryPolicy,
    ServerRejected,
    ServerUnavailable,
    TlsConfig,
    Uploader,
    rejected,
    server_message,
)
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)

STATE_NAME = "device.json"
LM_ENCODING = "fp16"  # the lm task's default upload encoding


def default_state_dir(name: str) -> Path:
    return cache_dir() / "devices" / name


@dataclass
class DeviceState:
    """What registration returns, kept on the device (the token is a secret: mode 600)."""

    server: str
    name: str
    device_id: str
    token: str
    bundle_sha256: str
    architecture: str = ""
    label_names: list[str] = field(default_factory=list)
    # the privacy mechanism declared at registration (privacy.PrivacyConfig.declaration())
    privacy: dict[str, Any] | None = None
    # how the device verifies an https server (uploader.TlsConfig); None: system CAs
    ca_bundle: str | None = None
    pin_sha256: str | None = None
    task: str = "classify"  # protocol.TASKS: the federation's task, as the server answered

    def tls(self) -> TlsConfig:
        return TlsConfig(self.ca_bundle, self.pin_sha256)

    def save(self, state_dir: Path) -> Path:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / STATE_NAME
        write_atomic(path, json.dumps(asdict(self), indent=2), mode=0o600)
        return path

    @classmethod
    def load(cls, state_dir: Path) -> DeviceState:
        path = Path(state_dir) / STATE_NAME
        if not path.is_file():
            raise FedMobiLLMError(
                f"no registered device in {state_dir} ({STATE_NAME} is missing)",
                hint="register first: `fedmobillm device register --server URL "
                "--admin-token T --name NAME --bundle DIR`",
            )
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise FedMobiLLMError(f"{path} is damaged: {exc}", hint="register again") from exc


def registration_labels(
    server: str,
    admin_token: str,
    labels_csv: str | None,
    data: str | None,
    retry: RetryPolicy | None = None,
    tls: TlsConfig | None = None,
) -> list[str]:
    """The label names to register with: ``--labels``, else the data's. A local file whose
    labels are bare indices (0/1, no labels.json beside it) names no labels: its indices
    index the server's task labels, as ``device run`` reads the same file, so those are
    taken when the server has them (GET ROUTE_STATUS with the admin token)."""
    from fedmobillm.device_runtime.records import label_names_from

    names = label_names_from(labels_csv, data)
    if labels_csv or names != [str(i) for i in range(len(names))]:
        return names
    with Uploader(server, admin_token, retry or RetryPolicy(), tls=tls or TlsConfig()) as up:
        resp = up.request("GET", ROUTE_STATUS)
    if resp.status_code in (401, 403):
        raise admin_refused(resp, server, "reading the task's label names")
    task = resp.json().get("label_names") if resp.status_code == 200 else None
    if isinstance(task, list) and len(task) >= len(names):
        log.info("%s labels are indices: registering with the server's labels %s", data, task)
        return [str(n) for n in task]
    return names


def admin_refused(resp: Any, server: str, what: str) -> ServerRejected:
    """A 401/403 answer to a request sent with the admin token."""
    return ServerRejected(
        f"server {server} refused the admin token (HTTP {resp.status_code}) {what}: "
        f"{server_message(resp)}",
        resp.status_code,
        hint="pass --admin-token the token the server was started with "
        "(FEDMOBILLM_ADMIN_TOKEN or admin_token in its config; `serve --dev` prints one)",
    )


def register(
    server: str,
    admin_token: str,
    name: str,
    bundle_dir: Path,
    label_names: Sequence[str],
    state_dir: Path | None = None,
    retry: RetryPolicy | None = None,
    privacy: Any = None,
    tls: TlsConfig | None = None,
    task: str = "classify",
) -> tuple[DeviceState, Path]:
    """POST /v1/devices; saves and returns the device state and where it was saved.
    ``privacy`` (a privacy.PrivacyConfig) is declared to the server and kept in the state:
    ``device run`` applies it. ``task`` "lm" registers a decoder token bundle with no
    label names; a server that answers with another task is an error."""
    if not name or "/" in name or name.startswith("."):
        raise FedMobiLLMError(f"device name {name!r} is not valid: use letters, digits, -_.")
    check_task_labels(task, label_names)
    if task == "lm" and privacy is not None:
        raise lm_privacy_refused()
    state_dir = Path(state_dir) if state_dir else default_state_dir(name)
    if (state_dir / STATE_NAME).is_file():
        old = DeviceState.load(state_dir)
        raise FedMobiLLMError(
            f"{state_dir} already holds device {old.name!r} ({old.device_id}) on {old.server}",
            hint="use that device with `fedmobillm device run --state DIR`, or pick "
            "another --state / --name",
        )
    manifest = load_verified_bundle(Path(bundle_dir))
    if task == "lm":
        check_lm_bundle(manifest, Path(bundle_dir))
    declared = (
        privacy.resolved(manifest, load_projection(Path(bundle_dir), manifest)).declaration()
        if privacy is not None
        else None
    )
    declaration = PrivacyDeclaration.from_dict(declared) if declared is not None else None
    body = RegisterRequest(
        name, manifest.to_dict(), list(label_names), privacy=declaration, task=task
    )
    tls = tls or TlsConfig()
    with Uploader(server, admin_token, retry or RetryPolicy(), tls=tls) as up:
        resp = up.request("POST", ROUTE_DEVICES, json=body.to_dict())
    if resp.status_code in (401, 403):
        raise admin_refused(resp, server, f"when registering device {name!r}")
    if resp.status_code != 201:
        raise rejected(resp, f"registration of device {name!r}")
    reg = RegisterResponse.from_dict(resp.json())
    if reg.task != task:
        raise FedMobiLLMError(
            f"server {server} registered device {name!r} for task {reg.task!r}, not "
            f"{task!r}: its federation runs task {reg.task!r} (device id {reg.device_id})",
            hint=f"register with --task {reg.task} for that server, or use a server started "
            f"with --task {task} (`fedmobillm serve --task {task}`); this device was not saved",
        )
    state = DeviceState(
        server=server.rstrip("/"),
        name=name,
        device_id=reg.device_id,
        token=reg.token,
        bundle_sha256=reg.bundle_sha256 or bundle_digest(manifest),
        architecture=reg.architecture or manifest.architecture,
        label_names=list(label_names),
        privacy=declared,
        ca_bundle=str(Path(tls.ca_bundle).resolve()) if tls.ca_bundle else None,
        pin_sha256=tls.pin_sha256,
        task=reg.task,
    )
    return state, state.save(state_dir)


def check_task_labels(task: str, label_names: Sequence[str]) -> None:
    """A task and the label names registered with it: classify needs them, lm has none."""
    if task not in TASKS:
        raise FedMobiLLMError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if task == "classify" and not label_names:
        raise FedMobiLLMError(
            "the task's label names are needed to register",
            hint="pass --labels a,b,... or --data FILE_OR_NAME to read them from the data",
        )
    if task == "lm" and label_names:
        raise FedMobiLLMError(
            f"task lm has no labels (its targets are the text's tokens), got {list(label_names)}",
            hint="drop --labels / --data when registering with --task lm",
        )


def check_lm_bundle(manifest: Any, bundle_dir: Path) -> None:
    """The lm task runs a decoder token bundle (pivot none): the next-token targets need
    every token's taps, and the server's frozen head is a decoder's."""
    if manifest.kind != "decoder" or not manifest.tokens:
        what = f"a{'n' if manifest.kind == 'encoder' else ''} {manifest.kind} " + (
            "token bundle" if manifest.tokens else f"pivot bundle (pivot {manifest.pivot})"
        )
        raise FedMobiLLMError(
            f"task lm needs a decoder token bundle, but {bundle_dir} is {what}",
            hint=f"export one with `fedmobillm export {manifest.source_model} --pivot none "
            "--generate --format onnx --out DIR` (a decoder such as smollm2-135m)",
        )


def lm_privacy_refused() -> FedMobiLLMError:
    """--epsilon with task lm: refused, never silently weakened."""
    return FedMobiLLMError(
        "local differential privacy (--epsilon) is refused for task lm: an lm upload carries "
        "the text's token ids as they are (they are the next-token targets), so the server "
        "reads the text itself and noise on the taps cannot protect it: no epsilon can be "
        "claimed for the text",
        hint="run lm without --epsilon (the summary says the text is sent); federate only "
        "text you are willing to send to the server, over TLS (docs/device.md)",
    )


@dataclass
class RunConfig:
    backend: str = "auto"
    threads: int | None = None
    batch_size: int = 32  # samples per upload
    # samples per forward pass, taken in order of token length within each upload batch:
    # bounds peak memory and padded compute
    forward_batch: int = FORWARD_BATCH
    # int8 | fp16; None: the task's default (classify int8, lm fp16: the server reads the
    # frozen head's hidden state from the deepest tap, int8 costs perplexity, docs/lm.md)
    encoding: str | None = None
    split: str = "train"
    bandwidth_mbps: float | None = None
    server: str | None = None  # overrides the registered server URL
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress_every_s: float = 2.0
    slowdown: float = 1.0  # simulate a slower device: each forward takes this many times longer
    # privacy.PrivacyConfig: clip + Gaussian noise + accounting; None = as registered
    privacy: Any = None
    tls: TlsConfig | None = None  # overrides the registered --ca-bundle / --pin-sha256
    # wait uniform(0, start_jitter_s) before the first upload, so that a fleet started at
    # once does not reach the server at once (0 = start at once)
    start_jitter_s: float = 0.0
    task: str = "classify"  # protocol.TASKS: must be the task the device registered for

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise FedMobiLLMError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.encoding is None:
            self.encoding = LM_ENCODING if self.task == "lm" else "int8"
        if self.start_jitter_s < 0:
            raise FedMobiLLMError("start_jitter_s must be >= 0")
        if self.batch_size < 1 or self.forward_batch < 1:
            raise FedMobiLLMError("--batch-size and --forward-batch must be at least 1")
        if self.slowdown < 1.0:
            raise FedMobiLLMError("--slowdown must be at least 1 (1 = this machine's speed)")
        if self.encoding not in ENCODINGS:
            raise FedMobiLLMError(f"--encoding must be one of {', '.join(ENCODINGS)}")
        if self.split not in SPLITS:
            raise FedMobiLLMError(f"--split must be one of {', '.join(SPLITS)}")


@dataclass
class RunSummary:
    split: str
    samples: int  # uploaded by this run
    already_acked: int  # skipped: acknowledged by an earlier run
    batches: int
    duplicates: int  # batches the server had already acknowledged (a resend)
    forward_ms_per_sample: float
    peak_rss_mb: float
    bytes_uploaded: int  # request bodies, measured
    bytes_per_sample: float
    upload_s: float  # with --bandwidth-mbps: the simulated link's time
    upload_measured_s: float  # loopback/real network time, no throttling
    bandwidth_mbps: float | None
    retries: int
    wall_s: float
    server_samples: dict[str, int] = field(default_factory=dict)
    inputs: str = "pivot"  # "pivot": one vector per tap; "tokens": every real token
    # activations of one sample as the server stores them (K * d * b, tokens: K * L * d * b,
    # padding not counted), mean over this run's samples
    activation_bytes_per_sample: float = 0.0
    tokens_per_sample: float | None = None  # tokens: mean real tokens L per sample
    # tokens: K * max_seq_len * d * b, the T x K x d bound of one sample at this encoding
    token_bound_bytes: int | None = None
    num_taps: int = 0
    hidden_size: int = 0
    encoding: str = "int8"
    privacy: dict[str, Any] = field(default_factory=dict)  # DeviceClient.privacy_status()
    task: str = "classify"
    # task lm: records -> samples (lm_samples.LmPrepared.to_dict(): windowed, skipped ...)
    lm: dict[str, Any] = field(default_factory=dict)
    target_tokens: int = 0  # task lm: next-token targets uploaded by this run
    tokens: int = 0  # token bundles: real tokens uploaded by this run (padding not counted)

    @property
    def tap_bytes_per_token(self) -> int:
        """K x d x b: one token's taps as stored (the T x K x d bound per token)."""
        return self.num_taps * self.hidden_size * (1 if self.encoding == "int8" else 2)

    @property
    def wire_bytes_per_token(self) -> float:
        """Request bytes per real token uploaded, measured (padding, ids, loss mask and
        the payload's header included; 0 when nothing was uploaded)."""
        return self.bytes_uploaded / self.tokens if self.tokens else 0.0

    def lm_lines(self) -> list[str]:
        """Task lm: what became of the records, bytes per token, what the server sees."""
        if self.task != "lm":
            return []
        lm = self.lm
        wire = (
            f"{self.wire_bytes_per_token:,.0f} B on the wire (measured: padding, token ids, "
            "loss mask, header)"
            if self.target_tokens
            else "nothing uploaded by this run"
        )
        return [
            f"lm records:         {lm.get('records', 0)} -> {lm.get('samples', 0)} samples "
            f"({lm.get('windowed_records', 0)} split into windows of <= "
            f"{lm.get('max_seq_len', 0)} tokens, 0 truncated, {lm.get('skipped_records', 0)} "
            f"skipped: one token, nothing to predict)",
            f"targets uploaded:   {self.target_tokens:,} next-token targets",
            f"bytes per token:    {self.tap_bytes_per_token:,} B of taps (K x d x b, "
            f"{self.encoding}; the T x K x d bound per token), {wire}",
            "privacy:            none for the text: an lm upload carries its token ids as "
            "they are (the targets), so the server reads the text",
        ]

    def to_json(self) -> str:
        out = asdict(self)
        if self.inputs == "tokens":
            out["tap_bytes_per_token"] = self.tap_bytes_per_token
            out["wire_bytes_per_token"] = self.wire_bytes_per_token
        return json.dumps(out, indent=2)

    def activation_line(self) -> str:
        """Bytes per sample, and for tokens the mean L x K x d x b against the bound."""
        b = 1 if self.encoding == "int8" else 2
        size = f"K={self.num_taps} x d={self.hidden_size} x {b} B ({self.encoding})"
        if self.inputs != "tokens":
            return f"activations:        {self.activation_bytes_per_sample:.0f} B/sample = {size}"
        bound = self.token_bound_bytes or 0
        share = 100 * self.activation_bytes_per_sample / bound if bound else 0.0
        return (
            f"activations:        {self.activation_bytes_per_sample:,.0f} B/sample = "
            f"{self.tokens_per_sample or 0:.1f} tokens x {size}; {share:.1f}% of the "
            f"T x K x d bound {bound:,} B (T = max_seq_len)"
        )

    def lines(self) -> list[str]:
        link = f" at {self.bandwidth_mbps:g} Mbit/s (simulated)" if self.bandwidth_mbps else ""
        return [
            f"samples uploaded:   {self.samples} ({self.split}; {self.already_acked} "
            f"already acknowledged earlier, {self.duplicates} resent batches deduplicated)",
            f"forward:            {self.forward_ms_per_sample:.2f} ms/sample",
            f"peak memory (RSS):  {self.peak_rss_mb:.0f} MB",
            f"bytes uploaded:     {self.bytes_uploaded:,} ({self.bytes_per_sample:.0f} B/sample)",
            self.activation_line(),
            f"upload time:        {self.upload_s:.2f} s{link} (measured "
            f"{self.upload_measured_s:.2f} s, {self.retries} retries)",
            f"server now holds:   {self.server_samples}",
            f"wall time:          {self.wall_s:.1f} s",
            *self.lm_lines(),
        ] + ([f"privacy:            {self.privacy['text']}"] if self.privacy else [])


def idempotency_key(device_id: str, digest: str, split: str, ids: Sequence[int]) -> str:
    """Stable per batch: same device, bundle, split and samples -> same key. A batch of
    consecutive ids is named by its range; any other (a token bundle batches by length)
    also by a digest of its ids, so two different id sets never share a key."""
    key = f"{device_id}:{digest[:16]}:{split}:{ids[0]}-{ids[-1]}:{len(ids)}"
    if list(ids) != list(range(ids[0], ids[0] + len(ids))):
        ids_digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:12]
        key += f":{ids_digest}"
    return key


class DeviceClient:
    """One registered device running one bundle over its local records."""

    def __init__(
        self,
        state_dir: Path,
        bundle_dir: Path,
        config: RunConfig | None = None,
        backbone: Backbone | None = None,
    ) -> None:
        self.config = config or RunConfig()
        # int8 | fp16 (RunConfig.__post_init__ set the task's default)
        self.encoding: str = str(self.config.encoding)
        self.state_dir = Path(state_dir)
        self.state = DeviceState.load(self.state_dir)
        self.backbone = backbone or Backbone(bundle_dir, self.config.backend, self.config.threads)
        self.digest = bundle_digest(self.backbone.manifest)
        if self.digest != self.state.bundle_sha256:
            raise FedMobiLLMError(
                f"device {self.state.name!r} was registered with bundle "
                f"{self.state.bundle_sha256[:12]}, but {bundle_dir} is bundle {self.digest[:12]}",
                hint="run with the bundle the device registered, or register a new device "
                "for this bundle",
            )
        self.journal = Journal(self.state_dir)
        self.scales = np.asarray(self.backbone.manifest.activation_scales, np.float32)  # (K,)
        self.privacy = effective_config(self.config.privacy, self.state.privacy)
        # the bundle's public dp projection (dp_projection.py): with a privacy mechanism,
        # clip + noise in its subspace; without, the noise-free view, so that every upload
        # of the bundle (and the personal model's input, personal.backbone_taps) lies in it.
        # Not for task lm (no privacy mechanism there; the lm personal model reads raw taps)
        self.projection: Any = None
        if self.config.task != "lm":
            self.projection = load_projection(self.backbone.bundle_dir, self.backbone.manifest)
        if self.privacy is not None:  # --clip auto: from the int8 scales (and the spread)
            self.privacy = self.privacy.resolved(self.backbone.manifest, self.projection)
        self._secret = device_secret(self.state_dir) if self.privacy is not None else b""
        self.ledger: Any = None  # privacy.PrivacyLedger, read from the journal when needed
        self.task = self.config.task
        self._check_task()
        self.lm: LmPrepared | None = None  # task lm: the run's samples (prepare_lm)

    def _check_task(self) -> None:
        """The run's task is the one the device registered for; lm: a decoder token
        bundle, no privacy mechanism (the ids are the text), no anchor split."""
        if self.task != self.state.task:
            raise FedMobiLLMError(
                f"device {self.state.name!r} is registered for task {self.state.task!r}, "
                f"but this run asks for task {self.task!r}",
                hint=f"run it with --task {self.state.task}, or register a new device "
                f"(another --name/--state) with --task {self.task}",
            )
        if self.task != "lm":
            return
        check_lm_bundle(self.backbone.manifest, self.backbone.bundle_dir)
        if self.privacy is not None:
            raise lm_privacy_refused()
        if self.config.split == "anchor":
            raise FedMobiLLMError(
                "--split anchor is for classify federations: task lm has no anchor set",
                hint="upload train or validation text with --split train|validation",
            )

    def prepare_lm(self, records: Sequence[Any]) -> list[LmSample]:
        """Task lm: records (``text``, ``prompt`` None or str, as ``fedmobillm.data.lm``
        reads them) -> the samples to upload, windows of at most max_seq_len tokens (see
        ``lm_samples``); what happened to the records is kept in ``self.lm``."""
        m = self.backbone.manifest
        self.lm = lm_samples(records, self.backbone.encode_ids, m.max_seq_len)
        log.info("task lm: %s", self.lm.line())
        return self.lm.samples

    # -- planning -------------------------------------------------------------------------

    def plan(self, records: Sequence[Any]) -> tuple[list[list[int]], int]:
        """Batches of sample ids still to upload (the journal's pending batch first), and
        how many samples earlier runs already had acknowledged."""
        split, digest = self.config.split, self.digest
        done: set[int] = set()
        for e in self.journal.acked(split, digest):
            self._check_same_data(e, records)
            done.update(e.ids)
        batches = []
        for pending in self.journal.unacked_pendings(split, digest):
            # sent or about to be when a run stopped: re-sent under the same key, never
            # re-batched under another (the server may hold it already)
            done.update(pending.ids)
            if all(i < len(records) for i in pending.ids):
                self._check_same_data(pending, records)
                batches.append(list(pending.ids))
        # None: not this device's (an anchor set holds every device's share)
        todo = [i for i in range(len(records)) if i not in done and records[i] is not None]
        if self.backbone.tokens:  # a token batch is padded to its longest text on the wire
            todo = self._by_length(records, todo)
        b = self.config.batch_size
        batches += [todo[s : s + b] for s in range(0, len(todo), b)]
        already = sum(len(e.ids) for e in self.journal.acked(split, digest))
        return batches, already

    def _by_length(self, records: Sequence[Any], ids: list[int]) -> list[int]:
        """``ids`` in order of token length (stable: ties keep id order), so each upload
        batch of a token bundle holds texts of similar length and its [N, K, T, d] payload
        carries little padding. Deterministic for the same records: a resumed run plans
        the same batches; keys stay unique (a batch's ids are never in another batch)."""
        lengths = np.empty(len(ids), dtype=np.int64)  # (n,)
        if self.task == "lm":  # samples are token ids already
            lengths[:] = [len(records[i].token_ids) for i in ids]
            return [ids[int(j)] for j in np.argsort(lengths, kind="stable")]
        for s in range(0, len(ids), 1024):
            chunk = ids[s : s + 1024]
            _, mask = self.backbone.encode([records[i].text for i in chunk])  # (c, S)
            lengths[s : s + len(chunk)] = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")  # (n,)
        return [ids[int(j)] for j in order]

    def _check_same_data(self, e: Entry, records: Sequence[Any]) -> None:
        if any(i >= len(records) for i in e.ids):
            return  # a shorter --limit this time: those samples are simply not in this run
        if records_hash([(i, records[i].text, records[i].label) for i in e.ids]) != e.data:
            raise FedMobiLLMError(
                f"the records with ids {e.ids[0]}..{e.ids[-1]} differ from what this device "
                f"already uploaded as split {e.split!r} (batch {e.key})",
                hint="a device's data may grow (append rows), not change; use a new device "
                "(another --name/--state) for different data",
            )

    # -- running --------------------------------------------------------------------------

    def run(self, records: Sequence[Any]) -> RunSummary:
        """Forward, quantize and upload every record not yet acknowledged. Task lm:
        ``records`` are lm records (text, prompt), made into samples by ``prepare_lm``
        (LmSample lists are taken as they are)."""
        if self.task == "lm" and not all(isinstance(r, LmSample) for r in records):
            records = self.prepare_lm(records)
        self._check_labels(records)
        batches, already = self.plan(records)
        total = sum(len(b) for b in batches)
        log.info(
            "device %s: %d %s samples to upload in %d batches (%d acknowledged earlier), "
            "bundle %s, backend %s, %s",
            self.state.name,
            total,
            self.config.split,
            len(batches),
            already,
            self.backbone.architecture,
            self.backbone.backend,
            self.encoding,
        )
        server = self.config.server or self.state.server
        tracker = _Progress(total, self.config.progress_every_s)
        with Uploader(
            server,
            self.state.token,
            self.config.retry,
            self.config.bandwidth_mbps,
            tls=self.config.tls or self.state.tls(),
        ) as up:
            self.check_token(up)
            if batches and self.config.start_jitter_s > 0:
                wait = random.uniform(0.0, self.config.start_jitter_s)
                log.info("device %s: start jitter, first upload in %.2f s", self.state.name, wait)
                time.sleep(wait)
            for ids in batches:
                self._one_batch(up, records, ids, tracker)
            stats = up.stats
            tracker.server_samples = self.server_counts(up) or tracker.server_samples
        m = self.backbone.manifest
        return RunSummary(
            split=self.config.split,
            samples=tracker.done,
            already_acked=already,
            batches=len(batches),
            duplicates=tracker.duplicates,
            forward_ms_per_sample=1000 * tracker.forward_s / max(1, tracker.done),
            peak_rss_mb=peak_rss_mb(),
            bytes_uploaded=stats.bytes_sent,
            bytes_per_sample=stats.bytes_sent / max(1, tracker.done),
            upload_s=stats.seconds,
            upload_measured_s=stats.measured_seconds,
            bandwidth_mbps=self.config.bandwidth_mbps,
            retries=stats.retries,
            wall_s=time.perf_counter() - tracker.start,
            server_samples=tracker.server_samples,
            inputs="tokens" if m.tokens else "pivot",
            activation_bytes_per_sample=tracker.activation_bytes / max(1, tracker.done),
            tokens_per_sample=tracker.tokens / max(1, tracker.done) if m.tokens else None,
            token_bound_bytes=(
                bytes_per_sample(m.num_taps, m.hidden_size, self.encoding, m.max_seq_len)
                if m.tokens
                else None
            ),
            num_taps=m.num_taps,
            hidden_size=m.hidden_size,
            encoding=self.encoding,
            privacy=self.privacy_status(),
            task=self.task,
            lm=self.lm.to_dict() if self.task == "lm" and self.lm is not None else {},
            target_tokens=tracker.targets,
            tokens=tracker.tokens,
        )

    def anchor_records(self) -> list[Any]:
        """This device's share of the server's anchor set (GET /v1/anchors) as records
        indexed by anchor id (label -1; None where another device's share lies), for a run
        with split ``anchor``."""
        from fedmobillm.device_runtime.records import Record

        server = self.config.server or self.state.server
        tls = self.config.tls or self.state.tls()
        with Uploader(server, self.state.token, self.config.retry, tls=tls) as up:
            resp = up.request("GET", ROUTE_ANCHORS)
        if resp.status_code != 200:
            raise rejected(resp, "fetching the anchor set")
        share = AnchorShare.from_dict(resp.json())
        records: list[Any] = [None] * share.total
        for i, text in zip(share.ids, share.texts, strict=True):
            records[i] = Record(text, -1)
        log.info(
            "anchor set %s: %d of %d texts are this device's share",
            share.anchor_set[:12],
            len(share.ids),
            share.total,
        )
        return records

    def check_token(self, up: Uploader) -> None:
        """GET this device's state before any forward pass or upload: a token the server
        no longer knows (revoked, or a server started on another data dir) is an error
        here, even when the journal says everything was acknowledged."""
        try:
            resp = up.request("GET", device_route(self.state.device_id))
        except ServerUnavailable as exc:
            raise ServerUnavailable(
                f"{exc.message}; {self.last_acked_text()}",
                hint="run the same command again when the server is back: it resumes there",
            ) from exc
        if resp.status_code == 200:
            return
        if resp.status_code in (401, 403, 404):
            raise ServerRejected(
                f"server {up.server} does not accept device {self.state.name!r} "
                f"({self.state.device_id}) (HTTP {resp.status_code}): {server_message(resp)}",
                resp.status_code,
                hint="its token is unknown or revoked there: register the device again "
                f"(`fedmobillm device register` with a new --name and --state; "
                f"{self.state_dir} keeps the old registration)",
            )
        raise rejected(resp, f"check of device {self.state.device_id}")

    def server_counts(self, up: Uploader) -> dict[str, int]:
        """The server's sample counts for this device (empty if it cannot say)."""
        try:
            resp = up.request("GET", device_route(self.state.device_id))
            if resp.status_code != 200:
                return {}
            return ServerDeviceState.from_dict(resp.json()).samples.to_dict()
        except (FedMobiLLMError, ValueError):
            return {}

    def _check_labels(self, records: Sequence[Any]) -> None:
        n = len(self.state.label_names)
        bad = [
            i
            for i, r in enumerate(records)
            if r is not None and not (-1 <= int(r.label) < max(n, 1))
        ]
        if n and bad:
            raise FedMobiLLMError(
                f"record {bad[0]} has label {records[bad[0]].label}, outside the task's "
                f"{n} labels {self.state.label_names} ({len(bad)} such records)",
                hint="fix the data's labels; -1 marks an unlabelled record",
            )

    def encode(self, records: Sequence[Any], ids: list[int]) -> tuple[bytes, Entry, float]:
        """Forward and encode one batch: (payload, journal entry, forward seconds)."""
        enc = self.encode_batch(records, ids)
        return enc.body, enc.entry, enc.forward_s

    def _forward(
        self, texts: list[str], samples: list[LmSample] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 taps (N, K, d) and None; a token bundle: (N, K, T, d) zero-padded and
        the real token count of each text, int64 (N,); lm ``samples``: their token ids
        forwarded as they are."""
        if samples is not None:
            return self.backbone.forward_token_ids(
                [s.token_ids for s in samples], self.config.forward_batch
            )
        if self.backbone.tokens:
            return self.backbone.forward_tokens(texts, self.config.forward_batch)
        return self.backbone(texts, self.config.forward_batch), None

    def encode_batch(self, records: Sequence[Any], ids: list[int]) -> Encoded:
        """Forward, quantize (int8 per tap with the bundle's scales: token padding stays
        exactly 0) and encode one batch, with what it costs."""
        texts = [records[i].text for i in ids]
        labels = np.array([int(records[i].label) for i in ids], dtype=np.int64)  # (N,)
        samples = [records[i] for i in ids] if self.task == "lm" else None
        start = time.perf_counter()
        taps, lengths = self._forward(texts, samples)  # (N, K, d) | (N, K, T, d) float32; (N,)
        forward_s = time.perf_counter() - start
        if self.config.slowdown > 1.0:  # a simulated slower phone
            time.sleep((self.config.slowdown - 1.0) * forward_s)
            forward_s *= self.config.slowdown
        if not np.isfinite(taps).all():
            raise FedMobiLLMError(
                f"the backbone produced NaN/inf activations for samples {ids[0]}..{ids[-1]}"
            )
        if self.privacy is not None:  # clip + noise before quantisation
            taps, labels = self._privatize(taps, labels, ids, lengths)
        elif self.projection is not None:  # the bundle's feature map, no noise
            mask = None if lengths is None else np.arange(taps.shape[2]) < lengths[:, None]
            taps = self.projection.view(taps, mask)
        if self.encoding == "int8":
            acts, scales = serde.quantize_int8(taps, self.scales), self.scales  # int8
        else:
            acts, scales = taps.astype(np.float16), None  # fp16, same shape as taps
        key = idempotency_key(self.state.device_id, self.digest, self.config.split, ids)
        batch = serde.Batch(
            device_id=self.state.device_id,
            bundle_sha256=self.digest,
            idempotency_key=key,
            split=self.config.split,
            encoding=self.encoding,
            activations=acts,
            labels=labels,
            sample_ids=np.asarray(ids, dtype=np.int64),
            scales=scales,
            lengths=lengths,
        )
        if samples is not None:  # lm: the ids forwarded and the targets (N, T) each
            batch.token_ids, batch.loss_mask, _ = lm_arrays(samples)
        data = records_hash([(i, records[i].text, records[i].label) for i in ids])
        entry = Entry("pending", key, self.config.split, self.digest, list(ids), data)
        tokens = int(lengths.sum()) if lengths is not None else 0
        targets = int(batch.loss_mask.sum()) if batch.loss_mask is not None else 0
        return Encoded(
            serde.encode_batch(batch),
            entry,
            forward_s,
            int(batch.bytes_per_sample().sum()),
            tokens,
            targets,
        )

    def _one_batch(
        self, up: Uploader, records: Sequence[Any], ids: list[int], tracker: _Progress
    ) -> None:
        release = self._spend(records, ids)  # raises past the privacy budget
        enc = self.encode_batch(records, ids)
        body, entry, forward_s = enc.body, enc.entry, enc.forward_s
        if release is not None:
            self.journal.release(entry, release)
        self.journal.pending(entry)
        try:
            ack = Ack.from_dict(up.post_batch(body))
        except ServerUnavailable as exc:
            raise ServerUnavailable(
                f"{exc.message}; {self.last_acked_text()}",
                hint="run the same command again when the server is back: it resumes there",
            ) from exc
        self.journal.ack(
            entry,
            {
                "batch_id": ack.batch_id,
                "bytes": len(body),
                "duplicate": ack.duplicate,
            },
        )
        tracker.batch_done(len(ids), forward_s, len(body), ack)
        tracker.activation_bytes += enc.activation_bytes
        tracker.tokens += enc.tokens
        tracker.targets += enc.targets

    # -- privacy (privacy.py) ------------------------------------------------------------

    def _privatize(
        self, taps: np.ndarray, labels: np.ndarray, ids: list[int], lengths: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Clip + noise the taps (N, K, d) / (N, K, T, d), randomised response on labels."""
        key = idempotency_key(self.state.device_id, self.digest, self.config.split, ids)
        taps, labels = privatize(
            self.privacy, self._secret, key, taps, labels, len(self.state.label_names), lengths,
            self.projection,
        )  # fmt: skip
        if self.encoding == "int8":
            frac = int8_saturation(taps, self.scales)
            if frac > 0.01:  # saturating is still private (post-processing) but loses signal
                std = float(sample_sigma(self.privacy.z, taps.shape[1])[0])
                log.warning(
                    "%.1f%% of the noisy values saturate the int8 range (clip %g, noise std "
                    "%.3g x clip): lower --clip or upload fp16",
                    100 * frac, self.privacy.clip, std,
                )  # fmt: skip
        return taps, labels

    def privacy_status(self) -> dict[str, Any]:
        """The mechanism and the journal's spending (empty without a mechanism, unless the
        bundle's dp projection shapes the uploads)."""
        if self.privacy is None:
            if self.projection is None:
                return {}
            p = self.projection
            return {
                "projection_rank": p.rank,
                "text": f"no noise (--epsilon not set); uploads projected onto the bundle's "
                f"public {p.rank}-of-{p.hidden} dims per tap (its dp projection)",
            }
        ledger = self.ledger or self.journal.ledger(self.privacy.delta)
        worst = max((ledger.text_epsilon(fp) for fp in ledger.per_text), default=0.0)
        out = {
            **self.privacy.declaration(),
            "budget": self.privacy.text_budget,
            "texts": len(ledger.per_text),
            "max_text_epsilon": worst,
            "device_epsilon": ledger.device_epsilon(),
        }
        label = (
            f", labels by randomised response at epsilon {self.privacy.label_epsilon:g}"
            if self.privacy.label_epsilon is not None
            else ", labels as they are"
        )
        proj = self.projection
        out["projection_rank"] = None if proj is None else proj.rank
        where = (
            ""
            if proj is None
            else f"projected onto the bundle's public {proj.rank}-of-{proj.hidden} dims per tap, "
        )
        out["text"] = (
            f"{where}clip {self.privacy.clip:g} + Gaussian noise, epsilon {self.privacy.epsilon:g} "
            f"per text at delta {self.privacy.delta:g}{label}; {len(ledger.per_text)} texts "
            f"released, the most-spent at epsilon {worst:.3g} of budget "
            f"{self.privacy.text_budget:g}; all of them as one secret: epsilon "
            f"{out['device_epsilon']:.3g}"
        )
        return out

    def _spend(self, records: Sequence[Any], ids: list[int]) -> dict[str, Any] | None:
        """Check and charge this batch against the privacy budget (anchor texts are public:
        not charged). Returns the journal's release info, or None without a mechanism.
        Past the budget: a ``refused`` journal line and PrivacyBudgetExceeded."""
        key = idempotency_key(self.state.device_id, self.digest, self.config.split, ids)
        if self.privacy is None:
            if any(e.key == key for e in self.journal.releases()):  # released with noise
                self.journal.ledger(1e-5).check_resend(key, None)
            return None
        if self.ledger is None:
            self.ledger = self.journal.ledger(self.privacy.delta)
        settings = release_settings(
            {
                "z": self.privacy.z,
                "clip": self.privacy.clip,
                "label_epsilon": self.privacy.label_epsilon,
            }
        )
        self.ledger.check_resend(key, settings)
        if self.config.split == "anchor":
            return None
        fps = [text_fingerprint(self._secret, records[i].text) for i in ids]
        try:
            eps = self.ledger.check(self.privacy, key, fps)
        except PrivacyBudgetExceeded as exc:
            data = records_hash([(i, records[i].text, records[i].label) for i in ids])
            entry = Entry("refused", key, self.config.split, self.digest, list(ids), data)
            self.journal.refused(entry, exc.message)
            raise
        z = self.privacy.z
        self.ledger.add(key, z, fps, settings)
        return {
            "z": z,
            "delta": self.privacy.delta,
            "clip": self.privacy.clip,
            "label_epsilon": self.privacy.label_epsilon,
            "epsilon": eps,
            "device_epsilon": self.ledger.device_epsilon(),
            "fingerprints": fps,
        }

    def last_acked_text(self) -> str:
        last = self.journal.last_ack(self.config.split)
        if last is None:
            return f"no {self.config.split} batch of this device was acknowledged yet"
        n = sum(len(e.ids) for e in self.journal.acked(self.config.split, self.digest))
        return (
            f"last acknowledged batch: {last.key} (samples {last.ids[0]}..{last.ids[-1]}; "
            f"{n} {self.config.split} samples acknowledged in all)"
        )


@dataclass
class Encoded:
    """One encoded batch: the payload, its journal entry, the forward seconds, the
    activation bytes of its samples as stored (padding not counted) and its real tokens
    (token bundles; 0 for pivot)."""

    body: bytes
    entry: Entry
    forward_s: float
    activation_bytes: int
    tokens: int
    targets: int = 0  # lm: next-token targets (loss mask ones)


@dataclass
class _Progress:
    total: int
    every_s: float
    done: int = 0
    duplicates: int = 0
    forward_s: float = 0.0
    bytes: int = 0
    activation_bytes: int = 0  # K * d * b per sample, or K * L * d * b (tokens)
    tokens: int = 0  # real tokens uploaded (token bundles)
    targets: int = 0  # lm: next-token targets uploaded
    server_samples: dict[str, int] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    _last_log: float = 0.0

    def batch_done(self, n: int, forward_s: float, nbytes: int, ack: Ack) -> None:
        self.done += n
        self.forward_s += forward_s
        self.bytes += nbytes
        self.duplicates += int(ack.duplicate)
        if ack.skipped:
            log.warning("server skipped %s samples it already held (same ids)", ack.skipped)
        self.server_samples = ack.device_samples.to_dict()
        now = time.perf_counter()
        if now - self._last_log >= self.every_s or self.done == self.total:
            self._last_log = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info(
                "%d/%d samples (%.0f%%), %.1f samples/s, %s sent",
                self.done,
                self.total,
                100 * self.done / max(1, self.total),
                rate,
                _human(self.bytes),
            )


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
