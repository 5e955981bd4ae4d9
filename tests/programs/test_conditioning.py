"""Imputation: exact against a brute-force conditional from Pyro enumeration, smc against exact
(marginals and an unbiased evidence), the replacement heuristic's bias."""

import itertools
import math

import pytest
import torch
from helpers import KERNEL_CASES, make_kernel_process, make_process

from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.oracle import OracleReverse
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.errors import UserError
from bdiff_pyro.programs.conditioning import impute, systematic_resample
from bdiff_pyro.programs.enumeration import exact_log_likelihood

BERNOULLI, UNIFORM3, ABSORBING = KERNEL_CASES[0], KERNEL_CASES[2], KERNEL_CASES[3]


def all_data_states(process):
    K = process.kernel.num_data_states
    return torch.tensor(list(itertools.product(range(K), repeat=process.n)), dtype=torch.float64)


def brute_force(states, log_p, values, mask):
    """(log p(x_O = y), marginals (n, K)) from log p(x^0) of every data sequence."""
    K = int(states.max()) + 1
    agrees = ((states == values) | ~mask).all(-1)
    log_evidence = torch.logsumexp(log_p[agrees], 0)
    weights = torch.where(agrees, (log_p - log_evidence).exp(), torch.zeros_like(log_p))
    marginals = torch.stack([(weights.unsqueeze(-1) * (states == v)).sum(0) for v in range(K)], -1)
    return log_evidence, marginals


def observation(n, observed, values):
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, list(observed)] = True
    return torch.tensor([values], dtype=torch.float64), mask


@pytest.mark.parametrize("case", [BERNOULLI, UNIFORM3, ABSORBING], ids=lambda c: c[0])
def test_exact_is_the_brute_force_conditional(case):
    process = make_kernel_process(case, n=3, T=3)
    states = all_data_states(process)
    log_p = exact_log_likelihood(process, states)  # TraceEnum_ELBO over the latents of the Pyro program
    for observed, row in [((0, 2), [1, 0, 1]), ((1,), [0, 1, 0]), ((), [0, 0, 0]), ((0, 1, 2), [1, 1, 0])]:
        values, mask = observation(3, observed, row)
        result = impute(process, values, mask, method="exact", num_samples=50, seed=0)
        log_evidence, marginals = brute_force(states, log_p, values[0], mask[0])
        assert float(result.log_evidence[0]) == pytest.approx(float(log_evidence), abs=1e-10)
        torch.testing.assert_close(result.marginals[0], marginals, atol=1e-10, rtol=0)
        assert bool(((result.completions[0] == values) | ~mask).all())  # completions keep the observed values


def _smc_marginals(process, values, mask, particles, replicates, seed):
    rows = impute(process, values.expand(replicates, -1), mask.expand(replicates, -1), method="smc",
                  num_particles=particles, seed=seed)
    return rows.marginals


@pytest.mark.parametrize("case", [BERNOULLI, UNIFORM3], ids=lambda c: c[0])
def test_smc_marginals_converge_to_exact(case):
    process = make_kernel_process(case, n=4, T=3)
    values, mask = observation(4, (0, 3), [1, 0, 0, 1])
    exact = impute(process, values, mask, method="exact").marginals[0]
    errors = []
    for particles in (16, 256):
        estimates = _smc_marginals(process, values, mask, particles, replicates=60, seed=particles)
        mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
        assert bool(((mean - exact).abs() <= 4 * se + 1e-3).all()), (particles, mean, exact, se)
        errors.append(float((estimates - exact).pow(2).mean().sqrt()))
    assert errors[1] < errors[0] / 2  # the error shrinks like 1/sqrt(P): a factor 4 for 16x the particles


@pytest.mark.parametrize("case", [BERNOULLI, UNIFORM3, ABSORBING], ids=lambda c: c[0])
def test_smc_evidence_is_unbiased(case):
    process = make_kernel_process(case, n=3, T=3)
    values, mask = observation(3, (0, 2), [1, 0, 0])
    exact = float(impute(process, values, mask, method="exact").log_evidence[0].exp())
    runs = impute(process, values.expand(300, -1), mask.expand(300, -1), method="smc", num_particles=64, seed=1)
    z = runs.log_evidence.exp()
    se = float(z.std() / math.sqrt(len(z)))
    assert abs(float(z.mean()) - exact) < 4 * se
    assert se < 0.1 * exact  # a test that could not fail would have a huge standard error


