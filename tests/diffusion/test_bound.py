"""The analytic bound against brute force over every trajectory, and its estimators against
the exact value."""

import itertools
import math

import pytest
import torch
from helpers import KERNEL_CASES, make_kernel_process, make_process

from bdiff_pyro.diffusion.bound import (
    all_states,
    closed_form_edge_nll,
    closed_form_loss,
    cross_entropy,
    elbo_exact,
    elbo_replicates,
    entropy,
    log_prob_of,
    negative_elbo_estimate,
    pi_correction,
    prior_kl,
)
from bdiff_pyro.util.stats import mean_and_standard_error


def brute_force_elbo(process, x0):
    """E_q[log p(x^{0:T}) - log q(x^{1:T} | x^0)] summed over all (2^n)^T trajectories, using
    only the step distributions of the two Pyro programs (no bound formula)."""
    kernel, T, n = process.kernel, process.T, x0.shape[-1]
    states = all_states(n, kernel.num_states)
    paths = torch.tensor(list(itertools.product(range(len(states)), repeat=T)))  # (P, T)
    xs = [x0.expand(len(paths), n)] + [states[paths[:, t - 1]] for t in range(1, T + 1)]
    log_q = sum(log_prob_of(kernel.q_step_log_probs(xs[t - 1], t), xs[t]).sum(-1) for t in range(1, T + 1))
    log_p = log_prob_of(kernel.prior_log_probs((len(paths), n)), xs[T]).sum(-1)
    log_p = log_p + sum(log_prob_of(process.log_probs(xs[t], t), xs[t - 1]).sum(-1) for t in range(1, T + 1))
    weight = log_q.exp()  # impossible trajectories (absorbing kernels) contribute nothing
    return float(torch.where(weight > 0, weight * (log_p - log_q), torch.zeros_like(weight)).sum())


@pytest.mark.parametrize("pi_1", [0.5, 0.2])
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("schedule", ["paper", "cosine"])
def test_exact_elbo_equals_brute_force_over_trajectories(pi_1, parameterisation, schedule):
    process = make_process(n=2, T=3, pi_1=pi_1, schedule=schedule, parameterisation=parameterisation, seed=1)
    x0 = all_states(2)
    with torch.no_grad():
        analytic = elbo_exact(process.kernel, process.log_probs, x0)
    with torch.no_grad():
        for i in range(len(x0)):
            assert math.isclose(float(analytic[i]), brute_force_elbo(process, x0[i]), rel_tol=1e-10, abs_tol=1e-12)


@pytest.mark.parametrize("pi_1", [0.5, 0.2])
def test_pi_correction_and_the_papers_K(pi_1):
    """ELBO - K = log pi(x^0) - E_q log pi(x^1), brute-forced over x^1; zero for pi_1 = 1/2;
    and K is eq. 14: -sum KL + H_q(X^T|X^0) - H_q(X^1|X^0) - n h(pi_1) when beta~_T = 1."""
    process = make_process(n=3, T=4, pi_1=pi_1, schedule="paper")
    kernel, x0 = process.kernel, all_states(3)
    log_pi = kernel.log_pi
    for i in range(len(x0)):
        q1 = log_prob_of(kernel.q_marginal_log_probs(x0[i], 1), all_states(3)).sum(-1).exp()
        expected = float(log_pi[x0[i].long()].sum() - (q1 * log_pi[all_states(3).long()].sum(-1)).sum())
        assert math.isclose(float(pi_correction(kernel, x0[i])), expected, rel_tol=1e-12, abs_tol=1e-14)
        if pi_1 == 0.5:
            assert abs(expected) < 1e-12
    with torch.no_grad():
        elbo = elbo_exact(kernel, process.log_probs, x0)
        kl_sum = -elbo_exact(kernel, process.log_probs, x0) - closed_form_loss(kernel, x0)
    h_pi = -(kernel.pi * kernel.log_pi).sum()
    K = (-kl_sum + entropy(kernel.q_marginal_log_probs(x0, 4)).sum(-1)
         - entropy(kernel.q_marginal_log_probs(x0, 1)).sum(-1) - 3 * h_pi)
    assert torch.allclose(elbo - pi_correction(kernel, x0), K, atol=1e-12)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}{c[1]}")
