"""The torch setting the side-network unit tests share (test_side, test_side_tokens,
test_skew, test_skew_projection), imported by a test module as
`from torch_helpers import one_thread  # noqa: F401`: each of its tests then runs with one
intra-op thread (autouse), and the thread count is put back after it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
