"""bench_accuracy's token side-network options per backbone (issue 15, third sweep): a
backbone's own entry applies when the whole fleet shares it, --token-side always wins, and a
fleet of backbones with different entries keeps each one's per architecture (per_arch)."""

from __future__ import annotations

import benchmarks.bench_accuracy as A
from fedmobillm.server.side import SideConfig


def test_a_backbones_own_token_settings_apply_alone_and_yield_to_overrides() -> None:
    smol = A.token_side_for(("smollm2-135m",), {})
    assert smol == {**A.TOKEN_SIDE, **A.TOKEN_SIDE_BACKBONE["smollm2-135m"]}
    assert smol["pool"] == "last" and smol["skip"] == "linear"
    cfg = SideConfig(**{**smol, "inputs": "tokens"})  # a valid token config
    assert cfg.pool == "last" and cfg.skip == "linear"
    assert A.token_side_for(("minilm-l6",), {}) == A.TOKEN_SIDE
    assert A.token_side_for(("smollm2-135m",), {"pool": "mean"})["pool"] == "mean"
    assert A.token_side_for(("smollm2-135m", "smollm2-135m"), {})["pool"] == "last"
    mixed = A.token_side_for(("minilm-l6", "smollm2-135m"), {"width": 32})
    own = A.TOKEN_SIDE_BACKBONE["smollm2-135m"]
    assert mixed == {**A.TOKEN_SIDE, "width": 32, "per_arch": {"smollm2-135m": own}}


def test_the_command_line_config_takes_the_backbones_settings() -> None:
    parse = A._parser().parse_args
    cfg = A._config(parse(["--quick", "--backbones", "smollm2-135m", "--out", "x"]))
    assert cfg.token_side["pool"] == "last" and cfg.token_side["skip"] == "linear"
    cfg = A._config(parse(["--quick", "--backbones", "minilm-l6", "--out", "x"]))
    assert cfg.token_side == A.TOKEN_SIDE
    cfg = A._config(
        parse(["--quick", "--backbones", "smollm2-135m", "--token-side", "skip=none", "--out", "x"])
    )
    assert cfg.token_side["skip"] == "none" and cfg.token_side["pool"] == "last"
