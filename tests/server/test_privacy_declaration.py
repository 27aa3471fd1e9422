"""The server's max_epsilon counts a text's whole release: activations plus label."""

from __future__ import annotations

import pytest

from fedmobillm.server.errors import Forbidden
from fedmobillm.server.privacy import check_declaration


def declared(epsilon: float, label: float | None = None) -> dict:
    return {
        "mechanism": "gaussian-rdp",
        "epsilon": epsilon,
        "delta": 1e-5,
        "clip": 1.0,
        "noise_multiplier": 0.6,
        "label_epsilon": label,
    }


def test_taps_and_label_within_the_cap_pass():
    check_declaration(declared(6.0, 2.0), max_epsilon=8.0)
    check_declaration(declared(8.0), max_epsilon=8.0)


def test_label_epsilon_counts_towards_the_cap():
    with pytest.raises(Forbidden, match=r"declares epsilon 8 \+ label epsilon 8"):
        check_declaration(declared(8.0, 8.0), max_epsilon=8.0)


def test_no_mechanism_is_refused_when_a_cap_is_set():
    with pytest.raises(Forbidden, match="declares no privacy mechanism"):
        check_declaration(None, max_epsilon=8.0)
