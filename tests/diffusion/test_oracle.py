"""The oracle reverse process against the optimisation it claims to solve, and its fast exact
bound against enumeration (float64).

The central check: for tiny problems the oracle's exact ELBO equals the best ELBO over *all*
factorised reverse processes, found by a generic optimiser over a free table of Bernoulli
probabilities (one per step t, state x^t and dimension), with no knowledge of the oracle's
formula.  The ELBO is a sum of one convex term per (t, x^t, dimension) cell of the table, so
optimising all cells jointly is the same as optimising each independently.
"""

import math

import pytest
import torch
from helpers import KERNEL_CASES, make_kernel_process
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from bdiff_pyro.diffusion.bound import all_states, elbo_exact, log_prob_of
from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.oracle import (
    OracleReverse,
    count_configurations,
    data_entropy_bits,
    oracle_bound,
    oracle_elbo_exact,
    oracle_report,
    step_gaps,
)
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.evaluation import oracle_for_config, oracle_samples_report
from bdiff_pyro.programs.sampling import ancestral_sample
from bdiff_pyro.util.stats import LN2

SUPPORTS = {
    # (patterns, weights): two or three patterns on n = 3 bits
    "three-unequal": ([[1, 0, 1], [0, 1, 1], [1, 1, 0]], [0.5, 0.3, 0.2]),
    "two-equal": ([[1, 0, 0], [0, 1, 1]], None),
    "shared-column": ([[1, 0, 1], [1, 1, 0], [0, 0, 0]], [0.2, 0.2, 0.6]),
}


def heartbeat_patterns(n, period):
    """Row s has ones at s, s + period, ...  (the heartbeat shifts)."""
    positions = torch.arange(n)
    return torch.stack([(positions % period == shift).double() for shift in range(period)])


class TableReverse:
    """A factorised reverse process given by a free table of logits, (T + 1, 2^n, n):
    p(x^{t-1}_i = 1 | x^t) = sigmoid(logits[t, code(x^t), i]).  At t = 1 the kernel's closed-form
    edge step is used when it has one (the table's t = 1 slice is then unused)."""

    def __init__(self, kernel, logits):
        self.kernel, self.logits = kernel, logits
        n = logits.shape[-1]
        self.place_values = 2 ** torch.arange(n - 1, -1, -1)  # all_states is lexicographic

    def log_probs(self, x_t, t):
        if t == 1 and self.kernel.closed_form_edge:
            return self.kernel.edge_log_probs(x_t)
        logit = self.logits[t][(x_t.long() * self.place_values).sum(-1)]
        # log sigmoid(l) = -softplus(-l) (F.logsigmoid is the same, but ~15 ms a call on 2 busy threads)
        return torch.stack([-F.softplus(logit), -F.softplus(-logit)], dim=-1)


def data_elbo(kernel, log_probs, patterns, weights):
    """sum_j w_j ELBO(d_j), exact (nats)."""
    return (weights * elbo_exact(kernel, log_probs, patterns)).sum()


def best_factorised_elbo(kernel, patterns, weights, iterations=40):
    """max over free logit tables of the data-averaged ELBO, by Newton's method from p = 1/2.

    Generic: only autograd of the exact ELBO is used.  Each cell's logit enters one convex term
    (a cross-entropy), so the Hessian is diagonal and H 1 is its diagonal; the returned gradient
    norm certifies the (global, by convexity) maximum however it was reached.
    """
    n = patterns.shape[1]
    logits = torch.zeros(kernel.T + 1, 2 ** n, n, dtype=torch.float64, requires_grad=True)
    table = TableReverse(kernel, logits)
    for _ in range(iterations):
        loss = -data_elbo(kernel, table.log_probs, patterns, weights)
        (gradient,) = torch.autograd.grad(loss, logits, create_graph=True)
        (curvature,) = torch.autograd.grad(gradient, logits, torch.ones_like(gradient))
        if float(gradient.detach().abs().max()) < 1e-13:
            break
        with torch.no_grad():  # unused cells have zero gradient and curvature: leave them
            step = torch.where(curvature > 0, gradient / curvature.clamp_min(1e-300), torch.zeros_like(gradient))
            logits -= step.clamp(-4.0, 4.0)  # damped while far from the optimum
    loss = -data_elbo(kernel, table.log_probs, patterns, weights)
    (gradient,) = torch.autograd.grad(loss, logits)
    return -float(loss.detach()), logits.detach(), float(gradient.abs().max())


