"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Small models run fastest on one intra-op thread, and a shared 2-core machine makes
    OpenMP's spinning threads stall each other (tens of times slower): pin to one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
