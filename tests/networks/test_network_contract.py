"""What every registered network must pass behind ReverseProcess: the exact cross-check
against Pyro's TraceEnum_ELBO, identical samples from the Pyro program and the sampler, both
parameterisations, the binary fast path against the generic K-state path, and training under
SVI.  Then the symmetries each structured network promises.  float64 throughout."""

from functools import partial

import pyro
import pyro.optim
import pytest
import torch
from helpers import make_network_process
from pyro import poutine
from pyro.infer import SVI

from bdiff_pyro import registry
from bdiff_pyro.diffusion.bound import all_states, elbo_exact
from bdiff_pyro.diffusion.steps import edge_or_step
from bdiff_pyro.programs.enumeration import enumerated_elbo, exact_log_likelihood
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.train import AnalyticLoss

NETWORKS = sorted(registry.NETWORKS)
#: every registered network, and ensembles (model.members) of one with a time table and one without
CASES = NETWORKS + ["mlp x 2", "conv1d x 2"]


def build(name, **kwargs):
    """make_network_process for a registered network or an ensemble "NAME x M"."""
    name, _, members = name.partition(" x ")
    return make_network_process(name, members=int(members or 1), **kwargs)


def test_every_structured_network_is_registered():
    assert {"mlp", "conv1d", "conv2d", "transformer"} <= set(NETWORKS)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("case,n,T,inputs", [(("bernoulli", 2, 0.2), 3, 3, "state"),
                                             (("bernoulli", 2, 0.5), 4, 2, "evidence"),
                                             (("uniform", 3, None), 2, 3, "state"),
                                             (("absorbing", 2, None), 2, 3, "evidence")],
                         ids=["bits-pi0.2", "bits-evidence", "uniform3", "absorbing2"])
def test_analytic_bound_equals_trace_enum(name, parameterisation, case, n, T, inputs):
    process = build(name, n=n, T=T, case=case, parameterisation=parameterisation, inputs=inputs,
                                   seed=n + T)
    x0 = all_states(n, case[1])
    with torch.no_grad():
        analytic = elbo_exact(process.kernel, process.log_probs, x0)
    enumerated = enumerated_elbo(process, x0)
    assert torch.allclose(analytic, enumerated, rtol=1e-8, atol=0), (analytic - enumerated).abs().max()
    log_likelihood = exact_log_likelihood(process, x0)
    assert abs(float(torch.logsumexp(log_likelihood, 0))) < 1e-10
    assert torch.all(log_likelihood >= analytic - 1e-12)
    assert analytic.max() - analytic.min() > 1e-3  # the network makes the sequences differ


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("inputs", ["state", "evidence"])
def test_pyro_program_and_sampler_draw_identical_samples(name, parameterisation, inputs):
    process = build(name, n=6, T=5, parameterisation=parameterisation, inputs=inputs)
    pyro.set_rng_seed(11)
    trace = poutine.trace(process).get_trace(num_sequences=64)
    samples = process.sample(64, seed=11)
    assert torch.equal(trace.nodes["x_0"]["value"], samples)
    assert not torch.equal(process.sample(64, seed=12), samples)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("parameterisation", ["x0", "direct"])
