"""Numerical edge cases of the kernels, the oracle and the samplers: float32 underflow, schedules
that reach beta~ = 1 early, states no pattern produces, kernels whose pi has zeros."""

import contextlib
import io
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import make_kernel_process

from bdiff_pyro.cli import main
from bdiff_pyro.diffusion.bound import all_states, elbo_exact
from bdiff_pyro.programs.sampling import ancestral_sample, jump_dist

ROOT = Path(__file__).resolve().parents[2]


def test_gaussian_kernel_bound_is_the_same_in_float32_and_float64():
    """K = 4, cosine, T = 200: q(x^t | x^0) reaches ~1e-45, where a mixture formed in float32
    probabilities underflows to 0 and the ELBO to -inf."""
    process = make_kernel_process(("gaussian", 4, None), n=2, T=200)
    process32 = make_kernel_process(("gaussian", 4, None), n=2, T=200).float()  # the same network
    x0 = all_states(2, 4)
    with torch.no_grad():
        reference = elbo_exact(process.kernel, process.log_probs, x0)
        single = elbo_exact(process32.kernel, process32.log_probs, x0.float())
    assert x0.shape == (16, 2) and torch.isfinite(reference).all()
    assert torch.isfinite(single).all(), single
    assert torch.allclose(single.double(), reference, rtol=1e-5, atol=0), (single, reference)


@pytest.mark.parametrize("kernel_class,states", [("bernoulli", 2), ("uniform", 3)])
def test_span_after_the_schedule_reaches_one_early(kernel_class, states):
    """beta~_2 = 1 < beta~_T: the closed-form s -> t transition equals the product of the steps
    (every step after s = 2 redraws from pi) instead of 0/0, and strided sampling across it works."""
    from helpers import random_process

    from bdiff_pyro.diffusion.kernels import BernoulliKernel, DiscreteKernel, UniformKernel

    beta_tilde = torch.tensor([0, 0.5, 1, 1, 1])
    kernel = BernoulliKernel(beta_tilde) if kernel_class == "bernoulli" else UniformKernel(beta_tilde, states)
    for t in range(1, kernel.T + 1):
        for s in range(t):
            product = DiscreteKernel.log_span(kernel, s, t).exp()
            assert torch.allclose(kernel.log_span(s, t).exp(), product, rtol=0, atol=1e-15), (s, t)
    redraw = kernel.pi.expand(states, states)
    assert torch.equal(kernel.log_span(2, 4).exp(), redraw)

    torch.manual_seed(0)
    process = random_process(kernel, 3, "x0", (8,), "state")
    assert process.stride_grid(2) == [(4, 2), (2, 0)]
    samples = process.sample(200, seed=0, steps=2)
    assert samples.shape == (200, 3) and set(samples.unique().tolist()) <= set(range(states))


def absorbing_oracle():
    from bdiff_pyro.diffusion.kernels import make_kernel
    from bdiff_pyro.diffusion.oracle import OracleReverse
    from bdiff_pyro.diffusion.schedules import make_beta_tilde

    kernel = make_kernel("absorbing", make_beta_tilde("cosine", 3), num_states=2).double()
    return OracleReverse(kernel, torch.tensor([[0, 1, 1], [1, 1, 0]]))


def test_oracle_step_where_no_pattern_produces_x_t():
    """x^t = (0, mask, 0) unmasks dimension 0 from the first pattern and dimension 2 from the
    second: no pattern produces it, but the factorised oracle reaches it (at t < T: beta~_T = 1
    masks everything).  Its step keeps the unmasked values and unmasks the middle dimension (1 in
    both patterns) with probability (beta~_t - beta~_{t-1}) / beta~_t, the absorbing posterior."""
    oracle = absorbing_oracle()
    beta_tilde = oracle.kernel.beta_tilde
    x_t = torch.tensor([[0, 2, 0]])
    for t in (1, 2):
        assert torch.isneginf(oracle.pattern_log_posterior(x_t, t)).all()
        unmask = float((beta_tilde[t] - beta_tilde[t - 1]) / beta_tilde[t])
        expected = torch.tensor([[[1, 0, 0], [0, unmask, 1 - unmask], [1, 0, 0]]], dtype=torch.float64)
        assert torch.allclose(oracle.log_probs(x_t, t).exp(), expected, rtol=0, atol=1e-15), t
        times = torch.full((1,), t)  # one time per sequence: the same step
        assert torch.allclose(oracle.log_probs(x_t, times).exp(), expected, rtol=0, atol=1e-15), t


