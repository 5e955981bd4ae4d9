"""The hybrid loss's auxiliary term -log p(x^0 | x^t): its estimator against the exact
expectation, its minimiser against the oracle's posterior marginals, and how training
combines and reports it."""

import math

import pytest
import torch
from helpers import KERNEL_CASES, make_kernel_process, make_process

from bdiff_pyro.diffusion.bound import all_states, log_prob_of, negative_elbo_estimate, x0_loss_estimate
from bdiff_pyro.diffusion.oracle import OracleReverse
from bdiff_pyro.distributed import World
from bdiff_pyro.train import AnalyticLoss


def exact_x0_loss(kernel, x0_log_probs, x0):
    """(1/T) sum_t sum_s q(x^t = s | x^0) (-sum_i log p(x^0_i | s, t)) per sequence, every
    state s of {0..K-1}^n enumerated (float64)."""
    states = all_states(x0.shape[-1], kernel.num_states)
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for t in range(1, kernel.T + 1):
        weights = log_prob_of(kernel.q_marginal_log_probs(x0, t).unsqueeze(-3), states).sum(-1).exp()  # (B, S)
        per_state = -log_prob_of(x0_log_probs(states, t).unsqueeze(0), x0.unsqueeze(-2)).sum(-1)  # (B, S)
        total += torch.where(weights > 0, weights * per_state, 0.0).sum(-1)
    return total / kernel.T


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] + str(c[1]) for c in KERNEL_CASES])
def test_x0_loss_estimate_is_unbiased_for_the_exact_expectation(case):
    process = make_kernel_process(case, n=2, T=3, inputs="evidence")
    x0 = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    if case[1] > 2:
        x0 = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    exact = exact_x0_loss(process.kernel, process.x0_log_probs, x0)
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([x0_loss_estimate(process.kernel, process.x0_log_probs, x0.repeat(500, 1))
                             .view(500, 2) for _ in range(20)]).reshape(-1, 2)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert torch.all((mean - exact).abs() < 5 * se), (mean, exact, se)


def test_the_posterior_marginals_minimise_the_x0_loss():
    """The docstring's claim: E[-log p(x^0 | x^t)] over data and x^t is smallest at the per-position
    posterior marginals P(x^0_i | x^t), which the oracle computes; any other prediction is worse."""
    process = make_process(n=3, T=4, inputs="evidence")
    patterns = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    oracle = OracleReverse(process.kernel, patterns, weights)
    data = patterns.double()

    def expected(x0_log_probs):
        with torch.no_grad():
            return float((weights * exact_x0_loss(process.kernel, x0_log_probs, data)).sum())

    best = expected(oracle.x0_log_probs)
    generator = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.1, 1.0):
        def perturbed(x_t, t, scale=scale):
            noise = scale * torch.randn(oracle.x0_log_probs(x_t, t).shape, generator=generator, dtype=torch.float64)
            return torch.log_softmax(oracle.x0_log_probs(x_t, t) + noise, dim=-1)
        assert expected(perturbed) > best
    assert expected(process.x0_log_probs) > best


def test_the_loss_adds_lambda_times_the_x0_term_and_reports_the_elbo_part():
    process = make_process(n=3, T=5, inputs="evidence")
    x0 = (torch.rand(64, 3, generator=torch.Generator().manual_seed(0)) < 0.4).double()
    loss = AnalyticLoss(process.T, x0_loss_weight=0.25)
    with torch.no_grad():
        torch.manual_seed(3)
        total = loss(process, None, x0)
        torch.manual_seed(3)  # the same draws, in the same order: the ELBO's, then the x^0 term's
        negative_elbo = negative_elbo_estimate(process.kernel, process.log_probs, x0)[0].mean()
        x0_term = x0_loss_estimate(process.kernel, process.x0_log_probs, x0).mean()
    assert float(total) == pytest.approx(float(negative_elbo + 0.25 * x0_term), rel=1e-12)
    assert loss.negative_elbo == pytest.approx(float(negative_elbo), rel=1e-12)
    assert float(x0_term) > 0


def test_without_the_x0_term_the_loss_is_the_elbo_estimate_alone():
    process = make_process(n=3, T=5, inputs="evidence")
    x0 = torch.ones(8, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(4)
        value = AnalyticLoss(process.T)(process, None, x0)
        torch.manual_seed(4)
        assert float(value) == float(negative_elbo_estimate(process.kernel, process.log_probs, x0)[0].mean())


def test_agreeing_on_several_losses_keeps_their_form():
    world = World()
    assert world.agree((1.5, 2.5), True) == ((1.5, 2.5), True)
    assert world.agree(1.5, False) == (1.5, False)
    assert math.isnan(AnalyticLoss(3).negative_elbo)  # nothing to report before the first step
