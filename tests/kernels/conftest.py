import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small ops run fastest on one thread; a shared 2-core machine stalls OpenMP's spinners."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
