"""fedmobillm.server.local.LocalServer: a real `fedmobillm serve` on loopback, started, killed,
restarted on the same port, stopped; a server that exits at once is a clear error."""

from __future__ import annotations

import httpx
import pytest

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.local import HEALTH_PATH, LocalServer

pytestmark = pytest.mark.integration

TOKEN = "dev-admin-token-0123456789abcdef"


def test_start_kill_restart_stop(tmp_path):
    srv = LocalServer(tmp_path / "data", admin_token=TOKEN, args=["--no-train"])
    with srv:
        assert srv.running and srv.url == f"http://127.0.0.1:{srv.port}"
        assert httpx.get(srv.url + HEALTH_PATH, timeout=5).status_code == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{srv.url}/v1/status", headers=auth, timeout=10).status_code == 200
        port = srv.port
        srv.kill()
        assert not srv.running
        srv.start()  # same port and data dir after a SIGKILL
        assert srv.port == port
        assert httpx.get(srv.url + HEALTH_PATH, timeout=5).status_code == 200
    assert not srv.running
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + HEALTH_PATH, timeout=2)
    assert srv.log_path == tmp_path / "data-server.log"
    log = srv.log_path.read_text()
    assert log.count("Application startup complete") == 2
    assert log.count("Application shutdown complete") == 1  # SIGTERM: graceful; SIGKILL: not


def test_server_that_exits_at_once_names_its_log(tmp_path):
    srv = LocalServer(tmp_path / "data", args=["--no-such-flag"], log_path=tmp_path / "s.log")
    with pytest.raises(FedMobiLLMError, match="exited with code 2") as err:
        srv.start()
    assert str(tmp_path / "s.log") in str(err.value)
    assert "--no-such-flag" in err.value.message  # argparse's complaint, from the log's tail
    assert not srv.running