def test_absorbing_oracle_step_is_a_distribution_that_keeps_unmasked_values():
    """Over all 3^3 states (some no pattern produces, some with a value no pattern has at that
    dimension) and every t: finite and normalised.  Where the oracle can get to (t < T, and
    dimension 1 is 1 in every pattern) an unmasked value stays."""
    oracle = absorbing_oracle()
    states = all_states(3, 3)
    for t in range(1, oracle.T + 1):
        log_probs = oracle.log_probs(states, t)
        assert not torch.isnan(log_probs).any() and not torch.isposinf(log_probs).any()
        assert torch.allclose(torch.logsumexp(log_probs, -1), torch.zeros(27, 3, dtype=torch.float64), atol=1e-14)
        if t == oracle.T:
            continue
        reachable = torch.ones_like(states, dtype=torch.bool)
        reachable[:, 1] = states[:, 1] != 0
        unmasked = (states != 2) & reachable
        stay = log_probs.gather(-1, states.long().unsqueeze(-1)).squeeze(-1).exp()
        assert torch.allclose(stay[unmasked], torch.ones_like(stay[unmasked]), rtol=0, atol=1e-15), t


def test_absorbing_oracle_samples():
    samples = ancestral_sample(absorbing_oracle(), 1000, generator=0)
    assert samples.shape == (1000, 3) and set(samples.unique().tolist()) <= {0, 1}


def strict_json(text):
    """json.loads that refuses NaN and Infinity (Python's accepts them; JSON has neither)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_papers_K_is_null_where_pi_has_zeros():
    """The absorbing kernel's pi is a point mass on the mask state: log pi(x^0) = -inf, so the
    paper's K (ELBO minus the pi correction) is undefined; the reports say so instead of NaN."""
    from bdiff_pyro.diffusion.bound import pi_correction, pi_correction_undefined
    from bdiff_pyro.diffusion.oracle import oracle_report
    from bdiff_pyro.evaluation import bound_report

    for case in [("bernoulli", 2, 0.2), ("uniform", 3, None), ("gaussian", 3, None)]:
        assert pi_correction_undefined(make_kernel_process(case).kernel) is None
    process = make_kernel_process(("absorbing", 2, None), n=3, T=3)
    x0 = torch.tensor([[0.0, 1, 1], [1, 1, 0]])
    assert "pi has zeros" in pi_correction_undefined(process.kernel)
    with pytest.raises(ValueError, match="K is undefined"):
        pi_correction(process.kernel, x0)

    with torch.no_grad():
        reports = [bound_report(process, x0, replicates=2), oracle_report(process.kernel, x0)]
    for report in reports:
        assert report["K_bits"] is None and "pi has zeros" in report["K_undefined"]
        assert math.isfinite(report["elbo_bits"])
        assert strict_json(json.dumps(report))["K_bits"] is None


