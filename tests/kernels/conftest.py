import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every kernel test on one torch thread (tests/conftest.py)."""
    yield
