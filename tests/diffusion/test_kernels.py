"""The kernel's closed forms against independent constructions (float64)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bdiff_pyro.diffusion.bound import all_states, entropy, kl_categorical
from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.schedules import betas_from_beta_tilde, make_beta_tilde

SCHEDULES = [("paper", 2.0), ("cosine", 2.0), ("power", 3.0), ("power", 0.7)]


def step_matrix(beta, pi_1):
    """docs/math.md §1 read literally: q(x^t = 1 | x^{t-1}) = x^{t-1} (1 - beta) + beta pi_1."""
    p_one = lambda x: x * (1 - beta) + beta * pi_1  # noqa: E731
    return torch.tensor([[1 - p_one(0), p_one(0)], [1 - p_one(1), p_one(1)]], dtype=torch.float64)


@pytest.mark.parametrize("schedule,power", SCHEDULES)
@pytest.mark.parametrize("pi_1", [0.5, 0.2])
def test_marginal_is_product_of_step_matrices(schedule, power, pi_1):
    T = 17
    kernel = BernoulliKernel(make_beta_tilde(schedule, T, power), pi_1)
    product = torch.eye(2, dtype=torch.float64)
    for t in range(1, T + 1):
        product = product @ step_matrix(float(kernel.betas[t]), pi_1)
        assert torch.allclose(kernel.log_Q[t].exp(), step_matrix(float(kernel.betas[t]), pi_1), atol=1e-15)
        assert torch.allclose(kernel.log_Qbar[t].exp(), product, rtol=1e-12, atol=1e-14), t


@pytest.mark.parametrize("schedule,power", SCHEDULES)
def test_beta_tilde_follows_the_seed_recursion(schedule, power):
    beta_tilde = make_beta_tilde(schedule, 40, power)
    betas = betas_from_beta_tilde(beta_tilde)
    recursion = [0.0]
    for t in range(1, 41):  # beta~_t = beta~_{t-1} + beta_t - beta_t beta~_{t-1}
        recursion.append(recursion[-1] + float(betas[t]) - float(betas[t]) * recursion[-1])
    assert torch.allclose(torch.tensor(recursion, dtype=torch.float64), beta_tilde, atol=1e-12)
    assert betas[0] == 0 and abs(float(beta_tilde[-1]) - 1.0) < 1e-12


def test_paper_schedule_rates():
    T = 10
    kernel = BernoulliKernel(make_beta_tilde("paper", T))
    expected = torch.tensor([0.0] + [1.0 / (T - t + 1) for t in range(1, T + 1)], dtype=torch.float64)
    assert torch.allclose(kernel.betas, expected, atol=1e-14)
    assert kernel.betas.shape == (T + 1,)
    assert torch.allclose(kernel.pi, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("schedule,power", SCHEDULES)
@pytest.mark.parametrize("pi_1", [0.5, 0.2])
def test_posterior_is_normalised_bayes(schedule, power, pi_1):
    T = 9
    kernel = BernoulliKernel(make_beta_tilde(schedule, T, power), pi_1)
    Q = [None] + [step_matrix(float(kernel.betas[t]), pi_1) for t in range(1, T + 1)]
    Qbar = [torch.eye(2, dtype=torch.float64)]
    for t in range(1, T + 1):
        Qbar.append(Qbar[-1] @ Q[t])
    for t in range(2, T + 1):
        for x0, xt in itertools.product((0, 1), repeat=2):
            joint = torch.tensor([Q[t][k, xt] * Qbar[t - 1][x0, k] for k in (0, 1)])
            bayes = joint / joint.sum()
            got = kernel.q_posterior_log_probs(torch.tensor([[float(xt)]]), torch.tensor([[float(x0)]]), t).exp()
            assert torch.allclose(got[0, 0], bayes, atol=1e-13), (t, x0, xt)
            assert abs(float(got.sum()) - 1.0) < 1e-14


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("pi_1", [0.5, 0.2])
def test_entropy_matches_brute_force_over_all_states(n, pi_1):
    T = 6
    kernel = BernoulliKernel(make_beta_tilde("cosine", T), pi_1)
    states = all_states(n)
    generator = torch.Generator().manual_seed(n)
    x0 = (torch.rand(1, n, generator=generator, dtype=torch.float64) < 0.5).double()
    for t in range(1, T + 1):
        p_one = x0 * (1 - kernel.beta_tilde[t]) + kernel.beta_tilde[t] * pi_1  # docs/math.md §1
        probs = torch.where(states == 1, p_one, 1 - p_one).prod(-1)  # q(x^t = s | x^0) over 2^n states
        brute = float(-(probs * probs.log()).sum())
        closed = float(entropy(kernel.q_marginal_log_probs(x0, t)).sum())
        assert math.isclose(closed, brute, rel_tol=1e-11), t


@pytest.mark.parametrize("n", [4, 20])
def test_entropy_equals_the_seeds_binomial_sum_for_half(n):
    kernel = BernoulliKernel(make_beta_tilde("paper", 50), 0.5)
    x0 = torch.zeros(1, n, dtype=torch.float64)
    for t in (1, 7, 49):
        flip = float(kernel.beta_tilde[t]) / 2
        binomial = -sum(math.comb(n, k) * (1 - flip) ** k * flip ** (n - k)
                        * math.log((1 - flip) ** k * flip ** (n - k)) for k in range(n + 1))
        closed = float(entropy(kernel.q_marginal_log_probs(x0, t)).sum())
        assert math.isclose(closed, binomial, rel_tol=1e-10)


@settings(max_examples=60, deadline=None)
@given(pi_1=st.floats(0.01, 0.99), t=st.integers(1, 12), x1=st.integers(0, 1),
       schedule=st.sampled_from(["paper", "cosine"]))
def test_edge_step_is_a_distribution_and_matches_detailed_balance(pi_1, t, x1, schedule):
    kernel = BernoulliKernel(make_beta_tilde(schedule, 12), pi_1)
    edge = kernel.edge_log_probs(torch.tensor([[float(x1)]])).exp()[0, 0]
    assert abs(float(edge.sum()) - 1.0) < 1e-12
    Q1 = kernel.log_Q[1].exp()
    pi = kernel.pi
    for x0 in (0, 1):  # p(x^0 | x^1) = q(x^1 | x^0) pi(x^0) / pi(x^1)
        assert math.isclose(float(edge[x0]), float(Q1[x0, x1] * pi[x0] / pi[x1]), rel_tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(a=st.lists(st.floats(-30, 30), min_size=2, max_size=5), b=st.lists(st.floats(-30, 30), min_size=2, max_size=5))
def test_kl_is_nonnegative_and_zero_on_equal(a, b):
    k = min(len(a), len(b))
    log_q = torch.log_softmax(torch.tensor(a[:k], dtype=torch.float64), -1)
    log_p = torch.log_softmax(torch.tensor(b[:k], dtype=torch.float64), -1)
    assert float(kl_categorical(log_q, log_p)) >= -1e-12
    assert abs(float(kl_categorical(log_q, log_q))) < 1e-12


def test_bernoulli_kl_from_logits_matches_the_textbook_formula():
    lq, lp = torch.tensor(1.3, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    q, p = torch.sigmoid(lq), torch.sigmoid(lp)
    textbook = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    def as_log_probs(logit):
        return torch.stack([torch.nn.functional.logsigmoid(-logit), torch.nn.functional.logsigmoid(logit)])
    assert torch.allclose(kl_categorical(as_log_probs(lq), as_log_probs(lp)), textbook, atol=1e-15)


@pytest.mark.parametrize("bad", [{"pi_1": 0.0}, {"pi_1": 1.0}, {"T": 1}])
def test_bad_kernel_parameters_are_user_errors(bad):
    from bdiff_pyro.errors import UserError
    with pytest.raises(UserError):
        BernoulliKernel(make_beta_tilde("paper", bad.get("T", 5)), bad.get("pi_1", 0.5))


def test_gaussian_kernel_is_symmetric_and_prefers_near_states():
    from bdiff_pyro.diffusion.kernels import DiscretisedGaussianKernel
    Q = DiscretisedGaussianKernel(make_beta_tilde("cosine", 20), 5).log_Q.exp()
    assert torch.allclose(Q, Q.transpose(-1, -2), atol=1e-14)
    assert torch.all(Q[5, 0, 1:] [:-1] >= Q[5, 0, 1:][1:])  # from state 0: nearer levels likelier


def test_absorbing_kernel_masks_and_never_unmasks():
    from bdiff_pyro.diffusion.kernels import AbsorbingKernel
    kernel = AbsorbingKernel(make_beta_tilde("cosine", 10), 3)
    assert kernel.num_states == 4 and not kernel.closed_form_edge
    assert torch.allclose(kernel.log_Qbar[10].exp()[:, 3], torch.ones(4, dtype=torch.float64))
    assert torch.all(kernel.log_Q.exp()[1:, 3, :3] == 0)


def test_absorbing_kernel_on_the_paper_schedule_masks_at_rate_t_over_T():
    """The paper schedule beta_t = 1/(T - t + 1) makes the absorbing chain's mask probability
    q(x^t = mask | x^0) = t/T, and the reverse step unmasks a masked dimension with probability
    1/t (the order-agnostic weight of Austin et al. 2021, Hoogeboom et al. 2022): checked
    against the product of the step matrices built by hand from beta_t."""
    from bdiff_pyro.diffusion.kernels import AbsorbingKernel
    T, mask = 12, 2
    kernel = AbsorbingKernel(make_beta_tilde("paper", T), 2)
    product = torch.eye(3, dtype=torch.float64)
    for t in range(1, T + 1):
        beta = 1.0 / (T - t + 1)
        step = torch.tensor([[1 - beta, 0, beta], [0, 1 - beta, beta], [0, 0, 1]], dtype=torch.float64)
        product = product @ step
        assert torch.allclose(product[:2, mask], torch.full((2,), t / T, dtype=torch.float64), atol=1e-14)
        assert torch.allclose(kernel.log_Qbar[t].exp(), product, atol=1e-14)
        if t >= 2:
            unmask = kernel.q_posterior_log_probs(torch.tensor([mask]), torch.tensor([1]), t).exp()[0]
            assert torch.allclose(unmask, torch.tensor([0, 1 / t, 1 - 1 / t], dtype=torch.float64), atol=1e-14)


def brute_force_absorbing_step(beta_tilde, num_data_states, x_t, x0_probs, t, s):
    """p(x^s = k | x^t) = sum_v P(x^0 = v) q(x^s = k | x^t, x^0 = v) for one dimension, float64,
    with the posterior from Bayes' rule on step matrices written out from beta_t and multiplied
    one by one; None where x^t cannot follow any x^0 with P(x^0) > 0."""
    K, mask = num_data_states + 1, num_data_states
    betas = betas_from_beta_tilde(beta_tilde)
    Q = [torch.eye(K, dtype=torch.float64)]
    for beta in betas[1:].tolist():
        step = (1 - beta) * torch.eye(K, dtype=torch.float64)
        step[:, mask] += beta
        Q.append(step)
    Qbar = [Q[0]]
    for step in Q[1:]:
        Qbar.append(Qbar[-1] @ step)
    span = torch.eye(K, dtype=torch.float64)
    for step in Q[s + 1:t + 1]:
        span = span @ step
    result = torch.zeros(K, dtype=torch.float64)
    for v in range(K):
        joint = torch.tensor([span[k, x_t] * Qbar[s][v, k] for k in range(K)], dtype=torch.float64)
        if x0_probs[v] > 0 and joint.sum() == 0:
            return None  # x^t unreachable from a possible x^0
        if x0_probs[v] > 0:
            result += x0_probs[v] * joint / joint.sum()
    return result


@pytest.mark.parametrize("schedule", ["paper", "cosine"])
@pytest.mark.parametrize("mass_on_mask", [False, True])
def test_absorbing_through_x0_step_is_the_posterior_mixture_by_brute_force(schedule, mass_on_mask):
    """The absorbing kernel's closed-form through-x^0 step (one t, one t per sequence, and the
    strided jump s < t - 1) against the sum over x^0 of Bayes' rule on hand-built step matrices,
    for every x^t a possible x^0 reaches; and against the base class's sum over the posterior
    table to 1e-10 at every x^t, reachable or not."""
    from bdiff_pyro.diffusion.kernels import AbsorbingKernel, DiscreteKernel
    T, data_states = 9, 2
    beta_tilde = make_beta_tilde(schedule, T)
    kernel = AbsorbingKernel(beta_tilde, data_states)
    K = kernel.num_states
    generator = torch.Generator().manual_seed(0)
    x_t = torch.cat([torch.arange(K).repeat(5), torch.arange(data_states)])  # every state, then unmasked ones
    logits = torch.randn(len(x_t), K, generator=generator, dtype=torch.float64) * 2
    if not mass_on_mask:
        logits[:, -1] = -math.inf
    sure = torch.arange(5 * K, len(x_t))  # these predict x^0 = x^t surely, as own evidence makes it
    logits[sure] = torch.where(torch.arange(K) == x_t[sure, None], 0.0, -math.inf).double()
    x0_log_probs = torch.log_softmax(logits, -1)
    checked = 0
    for t in range(2, T + 1):
        for s in sorted({t - 1, t // 2, 1}):
            got = kernel.q_posterior_log_probs_mixture(x_t, x0_log_probs, t, s)
            generic = DiscreteKernel.q_posterior_log_probs_mixture(kernel, x_t, x0_log_probs, t, s)
            assert torch.allclose(got, generic, rtol=0, atol=1e-10, equal_nan=False), (t, s)
            assert torch.equal(torch.isneginf(got), torch.isneginf(generic)), (t, s)
            for i, state in enumerate(x_t.tolist()):
                expected = brute_force_absorbing_step(beta_tilde, data_states, state, x0_log_probs[i].exp(), t, s)
                if expected is not None:
                    assert torch.allclose(got[i].exp(), expected, rtol=0, atol=1e-13), (t, s, state)
                    checked += 1
        per_sequence = torch.full((3,), t)
        batch = kernel.q_posterior_log_probs_mixture(x_t.expand(3, -1), x0_log_probs, per_sequence)
        assert torch.equal(batch, kernel.q_posterior_log_probs_mixture(x_t, x0_log_probs, t).expand(3, -1, -1))
    assert checked >= (T - 1) * (5 + data_states)  # masked x^t, and the sure unmasked ones


def test_absorbing_marginal_draws_mask_at_rate_beta_tilde_and_keep_the_rest():
    """x^t ~ q(x^t | x^0): the fraction of masked dimensions within 5 standard errors of
    beta~_t at every t (one t, and one t per sequence), never masked at t = 0, always at T,
    and an unmasked dimension keeps its x^0."""
    from bdiff_pyro.diffusion.kernels import AbsorbingKernel
    T, draws = 8, 20000
    kernel = AbsorbingKernel(make_beta_tilde("cosine", T), 3)
    torch.manual_seed(0)
    x0 = torch.randint(0, 3, (draws, 4))
    for t in range(T + 1):
        for times in (t, torch.full((draws,), t)):
            x_t = kernel.sample_marginal(x0, times)
            masked = x_t == kernel.mask
            assert torch.equal(x_t[~masked], x0[~masked])
            rate = float(kernel.beta_tilde[t])
            se = math.sqrt(rate * (1 - rate) / masked.numel())
            assert abs(float(masked.double().mean()) - rate) <= 5 * se, (t, float(masked.double().mean()), rate)
    mixed = torch.arange(draws) % (T + 1)
    x_t = kernel.sample_marginal(x0, mixed)
    assert not (x_t[mixed == 0] == kernel.mask).any() and (x_t[mixed == T] == kernel.mask).all()