def test_every_loss_term_is_a_positive_number_equal_to_its_brute_force_sum(case):
    """cross_entropy, prior_kl and closed_form_edge_nll against sums over every x^T / x^1 in
    {0..K-1}^n written from their definitions, and each >= 0 (docs/math.md §2)."""
    process = make_kernel_process(case, n=2, T=3)
    kernel = process.kernel
    states = all_states(2, kernel.num_states)
    log_pi_joint = log_prob_of(kernel.prior_log_probs((len(states), 2)), states).sum(-1)  # log pi(x), (S,)
    for x0 in states:
        q_T = log_prob_of(kernel.q_marginal_log_probs(x0, kernel.T), states).sum(-1).exp()  # q(x^T | x^0)
        reachable = q_T > 0
        expected_kl = float((q_T[reachable] * (q_T[reachable].log() - log_pi_joint[reachable])).sum())
        assert math.isclose(float(prior_kl(kernel, x0)), expected_kl, rel_tol=1e-10, abs_tol=1e-12)
        assert float(prior_kl(kernel, x0)) >= -1e-12
        log_q_T = kernel.q_marginal_log_probs(x0, kernel.T)
        expected_ce = float(-(q_T[reachable] * log_pi_joint[reachable]).sum()) if bool(torch.isfinite(
            log_pi_joint[reachable]).all()) else math.inf
        assert math.isclose(float(cross_entropy(log_q_T, kernel.log_pi).sum()), expected_ce, rel_tol=1e-10)
        assert float(cross_entropy(log_q_T, kernel.log_pi).sum()) >= 0
        if kernel.closed_form_edge:
            q_1 = log_prob_of(kernel.q_marginal_log_probs(x0, 1), states).sum(-1).exp()  # q(x^1 | x^0)
            log_edge = log_prob_of(kernel.edge_log_probs(states), x0).sum(-1)  # log p(x^0 | x^1)
            expected_nll = float(-(q_1 * log_edge).sum())
            assert math.isclose(float(closed_form_edge_nll(kernel, x0)), expected_nll, rel_tol=1e-10, abs_tol=1e-12)
            assert expected_nll >= 0
            assert math.isclose(float(closed_form_loss(kernel, x0)), expected_kl + expected_nll, rel_tol=1e-10)
        else:
            assert math.isclose(float(closed_form_loss(kernel, x0)), expected_kl, rel_tol=1e-10, abs_tol=1e-12)


@pytest.mark.parametrize("pi_1", [0.5, 0.2])
def test_monte_carlo_estimators_agree_with_exact(pi_1):
    process = make_process(n=3, T=6, pi_1=pi_1, seed=2)
    x0 = all_states(3)
    with torch.no_grad():
        exact = elbo_exact(process.kernel, process.log_probs, x0)
        torch.manual_seed(0)
        replicates = elbo_replicates(process.kernel, process.log_probs, x0, replicates=400)
        mean, se = mean_and_standard_error(replicates)
        assert abs(mean - float(exact.mean())) < 4 * se
        # the training estimator: one t and one x^t per sequence
        draws = negative_elbo_estimate(process.kernel, process.log_probs, x0.repeat(4000, 1))[0].view(4000, -1)
    per_sequence_mean, per_sequence_se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert torch.all((per_sequence_mean + exact).abs() < 4 * per_sequence_se), (per_sequence_mean, -exact)


def test_standard_error_needs_two_replicates():
    with pytest.raises(ValueError):
        mean_and_standard_error(torch.zeros(3, 1))


def test_importance_sampled_steps_stay_unbiased():
    """Any proposal r(t) > 0 gives an unbiased estimate of -ELBO; a lopsided one here."""
    process = make_process(n=3, T=6, pi_1=0.2, seed=4)
    x0 = all_states(3)
    proposal = torch.tensor([0, 0, 0.05, 0.05, 0.1, 0.3, 0.5], dtype=torch.float64)
    with torch.no_grad():
        exact = elbo_exact(process.kernel, process.log_probs, x0)
        torch.manual_seed(1)
        draws = negative_elbo_estimate(process.kernel, process.log_probs, x0.repeat(6000, 1), proposal)[0]
    draws = draws.view(6000, -1)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(6000)
    assert torch.all((mean + exact).abs() < 4 * se)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}{c[1]}")
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
def test_exact_elbo_equals_brute_force_for_every_kernel(case, parameterisation):
    process = make_kernel_process(case, n=2, T=3, parameterisation=parameterisation, seed=5)
    x0 = all_states(2, case[1])
    with torch.no_grad():
        analytic = elbo_exact(process.kernel, process.log_probs, x0)
        for i in range(len(x0)):
            assert math.isclose(float(analytic[i]), brute_force_elbo(process, x0[i]), rel_tol=1e-10, abs_tol=1e-12)


def test_distinct_sequences_weighted_by_count_estimate_the_same_average():
    """A data set with repeats: scoring each distinct sequence once, weighted by its count,
    targets the same average bound as scoring every row (exact value from elbo_exact)."""
    from bdiff_pyro.evaluation import bound_report
    process = make_process(n=3, T=5, seed=3)
    x0 = all_states(3)[[0, 0, 0, 5, 5, 7]]
    with torch.no_grad():
        exact = float(elbo_exact(process.kernel, process.log_probs, x0).mean()) / math.log(2)
        report = bound_report(process, x0, replicates=3000, distinct=True)
    assert abs(report["elbo_bits"] - exact) < 4 * report["se_bits"]
    assert report["se_bits"] < 0.05
