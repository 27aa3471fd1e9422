"""Project before noise (device_runtime/dp_projection.py + privacy.clip_and_noise): the basis is
orthonormal, uploads lie in its subspace, the noise's energy is the calibrated sigma in R
dimensions (not d), and the accounting does not change. End to end: a bundle exported with
``--dp-projection`` has the basis among its hashed files, and a real ``device run --epsilon``
against a real server stores uploads that lie in the bundle's subspace."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from privacy_helpers import cli, journal_lines, privacy_server, write_notes
from torch_blocker import python_without_torch

from fedmobillm.device_runtime import privacy as P
from fedmobillm.device_runtime.dp_projection import (
    PROJECTION_FILE,
    DpProjection,
    discriminants,
    fit_projection,
    load_projection,
    orthonormality_error,
)
from fedmobillm.errors import FedMobiLLMError


def public_vectors(m: int = 600, k: int = 3, d: int = 48, seed: int = 0) -> np.ndarray:
    """(m, K, d) anisotropic vectors with a large common offset (as hidden states have)."""
    rng = np.random.default_rng(seed)
    spread = np.geomspace(5.0, 0.05, d)  # (d,)
    mix = np.linalg.qr(rng.standard_normal((d, d)))[0]  # a random rotation
    x = (rng.standard_normal((m, k, d)) * spread) @ mix.T
    return x + 3.0  # (m, K, d)


def in_subspace_error(proj: DpProjection, y: np.ndarray) -> float:
    """max over vectors of ||P^T P y - y|| / ||y|| (y (N, K, [T,] d))."""
    b = proj.basis.astype(np.float64)
    extra = (None,) * (y.ndim - 3)
    bb = b[(None, slice(None)) + extra]
    back = np.einsum("...rd,...r->...d", bb, np.einsum("...rd,...d->...r", bb, y))
    norms = np.maximum(np.linalg.norm(y, axis=-1), 1e-30)
    return float((np.linalg.norm(back - y, axis=-1) / norms).max())


@pytest.mark.parametrize("whiten", [False, True])
def test_fit_is_orthonormal_and_keeps_the_top_variance(whiten):
    x = public_vectors()
    proj, kept = fit_projection(x, 6, whiten)

    assert proj.basis.shape == (3, 6, 48) and proj.basis.dtype == np.float32
    assert orthonormality_error(proj.basis) < 1e-5
    assert proj.whitened is whiten
    # the top 6 of 48 log-spaced spreads (5 .. 0.05): 1 - q^6 of the variance, q = 0.01^(2/47)
    q = 0.01 ** (2 / 47)
    assert kept == pytest.approx([(1 - q**6) / (1 - q**48)] * 3, abs=0.05)
    np.testing.assert_allclose(proj.mean, x.mean(axis=0), rtol=1e-5, atol=1e-5)
    if whiten:  # whitened coordinates of the public vectors have unit variance
        np.testing.assert_allclose(proj.coords(x).var(axis=0, ddof=1), 1.0, rtol=1e-3)


def test_a_rank_beyond_the_width_and_a_skewed_basis_are_refused():
    with pytest.raises(FedMobiLLMError, match="must be in 1..48"):
        fit_projection(public_vectors(), 49)
    proj, _ = fit_projection(public_vectors(), 4)
    with pytest.raises(FedMobiLLMError, match="not orthonormal"):
        DpProjection(proj.basis * 1.01, proj.mean)


@pytest.mark.parametrize("whiten", [False, True])
def test_a_rank_the_public_vectors_cannot_span_is_refused(whiten):
    """M public vectors span M - 1 centred directions: rank M would whiten a zero-variance
    component by ~1e6 (junk uploads), so it is refused, as is a rank reaching into
    directions with (almost) no public variance."""
    x = public_vectors(m=8)  # (8, 3, 48): 7 directions
    with pytest.raises(FedMobiLLMError, match="span at most 7 directions"):
        fit_projection(x, 8, whiten)
    proj, _ = fit_projection(x, 7, whiten)
    assert np.isfinite(proj.scale).all() and proj.scale.max() < 1e3
    flat = public_vectors()
    flat[..., :] = flat @ np.diag([1.0] * 5 + [0.0] * 43)  # 5 directions carry variance
    flat += np.random.default_rng(1).normal(scale=1e-6, size=flat.shape)  # rounding
    with pytest.raises(FedMobiLLMError, match="5 of 10 components with public variance under"):
        fit_projection(flat, 10, whiten)
    assert fit_projection(flat, 5, whiten)[0].rank == 5


@pytest.mark.parametrize("whiten", [False, True])
def test_uploads_lie_in_the_subspace_and_clip_bounds_the_coordinates(whiten):
    x = public_vectors(200, seed=1)
    proj, _ = fit_projection(public_vectors(), 5, whiten)
    clip, sigma = 0.7, float(P.sample_sigma(P.noise_multiplier(8.0, 1e-5), 3)[0])
    y = P.clip_and_noise(x, clip, sigma, np.random.default_rng(0), projection=proj)

    assert y.shape == x.shape and y.dtype == np.float32
    assert in_subspace_error(proj, y.astype(np.float64)) < 1e-5  # fp32 error
    clean = proj.clean(x, clip)  # the release without noise: in the subspace, norm <= clip
    assert in_subspace_error(proj, clean.astype(np.float64)) < 1e-5
    assert np.linalg.norm(clean, axis=-1).max() <= clip * (1 + 1e-5)
    # unprojected, the same mechanism fills all d dimensions
    plain = P.clip_and_noise(x, clip, sigma, np.random.default_rng(0))
    assert in_subspace_error(proj, plain.astype(np.float64)) > 0.5


def test_noise_energy_is_sigma_in_r_dims_not_d():
    """Vectors at the centre (coordinates 0, nothing to clip): what is uploaded is the noise
    alone; its energy per vector is R (sigma clip)^2, d / R times less than unprojected."""
    r, d, n = 6, 48, 4000
    proj, _ = fit_projection(public_vectors(d=d), r)
    x = np.broadcast_to(proj.mean, (n, 3, d)).copy()
    clip, z = 0.5, P.noise_multiplier(8.0, 1e-5)
    sigma = float(P.sample_sigma(z, 3)[0])  # z * 2 * sqrt(K), as the device calibrates it
    y = P.clip_and_noise(x, clip, sigma, np.random.default_rng(3), projection=proj)
    plain = P.clip_and_noise(np.zeros_like(x), clip, sigma, np.random.default_rng(3))

    energy = float((np.linalg.norm(y, axis=-1) ** 2).mean())
    assert energy == pytest.approx(r * (sigma * clip) ** 2, rel=0.03)
    # the noise's std along each basis direction is the calibrated sigma * clip
    coords = np.einsum("krd,nkd->nkr", proj.basis.astype(np.float64), y)
    assert coords.std() == pytest.approx(sigma * clip, rel=0.02)
    plain_energy = float((np.linalg.norm(plain, axis=-1) ** 2).mean())
    assert plain_energy / energy == pytest.approx(d / r, rel=0.05)


def test_token_taps_are_projected_per_token_and_padding_stays_zero():
    proj, _ = fit_projection(public_vectors(), 4)
    rng = np.random.default_rng(2)
    x = public_vectors(5, seed=4)[:, :, None, :].repeat(7, axis=2)  # (5, 3, 7, 48)
    lengths = np.array([7, 3, 1, 5, 2])
    noisy, _ = P.privatize(
        P.PrivacyConfig(8.0, clip=0.5), b"k" * 32, "batch-1", x, np.zeros(5, np.int64), 2,
        lengths, proj,
    )  # fmt: skip
    real = np.arange(7)[None, :] < lengths[:, None]  # (5, 7)

    assert noisy.shape == x.shape
    assert np.all(noisy.transpose(0, 2, 1, 3)[~real] == 0.0)
    assert in_subspace_error(proj, noisy.transpose(0, 2, 1, 3)[real][:, :, None, :]) < 1e-5
    del rng


def test_accounting_and_the_release_settings_do_not_change():
    """The projection is post-processing: the same z, the library's epsilon for one release,
    the same sigma; only the default clip grows (the noise of an uploaded coordinate is at
    most ``spread`` times the subspace's)."""

    class M:  # the manifest fields resolved() reads
        activation_scales = [0.01, 0.02, 0.015]
        taps = [2, 4, 6]
        max_seq_len = 64
        tokens = False

    proj, _ = fit_projection(public_vectors(), 6)
    plain = P.PrivacyConfig(8.0).resolved(M())
    projected = P.PrivacyConfig(8.0).resolved(M(), proj)

    assert projected.z == plain.z
    assert P.epsilon_of([(projected.z, 1)], 1e-5) == pytest.approx(8.0, rel=1e-6)
    assert projected.declaration()["noise_multiplier"] == plain.declaration()["noise_multiplier"]
    assert 0 < proj.spread <= 1.0
    assert projected.clip == pytest.approx(plain.clip / proj.spread)


def labelled_vectors(m: int = 800, k: int = 2, d: int = 32, seed: int = 0):
    """(m, K, d) vectors whose label lives in a direction of small variance (the last of
    ``public_vectors``' spread), and (m,) labels with a few unlabelled (-1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, m)  # (m,)
    spread = np.geomspace(5.0, 0.05, d)  # (d,)
    x = rng.standard_normal((m, k, d)) * spread  # (m, K, d)
    x[:, :, -1] += np.where(y == 1, 0.2, -0.2)[:, None]  # 4 x its spread apart
    y[:10] = -1
    return x + 3.0, y


def test_a_supervised_basis_leads_with_the_label_direction():
    """The label lives in the direction of least variance: plain PCA of rank 4 misses it;
    with one supervised direction the basis's first row is it (the remaining rows are the
    top variance of what it leaves), orthonormal, and the label separates there."""
    x, y = labelled_vectors()
    plain, _ = fit_projection(x, 4, whiten=True)
    sup, kept = fit_projection(x, 4, whiten=True, labels=y, supervised=1)
    e = np.eye(32)[-1]  # the label direction
    assert np.abs(plain.basis[:, :, -1]).max() < 0.05  # PCA: nothing of it
    assert np.abs(sup.basis[:, 0] @ e).min() > 0.95  # (K,): the first row, per tap
    assert orthonormality_error(sup.basis) < 1e-5
    assert np.abs(sup.basis[:, 1:] @ plain.basis[:, :3].transpose(0, 2, 1)).max() > 0.95

    def gap(u: np.ndarray) -> np.ndarray:  # (m, K, R) -> (K, R) class-mean gap / spread
        return np.abs(u[y == 1].mean(0) - u[y == 0].mean(0)) / u[y >= 0].std(0)

    assert gap(sup.coords(x))[:, 0].min() > 1.2  # the classes far apart along it
    assert gap(plain.coords(x)).max() < 0.3  # and along none of PCA's rows
    assert len(kept) == 2 and all(0 < v < 1 for v in kept)


def test_supervised_directions_need_labels_and_classes():
    x, y = labelled_vectors()
    with pytest.raises(FedMobiLLMError, match="needs the public text's labels"):
        fit_projection(x, 4, labels=None, supervised=1)
    with pytest.raises(FedMobiLLMError, match="need 3 public classes"):
        fit_projection(x, 4, labels=y, supervised=2)  # two classes: one direction
    with pytest.raises(FedMobiLLMError, match="must be in 0..4"):
        fit_projection(x, 4, labels=y, supervised=5)
    with pytest.raises(FedMobiLLMError, match="labels for"):
        fit_projection(x, 4, labels=y[:-1], supervised=1)
    three = np.where(np.arange(len(y)) % 3 == 0, 2, y)  # a third class: two directions
    assert discriminants(x[:, 0], three, 2).shape == (2, 32)


def test_a_supervised_basis_is_the_same_mechanism():
    """A supervised basis is a DpProjection like any other: the device's clip_and_noise
    releases P^T (clip(u) + noise) with the calibrated sigma in its R dims."""
    x, y = labelled_vectors(m=400)
    proj, _ = fit_projection(x, 3, whiten=True, labels=y, supervised=1)
    out = P.clip_and_noise(x, 0.5, 0.0, np.random.default_rng(0), projection=proj)
    assert np.allclose(out, proj.clean(x, 0.5), atol=1e-5)  # no noise: the clipped view
    noisy = P.clip_and_noise(x, 0.5, 2.0, np.random.default_rng(0), projection=proj)
    noise = proj.coords(noisy.astype(np.float64) + proj.mean[None]) - proj.coords(
        out.astype(np.float64) + proj.mean[None]
    )  # (N, K, R) in scaled coordinates
    raw = noise / proj.scale[None]  # the noise as added, before P^T
    assert raw.std() == pytest.approx(2.0 * 0.5, rel=0.05)


def test_save_and_load_through_the_manifest(tmp_path):
    proj, _ = fit_projection(public_vectors(), 5, whiten=True)
    proj.save(tmp_path / PROJECTION_FILE)

    class M:
        taps = [2, 4, 6]
        hidden_size = 48
        files = {PROJECTION_FILE: {}}
        extra = {"dp_projection": {"file": PROJECTION_FILE, "rank": 5}}

    got = load_projection(tmp_path, M())
    assert got is not None
    np.testing.assert_array_equal(got.basis, proj.basis)
    np.testing.assert_array_equal(got.scale, proj.scale)
    M.extra = {}
    assert load_projection(tmp_path, M()) is None  # a bundle without one works as before
    M.extra = {"dp_projection": {"file": PROJECTION_FILE, "rank": 4}}
    with pytest.raises(FedMobiLLMError, match="manifest says"):
        load_projection(tmp_path, M())


# -- end to end: a real export, a real server, the CLI --------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_projected_bundle_uploads_in_its_subspace(make_bundle, tmp_path):
    """Prepare: a MiniLM-L3 bundle exported with --dp-projection 8, a server on loopback,
    6 texts. Execute: register with --epsilon 8, device run with fp16 uploads. Assert: the
    basis is among the bundle's hashed files and orthonormal; the stored uploads lie in
    its subspace up to fp16 error; the run summary says the projection; the journal's
    releases are at epsilon 8 (the accounting is unchanged)."""
    from fedmobillm.device_runtime.protocol import load_verified_bundle

    bundle = make_bundle(
        "minilm-l3", num_taps=3, formats=("onnx",), max_seq_len=64, dp_projection=8,
        calibration="nyt-snippets",  # public text, not the federated movie-snippets
    )  # fmt: skip
    manifest = load_verified_bundle(bundle)  # every file's sha256 checked
    assert (
        PROJECTION_FILE in manifest.files and len(manifest.files[PROJECTION_FILE]["sha256"]) == 64
    )
    assert manifest.extra["dp_projection"]["rank"] == 8
    assert manifest.extra["dp_projection"]["calibration"] == "nyt-snippets"
    proj = load_projection(bundle, manifest)
    assert proj is not None and orthonormality_error(proj.basis) < 1e-5
    data = write_notes(tmp_path / "texts.jsonl")
    state, plain = tmp_path / "phone", tmp_path / "plain"
    with privacy_server(tmp_path / "srv", bundle) as (srv, reg):
        ok = cli(*reg, "--name", "phone", "--state", state, "--epsilon", 8)
        ok_plain = cli(*reg, "--name", "plain", "--state", plain)  # no noise
        run = ["device", "run", "--bundle", bundle, "--data", data, "--batch-size", 4,
               "--encoding", "fp16"]  # fmt: skip
        noisy = cli(*run, "--state", state)
        clean = cli(*run, "--state", plain)
        with sqlite3.connect(srv.data_dir / "store.sqlite3", timeout=10) as db:
            sql = "SELECT s.act, d.name FROM samples s JOIN devices d ON d.device_id = s.device_id"
            rows = list(db.execute(sql))

    assert ok.returncode == 0 and ok_plain.returncode == 0, ok.stderr + ok_plain.stderr
    assert noisy.returncode == 0, noisy.stderr
    assert "projected onto the bundle's public 8-of-384 dims per tap" in noisy.stdout
    assert clean.returncode == 0 and "no noise (--epsilon not set)" in clean.stdout
    assert sorted(name for _, name in rows) == ["phone"] * 6 + ["plain"] * 6
    y = np.stack([np.frombuffer(b, np.float16).reshape(3, 384) for b, _ in rows])
    assert in_subspace_error(proj, y.astype(np.float64)) < 2e-3  # fp16 rounding
    # the personal model's input on the phone: the same subspace, without noise
    from fedmobillm.device_runtime.backbone import Backbone
    from fedmobillm.device_runtime.personal import backbone_taps

    taps, _ = backbone_taps(Backbone(bundle, "onnx"), ["a quiet, moving film", "dull"])
    assert in_subspace_error(proj, taps.astype(np.float64)) < 1e-5
    plain_rows = y[[name == "plain" for _, name in rows]].astype(np.float32)
    assert np.linalg.norm(plain_rows, axis=-1).min() > 0.1  # not noise: the view
    lines = journal_lines(state)
    releases = [x for x in lines if x["event"] == "release"]
    assert releases and all(x["info"]["epsilon"] == pytest.approx(8.0, rel=1e-6) for x in releases)


@pytest.mark.integration
@pytest.mark.slow
def test_a_supervised_projection_is_fitted_on_the_calibration_labels(make_bundle):
    """Prepare: MiniLM-L3 exported with --dp-projection 4 --dp-projection-supervised 1 on
    nyt-snippets (public, labelled). Assert: the manifest says so; each tap's first row
    separates nyt-snippets' labels on texts the export did not fit on (its validation
    split) more than any of the other, PCA, rows."""
    from fedmobillm.data import load_dataset
    from fedmobillm.device_runtime.backbone import Backbone
    from fedmobillm.device_runtime.protocol import load_verified_bundle

    bundle = make_bundle(
        "minilm-l3", num_taps=3, formats=("onnx",), max_seq_len=64, dp_projection=4,
        dp_projection_supervised=1, calibration="nyt-snippets",
    )  # fmt: skip
    manifest = load_verified_bundle(bundle)
    entry = manifest.extra["dp_projection"]
    assert entry["supervised"] == 1 and entry["rank"] == 4 and entry["whitened"] is True
    proj = load_projection(bundle, manifest)
    assert proj is not None and orthonormality_error(proj.basis) < 1e-5
    recs = load_dataset("nyt-snippets").splits["validation"][:300]
    y = np.asarray([r.label for r in recs])
    taps = np.concatenate(
        [Backbone(bundle, "onnx")([r.text for r in recs[i : i + 50]]) for i in range(0, 300, 50)]
    )  # (300, K, d)
    u = proj.coords(taps)  # (300, K, 4)
    gap = np.abs(u[y == 1].mean(0) - u[y == 0].mean(0)) / u.std(0)  # (K, 4)
    assert (gap[:, 0] > gap[:, 1:].max(axis=1)).all(), gap


def test_supervised_calibration_needs_labelled_data(tmp_path):
    from fedmobillm.export.calibrate import calibration_records
    from fedmobillm.export.pipeline import ExportOptions

    (tmp_path / "public.txt").write_text("a text\nanother\n")
    with pytest.raises(FedMobiLLMError, match="has no labels"):
        calibration_records(str(tmp_path / "public.txt"), 10)
    with pytest.raises(FedMobiLLMError, match="needs --dp-projection R"):
        ExportOptions("minilm-l3", tmp_path / "b", calibration="nyt-snippets",
                      dp_projection=4, dp_projection_supervised=5)  # fmt: skip


def test_the_projection_runs_with_torch_blocked(tmp_path):
    """The phone role has no torch: fitting, saving, loading and the projected mechanism
    need numpy and safetensors only (the device client and personal model import it)."""

    code = (
        "import sys, numpy as np\n"
        "from fedmobillm.device_runtime import client, personal, dp_projection as D\n"
        "from fedmobillm.device_runtime.privacy import clip_and_noise\n"
        "p, _ = D.fit_projection(np.random.default_rng(0).normal(size=(100, 3, 16)), 4, True)\n"
        f"p.save({str(tmp_path / 'p.safetensors')!r})\n"
        "y = clip_and_noise(np.ones((2, 3, 16)), 0.5, 2.0, np.random.default_rng(1), "
        "projection=p)\n"
        "assert y.shape == (2, 3, 16) and 'torch' not in sys.modules\n"
    )
    r = python_without_torch(["-c", code], tmp_path)

    assert r.returncode == 0, r.stderr
