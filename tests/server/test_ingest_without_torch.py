"""An ingest-only server (`serve --no-train`, the serving side of `--trainer-process` and
of `--workers N`) never imports torch: its settings (`SideConfig`) live in the torch-free
`server/side_config.py`. A real `fedmobillm serve --no-train` in a python where torch cannot
be imported registers a device and acknowledges its upload."""

from __future__ import annotations

from server_helpers import ADMIN, make_manifest, make_payload, register, upload
from torch_blocker import env_without_torch

from fedmobillm.server.local import LocalServer


def test_serve_no_train_ingests_where_torch_cannot_be_imported(tmp_path):
    env = env_without_torch(tmp_path / "blocker", {"OMP_NUM_THREADS": "1"})
    srv = LocalServer(
        tmp_path / "data", admin_token=ADMIN, config={"train": False}, args=["--no-train"],
        env=env, startup_timeout=60.0,
    )  # fmt: skip
    srv.start()
    try:
        m = make_manifest("tiny-a")
        reg = register(srv.url, "phone", m)
        r = upload(srv.url, reg, make_payload(reg, m, range(8)))
        assert r.status_code == 200, r.text
        assert r.json()["samples"] == 8 and not r.json()["duplicate"]
    finally:
        srv.stop()
    assert "is blocked in this test" not in srv.log_path.read_text()
