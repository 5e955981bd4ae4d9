"""The kernel contract: every kernel in helpers.KERNEL_CASES passes these tests unchanged, so a
new kernel is tested by adding one line to that list.  Each kernel must be a consistent Markov
chain (rows of Q_t and Qbar_t sum to 1, Qbar_t = Q_1 ... Q_t, pi stationary), its posterior table
must be Bayes' rule computed by brute force from its own step matrices, and the analytic ELBO of
a random network on it must equal Pyro's TraceEnum_ELBO, with the exact likelihood normalised and
above the bound (docs/math.md §4, §5)."""

import itertools

import pytest
import torch
from helpers import KERNEL_CASES, make_case_kernel, make_kernel_process

from bdiff_pyro.diffusion.bound import all_states, elbo_exact
from bdiff_pyro.diffusion.kernels import DiscreteKernel
from bdiff_pyro.programs.enumeration import enumerated_elbo, exact_log_likelihood

CASE_IDS = [f"{name}{states}" + (f"_pi{pi_1}" if pi_1 is not None else "") for name, states, pi_1 in KERNEL_CASES]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("schedule", ["paper", "cosine"])
def test_every_kernel_is_a_consistent_markov_chain(case, schedule):
    kernel = make_case_kernel(case, T=11, schedule=schedule)
    Q, Qbar, pi = kernel.log_Q.exp(), kernel.log_Qbar.exp(), kernel.pi
    assert torch.allclose(Q.sum(-1), torch.ones_like(Q.sum(-1)), atol=1e-13)
    assert torch.allclose(Qbar.sum(-1), torch.ones_like(Qbar.sum(-1)), atol=1e-12)
    assert torch.allclose(Qbar, DiscreteKernel.cumulative_matrices(kernel, Q), atol=1e-12)  # closed form = product
    for t in range(1, 12):
        assert torch.allclose(pi @ Q[t], pi, atol=1e-13)  # pi is stationary
        for s in (0, t // 2, t - 1):
            assert torch.allclose(kernel.log_span(s, t).exp(), DiscreteKernel.log_span(kernel, s, t).exp(), atol=1e-12)
    assert not torch.isnan(kernel.log_posterior).any()


@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("schedule", ["paper", "cosine"])
def test_posterior_table_is_bayes_rule_by_brute_force(case, schedule):
    """q(x^{t-1} = k | x^t, x^0) = Q_t[k, x^t] Qbar_{t-1}[x^0, k] / sum_k' (same), from the
    kernel's own float64 step matrices multiplied out one by one, for every (x^t, x^0) the
    chain can reach."""
    T = 7
    kernel = make_case_kernel(case, T=T, schedule=schedule)
    Q = kernel.step_matrices()
    K = kernel.num_states
    Qbar = [torch.eye(K, dtype=torch.float64)]
    for t in range(1, T + 1):
        Qbar.append(Qbar[-1] @ Q[t])
    checked = 0
    for t in range(2, T + 1):
        for x0, xt in itertools.product(range(kernel.num_data_states), range(K)):
            joint = torch.stack([Q[t][k, xt] * Qbar[t - 1][x0, k] for k in range(K)])
            if float(joint.sum()) < 1e-300:  # x^t unreachable from x^0: no posterior to check
                continue
            got = kernel.q_posterior_log_probs(torch.tensor([[float(xt)]]), torch.tensor([[float(x0)]]), t).exp()
            assert abs(float(got.sum()) - 1.0) < 1e-12, (t, x0, xt)
            assert torch.allclose(got[0, 0], joint / joint.sum(), atol=1e-12), (t, x0, xt)
            checked += 1
    assert checked >= (T - 1) * kernel.num_data_states  # at least x^t = x^0 is always reachable


# Sizes with one-hot inputs; the evidence codes change only the network's inputs (two sizes),
# and without the own-evidence term the network alone predicts x^0 (one code, one size).
NETWORK_CASES = ([(n, T, "state", True) for n, T in [(1, 2), (2, 3), (2, 4), (3, 3)]]
                 + [(n, T, inputs, True) for n, T in [(2, 3), (3, 3)] for inputs in ("evidence", "log_evidence")]
                 + [(2, 3, "evidence", False)])


@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("schedule", ["cosine", "paper"])
@pytest.mark.parametrize("n,T,inputs,add_own_evidence", NETWORK_CASES)
def test_analytic_bound_equals_trace_enum_for_every_kernel(case, parameterisation, schedule, n, T, inputs,
                                                           add_own_evidence):
    if inputs == "log_evidence" and case[0] == "absorbing":
        pytest.skip("log_evidence needs q(x^t | x^0) > 0 (tested in test_fast_path)")
    process = make_kernel_process(case, n=n, T=T, schedule=schedule, parameterisation=parameterisation, seed=n + T,
                                  inputs=inputs, add_own_evidence=add_own_evidence)
    x0 = all_states(n, case[1])
    with torch.no_grad():
        analytic = elbo_exact(process.kernel, process.log_probs, x0)
    enumerated = enumerated_elbo(process, x0)
    assert torch.allclose(analytic, enumerated, rtol=1e-8, atol=0), (analytic - enumerated).abs().max()
    log_likelihood = exact_log_likelihood(process, x0)
    assert abs(float(torch.logsumexp(log_likelihood, 0))) < 1e-10  # sum over all data values is 1
    assert torch.all(log_likelihood >= analytic - 1e-12)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("inputs", ["state", "evidence"])
def test_per_sequence_steps_match_one_step_at_a_time_with_finite_gradients(case, parameterisation, inputs):
    """The training path (one t per sequence, t = 1 rows for learned edges) equals step-by-step
    evaluation, and its gradient is finite even where a kernel has zeros (absorbing)."""
    from bdiff_pyro.diffusion.bound import sample_x_t, step_loss
    process = make_kernel_process(case, n=2, T=4, parameterisation=parameterisation, inputs=inputs)
    x0 = all_states(2, case[1]).repeat(4, 1)
    first = 2 if process.kernel.closed_form_edge else 1
    t = first + torch.arange(len(x0)) % (process.T + 1 - first)
    x_t = sample_x_t(process.kernel, x0, t)
    terms = step_loss(process.kernel, process.log_probs, x0, x_t, t)
    for s in range(first, process.T + 1):
        rows = t == s
        alone = step_loss(process.kernel, process.log_probs, x0[rows], x_t[rows], s)
        assert torch.allclose(terms[rows], alone, rtol=1e-12, atol=1e-12)
    terms.sum().backward()
    for name, p in process.named_parameters():
        assert torch.isfinite(p.grad).all(), name
