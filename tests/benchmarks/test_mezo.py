"""benchmarks._mezo (issue 22, ``benchmarks.run --methods mezo``) on a tiny random BERT: the
zeroth-order step learns, devices upload only seeds and scalars, and the server's replay of
two devices' scalars reproduces FedAvg of their local models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from benchmarks import _fedavg as FA
from benchmarks import _mezo as Z
from benchmarks import _models as M
from benchmarks._selftest import records

if TYPE_CHECKING:  # the fixture tiny_fleet (tests/benchmarks/conftest.py)
    from tests.benchmarks.conftest import TinyFleet


@pytest.fixture(scope="module")
def job(tiny_fleet: TinyFleet) -> Z.MezoJob:
    return Z.MezoJob(
        model_dir=tiny_fleet.model_dir,
        num_labels=2,
        data_dir=str(tiny_fleet.data_dir),
        num_devices=2,
        profiles=tiny_fleet.profiles,  # fast, slow
        forward_flops_per_sample=1e6,
        rounds=2,
        fraction_train=1.0,
        local_epochs=1,
        local_batch=4,
        lr=1e-2,
        eps=1e-3,
        perturbations=2,
        lp_rounds=0,  # the linear-probe start has its own test
        lora_rank=4,
        max_seq_len=32,
        seed=0,
        eval_every=1,
    )


def _model(job: Z.MezoJob) -> torch.nn.Module:
    fj = job.fedavg_job()
    return M.build_classifier(
        M.ClassifierSpec(fj.model_dir, 2, fj.method, fj.lora_rank, fj.max_seq_len, fj.seed)
    )


def test_mezo_steps_lower_the_training_loss(job: Z.MezoJob) -> None:
    model = _model(job)
    tok = M.load_tokenizer(job.model_dir)
    recs = records(8, 0)
    enc = M.tokenize(tok, [r.text for r in recs], 32)
    y = torch.tensor([r.label for r in recs])
    model.eval()
    with torch.no_grad():
        before = Z._loss(model, enc, y)
    rng = np.random.default_rng(0)
    for _ in range(60):
        seeds = [int(s) for s in rng.integers(0, 2**32 - 1, 4)]
        Z.mezo_step(model, enc, y, seeds, eps=1e-3, lr=5e-2)
    with torch.no_grad():
        after = Z._loss(model, enc, y)
    assert after < before - 0.05, (before, after)


def test_perturbation_is_seeded_and_restored(job: Z.MezoJob) -> None:
    model = _model(job)
    params = Z.trainable(model)
    w0 = [p.detach().clone() for p in params]
    Z.perturb(params, 7, 1e-3)
    moved = [p.detach().clone() for p in params]
    Z.perturb(params, 7, -1e-3)
    for a, b in zip(w0, params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    Z.perturb(params, 8, 1e-3)  # another seed, another direction
    assert any(not torch.allclose(a, b) for a, b in zip(moved, params, strict=True))


def test_replayed_scalars_reproduce_fedavg_of_local_models(job: Z.MezoJob) -> None:
    """Two devices' local MeZO rounds from the same weights: the server's replay of their
    (seed, scalar) pairs, weighted by num-examples, equals FedAvg of the two local models
    (plain ZO-SGD is linear in its z's), and one device's pairs replayed alone equal its own
    local model."""
    work = FA.ClientWork(job.fedavg_job())
    start = [a.copy() for a in work.init]
    updates, locals_ = [], []
    for dev in (0, 1):
        M.set_trainable(work.model, start)
        pairs, n, _, steps = Z.local_round(work, job, dev, 1)
        assert len(pairs) == steps * job.perturbations
        updates.append((pairs, n))
        locals_.append(M.get_trainable(work.model))
    assert [n for _, n in updates] == [8, 12]
    params = Z.trainable(work.model)
    # one device alone (weight 1): its own local model
    M.set_trainable(work.model, start)
    Z.replay(params, Z.coefficients(updates[:1], job.lr, job.perturbations))
    for a, b in zip(M.get_trainable(work.model), locals_[0], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    # both: FedAvg's num-examples weighted mean of the local models
    M.set_trainable(work.model, start)
    Z.replay(params, Z.coefficients(updates, job.lr, job.perturbations))
    mean = FA.fedavg_aggregate(list(zip(locals_, [8, 12], strict=True)))
    got = M.get_trainable(work.model)
    for a, b in zip(got, mean, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert any(not np.allclose(a, s) for a, s in zip(got, start, strict=True))


def test_federation_uploads_seeds_and_scalars_only(job: Z.MezoJob) -> None:
    res = Z.run_mezo(job)
    assert [p["round"] for p in res["curve"]] == [0, 1, 2]
    r1, r2 = res["rounds"]
    for rnd in (r1, r2):
        assert sorted(rnd["devices"]) == [0, 1]
    d = res["trainable_params"]
    steps = {0: 2, 1: 3}  # 8 and 12 records in batches of 4
    for c, m in zip(r1["clients"], sorted(steps), strict=True):
        pairs = steps[m] * job.perturbations
        assert c["bytes_up"] == Z.PAIR_BYTES * pairs + Z.HEADER_BYTES  # seeds + scalars
        assert c["bytes_up"] < 100 < 4 * d  # not the model's arrays
        assert c["bytes_down"] == 0  # round 1: both start from the seeded initial weights
        n = 4 * steps[m]
        per_step = 2 * job.perturbations * job.forward_flops_per_sample * n
        assert c["flops"] == pytest.approx(per_step + 2 * d * 4 * job.perturbations * steps[m])
    # round 2: each device downloads round 1's log (all 10 pairs, one header)
    log1 = Z.PAIR_BYTES * 10 + Z.HEADER_BYTES
    assert [c["bytes_down"] for c in r2["clients"]] == [log1, log1]
    assert r2["log_bytes"] == res["delivery_bytes_per_device"] == 2 * log1
    assert r2["clients"][1]["sim_s"] > r2["clients"][0]["sim_s"]  # the slow phone
    assert r2["round_sim_s"] == pytest.approx(max(c["sim_s"] for c in r2["clients"]))
    assert res["method"] == "mezo" and 0.0 <= res["test"]["accuracy"] <= 1.0
    assert res["best_round"] in (1, 2)


def test_tune_picks_what_the_perturbations_move(job: Z.MezoJob) -> None:
    """head: LoRA's factors stay where they started; lora: the head does; the counts add up."""
    model = _model(job)
    names = M.trainable_names(model)
    sizes = {t: sum(p.numel() for p in Z.tuned(model, t)) for t in Z.TUNES}
    head = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    )
    assert sizes["head"] == head == 2 * 32 + 2  # the tiny BERT's width 32, 2 labels
    assert sizes["lora+head"] == sizes["head"] + sizes["lora"] > sizes["lora"] > 0
    tok = M.load_tokenizer(job.model_dir)
    enc = M.tokenize(tok, [r.text for r in records(4, 0)], 32)
    y = torch.tensor([r.label for r in records(4, 0)])
    for tune in ("head", "lora"):
        before = M.get_trainable(model)
        Z.mezo_step(model, enc, y, [3, 4], 1e-3, 1e-1, Z.tuned(model, tune))
        after = M.get_trainable(model)
        moved = {
            n for n, a, b in zip(names, before, after, strict=True) if not np.array_equal(a, b)
        }
        assert moved and all(("lora_" in n) == (tune == "lora") for n in moved), (tune, moved)
    with pytest.raises(ValueError, match="tune must be one of"):
        Z.MezoJob(**{**job.__dict__, "tune": "prefix"})


