import pyro
import pytest
import torch

from bdiff_pyro.kernels import BernoulliKernel, make_beta_tilde
from bdiff_pyro.reverse import ReverseNet, ReverseProcess


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


def make_process(n=2, T=3, pi_1=0.5, schedule="cosine", parameterisation="x0", seed=0, hidden=(16, 16)):
    """A randomly initialised float64 reverse process (weights scaled up so it is far from
    trivial)."""
    torch.manual_seed(seed)
    kernel = BernoulliKernel(make_beta_tilde(schedule, T), pi_1=pi_1)
    net = ReverseNet(n, 2, hidden=hidden, activation="tanh", time_embedding=8)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return ReverseProcess(kernel, net, parameterisation).double()
