"""model.members: an ensemble's reverse step is the uniform mixture of its members' steps, each
member trained on its own bound.  References are the members built as processes of their own;
float64 throughout."""

import copy
import math

import pytest
import torch
from helpers import bdiff, make_network_process

import bdiff_pyro
from bdiff_pyro.diffusion.bound import all_states, elbo_exact, negative_elbo_estimate
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.train import AnalyticLoss

CASES = [(("bernoulli", 2, 0.3), "x0", "evidence"), (("bernoulli", 2, 0.3), "direct", "state"),
         (("uniform", 3, None), "x0", "state"), (("absorbing", 2, None), "direct", "evidence")]
IDS = ["bits-x0", "bits-direct", "uniform3-x0", "absorbing-direct"]


def ensemble_and_members(case, parameterisation, inputs, members=3, n=3, T=4):
    ensemble = make_network_process("mlp", n=n, T=T, case=case, parameterisation=parameterisation, inputs=inputs,
                                    members=members, seed=5)
    singles = [ReverseProcess(ensemble.kernel, copy.deepcopy(net), parameterisation, inputs).double()
               for net in ensemble.net.nets]
    return ensemble, singles


@pytest.mark.parametrize("case,parameterisation,inputs", CASES, ids=IDS)
def test_the_step_is_the_mean_of_the_members_steps(case, parameterisation, inputs):
    ensemble, singles = ensemble_and_members(case, parameterisation, inputs)
    x_t = all_states(3, ensemble.kernel.num_states)
    with torch.no_grad():
        for t in range(1, ensemble.T + 1):
            mean = torch.stack([single.log_probs(x_t, t).exp() for single in singles]).mean(0)
            assert torch.allclose(ensemble.log_probs(x_t, t).exp(), mean, rtol=1e-12, atol=1e-14), t
            with ensemble.members_apart():
                apart = ensemble.log_probs(x_t, t)
            assert torch.allclose(apart, torch.stack([single.log_probs(x_t, t) for single in singles]),
                                  rtol=1e-12, atol=1e-12)


def test_the_mixtures_bound_is_at_least_the_members_mean_and_not_any_members():
    ensemble, singles = ensemble_and_members(("bernoulli", 2, 0.3), "x0", "evidence")
    x0 = all_states(3)
    with torch.no_grad():
        mixed = elbo_exact(ensemble.kernel, ensemble.log_probs, x0)
        each = torch.stack([elbo_exact(s.kernel, s.log_probs, x0) for s in singles])
    assert torch.all(mixed >= each.mean(0) - 1e-12)
    assert not torch.allclose(mixed, each[0])


def test_training_loss_is_the_mean_of_the_members_losses_on_the_same_draws():
    ensemble, singles = ensemble_and_members(("bernoulli", 2, 0.3), "x0", "evidence")
    x0 = (torch.rand(16, 3, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    torch.manual_seed(7)
    loss = AnalyticLoss(ensemble.T)(ensemble, None, x0)
    expected = []
    for single in singles:
        torch.manual_seed(7)
        expected.append(negative_elbo_estimate(single.kernel, single.log_probs, x0)[0].mean())
    assert loss.detach().item() == pytest.approx(torch.stack(expected).mean().detach().item(), rel=1e-12)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ensemble.parameters())


def test_hybrid_loss_is_the_mean_of_the_members_hybrid_losses():
    ensemble, singles = ensemble_and_members(("bernoulli", 2, 0.3), "x0", "evidence")
    x0 = (torch.rand(16, 3, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    torch.manual_seed(3)
    loss = AnalyticLoss(ensemble.T, x0_loss_weight=0.5)(ensemble, None, x0).detach().item()
    expected = []
    for single in singles:
        torch.manual_seed(3)
        expected.append(AnalyticLoss(single.T, x0_loss_weight=0.5)(single, None, x0).detach().item())
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_mixing_bernoulli_logits_in_log_space_stays_finite_where_probabilities_round():
    from bdiff_pyro.diffusion.steps import mean_of_bernoullis_logit
    logits = torch.tensor([[-800.0, 40.0], [-790.0, 60.0]], dtype=torch.float64)
    mixed = mean_of_bernoullis_logit(logits, 0)
    assert torch.isfinite(mixed).all()
    # both probabilities below 1e-340: the log of their mean, log((e^-800 + e^-790) / 2)
    assert float(mixed[0]) == pytest.approx(-790.0 + math.log1p(math.exp(-10)) - math.log(2), abs=1e-9)
    assert float(mixed[1]) == pytest.approx(-math.log(0.5 * (math.exp(-40) + math.exp(-60))), rel=1e-12)


@pytest.mark.slow  # an end-to-end run of the bdiff command
def test_members_key_trains_saves_and_loads_an_ensemble(tmp_path):
    out = tmp_path / "run"
    result = bdiff("train", "experiments/configs/heartbeat.yaml", "--out", out, "--quiet", "--set", "model.members=2",
                   "--set", "model.T=6", "--set", "model.hidden=[16]", "--set", "train.steps=20",
                   "--set", "train.eval_every=10", "--set", "evaluate.num_samples=50")
    assert result.returncode == 0, result.stderr
    process = bdiff_pyro.load(out)
    assert process.num_members == 2
    first, second = process.net.nets
    assert not torch.equal(first.state_in.weight, second.state_in.weight)  # initialised apart
    assert process.sample(8, seed=1).shape == (8, process.n)
    assert "model.members must be >= 1" in bdiff("train", "experiments/configs/heartbeat.yaml",
                                                 "--set", "model.members=0").stderr
