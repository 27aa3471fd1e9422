"""Settings: the admin token must be set and not a default, unless --dev."""

from __future__ import annotations

import json

import pytest

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.settings import load_settings

STRONG = "settings-test-admin-token-7f3a9c1e5b"


@pytest.mark.parametrize(
    "token",
    ["", "changeme", "admin", "short-token", "aaaaaaaaaaaaaaaa", "changemechangeme", "x" * 40],
)
def test_default_or_weak_admin_token_is_refused(monkeypatch, token):
    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", token)
    with pytest.raises(FedMobiLLMError, match="refuses to start") as err:
        load_settings()
    assert "token_urlsafe" in (err.value.hint or "")


def test_dev_generates_a_token_once(monkeypatch):
    monkeypatch.delenv("FEDMOBILLM_ADMIN_TOKEN", raising=False)
    settings, generated = load_settings(dev=True)
    assert generated and settings.admin_token.get_secret_value() == generated
    assert len(generated) >= 32


def test_config_file_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", STRONG)
    cfg = tmp_path / "server.toml"
    cfg.write_text("[server]\ncheckpoint_every = 7\nport = 9000\n")
    settings, generated = load_settings(cfg, port=9100)
    assert generated is None
    assert settings.checkpoint_every == 7 and settings.port == 9100


def test_bad_config_value_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", STRONG)
    cfg = tmp_path / "server.json"
    cfg.write_text('{"batch_size": -1, "nonsense": 1}')
    with pytest.raises(FedMobiLLMError, match="batch_size"):
        load_settings(cfg)


def test_anchor_settings_reach_the_side_network(tmp_path, monkeypatch):
    from fedmobillm.server.trainer import Trainer

    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", STRONG)
    monkeypatch.setenv("FEDMOBILLM_ANCHOR_KL", "1.5")
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"anchor_feature": 0, "anchor_batch": 16, "data_dir": str(tmp_path)}))
    settings, _ = load_settings(cfg)
    side = Trainer(settings)._side_config()
    assert (side.anchor_kl, side.anchor_feature, side.anchor_batch) == (1.5, 0.0, 16)
    cfg.write_text('{"anchor_kl": -1}')
    with pytest.raises(FedMobiLLMError, match="anchor_kl"):
        load_settings(cfg)
