"""The ``lm`` task's learning core: a causal side network that writes a residual on the
backbone's last tapped hidden state, read out through the backbone's own frozen LM head.

For architecture ``a`` (taps ``(B, K, T, d_a)`` at every real token, mask ``(B, T)``):

- ``u = Alignment_a(taps)``: per-token LayerNorm + Linear d_a -> d_s per tap, averaged per
  side block (``server.side.Alignment``, the classify task's own);
- ``s = body(u)``: the shared ``TokenSideNetwork`` with ``causal=True`` (its
  ``token_states``: position t reads tokens <= t only), ``(B, T, d_s)``;
- ``delta = out_a(LayerNorm_a(s))``: a projection d_s -> d_a initialised to **zero**, so
  at step 0 ``delta == 0`` and the personal model is exactly the frozen one; shared by the
  architectures of one source model and width (``share_out``, the default: their
  residuals live in one space, read by one final norm and head), else per architecture;
- ``hidden = final_norm(taps[:, -1])``: the backbone's final norm at the deepest tap (a
  truncated bundle's last block goes through the full model's final norm, as its
  generation graph does), and ``logits = head(hidden + delta)`` with the frozen head
  (the tied input embedding for SmolLM2). The head and norm are public backbone weights
  the server loads from the model folder and the phone already holds (``lm_head.onnx``):
  they are never part of the personal model, which maps taps to ``delta`` only.

Loss: next-token cross-entropy. The prediction at position t targets token t + 1 and
counts when that token is real and its ``loss_mask`` is 1 (a prompt/response record puts
1 on the response's tokens only; plain text: every token but the first).

The targets are the token ids, so an lm upload carries the ids of the device's text beside
its taps (the wire is not built here; see docs/lm.md).

``LMSideTrainer``: AdamW over the shared body and every architecture's alignment and
output projection, optional EMA, save/load (safetensors + JSON, atomic, the JSON naming
the weights' sha256), and ``export_personal_lm`` (``personal.onnx``: activations
``(B, K, T, d)`` + attention_mask ``(B, T)`` -> delta ``(B, T, d)``, dynamic B and T,
checked against torch).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from fedmobillm.device_runtime.files import replacing, sha256_file, write_atomic
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.side import (
    Alignment,
    ArchSpec,
    SideConfig,
    TokenSideNetwork,
    optimizer_step,
)

log = logging.getLogger(__name__)

STATE_FILE = "lm.json"
WEIGHTS_FILE = "lm.safetensors"
FORMAT_VERSION = 1
DELTA_OUTPUT = "delta"
LENS_FILE = "lens.json"  # in a personal lm model whose graph holds a tuned lens
LENS_NOTE = (
    "delta includes final_norm(W h + b) - final_norm(h) of the deepest tap h: an affine map "
    "to the full model's last block fitted on public text (server.lm_lens)"
)
LM_PERSONAL_DEFAULTS = {"inputs": "tokens", "causal": True, "token_block": "transformer"}
# LMSideTrainer's defaults (the server's too): architectures of one source model and width
# write their residual with one shared output projection (share_out: chosen on bench_lm
# --quick's validation lines, where the full SmolLM2's personal model otherwise learns
# from its own devices' lines only; docs/lm.md, "Why the full model trailed
# centralised"), and a step's loss is the mean of each architecture's mean NLL
# (arch_balance; False: the mean over every scored token, where the architecture with more
# or harder tokens dominates the shared parts' gradient); the two together were best
SHARE_OUT = True
ARCH_BALANCE = True


def lm_config(**overrides: Any) -> SideConfig:
    """A ``SideConfig`` for the lm side network: token inputs, causal transformer blocks
    (``overrides`` may change the rest: width, blocks, lr, dropout, ema ...). EMA 0.95: with
    the normalised average (``LMSideTrainer.ema_decay``) SideConfig's 0.99 would average
    over ~100 steps, longer than short lm federations run (the old warm-up kept the
    effective decay below 0.92 for their first 100 steps); 0.95 beat 0.9 on bench_lm
    --quick's validation lines (docs/lm.md)."""
    cfg = {"dropout": 0.1, "warmup_steps": 20, "weight_decay": 0.01, "ema": 0.95, **overrides}
    cfg.update(LM_PERSONAL_DEFAULTS)
    return SideConfig(**cfg)


