"""Numerical edge cases of the kernels, the oracle and the samplers: float32 underflow, schedules
that reach beta~ = 1 early, states no pattern produces, kernels whose pi has zeros."""

import pytest
import torch

from bdiff_pyro.bound import all_states, elbo_exact
from conftest import make_kernel_process


def test_gaussian_kernel_bound_is_the_same_in_float32_and_float64():
    """K = 4, cosine, T = 200: q(x^t | x^0) reaches ~1e-45, where a mixture formed in float32
    probabilities underflows to 0 and the ELBO to -inf."""
    process = make_kernel_process(("gaussian", 4, None), n=2, T=200)
    x0 = all_states(2, 4)
    with torch.no_grad():
        reference = elbo_exact(process.kernel, process.log_probs, x0)
        process32 = process.float()
        single = elbo_exact(process32.kernel, process32.log_probs, x0.float())
    assert x0.shape == (16, 2) and torch.isfinite(reference).all()
    assert torch.isfinite(single).all(), single
    assert torch.allclose(single.double(), reference, rtol=1e-5, atol=0), (single, reference)


@pytest.mark.parametrize("kernel_class,states", [("bernoulli", 2), ("uniform", 3)])
def test_span_after_the_schedule_reaches_one_early(kernel_class, states):
    """beta~_2 = 1 < beta~_T: the closed-form s -> t transition equals the product of the steps
    (every step after s = 2 redraws from pi) instead of 0/0, and strided sampling across it works."""
    from bdiff_pyro.kernels import BernoulliKernel, DiscreteKernel, UniformKernel
    from conftest import _random_process

    beta_tilde = torch.tensor([0, 0.5, 1, 1, 1])
    kernel = BernoulliKernel(beta_tilde) if kernel_class == "bernoulli" else UniformKernel(beta_tilde, states)
    for t in range(1, kernel.T + 1):
        for s in range(t):
            product = DiscreteKernel.log_span(kernel, s, t).exp()
            assert torch.allclose(kernel.log_span(s, t).exp(), product, rtol=0, atol=1e-15), (s, t)
    redraw = kernel.pi.expand(states, states)
    assert torch.equal(kernel.log_span(2, 4).exp(), redraw)

    torch.manual_seed(0)
    process = _random_process(kernel, 3, "x0", (8,), "state")
    assert process.stride_grid(2) == [(4, 2), (2, 0)]
    samples = process.sample(200, seed=0, steps=2)
    assert samples.shape == (200, 3) and set(samples.unique().tolist()) <= set(range(states))