def make_kernel(schedule, T, pi_1, learned_edge=False):
    kernel = BernoulliKernel(make_beta_tilde(schedule, T, 2.0), pi_1)
    if learned_edge:
        # treat the edge step as learned (D3PM-style): the bound then has a t = 1 term
        kernel.closed_form_edge = False
    return kernel


def support(name):
    patterns, weights = SUPPORTS[name]
    patterns = torch.tensor(patterns, dtype=torch.float64)
    weights = torch.full((len(patterns),), 1.0 / len(patterns), dtype=torch.float64) if weights is None \
        else torch.tensor(weights, dtype=torch.float64)
    return patterns, weights


@pytest.mark.parametrize("schedule,T,pi_1,learned_edge,support_name", [
    ("cosine", 3, 0.5, False, "three-unequal"),
    ("paper", 4, 0.5, False, "two-equal"),
    ("paper", 3, 0.2, False, "shared-column"),
    ("power", 4, 0.2, False, "three-unequal"),
    ("cosine", 3, 0.5, True, "three-unequal"),
])
def test_oracle_is_the_best_factorised_reverse(schedule, T, pi_1, learned_edge, support_name):
    kernel = make_kernel(schedule, T, pi_1, learned_edge)
    patterns, weights = support(support_name)
    oracle = OracleReverse(kernel, patterns, weights)
    oracle_value = float(data_elbo(kernel, oracle.log_probs, patterns, weights))
    best, logits, gradient_norm = best_factorised_elbo(kernel, patterns, weights)
    assert gradient_norm < 1e-10
    assert abs(best - oracle_value) < 1e-6, (best, oracle_value)

    # the optimiser's table is the oracle's step wherever x^t is reachable with fair probability
    states = all_states(3)
    first = 1 if learned_edge else 2
    for t in range(first, T + 1):
        reach = (weights[:, None] * torch.stack([
            log_prob_of(kernel.q_marginal_log_probs(d, t), states).sum(-1).exp() for d in patterns])).sum(0)
        found = torch.sigmoid(logits[t])
        wanted = oracle.log_probs(states, t)[..., 1].exp()
        assert torch.allclose(found[reach > 0.02], wanted[reach > 0.02], atol=2e-3), t

    # nothing else does better: random tables, and small perturbations of the oracle's own table
    generator = torch.Generator().manual_seed(0)
    oracle_logits = torch.zeros(T + 1, 8, 3, dtype=torch.float64)
    for t in range(first, T + 1):
        log_p = oracle.log_probs(states, t)
        oracle_logits[t] = log_p[..., 1] - log_p[..., 0]
    for scale, centre in [(3.0, torch.zeros_like(oracle_logits)), (0.05, oracle_logits)]:
        for _ in range(10):
            noise = scale * torch.randn(oracle_logits.shape, generator=generator, dtype=torch.float64)
            other = float(data_elbo(kernel, TableReverse(kernel, centre + noise).log_probs, patterns, weights))
            assert other < oracle_value - 1e-9


def slow_oracle_step(kernel, patterns, weights, x_t, t):
    """docs/math.md §3 read literally, from the step matrices alone:
    f*_i(x^t) = sum_j P(d_j | x^t) q(x^{t-1}_i = . | x^t_i, d_{j,i}),  P(d_j | x^t) ∝ w_j q(x^t | d_j)."""
    Q = kernel.log_Q.exp()
    Qbar = [torch.eye(2, dtype=torch.float64)]
    for s in range(1, kernel.T + 1):
        Qbar.append(Qbar[-1] @ Q[s])
    x = x_t.long()
    d = patterns.long()
    likelihood = torch.stack([Qbar[t][d[j], x].prod() for j in range(len(d))])
    pattern_posterior = weights * likelihood / (weights * likelihood).sum()
    out = torch.zeros(len(x), 2, dtype=torch.float64)
    for j in range(len(d)):
        for i in range(len(x)):
            unnormalised = Q[t][:, x[i]] * Qbar[t - 1][d[j, i], :]  # over x^{t-1}_i
            out[i] += pattern_posterior[j] * unnormalised / unnormalised.sum()
    return out


