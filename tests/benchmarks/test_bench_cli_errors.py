"""Benchmark command lines given bad input answer with an error that says what was wrong
(exit status 2), not a traceback."""

from __future__ import annotations

import pytest

from fedmobillm.errors import FedMobiLLMError


@pytest.mark.parametrize(
    "partition", ["dirichlet-x", "dirichlet-0", "dirichlet--1", "dirichlet-inf"]
)
def test_a_bad_dirichlet_alpha_is_refused_by_name(partition):
    from benchmarks.bench_accuracy import alpha_of

    with pytest.raises(FedMobiLLMError, match="alpha must be a positive number"):
        alpha_of(partition)
    assert alpha_of("dirichlet-0.1") == 0.1 and alpha_of("iid") is None


def test_merge_of_a_missing_run_names_the_file(tmp_path, capsys):
    from benchmarks.bench_accuracy import main

    missing = tmp_path / "no-such-run"
    assert main(["--merge", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{missing / 'accuracy.json'} does not exist" in err and "Traceback" not in err
    (missing).mkdir()
    (missing / "accuracy.json").write_text("{not json")
    assert main(["--merge", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert "not one this command wrote" in capsys.readouterr().err