@pytest.mark.slow
def test_metrics_and_diagnostics_of_an_absorbing_run(tmp_path):
    """metrics.json is valid JSON with K_bits null; the diagnostics file says why it has no
    pi correction."""
    import xarray as xr

    from bdiff_pyro.config import load_config
    from bdiff_pyro.diagnostics import diagnose
    from bdiff_pyro.train import train

    config = load_config(ROOT / "experiments/configs/kernel_heartbeat.yaml", [
        "model.kernel=absorbing", "model.T=6", "model.hidden=[16]", "train.steps=20", "train.eval_every=20",
        "train.checkpoint_every=20", "train.eval_samples=50", "evaluate.num_samples=100", "evaluate.replicates=2"])
    train(config, tmp_path, progress=False, log=lambda *_: None)
    metrics = strict_json((tmp_path / "metrics.json").read_text())
    for part in ("train", "held_out"):
        assert metrics[part]["K_bits"] is None and "pi has zeros" in metrics[part]["K_undefined"]
        assert math.isfinite(metrics[part]["elbo_bits"])

    data = tmp_path / "two.txt"
    data.write_text("10000100001000010000\n01000010000100001000\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["evaluate", str(tmp_path), str(data), "--replicates", "2", "--json"]) == 0
    printed, as_json = out.getvalue().strip().splitlines()
    assert "the paper's K is undefined" in printed and strict_json(as_json)["K_bits"] is None

    result = diagnose(tmp_path, chains=2, draws=10, progress=False, plots=False, log=lambda *_: None)
    with xr.open_datatree(result["files"]["datatree"]) as tree:
        assert "pi_correction_bits" not in tree.attrs and "pi has zeros" in tree.attrs["paper_K_undefined"]


@pytest.mark.slow
def test_oracle_command_for_a_kernel_without_pi_1():
    """The absorbing kernel has K = 3 states (no pi_1): the report prints without it, its
    samples are drawn, and --json is valid JSON with the paper's K null."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        config = str(ROOT / "experiments/configs/kernel_heartbeat.yaml")
        code = main(["oracle", config, "--set", "model.kernel=absorbing",
                     "--set", "model.T=20", "--samples", "100", "--json"])
    assert code == 0
    summary, drawn, as_json = out.getvalue().strip().splitlines()
    assert summary.startswith("oracle ELBO = ") and "schedule cosine; data log-likelihood" in summary
    assert "pi_1" not in summary
    assert drawn.startswith("of 100 oracle samples (seed 0): ")
    report = strict_json(as_json)
    assert report["pi_1"] is None and report["K_bits"] is None and report["samples"]["num"] == 100


def distribution_of_x0(process, jumps, jump_dist):
    """The exact distribution of x^0 over all K^n states: pi pushed through each jump's
    transition matrix P[x, y] = prod_i p(y_i | x), the distributions the sampler draws from."""
    K = process.kernel.num_states
    states = all_states(process.n, K)
    distribution = process.kernel.prior_log_probs((len(states), process.n)).gather(
        -1, states.long().unsqueeze(-1)).squeeze(-1).sum(-1).exp()  # pi(x^T)
    for t, s in jumps:
        draws = jump_dist(states if K == 2 else states.long(), t, s)
        values = states.unsqueeze(1) if K == 2 else states.long().unsqueeze(1)
        transition = draws.log_prob(values).sum(-1).exp().T  # (x, y)
        distribution = distribution @ transition
    return distribution


@pytest.mark.parametrize("case", [("bernoulli", 2, 0.5), ("bernoulli", 2, 0.2), ("uniform", 3, None),
                                  ("absorbing", 2, None), ("gaussian", 3, None)], ids=lambda c: f"{c[0]}{c[1]}")
@pytest.mark.parametrize("T", [3, 4])
def test_strided_sampler_with_every_step_is_the_model(case, T):
    """sample(steps=T) has exactly the distribution of sample() (every reverse step, ending with
    the kernel's edge step), computed over all states; and under one seed the same draws."""
    process = make_kernel_process(case, n=2, T=T, seed=3)
    with torch.no_grad():
        model = distribution_of_x0(process, [(t, t - 1) for t in range(T, 0, -1)],
                                   lambda x, t, s: process.step_dist(x, t))  # the Pyro program's site
        grid = process.stride_grid(T)
        strided = distribution_of_x0(process, grid, partial(jump_dist, process))
    assert grid == [(t, t - 1) for t in range(T, 0, -1)]
    assert float(model.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((model - strided).abs().sum()) / 2 < 1e-12
    assert torch.equal(process.sample(300, seed=1, steps=T), process.sample(300, seed=1))


def test_strided_sampler_ends_with_the_edge_step():
    """T = 4, 3 steps: the grid 4 -> 3 -> 1 -> 0 ends with a one-step jump, the kernel's closed-form
    p(x^0 | x^1), not the network's prediction of x^0 at t = 1 (which nothing trains)."""
    process = make_kernel_process(("bernoulli", 2, 0.2), n=2, T=4, seed=3)
    assert process.stride_grid(3) == [(4, 3), (3, 1), (1, 0)]
    x1 = all_states(2)
    edge = jump_dist(process, x1, 1, 0)
    pi_1, keep = 0.2, 1 - float(process.kernel.beta_tilde[1])
    # p(x^0 = 1 | x^1) = q(x^1 | x^0 = 1) pi_1 / pi(x^1), with q(x^1 = 1 | x^0) = x^0 keep + (1 - keep) pi_1
    q_given_1 = x1 * (keep + (1 - keep) * pi_1) + (1 - x1) * (1 - keep) * (1 - pi_1)
    expected = q_given_1 * pi_1 / (x1 * pi_1 + (1 - x1) * (1 - pi_1))
    assert torch.allclose(edge.probs, expected, rtol=1e-12, atol=0)
