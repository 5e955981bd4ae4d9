"""The forward and reverse Pyro programs: marginals, sampling paths, and SVI training."""

import itertools
import math
from functools import partial

import pyro
import pyro.optim
import pytest
import torch
from helpers import make_process
from pyro import poutine
from pyro.infer import SVI

from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.networks.mlp import MLP, TimeTabulatedMLP
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.train import AnalyticLoss


@pytest.mark.parametrize("pi_1", [0.5, 0.2])
def test_forward_program_has_the_closed_form_marginals(pi_1):
    kernel = BernoulliKernel(make_beta_tilde("cosine", 12), pi_1).double()
    x0 = torch.tensor([[0.0, 1.0, 1.0]]).double().expand(20000, 3)
    pyro.set_rng_seed(1)
    trace = poutine.trace(forward_chain).get_trace(kernel, x0)
    for t in (1, 4, 12):
        values = trace.nodes[f"x_{t}"]["value"]
        assert values.shape == x0.shape
        expected = kernel.q_marginal_log_probs(x0[:1], t)[0, :, 1].exp()  # P(x^t_i = 1 | x^0)
        se = (expected * (1 - expected) / len(x0)).sqrt()
        assert torch.all((values.mean(0) - expected).abs() < 4.5 * se + 1e-12), (t, values.mean(0), expected)
    assert [name for name in trace.nodes if name.startswith("x_")] == [f"x_{t}" for t in range(1, 13)]


@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("inputs", ["state", "evidence", "log_evidence"])
def test_pyro_program_and_fast_sampler_draw_identical_samples(parameterisation, inputs):
    process = make_process(n=5, T=7, parameterisation=parameterisation, inputs=inputs)
    pyro.set_rng_seed(11)
    trace = poutine.trace(process).get_trace(num_sequences=64)
    fast = process.sample(64, seed=11)
    assert torch.equal(trace.nodes["x_0"]["value"], fast)
    assert not torch.equal(process.sample(64, seed=12), fast)
    assert [name for name in trace.nodes if name.startswith("x_")] == [f"x_{t}" for t in range(7, -1, -1)]


def test_sampler_without_seed_advances_the_global_generator():
    process = make_process(n=6, T=4)
    torch.manual_seed(0)
    assert not torch.equal(process.sample(32), process.sample(32))


@pytest.mark.parametrize("inputs,add_own_evidence", [("state", True), ("evidence", True), ("evidence", False)])
def test_reverse_probs_is_the_posterior_averaged_over_the_networks_x0(inputs, add_own_evidence):
    """P(x^{t-1}_i = 1 | x^t) = sum_v P(x^0_i = v | x^t) q(x^{t-1}_i = 1 | x^t_i, x^0_i = v)
    (docs/math.md §3), summed term by term in float64 from the network's x^0 prediction and the
    posterior Q_t[1, x^t] Qbar_{t-1}[v, 1] / sum_k Q_t[k, x^t] Qbar_{t-1}[v, k]."""
    process = make_process(n=4, T=5, pi_1=0.2, inputs=inputs, add_own_evidence=add_own_evidence)
    x_t = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).double()
    Q, Qbar = process.kernel.log_Q.exp(), process.kernel.log_Qbar.exp()
    for t in (2, 3, 5):
        probs = process.reverse_probs(x_t, t)
        with torch.no_grad():
            x0_probs = process.x0_log_probs(x_t, t).exp()
        assert probs.shape == (2, 4)
        for b, i in itertools.product(range(2), range(4)):
            xt = int(x_t[b, i])
            expected = 0.0
            for v in (0, 1):
                joint = [float(Q[t][k, xt] * Qbar[t - 1][v, k]) for k in (0, 1)]
                expected += float(x0_probs[b, i, v]) * joint[1] / sum(joint)
            assert abs(float(probs[b, i]) - expected) < 1e-12, (t, b, i)
        assert torch.all((probs > 0) & (probs < 1))


