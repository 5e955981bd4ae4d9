"""The samplers of bdiff_pyro.programs.sampling on any reverse step: a test double with fixed
probabilities against its exact distribution, and the random state they use."""

import pytest
import torch
from helpers import make_kernel_process, make_process

from bdiff_pyro.diffusion.bound import all_states
from bdiff_pyro.diffusion.kernels import make_kernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.programs.sampling import ancestral_sample, stride_grid, strided_sample


class FixedStep:
    """A reverse step whose p(x^{t-1}_i | x^t) and P(x^0_i | x^t) are fixed random tables,
    indexed by t, the whole of x^t and the position i: nothing but the interface the samplers read."""

    def __init__(self, kernel, n, seed=0):
        self.kernel, self.n, self.T = kernel, n, kernel.T
        K = kernel.num_states
        generator = torch.Generator().manual_seed(seed)
        shape = (self.T + 1, K ** n, n, K)
        self.table = (2 * torch.randn(shape, generator=generator, dtype=torch.float64)).log_softmax(-1)
        self.x0_table = (2 * torch.randn(shape, generator=generator, dtype=torch.float64)).log_softmax(-1)

    def code(self, x_t):
        """x^t as one integer, sum_i x_i K^i."""
        powers = self.kernel.num_states ** torch.arange(self.n)
        return (x_t.long() * powers).sum(-1)

    def log_probs(self, x_t, t):
        return self.table[t][self.code(x_t)]

    def logits(self, x_t, t):
        log_probs = self.log_probs(x_t, t)
        return log_probs[..., 1] - log_probs[..., 0]

    def x0_log_probs(self, x_t, t):
        return self.x0_table[t][self.code(x_t)]

    def x0_logits(self, x_t, t):
        log_probs = self.x0_log_probs(x_t, t)
        return log_probs[..., 1] - log_probs[..., 0]


def transition_matrix(log_rows, states):
    """P[x, y] = prod_i p(y_i | x) from log p(k at position i | x) as (x, i, k), x and y in
    the order of ``states``."""
    index = states.T.unsqueeze(0).expand(len(states), -1, -1)  # (x, i, y): y_i
    return log_rows.gather(-1, index).sum(1).exp()


def exact_x0_distribution(step, T):
    """P(x^0 = y) over all K^n states y (ordered as all_states), brute force in float64: pi
    pushed through the transition matrices of steps T..1."""
    states = all_states(step.n, step.kernel.num_states).long()
    order = step.code(states)
    distribution = step.kernel.pi.double()[states].prod(-1)
    for t in range(T, 0, -1):
        distribution = distribution @ transition_matrix(step.table[t][order], states)
    return states, distribution


def frequencies(samples, states):
    return (samples.long().unsqueeze(1) == states.unsqueeze(0)).all(-1).double().mean(0)


def assert_matches(samples, states, exact):
    num = len(samples)
    found = frequencies(samples, states)
    tolerance = 5 * (exact * (1 - exact) / num).sqrt() + 1e-9
    assert torch.all((found - exact).abs() < tolerance), (found, exact)


@pytest.mark.parametrize("name,num_states", [("bernoulli", 2), ("uniform", 3)])
def test_ancestral_sample_of_a_test_double_has_its_exact_distribution(name, num_states):
    kernel = make_kernel(name, make_beta_tilde("cosine", 3), num_states, 0.3).double()
    step = FixedStep(kernel, n=2, seed=1)
    states, exact = exact_x0_distribution(step, 3)
    assert float(exact.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(exact.min()) > 0.01  # every state is likely enough for its frequency to be checked
    assert_matches(ancestral_sample(step, 100_000, generator=torch.Generator().manual_seed(0)), states, exact)


@pytest.mark.parametrize("name,num_states", [("bernoulli", 2), ("uniform", 3)])
def test_strided_sample_of_a_test_double_has_its_exact_distribution(name, num_states):
    """T = 4 in 2 jumps: 4 -> 2, sum_v q(x^2 | x^4, x^0 = v) P(x^0 = v | x^4) per position with
    q(x^2 = k | x^4 = j, x^0 = v) ∝ Qbar_2[v, k] (Q_3 Q_4)[k, j] (Bayes), then 2 -> 0 from the
    prediction P(x^0 | x^2) itself."""
    kernel = make_kernel(name, make_beta_tilde("cosine", 4), num_states, 0.3).double()
    step = FixedStep(kernel, n=2, seed=2)
    assert stride_grid(4, 2) == [(4, 2), (2, 0)]
    states = all_states(2, num_states).long()
    order = step.code(states)
    joint = kernel.log_Qbar[2].exp().unsqueeze(-1) * (kernel.log_Q[3].exp() @ kernel.log_Q[4].exp()).unsqueeze(0)
    posterior = joint / joint.sum(1, keepdim=True)  # (v, k, j)
    jump = torch.einsum("xiv,vkxi->xik", step.x0_table[4][order].exp(), posterior[:, :, states])
    exact = kernel.pi.double()[states].prod(-1) @ transition_matrix(jump.log(), states)
    exact = exact @ transition_matrix(step.x0_table[2][order], states)
    assert float(exact.sum()) == pytest.approx(1.0, abs=1e-12)
    assert_matches(strided_sample(step, 100_000, 2, generator=5), states, exact)


def test_strided_sample_with_every_step_is_ancestral_sample_draw_for_draw():
    step = FixedStep(make_kernel("uniform", make_beta_tilde("cosine", 5), 3).double(), n=2, seed=3)
    assert torch.equal(strided_sample(step, 500, 5, generator=4), ancestral_sample(step, 500, generator=4))


@pytest.mark.parametrize("case", [("bernoulli", 2, 0.3), ("absorbing", 2, None)], ids=lambda c: c[0])
def test_sampling_with_a_seed_or_generator_leaves_the_global_generator_alone(case):
    process = make_kernel_process(case, n=3, T=4)
    before = torch.get_rng_state()
    first = process.sample(40, seed=3)
    second = process.sample(40, generator=torch.Generator().manual_seed(3))
    strided = process.sample(40, seed=3, steps=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, second) and strided.shape == (40, 3)


def test_one_generator_runs_on_through_consecutive_calls():
    """Two draws from one generator continue its stream: the same as the global generator seeded
    once and drawn from twice (what memory.iter_sample_batches relies on)."""
    process = make_process(n=4, T=5)
    generator = torch.Generator().manual_seed(9)
    batches = torch.cat([process.sample(30, generator=generator), process.sample(20, generator=generator)])
    torch.manual_seed(9)
    assert torch.equal(batches, torch.cat([process.sample(30), process.sample(20)]))
    assert not torch.equal(batches[:20], batches[30:])


def test_a_seed_and_a_generator_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        make_process().sample(2, seed=1, generator=torch.Generator())
