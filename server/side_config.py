"""The side network's settings (``SideConfig``), without torch: the server's settings
(``server/settings.py``) and the serving process import them, and a process that only
ingests (`serve --no-train`, `--trainer-process`, the workers) never loads torch.
``server/side.py`` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from fedmobillm.errors import FedMobiLLMError

ANCHOR_TARGETS = ("mean", "quality")
# SideConfig.conflict_projection: which gradients are projected off an architecture's own
# labelled-loss gradient where they conflict with it (``project_gradients``)
CONFLICT_PROJECTIONS = ("off", "anchors", "all")
# Token mode: how the head reads the token states (SideConfig.pool)
TOKEN_POOLS = ("mean", "attention", "last")
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
    # text), and ``causal``: attention never looks at later positions (the lm task)
    token_block: str = "transformer"
    pool: str = "mean"
    causal: bool = False
    # Token mode only: "linear" adds, per architecture, Linear(LayerNorm(pool of the last
    # tap's tokens)) -> logits to the side network's logits (pooled by ``pool``'s rule, the
    # masked mean for "attention"): a linear probe inside the personal model that the token
    # network refines. Its weights and the side head's output layer start at zero. "none": off.
    skip: str = "none"
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
        if self.pool not in TOKEN_POOLS:
            problems.append(f"pool must be one of {list(TOKEN_POOLS)}, not {self.pool!r}")
        if self.skip not in ("none", "linear"):
            problems.append(f"skip must be 'none' or 'linear', not {self.skip!r}")
        if self.skip_weight_decay is not None and not self.skip_weight_decay >= 0:
            problems.append(f"skip_weight_decay must be >= 0, not {self.skip_weight_decay}")
        if not 0.0 <= self.token_dropout < 1.0:
            problems.append(f"token_dropout must be in [0, 1), not {self.token_dropout}")
        if self.inputs != "tokens" and (
            self.pool != "mean" or self.skip != "none" or self.token_dropout
        ):
            problems.append("pool, skip and token_dropout are token-mode options (inputs 'tokens')")
        if self.causal and self.inputs != "tokens":
            problems.append("causal needs inputs 'tokens' (pivot inputs have no token order)")
        if self.inputs == "tokens":
            if self.arch_norms:
                problems.append("arch_norms is for pivot inputs only (MLP side blocks)")
            if self.token_block == "transformer" and self.width % self.heads:
                problems.append(f"width {self.width} must be divisible by heads {self.heads}")
        return problems
