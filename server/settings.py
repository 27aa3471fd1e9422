"""Server settings: environment (``FEDMOBILLM_*``), an optional JSON/TOML config file, and
command-line overrides, in increasing priority. Built by the entry point, never at import."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.side_config import SideConfig

# Values that are never accepted as an admin token outside --dev.
DEFAULT_TOKENS = {"", "changeme", "change-me", "admin", "secret", "token", "password", "dev"}
MIN_TOKEN_CHARS = 16
# An admin token must take an attacker at least 10^15 guesses (about 50 bits) by zxcvbn's
# estimate, which sees through repeats ("aaaa..."), sequences, keyboard walks and dictionary
# words ("changemechangeme"). secrets.token_urlsafe(32) scores about 10^43.
MIN_TOKEN_GUESSES_LOG10 = 15.0

# The side network's settings of earlier versions, flat (env FEDMOBILLM_LEARNING_RATE, config
# file learning_rate = ..., overrides): still accepted, as side.<field>
FLAT_SIDE_FIELDS = {
    "side_width": "width",
    "side_blocks": "blocks",
    "side_block": "block",
    "learning_rate": "lr",
    "anchor_kl": "anchor_kl",
    "anchor_feature": "anchor_feature",
    "anchor_batch": "anchor_batch",
}


class _FlatSideEnv(PydanticBaseSettingsSource):
    """FEDMOBILLM_<flat name> environment variables (FLAT_SIDE_FIELDS) as {"side": {...}}."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads them all at once

    def __call__(self) -> dict[str, Any]:
        env = {k.lower(): v for k, v in os.environ.items()}
        side = {
            name: env[f"fedmobillm_{flat}"]
            for flat, name in FLAT_SIDE_FIELDS.items()
            if f"fedmobillm_{flat}" in env
        }
        return {"side": side} if side else {}


