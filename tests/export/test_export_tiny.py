"""Small randomly initialised models of six families: the wrapper is generic (no
special-casing by name), export matches eager, pivot and truncation behave."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import FAMILIES, VOCAB, tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model("llama")` -> a saved HF folder (seeded random weights), cached."""
    from fedmobillm.export.pipeline import resolve_model_folder
    from fedmobillm.paths import cache_dir

    def build(family: str) -> Path:
        import torch
        from transformers import AutoModel, AutoTokenizer

        out = cache_dir() / "test-models" / f"tiny-{family}-v1"
        if (out / "model.safetensors").is_file():
            return out
        torch.manual_seed(0)
        model = AutoModel.from_config(tiny_config(family))
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(resolve_model_folder("minilm-l6")).save_pretrained(tmp)
        tmp.rename(out)
        return out

    return build


def _inputs():
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, VOCAB, (3, 9), generator=g)  # (B, T)
    mask = torch.ones(3, 9, dtype=torch.int64)  # (B, T)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _check(bundle: Path, fmt: str, tol_cos: float = 0.9999):
    from fedmobillm.device_runtime.graph import run_taps
    from fedmobillm.export.calibrate import compare
    from fedmobillm.export.graphs import FILE_NAMES
    from fedmobillm.export.wrapper import eager_reference

    m = json.loads((bundle / "manifest.json").read_text())
    ids, mask = _inputs()
    ref = eager_reference(Path(m["source_model"]), m["taps"], m["pivot"], ids, mask).numpy()
    got = run_taps(bundle / FILE_NAMES[fmt], ids.numpy(), mask.numpy(), fmt)
    err = compare(got, ref)
    assert min(err.cosine) >= tol_cos, err
    if tol_cos >= 0.9999:
        assert max(err.max_abs) <= 1e-3, err
    return m


