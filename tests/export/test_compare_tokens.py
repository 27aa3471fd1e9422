"""calibrate.compare on token taps: padding positions are left out when the mask is given."""

from __future__ import annotations

import numpy as np

from fedmobillm.export.calibrate import compare


def test_padding_does_not_count_in_the_token_comparison():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 3, 6, 8)).astype(np.float32)  # (N, K, T, d)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    got = ref.copy()
    got[1, :, 2:] = rng.normal(size=(3, 4, 8)) * 10  # only the padding of row 1 differs
    assert min(compare(got, ref).cosine) < 0.5
    err = compare(got, ref, mask)
    assert min(err.cosine) > 0.9999 and max(err.max_abs) == 0.0
    assert (
        compare(ref[:, :, 0], ref[:, :, 0], mask).cosine
        == compare(ref[:, :, 0], ref[:, :, 0]).cosine
    )
