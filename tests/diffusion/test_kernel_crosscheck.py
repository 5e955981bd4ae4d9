"""The exact cross-check for every kernel in conftest.KERNEL_CASES: the analytic ELBO equals
Pyro's TraceEnum_ELBO, and the exact likelihood is normalised and above the bound."""

import pytest
import torch
from conftest import KERNEL_CASES, make_kernel_process

from bdiff_pyro.diffusion.bound import all_states, elbo_exact
from bdiff_pyro.programs.enumeration import enumerated_elbo, exact_log_likelihood


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 traces: threads only add overhead
    yield
    torch.set_num_threads(threads)


# Sizes with one-hot inputs; the evidence codes change only the network's inputs (two sizes),
# and without the own-evidence term the network alone predicts x^0 (one code, one size).
NETWORK_CASES = ([(n, T, "state", True) for n, T in [(1, 2), (2, 3), (2, 4), (3, 3)]]
                 + [(n, T, inputs, True) for n, T in [(2, 3), (3, 3)] for inputs in ("evidence", "log_evidence")]
                 + [(2, 3, "evidence", False)])


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}{c[1]}")
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


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}{c[1]}")
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