def test_head_only_on_cached_features_matches_the_full_forward(job: Z.MezoJob) -> None:
    """tune=head: a device's round on its cached features gives the same (seed, g) pairs as
    MeZO through the whole model, and the cached evaluation the same accuracy and loss."""
    head = Z.MezoJob(**{**job.__dict__, "tune": "head"})
    work = FA.ClientWork(head.fedavg_job())
    params = Z.tuned(work.model, "head")
    cached = Z.CachedHead(head, work)
    M.set_trainable(work.model, work.init)
    full, n, _, _ = Z.local_round(work, head, 1, 1, params)
    M.set_trainable(work.model, work.init)
    fast, n2, _, _ = Z.local_round(work, head, 1, 1, params, cached)
    assert n == n2 == 12 and [s for s, _ in full] == [s for s, _ in fast]
    np.testing.assert_allclose([g for _, g in fast], [g for _, g in full], rtol=1e-3, atol=1e-3)
    want = FA.ServerEval(head.fedavg_job())(work.init, "test")
    got = cached(work.init, "test")
    assert got["accuracy"] == want["accuracy"] and got["n"] == want["n"] == 6
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_probe_head_folds_the_standardisation_into_the_model_head() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(20, 5)).astype(np.float32)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = rng.normal(size=(6, 3)).astype(np.float32)  # (d + 1, C), bias last
    weight, bias = Z.head_from_probe({"w": w, "mean": mu, "std": sd})
    assert weight.shape == (3, 5) and bias.shape == (3,)
    np.testing.assert_allclose(x @ weight.T + bias, ((x - mu) / sd) @ w[:-1] + w[-1], atol=1e-4)


