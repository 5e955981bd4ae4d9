"""The step plan (bdiff_pyro.programs.plan): per-t tables against the generic reverse step, the
draws against torch.bernoulli, the Pyro program against the sampler in float32, and plans
built from the weights of the moment."""

import functools

import pyro
import pyro.optim
import pytest
import torch
from helpers import make_network_process, make_process
from pyro import poutine
from pyro.infer import SVI

from bdiff_pyro.diffusion.bound import all_states
from bdiff_pyro.networks.mlp import TimeTabulatedMLP
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.programs.plan import BinaryStepPlan
from bdiff_pyro.programs.sampling import draw_bits
from bdiff_pyro.programs.sites import bernoulli_site
from bdiff_pyro.train import AnalyticLoss

NETWORKS = ["mlp", "resmlp", "conv1d", "conv2d", "transformer"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_bits_are_the_draws_of_torch_bernoulli(dtype):
    probs = torch.rand(500, 7, generator=torch.Generator().manual_seed(1), dtype=dtype)
    probs[0], probs[1], probs[2], probs[3] = 0.0, 1.0, 1e-30, 1 - 1e-7
    for seed in range(4):
        expected = torch.bernoulli(probs, generator=torch.Generator().manual_seed(seed))
        got = draw_bits(probs, torch.Generator().manual_seed(seed))
        assert got.dtype == dtype and torch.equal(got, expected), seed
    torch.manual_seed(3)  # the global generator, as pyro.set_rng_seed seeds it
    expected = torch.bernoulli(probs)
    torch.manual_seed(3)
    assert torch.equal(draw_bits(probs), expected)


def test_a_bernoulli_site_draws_from_its_probs_and_scores_with_its_logits():
    site = bernoulli_site(torch.zeros(4, 3), torch.ones(4, 3))
    assert torch.equal(site.sample(), torch.ones(4, 3))
    assert torch.allclose(site.log_prob(torch.zeros(4, 3)), torch.tensor(0.5).log())
    expanded = site.expand((2, 4, 3))
    assert torch.equal(expanded.sample(), torch.ones(2, 4, 3))


@pytest.mark.parametrize("film", [False, True])
def test_the_time_table_gives_the_mlps_forward_pass(film):
    process = make_process(n=5, T=9, film=film, inputs="evidence")
    table = TimeTabulatedMLP(process.net, process.T)
    features = torch.rand(3, 4, 5, dtype=torch.float64)  # leading dimensions of any shape
    for t in range(1, process.T + 1):
        expected = process.net(features.unsqueeze(-1), t)
        assert torch.allclose(table(features, t), expected, rtol=1e-12, atol=1e-12), t


def exact_x0_distribution(n, T, step_probs, log_pi):
    """P(x^0 = y) over all 2^n states y (in the order of all_states), brute force: pi pushed
    through the step matrices P_t[x, y] = prod_i p_t(y_i | x) for t = T..1."""
    states = all_states(n).double()
    distribution = (states * log_pi[1] + (1 - states) * log_pi[0]).sum(-1).exp()
    for t in range(T, 0, -1):
        p1 = step_probs(states, t)  # (x, i): P(x^{t-1}_i = 1 | x^t = x)
        matrix = torch.where(states.unsqueeze(0) == 1, p1.unsqueeze(1), 1 - p1.unsqueeze(1)).prod(-1)
        distribution = distribution @ matrix
    return distribution


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("inputs,film,add_own_evidence", [("state", False, True), ("evidence", True, True),
                                                          ("evidence", False, False), ("log_evidence", False, True)])
def test_the_plan_is_the_generic_step_up_to_rounding(name, parameterisation, inputs, film, add_own_evidence):
    """Step by step for every x^t, and as the distribution of x^0 the sampler draws from."""
    process = make_network_process(name, n=4, T=5, case=("bernoulli", 2, 0.2), parameterisation=parameterisation,
                                   inputs=inputs, film=film, add_own_evidence=add_own_evidence)
    plan = process.step_plan()
    x_t = all_states(4).double()
    with torch.no_grad():
        for t in range(1, process.T + 1):
            generic = process.logits(x_t, t)
            probs = plan.probs(x_t, t)
            assert probs.dtype == torch.float64
            assert torch.allclose(probs, torch.sigmoid(generic), rtol=1e-12, atol=1e-15), t
            assert torch.allclose(plan.logits(x_t, t), generic, rtol=1e-11, atol=1e-11), t
            if parameterisation == "x0":
                assert torch.allclose(plan.x0_logits(x_t, t), process.x0_logits(x_t, t), rtol=1e-11, atol=1e-11)
        log_pi = process.kernel.log_pi
        from_plan = exact_x0_distribution(4, process.T, plan.probs, log_pi)
        generic = exact_x0_distribution(4, process.T, lambda x, t: torch.sigmoid(process.logits(x, t)), log_pi)
    assert abs(float(from_plan.sum()) - 1) < 1e-12
    assert torch.allclose(from_plan, generic, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("parameterisation,inputs", [("x0", "evidence"), ("direct", "state"), ("x0", "log_evidence")])
def test_float32_pyro_program_and_sampler_draw_identical_samples(name, parameterisation, inputs):
    """float32, as trained models are, over enough steps that any difference in the
    probabilities drawn from would show."""
    process = make_network_process(name, n=6, T=40, parameterisation=parameterisation, inputs=inputs).float()
    pyro.set_rng_seed(5)
    trace = poutine.trace(process).get_trace(num_sequences=200)
    samples = process.sample(200, seed=5)
    assert samples.dtype == torch.float32
    assert torch.equal(trace.nodes["x_0"]["value"], samples)
    with torch.no_grad():
        site = process.step_dist(trace.nodes["x_7"]["value"], 7)  # one step alone: the same numbers
    assert torch.equal(site.probs, process.step_plan().probs(trace.nodes["x_7"]["value"], 7))


@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
def test_drawing_block_by_block_is_drawing_the_whole_batch(monkeypatch, parameterisation):
    """The plan computes large batches in blocks of sequences and the sampler draws block by
    block: the Pyro program, drawing the whole batch at once, draws the same samples."""
    monkeypatch.setattr(BinaryStepPlan, "rows_per_block", 48)
    process = make_network_process("mlp", n=6, T=30, parameterisation=parameterisation, inputs="evidence").float()
    pyro.set_rng_seed(8)
    trace = poutine.trace(process).get_trace(num_sequences=200)  # 4 full blocks and a part
    assert torch.equal(trace.nodes["x_0"]["value"], process.sample(200, seed=8))
    x_t = trace.nodes["x_9"]["value"]
    with torch.no_grad():
        blocks = torch.cat([process.step_plan()._step(block, 9, scoring=True)[0] for block in x_t.split(48)])
        assert torch.equal(process.step_plan().logits(x_t, 9), blocks)


def test_samples_and_plans_of_a_float64_model_stay_float64():
    process = make_process(n=3, T=6, inputs="evidence")
    assert process.sample(5, seed=0).dtype == torch.float64
    assert process.sample(5, seed=0, steps=3).dtype == torch.float64
    assert process.step_plan().probs(torch.zeros(2, 3, dtype=torch.float64), 4).dtype == torch.float64


@pytest.mark.parametrize("name", ["mlp", "resmlp"])
def test_a_plan_after_an_optimiser_step_reads_the_new_weights(name):
    """Training changes the weights; the tables of the next sampling call (the time terms of
    the network among them) must come from the new ones."""
    process = make_network_process(name, n=6, T=8, inputs="evidence", film=True).float()
    x_t = (torch.rand(64, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    with torch.no_grad():
        before = [process.step_plan().probs(x_t, t) for t in range(2, 9)]
    pyro.clear_param_store()
    svi = SVI(process, functools.partial(forward_chain, process.kernel), pyro.optim.Adam({"lr": 0.05}),
              loss=AnalyticLoss(process.T))
    svi.step((torch.rand(32, 6) < 0.3).float())
    with torch.no_grad():
        for t, old in zip(range(2, 9), before):
            new = process.step_plan().probs(x_t, t)
            assert not torch.allclose(new, old, atol=1e-4), t
            assert torch.allclose(new, torch.sigmoid(process.logits(x_t, t)), atol=2e-6), t
    pyro.set_rng_seed(2)
    trace = poutine.trace(process).get_trace(num_sequences=50)
    assert torch.equal(trace.nodes["x_0"]["value"], process.sample(50, seed=2))
