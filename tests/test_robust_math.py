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


def absorbing_oracle():
    from bdiff_pyro.kernels import make_beta_tilde, make_kernel
    from bdiff_pyro.oracle import OracleReverse

    kernel = make_kernel("absorbing", make_beta_tilde("cosine", 3), num_states=2).double()
    return OracleReverse(kernel, torch.tensor([[0, 1, 1], [1, 1, 0]]))


def test_oracle_step_where_no_pattern_produces_x_t():
    """x^t = (0, mask, 0) unmasks dimension 0 from the first pattern and dimension 2 from the
    second: no pattern produces it, but the factorised oracle reaches it (at t < T: beta~_T = 1
    masks everything).  Its step keeps the unmasked values and unmasks the middle dimension (1 in
    both patterns) with probability (beta~_t - beta~_{t-1}) / beta~_t, the absorbing posterior."""
    oracle = absorbing_oracle()
    beta_tilde = oracle.kernel.beta_tilde
    x_t = torch.tensor([[0, 2, 0]])
    for t in (1, 2):
        assert torch.isneginf(oracle.pattern_log_posterior(x_t, t)).all()
        unmask = float((beta_tilde[t] - beta_tilde[t - 1]) / beta_tilde[t])
        expected = torch.tensor([[[1, 0, 0], [0, unmask, 1 - unmask], [1, 0, 0]]], dtype=torch.float64)
        assert torch.allclose(oracle.log_probs(x_t, t).exp(), expected, rtol=0, atol=1e-15), t
        times = torch.full((1,), t)  # one time per sequence: the same step
        assert torch.allclose(oracle.log_probs(x_t, times).exp(), expected, rtol=0, atol=1e-15), t


def test_absorbing_oracle_step_is_a_distribution_that_keeps_unmasked_values():
    """Over all 3^3 states (some no pattern produces, some with a value no pattern has at that
    dimension) and every t: finite and normalised.  Where the oracle can get to (t < T, and
    dimension 1 is 1 in every pattern) an unmasked value stays."""
    oracle = absorbing_oracle()
    states = all_states(3, 3)
    for t in range(1, oracle.T + 1):
        log_probs = oracle.log_probs(states, t)
        assert not torch.isnan(log_probs).any() and not torch.isposinf(log_probs).any()
        assert torch.allclose(torch.logsumexp(log_probs, -1), torch.zeros(27, 3, dtype=torch.float64), atol=1e-14)
        if t == oracle.T:
            continue
        reachable = torch.ones_like(states, dtype=torch.bool)
        reachable[:, 1] = states[:, 1] != 0
        unmasked = (states != 2) & reachable
        stay = log_probs.gather(-1, states.long().unsqueeze(-1)).squeeze(-1).exp()
        assert torch.allclose(stay[unmasked], torch.ones_like(stay[unmasked]), rtol=0, atol=1e-15), t


def test_absorbing_oracle_samples():
    samples = absorbing_oracle().sample(1000, seed=0)
    assert samples.shape == (1000, 3) and set(samples.unique().tolist()) <= {0, 1}