def test_network_size_does_not_grow_with_T():
    sizes = [sum(p.numel() for p in ReverseProcess(BernoulliKernel(make_beta_tilde("cosine", T)),
                                                   MLP(20, 2, hidden=(50, 50, 50))).parameters())
             for T in (10, 2000)]
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("film", [False, True])
def test_svi_with_the_analytic_loss_trains_every_layer(film):
    """The PyroModule pitfall: layers that never pass through pyro.param stay untrained."""
    process = make_process(n=5, T=6, hidden=(8, 8, 8), film=film).float()
    before = {name: p.detach().clone() for name, p in process.named_parameters()}
    guide = partial(forward_chain, process.kernel)
    svi = SVI(process, guide, pyro.optim.Adam({"lr": 1e-2}), loss=AnalyticLoss(process.T))
    x0 = (torch.rand(32, 5) < 0.3).float()
    losses = [svi.step(x0) for _ in range(30)]
    for name, p in process.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} was not trained"
    assert sum(losses[-5:]) < sum(losses[:5])


def test_strided_jump_is_the_marginal_of_single_steps():
    """q(x^s | x^t, x^0) from the closed-form span equals summing the intermediate states out
    of the one-step chain (Chapman-Kolmogorov, then Bayes)."""
    process = make_process(n=1, T=9, pi_1=0.3)
    kernel = process.kernel
    x0_log_probs = torch.log(torch.tensor([[[0.3, 0.7]]], dtype=torch.float64))
    for t, s in ((9, 4), (6, 1), (5, 4)):
        span = torch.eye(2, dtype=torch.float64)
        for step in range(s + 1, t + 1):
            span = span @ kernel.log_Q[step].exp()
        for x_t in (0, 1):
            joint = torch.stack([x0_log_probs[0, 0].exp()[v] * kernel.log_Qbar[s][v].exp() * span[:, x_t]
                                 / (kernel.log_Qbar[s][v].exp() @ span[:, x_t]) for v in (0, 1)]).sum(0)
            got = kernel.q_posterior_log_probs_mixture(torch.tensor([[float(x_t)]]), x0_log_probs, t, s).exp()
            assert torch.allclose(got[0, 0], joint, atol=1e-13)


def test_strided_sampler_uses_the_requested_number_of_network_calls(monkeypatch):
    process = make_process(n=4, T=20)
    calls = []
    step = TimeTabulatedMLP.__call__
    monkeypatch.setattr(TimeTabulatedMLP, "__call__", lambda *args: calls.append(1) or step(*args))
    samples = process.sample(16, seed=0, steps=5)
    assert len(calls) == 5 and samples.shape == (16, 4)
    assert [t for t, _ in process.stride_grid(5)] == [20, 16, 12, 8, 4]


@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
def test_per_sequence_times_match_one_time_at_a_time(parameterisation):
    """log_probs with one t per sequence (training) equals calls with each int t, edge included."""
    from helpers import KERNEL_CASES, make_kernel_process
    for case in KERNEL_CASES:
        process = make_kernel_process(case, n=3, T=5, parameterisation=parameterisation)
        x = torch.randint(process.kernel.num_data_states, (5, 3)).double()
        t = torch.tensor([1, 2, 3, 4, 5])
        together = process.log_probs(x, t)
        for row in range(5):
            assert torch.allclose(together[row], process.log_probs(x[row:row + 1], int(t[row]))[0], atol=1e-12), case


def test_weight_average_is_the_exponential_average_and_hands_back_the_raw_weights():
    from bdiff_pyro.train import WeightAverage
    module = torch.nn.Linear(3, 2)
    average = WeightAverage(module, decay=0.8)
    history = [module.weight.detach().clone()]
    for k in range(30):
        with torch.no_grad():
            module.weight.add_(torch.randn_like(module.weight))
        history.append(module.weight.detach().clone())
        average.update(module, k)
    # written out independently: d_k = min(0.8, (1 + k) / (10 + k)); the warm-up ends at k = 35,
    # so here d_k = (1 + k) / (10 + k) and w_avg = prod_k d_k w_0 + sum_k (1 - d_k) prod_{j>k} d_j w_{k+1}
    decays = [min(0.8, (1 + k) / (10 + k)) for k in range(30)]
    expected = math.prod(decays) * history[0]
    for k in range(30):
        expected = expected + (1 - decays[k]) * math.prod(decays[k + 1:]) * history[k + 1]
    raw = module.weight.detach().clone()
    with average.applied(module):
        assert torch.allclose(module.weight, expected, atol=1e-5)
    assert torch.equal(module.weight, raw)
