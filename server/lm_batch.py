"""Lines (samples) per step for each architecture of an lm federation, torch-free.

One rule for the server's lm trainer (``[server] lm_arch_batch``, drawn by the balanced
sampler) and ``benchmarks.bench_lm`` (``--full-batch-lines``, its fedavg-lora cost curve):
an architecture named in ``per_arch`` draws that many lines a step, every other one the
default share. A fleet of SmolLM2 truncations gains from giving the full model more lines
a step than the truncations (``bench_lm`` on validation, docs/lm.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedmobillm.errors import FedMobiLLMError

HINT = 'architecture name -> lines a step, e.g. lm_arch_batch = {"smollm2-135m" = 16}'


def check_arch_batch(value: Any, what: str = "lm_arch_batch") -> dict[str, int]:
    """``value`` as {architecture: lines a step}; a FedMobiLLMError naming the bad entry
    unless every key is a non-empty name and every value a whole number >= 1."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FedMobiLLMError(f"{what} must be a table of architecture -> lines, not "
                              f"{type(value).__name__} {value!r}", hint=HINT)  # fmt: skip
    out: dict[str, int] = {}
    for arch, n in value.items():
        if not isinstance(arch, str) or not arch.strip():
            raise FedMobiLLMError(f"{what}: architecture name {arch!r} is empty", hint=HINT)
        if isinstance(n, bool) or not isinstance(n, int | float) or n != int(n) or n < 1:
            raise FedMobiLLMError(
                f"{what}[{arch!r}] = {n!r}: lines a step must be a whole number >= 1", hint=HINT
            )
        out[arch] = int(n)
    return out


def arch_batches(
    archs: Iterable[str], default: int, per_arch: Mapping[str, int] | None = None
) -> dict[str, int]:
    """{arch: lines a step} for ``archs``: ``per_arch[arch]`` where given, else ``default``."""
    per = check_arch_batch(per_arch)
    if isinstance(default, bool) or int(default) < 1:
        raise FedMobiLLMError(f"default lines a step {default!r} must be >= 1", hint=HINT)
    return {a: per.get(a, int(default)) for a in archs}


def step_batches(
    archs: Iterable[str], batch_size: int, per_arch: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The server's rule (``policies.balanced_sample``): each of ``archs`` draws an equal
    share of ``batch_size`` (at least 1), or ``per_arch[arch]`` where given."""
    archs = list(archs)
    return arch_batches(archs, max(1, batch_size // max(1, len(archs))), per_arch)
