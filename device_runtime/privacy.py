"""Local differential privacy of what a device uploads: per-tap clipping, Gaussian noise
calibrated to (epsilon, delta) with a kept accountant library (dp-accounting's RDP
accountant), optional randomised response on labels.

**The unit of privacy is one sample (one text and its label).** What a sample releases is
all its tap vectors: K vectors for a pivot bundle (``x`` (N, K, d)), K x t for a token
bundle with t real tokens (``x`` (N, K, T, d), ``mask`` (N, T)). Each tap vector is clipped
to L2 norm ``clip`` on its own (taps of different depths have very different norms: one
bound per vector keeps a deep tap from taking the whole budget), so two samples'
releases differ by at most

    Delta = 2 * clip * sqrt(n)      (n = K for pivot, K * t for a t-token sample)

in L2: the diameter of the set of clipped releases, i.e. *any* two texts are neighbours
(replace-one, as local DP needs: the server sees that a sample was uploaded; the question
is what it was). Gaussian noise of standard deviation ``z * Delta`` per coordinate makes
the release (epsilon, delta)-DP, with ``z = noise_multiplier(epsilon, delta)`` calibrated by
the library for a sensitivity-1 Gaussian mechanism. In units of ``clip`` (the ``sigma`` of
``clip_and_noise``) that is ``sigma = z * 2 * sqrt(n)`` (``sample_sigma``).

A token sample's length t is uploaded in plaintext (``lengths``): the guarantee holds
between texts of the same token length, and the noise is calibrated to each sample's own
t (the length is public anyway).

Composition: a sample is normally released once. A text released again (another bundle,
another split) composes: ``PrivacyLedger`` (kept in the device journal) composes every
release of every text with ``RdpAccountant`` and refuses a batch that would take any text
past the budget. It also reports the device-level epsilon: every release of the device
composed, the guarantee if all of a device's texts were one secret (grows with the
number of samples: reported, capped only when ``device_budget`` is set).

Project before noise: a bundle exported with ``--dp-projection R`` carries a public per-tap
basis (``dp_projection.py``); the vector clipped and noised is then the R-dim coordinate
vector of the tap in that basis, and the upload its lift back to d (post-processing of the
release: the same z, the same epsilon; the noise's energy per vector falls from d to R times
(sigma clip)^2).

dp-accounting (and its scipy) is imported only when a privacy function needs it: a device
without ``--epsilon`` never loads it. Torch-free.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fedmobillm.errors import FedMobiLLMError

MECHANISM = "gaussian-rdp"  # per-tap clip + Gaussian noise, dp-accounting RdpAccountant


class PrivacyBudgetExceeded(FedMobiLLMError):
    """An upload would take a text (or the device) past its privacy budget."""


@dataclass(frozen=True)
class PrivacyConfig:
    """epsilon, delta: the per-sample guarantee of the activations over ``releases``
    releases of a sample (normally 1); clip: the L2 bound of each tap vector (activation
    units; None = ``int8_clip`` of the bundle, set by ``resolved``); label_epsilon:
    randomised response on labels (None = labels as they are); budget: the most any one
    text may spend in all, its taps' and its label's releases composed (default: epsilon +
    releases x label_epsilon: each release charges the label again); device_budget: optional cap on the device-level epsilon
    (all its releases composed)."""

    epsilon: float
    delta: float = 1e-5
    clip: float | None = None
    label_epsilon: float | None = None
    budget: float | None = None
    device_budget: float | None = None
    releases: int = 1

    def __post_init__(self) -> None:
        _positive("--epsilon", self.epsilon)
        if self.clip is not None:
            _positive("--clip", self.clip)
        if not 0.0 < self.delta < 1.0:
            raise FedMobiLLMError(
                f"--delta must be in (0, 1), got {self.delta}",
                hint="use well below 1/(samples per device), e.g. 1e-5",
            )
        for name, v in (("--label-epsilon", self.label_epsilon), ("--budget", self.budget)):
            if v is not None:
                _positive(name, v)
        if self.device_budget is not None:
            _positive("--device-budget", self.device_budget)
        if self.releases < 1:
            raise FedMobiLLMError("releases must be at least 1")
        if self.budget is not None and self.budget < self.release_epsilon * (1 - 1e-9):
            raise FedMobiLLMError(
                f"--budget {self.budget} is below one release's epsilon {self.release_epsilon:g} "
                f"(--epsilon {self.epsilon:g} for the activations + --label-epsilon "
                f"{self.label_epsilon or 0:g} for the label): no text could be uploaded even once",
                hint="drop --budget (it defaults to all the releases) or raise it",
            )

    @property
    def release_epsilon(self) -> float:
        """One release of a text: its taps' epsilon plus its label's (basic composition)."""
        return self.epsilon + (self.label_epsilon or 0.0)

    @property
    def text_budget(self) -> float:
        """--budget, else all ``releases`` releases of a text: the taps' epsilon (the noise
        is calibrated for them composed) plus ``releases`` label epsilons (one each)."""
        if self.budget is not None:
            return self.budget
        return self.epsilon + self.releases * (self.label_epsilon or 0.0)

    @property
    def z(self) -> float:
        """Noise multiplier (std per unit of L2 sensitivity) for this config."""
        return noise_multiplier(self.epsilon, self.delta, self.releases)

    def resolved(self, manifest: Any, projection: Any = None) -> PrivacyConfig:
        """This config with ``clip`` set: as given, or ``int8_clip`` of the bundle's
        manifest (protocol.Manifest) when None (with the bundle's ``projection``, a
        dp_projection.DpProjection, the noise of an uploaded coordinate is at most
        ``projection.spread`` times the subspace's, so the default clip is that much larger)."""
        if self.clip is not None:
            return self
        max_tokens = int(manifest.max_seq_len) if getattr(manifest, "tokens", False) else None
        spread = 1.0 if projection is None else projection.spread
        clip = int8_clip(
            manifest.activation_scales, self.z, len(manifest.taps), max_tokens, spread=spread
        )
        return replace(self, clip=clip)

    def declaration(self) -> dict[str, Any]:
        """What registration declares to the server (messages.PrivacyDeclaration)."""
        if self.clip is None:
            raise FedMobiLLMError("the privacy config's clip is not resolved (see resolved())")
        return {
            "mechanism": MECHANISM,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "clip": self.clip,
            "noise_multiplier": self.z,
            "label_epsilon": self.label_epsilon,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise FedMobiLLMError(f"{name} must be a positive number, got {v!r}")


# -- accounting (dp-accounting) ---------------------------------------------------------


def _rdp_accountant() -> Any:
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant()


def gaussian_event(z: float, count: int = 1) -> Any:
    """The library's event for ``count`` releases of a Gaussian mechanism with noise
    multiplier ``z``."""
    import dp_accounting

    event = dp_accounting.GaussianDpEvent(z)
    return event if count == 1 else dp_accounting.SelfComposedDpEvent(event, count)


@functools.lru_cache(maxsize=256)
def noise_multiplier(epsilon: float, delta: float, uploads: int = 1) -> float:
    """The smallest noise multiplier z (std / L2 sensitivity) such that ``uploads``
    releases of the Gaussian mechanism compose to (epsilon, delta)-DP under the RDP
    accountant (dp-accounting's ``calibrate_dp_mechanism``)."""
    import dp_accounting

    _positive("epsilon", epsilon)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            _rdp_accountant,
            lambda z: gaussian_event(z, uploads),
            epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


def epsilon_of(releases: Iterable[tuple[float, int]], delta: float) -> float:
    """epsilon at ``delta`` of the composition of (noise multiplier z, count) releases, by
    the RDP accountant (0 for none)."""
    return _epsilon_of(tuple(sorted((z, c) for z, c in releases if c > 0)), delta)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(releases: tuple[tuple[float, int], ...], delta: float) -> float:
    if not releases:
        return 0.0
    acc = _rdp_accountant()
    for z, count in releases:
        acc.compose(gaussian_event(z), count)
    return float(acc.get_epsilon(delta))


# -- the mechanism ----------------------------------------------------------------------


def sample_sigma(z: float, num_taps: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """Noise std in units of ``clip`` per sample: ``z * 2 * sqrt(n)`` with n = K (pivot) or
    K * lengths[i] (tokens). Returns (N,) when ``lengths`` (N,) is given, else shape (1,)."""
    n = np.asarray([1] if lengths is None else lengths, dtype=np.float64) * num_taps
    return z * 2.0 * np.sqrt(n)


def int8_clip(
    scales: Sequence[float], z: float, num_taps: int, max_tokens: int | None = None,
    margin: float = 4.0, spread: float = 1.0,
) -> float:  # fmt: skip
    """The default clip: the largest with ``margin`` noise standard deviations inside every
    tap's int8 range (127 x scale), for the noisiest sample (``max_tokens`` real tokens for a
    token bundle). When the clip is below the tap vectors' norms (it is, by far, on the
    MiniLM-L3 bundle measured in docs/privacy.md) each vector is scaled onto the sphere of
    radius clip, so the signal-to-noise ratio does not depend on the clip at all, and this
    one keeps the noisy values unsaturated by int8. ``spread`` (<= 1): the largest noise std
    of an uploaded coordinate per unit of noise std, below 1 when the noise is added in a
    projected subspace (``DpProjection.spread``)."""
    sigma = float(sample_sigma(z, num_taps, None if max_tokens is None else [max_tokens])[0])
    return float(127.0 * min(float(s) for s in scales) / (margin * sigma * spread))


def clip_and_noise(
    x: np.ndarray,
    clip: float,
    sigma: float | np.ndarray,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
    projection: Any = None,
) -> np.ndarray:
    """Clip every tap vector to L2 norm ``clip``, add N(0, (sigma * clip)^2) per coordinate.

    x: (N, K, d) pivot taps or (N, K, T, d) token taps, float. mask: (N, T) for token taps
    (true / 1 = a real token): padding stays exactly zero and gets no noise (its positions
    are public through the lengths). sigma: a scalar or (N,) per sample (``sample_sigma``).
    projection: a dp_projection.DpProjection (public basis P_k (R, d), centre mu_k): then the
    vector clipped and noised is u = P_k (x - mu_k) (R,) and the result is P_k^T (clip(u) +
    noise), in the subspace, as wide as x (post-processing of the R-dim release: same
    sensitivity, noise energy R / d of the unprojected one's).
    Returns float32 of x's shape. Sensitivity: see the module docstring."""
    if x.ndim not in (3, 4):
        raise FedMobiLLMError(f"clip_and_noise takes (N, K, d) or (N, K, T, d), got {x.shape}")
    x = np.asarray(x, dtype=np.float64)
    v = x if projection is None else projection.coords(x)  # (..., d) or (..., R)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)  # (N, K, 1) or (N, K, T, 1)
    clipped = v * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    s = np.broadcast_to(np.asarray(sigma, dtype=np.float64).reshape(-1), (x.shape[0],))
    std = (s * clip).reshape((-1,) + (1,) * (x.ndim - 1))  # (N, 1, 1[, 1])
    out = clipped + rng.standard_normal(v.shape) * std
    if projection is not None:
        out = projection.lift(out, x)  # (..., d): public post-processing
    if x.ndim == 4:
        if mask is None:
            raise FedMobiLLMError("token taps (N, K, T, d) need their mask (N, T)")
        real = np.asarray(mask, dtype=bool)[:, None, :, None]  # (N, 1, T, 1)
        out = np.where(real, out, 0.0)
    return out.astype(np.float32)


def randomized_response(
    labels: np.ndarray, num_labels: int, epsilon: float, rng: np.random.Generator
) -> np.ndarray:
    """k-ary randomised response, epsilon-label-DP: keep a label with probability
    e^eps / (e^eps + k - 1), else replace it by one of the k - 1 others uniformly.
    labels: (N,) int64; -1 (unlabelled) stays -1. Returns (N,) int64."""
    labels = np.asarray(labels, dtype=np.int64)
    k = int(num_labels)
    if k < 2:
        return labels.copy()
    keep = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    flip = rng.random(labels.shape) >= keep
    other = (labels + rng.integers(1, k, size=labels.shape)) % k  # uniform over the others
    return np.where((labels >= 0) & flip, other, labels)


def keep_probability(epsilon: float, num_labels: int) -> float:
    return math.exp(epsilon) / (math.exp(epsilon) + num_labels - 1)


def batch_rng(secret: bytes, key: str) -> np.random.Generator:
    """The noise of one batch, seeded by the device's own secret and the batch's
    idempotency key: a re-sent batch carries the very same noise (one release, not two).
    The secret never leaves the device (not the token: the server sees the token)."""
    digest = hmac.new(secret, key.encode(), hashlib.sha256).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def text_fingerprint(secret: bytes, text: str) -> str:
    """A keyed digest of a text, so the journal can count a text's releases without
    keeping the text (the key is the device's secret)."""
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:24]


def int8_saturation(noisy: np.ndarray, scales: np.ndarray) -> float:
    """Fraction of values of ``noisy`` (N, K, d) / (N, K, T, d) beyond ±127 x the tap's
    scale (K,): they are saturated by the int8 quantisation (still private: saturation is
    post-processing, but information is lost)."""
    shape = (1, -1) + (1,) * (noisy.ndim - 2)
    limit = 127.0 * np.asarray(scales, dtype=np.float64).reshape(shape)
    return float(np.mean(np.abs(noisy) > limit))


# -- the ledger -------------------------------------------------------------------------


@dataclass
class PrivacyLedger:
    """Every release the device made: per text fingerprint, the noise multipliers it was
    released with, and the device's releases in all. Rebuilt from the journal's
    ``release`` lines; ``check`` refuses a batch past the budget.

    A text's epsilon is its taps' releases composed by the RDP accountant at ``delta``
    plus the label epsilons of its randomised-response releases (basic composition of
    pure-DP releases: epsilons add; conservative, an unlabelled text is charged too). The
    device's epsilon composes every release the same way."""

    delta: float
    per_text: dict[str, Counter] = field(default_factory=dict)  # fingerprint -> {z: count}
    device: Counter = field(default_factory=Counter)  # z -> releases of any text
    keys: set[str] = field(default_factory=set)  # idempotency keys already released
    # key -> (z, clip, label epsilon) it was released with: a re-send must carry the same
    # noise, and the same draw at another scale (or none) would give the clean taps away
    released_with: dict[str, tuple] = field(default_factory=dict)
    label_per_text: Counter = field(default_factory=Counter)  # fingerprint -> sum label eps
    label_device: float = 0.0  # sum of label epsilons over every release

    def add(
        self, key: str, z: float, fingerprints: Sequence[str], settings: tuple | None = None
    ) -> None:
        """One batch released under ``key`` (a re-send of a known key is not counted).
        A text twice in one batch is two releases."""
        if key in self.keys:
            return
        self.keys.add(key)
        if settings is not None:
            self.released_with[key] = settings
        for fp in fingerprints:
            self.per_text.setdefault(fp, Counter())[round(z, 12)] += 1
        self.device[round(z, 12)] += len(fingerprints)
        label = None if settings is None else settings[2]
        if label is not None:
            for fp in fingerprints:
                self.label_per_text[fp] += float(label)
            self.label_device += float(label) * len(fingerprints)

    def check_resend(self, key: str, settings: tuple | None) -> None:
        """Refuse to re-send a released batch with other settings than its release (or
        without the mechanism): the server may hold the first release, and the same noise
        draw at two scales, or noise and none, reveals the clipped activations."""
        before = self.released_with.get(key)
        if key not in self.keys or before is None or before == settings:
            return
        was = "noise multiplier z {:g}, clip {:g}, label epsilon {}".format(*before)
        now = (
            "no privacy mechanism"
            if settings is None
            else "z {:g}, clip {:g}, label epsilon {}".format(*settings)
        )
        raise PrivacyBudgetExceeded(
            f"this batch ({key[:16]}...) was released before with {was}; re-sending it with "
            f"{now} would let the server subtract the two releases and recover the activations",
            hint="finish the pending batch with the --epsilon/--clip/--label-epsilon it was "
            "released with (see the journal's release line), then change the settings",
        )

    def text_epsilon(self, fingerprint: str) -> float:
        """The text's epsilon at ``delta``: taps (RDP) + labels (sum)."""
        taps = epsilon_of(self.per_text.get(fingerprint, {}).items(), self.delta)
        return taps + self.label_per_text.get(fingerprint, 0.0)

    def device_epsilon(
        self, extra: tuple[float, int] | None = None, extra_label: float = 0.0
    ) -> float:
        """The device's epsilon at ``delta`` over every release, with ``extra`` (z, count)
        tap releases and ``extra_label`` label epsilon not yet made."""
        c = Counter(self.device)
        if extra is not None:
            c[round(extra[0], 12)] += extra[1]
        return epsilon_of(c.items(), self.delta) + self.label_device + extra_label

    def check(self, config: PrivacyConfig, key: str, fingerprints: Sequence[str]) -> float:
        """Raise PrivacyBudgetExceeded if releasing these texts now would take one of
        them past ``config.text_budget`` or the device past ``config.device_budget``.
        Returns the largest per-text epsilon after the release."""
        if key in self.keys:  # a re-send of a batch already released: same noise, free
            return max((self.text_epsilon(f) for f in fingerprints), default=0.0)
        z, label = config.z, config.label_epsilon or 0.0
        worst, worst_fp = 0.0, None
        for fp, times in Counter(fingerprints).items():  # a text twice in a batch: 2 releases
            c = Counter(self.per_text.get(fp, {}))
            c[round(z, 12)] += times
            eps = epsilon_of(c.items(), self.delta)
            eps += self.label_per_text.get(fp, 0.0) + label * times
            if eps > worst:
                worst, worst_fp = eps, fp
        if worst > config.text_budget * (1 + 1e-9):
            n = sum(self.per_text.get(worst_fp or "", {}).values())
            raise PrivacyBudgetExceeded(
                f"privacy budget spent: a text of this batch was released {n} time(s) "
                f"already; releasing it again takes it to epsilon {worst:.3g} > budget "
                f"{config.text_budget:g} (delta {config.delta:g}); nothing more is uploaded",
                hint="a text is uploaded once per bundle and split; new texts cost nothing to "
                "old ones. Upload new data, or raise --budget knowingly",
            )
        if config.device_budget is not None:
            dev = self.device_epsilon((z, len(fingerprints)), label * len(fingerprints))
            if dev > config.device_budget * (1 + 1e-9):
                raise PrivacyBudgetExceeded(
                    f"device privacy budget spent: this batch would take the device-level "
                    f"epsilon (all its releases composed) to {dev:.3g} > --device-budget "
                    f"{config.device_budget:g}; nothing more is uploaded",
                    hint="the device has uploaded what its budget allows; raise "
                    "--device-budget knowingly or stop here",
                )
        return worst


# -- the device's side: secret, effective config, one batch ------------------------------

SECRET_NAME = "privacy.key"


def device_secret(state_dir: Any) -> bytes:
    """The device's own 32-byte secret (``privacy.key``, mode 600, made on first use): seeds
    each batch's noise and keys the text fingerprints. Never sent anywhere."""
    import os
    from pathlib import Path

    from fedmobillm.device_runtime.files import write_atomic

    path = Path(state_dir) / SECRET_NAME
    if path.is_file():
        secret = bytes.fromhex(path.read_text().strip())
        if len(secret) == 32:
            return secret
        raise FedMobiLLMError(
            f"{path} is damaged",
            hint="restore it from a backup; a new one would re-release texts with new noise",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(32)
    write_atomic(path, secret.hex(), mode=0o600)
    return secret


def declared_config(declared: dict[str, Any] | None) -> PrivacyConfig | None:
    """The PrivacyConfig a registration declared (device.json ``privacy``), or None."""
    if not declared:
        return None
    return PrivacyConfig(
        epsilon=float(declared["epsilon"]),
        delta=float(declared["delta"]),
        clip=float(declared["clip"]),
        label_epsilon=declared.get("label_epsilon"),
    )


def effective_config(
    run: PrivacyConfig | None, declared: dict[str, Any] | None
) -> PrivacyConfig | None:
    """What a run applies: its own flags when given (they may only be stricter than what
    the device declared at registration: the server records the declaration), else the
    declaration, else None (no mechanism)."""
    reg = declared_config(declared)
    if run is None:
        return reg
    if reg is not None:
        looser = []
        if run.epsilon > reg.epsilon * (1 + 1e-9) or run.delta > reg.delta * (1 + 1e-9):
            looser.append(f"epsilon {run.epsilon:g} / delta {run.delta:g}")
        if reg.label_epsilon is not None and (
            run.label_epsilon is None or run.label_epsilon > reg.label_epsilon * (1 + 1e-9)
        ):
            looser.append(f"label epsilon {run.label_epsilon}")
        if looser:
            raise FedMobiLLMError(
                f"this run's {' and '.join(looser)} is looser than the device declared at "
                f"registration (epsilon {reg.epsilon:g}, delta {reg.delta:g}, label epsilon "
                f"{reg.label_epsilon}): the server records the declaration",
                hint="run with the registered settings (drop --epsilon ...) or stricter ones, "
                "or register a new device with the new settings",
            )
    return run


def privatize(
    config: PrivacyConfig,
    secret: bytes,
    key: str,
    taps: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    lengths: np.ndarray | None = None,
    projection: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One batch through the mechanism, noise seeded by (secret, key): taps (N, K, d) or
    (N, K, T, d) with ``lengths`` (N,) -> clipped + noised float32 taps of the same shape,
    and labels (N,) through randomised response when ``config.label_epsilon`` is set.
    ``projection``: the bundle's dp_projection.DpProjection (clip and noise in its subspace;
    the bundle digest is in the batch key, so a re-sent batch has the same projection)."""
    rng = batch_rng(secret, key)
    mask = None
    if taps.ndim == 4:
        if lengths is None:
            raise FedMobiLLMError("token taps (N, K, T, d) need their lengths (N,)")
        mask = np.arange(taps.shape[2])[None, :] < np.asarray(lengths)[:, None]  # (N, T)
    sigma = sample_sigma(config.z, taps.shape[1], lengths if taps.ndim == 4 else None)
    noisy = clip_and_noise(taps, config.clip, sigma, rng, mask, projection)
    if config.label_epsilon is not None:
        labels = randomized_response(labels, num_labels, config.label_epsilon, rng)
    return noisy, labels
