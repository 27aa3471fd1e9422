"""Local differential privacy on the device (device_runtime/privacy.py): the accountant
against dp-accounting's own figures, the clipping bound, the noise's standard deviation,
randomised response, and end to end against a real server on loopback: a server that
requires epsilon <= X refuses a device declaring more, and a device past its budget
uploads nothing."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from privacy_helpers import ADMIN, cli, journal_lines, privacy_server, write_notes
from torch_blocker import python_without_torch

from fedmobillm.device_runtime import privacy as P
from fedmobillm.device_runtime.journal import Entry, Journal
from fedmobillm.errors import FedMobiLLMError


def library_epsilon(z: float, n: int, delta: float) -> float:
    """A fresh dp-accounting RDP accountant, composed n times: the reference figure."""
    acc = RdpAccountant()
    for _ in range(n):
        acc.compose(dp_accounting.GaussianDpEvent(z))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("epsilon", [16.0, 8.0, 4.0, 2.0, 1.0])
def test_noise_multiplier_meets_epsilon_tightly(epsilon):
    z = P.noise_multiplier(epsilon, 1e-5)

    got = library_epsilon(z, 1, 1e-5)

    assert got <= epsilon * (1 + 1e-6)
    assert got >= epsilon * 0.99  # calibrated, not merely safe
    assert library_epsilon(z * 0.98, 1, 1e-5) > epsilon  # less noise would not do


def test_journal_ledger_composes_as_the_library(tmp_path):
    """Prepare: a journal where one text is released 1..5 times (another bundle each time,
    z = noise_multiplier(8)) beside 40 texts released once. Execute: rebuild the ledger
    from the journal after each release. Assert: that text's epsilon and the device-level
    epsilon equal a fresh library accountant composed n and 40 + n times."""
    z = P.noise_multiplier(8.0, 1e-5)
    journal = Journal(tmp_path)
    others = [f"fp-{i}" for i in range(40)]
    journal.release(Entry("pending", "k0", "train", "b0", list(range(40)), "d"),
                    {"z": z, "fingerprints": others})  # fmt: skip
    for n in range(1, 6):
        entry = Entry("pending", f"k{n}", "train", f"bundle-{n}", [0], "d")
        journal.release(entry, {"z": z, "fingerprints": ["the-text"]})
        ledger = Journal(tmp_path).ledger(1e-5)  # re-read from disk, as a restart does

        assert ledger.text_epsilon("the-text") == pytest.approx(
            library_epsilon(z, n, 1e-5), rel=1e-9
        )
        assert ledger.text_epsilon("fp-3") == pytest.approx(library_epsilon(z, 1, 1e-5))
        assert ledger.device_epsilon() == pytest.approx(library_epsilon(z, 40 + n, 1e-5), rel=1e-9)
    assert ledger.text_epsilon("the-text") > 8.0 * 1.5  # composition grows


def test_ledger_refuses_past_the_budget_and_a_resend_is_free():
    config = P.PrivacyConfig(epsilon=4.0, clip=1.0)
    ledger = P.PrivacyLedger(1e-5)
    first = ledger.check(config, "key-1", ["a", "b"])
    ledger.add("key-1", config.z, ["a", "b"])

    assert first <= 4.0 * (1 + 1e-6)
    assert ledger.check(config, "key-1", ["a", "b"]) == pytest.approx(first)  # a re-send
    ledger.check(config, "key-2", ["c"])  # a new text costs the old ones nothing
    with pytest.raises(P.PrivacyBudgetExceeded, match="budget 4"):
        ledger.check(config, "key-3", ["c", "a"])  # "a" again: past its budget
    roomy = P.PrivacyConfig(epsilon=4.0, clip=1.0, budget=8.0)
    assert 4.0 < ledger.check(roomy, "key-3", ["a"]) <= 8.0
    capped = P.PrivacyConfig(epsilon=4.0, clip=1.0, device_budget=5.0)
    with pytest.raises(P.PrivacyBudgetExceeded, match="device-level"):
        ledger.check(capped, "key-4", ["d", "e", "f"])


def test_a_text_twice_in_one_batch_is_two_releases():
    """The same text twice in one batch is charged twice, and checked as such before."""
    config = P.PrivacyConfig(epsilon=8.0, clip=1.0)
    ledger = P.PrivacyLedger(1e-5)
    with pytest.raises(P.PrivacyBudgetExceeded, match="budget 8"):
        ledger.check(config, "key-1", ["a", "a", "b"])
    roomy = P.PrivacyConfig(epsilon=8.0, clip=1.0, budget=20.0)
    worst = ledger.check(roomy, "key-1", ["a", "a", "b"])
    ledger.add("key-1", roomy.z, ["a", "a", "b"])
    assert worst == pytest.approx(ledger.text_epsilon("a")) and worst > 8.0 * 1.3


def test_label_randomised_response_is_charged_in_the_ledger(tmp_path):
    """Labels released by randomised response spend their epsilon too: a text's epsilon is
    its taps' (RDP) plus the sum of its label epsilons, rebuilt from the journal after a
    restart; the default budget is one release of both, so a second release is refused."""
    config = P.PrivacyConfig(epsilon=4.0, clip=1.0, label_epsilon=2.0)
    assert config.text_budget == pytest.approx(6.0)
    first = P.PrivacyLedger(1e-5)
    eps = first.check(config, "k1", ["a", "b"])
    assert eps == pytest.approx(library_epsilon(config.z, 1, 1e-5) + 2.0)
    info = {"z": config.z, "clip": 1.0, "label_epsilon": 2.0, "fingerprints": ["a", "b"]}
    Journal(tmp_path).release(Entry("pending", "k1", "train", "b0", [0, 1], "d"), info)
    ledger = Journal(tmp_path).ledger(1e-5)  # as a resumed run rebuilds it
    assert ledger.text_epsilon("a") == pytest.approx(eps)
    assert ledger.device_epsilon() == pytest.approx(library_epsilon(config.z, 2, 1e-5) + 4.0)
    with pytest.raises(P.PrivacyBudgetExceeded, match="released 1 time"):
        ledger.check(config, "k2", ["a"])
    no_labels = P.PrivacyConfig(epsilon=4.0, clip=1.0, budget=6.0)
    with pytest.raises(P.PrivacyBudgetExceeded):  # taps alone fit 6, the spent label does not
        ledger.check(no_labels, "k2", ["a"])
    assert ledger.check(no_labels, "k2", ["c"]) == pytest.approx(library_epsilon(config.z, 1, 1e-5))


def test_the_default_budget_charges_the_label_once_per_release():
    """With releases = 2 the noise is calibrated for two tap releases at epsilon; each
    release also charges the label: the default budget admits the second release, and a
    third is refused. The --budget floor stays one release (epsilon + label_epsilon)."""
    config = P.PrivacyConfig(epsilon=4.0, clip=1.0, label_epsilon=1.0, releases=2)
    assert config.text_budget == pytest.approx(6.0)
    ledger = P.PrivacyLedger(1e-5)
    for i in range(2):
        eps = ledger.check(config, f"k{i}", ["a"])
        ledger.add(f"k{i}", config.z, ["a"], (config.z, 1.0, 1.0))
    assert eps == pytest.approx(library_epsilon(config.z, 2, 1e-5) + 2.0) and eps <= 6.0
    with pytest.raises(P.PrivacyBudgetExceeded, match="released 2 time"):
        ledger.check(config, "k2", ["a"])
    assert P.PrivacyConfig(epsilon=4.0, label_epsilon=1.0, releases=2, budget=5.0).text_budget == 5
    with pytest.raises(FedMobiLLMError, match="below one release's epsilon 5"):
        P.PrivacyConfig(epsilon=4.0, label_epsilon=1.0, releases=2, budget=4.5)


def test_a_budget_below_one_release_with_its_label_is_refused():
    with pytest.raises(FedMobiLLMError, match="below one release's epsilon 6"):
        P.PrivacyConfig(epsilon=4.0, label_epsilon=2.0, budget=5.0)


def test_a_released_batch_is_resent_only_with_its_settings(tmp_path):
    """A batch released with noise, re-sent with another epsilon or clip or without the
    mechanism, would hand the server the same noise draw at two scales: refused, from the
    journal after a restart too; the same settings re-send freely."""
    first = P.PrivacyConfig(epsilon=8.0, clip=1.0)
    info = {"z": first.z, "clip": 1.0, "label_epsilon": None, "fingerprints": ["a"]}
    Journal(tmp_path).release(Entry("pending", "k1", "train", "b0", [0], "d"), info)
    ledger = Journal(tmp_path).ledger(1e-5)  # as a resumed run rebuilds it
    same = (round(first.z, 12), 1.0, None)
    ledger.check_resend("k1", same)
    stricter = P.PrivacyConfig(epsilon=4.0, clip=1.0)
    with pytest.raises(P.PrivacyBudgetExceeded, match="re-sending it with z"):
        ledger.check_resend("k1", (round(stricter.z, 12), 1.0, None))
    with pytest.raises(P.PrivacyBudgetExceeded, match="no privacy mechanism"):
        ledger.check_resend("k1", None)
    ledger.check_resend("k2", None)  # a batch never released: nothing to protect


@pytest.mark.parametrize("shape", [(64, 3, 48), (16, 2, 7, 24)])
def test_clipping_bound_holds(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * rng.uniform(0.01, 30, size=shape[:-1] + (1,))
    mask = None if len(shape) == 3 else np.arange(7)[None, :] < rng.integers(1, 8, (16, 1))

    out = P.clip_and_noise(x, 2.5, 0.0, rng, mask)  # no noise: the clipping alone

    norms = np.linalg.norm(out, axis=-1)
    assert norms.max() <= 2.5 * (1 + 1e-5)
    small = np.linalg.norm(x, axis=-1) < 2.5  # vectors already inside are untouched
    kept = small if mask is None else small & mask[:, None, :]
    assert np.allclose(out[kept], x[kept], atol=1e-5)
    assert (norms > 2.5 * 0.999).mean() > 0.3  # the bound binds: this is a real test
    if mask is not None:
        assert not out[~np.broadcast_to(mask[:, None, :], out.shape[:-1])].any()


def test_noise_std_matches_sigma_times_clip():
    rng = np.random.default_rng(1)
    x = np.zeros((400, 3, 64))
    sigma = np.where(np.arange(400) < 200, 0.5, 2.0)  # per sample

    out = P.clip_and_noise(x, 3.0, sigma, rng)

    assert out[:200].std() == pytest.approx(0.5 * 3.0, rel=0.02)
    assert out[200:].std() == pytest.approx(2.0 * 3.0, rel=0.02)
    assert abs(out.mean()) < 0.05


@pytest.mark.parametrize("max_tokens", [None, 32])
def test_default_clip_keeps_the_noise_inside_int8(max_tokens):
    scales = np.array([0.015, 0.015, 0.0056])  # MiniLM-L3's, 3 taps
    z = P.noise_multiplier(4.0, 1e-5)
    clip = P.int8_clip(scales, z, 3, max_tokens)
    n = 1 if max_tokens is None else max_tokens
    x = np.random.default_rng(4).normal(size=(2000, 3, 64)) * 10  # norms far above the clip

    noisy = P.clip_and_noise(
        x, clip, P.sample_sigma(z, 3, None if n == 1 else [n]), np.random.default_rng(5)
    )

    assert P.int8_saturation(noisy, scales) < 1e-3
    assert P.int8_saturation(noisy * 4, scales) > 0.1  # a 4x larger clip would saturate


def test_sample_sigma_is_z_times_the_replace_one_sensitivity():
    z = P.noise_multiplier(8.0, 1e-5)
    assert P.sample_sigma(z, 3)[0] == pytest.approx(z * 2 * math.sqrt(3))
    tok = P.sample_sigma(z, 3, np.array([1, 4]))
    assert tok == pytest.approx([z * 2 * math.sqrt(3), z * 2 * math.sqrt(12)])


def test_randomized_response_keeps_at_the_documented_rate():
    rng = np.random.default_rng(2)
    labels = np.tile(np.array([0, 1, 2, -1]), 25_000)

    out = P.randomized_response(labels, 3, 1.0, rng)

    real = labels >= 0
    kept = (out[real] == labels[real]).mean()
    assert kept == pytest.approx(P.keep_probability(1.0, 3), abs=0.01)  # e / (e + 2)
    assert (out[~real] == -1).all() and set(np.unique(out[real])) == {0, 1, 2}


def test_a_resent_batch_carries_the_same_noise_and_secrets_differ(tmp_path):
    config = P.PrivacyConfig(epsilon=8.0, clip=1.0, label_epsilon=1.0)
    secret = P.device_secret(tmp_path)
    taps = np.random.default_rng(3).normal(size=(8, 3, 16)).astype(np.float32)
    labels = np.arange(8) % 2

    a = P.privatize(config, secret, "key", taps, labels, 2)
    b = P.privatize(config, P.device_secret(tmp_path), "key", taps, labels, 2)
    c = P.privatize(config, secret, "other-key", taps, labels, 2)

    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    assert (tmp_path / P.SECRET_NAME).stat().st_mode & 0o777 == 0o600


def test_token_batches_get_noise_per_their_length_and_zero_padding(tmp_path):
    """A token batch (N, K, T, d) + lengths: padding stays exactly zero (the server refuses
    anything else), each sample's noise is z * 2 * sqrt(K * t) x clip."""
    config = P.PrivacyConfig(epsilon=4.0, clip=0.5)
    lengths = np.array([2, 8])
    taps = np.zeros((2, 3, 8, 256), dtype=np.float32)

    noisy, _ = P.privatize(config, P.device_secret(tmp_path), "k", taps, np.zeros(2), 2, lengths)

    assert not noisy[0, :, 2:].any() and noisy[0, :, :2].all() and noisy[1].all()
    for i, t in enumerate(lengths):
        want = float(P.sample_sigma(config.z, 3, [t])[0]) * 0.5
        assert noisy[i, :, :t].std() == pytest.approx(want, rel=0.05)
    with pytest.raises(FedMobiLLMError, match="lengths"):
        P.privatize(config, b"s" * 32, "k", taps, np.zeros(2), 2)


