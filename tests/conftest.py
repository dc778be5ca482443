"""Fixtures more than one test file uses."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models: threads only contend, several times slower beside another
    process), its thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