@pytest.mark.parametrize("pi_1", [0.5, 0.2])
@pytest.mark.parametrize("schedule", ["paper", "cosine"])
def test_oracle_step_is_the_pattern_mixture(schedule, pi_1):
    """The per-dimension-marginal form (through q_posterior_log_probs_mixture) equals the
    mixture over patterns, and per-sequence t gives the same rows as an int t."""
    kernel = make_kernel(schedule, 6, pi_1)
    patterns, weights = support("three-unequal")
    oracle = OracleReverse(kernel, patterns, weights)
    states = all_states(3)
    for t in range(2, 7):
        fast = oracle.log_probs(states, t).exp()
        for s, x_t in enumerate(states):
            assert torch.allclose(fast[s], slow_oracle_step(kernel, patterns, weights, x_t, t), atol=1e-13)
    times = torch.arange(len(states)) % 6 + 1  # 1..6, including the edge step
    per_sequence = oracle.log_probs(states, times)
    for s in range(len(states)):
        assert torch.allclose(per_sequence[s], oracle.log_probs(states[s:s + 1], int(times[s]))[0], atol=1e-14)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), num_patterns=st.integers(1, 5), T=st.integers(2, 30),
       schedule=st.sampled_from(["paper", "cosine", "power"]), pi_1=st.floats(0.05, 0.95),
       learned_edge=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_oracle_log_probs_are_normalised(n, num_patterns, T, schedule, pi_1, learned_edge, seed):
    generator = torch.Generator().manual_seed(seed)
    kernel = make_kernel(schedule, T, pi_1, learned_edge)
    patterns = torch.randint(0, 2, (num_patterns, n), generator=generator).double()
    weights = torch.rand(num_patterns, generator=generator, dtype=torch.float64) + 0.01
    oracle = OracleReverse(kernel, patterns, weights)
    x_t = torch.randint(0, 2, (7, n), generator=generator).double()
    t = torch.randint(1, T + 1, (7,), generator=generator)
    for times in [t, torch.full_like(t, int(t[0]))]:
        log_p = oracle.log_probs(x_t, times if len(set(times.tolist())) > 1 else int(times[0]))
        assert log_p.shape == (7, n, 2)
        assert not torch.isnan(log_p).any()
        # a learned edge step gives P(x^0_i = v | x^1) = 0 to values no pattern has; else all > 0
        finite_rows = (times >= 2) | kernel.closed_form_edge
        assert torch.isfinite(log_p[finite_rows]).all()
        assert torch.allclose(torch.logsumexp(log_p, -1), torch.zeros(7, n, dtype=torch.float64), atol=1e-12)
    posterior = oracle.pattern_log_posterior(x_t, t).exp()
    assert torch.allclose(posterior.sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("schedule,T,pi_1,learned_edge", [
    ("cosine", 5, 0.5, False), ("paper", 4, 0.2, False), ("power", 6, 0.3, True), ("paper", 3, 0.5, True)])
def test_grouped_exact_bound_equals_enumeration(schedule, T, pi_1, learned_edge):
    """oracle_elbo_exact (sum over count configurations) against bound.elbo_exact (sum over
    all 2^n states), on supports with repeated columns (so groups have several dimensions)."""
    kernel = make_kernel(schedule, T, pi_1, learned_edge)
    generator = torch.Generator().manual_seed(T)
    for patterns, weights in [
        (heartbeat_patterns(6, 3), None),
        (torch.tensor([[1, 1, 0, 0, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float64),
         torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)),
        (torch.randint(0, 2, (3, 5), generator=generator).double(), torch.tensor([1.0, 2.0, 5.0])),
    ]:
        oracle = OracleReverse(kernel, patterns, weights)
        enumerated = elbo_exact(kernel, oracle.log_probs, patterns)
        grouped = oracle_elbo_exact(kernel, patterns, weights)
        assert torch.allclose(grouped, enumerated, rtol=1e-11, atol=1e-11)
        # no model beats the data's own log-likelihood, -H(w)
        average = float((oracle.weights * grouped).sum()) / LN2
        assert average <= -data_entropy_bits(oracle.weights) + 1e-12


def test_count_configurations_of_heartbeat():
    columns, sizes, counts = count_configurations(heartbeat_patterns(20, 5).long(), 2)
    assert sizes.tolist() == [4] * 5 and len(counts) == 5 ** 5
    assert torch.equal(counts.sum(-1), torch.full((5 ** 5, 5), 4.0, dtype=torch.float64))
    assert len({tuple(c.flatten().tolist()) for c in counts}) == 5 ** 5


def test_monte_carlo_oracle_bound_agrees_with_the_exact_one():
    """Heartbeat n = 20 (2^20 states: only the grouped sum is exact) at T = 40: the Monte Carlo
    estimate lies within 4 standard errors of the exact value; both respect -log2 5."""
    kernel = make_kernel("cosine", 40, 0.5)
    patterns = heartbeat_patterns(20, 5)
    exact = float(oracle_elbo_exact(kernel, patterns).mean()) / LN2
    mean, se = oracle_bound(kernel, patterns, replicates=64, seed=1)
    assert 0 < se < 0.05
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert exact < -math.log2(5)
    report = oracle_report(kernel, patterns, exact=False, replicates=64, seed=1)
    assert report["elbo_bits"] == pytest.approx(mean) and report["se_bits"] == pytest.approx(se)
    report = oracle_report(kernel, patterns, schedule="cosine")
    assert report["method"] == "exact" and report["se_bits"] == 0.0
    assert report["elbo_bits"] == pytest.approx(exact, abs=1e-12)
    assert report["gap_bits"] == pytest.approx(-math.log2(5) - exact, abs=1e-12)
    assert report["K_bits"] == pytest.approx(exact, abs=1e-9)  # pi_1 = 1/2: no pi correction


@pytest.mark.slow
def test_oracle_samples_reproduce_the_pattern_frequencies():
    """At T = 200 the oracle's gap on this support is 0.02 bits, so its samples should be the
    patterns in proportion to their weights (a weights-blind sampler would fail: the weights
    are far from uniform)."""
    kernel = make_kernel("cosine", 200, 0.5)
    patterns = heartbeat_patterns(8, 4)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    oracle = OracleReverse(kernel, patterns, weights)
    num = 2500
    samples = ancestral_sample(oracle, num, generator=3)
    assert torch.equal(samples, ancestral_sample(oracle, num, generator=3))
    matches = (samples.unsqueeze(1) == patterns.unsqueeze(0)).all(-1)  # (num, 4)
    assert matches.any(1).double().mean() > 0.99
    frequencies = matches.double().mean(0)
    tolerance = 4 * torch.sqrt(weights * (1 - weights) / num) + 0.01
    assert torch.all((frequencies - weights).abs() < tolerance), frequencies


def test_bad_support_is_refused():
    from bdiff_pyro.errors import UserError

    kernel = make_kernel("cosine", 5, 0.5)
    with pytest.raises(UserError):
        OracleReverse(kernel, torch.tensor([[0.0, 2.0]]))
    with pytest.raises(UserError):
        OracleReverse(kernel, torch.tensor([[0.0, 1.0]]), weights=[0.0])
    with pytest.raises(UserError):
        oracle_elbo_exact(kernel, torch.randint(0, 2, (6, 40)).double(), max_configurations=1000)


def test_oracle_main_on_configs(tmp_path):
    """The function behind ``bdiff oracle CONFIG``: heartbeat's known support, and a data file's
    empirical support (its distinct training rows weighted by their counts)."""
    from bdiff_pyro.config import config_from_dict

    config = config_from_dict({"data": {"kind": "heartbeat", "n": 10, "period": 5},
                               "model": {"T": 30, "schedule": "cosine", "pi_1": 0.5}})
    report = oracle_for_config(config)
    kernel = make_kernel("cosine", 30, 0.5)
    expected = float(oracle_elbo_exact(kernel, heartbeat_patterns(10, 5)).mean()) / LN2
    assert report["elbo_bits"] == pytest.approx(expected, abs=1e-12)
    assert report["T"] == 30 and report["schedule"] == "cosine" and report["support"] == "known"

    rows = ["0111", "0111", "0111", "1000"]
    (tmp_path / "train.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.txt").write_text("0111\n")
    config = config_from_dict({"data": {"kind": "text", "train": str(tmp_path / "train.txt"),
                                        "val": str(tmp_path / "val.txt")},
                               "model": {"T": 12, "schedule": "power", "schedule_power": 2.0, "pi_1": "data"}})
    report = oracle_for_config(config)
    pi_1 = 10 / 16  # the training mean
    kernel = BernoulliKernel(make_beta_tilde("power", 12, 2.0), pi_1)
    patterns = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    weights = torch.tensor([0.75, 0.25], dtype=torch.float64)
    expected = float((weights * elbo_exact(kernel, OracleReverse(kernel, patterns, weights).log_probs, patterns)).sum())
    assert report["pi_1"] == pytest.approx(pi_1)
    assert report["elbo_bits"] == pytest.approx(expected / LN2, abs=1e-12)
    assert report["data_log_likelihood_bits"] == pytest.approx(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert report["support"] == "empirical (training set)"


def test_oracle_samples_match_the_exact_distribution_of_x0():
    """The fraction of oracle samples on each pattern agrees (4 standard errors) with the
    oracle's marginal p(x^0) computed exactly by pushing pi through every reverse step over all
    2^n states in float64."""

    n, T = 3, 4
    kernel = make_kernel("cosine", T, 0.5)
    patterns = heartbeat_patterns(n, 3)
    oracle = OracleReverse(kernel, patterns)
    states = all_states(n)
    distribution = torch.exp(log_prob_of(kernel.log_pi.expand(n, 2), states).sum(-1))  # x^T ~ pi
    for t in range(T, 0, -1):
        step = torch.exp(log_prob_of(oracle.log_probs(states, t).unsqueeze(1), states.unsqueeze(0)).sum(-1))
        distribution = distribution @ step  # step[s, s'] = p(x^{t-1} = s' | x^t = s)
    assert float(distribution.sum()) == pytest.approx(1.0, abs=1e-12)
    index = {tuple(s.int().tolist()): i for i, s in enumerate(states)}
    exact = torch.stack([distribution[index[tuple(p.int().tolist())]] for p in patterns])

    num = 20000
    report = oracle_samples_report(oracle, num, seed=0)
    got = torch.tensor(report["pattern_fractions"], dtype=torch.float64)
    assert torch.all((got - exact).abs() <= 4 * (exact * (1 - exact) / num).sqrt()), (got, exact)
    total = float(exact.sum())
    assert abs(report["in_support"] - total) <= 4 * math.sqrt(total * (1 - total) / num)
    assert total < 0.999  # T = 4 leaves room for samples off the support: the check can fail



@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] + str(c[1]) for c in KERNEL_CASES])
def test_the_step_gaps_add_up_to_the_oracle_bound_minus_the_models(case):
    """sum_t G_t = K* - K, both bounds computed exactly over every state, for closed-form and
    learned edge steps alike."""
    process = make_kernel_process(case, n=2, T=3, inputs="evidence")
    top = case[1] - 1
    patterns = torch.tensor([[0, top], [top, top], [1, 0]])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    oracle = OracleReverse(process.kernel, patterns, weights)
    with torch.no_grad():
        model_elbo = float((weights * elbo_exact(process.kernel, process.log_probs, patterns.double())).sum())
        oracle_elbo = float((weights * elbo_exact(process.kernel, oracle.log_probs, patterns.double())).sum())
        gaps, ses = step_gaps(oracle, process.log_probs, draws=20000, seed=1)
    assert oracle_elbo >= model_elbo
    assert abs(float(gaps.sum()) - (oracle_elbo - model_elbo)) < 5 * float(ses.square().sum().sqrt())
    assert float(ses.square().sum().sqrt()) < 0.05 * (oracle_elbo - model_elbo)  # the check has teeth
    if process.kernel.closed_form_edge:
        assert abs(float(gaps[0])) < 1e-12  # the same closed-form step


def test_the_oracle_has_no_gap_to_itself():
    kernel = BernoulliKernel(make_beta_tilde("cosine", 5), pi_1=0.3)
    oracle = OracleReverse(kernel, torch.tensor([[0, 1, 1], [1, 0, 0]]))
    gaps, ses = step_gaps(oracle, oracle.log_probs, draws=50)
    assert torch.all(gaps.abs() < 1e-12) and torch.all(ses < 1e-12)
