"""The binary fast path (one Bernoulli logit per position) against the generic K-state
formulas, and the evidence inputs against Bayes' rule."""

import pytest
import torch
from helpers import KERNEL_CASES, make_kernel_process, make_process

from bdiff_pyro.diffusion.bound import all_states
from bdiff_pyro.diffusion.kernels import normalise
from bdiff_pyro.diffusion.steps import edge_or_step
from bdiff_pyro.errors import UserError


def generic_log_probs(process, x_t, t):
    """log p(x^{t-1} | x^t) through the K-state path: the kernel's mixture for x0 models, the
    normalised likelihood correction for direct ones."""
    return edge_or_step(process._edge_log_probs, process._step_log_probs, x_t, t)


@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("inputs", ["state", "evidence", "log_evidence"])
@pytest.mark.parametrize("schedule,pi_1,film", [("cosine", 0.5, False), ("paper", 0.2, True)])
@pytest.mark.parametrize("add_own_evidence", [True, False])
def test_binary_logits_equal_the_generic_mixture(parameterisation, inputs, schedule, pi_1, film, add_own_evidence):
    if inputs == "state" and not add_own_evidence:
        pytest.skip("state inputs add no evidence either way")
    process = make_process(n=3, T=6, pi_1=pi_1, schedule=schedule, parameterisation=parameterisation, inputs=inputs,
                           film=film, add_own_evidence=add_own_evidence)
    x_t = all_states(3)
    with torch.no_grad():
        for t in range(1, process.T + 1):
            fast, generic = process.log_probs(x_t, t), generic_log_probs(process, x_t, t)
            assert torch.allclose(fast, generic, rtol=1e-12, atol=1e-12), t
        # one time per sequence, t = 1 rows included
        t = torch.arange(len(x_t)) % process.T + 1
        assert torch.allclose(process.log_probs(x_t, t), generic_log_probs(process, x_t, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}{c[1]}")
@pytest.mark.parametrize("inputs", ["evidence", "log_evidence"])
def test_evidence_inputs_with_a_silent_network_give_each_positions_own_posterior(case, inputs):
    """With the network's output layer at zero, P(x^0_i | x^t) is what x^t_i alone says under a
    uniform prior over data states: normalise_v q(x^t_i | x^0_i = v), taken from Qbar_t directly."""
    if inputs == "log_evidence" and case[0] == "absorbing":
        with pytest.raises(UserError, match="log_evidence"):
            make_kernel_process(case, n=2, T=5, inputs=inputs)
        return
    process = make_kernel_process(case, n=2, T=5, inputs=inputs)
    with torch.no_grad():
        process.net.out.weight.zero_()
        process.net.out.bias.zero_()
        kernel, data_states = process.kernel, process.kernel.num_data_states
        x_t = all_states(2, kernel.num_states)
        for t in range(1, kernel.T + 1):
            Qbar = kernel.log_Qbar[t].exp()
            expected = normalise(Qbar[:data_states, x_t.long()].permute(1, 2, 0).log())  # (S, n, K_data)
            got = process.x0_log_probs(x_t, t)[..., :data_states]
            unreachable = torch.isnan(expected).all(-1)  # no data state reaches x^t_i: no evidence
            assert torch.allclose(got[unreachable].exp(), torch.tensor(1.0 / data_states, dtype=got.dtype))
            expected[unreachable], got[unreachable] = 0.0, 0.0
            finite = torch.isfinite(expected)
            assert torch.equal(finite, torch.isfinite(got))
            assert torch.allclose(got[finite], expected[finite], rtol=1e-12, atol=1e-12), t


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}{c[1]}")
def test_without_own_evidence_the_network_alone_predicts_x0(case):
    """add_own_evidence=False: P(x^0_i | x^t) is the softmax of the network's logits over the
    data states (state 0's logit fixed at 0), whatever x^t_i says; silent, it is uniform."""
    process = make_kernel_process(case, n=2, T=5, inputs="evidence", add_own_evidence=False)
    kernel, data_states = process.kernel, process.kernel.num_data_states
    x_t = all_states(2, kernel.num_states)
    with torch.no_grad():
        for t in range(1, kernel.T + 1):
            net = torch.nn.functional.pad(process._net(x_t, t), (1, 0))[..., :data_states]
            got = process.x0_log_probs(x_t, t)
            assert torch.allclose(got[..., :data_states], net.log_softmax(-1), rtol=1e-12, atol=1e-12)
            assert torch.isneginf(got[..., data_states:]).all()
        process.net.out.weight.zero_()
        process.net.out.bias.zero_()
        uniform = torch.full((len(x_t), 2, data_states), -torch.log(torch.tensor(float(data_states))))
        assert torch.allclose(process.x0_log_probs(x_t, 3)[..., :data_states], uniform.double())