# -- the frozen head -----------------------------------------------------------------------


class FrozenLMHead(nn.Module):
    """The backbone's final norm and output projection, frozen: ``hidden(last_tap)`` and
    ``forward(hidden) -> logits``. ``weight`` (V, d) is the tied embedding for tied models."""

    def __init__(self, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.norm = copy.deepcopy(norm).float().eval().requires_grad_(False)
        self.register_buffer("weight", weight.detach().float().clone(), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float().clone(), persistent=False
        )

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> FrozenLMHead:
        head = model.get_output_embeddings()
        if head is None:
            raise FedMobiLLMError(f"{type(model).__name__} has no output embeddings (LM head)")
        base = getattr(model, "model", None)
        norm = getattr(base, "norm", None)
        if norm is None:
            raise FedMobiLLMError(
                f"{type(model).__name__} has no final norm at model.norm",
                hint="the lm task supports Llama-style decoders (Llama, Mistral, Qwen2)",
            )
        return cls(norm, head.weight, getattr(head, "bias", None))

    @classmethod
    def from_model(cls, name_or_folder: str | Path) -> FrozenLMHead:
        """From a named model (``fedmobillm.export.models``) or a local Hugging Face folder:
        the public weights the server holds (never downloaded from a hub here)."""
        from fedmobillm.export.generate import load_causal_lm
        from fedmobillm.export.models import resolve_model

        folder = resolve_model(str(name_or_folder))
        if isinstance(folder, str):
            raise FedMobiLLMError(
                f"{name_or_folder!r} is not a local model folder",
                hint="the server reads the LM head from a local folder or a named model",
            )
        return cls.from_causal_lm(load_causal_lm(Path(folder)))

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def hidden(self, last_tap: torch.Tensor) -> torch.Tensor:
        """(..., d) deepest tap (pre-norm) -> the final norm's output (..., d)."""
        return self.norm(last_tap)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)  # (..., V)


# -- the model -----------------------------------------------------------------------------


class DeltaOut(nn.Module):
    """Per-architecture LayerNorm + Linear d_s -> d_a, initialised to zero (delta = 0)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(s))  # (B, T, d_a)


class LMPersonal(nn.Module):
    """One architecture's personal lm model: activations (B, K, T, d_a) + attention_mask
    (B, T) -> delta (B, T, d_a). What ``personal.onnx`` holds (no head; a truncated
    architecture's fixed tuned lens, ``server.lm_lens.TunedLens``, holds a copy of the
    final norm). With a lens: delta = lens(deepest tap) + out(s), so at step 0 (out = 0)
    the model predicts exactly what the tuned lens does."""

    def __init__(
        self, align: Alignment, body: TokenSideNetwork, out: DeltaOut, lens: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.align, self.body, self.out = align, body, out
        self.lens = lens
        self.tokens = True

    def forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        has_input: torch.Tensor = self.align.has_input  # type: ignore[assignment]
        s = self.body.token_states(self.align(activations), attention_mask, has_input)
        delta = self.out(s)  # (B, T, d_a)
        if self.lens is not None:
            delta = delta + self.lens(activations[:, -1])
        return delta


def lm_logits(
    personal: LMPersonal | None,
    head: FrozenLMHead,
    x: torch.Tensor,
    mask: torch.Tensor,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """head(hidden + delta) at every position: (B, T, V). ``hidden`` (B, T, d) defaults to
    the final norm of the deepest tap ``x[:, -1]``; ``personal`` None: the frozen model."""
    h = head.hidden(x[:, -1]) if hidden is None else hidden
    if personal is not None:
        h = h + personal(x, mask)
    return head(h)


def scored_logits(
    stats: NextTokenStats,
    personal: LMPersonal | None,
    head: FrozenLMHead,
    x: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
) -> None:
    """Add the scored positions' next-token statistics to ``stats``; the head runs at
    those positions only."""
    scored, target = next_token_targets(ids, mask, loss_mask)
    h = head.hidden(x[:, -1]) if hidden is None else hidden  # (B, T, d)
    if personal is not None:
        h = h + personal(x, mask)
    stats.add_flat(head(h[scored]), target[scored])


def next_token_targets(
    ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the prediction at position t (B, T) is scored and its target: ``scored``
    (B, T) bool (token t + 1 real and in ``loss_mask``) and ``target`` (B, T) int64
    (ids shifted left; 0 where not scored)."""
    lm = mask if loss_mask is None else loss_mask * mask
    scored = torch.zeros_like(mask, dtype=torch.bool)
    scored[:, :-1] = lm[:, 1:] != 0
    target = torch.zeros_like(ids)
    target[:, :-1] = ids[:, 1:]
    return scored, target.masked_fill(~scored, 0)


