"""Shared test setup."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Run in-process torch on one thread: the course's tensors are tiny and gain nothing from
    threads, while threads stall badly when the machine is shared (ranks run in their own processes
    and set their own thread counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
