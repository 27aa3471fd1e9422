"""TLS between device and server: `fedmobillm serve --ssl-certfile/--ssl-keyfile` (a real
uvicorn on loopback, a certificate generated here with `cryptography`), and a device that
verifies it (device_runtime/uploader.py TlsConfig): an upload over TLS with a CA bundle or
a pin works; an unknown CA, a wrong pin, or plaintext http when TLS is configured is
refused at once with a clear error and nothing sent."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_helpers import ADMIN, make_manifest, make_payload

from fedmobillm.device_runtime.messages import ROUTE_DEVICES, RegisterRequest, RegisterResponse
from fedmobillm.device_runtime.uploader import RetryPolicy, TlsConfig, TlsRefused, Uploader
from fedmobillm.server.local import free_port

pytestmark = pytest.mark.integration


def self_signed(folder: Path, name: str) -> tuple[Path, Path, str]:
    """A self-signed certificate for 127.0.0.1 (IP SAN): (cert.pem, key.pem, sha256 hex)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert_path, key_path, hashlib.sha256(der).hexdigest()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """`fedmobillm serve --ssl-certfile --ssl-keyfile --no-train` on a free loopback port."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key, pin = self_signed(folder, "server")
    port = free_port()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmobillm.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--data-dir", str(folder / "data"), "--no-train",
         "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "FEDMOBILLM_ADMIN_TOKEN": ADMIN}, start_new_session=True,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/healthz", verify=ctx, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((folder / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    yield {"url": url, "cert": cert, "pin": pin, "folder": folder, "port": port}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    log.close()


def register(url: str, name: str, tls: TlsConfig) -> dict:
    body = RegisterRequest(name, make_manifest(), ["negative", "positive"]).to_dict()
    with Uploader(url, ADMIN, RetryPolicy(attempts=1), tls=tls) as up:
        resp = up.request("POST", ROUTE_DEVICES, json=body)
    assert resp.status_code == 201, resp.text
    return RegisterResponse.from_dict(resp.json()).to_dict()


@pytest.mark.parametrize("how", ["ca_bundle", "pin"])
def test_upload_over_tls_works(tls_server, how):
    """A device that trusts the server's certificate (as its CA, or by its pin, given with
    colons as openssl prints it) registers and uploads a batch over https."""
    pin = ":".join(tls_server["pin"][i : i + 2] for i in range(0, 64, 2)).upper()
    tls = (
        TlsConfig(ca_bundle=str(tls_server["cert"]))
        if how == "ca_bundle"
        else TlsConfig(pin_sha256=pin)
    )
    reg = register(tls_server["url"], f"phone-{how}", tls)

    with Uploader(tls_server["url"], reg["token"], RetryPolicy(attempts=1), tls=tls) as up:
        ack = up.post_batch(make_payload(reg, make_manifest(), range(8)))

    assert ack["samples"] == 8 and not ack["duplicate"]


def test_unknown_certificate_is_refused_at_once(tls_server, tmp_path):
    """The system CAs, or a CA bundle of another certificate: refused with a clear error on
    the first attempt (no retries), nothing sent."""
    other, _, _ = self_signed(tmp_path, "someone-else")
    for tls in (TlsConfig(), TlsConfig(ca_bundle=str(other))):
        up = Uploader(tls_server["url"], ADMIN, RetryPolicy(attempts=4, base_s=5), tls=tls)
        start = time.monotonic()
        with up, pytest.raises(TlsRefused, match="failed TLS verification") as err:
            up.request("GET", ROUTE_DEVICES)
        assert "CERTIFICATE_VERIFY_FAILED" in err.value.message
        assert up.stats.requests == 1 and up.stats.retries == 0
        assert time.monotonic() - start < 5


def test_a_pinned_device_ignores_a_proxy_from_the_environment(tls_server, monkeypatch):
    """Through an HTTPS proxy httpcore wraps with wrap_bio, where the pin is not checked: a
    pinned device does not use proxy variables (here a dead proxy: used, it would fail)."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    up = Uploader(
        tls_server["url"],
        ADMIN,
        RetryPolicy(attempts=1),
        tls=TlsConfig(pin_sha256=tls_server["pin"]),
    )
    with up:
        assert up.request("GET", ROUTE_DEVICES).status_code == 200


def test_wrong_pin_is_refused(tls_server):
    up = Uploader(tls_server["url"], ADMIN, tls=TlsConfig(pin_sha256="ab" * 32))
    with up, pytest.raises(TlsRefused, match="not the pinned") as err:
        up.request("GET", ROUTE_DEVICES)
    assert tls_server["pin"] in err.value.message  # says which certificate it saw
    assert up.stats.requests == 1


def test_plaintext_is_refused_when_tls_is_configured(tls_server):
    with pytest.raises(TlsRefused, match="plaintext http"):
        Uploader(f"http://127.0.0.1:{tls_server['port']}", ADMIN,
                 tls=TlsConfig(pin_sha256=tls_server["pin"]))  # fmt: skip


def test_plaintext_to_a_remote_host_is_warned_about(caplog):
    Uploader("http://192.0.2.1:8000", "t").close()  # TEST-NET-1: nothing is sent
    Uploader("http://127.0.0.1:8000", "t").close()

    warnings = [r.getMessage() for r in caplog.records if "PLAINTEXT" in r.getMessage()]
    assert len(warnings) == 1 and "192.0.2.1" in warnings[0]


def cli(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_device_cli_over_tls_with_a_pin(tls_server, make_bundle, tmp_path):
    """`device register --pin-sha256` keeps the pin in the device state; `device run` then
    uploads over https with it; the admin CLI trusts the server through SSL_CERT_FILE."""
    bundle = make_bundle("minilm-l3", num_taps=3, formats=("onnx",))
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(f'{{"text": "note {i}", "label": {i % 2}}}\n' for i in range(5)))
    state = tmp_path / "phone"

    reg = cli("device", "register", "--server", tls_server["url"], "--admin-token", ADMIN,
              "--name", "cli-phone", "--bundle", bundle, "--state", state,
              "--labels", "negative,positive", "--pin-sha256", tls_server["pin"])  # fmt: skip
    run = cli("device", "run", "--bundle", bundle, "--data", data, "--state", state)
    listed = cli("server", "devices", "--server", tls_server["url"], "--admin-token", ADMIN,
                 env={"SSL_CERT_FILE": str(tls_server["cert"])})  # fmt: skip

    assert reg.returncode == 0, reg.stderr
    assert '"pin_sha256": "' + tls_server["pin"] in (state / "device.json").read_text()
    assert run.returncode == 0, run.stderr
    assert "samples uploaded:   5" in run.stdout
    assert listed.returncode == 0 and "cli-phone" in listed.stdout


def test_tls_files_from_the_config_file(tmp_path, monkeypatch):
    """ssl_certfile / ssl_keyfile in the config file (docs/deploy/server.toml) give uvicorn
    the same options as the flags; one without the other is refused with a hint."""
    from fedmobillm.commands.serve import _tls_options
    from fedmobillm.errors import FedMobiLLMError
    from fedmobillm.server.settings import load_settings

    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", ADMIN)
    cert, key, _ = self_signed(tmp_path, "server")
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nssl_certfile = "{cert}"\nssl_keyfile = "{key}"\n')
    settings, _ = load_settings(config)
    assert _tls_options(settings) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    config.write_text(f'[server]\nssl_certfile = "{cert}"\n')
    with pytest.raises(FedMobiLLMError, match="go together"):
        _tls_options(load_settings(config)[0])