def lm_loss(
    personal: LMPersonal | None,
    head: FrozenLMHead,
    x: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats) over the scored positions and their count. The head
    runs at the scored positions only (V is large), CE_CHUNK of them at a time: the (n, V)
    float32 logits of a step are never whole (``_chunked_ce``)."""
    scored, target = next_token_targets(ids, mask, loss_mask)
    h = head.hidden(x[:, -1]) if hidden is None else hidden  # (B, T, d)
    if personal is not None:
        h = h + personal(x, mask)
    return _chunked_ce(head, h[scored], target[scored]), int(scored.sum())


CE_CHUNK = 4096  # scored tokens whose (CE_CHUNK, V) logits one cross-entropy chunk holds


def _chunked_ce(head: FrozenLMHead, h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of h (n, d) through ``head`` against tgt (n,), CE_CHUNK rows at
    a time; with gradients each chunk's logits are recomputed in backward (activation
    checkpointing), so a step holds one chunk's (CE_CHUNK, V) logits, not (n, V)."""
    from torch.utils.checkpoint import checkpoint

    def ce(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(hc), tc, reduction="sum")

    if len(tgt) <= CE_CHUNK:
        return ce(h, tgt)
    grad = torch.is_grad_enabled() and h.requires_grad
    parts = []
    for s in range(0, len(tgt), CE_CHUNK):
        hc, tc = h[s : s + CE_CHUNK], tgt[s : s + CE_CHUNK]
        parts.append(checkpoint(ce, hc, tc, use_reentrant=False) if grad else ce(hc, tc))
    return torch.stack(parts).sum()


# -- trainer -------------------------------------------------------------------------------


@dataclass
class LMArch(ArchSpec):
    """An architecture of the lm federation: ArchSpec + the model its head comes from."""

    source_model: str = ""
    vocab_size: int = 0
    lens: dict[str, Any] = field(default_factory=dict)  # the tuned lens's fit ({}: none)
    # the key of the output projection this architecture writes its residual with ("": its
    # own; with share_out, the first architecture's of the same source model and width)
    out: str = ""