def test_a_run_may_not_loosen_what_was_declared():
    declared = P.PrivacyConfig(epsilon=4.0, clip=1.0).declaration()

    assert P.effective_config(None, declared).epsilon == 4.0
    assert P.effective_config(P.PrivacyConfig(2.0, clip=1.0), declared).epsilon == 2.0
    with pytest.raises(FedMobiLLMError, match="looser than the device declared"):
        P.effective_config(P.PrivacyConfig(8.0, clip=1.0), declared)
    with pytest.raises(FedMobiLLMError, match="--delta"):
        P.PrivacyConfig(8.0, delta=2.0)


def test_accounting_runs_with_torch_blocked(tmp_path):
    """The phone role has no torch: dp-accounting calibrates and composes without it."""
    code = (
        "import sys; from fedmobillm.device_runtime import privacy as P; "
        "z = P.noise_multiplier(8.0, 1e-5); print(P.epsilon_of([(z, 1)], 1e-5)); "
        "assert 'torch' not in sys.modules"
    )
    r = python_without_torch(["-c", code], tmp_path)

    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == pytest.approx(8.0, rel=1e-6)


# -- end to end: real server, real bundle, the CLI ---------------------------------------


def stored(data_dir: Path, split: str) -> list[bytes]:
    with sqlite3.connect(data_dir / "store.sqlite3", timeout=10) as db:
        sql = "SELECT act FROM samples WHERE split = ? ORDER BY sample_id"
        return [r[0] for r in db.execute(sql, (split,))]


