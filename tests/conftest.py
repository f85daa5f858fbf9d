"""Unit tests use one torch thread: their tensors are tiny, and on a 2-core machine shared with other
work, several OpenMP threads spin against each other (observed: 10-100x slower steps)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
