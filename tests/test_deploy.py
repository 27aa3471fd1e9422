"""The deployment files: the documented config file starts a real server, and the Docker
image copies every part the installed package is made of."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from fedmobillm.server.local import LocalServer
from fedmobillm.server.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "docs" / "deploy" / "server.toml"
TOKEN = "deploy-test-admin-token-4b1d9e7f2a"


def test_documented_config_is_every_setting(monkeypatch):
    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", TOKEN)
    settings, _ = load_settings(CONFIG)
    text = CONFIG.read_text()
    for name in type(settings).model_fields:
        if name != "admin_token":
            assert re.search(rf"^#? ?{name} =|^\[server\.{name}\]", text, re.M), name
    assert settings.side.width == 128 and settings.host == "0.0.0.0"


@pytest.mark.integration
def test_server_starts_from_the_documented_config(tmp_path):
    server = LocalServer(
        tmp_path / "data",
        admin_token=TOKEN,
        config=CONFIG,
        args=["--no-train"],
        startup_timeout=60.0,
    )
    with server:
        health = httpx.get(f"{server.url}/healthz")
        status = httpx.get(f"{server.url}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert health.status_code == 200
    assert status.status_code == 200 and status.json()["totals"]["devices"] == 0


def test_dockerfile_copies_every_package_part():
    dockerfile = (ROOT / "Dockerfile").read_text()
    package = ROOT / "src" / "fedmobillm"
    parts = sorted(
        os.readlink(p).split("/")[-1] for p in package.iterdir() if p.is_symlink()
    )  # the top-level folders src/fedmobillm links to
    assert parts, "src/fedmobillm has no symlinked parts"
    for part in parts:
        assert f"COPY {part} ./{part}" in dockerfile, part
    assert "COPY src ./src" in dockerfile and "-c constraints.txt" in dockerfile
    compose = (ROOT / "compose.yaml").read_text()
    assert "docs/deploy/server.toml:/etc/fedmobillm/server.toml" in compose
