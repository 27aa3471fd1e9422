"""What the server does with a device's declared privacy mechanism (messages.
PrivacyDeclaration, applied on the device by device_runtime/privacy.py): checks it is
well formed and, when ``ServerSettings.max_epsilon`` is set, refuses (403) a device that
declares none or a larger epsilon. The declaration is recorded with the device (store
column ``privacy``) and listed by ``fedmobillm server devices``. The server cannot verify
that a device adds the noise it declares: the mechanism lives on the phone, where the
data is; a declaration is the operator's record of what each device promised."""

from __future__ import annotations

import math
from typing import Any

from fedmobillm.server.errors import BadRequest, Forbidden

MECHANISMS = ("gaussian-rdp",)


def check_declaration(declared: dict[str, Any] | None, max_epsilon: float | None) -> None:
    """Raise BadRequest for a malformed declaration, Forbidden when ``max_epsilon`` is set
    and the device declares no mechanism or a per-text epsilon above it (the activations'
    epsilon plus the label's randomised-response epsilon, as the device's ledger counts)."""
    if declared is not None:
        _well_formed(declared)
    if max_epsilon is None:
        return
    hint = (
        f"register with local differential privacy at epsilon <= {max_epsilon:g}: "
        f"`fedmobillm device register ... --epsilon {max_epsilon:g} --clip C` (docs/privacy.md)"
    )
    if declared is None:
        raise Forbidden(
            f"this server requires devices to add noise with epsilon <= {max_epsilon:g} "
            "(max_epsilon); this device declares no privacy mechanism",
            hint=hint,
        )
    taps, label = float(declared["epsilon"]), float(declared.get("label_epsilon") or 0.0)
    if taps + label > max_epsilon * (1 + 1e-9):
        said = f"epsilon {taps:g}" + (f" + label epsilon {label:g}" if label else "")
        raise Forbidden(
            f"this server requires epsilon <= {max_epsilon:g} per text (max_epsilon: the "
            f"activations' and the label's together); this device declares {said}",
            hint=hint,
        )


def _well_formed(d: dict[str, Any]) -> None:
    if d.get("mechanism") not in MECHANISMS:
        raise BadRequest(
            f"unknown privacy mechanism {d.get('mechanism')!r}: this server knows "
            f"{', '.join(MECHANISMS)}",
            hint="update fedmobillm on the device or the server",
        )
    for name in ("epsilon", "clip"):
        v = d.get(name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise BadRequest(f"privacy.{name} must be a positive number, got {v!r}")
    delta = d.get("delta")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise BadRequest(f"privacy.delta must be in (0, 1), got {delta!r}")
    label = d.get("label_epsilon")
    if label is not None and not (
        isinstance(label, (int, float)) and math.isfinite(label) and label > 0
    ):
        raise BadRequest(f"privacy.label_epsilon must be a positive number, got {label!r}")