@pytest.mark.integration
def test_server_max_epsilon_and_a_device_past_its_budget(make_bundle, tmp_path):
    """Prepare: `fedmobillm serve` requiring max_epsilon 8, a MiniLM-L3 bundle, 6 texts.
    Execute: register without noise, at epsilon 16, at epsilon 8; run train; run validation
    on the same texts. Assert: the first two are refused (403, named); the third is listed
    with epsilon 8; train uploads 6 noisy samples with release lines; validation (the same
    texts again: past their budget) exits non-zero, journals the refusal, uploads nothing;
    with --budget 16 the same run uploads them, each text at the library's epsilon of two
    releases."""
    bundle = make_bundle("minilm-l3", num_taps=3, formats=("onnx",))
    data = write_notes(tmp_path / "texts.jsonl")
    with privacy_server(tmp_path / "srv", bundle, {"max_epsilon": 8.0}) as (srv, reg):
        none = cli(*reg, "--name", "plain", "--state", tmp_path / "plain")
        loose = cli(*reg, "--name", "loose", "--state", tmp_path / "loose",
                    "--epsilon", 16, "--clip", 2)  # fmt: skip
        state = tmp_path / "phone"
        ok = cli(*reg, "--name", "phone", "--state", state, "--epsilon", 8)  # clip: auto
        listed = cli("server", "devices", "--server", srv.url, "--admin-token", ADMIN)
        run = ["device", "run", "--bundle", bundle, "--data", data, "--state", state,
               "--batch-size", 4]  # fmt: skip
        train = cli(*run)
        again = cli(*run, "--split", "validation")
        train_rows, val_rows = stored(srv.data_dir, "train"), stored(srv.data_dir, "validation")
        roomier = cli(*run, "--split", "validation", "--budget", 16)  # knowingly: twice
        val_after = stored(srv.data_dir, "validation")

    assert none.returncode == 1 and "403" in none.stderr and "no privacy mechanism" in none.stderr
    assert loose.returncode == 1 and "epsilon <= 8" in loose.stderr and "16" in loose.stderr
    assert ok.returncode == 0, ok.stderr
    declared = json.loads((state / "device.json").read_text())["privacy"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    z = P.noise_multiplier(8.0, 1e-5)
    assert declared["clip"] == pytest.approx(P.int8_clip(manifest["activation_scales"], z, 3))
    assert f"privacy: clip {declared['clip']:g} + Gaussian noise, epsilon 8" in ok.stdout
    assert listed.returncode == 0 and "phone" in listed.stdout
    assert "EPSILON" in listed.stdout and " 8 " in listed.stdout.splitlines()[1]
    assert train.returncode == 0, train.stderr
    assert "epsilon 8 per text" in train.stdout and len(train_rows) == 6
    assert "saturate" not in train.stderr  # the default clip keeps the noise inside int8
    assert again.returncode == 1 and "privacy budget spent" in again.stderr
    assert val_rows == []
    lines = journal_lines(state)
    releases = [x for x in lines if x["event"] == "release" and x["split"] == "train"]
    assert [len(x["ids"]) for x in releases] == [4, 2]
    assert all(x["info"]["epsilon"] <= 8.0 * (1 + 1e-6) for x in releases)
    refused = [x for x in lines if x["event"] == "refused"]
    assert len(refused) == 1 and refused[0]["split"] == "validation"
    assert roomier.returncode == 0, roomier.stderr
    assert len(val_after) == 6
    second = [x for x in lines if x["event"] == "release" and x["split"] == "validation"]
    assert len(second) == 2  # each text now composed twice: the library's figure
    assert second[0]["info"]["epsilon"] == pytest.approx(library_epsilon(z, 2, 1e-5))
    assert 8.0 < second[0]["info"]["epsilon"] <= 16.0


def test_budget_alone_runs_the_registered_mechanism_and_says_so(tmp_path):
    """`device run --budget B` alone: the registered mechanism with the new budget; with
    --clip or --label-epsilon but no --epsilon the flag would be dropped: refused."""
    import argparse

    from fedmobillm.commands.device import _privacy_config
    from fedmobillm.device_runtime.client import DeviceState

    declared = P.PrivacyConfig(epsilon=8.0, clip=0.5).declaration()
    DeviceState("http://127.0.0.1:1", "p", "d-1", "t", "b" * 64, privacy=declared).save(tmp_path)
    flags = {"epsilon": None, "delta": 1e-5, "clip": None, "label_epsilon": None}
    args = argparse.Namespace(**flags, budget=16.0, device_budget=None)
    config = _privacy_config(args, tmp_path)
    assert config.epsilon == 8.0 and config.clip == 0.5 and config.text_budget == 16.0
    args.clip = 1.0
    with pytest.raises(FedMobiLLMError, match="--clip with --budget but no --epsilon"):
        _privacy_config(args, tmp_path)
