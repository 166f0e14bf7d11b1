"""Fixtures shared by the converter tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core box run far faster without OpenMP's second thread spinning."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
