"""An lm federation end to end (issue 16): real weights (SmolLM2-135M truncated after block 4,
taps 2 and 4, an fp32 ONNX token bundle with generation graphs), a real server (`fedmobillm
serve --task lm`, uvicorn on loopback), two real device processes (`fedmobillm device
register/run --task lm`, then `fetch-model`) on two speakers of the friends transcripts
(reply records: the previous line as prompt, loss on the speaker's line). The personal model
a device downloads must lower the held-out perplexity of the frozen bundle on the device
runtime (torch-free), on text it never uploaded, and `device generate --personal` must
write a completion."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedmobillm.server.local import LocalServer

pytestmark = pytest.mark.integration

ADMIN = "lm-e2e-admin-token-3b8e1f0c5d7a"
LAYERS = (2, 4)  # SmolLM2 blocks 1-4: a fast bundle; its frozen perplexity is poor
N_TRAIN, N_HELDOUT = 200, 60  # per device; held out: half validation (uploaded), half test
SERVER = {
    "train": True,
    "batch_size": 16,
    "eval_every": 25,
    "checkpoint_every": 100,
    "export_every": 50,
    "idle_after_steps": 100,
    "idle_after_epochs": 0,
    "side": {"width": 64, "blocks": 2, "heads": 4, "lr": 0.003},
}


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


def run_cmd(bundle: Path, data: Path, state: Path, split: str) -> list[str]:
    """`fedmobillm device run --task lm` of one device on one split, one forward thread."""
    return [sys.executable, "-m", "fedmobillm.cli", "device", "run", "--task", "lm",
            "--bundle", str(bundle), "--data", str(data), "--state", str(state),
            "--split", split, "--threads", "1", "--batch-size", "16"]  # fmt: skip


def device_files(tmp_path: Path) -> list[dict[str, Path]]:
    """Two speakers' reply records: train, validation and test jsonl each."""
    from fedmobillm.data.lm import lm_devices, load_lm_corpus, write_lm_jsonl
    from fedmobillm.demo_lm import _sample, split_heldout

    devices = lm_devices(load_lm_corpus("friends").records, num_devices=2, seed=0)
    out = []
    for d, dev in enumerate(devices):
        val, test = split_heldout(dev.heldout, N_HELDOUT, seed=d)
        train = _sample(dev.train, N_TRAIN, random.Random(d))
        files = {s: tmp_path / f"{dev.name}.{s}.jsonl" for s in ("train", "validation", "test")}
        for split, recs in (("train", train), ("validation", val), ("test", test)):
            write_lm_jsonl(files[split], recs)
        out.append(files)
    return out


def wait_trained(url: str, timeout: float) -> dict:
    """The trainer status once it idles with a personal model exported."""
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {ADMIN}"})
        body = r.json()
        st = body["trainer"]
        assert st.get("error") is None, st["error"]
        if st["idle"] and st["personal_models"] and st["step"] >= 100:
            return body
        time.sleep(1.0)
    raise AssertionError(f"trainer did not settle in {timeout} s: {json.dumps(st)[:2000]}")


def test_lm_federation_personal_model_beats_frozen_on_device(tmp_path):
    from fedmobillm.demo_lm import heldout_perplexity, lm_bundle
    from fedmobillm.device_runtime.protocol import read_manifest

    start = time.monotonic()
    bundle = lm_bundle(LAYERS)
    phases = {"bundle": time.monotonic() - start}
    manifest = read_manifest(bundle)
    assert manifest.kind == "decoder" and manifest.pivot == "none"
    files = device_files(tmp_path)
    server = LocalServer(
        tmp_path / "server",
        admin_token=ADMIN,
        config=SERVER,
        args=["--task", "lm"],
        env={"OMP_NUM_THREADS": "1"},
        startup_timeout=120.0,
    )
    with server:
        states = [tmp_path / f"device-{d}" for d in range(2)]
        for d, state in enumerate(states):
            cli("device", "register", "--server", server.url, "--admin-token", ADMIN,
                "--name", f"phone-{d}", "--bundle", bundle, "--state", state,
                "--task", "lm")  # fmt: skip
        for split in ("train", "validation"):  # both devices at once
            procs = [
                subprocess.Popen(run_cmd(bundle, files[d][split], state, split),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for d, state in enumerate(states)
            ]  # fmt: skip
            for p in procs:
                out, err = p.communicate(timeout=300)
                assert p.returncode == 0, (split, out[-2000:], err[-3000:])
        phases["uploads"] = time.monotonic() - start
        status = wait_trained(server.url, timeout=300)
        phases["trained"] = time.monotonic() - start
        model = tmp_path / "personal"
        cli("device", "fetch-model", "--state", states[0], "--out", model)

    st = status["trainer"]
    assert status.get("task", st.get("task")) == "lm"
    (arch,) = st["architectures"]
    a = st["architectures"][arch]
    # a reply longer than the bundle's 64 tokens goes up as several windows: samples >= lines
    assert a["devices"] == 2 and 2 * N_TRAIN <= a["train"] < 3 * N_TRAIN
    ppl = heldout_perplexity(bundle, model, files[0]["test"])
    phases["perplexity"] = time.monotonic() - start
    prompt = "Ross, are you going to the coffee house?\n"
    gen = cli("device", "generate", "--bundle", bundle, "--personal", model, "--prompt", prompt,
              "--max-new-tokens", "8", "--threads", "2", "--json")  # fmt: skip
    completion = json.loads(gen.stdout.strip().splitlines()[-1])
    phases["generated"] = time.monotonic() - start
    frozen, personal = ppl["frozen"], ppl["personal"]
    print(
        f"lm federation e2e: held-out perplexity {frozen['perplexity']:.1f} frozen -> "
        f"{personal['perplexity']:.1f} personal over {personal['tokens']} tokens (top-1 "
        f"{frozen['next_token_top1']:.3f} -> {personal['next_token_top1']:.3f}); step "
        f"{st['step']}, best validation {st['best_validation'].get(arch)}; completion "
        f"{completion['text']!r}; seconds since start: "
        + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
    )
    assert frozen["tokens"] == personal["tokens"] > 100
    assert personal["perplexity"] < frozen["perplexity"], ppl
    assert completion["token_ids"] and isinstance(completion["text"], str)