def test_evidence_inputs_read_the_kernel_not_the_raw_state():
    """Same x^t, different t: evidence features change with t (the one-hot code does not)."""
    process = make_process(n=2, T=10, inputs="evidence")
    x_t = torch.tensor([[0.0, 1.0]])
    features = [torch.sigmoid(process._evidence_logit(x_t, t)) for t in (1, 5, 10)]
    assert features[0][0, 1] > features[1][0, 1] > features[2][0, 1] >= 0.5
    assert features[0][0, 0] < features[1][0, 0] < features[2][0, 0] <= 0.5


def test_log_evidence_inputs_are_the_log_likelihood_ratios():
    process = make_process(n=2, T=10, pi_1=0.2, inputs="log_evidence")
    x_t = torch.tensor([[0.0, 1.0]])
    seen = {}
    process.net.forward = lambda features, t: seen.setdefault("features", features) * 0
    process.x0_log_probs(x_t, 4)
    Qbar = process.kernel.log_Qbar[4]
    expected = torch.stack([Qbar[1, 0] - Qbar[0, 0], Qbar[1, 1] - Qbar[0, 1]]).view(1, 2, 1)
    assert torch.allclose(seen["features"], expected)


@pytest.mark.parametrize("case", [("absorbing", 2, None), ("uniform", 3, None)], ids=["absorbing2", "uniform3"])
def test_k_state_evidence_inputs_are_each_positions_posterior(case):
    """K states, evidence inputs: the network reads P(x^0_i = v | x^t_i) = normalise_v Qbar_t[v, x^t_i]
    over the data states v = 1.. (1/K_data each where no data state reaches x^t_i: a mask at T)."""
    process = make_kernel_process(case, n=2, T=5, inputs="evidence")
    kernel, data_states = process.kernel, process.kernel.num_data_states
    x_t = all_states(2, kernel.num_states)
    seen = []
    process.net.forward = lambda features, t: seen.append(features) or torch.zeros(
        *features.shape[:-1], kernel.num_states - 1, dtype=features.dtype)
    for t in range(1, kernel.T + 1):
        process.x0_log_probs(x_t, t)
        Qbar = kernel.log_Qbar[t].exp()[:data_states]  # (v, state)
        by_hand = Qbar[:, x_t.long()].permute(1, 2, 0)  # (S, n, v)
        reached = by_hand.sum(-1, keepdim=True) > 0
        expected = torch.where(reached, by_hand / by_hand.sum(-1, keepdim=True).clamp_min(1e-300), 1.0 / data_states)
        assert torch.allclose(seen[-1], expected[..., 1:], rtol=1e-12, atol=1e-12), t


def test_log_softmax_over_states_is_the_log_softmax_of_the_last_dimension():
    """Against the definition x_k - log sum_j exp(x_j) in float64, -inf entries included, and its
    gradient against torch.log_softmax's."""
    from bdiff_pyro.programs.reverse import log_softmax_over_states
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3, dtype=torch.float64) * 5
    logits[0, 0, 1] = -float("inf")
    by_definition = logits - logits.exp().sum(-1, keepdim=True).log()
    got = log_softmax_over_states(logits)
    assert torch.equal(torch.isneginf(got), torch.isneginf(by_definition))
    finite = torch.isfinite(by_definition)
    assert torch.allclose(got[finite], by_definition[finite], rtol=0, atol=1e-13)
    weights = torch.randn(4, 5, 3, dtype=torch.float64)
    grads = [torch.autograd.grad((torch.where(finite, f(x), 0.0) * weights).sum(), x)[0]
             for f, x in ((log_softmax_over_states, logits.clone().requires_grad_()),
                          (lambda x: torch.log_softmax(x, -1), logits.clone().requires_grad_()))]
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-13)