def test_linear_probe_start_is_counted_and_seeds_the_head(job: Z.MezoJob) -> None:
    """lp_rounds: the federated probe's rounds come first in the log (their bytes, FLOPs and
    time), its head is the model's start (its validation accuracy on the model equals the
    probe's own), and each device's first MeZO download carries that head."""
    lp = Z.MezoJob(**{**job.__dict__, "lp_rounds": 3, "rounds": 1, "tune": "head"})
    res = Z.run_mezo(lp, test=False)
    start = res["linear_probe_start"]
    b = start["rounds"]
    assert 1 <= b <= 3 and start["validation"] == start["probe_validation"]
    assert [r.get("stage") for r in res["rounds"]] == ["linear probe"] * b + [None]
    head_bytes = (2 * 32 + 2) * 4
    first = res["rounds"][:b]
    # the probe's head up: (width + 1) x labels fp32, the model's head's size
    assert all(c["bytes_up"] == head_bytes for r in first for c in r["clients"])
    assert first[0]["clients"][0]["flops"] >= 8 * job.forward_flops_per_sample  # its forward
    mezo = res["rounds"][b]
    assert mezo["round"] == b + 1
    pairs = [c["bytes_down"] for c in mezo["clients"]]
    assert pairs == [head_bytes, head_bytes]  # the head, no log yet
    assert mezo["log_bytes"] == res["delivery_bytes_per_device"] > head_bytes
    assert res["trainable_params"] == 2 * 32 + 2
    assert [p["round"] for p in res["curve"]][-2:] == [b, b + 1]


def test_curves_count_the_replayed_log_as_mezo_delivery() -> None:
    from benchmarks._curves import delivery_bytes
    from benchmarks._report import fedavg_to_target

    def rnd(r: int, down: int, log: int | None) -> dict:
        c = {"device": 0, "bytes_up": 24, "bytes_down": down, "flops": 1e9}
        return {"round": r, "clients": [c]} | ({"log_bytes": log} if log is not None else {})

    curve = [{"round": r, "time_s": 5.0 * r, "accuracy": a} for r, a in enumerate((0.5, 0.6, 0.7))]
    mezo = {"method": "mezo", "curve": curve, "rounds": [rnd(1, 0, 24), rnd(2, 24, 48)]}
    mezo["trainable_bytes"] = 4000
    early, late = (fedavg_to_target(mezo, t, 1) for t in (0.6, 0.7))
    assert (early["round"], late["round"]) == (1, 2)
    assert delivery_bytes(mezo, early) == 24 and delivery_bytes(mezo, late) == 48
    assert late["bytes_per_device"] == 24 + 24 + 24  # two uploads, one download of the log
    fedavg = dict(mezo, method="fedavg-lora", rounds=[rnd(1, 0, None), rnd(2, 24, None)])
    assert delivery_bytes(fedavg, late) == 4000  # the final arrays


def test_bad_mezo_override_is_refused_by_name(tmp_path, capsys) -> None:
    from benchmarks.run import main

    out = tmp_path / "out"
    args = ["--quick", "--no-flower", "--methods", "mezo", "--out", str(out)]
    assert main([*args, "--mezo", "lr=fast"]) == 2
    assert "--mezo lr='fast': not a float" in capsys.readouterr().err
    assert main([*args, "--mezo", "momentum=0.9"]) == 2
    err = capsys.readouterr().err
    assert "KEY one of lr, eps, perturbations" in err and "Traceback" not in err
    assert main([*args, "--mezo", "eps=0"]) == 2
    assert "must be > 0" in capsys.readouterr().err
    assert main([*args, "--mezo", "tune=prefix"]) == 2
    assert "tune=prefix: one of lora+head, head, lora" in capsys.readouterr().err
    assert not out.exists()


def test_mezo_device_step_runs_in_a_fresh_process(job: Z.MezoJob, tmp_path) -> None:
    """The peak-memory probe benchmarks.run uses for mezo: one MeZO step in a fresh process."""
    import json
    import subprocess
    import sys

    from benchmarks.run import REPO

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps([r.text for r in records(4, 0)]))
    cmd = [sys.executable, "-m", "benchmarks._device_step", "mezo", "--model", job.model_dir]
    cmd += ["--texts", str(texts), "--batch", "4", "--max-seq-len", "32", "--lora-rank", "4"]
    r = subprocess.run([*cmd, "--perturbations", "2"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["method"] == "mezo" and out["batch"] == 4 and out["torch_imported"]
    assert out["peak_rss_mb"] >= out["rss_at_start_mb"] > 0


def test_from_refuses_a_missing_run_by_name(tmp_path, capsys) -> None:
    from benchmarks import _hetlora as H

    missing = tmp_path / "no-run"
    assert Z.main(["from", "--from", str(missing), "--out", str(tmp_path / "z")]) == 2
    assert f"{missing}/results.json does not exist" in capsys.readouterr().err
    assert H.main(["--from", str(missing), "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "benchmarks.run --out" in err
    assert Z.main(["from", "--out", str(tmp_path / "z")]) == 2
    assert "from needs --from RUN" in capsys.readouterr().err
    assert Z.main(["test", "--out", str(tmp_path / "z")]) == 2
    assert "test needs --forward-flops F" in capsys.readouterr().err
    assert Z.main(["sweep", "--out", str(tmp_path / "z"), "--config", "lr=1e-3,tune=x"]) == 2
    assert "--config tune=x: one of lora+head, head, lora" in capsys.readouterr().err
