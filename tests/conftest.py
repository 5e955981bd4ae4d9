import pyro
import pytest
import torch

from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.networks.mlp import MLP
from bdiff_pyro.programs.reverse import ReverseProcess


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


def make_process(n=2, T=3, pi_1=0.5, schedule="cosine", parameterisation="x0", seed=0, hidden=(16, 16),
                 inputs="state", film=False, add_own_evidence=True):
    """A randomly initialised float64 reverse process (weights scaled up so it is far from
    trivial)."""
    torch.manual_seed(seed)
    kernel = BernoulliKernel(make_beta_tilde(schedule, T), pi_1=pi_1)
    return _random_process(kernel, n, parameterisation, hidden, inputs, film, add_own_evidence)


def _random_process(kernel, n, parameterisation, hidden, inputs, film=False, add_own_evidence=True):
    net = MLP(n, kernel.num_states, hidden=hidden, activation="tanh", time_embedding=8,
                     num_features=ReverseProcess.num_features(kernel, inputs), film=film)
    if film:  # FiLM layers start at zero; make them count
        with torch.no_grad():
            for layer in net.film:
                layer.weight.normal_(0, 0.3)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return ReverseProcess(kernel, net, parameterisation, inputs, add_own_evidence).double()


# Every kernel, one line each: (name, data states K, pi_1).  A new kernel is tested by adding
# a line here; the exact cross-checks are parametrised over this list.
KERNEL_CASES = [
    ("bernoulli", 2, 0.5),
    ("bernoulli", 2, 0.2),
    ("uniform", 3, None),
    ("absorbing", 2, None),
    ("gaussian", 3, None),
]


def make_kernel_process(case, n=2, T=3, schedule="cosine", parameterisation="x0", seed=0, hidden=(16, 16),
                        inputs="state", add_own_evidence=True):
    """A random float64 reverse process for one of KERNEL_CASES."""
    from bdiff_pyro.diffusion.kernels import make_kernel
    name, num_states, pi_1 = case
    torch.manual_seed(seed)
    kernel = make_kernel(name, make_beta_tilde(schedule, T), num_states, pi_1 if pi_1 is not None else 0.5)
    return _random_process(kernel, n, parameterisation, hidden, inputs, add_own_evidence=add_own_evidence)


def tiny_network_options(name, n):
    """Small options for every registered network (conv2d lays n positions out as a 2 x n/2
    or 1 x n image)."""
    return dict(hidden=(8, 8), activation="tanh", time_embedding=8, channels=8, blocks=1, kernel_size=3,
                padding="circular", heads=2, position_code="learned",
                image_shape=(2, n // 2) if name == "conv2d" and n % 2 == 0 else (1, n))


def make_network_process(name, n=2, T=3, case=("bernoulli", 2, 0.5), schedule="cosine", parameterisation="x0",
                         inputs="state", film=False, seed=0, **options):
    """A random float64 reverse process with the registered network ``name`` (FiLM layers
    given random weights, every weight doubled so that the output varies strongly with x^t)."""
    from bdiff_pyro.diffusion.kernels import make_kernel
    from bdiff_pyro.networks import build_network
    kind, num_states, pi_1 = case
    torch.manual_seed(seed)
    kernel = make_kernel(kind, make_beta_tilde(schedule, T), num_states, pi_1 if pi_1 is not None else 0.5)
    net = build_network(name, n, kernel.num_states, ReverseProcess.num_features(kernel, inputs),
                        {**tiny_network_options(name, n), "film": film, **options})
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():  # FiLM starts at zero
                p.normal_(0, 0.3)
            p.mul_(2.0)
    return ReverseProcess(kernel, net, parameterisation, inputs).double()
