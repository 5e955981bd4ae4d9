"""Fixtures only; shared helpers live in tests/helpers.py."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tensors in tests are tiny: extra threads only add overhead (large on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
