"""The learning core: a ladder side network shared by every backbone, plus adaptive
layer-wise feature alignment per architecture.

For architecture ``a`` with taps ``t_1 < ... < t_Ka`` of depth ``L_a``:

- depth: tap ``t`` feeds side block ``j = ceil(t * K_s / L_a) - 1`` (its relative depth on
  the K_s side blocks); taps landing on one block are averaged, a block without a tap
  only refines the running state;
- width: ``P_{a,k} = Linear(LayerNorm(A_k))``, d_a -> d_s, one per architecture and tap.

Side network: ``h_j = g_j * h_{j-1} + (1 - g_j) * u_j`` with ``g_j = sigmoid(alpha_j / T)``
and ``u_j`` the aligned tap input, then ``h_j = block_j(h_j)`` (a residual MLP, or a small
transformer layer over the ladder states ``h_0..h_j``); a swappable head reads ``h_{K_s-1}``.

Token mode (``SideConfig.inputs == "tokens"``): the taps of every real token come in,
``(N, K, T, d)`` zero-padded with a mask ``(N, T)`` (1 = real token). The same alignment
applies at every token, ``h`` is ``(B, T, d_s)``, each side block is a pre-LN transformer
layer over the tokens (keys masked at padding; ``causal``: never at later positions), and the
head reads the masked mean (a learned attention pooling, or the last real token's state: a
causal decoder's own pivot) of the last block's states. ``skip="linear"`` adds a
per-architecture linear map of the pooled, LayerNormed last tap straight to the logits (a
probe the side network refines; both start at zero logits).

``SideTrainer`` trains it from the activations devices upload (dequantized float32
``(N, K, d)``, or ``(N, K, T, d)`` + mask), saves/loads (safetensors + JSON, atomic) and
exports personal models.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import zlib
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
from fedmobillm.server.side_config import (  # noqa: F401 - re-exported
    ANCHOR_TARGETS,
    CONFLICT_PROJECTIONS,
    HEAD_NAMES,
    TOKEN_POOLS,
    SideConfig,
)

log = logging.getLogger(__name__)

STATE_FILE = "side.json"
WEIGHTS_FILE = "side.safetensors"
FORMAT_VERSION = 1


class NonFiniteStep(FedMobiLLMError):
    """A training step whose loss or gradients are not finite: it was not applied."""

    def __init__(self, where: str) -> None:
        super().__init__(f"non-finite {where}: the step was skipped, the weights are unchanged")
        self.where = where


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, max_grad_norm: float
) -> None:
    """One step on ``loss`` at ``lr`` (times each param group's ``lr_scale``), gradients
    clipped to ``max_grad_norm``. Raises ``NonFiniteStep`` with nothing applied when the loss
    or the gradients are not finite. Shared by the side and lm trainers."""
    if not torch.isfinite(loss):
        raise NonFiniteStep("loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    apply_gradients(optimizer, lr, max_grad_norm)


def apply_gradients(optimizer: torch.optim.Optimizer, lr: float, max_grad_norm: float) -> None:
    """Step on the gradients already in ``.grad`` at ``lr`` (times each param group's
    ``lr_scale``), clipped to ``max_grad_norm``. Raises ``NonFiniteStep`` (gradients cleared,
    nothing applied) when they are not finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep("gradients")
    optimizer.step()


# alternating projections onto the half-spaces {v: <v, g_a> >= 0}: passes before giving up
PROJECTION_PASSES = 20


def remove_conflicts(
    h: torch.Tensor, gs: list[torch.Tensor], passes: int = PROJECTION_PASSES
) -> tuple[torch.Tensor, int, bool]:
    """``h`` (n,) projected off every ``g`` of ``gs`` (each (n,)) it conflicts with
    (``<h, g> < 0``: h -= <h, g> / |g|^2 g), in order, for up to ``passes`` passes
    (alternating projections onto the half-spaces {v: <v, g> >= 0}, whose intersection holds
    0, so they converge). Returns (h' (n,), projections made, True when no conflict is left);
    with one pass this is PCGrad's projection."""
    made = 0
    for _ in range(passes):
        hit = False
        for g in gs:
            gg = float(g @ g)
            dot = float(h @ g)
            if gg > 0 and dot < -1e-9 * math.sqrt(gg * float(h @ h)):
                h = h - (dot / gg) * g
                made, hit = made + 1, True
        if not hit:
            return h, made, True
    return h, made, all(float(h @ g) >= -1e-6 * float(g.norm() * h.norm()) for g in gs)


def project_gradients(
    own: dict[str, tuple[torch.Tensor, torch.Tensor]],
    transfer: tuple[torch.Tensor, dict[str, torch.Tensor]] | None,
    mode: str,
    protected: set[str] | None = None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], dict[str, int]]:
    """The step's gradient with the conflicts removed (``SideConfig.conflict_projection``).

    ``own``: arch -> (gradient of its labelled loss on the shared side network (n_s,), on its
    alignment (n_a,)); ``transfer``: the anchor terms' gradient (shared (n_s,), arch ->
    alignment (n_a,)), or None. Mode "anchors": the transfer gradient is projected, on each
    alignment, off that architecture's own gradient where they conflict, and on the shared
    network off every architecture's own until it conflicts with none (zero if that fails);
    so to first order it never raises any architecture's labelled loss. ``protected``: the
    architectures whose own gradients the transfer is projected off (None: all of ``own``;
    the trainer leaves out one whose batch lacks a label: an own loss over one label says
    only "predict that label", and the anchors are then its one teacher). "all": in addition
    each architecture's own gradient on the shared network is projected off the other
    architectures' where they conflict (PCGrad, one pass in name order). Returns (shared
    gradient (n_s,) or None, arch -> alignment gradient, counts of projections made)."""
    counts = {"shared": 0, "shared_dropped": 0}
    names = sorted(own)
    shared = {a: own[a][0] for a in names}
    if mode == "all":
        for a in names:
            others = [own[b][0] for b in names if b != a]
            shared[a], made, _ = remove_conflicts(own[a][0], others, passes=1)
            counts["shared"] += made
    total = torch.stack(list(shared.values())).sum(0) if shared else None
    aligns = {a: own[a][1] for a in names}
    guard = [a for a in names if protected is None or a in protected]
    if transfer is not None:
        h, resolved = transfer[0], True
        if guard:
            h, made, resolved = remove_conflicts(h, [own[a][0] for a in guard])
            counts["shared"] += made
        if not resolved:
            counts["shared_dropped"] += 1
            h = torch.zeros_like(h)
        total = h if total is None else total + h
        for a, ha in transfer[1].items():
            if a in guard:
                ha, made, _ = remove_conflicts(ha, [own[a][1]])
                counts[f"align:{a}"] = made
            aligns[a] = ha if a not in aligns else aligns[a] + ha
    return total, aligns, counts


