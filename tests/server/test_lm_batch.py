"""Per-architecture lines a step in an lm federation (``lm_arch_batch``, server/lm_batch.py):
the setting's checks, the balanced sampler's shares, and the lm trainer's step drawing them."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.lm_batch import arch_batches, check_arch_batch, step_batches
from fedmobillm.server.policies import balanced_sample
from fedmobillm.server.settings import ServerSettings, load_settings

TOKEN = "x7Qp2vL9sK4mN8rT6wY3zB5cD1fG0hJ"


def test_the_rule_gives_named_architectures_their_lines_and_the_rest_an_equal_share():
    assert arch_batches(["full", "l12"], 8, {"full": 16}) == {"full": 16, "l12": 8}
    assert arch_batches(["l12"], 8, {"full": 16}) == {"l12": 8}  # not in this step: unused
    assert step_batches(["full", "l12", "l6"], 48, None) == {"full": 16, "l12": 16, "l6": 16}
    assert step_batches(["full", "l12"], 16, {"full": 16}) == {"full": 16, "l12": 8}
    assert step_batches(["a", "b", "c"], 2) == {"a": 1, "b": 1, "c": 1}  # at least 1 each
    with pytest.raises(FedMobiLLMError, match="must be >= 1"):
        arch_batches(["a"], 0)


@pytest.mark.parametrize(
    "bad, said",
    [
        ({"full": 0}, "whole number >= 1"),
        ({"full": -4}, "whole number >= 1"),
        ({"full": 2.5}, "whole number >= 1"),
        ({"full": "16"}, "whole number >= 1"),
        ({"full": True}, "whole number >= 1"),
        ({"": 16}, "is empty"),
        ([16], "must be a table"),
    ],
)
def test_bad_values_are_refused_naming_the_entry(bad, said):
    with pytest.raises(FedMobiLLMError, match=said):
        check_arch_batch(bad)
    with pytest.raises(FedMobiLLMError, match=f"lm_arch_batch.*{said}"):
        load_settings(admin_token=TOKEN, task="lm", lm_arch_batch=bad)


def test_the_setting_reads_config_and_environment_and_is_lm_only(tmp_path, monkeypatch):
    cfg = tmp_path / "server.toml"
    cfg.write_text('[server]\ntask = "lm"\nbatch_size = 16\n[server.lm_arch_batch]\n'
                   '"smollm2-135m" = 16\n')  # fmt: skip
    s, _ = load_settings(cfg, admin_token=TOKEN)
    assert s.lm_arch_batch == {"smollm2-135m": 16} and s.batch_size == 16
    assert ServerSettings(task="lm").lm_arch_batch == {}
    monkeypatch.setenv("FEDMOBILLM_LM_ARCH_BATCH", '{"full": 24}')
    assert ServerSettings(task="lm").lm_arch_batch == {"full": 24}
    with pytest.raises(FedMobiLLMError, match="lm_arch_batch is for task lm"):
        load_settings(admin_token=TOKEN)  # classify, with the environment's setting


def test_balanced_sample_draws_each_architectures_share():
    data = {d: (np.zeros((5, 1, 2), np.float32), np.arange(5)) for d in ("d0", "d1", "d2")}
    devices = {"full": ["d0", "d1"], "l12": ["d2"]}
    rng = np.random.default_rng(0)
    got = balanced_sample(rng, 16, devices, lambda a, d: data[d], "sample", {"full": 16})
    assert {name: len(y) for name, _, y in got} == {"full": 16, "l12": 8}
    got = balanced_sample(rng, 16, devices, lambda a, d: data[d])  # no shares: equal
    assert {name: len(y) for name, _, y in got} == {"full": 8, "l12": 8}


def _lm_trainer(arch_batch: dict[str, int], batch_size: int = 16):
    """An ``LMTrainer`` shell over a real lm ``TrainingCache`` of two architectures (full:
    two devices, l12: one), with its store, side network and step stubbed: what its loop turn
    (``_tick``) hands the side network is recorded in ``steps``."""
    from fedmobillm.server.lm_trainer import LMTrainer
    from fedmobillm.server.trainer import ArchData, TokenSample, TrainingCache

    rng = np.random.default_rng(1)
    cache = TrainingCache("tokens", task="lm")
    for arch, devices in (("full", ["a", "b"]), ("l12", ["c"])):
        a = ArchData([1, 2], 2, 4, tokens=True)
        for d in devices:
            n = [int(rng.integers(3, 7)) for _ in range(6)]
            a.train_x[d] = [TokenSample(rng.standard_normal((2, k, 4)).astype(np.float16), None,
                                        np.arange(k, dtype=np.int64), np.ones(k, np.uint8))
                            for k in n]  # fmt: skip
            a.train_y[d] = [-1] * len(n)
        cache.archs[arch] = a
    cache.refresh = lambda store: 0  # type: ignore[method-assign]
    t = object.__new__(LMTrainer)
    settings = ServerSettings(task="lm", batch_size=batch_size, lm_arch_batch=arch_batch)
    steps: list = []
    t.settings, t.cache, t.frozen, t._unknown_batch, t.idle = settings, cache, {}, [], False
    t.side = SimpleNamespace(step=0, config=SimpleNamespace(anchor_batch=8))
    t._export_wanted = threading.Event()
    for name in ("_sync_quarantine", "_poll_backlog", "_record_offences"):
        setattr(t, name, lambda store: None)
    t._sync_archs, t._should_idle = (lambda: None), (lambda: False)
    t._rng = lambda: np.random.default_rng(0)
    t._step = lambda groups, anchors: steps.append(groups)
    return t, steps


def test_the_lm_trainer_step_draws_lm_arch_batch_lines_of_each_architecture():
    t, steps = _lm_trainer({"full": 16})
    assert t._tick(store=None)
    ((full, x, _y, mask, ids, lmask), (l12, x12, *_)) = steps[0]
    assert (full, l12) == ("full", "l12")
    assert x.shape[:2] == (16, 2) and ids.shape == mask.shape == lmask.shape == (16, x.shape[2])
    assert x12.shape[0] == 8  # the equal share of batch_size 16 over 2 architectures
    t, steps = _lm_trainer({})
    assert t._tick(store=None)
    assert [g[1].shape[0] for g in steps[0]] == [8, 8]


def test_a_name_no_architecture_has_is_logged_once(caplog):
    t, steps = _lm_trainer({"ful": 16})
    with caplog.at_level(logging.WARNING, logger="fedmobillm.server.lm_trainer"):
        t._tick(store=None)
        t._tick(store=None)
    said = [r.getMessage() for r in caplog.records if "lm_arch_batch" in r.getMessage()]
    assert len(said) == 1 and "['ful']" in said[0] and "'full'" in said[0]
    assert [g[1].shape[0] for g in steps[0]] == [8, 8]
