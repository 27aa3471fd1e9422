"""The dashboard in a real headless Chromium (Debian's, driven by playwright) against a real
training server: the admin logs in with the token, the page shows the devices, the samples
uploaded, the trainer's step and validation accuracy, SVG charts, the personal models and a
quarantined device, updates itself, and says clearly when a token is wrong (401) or the
client is throttled (429)."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_helpers import (
    ADMIN,
    FAST,
    admin_headers,
    make_manifest,
    make_payload,
    register,
    synthetic_by_id,
    upload,
)

from fedmobillm.device_runtime.messages import ROUTE_DASHBOARD, ROUTE_STATUS
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000


@pytest.fixture
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("chromium is not installed: `apt-get install chromium` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def bad_scales(reg: dict, m: dict) -> bytes:
    """A payload quantized with pre-scales the registered bundle cannot have (an offence)."""
    ids = np.arange(4, dtype=np.int64)
    k, d = len(m["taps"]), m["hidden_size"]
    x, y = synthetic_by_id(ids, k, d, seed=7)
    scales = np.full(k, 1e30, np.float32)
    batch = Batch(
        reg["device_id"], reg["bundle_sha256"], uuid.uuid4().hex, "train", "int8",
        quantize_int8(x, scales), y, ids, scales,
    )  # fmt: skip
    return encode_batch(batch)


def fleet(url: str) -> tuple[dict, dict, dict]:
    """Two architectures with 300 train + 100 validation samples each, and a device of the
    first architecture quarantined after 3 impossible uploads."""
    ma = make_manifest("tiny-a", depth=4, hidden=16, taps=[2, 4])
    mb = make_manifest("tiny-b", depth=6, hidden=24, taps=[2, 4, 6])
    ra, rb = register(url, "phone-a", ma), register(url, "phone-b", mb)
    for reg, m, seed in ((ra, ma, 1), (rb, mb, 2)):
        assert upload(url, reg, make_payload(reg, m, range(300), seed=seed)).status_code == 200
        v = make_payload(reg, m, range(100), split="validation", seed=seed + 10)
        assert upload(url, reg, v).status_code == 200
    rm = register(url, "mallory", ma)
    assert [upload(url, rm, bad_scales(rm, ma)).status_code for _ in range(3)] == [400] * 3
    return ra, rb, rm


def wait_trained(url: str, timeout: float = 120.0) -> dict:
    """Status once the trainer evaluated both architectures a few times and exported both."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tr = httpx.get(f"{url}{ROUTE_STATUS}", headers=admin_headers()).json()["trainer"]
        evaluated = [h for h in tr["history"] if len(h["validation"]) == 2]
        if len(evaluated) >= 3 and len(tr["personal_models"]) == 2:
            return tr
        time.sleep(0.5)
    raise AssertionError(f"the trainer never evaluated 3 times: {tr}")


def screenshot(page, tmp_path: Path) -> Path:
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    artifacts = os.environ.get("FEDMOBILLM_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "dashboard.png")
    return shot


def row_cells(page, device_id: str) -> list[str]:
    return page.locator(f'#devices tr[data-device="{device_id}"] td').all_inner_texts()


def test_dashboard_shows_the_fleet_training_and_quarantine(server_factory, browser, tmp_path):
    """Prepare a trained two-architecture fleet with a quarantined device; log in with a wrong
    token, then the admin token; the page shows what the server knows, live."""
    from playwright.sync_api import expect

    srv = server_factory(FAST)
    ra, rb, rm = fleet(srv.url)
    trained = wait_trained(srv.url)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))

    page.goto(f"{srv.url}{ROUTE_DASHBOARD}")
    page.fill("#token", "not-the-admin-token")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_contain_text("Wrong admin token", timeout=WAIT_MS)
    wrong = page.locator("#login-error").inner_text()
    assert page.locator("#main").is_hidden() and page.locator("#logout").is_hidden()
    page.fill("#token", ADMIN)
    page.click("#login-button")
    expect(page.locator("#main")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#personal")).to_contain_text("%", timeout=WAIT_MS)
    expect(page.locator('#requests tr[data-status="400"] td.num')).to_have_text("3")
    updated = page.locator("#live").inner_text()
    expect(page.locator("#live")).not_to_have_text(updated, timeout=WAIT_MS)  # it polls
    shot = screenshot(page, tmp_path)

    assert "401" in wrong and page.locator("#login-error").is_hidden()
    assert ADMIN not in page.url and page.context.cookies() == []
    assert page.evaluate("Object.values(sessionStorage)") == [ADMIN]
    groups = [g.split("·")[0].strip() for g in page.locator("#devices tr.group").all_inner_texts()]
    assert groups == sorted([ra["architecture"], rb["architecture"]]), groups
    cells_a, cells_b = row_cells(page, ra["device_id"]), row_cells(page, rb["device_id"])
    assert cells_a[:6] == ["phone-a", ra["device_id"], "active", "300", "100", "0"], cells_a
    assert cells_b[:6] == ["phone-b", rb["device_id"], "active", "300", "100", "0"], cells_b
    assert row_cells(page, rm["device_id"])[:4] == ["mallory", rm["device_id"], "quarantined", "0"]
    assert "mallory" in page.locator("#quarantine").inner_text()
    for reg in (ra, rb):  # the label distribution of each architecture's training samples
        want = trained["architectures"][reg["architecture"]]["labels"]
        cells = page.locator(f'#labels tr[data-arch="{reg["architecture"]}"] td').all_inner_texts()
        assert sum(want.values()) == 300, want
        assert cells[1:3] == [f"{want['negative']:,}", f"{want['positive']:,}"], cells
    assert "activation pre-scales" in page.locator("#quarantine").inner_text()
    assert page.locator("#stat-quarantined .value").inner_text() == "1"
    step = int(page.locator("#stat-step .value").inner_text().replace(",", ""))
    assert step > 0
    accuracies = re.findall(r"(\d+\.\d)%", page.locator("#personal").inner_text())
    assert len(accuracies) >= 2 and all(0 <= float(a) <= 100 for a in accuracies), accuracies
    for chart in ("#chart-samples", "#chart-loss", "#chart-accuracy"):
        assert page.locator(f"{chart} svg.plot path.line").count() >= 2, chart
    assert int(page.locator('#requests tr[data-status="401"] td.num').inner_text()) >= 1
    assert errors == []
    assert shot.stat().st_size > 10_000


def test_dashboard_says_when_the_client_is_throttled(server_factory, browser):
    """Prepare a logged-in page; make this client send wrong tokens past the server's budget;
    the live page and the login form both say so (429)."""
    from playwright.sync_api import expect

    srv = server_factory({"train": False, "auth_failures_per_minute": 4})
    page = browser.new_page()
    page.goto(f"{srv.url}{ROUTE_DASHBOARD}")
    page.fill("#token", ADMIN)
    page.click("#login-button")
    expect(page.locator("#main")).to_be_visible(timeout=WAIT_MS)

    for _ in range(4):
        httpx.get(f"{srv.url}{ROUTE_STATUS}", headers={"Authorization": "Bearer wrong"})

    expect(page.locator("#banner")).to_contain_text("Too many wrong tokens", timeout=WAIT_MS)
    assert page.locator("#main").is_visible()  # throttled, not logged out
    page.click("#logout")
    page.fill("#token", ADMIN)
    page.click("#login-button")
    expect(page.locator("#login-error")).to_contain_text("(429)", timeout=WAIT_MS)