@dataclass
class LMGroup:
    """One architecture's part of a mini-batch: taps (N, K, T, d) zero-padded, token ids
    (N, T), mask (N, T) 1 = real token, loss_mask (N, T) 1 = token carries loss (None: all)."""

    arch: str
    x: np.ndarray
    ids: np.ndarray
    mask: np.ndarray
    loss_mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LMSideTrainer:
    """The shared causal body, per-architecture alignments and zero-initialised output
    projections, their optimiser and (``config.ema``) averaged copies. ``heads``: arch ->
    its frozen head (architectures of one model may share one head object)."""

    def __init__(
        self,
        config: SideConfig,
        seed: int = 0,
        share_out: bool = SHARE_OUT,
        arch_balance: bool = ARCH_BALANCE,
    ) -> None:
        if not (config.tokens and config.causal):
            raise FedMobiLLMError(
                "the lm side network needs SideConfig(inputs='tokens', causal=True)",
                hint="build the config with fedmobillm.server.lm.lm_config()",
            )
        self.config, self.seed = config, seed
        self.share_out, self.arch_balance = bool(share_out), bool(arch_balance)
        self.step, self.tokens_seen = 0, 0
        torch.manual_seed(seed)
        self.body = TokenSideNetwork(config, 2)
        self.body.head = nn.Identity()  # type: ignore[assignment]  # lm: token states only
        self.body.pool = None
        self.aligns, self.outs = nn.ModuleDict(), nn.ModuleDict()
        self.ema: dict[str, nn.Module] | None = None
        if config.ema:
            self.ema = {"body": copy.deepcopy(self.body).requires_grad_(False)}
        self.archs: dict[str, LMArch] = {}
        self.heads: dict[str, FrozenLMHead] = {}
        self.lenses: dict[str, nn.Module] = {}  # arch key -> fixed tuned lens (truncated)
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.body.parameters()), "lr_scale": 1.0}],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )

    # -- architectures --

    def add_architecture(
        self,
        arch: str,
        taps: list[int],
        depth: int,
        hidden: int,
        head: FrozenLMHead,
        source_model: str = "",
        lens: nn.Module | None = None,
    ) -> None:
        """Idempotent. A new architecture gets a fresh alignment and a zero output
        projection; ``head``'s hidden size must be ``hidden``. ``lens``: a fixed
        ``TunedLens`` for an architecture whose graph ends before the model's last block
        (its personal model starts at the lens's predictions; None: at the frozen ones)."""
        if head.hidden_size != hidden:
            raise FedMobiLLMError(
                f"architecture {arch}: head width {head.hidden_size} != tap width {hidden}"
            )
        if arch in self.archs:
            old = self.archs[arch]
            if (old.taps, old.depth, old.hidden) != (list(taps), depth, hidden):
                raise FedMobiLLMError(f"architecture {arch} re-added with other taps/shape")
            self.heads[arch] = head
            return
        key = f"a{len(self.archs)}"
        spec = LMArch(arch, list(taps), int(depth), int(hidden), key=key)
        spec.source_model, spec.vocab_size = source_model, head.vocab_size
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(arch.encode()))
            align = Alignment(spec, self.config.width, self.config.blocks)
        spec.out = self._out_key(spec)
        self.aligns[key] = align
        params = list(align.parameters())
        if spec.out not in self.outs:  # a new residual space: its own zero projection
            out = DeltaOut(self.config.width, hidden)
            self.outs[spec.out] = out
            params += list(out.parameters())
            if self.ema is not None:
                self.ema[f"out.{spec.out}"] = copy.deepcopy(out).requires_grad_(False)
        if self.ema is not None:
            self.ema[f"align.{key}"] = copy.deepcopy(align).requires_grad_(False)
        self.archs[arch], self.heads[arch] = spec, head
        if lens is not None:
            self.lenses[key] = lens.requires_grad_(False)
            spec.lens = dict(getattr(lens, "meta", {}) or {"fitted": True})
            log.info("architecture %s starts at its tuned lens %s", arch, spec.lens)
        self.optimizer.add_param_group({"params": params, "lr_scale": self.config.align_lr_scale})

    def _out_key(self, spec: LMArch) -> str:
        """The output projection ``spec`` writes its residual with: its own (its key) or,
        with ``share_out``, that of the first architecture of the same source model and
        width (one residual space: the same final norm and head read it)."""
        if self.share_out and spec.source_model:
            for other in self.archs.values():
                if (other.source_model, other.hidden) == (spec.source_model, spec.hidden):
                    return other.out or other.key
        return spec.key

    def model(self, arch: str, averaged: bool = False) -> LMPersonal:
        """The live personal model of ``arch`` (training), or the EMA copy (``averaged``)."""
        if arch not in self.archs:
            raise FedMobiLLMError(f"unknown architecture {arch!r}", hint="add_architecture first")
        spec = self.archs[arch]
        key, out = spec.key, spec.out or spec.key
        if averaged and self.ema is not None:
            e = self.ema
            return LMPersonal(e[f"align.{key}"], e["body"], e[f"out.{out}"], self.lenses.get(key))  # type: ignore[arg-type]
        return LMPersonal(self.aligns[key], self.body, self.outs[out], self.lenses.get(key))  # type: ignore[arg-type]

    def _live_modules(self) -> list[tuple[str, nn.Module]]:
        mods: list[tuple[str, nn.Module]] = [("body", self.body)]
        for key in self.aligns:
            mods.append((f"align.{key}", self.aligns[key]))
            if key in self.outs:
                mods.append((f"out.{key}", self.outs[key]))
        return mods

    def ema_decay(self, step: int) -> float:
        """The decay of the averaged copy's update after step ``step`` (1, 2, ...): the
        copy is the exponential moving average of the weights after steps 1..``step`` with
        decay ``config.ema``, normalised (Adam's bias correction): step i's weights count
        ema ** (step - i) / sum_j ema ** (step - j), and the initial weights count nothing.
        So ``ema`` means what it says from the first step. (It was min(ema, (1 + t) /
        (10 + t)), below 0.9 until step 80 and 0.95 until 170: in short runs every ema above
        it gave the same model.)"""
        b = self.config.ema
        return b * (1.0 - b ** (step - 1)) / (1.0 - b**step)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.ema_decay(self.step)
        for name, live in self._live_modules():
            for pa, pl in zip(self.ema[name].parameters(), live.parameters(), strict=True):
                pa.lerp_(pl, 1.0 - decay)

    def num_parameters(self, arch: str | None = None) -> int:
        """Trainable parameters: the shared body, plus ``arch``'s alignment and projection."""
        mods: list[nn.Module] = [self.body]
        if arch is not None:
            spec = self.archs[arch]
            mods += [self.aligns[spec.key], self.outs[spec.out or spec.key]]
        return sum(p.numel() for m in mods for p in m.parameters())

    # -- optimisation --

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "cosine":
            t = min(1.0, (step - c.warmup_steps) / max(1, c.total_steps - c.warmup_steps))
            return c.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        return c.lr

    def train_step(self, groups: list[LMGroup]) -> float:
        """One AdamW step on the mean next-token NLL over every scored token of ``groups``
        (any mix of architectures, one shared body). Returns that mean (nats/token).
        Raises ``NonFiniteStep`` (nothing applied) on a non-finite loss or gradient."""
        for m in (self.body, self.aligns, self.outs):
            m.train()
        total, count = torch.zeros(()), 0
        per_arch: dict[str, list] = {}
        for g in groups:
            x, ids, mask, lmask = _tensors(g)
            nll, n = lm_loss(self.model(g.arch), self.heads[g.arch], x, ids, mask, lmask)
            total, count = total + nll, count + n
            got = per_arch.setdefault(g.arch, [torch.zeros(()), 0])
            got[0], got[1] = got[0] + nll, got[1] + n
        if count == 0:
            return float("nan")
        loss = total / count
        if self.arch_balance:  # each architecture's mean NLL counts alike
            means = [s / n for s, n in per_arch.values() if n]
            loss = torch.stack(means).mean()
        optimizer_step(self.optimizer, loss, self.lr_at(self.step), self.config.max_grad_norm)
        self.step += 1
        self.tokens_seen += count
        self._update_ema()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(
        self, groups: list[LMGroup], frozen: bool = False, averaged: bool = True
    ) -> dict[str, float]:
        """Next-token NLL, perplexity and top-1/top-3 over the scored tokens of ``groups``
        (``frozen``: the frozen model, delta 0). A group's ``extra["hidden"]`` (N, T, d)
        replaces the final norm of its deepest tap (e.g. the phone's fp32 hidden state)."""
        stats = NextTokenStats()
        for g in groups:
            x, ids, mask, lmask = _tensors(g)
            personal = None if frozen else self.model(g.arch, averaged).eval()
            hidden = g.extra.get("hidden")
            hid = None if hidden is None else torch.from_numpy(np.asarray(hidden, np.float32))
            scored_logits(stats, personal, self.heads[g.arch], x, ids, mask, lmask, hid)
        return stats.to_dict()

    # -- persistence --

    def state(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "task": "lm",
            "config": asdict(self.config),
            "seed": self.seed,
            "share_out": self.share_out,
            "arch_balance": self.arch_balance,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "archs": [asdict(a) for a in self.archs.values()],
        }

    def _tensors(self) -> tuple[dict[str, torch.Tensor], list[dict]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, mod in self._live_modules():
            tensors.update({f"live.{name}.{k}": v for k, v in mod.state_dict().items()})
        for name, mod in (self.ema or {}).items():
            tensors.update({f"ema.{name}.{k}": v for k, v in mod.state_dict().items()})
        for key, lens in self.lenses.items():
            tensors.update({f"lens.{key}.{k}": v for k, v in lens.state_dict().items()})
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        groups = [dict(g) for g in opt["param_groups"]]
        return {k: v.detach().contiguous().clone() for k, v in tensors.items()}, groups

    def save(self, directory: Path) -> None:
        """Weights + optimiser (safetensors) then state (JSON naming the weights' sha256),
        each written atomically. The frozen heads are not saved (public weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, groups = self._tensors()
        with replacing(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        state = {
            **self.state(),
            "optimizer": {"param_groups": groups},
            "weights_sha256": sha256_file(directory / WEIGHTS_FILE),
        }
        write_atomic(directory / STATE_FILE, json.dumps(state, indent=1))

    @classmethod
    def load(
        cls, directory: Path, head_for: Callable[[LMArch], FrozenLMHead] | None = None
    ) -> LMSideTrainer:
        """A saved trainer. ``head_for(spec)`` gives each architecture's frozen head
        (default: ``FrozenLMHead.from_model(spec.source_model)``, one per source model)."""
        directory = Path(directory)
        try:
            state = json.loads((directory / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FedMobiLLMError(
                f"cannot read lm side-network state in {directory}: {exc}"
            ) from exc
        if state.get("format_version") != FORMAT_VERSION or state.get("task") != "lm":
            raise FedMobiLLMError(f"{directory}: not an lm side state of version {FORMAT_VERSION}")
        if sha256_file(directory / WEIGHTS_FILE) != state["weights_sha256"]:
            raise FedMobiLLMError(f"{directory}: weights do not match state (torn checkpoint)")
        # checkpoints from before these options: per-architecture projections, token mean
        trainer = cls(
            SideConfig(**state["config"]),
            state["seed"],
            share_out=bool(state.get("share_out", False)),
            arch_balance=bool(state.get("arch_balance", False)),
        )
        tensors = load_file(str(directory / WEIGHTS_FILE))
        cache: dict[str, FrozenLMHead] = {}
        for a in state["archs"]:
            spec = LMArch(**a)
            if head_for is not None:
                head = head_for(spec)
            else:
                if spec.source_model not in cache:
                    cache[spec.source_model] = FrozenLMHead.from_model(spec.source_model)
                head = cache[spec.source_model]
            lens = _saved_lens(tensors, f"lens.a{len(trainer.archs)}.", head, spec.lens)
            trainer.add_architecture(
                spec.name, spec.taps, spec.depth, spec.hidden, head, spec.source_model, lens
            )
            trainer.archs[spec.name].bundle_sha256s = list(spec.bundle_sha256s)
            trainer.archs[spec.name].encoding = spec.encoding
        _load_tensors(trainer, tensors, state)
        trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
        return trainer

    # -- personal model --

    def export_personal(
        self, arch: str, out_dir: Path, bundle_sha256s: list[str], quant: str = "fp32"
    ) -> Path:
        """personal.onnx (activations + attention_mask -> delta), personal.safetensors,
        personal.json for ``arch``'s averaged model (``export_personal_lm``)."""
        spec = self.archs.get(arch)
        if spec is None:
            raise FedMobiLLMError(f"unknown architecture {arch!r}")
        return export_personal_lm(
            self.model(arch, averaged=True), spec, Path(out_dir), bundle_sha256s, self.step, quant
        )


def _load_tensors(trainer: LMSideTrainer, tensors: dict[str, torch.Tensor], state: dict) -> None:
    for name, mod in trainer._live_modules():
        mod.load_state_dict(_strip(tensors, f"live.{name}."))
    for name, mod in (trainer.ema or {}).items():
        mod.load_state_dict(_strip(tensors, f"ema.{name}."))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v
    trainer.optimizer.load_state_dict(
        {"state": opt_state, "param_groups": state["optimizer"]["param_groups"]}
    )
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


def _saved_lens(
    tensors: dict[str, torch.Tensor], prefix: str, head: FrozenLMHead, meta: dict[str, Any]
) -> nn.Module | None:
    """The fixed tuned lens saved under ``prefix`` (None when the architecture has none)."""
    from fedmobillm.server.lm_lens import TunedLens

    if not meta:
        return None
    saved = _strip(tensors, prefix)
    if "proj.weight" not in saved:
        raise FedMobiLLMError(f"checkpoint names a tuned lens but has no {prefix}proj.weight")
    lens = TunedLens(saved["proj.weight"], saved["proj.bias"], head.norm)
    lens.load_state_dict(saved)
    lens.meta = dict(meta)
    return lens


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _tensors(g: LMGroup) -> tuple[torch.Tensor, ...]:
    """Checked tensors of a group: x float32 (N, K, T, d), ids/mask/loss_mask int64 (N, T)."""
    x, ids, mask = np.asarray(g.x), np.asarray(g.ids), np.asarray(g.mask)
    if x.ndim != 4 or ids.shape != (x.shape[0], x.shape[2]) or mask.shape != ids.shape:
        raise FedMobiLLMError(
            f"an lm group is x (N, K, T, d), ids and mask (N, T); got {x.shape}, "
            f"{ids.shape}, {mask.shape}",
            hint="pad_tokens makes x and mask; pad ids to the same T",
        )
    lmask = None if g.loss_mask is None else np.asarray(g.loss_mask)
    if lmask is not None and lmask.shape != ids.shape:
        raise FedMobiLLMError(f"loss_mask must be (N, T) {ids.shape}, not {lmask.shape}")
    out = [
        torch.from_numpy(np.ascontiguousarray(x, np.float32)),
        torch.from_numpy(ids.astype(np.int64)),
        torch.from_numpy((mask != 0).astype(np.int64)),
    ]
    return (*out, None if lmask is None else torch.from_numpy((lmask != 0).astype(np.int64)))


@dataclass
class NextTokenStats:
    """Summed next-token NLL, scored tokens, top-1 and top-3 hits."""

    nll: float = 0.0
    tokens: int = 0
    top1: int = 0
    top3: int = 0

    def add(self, logits: torch.Tensor, scored: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, T, V), scored (B, T) bool, target (B, T)."""
        self.add_flat(logits[scored], target[scored])

    def add_flat(self, pred: torch.Tensor, tgt: torch.Tensor) -> None:
        """pred (n, V) logits of n scored positions, tgt (n,) their next tokens."""
        pred = pred.double()
        if not len(tgt):
            return
        picked = pred.gather(1, tgt[:, None])  # (n, 1)
        self.nll += float((torch.logsumexp(pred, 1) - picked[:, 0]).sum())
        rank = (pred > picked).sum(1)  # tokens scored strictly higher
        self.tokens += int(len(tgt))
        self.top1 += int((rank == 0).sum())
        self.top3 += int((rank < 3).sum())

    def to_dict(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {
            "perplexity": _perplexity(self.nll / n) if self.tokens else float("nan"),
            "nll_per_token": self.nll / n,
            "next_token_top1": self.top1 / n,
            "next_token_top3": self.top3 / n,
            "tokens": self.tokens,
        }


def _perplexity(mean_nll: float) -> float:
    """exp(mean NLL); inf where that overflows a float (mean NLL > ~709), not an error."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


# -- personal lm export ----------------------------------------------------------------------


def export_personal_lm(
    model: LMPersonal,
    spec: ArchSpec,
    out_dir: Path,
    bundle_sha256s: list[str],
    step: int = 0,
    quant: str = "fp32",
) -> Path:
    """Write personal.onnx (activations float32 (B, K, T, d) + attention_mask int64 (B, T)
    -> delta float32 (B, T, d); dynamic B and T), personal.safetensors and personal.json
    into ``out_dir``. The graph is checked against torch at (5, T=7) and (3, T=19) (max
    |diff| <= 1e-4 fp32 else it fails); ``quant`` "int8": dynamic int8 weights, its diff
    recorded. No head and no final norm inside: the phone holds those (lm_head.onnx)."""
    from fedmobillm.device_runtime.messages import PERSONAL_FORMAT_VERSION, PersonalManifest
    from fedmobillm.device_runtime.protocol import (
        PERSONAL_INPUT,
        PERSONAL_MANIFEST,
        PERSONAL_MASK,
        PERSONAL_ONNX,
        PERSONAL_WEIGHTS,
    )
    from fedmobillm.export.graphs import quantize_onnx_int8, write_onnx_torchscript

    if quant not in ("fp32", "int8"):
        raise FedMobiLLMError(f"personal lm quant must be fp32 or int8, not {quant!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval()
    k, d = len(spec.taps), spec.hidden
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
    example = (torch.randn(2, k, 5, d) * mask[:, None, :, None], mask)
    axes = {
        PERSONAL_INPUT: {0: "batch", 2: "seq"},
        PERSONAL_MASK: {0: "batch", 1: "seq"},
        DELTA_OUTPUT: {0: "batch", 1: "seq"},
    }
    path = out_dir / PERSONAL_ONNX
    with torch.no_grad():
        write_onnx_torchscript(
            model, example, path, [PERSONAL_INPUT, PERSONAL_MASK], [DELTA_OUTPUT], axes
        )
    fp32_diff = delta_diff(model, path, k, d)
    if fp32_diff > 1e-4:
        raise FedMobiLLMError(f"exported personal lm graph differs from torch by {fp32_diff}")
    int8_diff = None
    if quant == "int8":
        with replacing(path) as tmp:
            quantize_onnx_int8(path, tmp, quiet=True)
        int8_diff = delta_diff(model, path, k, d)
    weights = {n: v.detach().contiguous() for n, v in model.state_dict().items()}
    save_file(weights, str(out_dir / PERSONAL_WEIGHTS))
    files = [PERSONAL_ONNX, PERSONAL_WEIGHTS]
    if model.lens is not None:  # the graph holds a fixed tuned lens: say so beside it
        lens = {"tuned_lens": getattr(model.lens, "meta", {}), "what": LENS_NOTE}
        (out_dir / LENS_FILE).write_text(json.dumps(lens, indent=1))
        files.append(LENS_FILE)
        log.info("personal lm model of %s includes its tuned lens", spec.name)
    manifest = PersonalManifest(
        format_version=PERSONAL_FORMAT_VERSION,
        architecture=spec.name,
        bundle_sha256s=list(bundle_sha256s),
        taps=list(spec.taps),
        hidden_size=d,
        num_labels=0,
        label_names=[],
        trainer_step=step,
        encoding=getattr(spec, "encoding", "int8"),
        inputs=[
            {"name": PERSONAL_INPUT, "dtype": "float32", "shape": ["batch", k, "seq", d]},
            {"name": PERSONAL_MASK, "dtype": "int64", "shape": ["batch", "seq"]},
        ],
        outputs=[{"name": DELTA_OUTPUT, "dtype": "float32", "shape": ["batch", "seq", d]}],
        side_inputs="tokens",
        task="lm",
        onnx_max_abs_diff=fp32_diff,
        weights=quant,
        int8_max_abs_logit_diff=int8_diff,
        files={
            f: {"sha256": sha256_file(out_dir / f), "bytes": (out_dir / f).stat().st_size}
            for f in files
        },
    )
    (out_dir / PERSONAL_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
    return out_dir


def delta_diff(model: LMPersonal, path: Path, k: int, d: int) -> float:
    """Max |delta difference| of the graph at ``path`` (onnxruntime) against ``model``
    (torch) on seeded inputs (5 rows, T = 7) and (3 rows, T = 19), right-padded at random,
    compared at real positions."""
    from fedmobillm.device_runtime.graph import Graph
    from fedmobillm.device_runtime.protocol import PERSONAL_INPUT, PERSONAL_MASK

    graph = Graph(path, [PERSONAL_INPUT, PERSONAL_MASK], [DELTA_OUTPUT])
    diff = 0.0
    for rows, t, seed in ((5, 7, 0), (3, 19, 1)):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, t + 1, size=rows)
        lengths[0] = t
        mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
        x = (rng.normal(size=(rows, k, t, d)) * mask[:, None, :, None]).astype(np.float32)
        (got,) = graph.run({PERSONAL_INPUT: x, PERSONAL_MASK: mask})
        with torch.no_grad():
            want = model(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
        real = mask.astype(bool)
        diff = max(diff, float(np.abs(got[real] - want[real]).max()))
    return diff