class ServerSettings(BaseSettings):
    """Everything the server reads at start. Env vars: FEDMOBILLM_ADMIN_TOKEN, ...,
    FEDMOBILLM_SIDE__LR (nested fields: ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FEDMOBILLM_", env_nested_delimiter="__", extra="forbid"
    )

    admin_token: SecretStr = SecretStr("")
    data_dir: Path = Path("fedmobillm-server")
    # The store: None = the embedded SQLite file in data_dir; a postgresql://user@host:port/db
    # URL = PostgreSQL (server/store_pg.py), which several ingest workers can share
    database: SecretStr | None = None
    database_pool: int = Field(8, gt=0)  # PostgreSQL connections per process
    workers: int = Field(1, gt=0)  # ingest worker processes (more than 1 needs `database`)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # TLS: the PEM certificate (chain) and its private key, both or neither (uvicorn serves
    # https); devices verify it with --ca-bundle or --pin-sha256 (docs/privacy.md)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)  # one upload, bytes
    max_samples_per_batch: int = Field(4096, gt=0)
    # Bounds before authentication (server/limits.py): the body of any other request, the
    # request headers, and wrong tokens one client may present per minute before 429s
    max_request_bytes: int = Field(1024 * 1024, gt=0)
    max_header_bytes: int = Field(16 * 1024, gt=0)
    auth_failures_per_minute: int = Field(30, gt=0)
    # Back-pressure (server/limits.py IngestGate): an upload past one of these bounds is
    # answered 429 with Retry-After (retry_after_s plus up to as much again of jitter) before
    # anything of it is stored. max_inflight_uploads: uploads being read, checked or committed
    # at once (per process); max_write_wait_s: how long one waits for the store's write slot;
    # max_backlog_samples: stored samples the trainer of this process has not read yet (0 = no
    # bound; workers without a trainer do not check it).
    max_inflight_uploads: int = Field(64, gt=0)
    max_write_wait_s: float = Field(1.0, gt=0)
    # SQLite group commit (server/store.py Store.write): uploads arriving while a commit is
    # under way are committed together, each in its own savepoint, with one fsync; at most
    # this many uploads / samples a commit (ingest_group_max = 1: one commit per upload)
    ingest_group_max: int = Field(64, gt=0)
    ingest_group_samples: int = Field(8192, gt=0)
    max_backlog_samples: int = Field(200_000, ge=0)
    retry_after_s: int = Field(1, gt=0)
    # Trainer
    train: bool = True  # run the trainer thread beside ingest
    # `serve`: run the trainer as a child process (`fedmobillm train`) instead of a thread:
    # uploads do not wait behind its steps for the GIL (server/trainer_child.py)
    trainer_process: bool = False
    # with trainer_process: keep a second child that has imported torch and the trainer and
    # waits to take over when the active one dies (restart without the imports; costs the
    # RSS of an idle trainer process: docs/server.md)
    trainer_standby: bool = True
    seed: int = 0
    batch_size: int = Field(64, gt=0)  # samples per step, split across architectures
    checkpoint_every: int = Field(200, gt=0)  # steps
    eval_every: int = Field(100, gt=0)  # steps
    export_every: int = Field(500, gt=0)  # steps between personal-model exports
    export_pte: bool = False  # also lower personal models to ExecuTorch (.pte)
    # personal.onnx weights as devices download them: int8 (dynamic, per-channel; about 1/3.5
    # of the fp32 bytes, argmax agreement 99.5% measured on MiniLM-L6) or fp32
    personal_quant: Literal["int8", "fp32"] = "int8"
    # The trainer pauses (evaluates, checkpoints, exports) once it has drawn this many epochs
    # of the training set since the last new upload (0 = never), or after idle_after_steps
    # steps without new data (0 = no cap); the next upload wakes it.
    idle_after_epochs: float = Field(5.0, ge=0)
    idle_after_steps: int = Field(0, ge=0)
    trainer_threads: int = Field(1, gt=0)  # torch threads of the trainer
    # Cap on the trainer's cached samples (held as uploaded: int8 + scales or fp16); past it
    # the cache keeps a uniform random subset per (architecture, device) and the rest stays in
    # the store (server/trainer.py TrainingCache). 0 = no cap.
    trainer_memory_mb: float = Field(1024.0, ge=0)
    step_sleep_s: float = Field(0.0, ge=0)  # pause between steps (leave CPU to ingest)
    # How the trainer draws within an architecture's share of a mini-batch
    # (server/policies.py balanced_sample): "device" (a device uniformly, then one of its
    # samples; the default), "sample" (a sample uniformly), "label" (a label uniformly among
    # those the architecture holds, then a sample of it: for fleets with label skew, issue
    # 23, docs/skew.md). Env FEDMOBILLM_SAMPLER_BALANCE, config file sampler_balance.
    sampler_balance: Literal["device", "sample", "label"] = "device"
    # Anchor set (server/anchors.py): public unlabelled texts, one per line or .jsonl
    # {"text"}; each device forwards its share of anchors_per_device of them (`fedmobillm
    # device run --split anchor`). Keep the file fixed for a data dir: ids are positions.
    anchors: Path | None = None
    anchors_per_device: int = Field(500, gt=0)
    # Local differential privacy (docs/privacy.md): refuse (403) to register a device that
    # declares no mechanism or an epsilon above this; None = no requirement
    max_epsilon: float | None = Field(None, gt=0)
    # The side network, its alignment (anchor_kl, anchor_feature, anchor_batch) and its
    # optimisation: server/side.py SideConfig, whose defaults are the server's. Config file
    # [server.side] / {"side": {"lr": 0.001}}, env FEDMOBILLM_SIDE__LR; the flat names of
    # FLAT_SIDE_FIELDS (learning_rate, side_width, ...) work too. side.inputs is the
    # federation's kind: "pivot" (one vector per tap and sample) or "tokens" (every token's
    # taps, bundles exported with --pivot none); `fedmobillm server start --inputs tokens`.
    side: SideConfig = Field(default_factory=SideConfig)
    # The federation's task (protocol.TASKS): "classify" (a label per sample, the default) or
    # "lm" (causal language modelling on the devices' own text: decoder token bundles, every
    # token's taps and ids; side.inputs is then "tokens" and the side network causal, see
    # _lm_side). A data dir keeps its task. `fedmobillm server start --task lm`.
    task: Literal["classify", "lm"] = "classify"
    # lm: the longest bundle max_seq_len registration accepts (a device's T bounds the
    # trainer's step memory); env FEDMOBILLM_LM_MAX_SEQ_LEN
    lm_max_seq_len: int = Field(512, gt=0)
    # lm: samples (lines) a step for the architectures named, instead of their equal share
    # of batch_size (server/lm_batch.py), e.g. {"smollm2-135m" = 16} gives the full model
    # 16 lines a step beside its truncations' shares (docs/lm.md); env
    # FEDMOBILLM_LM_ARCH_BATCH='{"smollm2-135m": 16}'
    lm_arch_batch: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _lm_side(cls, data: Any) -> Any:
        """``task = "lm"``: side.inputs = "tokens", a causal transformer body, and
        ``server.lm.lm_config``'s defaults for the fields the user did not set. Refuses
        side.inputs = "pivot", side.causal = false and an anchor set (anchors are
        classify-only) with a clear error."""
        if not isinstance(data, dict) or data.get("task") != "lm":
            return data
        return {**data, "side": lm_side_fields(data.get("side"), data.get("anchors"))}

    @model_validator(mode="before")
    @classmethod
    def _flat_side_fields(cls, data: Any) -> Any:
        """Fold the flat names (FLAT_SIDE_FIELDS) into ``side``; they win over it."""
        if not isinstance(data, dict) or not FLAT_SIDE_FIELDS.keys() & data.keys():
            return data
        data = dict(data)
        side = data.get("side") or {}
        side = dataclasses.asdict(side) if isinstance(side, SideConfig) else dict(side)
        for flat, name in FLAT_SIDE_FIELDS.items():
            if flat in data:
                side[name] = data.pop(flat)
        data["side"] = side
        return data

    @model_validator(mode="after")
    def _balance_needs_labels(self) -> ServerSettings:
        """``sampler_balance = "label"`` draws by label: an lm federation has none."""
        if self.task == "lm" and self.sampler_balance == "label":
            raise ValueError(
                'sampler_balance "label" draws by label and task lm has no labels: use '
                '"device" or "sample"'
            )
        return self

    @field_validator("lm_arch_batch", mode="before")
    @classmethod
    def _arch_batch(cls, value: Any) -> dict[str, int]:
        from fedmobillm.server.lm_batch import check_arch_batch

        try:
            return check_arch_batch(value)
        except FedMobiLLMError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _arch_batch_is_lm(self) -> ServerSettings:
        if self.lm_arch_batch and self.task != "lm":
            raise ValueError('lm_arch_batch is for task lm: drop it or set task = "lm"')
        return self

    @field_validator("database")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError(
                "must be a postgresql://user@host:port/dbname URL (leave it unset for the "
                "embedded SQLite store)"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual sources, with the flat side-network env names below the nested ones."""
        flat = _FlatSideEnv(settings_cls)
        return init_settings, env_settings, flat, dotenv_settings, file_secret_settings

    @property
    def db_path(self) -> Path:
        return self.data_dir / "store.sqlite3"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def personal_dir(self) -> Path:
        return self.data_dir / "personal"


