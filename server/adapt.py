# Owner: H (issue 23).
"""Personalisation by local adaptation with validation selection (issue 23, docs/skew.md).

The shared side network is what every architecture learnt together (labelled loss + anchor
terms). An architecture's personal model here is that shared model fine-tuned for a few
steps on the architecture's own labelled samples only, the number of steps chosen on the
architecture's own validation samples among 0, ``adapt_every``, 2 ``adapt_every``, ...,
``adapt_steps``. Step 0 is the shared model itself, and a count is chosen only when its
validation accuracy is strictly higher, so the personal model is never below the shared one
on validation; it starts from a point that already holds the anchors' knowledge, and the
architecture's own data then pulls it back wherever the federation cost it (negative
transfer on the strongest backbone).

What is trained (``SideConfig``): the architecture's alignment and the head at
``lr * adapt_lr_scale``, the shared side blocks and gates at that times
``adapt_shared_lr_scale`` (0: held fixed). The draws are the server trainer's sampler
(``policies.balanced_sample``) over that architecture's devices only. The adaptation runs on
a copy: the shared network, its optimiser and the torch RNG stream of training are untouched.

``adapt`` returns an ``Adapted`` whose ``trainer`` is a copy of the ``SideTrainer`` in which
the architecture's averaged model (what ``predict``, ``evaluate`` and ``export_personal``
read) is the adapted one; only that architecture's model in the copy is meaningful (the
copy's shared network is the adapted one for every architecture).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

# draw(rng) -> (x, y) or (x, y, mask): one mini-batch of the architecture's own samples
Draw = Callable[[np.random.Generator], tuple]
# val() -> chunks (x, y) or (x, y, mask) of the architecture's validation samples
ValChunks = Callable[[], Iterable[tuple]]


@dataclass
class Adapted:
    """An architecture's adapted personal model: ``trainer`` (a copy whose averaged model
    for ``arch`` is it), the steps chosen (0: the shared model), the validation accuracy of
    the shared model and of the chosen one, and each candidate's (steps, accuracy)."""

    arch: str
    trainer: Any
    steps: int
    accuracy: float
    shared_accuracy: float
    curve: list[tuple[int, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "accuracy": self.accuracy,
            "shared_accuracy": self.shared_accuracy,
            "curve": [[s, a] for s, a in self.curve],
        }


def check_config(config: Any) -> None:
    """Refuse settings with which ``adapt`` cannot run (a clear message, what to change)."""
    if config.adapt_steps < 0 or config.adapt_every < 1 or config.adapt_batch < 1:
        raise FedMobiLLMError(
            f"adapt_steps {config.adapt_steps}, adapt_every {config.adapt_every}, adapt_batch "
            f"{config.adapt_batch}: adapt_steps must be >= 0 (0 = off), adapt_every and "
            "adapt_batch >= 1"
        )


def _accuracy(trainer: Any, model: nn.Module, val: ValChunks) -> float:
    """Accuracy of ``model`` (eval mode) over the validation chunks (labels < 0 ignored)."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for chunk in val():
            x, y, mask = (*chunk, None)[:3]
            y = np.asarray(y)
            keep = y >= 0
            if not keep.any():
                continue
            xt, mt = trainer._tensors_in(x, mask, keep)
            pred = model(xt, mt).argmax(1).numpy()
            right += int((pred == y[keep]).sum())
            total += int(keep.sum())
    if total == 0:
        raise FedMobiLLMError("local adaptation needs labelled validation samples")
    return right / total


def _param_groups(model: nn.Module, lr: float, shared_scale: float) -> list[dict]:
    """The alignment and the head at ``lr``; the shared blocks and gates at
    ``lr * shared_scale``, or held fixed (requires_grad off) when it is 0."""
    own = list(model.align.parameters()) + list(model.side.head.parameters())
    ids = {id(p) for p in own}
    rest = [p for p in model.side.parameters() if id(p) not in ids]
    groups = [{"params": own, "lr": lr}]
    if shared_scale > 0:
        groups.append({"params": rest, "lr": lr * shared_scale})
    else:
        for p in rest:
            p.requires_grad_(False)
    return groups


def adapt(
    trainer: Any, arch: str, draw: Draw, val: ValChunks, seed: int = 0, config: Any = None
) -> Adapted:
    """Fine-tune a copy of ``arch``'s averaged model on ``draw``'s batches for up to
    ``adapt_steps`` steps, measure validation accuracy every ``adapt_every`` steps (and at
    0), and keep the first count with the highest accuracy (0 unless one is strictly
    better). The ``adapt_*`` settings are ``config``'s (a ``SideConfig``; default the
    trainer's). Deterministic given ``seed``; the global torch RNG is restored."""
    c = trainer.config if config is None else config
    check_config(c)
    if arch not in trainer.archs:
        raise FedMobiLLMError(f"unknown architecture {arch!r}", hint="call add_architecture first")
    out = copy.deepcopy(trainer)
    target = out._model(arch, averaged=True)  # the copy's averaged modules, in place
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        shared_acc = _accuracy(out, target, val)
        best = (shared_acc, 0, None)
        curve = [(0, shared_acc)]
        if c.adapt_steps > 0:
            work = copy.deepcopy(target).requires_grad_(True)
            opt = torch.optim.AdamW(
                _param_groups(work, c.lr * c.adapt_lr_scale, c.adapt_shared_lr_scale),
                weight_decay=c.weight_decay,
            )
            params = [p for g in opt.param_groups for p in g["params"]]
            for step in range(1, c.adapt_steps + 1):
                batch = draw(np.random.default_rng([seed, step]))
                x, y, mask = (*batch, None)[:3]
                y = np.asarray(y)
                keep = y >= 0
                if keep.any():
                    work.train()
                    xt, mt = out._tensors_in(x, mask, keep)
                    yt = torch.from_numpy(y[keep].astype(np.int64))
                    loss = F.cross_entropy(work(xt, mt), yt, label_smoothing=c.label_smoothing)
                    if torch.isfinite(loss):
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        norm = nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                        if torch.isfinite(norm):
                            opt.step()
                if step % c.adapt_every == 0 or step == c.adapt_steps:
                    acc = _accuracy(out, work, val)
                    curve.append((step, acc))
                    if acc > best[0]:
                        best = (acc, step, copy.deepcopy(work.state_dict()))
        if best[2] is not None:
            target.load_state_dict(best[2])
    target.requires_grad_(False)
    log.info(
        "local adaptation of %s: %d of %d steps chosen on validation (accuracy %.4f, shared "
        "model %.4f)",
        arch,
        best[1],
        c.adapt_steps,
        best[0],
        shared_acc,
    )
    return Adapted(arch, out, best[1], best[0], shared_acc, curve)


def cache_draw(cache: Any, arch: str, batch: int, balance: str = "device") -> Draw:
    """Mini-batches of ``arch``'s own training samples from a ``TrainingCache``, drawn by
    the server trainer's sampler (``policies.balanced_sample`` with ``balance``) over that
    architecture's devices only; token samples collated (x, y, mask)."""
    from fedmobillm.server.policies import balanced_sample
    from fedmobillm.server.trainer import collate_tokens

    a = cache.archs[arch]
    devices = {arch: sorted(d for d, ys in a.train_y.items() if ys)}
    if not devices[arch]:
        raise FedMobiLLMError(f"architecture {arch} holds no training samples to adapt on")

    def draw(rng: np.random.Generator) -> tuple:
        groups = balanced_sample(rng, batch, devices, lambda k, d: a.device_arrays(d), balance)
        _, x, y = groups[0]
        if cache.tokens:
            xs, mask = collate_tokens(x)
            return xs, y, mask
        return x, y

    return draw