@dataclass
class ArchSpec:
    """What the alignment needs to know about one backbone architecture."""

    name: str
    taps: list[int]
    depth: int
    hidden: int
    key: str = ""  # module key (a0, a1, ...) in weights
    bundle_sha256s: list[str] = field(default_factory=list)
    encoding: str = "int8"  # what it was trained on: int8 (dequantized) or fp16 uploads
    # token mode: the backbone's kind ("encoder" | "decoder", "" unknown) and the rule its
    # tokens are read by (SideConfig.token_rule): pooling and linear skip
    kind: str = ""
    pool: str = "mean"
    skip: str = "none"


def tap_blocks(taps: list[int], depth: int, blocks: int) -> list[int]:
    """Side block for each tap by relative depth: ceil(t * K_s / L) - 1 (exact integers)."""
    return [max(0, min(blocks - 1, -(-t * blocks // depth) - 1)) for t in taps]


# -- modules -------------------------------------------------------------------------------


class Alignment(nn.Module):
    """P_{a,k}: LayerNorm + Linear d_a -> d_s per tap; averaged per side block."""

    def __init__(
        self,
        spec: ArchSpec,
        width: int,
        blocks: int,
        norms: bool = False,
        skip_labels: int = 0,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        self.block_of_tap = tap_blocks(spec.taps, spec.depth, blocks)
        # token mode: how the shared side network pools this architecture's token states
        # (SideConfig.token_rule); its skip pools the last tap by the same rule ("attention":
        # the masked mean). SideConfig.skip "linear": LayerNorm + Linear d_a -> C on the
        # pooled last tap, zero at start; its logits are added to the side network's
        self.pool = pool
        self.skip_pool = "last" if pool == "last" else "mean"
        self.skip_norm = nn.LayerNorm(spec.hidden) if skip_labels else None
        self.skip = nn.Linear(spec.hidden, skip_labels) if skip_labels else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
        # per-architecture affine after each shared LayerNorm (blocks, then head)
        self.norm_scale = nn.Parameter(torch.ones(blocks + 1, width)) if norms else None
        self.norm_shift = nn.Parameter(torch.zeros(blocks + 1, width)) if norms else None
        self.blocks = blocks
        self.norms = nn.ModuleList(nn.LayerNorm(spec.hidden) for _ in spec.taps)
        self.projs = nn.ModuleList(nn.Linear(spec.hidden, width) for _ in spec.taps)
        counts = torch.zeros(blocks)
        onehot = torch.zeros(len(spec.taps), blocks)
        for k, j in enumerate(self.block_of_tap):
            onehot[k, j] = 1.0
            counts[j] += 1
        # (K, K_s): averaging weights from taps to blocks; (K_s,): 1 where a block gets a tap
        self.register_buffer("mix", onehot / counts.clamp(min=1), persistent=False)
        self.register_buffer("has_input", (counts > 0).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, K, d_a) pivot, or (B, K, T, d_a) tokens: the same map at every token
        z = torch.stack(
            [
                proj(norm(x[:, k]))
                for k, (norm, proj) in enumerate(zip(self.norms, self.projs, strict=True))
            ],
            dim=1,
        )  # (B, K, d_s) or (B, K, T, d_s)
        if z.dim() == 4:
            return torch.einsum("bktd,kj->bjtd", z, self.mix)  # (B, K_s, T, d_s)
        return torch.einsum("bkd,kj->bjd", z, self.mix)  # (B, K_s, d_s)

    def skip_logits(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The linear skip's logits (B, C) from the last tap's tokens x[:, -1] (B, T, d_a),
        pooled under ``mask`` (B, T) by the side network's rule; None without a skip."""
        if self.skip is None or self.skip_norm is None:
            return None
        last = x[:, -1]  # (B, T, d_a)
        pooled = last_token(last, mask) if self.skip_pool == "last" else masked_mean(last, mask)
        return self.skip(self.skip_norm(pooled))  # (B, C)


class MLPBlock(nn.Module):
    def __init__(self, width: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, h: torch.Tensor, history: list[torch.Tensor], affine: tuple | None = None
    ) -> torch.Tensor:
        # h: (B, d_s); affine: per-architecture (scale, shift), each (d_s,)
        n = self.norm(h)
        if affine is not None:
            n = n * affine[0] + affine[1]
        return h + self.drop(self.fc2(F.gelu(self.fc1(n))))  # (B, d_s)


class TransformerBlock(nn.Module):
    """One pre-LN transformer layer over the ladder states so far; output at the last."""

    def __init__(self, width: int, expansion: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            width,
            heads,
            expansion * width,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )

    def forward(
        self, h: torch.Tensor, history: list[torch.Tensor], affine: tuple | None = None
    ) -> torch.Tensor:
        seq = torch.stack([*history, h], dim=1)  # (B, j+1, d_s)
        return self.layer(seq)[:, -1]  # (B, d_s)


class ClassificationHead(nn.Module):
    def __init__(self, width: int, num_labels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, num_labels)

    def forward(self, h: torch.Tensor, affine: tuple | None = None) -> torch.Tensor:
        n = self.norm(h)  # (B, d_s)
        if affine is not None:
            n = n * affine[0] + affine[1]
        return self.out(n)  # (B, C)


HEADS: dict[str, type[nn.Module]] = {"classification": ClassificationHead}  # HEAD_NAMES


class SideNetwork(nn.Module):
    """The shared ladder: gates, side blocks, head. Input: aligned taps (B, K_s, d_s)."""

    def __init__(self, config: SideConfig, num_labels: int) -> None:
        super().__init__()
        c = config
        self.temperature = c.gate_temperature
        self.input_drop = nn.Dropout(c.input_dropout)
        self.alpha = nn.Parameter(torch.full((c.blocks,), float(c.gate_init)))
        if c.block == "mlp":
            blocks = [MLPBlock(c.width, c.expansion, c.dropout) for _ in range(c.blocks)]
        else:
            blocks = [
                TransformerBlock(c.width, c.expansion, c.heads, c.dropout) for _ in range(c.blocks)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.head = HEADS[c.head](c.width, num_labels)

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha / self.temperature)  # (K_s,)

    def forward(
        self,
        u: torch.Tensor,
        has_input: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # u: (B, K_s, d_s); has_input: (K_s,) 1.0 where the architecture feeds block j;
        # scale, shift: (K_s + 1, d_s) per-architecture affine after each LayerNorm, or None
        g = self.gates()
        u = self.input_drop(u)  # (B, K_s, d_s)
        h = torch.zeros_like(u[:, 0])  # (B, d_s)
        history: list[torch.Tensor] = []
        for j, block in enumerate(self.blocks):
            gj = 1.0 - has_input[j] * (1.0 - g[j])  # no input: keep the state
            h = gj * h + (1.0 - gj) * u[:, j]  # (B, d_s)
            h = block(h, history, None if scale is None else (scale[j], shift[j]))  # (B, d_s)
            history.append(h)
        return self.head(h, None if scale is None else (scale[-1], shift[-1]))  # (B, C)


# -- token mode ----------------------------------------------------------------------------

# Additive bias at masked attention scores: finite, so a row with every key masked softmaxes
# to uniform weights instead of NaN, and exp(score - 1e9) is exactly 0 beside a real key.
MASK_BIAS = -1e9


def attention_bias(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Additive attention bias from a (B, T) 0/1 mask: (B, 1, 1, T) keys masked at padding,
    or (B, 1, T, T) with ``causal`` also at later positions. Dynamic B and T (ONNX)."""
    m = mask.to(torch.float32)  # (B, T)
    bias = ((1.0 - m) * MASK_BIAS)[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        pos = torch.cumsum(torch.ones_like(m[0]), 0)  # (T,) 1..T
        later = (pos[None, :] > pos[:, None]).to(torch.float32)  # (T, T) key after query
        bias = bias + (later * MASK_BIAS)[None, None]  # (B, 1, T, T)
    return bias


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of h (B, T, d) over real tokens (mask (B, T) 0/1): (B, d); 0 for no real token."""
    m = mask.to(h.dtype)[..., None]  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def drop_tokens(mask: torch.Tensor, p: float) -> torch.Tensor:
    """A (B, T) 0/1 mask with each real token set to 0 with probability ``p``; a row left
    without any real token keeps its own mask. Same dtype as ``mask``."""
    m = mask.to(torch.float32)
    keep = (torch.rand_like(m) >= p).to(torch.float32) * m
    keep = torch.where(keep.sum(1, keepdim=True) > 0, keep, m)
    return keep.to(mask.dtype)


def last_token(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h (B, T, d) at each row's last real token (mask (B, T) 0/1, padding anywhere): (B, d);
    0 for no real token. A one-hot weighted sum (no gather: dynamic B and T in ONNX)."""
    m = mask.to(h.dtype)  # (B, T)
    seen = torch.cumsum(m, dim=1)  # (B, T) real tokens up to t
    last = (seen == m.sum(1, keepdim=True)).to(h.dtype) * m  # (B, T) 1 at the last real one
    return (h * last[..., None]).sum(1)


class TokenBlock(nn.Module):
    """Pre-LN transformer layer over the token states (attention written out: explicit
    additive mask, exports to ONNX with dynamic B and T); ``attention`` False: MLP only."""

    def __init__(
        self, width: int, expansion: int, heads: int, dropout: float, attention: bool = True
    ) -> None:
        super().__init__()
        self.heads = heads
        self.attention = attention
        if attention:
            self.norm_attn = nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # h: (B, T, d_s); bias: (B, 1, 1|T, T) additive
        if self.attention:
            h = h + self.drop(self.attend(self.norm_attn(h), bias))
        return h + self.drop(self.fc2(F.gelu(self.fc1(self.norm(h)))))  # (B, T, d_s)

    def attend(self, n: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = n.shape
        q, k, v = self.qkv(n).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias  # (B, H, T, T)
        weights = self.drop(torch.softmax(scores, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))  # (B, T, d_s)


class AttentionPool(nn.Module):
    """A learned query reads the real tokens: softmax(LN(h) q / sqrt(d)) weighted sum of h."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, 1, bias=False)  # a (d_s, 1) weight: int8-quantizable
        nn.init.zeros_(self.query.weight)  # start: the masked mean

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # h: (B, T, d_s), mask: (B, T) -> (B, d_s)
        scores = self.query(self.norm(h))[..., 0] / math.sqrt(h.shape[-1])  # (B, T)
        scores = scores + (1.0 - mask.to(h.dtype)) * MASK_BIAS
        return (torch.softmax(scores, dim=-1)[..., None] * h).sum(1)


class TokenSideNetwork(nn.Module):
    """The shared ladder over tokens: gates, token blocks, pooling, head.
    Input: aligned taps u (B, K_s, T, d_s) and the mask (B, T)."""

    def __init__(self, config: SideConfig, num_labels: int) -> None:
        super().__init__()
        c = config
        self.temperature = c.gate_temperature
        self.causal = c.causal
        self.input_drop = nn.Dropout(c.input_dropout)
        self.alpha = nn.Parameter(torch.full((c.blocks,), float(c.gate_init)))
        attention = c.token_block == "transformer"
        self.blocks = nn.ModuleList(
            TokenBlock(c.width, c.expansion, c.heads, c.dropout, attention) for _ in range(c.blocks)
        )
        # shared by the architectures that pool by "attention" (SideConfig.token_rule)
        self.pool = AttentionPool(c.width) if "attention" in c.token_pools() else None
        self.token_dropout = c.token_dropout
        self.head = HEADS[c.head](c.width, num_labels)

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha / self.temperature)  # (K_s,)

    def token_states(
        self, u: torch.Tensor, mask: torch.Tensor, has_input: torch.Tensor
    ) -> torch.Tensor:
        """The last block's state at every token: (B, T, d_s). Padding positions hold
        values that nothing reads; with ``causal`` position t depends on tokens <= t only."""
        g = self.gates()
        u = self.input_drop(u)  # (B, K_s, T, d_s)
        bias = attention_bias(mask, self.causal)
        h = torch.zeros_like(u[:, 0])  # (B, T, d_s)
        for j, block in enumerate(self.blocks):
            gj = 1.0 - has_input[j] * (1.0 - g[j])  # no input: keep the state
            h = block(gj * h + (1.0 - gj) * u[:, j], bias)  # (B, T, d_s)
        return h

    def pooled(self, h: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
        """(B, T, d_s) states -> (B, d_s) over the real tokens, by the architecture's
        ``pool`` rule ("mean", "last", "attention")."""
        if pool == "last":
            return last_token(h, mask)
        if pool == "attention":
            if self.pool is None:
                raise FedMobiLLMError("pool 'attention': this side network has no attention pool")
            return self.pool(h, mask)
        return masked_mean(h, mask)

    def forward(
        self, u: torch.Tensor, mask: torch.Tensor, has_input: torch.Tensor, pool: str = "mean"
    ) -> torch.Tensor:
        h = self.token_states(u, mask, has_input)
        return self.head(self.pooled(h, mask, pool))  # (B, C)

    @torch.no_grad()
    def zero_head(self) -> None:
        """The head's output layer at zero: the linear skips' logits start alone."""
        nn.init.zeros_(self.head.out.weight)
        nn.init.zeros_(self.head.out.bias)


class PersonalModel(nn.Module):
    """Alignment of one architecture + the shared side network: (B, K, d) -> logits (B, C),
    or in token mode (B, K, T, d) + mask (B, T) -> logits (B, C)."""

    def __init__(self, align: Alignment, side: SideNetwork | TokenSideNetwork) -> None:
        super().__init__()
        self.align = align
        self.side = side
        self.tokens = isinstance(side, TokenSideNetwork)

    def forward(
        self, activations: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        side = self.side
        if isinstance(side, TokenSideNetwork) and side.training and side.token_dropout:
            if attention_mask is not None:  # training only: evaluation reads every token
                attention_mask = drop_tokens(attention_mask, side.token_dropout)
        logits = self.head(self.align(activations), attention_mask)  # (B, C)
        return self.with_skip(logits, activations, attention_mask)

    def with_skip(
        self, logits: torch.Tensor, activations: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """logits (B, C) plus the alignment's linear skip on the raw taps (token mode, with
        ``SideConfig.skip``), else logits unchanged."""
        if mask is None:
            return logits
        skip = self.align.skip_logits(activations, mask)
        return logits if skip is None else logits + skip

    def head(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Side network + head over already aligned taps u (B, K_s, d_s), or in token mode
        u (B, K_s, T, d_s) with mask (B, T)."""
        if isinstance(self.side, TokenSideNetwork):
            if mask is None:
                raise FedMobiLLMError("a token-mode side network needs the attention mask")
            return self.side(u, mask, self.align.has_input, self.align.pool)
        return self.side(u, self.align.has_input, self.align.norm_scale, self.align.norm_shift)

    def token_states(self, activations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token mode: the last side block's state per token, (B, T, d_s)."""
        if not isinstance(self.side, TokenSideNetwork):
            raise FedMobiLLMError("token_states needs a token-mode side network")
        has_input: torch.Tensor = self.align.has_input  # type: ignore[assignment]
        return self.side.token_states(self.align(activations), mask, has_input)


# -- trainer -------------------------------------------------------------------------------


class SideTrainer:
    """Owns the side network, the alignments (one per architecture) and the optimiser."""

    def __init__(self, config: SideConfig, label_names: list[str], seed: int = 0) -> None:
        if len(label_names) < 2:
            raise FedMobiLLMError("a classification task needs at least 2 label names")
        self.config = config
        self.label_names = list(label_names)
        self.seed = seed
        self.step = 0
        self.samples_seen = 0
        self.label_counts: dict[str, np.ndarray] = {}  # arch -> labels drawn so far, (C,)
        # arch -> its latest validation accuracy, set by whoever evaluates (the server's
        # trainer, the benchmarks); the anchor terms read it (SideConfig.anchor_target,
        # anchor_protect_best). Not saved: it is refreshed at the next evaluation.
        self.arch_quality: dict[str, float] = {}
        self._quality_warned = False
        # conflict_projection: steps taken and projections made ("shared", "align:<arch>",
        # "shared_dropped": steps whose anchor gradient on the shared network was dropped).
        # Not saved.
        self.conflicts: dict[str, int] = {}
        torch.manual_seed(seed)
        side_cls = TokenSideNetwork if config.tokens else SideNetwork
        self.side: SideNetwork | TokenSideNetwork = side_cls(config, len(label_names))
        self.aligns = nn.ModuleDict()
        # Averaged copies (config.ema > 0): what evaluation, prediction and export use.
        self.ema_side = copy.deepcopy(self.side).requires_grad_(False) if config.ema else None
        self.ema_aligns = nn.ModuleDict() if config.ema else None
        self.archs: dict[str, ArchSpec] = {}
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.side.parameters()), "lr_scale": 1.0}],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )

    # -- architecture registry --

    def add_architecture(
        self, arch: str, taps: list[int], depth: int, hidden: int, kind: str = ""
    ) -> None:
        """Idempotent. A new architecture gets fresh alignment; the side net is untouched.
        ``kind``: the backbone's, "encoder" or "decoder" (the bundle manifest's; "" unknown),
        which token mode's "auto" rule reads (SideConfig.token_rule)."""
        if arch in self.archs:
            old = self.archs[arch]
            if (old.taps, old.depth, old.hidden) != (list(taps), depth, hidden):
                raise FedMobiLLMError(f"architecture {arch} re-added with other taps/shape")
            return
        spec = ArchSpec(arch, list(taps), int(depth), int(hidden), key=f"a{len(self.archs)}")
        c = self.config
        if c.tokens:
            spec.kind = kind
            spec.pool, spec.skip = c.token_rule(arch, kind)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(arch.encode()))
            skip_labels = len(self.label_names) if spec.skip == "linear" else 0
            align = Alignment(spec, c.width, c.blocks, c.arch_norms, skip_labels, spec.pool)
        if skip_labels and self.step == 0 and isinstance(self.side, TokenSideNetwork):
            # the per-architecture skip's logits start alone, at zero (before any step)
            self.side.zero_head()
            if isinstance(self.ema_side, TokenSideNetwork):
                self.ema_side.zero_head()
        self.aligns[spec.key] = align
        if self.ema_aligns is not None:
            self.ema_aligns[spec.key] = copy.deepcopy(align).requires_grad_(False)
        self.archs[arch] = spec
        # the skip's weight matrix in a group of its own when it has its own weight decay
        decay = self.config.skip_weight_decay
        own = [align.skip.weight] if align.skip is not None and decay is not None else []
        self.optimizer.add_param_group(
            {
                "params": [p for p in align.parameters() if all(p is not w for w in own)],
                "lr_scale": self.config.align_lr_scale,
            }
        )
        if own:
            self.optimizer.add_param_group(
                {"params": own, "lr_scale": self.config.align_lr_scale, "weight_decay": decay}
            )
        log.info(
            "architecture %s: taps %s of %d -> side blocks %s%s",
            arch,
            taps,
            depth,
            align.block_of_tap,
            f", tokens pooled by {spec.pool}, skip {spec.skip}" if c.tokens else "",
        )

    def _model(self, arch: str, averaged: bool = False) -> PersonalModel:
        """The live model (training), or with ``averaged`` the EMA copy when enabled."""
        if arch not in self.archs:
            raise FedMobiLLMError(
                f"unknown architecture {arch!r}", hint="call add_architecture first"
            )
        key = self.archs[arch].key
        if averaged and self.ema_side is not None and self.ema_aligns is not None:
            return PersonalModel(self.ema_aligns[key], self.ema_side)
        return PersonalModel(self.aligns[key], self.side)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_side is None or self.ema_aligns is None:
            return
        decay = min(self.config.ema, (1 + self.step) / (10 + self.step))
        pairs = [(self.ema_side, self.side), (self.ema_aligns, self.aligns)]
        for avg, live in pairs:
            for pa, pl in zip(avg.parameters(), live.parameters(), strict=True):
                pa.lerp_(pl, 1.0 - decay)

    @torch.no_grad()
    def is_finite(self) -> bool:
        """Every weight (live and averaged) is finite: the only state worth keeping."""
        mods = [self.side, self.aligns, self.ema_side, self.ema_aligns]
        return all(
            bool(torch.isfinite(p).all()) for m in mods if m is not None for p in m.parameters()
        )

    def num_parameters(self, arch: str | None = None) -> int:
        mods = [self.side] if arch is None else [self.side, self.aligns[self.archs[arch].key]]
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

    @property
    def tokens(self) -> bool:
        """Token mode (``SideConfig.inputs == "tokens"``)."""
        return self.config.tokens

    def _unpack(self, item: tuple, what: str) -> tuple:
        """(arch, x, y, mask) from a group, or (arch, x, mask) from an anchor ("anchor"):
        pivot mode takes them without the mask (None), token mode with it."""
        size = (3 if what == "group" else 2) + int(self.tokens)
        if len(item) != size:
            form = "(arch, x, y" if what == "group" else "(arch, x"
            form += ", mask)" if self.tokens else ")"
            raise FedMobiLLMError(
                f"a {self.config.inputs}-mode {what} is {form}, got a {len(item)}-tuple",
                hint="token inputs need their mask (pad_tokens makes x and mask)"
                if self.tokens
                else "pivot inputs take no mask",
            )
        return (*item, None) if not self.tokens else tuple(item)

    def _tensors_in(
        self, x: np.ndarray, mask: np.ndarray | None, keep: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checked float32 x and int64 mask tensors (rows ``keep``). Token mode trims the
        padding past the longest real sequence: x (N, K, T', d), mask (N, T')."""
        x = np.asarray(x)
        if not self.tokens:
            if mask is not None:
                raise FedMobiLLMError("pivot inputs take no mask", hint="side.inputs is 'pivot'")
            if x.ndim != 3:
                raise FedMobiLLMError(f"pivot inputs are (N, K, d), got shape {x.shape}")
            x = x if keep is None else x[keep]
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), None
        if mask is None:
            raise FedMobiLLMError(
                "token inputs need their mask (N, T)", hint="pad_tokens returns x and mask"
            )
        mask = np.asarray(mask)
        if x.ndim != 4 or mask.shape != (x.shape[0], x.shape[2]):
            raise FedMobiLLMError(
                f"token inputs are x (N, K, T, d) and mask (N, T), got {x.shape} and {mask.shape}"
            )
        if keep is not None:
            x, mask = x[keep], mask[keep]
        real = mask != 0
        t = int(np.flatnonzero(real.any(0)).max(initial=0)) + 1  # through the last real token
        xt = torch.from_numpy(np.ascontiguousarray(x[:, :, :t], dtype=np.float32))
        return xt, torch.from_numpy(np.ascontiguousarray(real[:, :t], dtype=np.int64))

    def train_step(
        self,
        groups: list[tuple],
        anchors: list[tuple] | None = None,
    ) -> float:
        """One optimiser step over mini-batch groups [(arch, x (N, K, d), y (N,))], or in
        token mode [(arch, x (N, K, T, d), y (N,), mask (N, T))] (x zero-padded, mask 1 at
        real tokens; ``pad_tokens`` makes both). Unlabelled samples (y = -1) are ignored.
        ``anchors``: [(arch, x (M, K, d))] (token mode: [(arch, x (M, K, T_a, d), mask
        (M, T_a))], T_a per architecture), row i of every array the same anchor text through
        that architecture's backbone; with two or more architectures they add the
        anchor-alignment loss (``SideConfig``). Returns the mean loss (classification +
        anchor terms). Raises ``NonFiniteStep`` (nothing applied) when the loss or the
        gradients are not finite."""
        self.side.train()
        self.aligns.train()
        logits, targets, archs = [], [], []
        for item in groups:
            arch, x, y, mask = self._unpack(item, "group")
            keep = np.asarray(y) >= 0
            if not keep.any():
                continue
            yk = np.asarray(y)[keep].astype(np.int64)  # (N,)
            counts = self.label_counts.setdefault(arch, np.zeros(len(self.label_names)))
            counts += np.bincount(yk, minlength=len(self.label_names))
            xt, mt = self._tensors_in(x, mask, keep)  # (N, K, d) | (N, K, T, d), (N, T)
            logits.append(self._model(arch)(xt, mt))  # (N, C)
            targets.append(torch.from_numpy(yk))
            archs.append(arch)
        if not logits:
            return float("nan")
        if self.config.logit_adjust:
            shift = self._label_shift()
            logits = [lg + shift[a] for lg, a in zip(logits, archs, strict=True)]
        anchored = anchors is not None and len(anchors) > 1
        if self.config.conflict_projection != "off":
            loss = self._projected_step(logits, targets, archs, anchors if anchored else None)
        else:
            loss = F.cross_entropy(
                torch.cat(logits), torch.cat(targets), label_smoothing=self.config.label_smoothing
            )
            if anchored:
                loss = loss + self._anchor_loss(anchors)  # type: ignore[arg-type]
            optimizer_step(self.optimizer, loss, self.lr_at(self.step), self.config.max_grad_norm)
        self.step += 1
        self._update_ema()
        self.samples_seen += sum(len(t) for t in targets)
        return float(loss.detach())

    def _projected_step(
        self,
        logits: list[torch.Tensor],
        targets: list[torch.Tensor],
        archs: list[str],
        anchors: list[tuple] | None,
    ) -> torch.Tensor:
        """``conflict_projection``: each architecture's labelled loss (its share of the
        batch's mean cross-entropy; logits (N_a, C), targets (N_a,)) and the anchor terms
        differentiated apart, the gradients projected (``project_gradients``) and applied.
        Returns the total loss, the same number as the plain step's."""
        n = sum(len(t) for t in targets)
        own: dict[str, torch.Tensor] = {}
        seen: dict[str, set[int]] = {}
        for lg, t, a in zip(logits, targets, archs, strict=True):
            seen.setdefault(a, set()).update(t.tolist())
            part = F.cross_entropy(
                lg, t, reduction="sum", label_smoothing=self.config.label_smoothing
            )
            own[a] = own.get(a, torch.zeros(())) + part / n
        transfer = self._anchor_loss(anchors) if anchors is not None else None
        loss = sum(own.values(), torch.zeros(())) + (0.0 if transfer is None else transfer)
        if not torch.isfinite(loss):
            raise NonFiniteStep("loss")
        shared = list(self.side.parameters())
        align = {a: list(self.aligns[s.key].parameters()) for a, s in self.archs.items()}
        grads = {a: _flat_grads(own[a], [*shared, *align[a]]) for a in own}
        ns = sum(p.numel() for p in shared)
        split = {a: (g[:ns], g[ns:]) for a, g in grads.items()}
        moved = None
        if transfer is not None and transfer.requires_grad:
            everything = [*shared, *(p for a in self.archs for p in align[a])]
            flat = _flat_grads(transfer, everything)
            moved = (flat[:ns], {})
            at = ns
            for a in self.archs:
                size = sum(p.numel() for p in align[a])
                moved[1][a] = flat[at : at + size]
                at += size
        every = len(self.label_names)
        protected = {a for a, labels in seen.items() if len(labels) == every}
        g_shared, g_align, counts = project_gradients(
            split, moved, self.config.conflict_projection, protected
        )
        counts["unprotected"] = len(seen) - len(protected)
        self.optimizer.zero_grad(set_to_none=True)
        if g_shared is not None:
            _set_grads(shared, g_shared)
        for a, g in g_align.items():
            _set_grads(align[a], g)
        for k, v in {"steps": 1, **counts}.items():
            self.conflicts[k] = self.conflicts.get(k, 0) + v
        if counts["shared_dropped"] and self.conflicts["shared_dropped"] == 1:
            log.info(
                "conflict_projection: the anchor gradient on the shared side network conflicts "
                "with some architecture's own after %d projection passes; it is left out of "
                "such steps (counted in SideTrainer.conflicts['shared_dropped'])",
                PROJECTION_PASSES,
            )
        apply_gradients(self.optimizer, self.lr_at(self.step), self.config.max_grad_norm)
        return loss

    def _label_shift(self) -> dict[str, torch.Tensor]:
        """logit_adjust * (log p_a - log p) per architecture, (C,) each (add-one smoothed);
        p the fleet's draws or uniform (``SideConfig.logit_adjust_prior``)."""
        total = sum(self.label_counts.values())
        log_p = np.log((total + 1.0) / (total.sum() + len(total)))  # (C,)
        if self.config.logit_adjust_prior == "uniform":
            log_p = np.full(len(total), -np.log(len(total)))
        return {
            a: torch.from_numpy(
                self.config.logit_adjust * (np.log((c + 1.0) / (c.sum() + len(c))) - log_p)
            ).float()
            for a, c in self.label_counts.items()
        }

    def _anchor_loss(self, anchors: list[tuple]) -> torch.Tensor:
        """Agreement of the architectures on the same anchor texts (see ``SideConfig``).
        Token mode compares the masked mean over tokens of each block's aligned taps. With
        ``anchor_protect_best`` the best architecture's terms are detached (a teacher only);
        ``anchor_target`` "quality" weights the KL target by ``anchor_weights``."""
        c = self.config
        items = [self._unpack(item, "anchor") for item in anchors]  # (arch, x, mask)
        rows = {len(x) for _, x, _ in items}
        if len(rows) != 1:
            raise FedMobiLLMError(f"anchor arrays must have one row count, not {sorted(rows)}")
        archs = [arch for arch, _, _ in items]
        models = [self._model(arch) for arch in archs]
        inputs = [self._tensors_in(x, mask) for _, x, mask in items]
        us = [m.align(x) for m, (x, _) in zip(models, inputs, strict=True)]
        # each (M, K_s, d_s), or (M, K_s, T_a, d_s) in token mode
        teachers = self.anchor_teachers(archs) if c.anchor_protect_best else set()
        pulled = torch.tensor([0.0 if a in teachers else 1.0 for a in archs])  # (A,)
        loss = torch.zeros(())
        if c.anchor_feature:
            pooled = [
                u if mt is None else _pool_blocks(u, mt)
                for u, (_, mt) in zip(us, inputs, strict=True)
            ]
            z = torch.stack(
                [p.detach() if a in teachers else p for p, a in zip(pooled, archs, strict=True)]
            )
            z = F.layer_norm(z, z.shape[-1:])  # (A, M, K_s, d_s)
            loss = loss + c.anchor_feature * (z - z.mean(0, keepdim=True)).pow(2).mean()
        if c.anchor_kl:
            logp = torch.stack(
                [
                    F.log_softmax(m.with_skip(self._anchor_head(m, u, mt), x, mt), -1)
                    for m, u, (x, mt) in zip(models, us, inputs, strict=True)
                ]
            )  # (A, M, C)
            w = torch.from_numpy(self.anchor_weights(archs)).float()  # (A,), sums to 1
            target = (logp.exp() * w[:, None, None]).sum(0, keepdim=True).detach()  # (1, M, C)
            kl = (target * (target.clamp_min(1e-8).log() - logp)).sum(-1)  # (A, M)
            loss = loss + c.anchor_kl * (kl.mean(1) * pulled).sum() / len(archs)
        return loss

    def _anchor_head(
        self, model: PersonalModel, u: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits (M, C) of aligned anchors u; with ``anchor_shared`` off the shared side
        network's weights are detached (the gradient reaches u, i.e. the alignment, only)."""
        if self.config.anchor_shared:
            return model.head(u, mask)
        frozen = {k: v.detach() for k, v in self.side.named_parameters()}
        a = model.align
        args = (
            (u, mask, a.has_input, a.pool)
            if self.tokens
            else (u, a.has_input, a.norm_scale, a.norm_shift)
        )
        return torch.func.functional_call(self.side, frozen, args)

    def anchor_teacher(self, archs: list[str]) -> str | None:
        """The architecture of ``archs`` with the best validation accuracy
        (``arch_quality``), or None while none of them has been evaluated."""
        known = [a for a in archs if a in self.arch_quality]
        if not known:
            self._say_no_quality()
            return None
        return max(known, key=lambda a: (self.arch_quality[a], a))

    def anchor_teachers(self, archs: list[str]) -> set[str]:
        """``anchor_teacher`` and every architecture of ``archs`` whose validation accuracy is
        within ``anchor_protect_margin`` of it (empty before any evaluation)."""
        best = self.anchor_teacher(archs)
        if best is None:
            return set()
        floor = self.arch_quality[best] - self.config.anchor_protect_margin
        return {a for a in archs if self.arch_quality.get(a, -1.0) >= floor} | {best}

    def anchor_weights(self, archs: list[str]) -> np.ndarray:
        """(A,) weights of the architectures' predictions in the anchor KL target, summing
        to 1: equal ("mean"), or ("quality") proportional to validation accuracy above
        chance (1 / labels); equal when none is known or none is above chance."""
        n = len(archs)
        if self.config.anchor_target == "mean":
            return np.full(n, 1.0 / n)
        if not any(a in self.arch_quality for a in archs):
            self._say_no_quality()
            return np.full(n, 1.0 / n)
        chance = 1.0 / len(self.label_names)
        # an architecture not yet evaluated counts as the mean of those that were
        mean_q = float(np.mean([q for a, q in self.arch_quality.items() if a in archs]))
        q = np.asarray([self.arch_quality.get(a, mean_q) for a in archs], np.float64)
        w = np.clip(q - chance, 0.0, None)
        return w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)

    def _say_no_quality(self) -> None:
        if not self._quality_warned:
            self._quality_warned = True
            log.info(
                "anchor_target %r / anchor_protect_best %s: no validation accuracy yet, "
                "the anchor terms treat every architecture alike until the first evaluation",
                self.config.anchor_target,
                self.config.anchor_protect_best,
            )

    @torch.no_grad()
    def predict(
        self, arch: str, x: np.ndarray, mask: np.ndarray | None = None, batch: int = 0
    ) -> np.ndarray:
        """Logits (N, C) of the averaged model: x (N, K, d), or in token mode x (N, K, T, d)
        with mask (N, T) (required). ``batch``: rows per forward (0: 1024, tokens 128)."""
        model = self._model(arch, averaged=True).eval()
        batch = batch or (128 if self.tokens else 1024)
        outs = []
        for i in range(0, len(x), batch):
            part = None if mask is None else np.asarray(mask)[i : i + batch]
            outs.append(model(*self._tensors_in(np.asarray(x)[i : i + batch], part)))  # (b, C)
        if not outs:
            self._tensors_in(np.asarray(x), mask)  # the same errors for an empty x
        return torch.cat(outs).numpy() if outs else np.zeros((0, len(self.label_names)))

    def evaluate(
        self, arch: str, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None
    ) -> dict[str, float]:
        """Accuracy and loss on the labelled rows (y >= 0); token mode needs mask (N, T)."""
        keep = np.asarray(y) >= 0
        part = None if mask is None else np.asarray(mask)[keep]
        logits = self.predict(arch, np.asarray(x)[keep], part)
        yk = np.asarray(y)[keep]
        if len(yk) == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(yk.astype(np.int64)))
        acc = float((logits.argmax(1) == yk).mean())
        return {"accuracy": acc, "loss": float(loss), "n": int(len(yk))}

    # -- persistence --

    def state(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "label_names": self.label_names,
            "seed": self.seed,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "label_counts": {a: c.tolist() for a, c in self.label_counts.items()},
            "archs": [asdict(a) for a in self.archs.values()],
        }

    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"side.{k}": v for k, v in self.side.state_dict().items()}
        tensors.update({f"align.{k}": v for k, v in self.aligns.state_dict().items()})
        if self.ema_side is not None and self.ema_aligns is not None:
            tensors.update({f"ema_side.{k}": v for k, v in self.ema_side.state_dict().items()})
            tensors.update({f"ema_align.{k}": v for k, v in self.ema_aligns.state_dict().items()})
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for name, value in st.items():
                tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
        return {k: v.detach().contiguous().clone() for k, v in tensors.items()}, {
            "param_groups": groups
        }

    def save(self, directory: Path) -> None:
        """Weights + optimiser (safetensors) and state (JSON), each written atomically;
        the JSON, written last, names the weights' sha256 so a torn pair is detected."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, opt_meta = self._tensors()
        with replacing(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        state = {
            **self.state(),
            "optimizer": opt_meta,
            "weights_sha256": sha256_file(directory / WEIGHTS_FILE),
        }
        write_atomic(directory / STATE_FILE, json.dumps(state, indent=1))

    @classmethod
    def load(cls, directory: Path) -> SideTrainer:
        directory = Path(directory)
        try:
            state = json.loads((directory / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FedMobiLLMError(f"cannot read side-network state in {directory}: {exc}") from exc
        if state.get("format_version") != FORMAT_VERSION:
            raise FedMobiLLMError(f"{directory}: unsupported side state version")
        if sha256_file(directory / WEIGHTS_FILE) != state["weights_sha256"]:
            raise FedMobiLLMError(f"{directory}: weights do not match state (torn checkpoint)")
        trainer = cls(SideConfig(**state["config"]), state["label_names"], state["seed"])
        for a in state["archs"]:
            trainer.add_architecture(
                a["name"], a["taps"], a["depth"], a["hidden"], a.get("kind", "")
            )
            _check_rule(trainer.archs[a["name"]], a, directory)
            trainer.archs[a["name"]].bundle_sha256s = list(a.get("bundle_sha256s", []))
            trainer.archs[a["name"]].encoding = a.get("encoding", "int8")
        tensors = load_file(str(directory / WEIGHTS_FILE))
        trainer.side.load_state_dict(_strip(tensors, "side."))
        trainer.aligns.load_state_dict(_strip(tensors, "align."))
        if trainer.ema_side is not None and trainer.ema_aligns is not None:
            trainer.ema_side.load_state_dict(_strip(tensors, "ema_side."))
            trainer.ema_aligns.load_state_dict(_strip(tensors, "ema_align."))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = v
        trainer.optimizer.load_state_dict(
            {"state": opt_state, "param_groups": state["optimizer"]["param_groups"]}
        )
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        trainer.step = state["step"]
        trainer.samples_seen = state["samples_seen"]
        trainer.label_counts = {
            a: np.asarray(c, np.float64) for a, c in state.get("label_counts", {}).items()
        }
        return trainer

    # -- personal model --

    def export_personal(
        self,
        arch: str,
        out_dir: Path,
        bundle_sha256s: list[str],
        pte: bool = False,
        quant: str = "int8",
    ) -> Path:
        """personal.onnx (activations (B, K, d) -> logits (B, C); token mode: activations
        (B, K, T, d) + attention_mask (B, T) -> logits (B, C)), personal.safetensors,
        personal.json [+ personal.pte; token mode: batch 1]. ``quant``: personal.onnx
        weights, int8 or fp32. Returns out_dir."""
        from fedmobillm.server.personal import export_personal_model

        spec = self.archs.get(arch)
        if spec is None:
            raise FedMobiLLMError(f"unknown architecture {arch!r}")
        return export_personal_model(
            self._model(arch, averaged=True),
            spec,
            Path(out_dir),
            bundle_sha256s,
            label_names=self.label_names,
            step=self.step,
            pte=pte,
            quant=quant,
        )


def _flat_grads(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """d loss / d params, flattened in order (zeros where the loss does not reach): (n,)."""
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(params, got, strict=True)
        ]
    )


def _set_grads(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Each parameter's ``.grad`` from its slice of ``flat`` (n,), in order."""
    at = 0
    for p in params:
        p.grad = flat[at : at + p.numel()].view_as(p).clone()
        at += p.numel()


def _check_rule(spec: ArchSpec, saved: dict[str, Any], directory: Path) -> None:
    """A loaded architecture reads its tokens as it was trained to (the saved rule; a
    checkpoint from before per-architecture rules saved none: its config's, the same)."""
    for name in ("pool", "skip"):
        if name in saved and saved[name] != getattr(spec, name):
            raise FedMobiLLMError(
                f"{directory}: architecture {spec.name} was trained with {name} "
                f"{saved[name]!r}, but its config now gives {getattr(spec, name)!r}",
                hint="load it with the config it was saved with (side.json)",
            )


def _pool_blocks(u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens of aligned taps u (M, K_s, T, d_s), mask (M, T): (M, K_s, d_s)."""
    m = mask.to(u.dtype)[:, None, :, None]  # (M, 1, T, 1)
    return (u * m).sum(2) / m.sum(2).clamp(min=1.0)


def pad_tokens(arrays: list[np.ndarray], dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-sample token taps, each (K, T_i, d), zero-padded at the end:
    x (N, K, Tmax, d) of ``dtype`` and mask (N, Tmax) int64 (1 at the T_i real tokens)."""
    if not arrays:
        raise FedMobiLLMError("pad_tokens needs at least one array")
    shapes = {(a.shape[0], a.shape[2]) for a in arrays if a.ndim == 3}
    if len(shapes) != 1 or any(a.ndim != 3 for a in arrays):
        raise FedMobiLLMError(
            "pad_tokens takes arrays (K, T_i, d) with one K and d, got shapes "
            f"{sorted({tuple(a.shape) for a in arrays})[:4]}"
        )
    ((k, d),) = shapes
    lengths = [a.shape[1] for a in arrays]
    x = np.zeros((len(arrays), k, max(lengths), d), dtype=dtype)
    mask = np.zeros((len(arrays), max(lengths)), dtype=np.int64)
    for i, (a, t) in enumerate(zip(arrays, lengths, strict=True)):
        x[i, :, :t] = a
        mask[i, :t] = 1
    return x, mask


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