@pytest.mark.parametrize("inputs,film", [("state", False), ("evidence", True), ("log_evidence", False)])
def test_binary_fast_path_equals_the_generic_path(name, parameterisation, inputs, film):
    process = build(name, n=4, T=5, case=("bernoulli", 2, 0.2), parameterisation=parameterisation,
                                   inputs=inputs, film=film)
    x_t = all_states(4)
    with torch.no_grad():
        for t in range(1, process.T + 1):
            generic = edge_or_step(process._edge_log_probs, process._step_log_probs, x_t, t)
            assert torch.allclose(process.log_probs(x_t, t), generic, rtol=1e-12, atol=1e-12), t
        t = torch.arange(len(x_t)) % process.T + 1  # one time per sequence, edge rows included
        generic = edge_or_step(process._edge_log_probs, process._step_log_probs, x_t, t)
        assert torch.allclose(process.log_probs(x_t, t), generic, rtol=1e-12, atol=1e-12)
        one_at_a_time = torch.stack([process.log_probs(x_t[i:i + 1], int(t[i]))[0] for i in range(len(x_t))])
        assert torch.allclose(process.log_probs(x_t, t), one_at_a_time, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("film", [False, True])
def test_one_svi_step_trains_every_parameter(name, film):
    """Every layer goes through pyro.param (to_pyro_module_) and gets a gradient."""
    process = build(name, n=6, T=6, film=film).float()
    before = {key: p.detach().clone() for key, p in process.named_parameters()}
    assert before, "no parameters"
    svi = SVI(process, partial(forward_chain, process.kernel), pyro.optim.Adam({"lr": 1e-2}),
              loss=AnalyticLoss(process.T))
    svi.step((torch.rand(32, 6) < 0.3).float())
    for key, p in process.named_parameters():
        assert not torch.equal(before[key], p.detach()), f"{key} was not trained"
    assert set(pyro.get_param_store().keys()) == {f"net.{key}" if not key.startswith("net.") else key
                                                   for key in before}


# ---------------------------------------------------------------------------------------
# Symmetries


def net_output(process, x, t):
    return process.net(x.unsqueeze(-1), t)[..., 0]


@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("shift", [1, 3, 7])
def test_circular_conv1d_commutes_with_shifts(film, shift):
    process = make_network_process("conv1d", n=12, T=5, film=film, blocks=2, padding="circular")
    x = (torch.rand(16, 12, dtype=torch.float64) < 0.4).double()
    t = torch.randint(1, 6, (16,))
    with torch.no_grad():
        for time in (3, t):
            shifted = net_output(process, x.roll(shift, -1), time)
            assert torch.allclose(shifted, net_output(process, x, time).roll(shift, -1), rtol=0, atol=1e-12)
        # the whole reverse step too
        assert torch.allclose(process.log_probs(x.roll(shift, -1), 4), process.log_probs(x, 4).roll(shift, -2),
                              rtol=0, atol=1e-12)


def test_zero_padded_conv1d_is_not_shift_equivariant():
    """The check above can fail: with zeros past the ends, the edges are special."""
    process = make_network_process("conv1d", n=12, T=5, blocks=2, padding="zeros")
    x = (torch.rand(16, 12) < 0.4).double()
    with torch.no_grad():
        difference = net_output(process, x.roll(1, -1), 3) - net_output(process, x, 3).roll(1, -1)
    assert difference.abs().max() > 1e-3


@pytest.mark.parametrize("position_code,equivariant", [("none", True), ("learned", False), ("sinusoidal", False)])
def test_transformer_without_position_codes_commutes_with_permutations(position_code, equivariant):
    process = make_network_process("transformer", n=7, T=5, position_code=position_code, blocks=2)
    x = (torch.rand(16, 7) < 0.5).double()
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        permuted = net_output(process, x[:, permutation], 4)
        expected = net_output(process, x, 4)[:, permutation]
    if equivariant:
        assert torch.allclose(permuted, expected, rtol=0, atol=1e-12)
    else:
        assert (permuted - expected).abs().max() > 1e-3


def test_conv2d_neighbours_are_pixels_of_the_image_grid():
    """One 3 x 3 convolution and a 1 x 1 read-out (its image-wide normalisation removed):
    flipping pixel (0, 0) of an 8 x 8 image changes exactly its 2-D neighbours (0, 1), (1, 0)
    and (1, 1), not (0, 2) (2 positions away in the sequence) nor (7, 7) (its 1-D neighbour
    under circular padding)."""
    process = make_network_process("conv2d", n=64, T=5, blocks=0, image_shape=(8, 8), padding="zeros")
    process.net.norm_out = torch.nn.Identity()
    x = (torch.rand(3, 64) < 0.5).double()
    x[:, 0] = 0.0
    flipped = x.clone()
    flipped[:, 0] = 1.0
    with torch.no_grad():
        changed = (net_output(process, flipped, 2) - net_output(process, x, 2)).abs() > 1e-12
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(changed, expected.flatten().expand(3, 64))


@pytest.mark.parametrize("name", CASES)
def test_evaluation_and_batched_sampling_run_on_every_network(name):
    """The chunk sizes of evaluation and sampling read the network's activation_widths."""
    from bdiff_pyro.evaluation import bound_report
    from bdiff_pyro.memory import sample_in_batches
    process = build(name, n=4, T=4).float()
    assert all(isinstance(w, int) and w > 0 for w in process.net.activation_widths)
    report = bound_report(process, all_states(4).float(), replicates=2, seed=0)
    assert report["distinct_scored"] == 16 and report["elbo_bits"] < 0
    batched = sample_in_batches(process, 10, seed=3, batch=4)
    assert torch.equal(batched[:4], process.sample(4, seed=3))


@pytest.mark.parametrize("name", CASES)
def test_dropout_acts_only_while_training(name):
    """model.dropout reaches every network: two training-mode calls differ,
    evaluation-mode calls and dropout 0 do not."""
    x = (torch.rand(8, 16) < 0.4).double()
    dropped = build(name, n=16, T=5, dropout=0.5).train()
    assert not torch.equal(net_output(dropped, x, 3), net_output(dropped, x, 3))
    dropped.eval()
    assert torch.equal(net_output(dropped, x, 3), net_output(dropped, x, 3))
    kept = build(name, n=16, T=5, dropout=0.0).train()
    assert torch.equal(net_output(kept, x, 3), net_output(kept, x, 3))