def lm_side_fields(side: Any, anchors: Any = None) -> dict[str, Any]:
    """The side settings of an lm federation from the user's ``side`` (a dict of SideConfig
    fields, a SideConfig, or None): ``server.lm.lm_config()``'s values where they differ from
    SideConfig's defaults and the user set nothing (inputs tokens, causal, ...)."""
    from fedmobillm.server.lm import lm_config  # the learning core's defaults

    given = dataclasses.asdict(side) if isinstance(side, SideConfig) else dict(side or {})
    if given.get("inputs", "tokens") != "tokens":
        raise ValueError(
            f"task lm trains on every token's taps: side.inputs must be tokens, not "
            f"{given['inputs']!r} (drop --inputs/side.inputs, or run --task classify)"
        )
    if given.get("causal", True) is not True:
        raise ValueError("task lm needs a causal side network: drop side.causal = false")
    if anchors is not None:
        raise ValueError(
            "anchors are classify-only (they align pivot vectors of labelled tasks): drop "
            "--anchors / anchors for task lm"
        )
    base, lm = dataclasses.asdict(SideConfig()), dataclasses.asdict(lm_config())
    defaults = {k: v for k, v in lm.items() if base.get(k) != v}
    return {**defaults, **given, "inputs": "tokens", "causal": True}


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON or TOML file of ServerSettings fields (a [server] table in TOML is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise FedMobiLLMError(f"config file {path} does not exist")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            import tomllib  # Python >= 3.11; use a .json config on 3.10

            data = tomllib.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise FedMobiLLMError(f"config file {path} is not valid: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("server"), dict):
        data = data["server"]
    if not isinstance(data, dict):
        raise FedMobiLLMError(f"config file {path} must hold a table/object of settings")
    return data


def _problem(error: Any) -> str:
    """One pydantic error as ``field: message`` (the message alone for a whole-model check,
    without pydantic's "Value error, " prefix)."""
    msg = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {msg}" if where else msg


def token_weakness(token: str) -> str | None:
    """Why ``token`` is too weak to be the admin token, or None when it is strong enough."""
    if token.strip().lower() in DEFAULT_TOKENS:
        return "is empty or a default"
    if len(token) < MIN_TOKEN_CHARS:
        return f"is shorter than {MIN_TOKEN_CHARS} characters"
    from zxcvbn import zxcvbn  # only at start-up

    guesses = float(zxcvbn(token[:100])["guesses_log10"])  # zxcvbn is slow on long input
    if guesses < MIN_TOKEN_GUESSES_LOG10:
        return (
            f"is guessable (about 10^{guesses:.0f} guesses; repeats, sequences or "
            f"dictionary words; at least 10^{MIN_TOKEN_GUESSES_LOG10:.0f} needed)"
        )
    return None


def load_settings(
    config_file: Path | None = None, dev: bool = False, **overrides: Any
) -> tuple[ServerSettings, str | None]:
    """Settings from env < config file < overrides (``side``: a dict of SideConfig fields,
    merged into the config file's). Returns (settings, generated_token):
    with ``dev`` and no usable admin token, a random one is generated (print it once)."""
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    side = overrides.pop("side", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if side:  # side-network overrides (e.g. --inputs) join the config file's [side] table
        values["side"] = {**(values.get("side") or {}), **side}
    try:
        settings = ServerSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise FedMobiLLMError(f"invalid server settings: {problems}") from exc
    token = settings.admin_token.get_secret_value()
    weakness = token_weakness(token)
    if weakness is None:
        return settings, None
    if not dev:
        raise FedMobiLLMError(
            f"the admin token {weakness}: the server refuses to start",
            hint="set FEDMOBILLM_ADMIN_TOKEN (e.g. `export FEDMOBILLM_ADMIN_TOKEN=$(python -c "
            "'import secrets; print(secrets.token_urlsafe(32))')`), put admin_token in the "
            "config file, or pass --dev for a throwaway token",
        )
    generated = secrets.token_urlsafe(32)
    settings.admin_token = SecretStr(generated)
    return settings, generated