def test_untwisted_smc_for_the_direct_parameterisation_is_unbiased():
    process = make_process(n=3, T=3, parameterisation="direct")
    values, mask = observation(3, (1,), [0, 1, 0])
    exact = float(impute(process, values, mask, method="exact").log_evidence[0].exp())
    z = impute(process, values.expand(300, -1), mask.expand(300, -1), method="smc", num_particles=16,
               seed=2).log_evidence.exp()
    assert abs(float(z.mean()) - exact) < 4 * float(z.std() / math.sqrt(len(z)))


def _oracle():
    """The exact reverse process for data {0000, 1111, 1010}: the ideal trained model."""
    kernel = BernoulliKernel(make_beta_tilde("cosine", 4), 0.5).double()
    patterns = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.float64)
    return OracleReverse(kernel, patterns)


def test_replace_is_biased_where_smc_is_not():
    """Observing x_1 = 1 must raise P(x_2 = 1) to about 0.8 (patterns 1111 and 1010); the replaced
    observed bit is noise the missing bits never saw, and the heuristic falls short."""
    process = _oracle()
    values, mask = observation(4, (0,), [1, 0, 0, 0])
    exact = impute(process, values, mask, method="exact").probs[0]
    replace = impute(process, values, mask, method="replace", num_samples=8000, seed=0).probs[0]
    smc = impute(process, values, mask, method="smc", num_samples=1, num_particles=8000, seed=0).probs[0]
    se = 0.5 / math.sqrt(8000)  # at most, for an average of probabilities
    assert float((replace - exact)[1:].abs().max()) > 6 * se
    assert float((smc - exact)[1:].abs().max()) < 4 * 0.5 / math.sqrt(8000 / 4)


def test_rows_fully_observed_and_fully_missing():
    process = make_process(n=3, T=3)
    values = torch.tensor([[1.0, 0, 1], [0, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    for method in ("exact", "replace", "smc"):
        result = impute(process, values, mask, method=method, num_samples=4, num_particles=8, seed=0)
        assert bool((result.completions[0] == values[0]).all())
        assert result.completions.shape == (2, 4, 3)
    # nothing observed: the evidence is p(anything) = 1 and the marginals are the model's own
    exact = impute(process, values, mask, method="exact")
    smc = impute(process, values, mask, method="smc", num_particles=8, seed=0)
    assert float(smc.log_evidence[1]) == pytest.approx(0.0, abs=1e-12)
    assert float(exact.log_evidence[1]) == pytest.approx(0.0, abs=1e-12)
    # everything observed: the exact evidence is log p(x^0)
    assert float(exact.log_evidence[0]) == pytest.approx(float(exact_log_likelihood(process, values[:1])[0]), abs=1e-10)


def test_same_seed_same_numbers_and_bad_arguments():
    process = make_process(n=3, T=3)
    values, mask = observation(3, (0,), [1, 0, 0])
    a = impute(process, values, mask, method="smc", num_samples=5, num_particles=8, seed=3)
    b = impute(process, values, mask, method="smc", num_samples=5, num_particles=8, seed=3)
    assert torch.equal(a.completions, b.completions) and torch.equal(a.log_evidence, b.log_evidence)
    with pytest.raises(UserError, match="method"):
        impute(process, values, mask, method="gibbs")
    with pytest.raises(UserError, match="shape"):
        impute(process, values, mask[:, :2])
    with pytest.raises(UserError, match="states 0..1"):
        impute(process, values + 2, mask)
    with pytest.raises(UserError, match="smc"):
        impute(process, values, mask, method="exact", max_states=4)


def test_systematic_resampling_counts():
    """Each index is drawn floor(N W_j) or ceil(N W_j) times; a weight of 1 takes every draw."""
    weights = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    for seed in range(20):
        index = systematic_resample(weights.log(), torch.Generator().manual_seed(seed))
        counts = torch.stack([torch.bincount(row, minlength=4) for row in index])
        assert bool(((counts - 4 * weights).abs() < 1).all())
        assert torch.equal(counts[1], torch.tensor([0, 0, 4, 0]))
