"""The side network's settings (``SideConfig``), without torch: the server's settings
(``server/settings.py``) and the serving process import them, and a process that only
ingests (`serve --no-train`, `--trainer-process`, the workers) never loads torch.
``server/side.py`` re-exports it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from fedmobillm.errors import FedMobiLLMError

ANCHOR_TARGETS = ("mean", "quality")
# SideConfig.conflict_projection: which gradients are projected off an architecture's own
# labelled-loss gradient where they conflict with it (``project_gradients``)
CONFLICT_PROJECTIONS = ("off", "anchors", "all")
# Token mode: how the head reads the token states (SideConfig.pool)
TOKEN_POOLS = ("mean", "attention", "last")
# Token mode: the per-architecture options (SideConfig.per_arch), "auto" (SideConfig.pool
# and skip) and the rule "auto" picks by the backbone's kind (the bundle manifest's "kind"):
# a causal decoder's last real token is the only one that has read the whole text, so its
# network pools it and adds the linear skip; an encoder's tokens have all read the text and
# its network pools their mean (chosen on validation, docs/accuracy.md, token sweeps)
TOKEN_SKIPS = ("none", "linear")
TOKEN_ARCH_OPTIONS = ("pool", "skip")
TOKEN_KINDS = ("encoder", "decoder")
AUTO_TOKEN_RULE = {"decoder": ("last", "linear"), "encoder": ("mean", "none")}
# SideConfig.per_arch's default: a decoder's rule (AUTO_TOKEN_RULE's); encoders and
# architectures of unknown kind read by pool/skip (mean, none). Chosen on validation in a
# mixed MiniLM-L6 + SmolLM2 fleet (docs/accuracy.md, per-architecture token rules)
DEFAULT_PER_ARCH = {"decoder": {"pool": "last", "skip": "linear"}}
# SideConfig.head: the heads side.HEADS builds (one class per name)
HEAD_NAMES = ("classification",)


@dataclass
class SideConfig:
    """Side network, alignment and optimisation. Defaults chosen by measurement (docs/accuracy.md);
    they are the server's (ServerSettings.side)."""

    width: int = 128  # d_s
    blocks: int = 3  # K_s side blocks
    block: str = "mlp"  # "mlp" | "transformer" (pivot mode)
    # What the side network reads: "pivot" (one vector per tap, (N, K, d)) or "tokens" (every
    # real token's taps, (N, K, T, d) + mask (N, T)); a federation is one or the other.
    inputs: str = "pivot"
    # Token mode only: side blocks ("transformer": pre-LN attention over the tokens + MLP;
    # "mlp": the MLP alone at each token, no mixing before pooling), the pooling the head
    # reads ("mean": masked mean over real tokens; "attention": a learned query; "last": the
    # last real token, which in a causal decoder is the only one that has read the whole
    # text), and ``causal``: attention never looks at later positions (the lm task).
    # "auto": each architecture by its kind (AUTO_TOKEN_RULE: decoders "last", encoders
    # "mean"); ``per_arch`` overrides it per architecture.
    token_block: str = "transformer"
    pool: str = "mean"
    causal: bool = False
    # Token mode only: "linear" adds, per architecture, Linear(LayerNorm(pool of the last
    # tap's tokens)) -> logits to the side network's logits (pooled by ``pool``'s rule, the
    # masked mean for "attention"): a linear probe inside the personal model that the token
    # network refines. Its weights and the side head's output layer start at zero. "none": off.
    # "auto": by the architecture's kind (decoders "linear", encoders "none").
    skip: str = "none"
    # Token mode: per-architecture ``pool`` / ``skip``, one side network over a fleet whose
    # backbones read their tokens differently. Keys: an architecture name (the manifest's
    # ``family/model/dD/LL/tapsT``, as the server's status lists it) or a kind ("encoder",
    # "decoder"); values: {"pool": ..., "skip": ...} (either or both; "auto" too). An
    # architecture's own entry wins over its kind's, which wins over ``pool``/``skip``
    # (``token_rule``). Config file: [server.side.per_arch.decoder] pool = "last"; env: the
    # table as JSON, FEDMOBILLM_SIDE__PER_ARCH='{"decoder": {"pool": "last"}}'.
    # A dict[str, dict[str, str]] (a JSON string is read into one). Default
    # DEFAULT_PER_ARCH (decoders: last + linear); {} applies pool/skip to every architecture.
    per_arch: Any = field(default_factory=lambda: copy.deepcopy(DEFAULT_PER_ARCH))
    # Token mode, training only: each real token of a training sample is dropped from the
    # mask with this probability (a sample keeps at least one), an augmentation against
    # memorising few records; evaluation and export read every token. 0 = off.
    token_dropout: float = 0.0
    # AdamW's (decoupled) weight decay on the skip's weight matrix; None: ``weight_decay``.
    # A linear probe on ~1,000 records wants a strong L2 (bench_accuracy's probe: C = 0.01).
    skip_weight_decay: float | None = None
    expansion: int = 2  # MLP hidden = expansion * d_s
    heads: int = 4  # transformer blocks only
    dropout: float = 0.3
    input_dropout: float = 0.0  # dropout on the aligned tap inputs u_j
    gate_temperature: float = 1.0  # T in g = sigmoid(alpha / T)
    gate_init: float = 0.0  # alpha at start: g = 0.5
    head: str = "classification"
    # per-architecture affine (scale, shift) after each shared LayerNorm (side blocks and
    # head): 2 x (K_s + 1) x d_s alignment parameters, so the shared blocks can be
    # normalised per input distribution (MLP blocks only)
    arch_norms: bool = False
    # Optimisation
    lr: float = 1e-3  # the server's; benchmarks/bench_accuracy.py measures with 2e-3
    align_lr_scale: float = 1.0  # alignment lr = lr * this
    weight_decay: float = 0.1
    warmup_steps: int = 50
    schedule: str = "constant"  # "constant" (asynchronous, no known end) | "cosine"
    total_steps: int = 0  # cosine only
    label_smoothing: float = 0.0
    # Logit adjustment for label skew between architectures: each architecture's logits are
    # trained with + logit_adjust * (log p_a - log p) added, p_a the label distribution of
    # the batches it has drawn so far, p that of all architectures together. A label skew
    # of one architecture's devices is absorbed there instead of being learnt by the shared
    # side network (which anchor alignment makes every architecture read alike); prediction
    # and export use the plain logits, i.e. the fleet's label distribution. 0 = off (the
    # default: on Dirichlet(0.1) it helped the --quick run but not the full one, docs/accuracy.md).
    logit_adjust: float = 0.0
    # The reference p of the logit adjustment: "fleet" (the label distribution of every
    # architecture's draws together) or "uniform" (balanced softmax per architecture:
    # prediction assumes balanced labels). The fleet's draws are the devices' mix, not the
    # population's: under skew they are themselves skewed, and "fleet" then biases every
    # architecture's prediction towards them (issue 23, docs/skew.md).
    logit_adjust_prior: str = "fleet"
    max_grad_norm: float = 1.0
    ema: float = 0.99  # > 0: evaluate/export an exponential moving average of the weights
    # Anchor alignment (used only when devices of two or more architectures uploaded
    # activations of the server's public, unlabelled anchor texts): per step, a batch of
    # ``anchor_batch`` anchors seen by every architecture adds
    #   anchor_kl * KL(mean of the architectures' predictions || each one's prediction)
    #   + anchor_feature * MSE(each architecture's LayerNormed aligned taps, their mean)
    # so the alignments map one text to one place and the personal models agree.
    anchor_batch: int = 64
    anchor_kl: float = 3.0
    anchor_feature: float = 5.0
    # Which architectures the anchor terms pull, and towards what (issue 23, docs/skew.md).
    # ``SideTrainer.arch_quality`` (each architecture's latest validation accuracy, set by
    # whoever evaluates) ranks them; without it every architecture is treated alike.
    #   anchor_target "mean": the KL target is the architectures' mean prediction;
    #                 "quality": their mean weighted by validation accuracy above chance
    #                 (an architecture no better than chance, e.g. one whose devices hold a
    #                 single label, teaches nothing);
    #   anchor_protect_best: the architecture with the best validation accuracy is a
    #                 teacher only: no anchor term moves it (its prediction and features
    #                 are targets, detached), so the weaker ones never pull the strongest.
    #   anchor_shared: the anchor terms train the shared side network too (True), or only
    #                 the alignments (False: the shared network and head are held fixed
    #                 for them, so with anchor_protect_best the best architecture's model
    #                 is moved by the labelled loss alone).
    anchor_target: str = "mean"
    anchor_protect_best: bool = False
    # with anchor_protect_best: every architecture whose validation accuracy is within this
    # (a fraction, 0.02 = 2 points) of the best is a teacher only too, so validation noise
    # between two close architectures cannot leave the truly strongest one pulled
    anchor_protect_margin: float = 0.0
    anchor_shared: bool = True
    # Negative transfer without a ranking (issue 23, docs/skew.md): "anchors" projects the
    # anchor terms' gradient off each architecture's own labelled-loss gradient wherever they
    # conflict (its alignment: off its own; the shared network: off every architecture's), so
    # to first order the anchors never raise any architecture's own loss, whatever the
    # validation split says (an architecture whose batch lacks a label is not guarded: its
    # own loss cannot speak for the missing label, the anchors can); "all" also projects
    # each architecture's labelled gradient on the shared network off the others' (PCGrad);
    # "off": one plain backward pass. Costs one backward pass per architecture, plus one for
    # the anchors (``project_gradients``). Measured, not chosen (docs/skew.md).
    conflict_projection: str = "off"
    # Local adaptation (issue 23, server/adapt.py, docs/skew.md): an architecture's personal
    # model is the shared one fine-tuned on that architecture's own labelled samples for up
    # to ``adapt_steps`` steps (batches of ``adapt_batch``), the count (0 included: the
    # shared model) chosen on its validation samples every ``adapt_every`` steps; the
    # alignment and head at lr * adapt_lr_scale, the shared blocks and gates at that times
    # adapt_shared_lr_scale (0: fixed). 0 steps = off. Classification only.
    adapt_steps: int = 0
    adapt_every: int = 100  # 25 fitted the validation noise (docs/skew.md, third round)
    adapt_batch: int = 32
    adapt_lr_scale: float = 0.5
    adapt_shared_lr_scale: float = 0.0

    def __post_init__(self) -> None:
        problems = self._token_problems()
        if self.adapt_steps < 0 or self.adapt_every < 1 or self.adapt_batch < 1:
            problems.append("adapt_steps must be >= 0 (0 = off), adapt_every and adapt_batch >= 1")
        if min(self.adapt_lr_scale, self.adapt_shared_lr_scale) < 0:
            problems.append("adapt_lr_scale and adapt_shared_lr_scale must be >= 0")
        if self.adapt_steps and self.causal:
            problems.append("adapt_steps is for classification (task lm: leave it 0)")
        if self.logit_adjust_prior not in ("fleet", "uniform"):
            problems.append(
                f"logit_adjust_prior must be 'fleet' or 'uniform', not {self.logit_adjust_prior!r}"
            )
        if self.conflict_projection not in CONFLICT_PROJECTIONS:
            problems.append(
                f"conflict_projection must be one of {list(CONFLICT_PROJECTIONS)}, "
                f"not {self.conflict_projection!r}"
            )
        if self.anchor_target not in ANCHOR_TARGETS:
            problems.append(
                f"anchor_target must be one of {list(ANCHOR_TARGETS)}, not {self.anchor_target!r}"
            )
        if self.block not in ("mlp", "transformer"):
            problems.append(f"block must be 'mlp' or 'transformer', not {self.block!r}")
        if self.head not in HEAD_NAMES:
            problems.append(f"head must be one of {sorted(HEAD_NAMES)}, not {self.head!r}")
        if self.schedule not in ("constant", "cosine"):
            problems.append(f"schedule must be 'constant' or 'cosine', not {self.schedule!r}")
        if self.schedule == "cosine" and self.total_steps <= 0:
            problems.append("schedule 'cosine' needs total_steps > 0")
        if not 0.0 <= self.ema < 1.0:
            problems.append("ema must be in [0, 1)")
        if self.arch_norms and self.block != "mlp":
            problems.append("arch_norms needs MLP side blocks")
        if self.block == "transformer" and self.width % self.heads:
            problems.append(f"width {self.width} must be divisible by heads {self.heads}")
        if not 0.0 <= self.anchor_protect_margin <= 1.0:
            problems.append(
                f"anchor_protect_margin must be in [0, 1], not {self.anchor_protect_margin}"
            )
        if self.anchor_batch < 1 or min(self.anchor_kl, self.anchor_feature) < 0:
            problems.append("anchor_batch must be positive, anchor_kl and anchor_feature >= 0")
        if min(self.width, self.blocks, self.expansion) <= 0 or self.gate_temperature <= 0:
            problems.append("width, blocks, expansion and gate_temperature must be positive")
        if not self.lr > 0:
            problems.append(f"lr must be positive, not {self.lr}")
        if problems:
            raise FedMobiLLMError("invalid side-network config: " + "; ".join(problems))

    @property
    def tokens(self) -> bool:
        """Token mode: the side network reads every token's taps."""
        return self.inputs == "tokens"

    def _token_problems(self) -> list[str]:
        problems = []
        if self.inputs not in ("pivot", "tokens"):
            problems.append(f"inputs must be 'pivot' or 'tokens', not {self.inputs!r}")
        if self.token_block not in ("transformer", "mlp"):
            problems.append(f"token_block must be 'transformer' or 'mlp', not {self.token_block!r}")
        problems += _rule_problems("", {"pool": self.pool, "skip": self.skip})
        problems += self._per_arch_problems()
        if self.skip_weight_decay is not None and not self.skip_weight_decay >= 0:
            problems.append(f"skip_weight_decay must be >= 0, not {self.skip_weight_decay}")
        if not 0.0 <= self.token_dropout < 1.0:
            problems.append(f"token_dropout must be in [0, 1), not {self.token_dropout}")
        if self.inputs != "tokens" and (
            self.pool not in ("mean", "auto")
            or self.skip not in ("none", "auto")
            or self.token_dropout
            or self.per_arch not in ({}, DEFAULT_PER_ARCH)
        ):
            problems.append(
                "pool, skip, per_arch and token_dropout are token-mode options (inputs 'tokens')"
            )
        if self.causal and self.inputs != "tokens":
            problems.append("causal needs inputs 'tokens' (pivot inputs have no token order)")
        if self.inputs == "tokens":
            if self.arch_norms:
                problems.append("arch_norms is for pivot inputs only (MLP side blocks)")
            if self.token_block == "transformer" and self.width % self.heads:
                problems.append(f"width {self.width} must be divisible by heads {self.heads}")
        return problems

    def _per_arch_problems(self) -> list[str]:
        if isinstance(self.per_arch, str):  # env: the table as JSON
            try:
                self.per_arch = json.loads(self.per_arch)
            except json.JSONDecodeError as exc:
                return [f"per_arch is not a JSON table ({exc}): {self.per_arch!r}"]
        if not isinstance(self.per_arch, dict):
            return [f"per_arch must be a table of architecture -> options, not {self.per_arch!r}"]
        problems = []
        for key, opts in self.per_arch.items():
            if not isinstance(opts, dict) or not opts:
                problems.append(
                    f"per_arch[{key!r}] must be a non-empty table of {list(TOKEN_ARCH_OPTIONS)}, "
                    f"not {opts!r}"
                )
                continue
            unknown = sorted(set(opts) - set(TOKEN_ARCH_OPTIONS))
            if unknown:
                problems.append(
                    f"per_arch[{key!r}] has unknown options {unknown}: only "
                    f"{list(TOKEN_ARCH_OPTIONS)} are per architecture"
                )
            problems += _rule_problems(f"per_arch[{key!r}].", opts)
        return problems

    def token_rule(self, arch: str, kind: str = "") -> tuple[str, str]:
        """(pool, skip) of architecture ``arch`` of backbone kind ``kind`` ("encoder",
        "decoder", "" unknown): ``per_arch[arch]``, else ``per_arch[kind]``, else
        ``pool``/``skip``; "auto" resolved by the kind (AUTO_TOKEN_RULE)."""
        own = {**self.per_arch.get(kind, {}), **self.per_arch.get(arch, {})}
        pool, skip = own.get("pool", self.pool), own.get("skip", self.skip)
        if "auto" in (pool, skip):
            if kind not in AUTO_TOKEN_RULE:
                raise FedMobiLLMError(
                    f"architecture {arch!r}: pool/skip 'auto' follows the backbone's kind "
                    f"(encoder or decoder), which is not known here (kind {kind!r})",
                    hint="register it with its kind (the bundle manifest's), or set pool and "
                    "skip for it explicitly: per_arch.<architecture> = {pool=..., skip=...}",
                )
            auto_pool, auto_skip = AUTO_TOKEN_RULE[kind]
            pool = auto_pool if pool == "auto" else pool
            skip = auto_skip if skip == "auto" else skip
        return pool, skip

    def token_pools(self) -> set[str]:
        """Every pooling rule some architecture may get ("auto" expanded)."""
        given = {self.pool} | {o["pool"] for o in self.per_arch.values() if "pool" in o}
        auto = {p for p, _ in AUTO_TOKEN_RULE.values()} if "auto" in given else set()
        return (given - {"auto"}) | auto


def _rule_problems(where: str, opts: dict) -> list[str]:
    problems = []
    pool, skip = opts.get("pool", "mean"), opts.get("skip", "none")
    if pool not in (*TOKEN_POOLS, "auto"):
        problems.append(f"{where}pool must be one of {[*TOKEN_POOLS, 'auto']}, not {pool!r}")
    if skip not in (*TOKEN_SKIPS, "auto"):
        problems.append(f"{where}skip must be one of {[*TOKEN_SKIPS, 'auto']}, not {skip!r}")
    return problems