def _check_shapes(bundle: Path, fmt: str, tol_cos: float = 0.9999) -> None:
    """The graph at other batch sizes and lengths than it was exported and calibrated with
    (example batch 2; calibration sentences shorter than max_seq_len): batch 1 at length 3,
    and batch 5 at max_seq_len with one right-padded row, each against eager."""
    import torch

    from fedmobillm.device_runtime.graph import run_taps
    from fedmobillm.export.calibrate import compare
    from fedmobillm.export.graphs import FILE_NAMES
    from fedmobillm.export.wrapper import eager_reference

    m = json.loads((bundle / "manifest.json").read_text())
    for batch, seq in ((1, 3), (5, m["max_seq_len"])):
        g = torch.Generator().manual_seed(batch * seq)
        ids = torch.randint(1000, VOCAB, (batch, seq), generator=g)  # (B, T)
        mask = torch.ones(batch, seq, dtype=torch.int64)  # (B, T)
        if batch > 1:
            mask[1, seq // 2 :] = 0
        ref = eager_reference(Path(m["source_model"]), m["taps"], m["pivot"], ids, mask)
        got = run_taps(bundle / FILE_NAMES[fmt], ids.numpy(), mask.numpy(), fmt)
        err = compare(got, ref.numpy())
        assert min(err.cosine) >= tol_cos, (batch, seq, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_to_onnx_and_matches(make_bundle, tiny_model, family):
    bundle = make_bundle(str(tiny_model(family)), layers=[1, 2], formats=("onnx",))
    m = _check(bundle, "onnx")
    _check_shapes(bundle, "onnx")
    expected = "encoder" if family in ("bert", "roberta") else "decoder"
    assert m["kind"] == expected
    assert m["pivot"] == ("first" if expected == "encoder" else "last")
    assert m["family"] == family and m["depth"] == 3 and m["taps"] == [1, 2]


# RoBERTa is BERT's graph. GPT-2 lowers since its Conv1D layers are swapped for nn.Linear
# (export/wrapper.py linearise_conv1d): before, its .pte failed with "Cannot view a tensor".
PTE_CASES = [(f, "fp32") for f in FAMILIES if f not in ("roberta",)] + [("llama", "int8")]


@pytest.mark.parametrize("family,quant", PTE_CASES)
def test_family_exports_to_pte_and_matches(make_bundle, tiny_model, family, quant):
    """Each family's .pte at the export's shapes and at two others (dynamic batch and
    length held through the ExecuTorch lowering, see export/graphs.py write_pte)."""
    bundle = make_bundle(str(tiny_model(family)), layers=[1], quant=quant, formats=("pte",))
    tol = 0.9999 if quant == "fp32" else 0.98
    _check(bundle, "pte", tol_cos=tol)
    _check_shapes(bundle, "pte", tol_cos=tol)


def test_final_norm_and_head_not_in_graph(make_bundle, tiny_model):
    """Tapping the last block of a decoder must give the pre-norm output (the reference
    hooks the block itself), and the final norm's weight is not counted."""
    folder = tiny_model("llama")
    bundle = make_bundle(str(folder), layers=[3], formats=("onnx",))
    m = _check(bundle, "onnx")
    cfg = tiny_config("llama")
    per_block = 4 * 32 * 32 // 2 + 32 * 32 + 3 * 32 * 64 + 2 * 32  # q,o + k,v (kv 2 heads)
    extra = m["graph_params"] - (VOCAB * 32 + 3 * per_block)
    assert 0 <= extra < 32, extra  # rotary frequencies only; a final norm would add 32
    assert cfg.num_hidden_layers == 3


def test_pivot_last_ignores_padding(make_bundle, tiny_model):
    from fedmobillm.device_runtime.graph import run_taps
    from fedmobillm.export.graphs import FILE_NAMES

    bundle = make_bundle(str(tiny_model("qwen2")), layers=[1, 2], formats=("onnx",))
    ids, mask = (t.numpy() for t in _inputs())
    batch = run_taps(bundle / FILE_NAMES["onnx"], ids, mask, "onnx")  # (3, K, d)
    alone = run_taps(bundle / FILE_NAMES["onnx"], ids[2:, :3], mask[2:, :3], "onnx")
    np.testing.assert_allclose(batch[2], alone[0], atol=1e-5)


def test_pivot_mean_averages_real_tokens_only(make_bundle, tiny_model):
    """Mean pivot: the masked mean over real tokens; padding changes nothing, and the
    exported graph matches the eager mean of the untouched model."""
    from fedmobillm.device_runtime.graph import run_taps
    from fedmobillm.export.graphs import FILE_NAMES

    bundle = make_bundle(
        str(tiny_model("bert")), layers=[1, 3], pivot="mean", formats=("onnx", "pte")
    )
    _check(bundle, "pte")  # XNNPACK lowers it
    m = _check(bundle, "onnx")
    assert m["pivot"] == "mean" and m["outputs"][0]["shape"] == ["batch", 2, 32]
    ids, mask = (t.numpy() for t in _inputs())
    batch = run_taps(bundle / FILE_NAMES["onnx"], ids, mask, "onnx")  # (3, K, d)
    alone = run_taps(bundle / FILE_NAMES["onnx"], ids[2:, :3], mask[2:, :3], "onnx")
    np.testing.assert_allclose(batch[2], alone[0], atol=1e-5)
    first = make_bundle(str(tiny_model("bert")), layers=[1, 3], pivot="first", formats=("onnx",))
    cls = run_taps(first / FILE_NAMES["onnx"], ids, mask, "onnx")
    assert not np.allclose(cls, batch, atol=1e-3)  # a different readout, not the CLS token


def test_mean_pivot_graph_form_matches_the_plain_mean_for_any_padding():
    """The graph computes the mean from a running sum at the span's ends (XNNPACK cannot
    reshape the (batch, seq) mask); it equals the plain masked mean, right or left padded."""
    import torch

    from fedmobillm.export.wrapper import select_pivot

    g = torch.Generator().manual_seed(1)
    states = torch.randn(4, 2, 7, 5, generator=g)  # (B, K, T, d)
    mask = torch.ones(4, 7, dtype=torch.int64)
    mask[1, 4:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    mask[3, 1:] = 0  # one real token
    got = select_pivot(states, mask, "mean")
    want = select_pivot(states, mask, "mean", reference=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], states[3, :, 0])
    torch.testing.assert_close(got[2], states[2, :, 5:].mean(dim=1), atol=1e-5, rtol=1e-5)


def test_auto_pivot_follows_the_declared_sentence_pooling(tiny_model, tmp_path):
    """An encoder folder that declares sentence-transformers mean pooling gets pivot mean;
    a cached bundle exported under the old rule is then no longer current."""
    import shutil

    from fedmobillm.export.models import resolve_model
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle
    from fedmobillm.export.wrapper import auto_pivot, declared_pooling

    plain = tiny_model("bert")
    assert declared_pooling(plain) is None
    pooled = tmp_path / "pooled"
    shutil.copytree(plain, pooled)
    (pooled / "1_Pooling").mkdir()
    (pooled / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    assert declared_pooling(pooled) == "mean"
    assert auto_pivot("encoder", "mean") == "mean" and auto_pivot("decoder", "mean") == "last"
    assert auto_pivot("encoder", None) == "first"
    out = tmp_path / "bundle"
    assert export_bundle(str(plain), out, layers=[1], formats=("onnx",)).pivot == "first"
    assert bundle_is_current(out, str(plain))
    assert not bundle_is_current(out, str(pooled))  # auto now means mean for this folder
    assert export_bundle(str(pooled), tmp_path / "b2", layers=[1], formats=("onnx",)).pivot == (
        "mean"
    )
    # the registry's sentence encoders declare mean pooling (MiniLM-L3 is converted from
    # ONNX and has no 1_Pooling folder of its own)
    assert declared_pooling(resolve_model("minilm-l3")) == "mean"


def test_onnx_weights_live_beside_the_graph(tiny_model, tmp_path):
    """Prepare a tiny ONNX bundle; Assert its weights are in backbone.onnx.data (listed with
    its sha256) and the graph runs from its folder; Execute: inline the weights as older
    bundles had them; Assert the bundle is no longer current (a cache rebuilds it)."""
    import onnx

    from fedmobillm.device_runtime.protocol import verify_bundle
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle, file_entries

    out = tmp_path / "bundle"
    export_bundle(str(tiny_model("bert")), out, layers=[1, 2], formats=("onnx",))
    manifest, problems = verify_bundle(out)
    assert problems == [] and "backbone.onnx.data" in manifest.files
    assert manifest.files["backbone.onnx.data"]["bytes"] > manifest.files["backbone.onnx"]["bytes"]
    _check(out, "onnx")  # onnxruntime finds the weights beside the graph
    assert bundle_is_current(out, str(tiny_model("bert")))

    onnx.save_model(onnx.load(str(out / "backbone.onnx")), str(out / "backbone.onnx"))
    (out / "backbone.onnx.data").unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["files"] = file_entries(out)
    (out / "manifest.json").write_text(json.dumps(m))
    assert verify_bundle(out)[1] == []
    assert not bundle_is_current(out, str(tiny_model("bert")))


def test_pivot_none_keeps_every_token(make_bundle, tiny_model):
    bundle = make_bundle(str(tiny_model("bert")), layers=[2], pivot="none", formats=("onnx",))
    m = _check(bundle, "onnx")
    assert m["outputs"][0]["shape"] == ["batch", 1, "seq", 32]


def test_budget_picks_a_variant_that_fits(tiny_model, tmp_path):
    """A generous budget keeps fp32 and records the measured peak of a fresh process."""
    from fedmobillm.export.pipeline import export_bundle

    out = tmp_path / "b"
    manifest = export_bundle(
        str(tiny_model("bert")), out, layers=[1, 2], formats=("onnx",), budget_mb=4000
    )
    choice = manifest.extra["budget"]
    assert choice["chosen_quant"] == "fp32" and choice["chosen_taps"] == [1, 2]
    assert 20 < choice["peak_rss_mib"] <= 4000
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["budget"]["peak_rss_mib"] == choice["peak_rss_mib"]


@pytest.mark.slow
def test_budget_too_small_names_what_was_tried(tiny_model, tmp_path):
    from fedmobillm.errors import FedMobiLLMError
    from fedmobillm.export.pipeline import export_bundle

    with pytest.raises(FedMobiLLMError, match="no variant fits 1 MB: tried fp32 taps"):
        export_bundle(
            str(tiny_model("bert")), tmp_path / "b", layers=[1, 2], formats=("onnx",), budget_mb=1
        )
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_fallback_quant_is_recorded_not_silent(tiny_model, tmp_path, monkeypatch, caplog):
    """Prepare: an int8 check no graph can pass (floor above 1). Execute: export int8 with
    fallback fp32. Assert: the bundle is fp32 and its manifest names the quant asked for
    and why it fell back; without a fallback the export fails."""
    from fedmobillm.errors import FedMobiLLMError
    from fedmobillm.export import pipeline

    monkeypatch.setattr(pipeline, "QUANT_MIN_COSINE", 1.01)
    folder = str(tiny_model("llama"))
    manifest = pipeline.export_bundle(
        folder, tmp_path / "b", layers=[1], quant="int8", formats=("onnx",), fallback_quant="fp32"
    )
    saved = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert saved["quant"] == manifest.quant == "fp32" and saved["quant_requested"] == "int8"
    assert saved["quant_fallback"].startswith("int8: stage verify failed: onnx int8 graph")
    assert "min cosine" in saved["quant_fallback"]
    assert "failed verification" in caplog.text
    with pytest.raises(FedMobiLLMError, match="stage verify failed"):
        pipeline.export_bundle(folder, tmp_path / "c", layers=[1], quant="int8", formats=("onnx",))


def test_fallback_quant_from_the_command_line(tiny_model, tmp_path, monkeypatch, capsys):
    """`export --fallback-quant fp32`: the same fallback, said in the printed summary."""
    from fedmobillm.cli import main
    from fedmobillm.export import pipeline

    monkeypatch.setattr(pipeline, "QUANT_MIN_COSINE", 1.01)
    args = ["export", str(tiny_model("llama")), "--out", str(tmp_path / "b"), "--layers", "1"]
    args += ["--quant", "int8", "--format", "onnx", "--fallback-quant", "fp32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "quant: int8 was asked for but failed its check; exported fp32 instead" in out
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["quant"] == "fp32"
