"""Exact cross-check: the analytic ELBO against Pyro's TraceEnum_ELBO, the exact likelihood,
Trace_ELBO and importance sampling (bdiff_pyro/enumerate.py).  float64 throughout."""

import functools
import itertools
import math

import pyro
import pytest
import torch

from bdiff_pyro.diffusion import bound
from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.errors import UserError
from bdiff_pyro.networks.mlp import MLP
from bdiff_pyro.programs import enumeration
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.programs.sites import state_dist


def make_process(n, T, schedule="cosine", pi_1=0.5, parameterisation="x0", seed=0, sharpness=3.0):
    """A random float64 reverse process.  The output layer is scaled up so that the reverse
    probabilities vary strongly with x^t (a near-constant network would hide coupling)."""
    torch.manual_seed(seed)
    kernel = BernoulliKernel(make_beta_tilde(schedule, T), pi_1=pi_1)
    net = MLP(n, 2, hidden=(16, 16), activation="tanh", time_embedding=8)
    with torch.no_grad():
        net.out.weight.mul_(sharpness)
        net.out.bias.normal_()
    return ReverseProcess(kernel, net, parameterisation).double()


GRID = [
    dict(n=n, T=T, schedule=schedule, pi_1=pi_1, parameterisation=par, seed=seed)
    for seed, (n, T, schedule, pi_1, par) in enumerate(itertools.product(
        range(1, 5), range(2, 6), ("cosine", "paper"), (0.5, 0.2), ("x0", "direct")))
]


def case_id(case):
    return "n{n}-T{T}-{schedule}-pi{pi_1}-{parameterisation}-seed{seed}".format(**case)


@functools.lru_cache(maxsize=None)
def results(n, T, schedule, pi_1, parameterisation, seed):
    """Every exact value for every x^0 in {0,1}^n, computed once per case."""
    process = make_process(n, T, schedule, pi_1, parameterisation, seed)
    x0 = bound.all_states(n)
    with torch.no_grad():
        analytic = bound.elbo_exact(process.kernel, process.log_probs, x0)
    return dict(
        analytic=analytic,
        pi_correction=bound.pi_correction(process.kernel, x0),
        traceenum=enumeration.enumerated_elbo(process, x0),
        log_likelihood=enumeration.exact_log_likelihood(process, x0),
    )


# ---------------------------------------------------------------------------------------
# 1. The analytic ELBO equals Pyro's TraceEnum_ELBO


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_analytic_elbo_equals_traceenum_elbo(case):
    r = results(**case)
    relative = ((r["analytic"] - r["traceenum"]).abs() / r["analytic"].abs()).max()
    assert relative < 1e-8, f"max relative difference {float(relative):.3g}"
    if case["pi_1"] == 0.5:  # K is the ELBO exactly (docs/math.md §2.3)
        assert r["pi_correction"].abs().max() < 1e-12


# ---------------------------------------------------------------------------------------
# 2. The exact likelihood


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_exact_likelihood_is_normalised_and_bounds_the_elbo(case):
    r = results(**case)
    total = r["log_likelihood"].exp().sum()
    assert abs(float(total) - 1.0) < 1e-10
    gap = r["log_likelihood"] - r["traceenum"]
    assert gap.min() >= -1e-10, f"log p(x0) below the ELBO by {-float(gap.min()):.3g}"


def brute_force_log_likelihood(process, x0):
    """log p(x^0) = log sum over every trajectory x^{1:T} of p(x^{0:T}), from log_probs."""
    n, T, kernel = x0.shape[-1], process.T, process.kernel
    states = bound.all_states(n)
    values = []
    for row in x0:
        terms = []
        for path in itertools.product(range(len(states)), repeat=T):  # path[t-1] = x^t
            x = [row] + [states[s] for s in path]
            log_p = bound.log_prob_of(kernel.log_pi, x[T].long()).sum()
            for t in range(T, 0, -1):
                log_p = log_p + bound.log_prob_of(process.log_probs(x[t], t), x[t - 1]).sum()
            terms.append(log_p)
        values.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(values)


@pytest.mark.parametrize("n,T,pi_1,parameterisation", [(2, 3, 0.2, "x0"), (2, 2, 0.5, "direct"),
                                                       (3, 2, 0.2, "direct")])
def test_exact_likelihood_equals_brute_force_sum_over_trajectories(n, T, pi_1, parameterisation):
    process = make_process(n, T, "paper", pi_1, parameterisation, seed=7)
    x0 = bound.all_states(n)
    with torch.no_grad():
        expected = brute_force_log_likelihood(process, x0)
    assert torch.allclose(enumeration.exact_log_likelihood(process, x0), expected, rtol=0, atol=1e-10)


def test_exact_likelihood_refuses_long_sequences_with_a_clear_message():
    process = make_process(13, 2)
    with pytest.raises(UserError) as info:
        enumeration.exact_log_likelihood(process, torch.zeros(1, 13, dtype=torch.float64))
    message = str(info.value)
    assert "\n" not in message and "2^13 = 8192 states" in message
    # n = 12 is accepted (4096 states): the limit is the one the message states
    enumeration.check_enumerable(12)
    process = make_process(3, 2)
    for bad in (torch.zeros(2, 4), torch.full((2, 3), 2.0), torch.zeros(3)):
        with pytest.raises(UserError):
            enumeration.exact_log_likelihood(process, bad)


def test_exact_likelihood_handles_repeated_rows_and_batches():
    process = make_process(3, 3, "cosine", 0.2, "x0", seed=3)
    states = bound.all_states(3)
    x0 = states[torch.tensor([5, 1, 5, 7, 1])]
    together = enumeration.exact_log_likelihood(process, x0)
    alone = torch.stack([enumeration.exact_log_likelihood(process, row[None])[0] for row in x0])
    assert torch.allclose(together, alone, rtol=0, atol=1e-12)
    assert together[0] != together[1]


# ---------------------------------------------------------------------------------------
# The joint-state encoding


def test_joint_transition_is_the_kronecker_product_of_per_bit_matrices():
    kernel = BernoulliKernel(make_beta_tilde("cosine", 4), pi_1=0.2)
    n, t = 3, 2
    states = bound.all_states(n)
    joint = enumeration.joint_log_probs(kernel.q_step_log_probs(states, t)).exp()  # (S, S)
    Q = kernel.log_Q[t].exp()
    assert torch.allclose(joint, torch.kron(torch.kron(Q, Q), Q), rtol=0, atol=1e-14)
    codes = torch.arange(2**n)
    assert torch.equal(enumeration.decode(codes, n), states)
    assert torch.equal(enumeration.encode(states), codes)


def test_joint_guide_is_the_forward_chain():
    """The guide visits x^T first (time reversal); its log q equals forward_chain's on the
    same trajectories."""
    process = make_process(3, 4, "paper", 0.2, "direct", seed=11)
    pyro.set_rng_seed(0)
    x0 = bound.all_states(3)
    trajectories = enumeration.sample_trajectories(process, x0, 64)  # (64, 8, 3) per site

    def log_q(guide, data):
        trace = pyro.poutine.trace(pyro.poutine.condition(guide, data=data)).get_trace(x0)
        return sum(site["fn"].log_prob(site["value"]).reshape(64, 8, -1).sum(-1)
                   for name, site in trace.nodes.items() if site["type"] == "sample" and name != "sequences"
                   and name.startswith("x_"))

    per_bit = log_q(enumeration._vectorised(functools.partial(forward_chain, process.kernel), 64), trajectories)
    codes = {name: enumeration.encode(value) for name, value in trajectories.items()}

    def joint(x0_):
        with pyro.plate("trajectories", 64, dim=-2):
            return enumeration.joint_guide(process, x0_)

    assert torch.allclose(log_q(joint, codes), per_bit, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# 3. Monte Carlo: Trace_ELBO and importance sampling


@pytest.mark.parametrize("n,T,schedule,pi_1,parameterisation",
                         [(3, 4, "paper", 0.2, "x0"), (4, 5, "cosine", 0.5, "direct"),
                          (2, 3, "cosine", 0.2, "direct")])
def test_trace_elbo_within_four_standard_errors_of_the_exact_elbo(n, T, schedule, pi_1, parameterisation):
    process = make_process(n, T, schedule, pi_1, parameterisation, seed=5)
    x0 = bound.all_states(n)
    with torch.no_grad():
        exact = float(bound.elbo_exact(process.kernel, process.log_probs, x0).sum())
    pyro.set_rng_seed(1)
    mean, se = enumeration.trace_elbo_estimate(process, x0, num_particles=512, num_batches=16)
    assert se < 0.05 * abs(exact)  # the check has teeth
    assert abs(mean - exact) < 4 * se, f"{mean} vs {exact} (se {se})"


def test_vectorised_importance_weights_equal_pyro_importance():
    process = make_process(3, 4, "paper", 0.2, "x0", seed=2)
    row = bound.all_states(3)[5:6]
    pyro.set_rng_seed(0)
    sequential, trajectories = enumeration.importance_log_weights_sequential(process, row, 40)
    vectorised = enumeration.trajectory_log_weights(process, row, trajectories)[:, 0]
    assert sequential.std() > 0.1  # distinct trajectories, not one repeated
    assert torch.allclose(vectorised, sequential, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n,T,schedule,pi_1,parameterisation",
                         [(3, 4, "paper", 0.2, "x0"), (4, 3, "cosine", 0.5, "direct")])
def test_importance_sampling_between_elbo_and_likelihood_and_converging(n, T, schedule, pi_1,
                                                                         parameterisation):
    process = make_process(n, T, schedule, pi_1, parameterisation, seed=4)
    x0 = bound.all_states(n)
    with torch.no_grad():
        elbo = bound.elbo_exact(process.kernel, process.log_probs, x0)
    log_p = enumeration.exact_log_likelihood(process, x0)
    assert (log_p - elbo).min() > 0.05  # room between the two, so "between" means something
    pyro.set_rng_seed(0)
    # The mean log-weight is an unbiased ELBO estimate: the weights are the right ones.
    log_w = enumeration.importance_log_weights(process, x0, 8000)  # (S, B)
    se_w = log_w.std(0) / math.sqrt(log_w.shape[0])
    assert ((log_w.mean(0) - elbo).abs() < 4 * se_w).all()
    # Large S: between the ELBO and log p(x0) up to the standard error, and close to log p.
    estimate, se = enumeration.importance_log_likelihood(process, x0, num_samples=8000)
    assert (estimate > elbo - 4 * se).all() and (estimate < log_p + 4 * se).all()
    assert ((estimate - log_p).abs() < 4 * se + 1e-3).all()
    # The bias (log p - estimate), averaged over replicate estimates per x0, shrinks as
    # S grows: 2 trajectories, then 8, then 64.
    gaps, errors = [], []
    for S, R in [(2, 2000), (8, 500), (64, 60)]:
        lw = enumeration.importance_log_weights(process, x0, S * R).reshape(R, S, -1).transpose(1, 2)
        per_replicate = (torch.logsumexp(lw, -1) - math.log(S))  # (R, B)
        gap = log_p - per_replicate
        gaps.append(float(gap.mean()))
        errors.append(float(gap.mean(1).std() / math.sqrt(R)))
    for (g_small, e_small), (g_large, e_large) in zip(zip(gaps, errors), zip(gaps[1:], errors[1:])):
        assert g_small - g_large > 3 * math.hypot(e_small, e_large), (gaps, errors)
    assert gaps[0] > 0 and abs(gaps[-1]) < gaps[0] / 4


# ---------------------------------------------------------------------------------------
# The pitfalls: Bernoulli sites in a plate over bits, enumerated; and the guide's order


def naive_plate_model(process, x0):
    """process.forward with the slice broadcast to n dims before the network reads it: the
    natural repair when enumeration hands a (2, 1, 1) value to a network that wants n inputs.
    Identical to process.forward when sampled; wrong when enumerated."""
    kernel, n, T = process.kernel, x0.shape[-1], process.T
    with pyro.plate("sequences", x0.shape[0], dim=-2), pyro.plate("dims", n, dim=-1):
        x = pyro.sample(f"x_{T}", state_dist(kernel, kernel.prior_log_probs((x0.shape[0], n))))
        for t in pyro.markov(range(T, 0, -1)):
            x_in = x.expand(*x.shape[:-1], n)
            x = pyro.sample(f"x_{t - 1}", state_dist(kernel, process.log_probs(x_in, t)),
                            obs=x0 if t == 1 else None)
    return x


def plate_guide(kernel, x0):
    """The forward chain with Bernoulli sites in a plate over bits, visited x^T first like
    enumeration.joint_guide (the guide itself factorises over bits, so this part is right)."""
    n, T = x0.shape[-1], kernel.T
    with pyro.plate("sequences", x0.shape[0], dim=-2), pyro.plate("dims", n, dim=-1):
        x = pyro.sample(f"x_{T}", state_dist(kernel, kernel.q_marginal_log_probs(x0, T)),
                        infer={"enumerate": "parallel"})
        for t in pyro.markov(range(T, 1, -1)):
            x_in = x.expand(*x.shape[:-1], n)
            x = pyro.sample(f"x_{t - 1}", state_dist(kernel, kernel.q_posterior_log_probs(x_in, x0, t)),
                            infer={"enumerate": "parallel"})
    return x


def traceenum_per_sequence(model, guide, x0):
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=2)
    with torch.no_grad():
        return torch.tensor([-elbo.loss(model, guide, row[None]) for row in x0], dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_plate_enumeration_of_coupled_bits_is_wrong(n):
    process = make_process(n, 3, "cosine", 0.2, "direct", seed=9, sharpness=10.0)
    x0 = bound.all_states(n)
    with torch.no_grad():
        exact = bound.elbo_exact(process.kernel, process.log_probs, x0)
    model = functools.partial(naive_plate_model, process)
    naive = traceenum_per_sequence(model, functools.partial(plate_guide, process.kernel), x0)
    if n == 1:  # nothing to couple: the plate encoding is right
        assert torch.allclose(naive, exact, rtol=1e-10, atol=0)
        return
    assert (naive - exact).abs().max() > 0.1, "plate enumeration should disagree"
    # ... although the same program is right when sampled instead of enumerated
    pyro.set_rng_seed(0)
    elbo = pyro.infer.Trace_ELBO(num_particles=512, vectorize_particles=True, max_plate_nesting=2)
    with torch.no_grad():
        values = torch.tensor([-elbo.loss(model, functools.partial(forward_chain, process.kernel), x0)
                               for _ in range(16)], dtype=torch.float64)
    se = float(values.std() / 4)
    assert abs(float(values.mean()) - float(exact.sum())) < 4 * se


@pytest.mark.parametrize("T", [3, 4])
def test_enumerating_the_guide_in_forward_order_is_wrong_even_for_one_bit(T):
    """forward.forward_chain enumerated as the guide of process.forward: with guide-side
    enumeration a model site only knows the enumeration dims that existed when the guide
    sampled it, and pyro.markov recycles dims, so p(x^{t-1} | x^t) is read against the wrong
    slice.  No coupling here (n = 1): this is why enumeration.joint_guide visits x^T first."""
    process = make_process(1, T, "cosine", 0.2, "direct", seed=9)
    x0 = bound.all_states(1)
    with torch.no_grad():
        exact = bound.elbo_exact(process.kernel, process.log_probs, x0)
    guide = pyro.infer.config_enumerate(functools.partial(forward_chain, process.kernel), "parallel")
    forward_order = traceenum_per_sequence(process.forward, guide, x0)
    assert (forward_order - exact).abs().max() > 0.02
    reverse_order = traceenum_per_sequence(process.forward, functools.partial(plate_guide, process.kernel), x0)
    assert torch.allclose(reverse_order, exact, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------
# The comparison experiment (bdiff compare)


@pytest.mark.slow
def test_compare_config_is_valid_and_a_tiny_run_writes_everything_once(tmp_path):
    from pathlib import Path

    import yaml

    from bdiff_pyro.crosscheck import OUTPUT_FILES, compare_main, load_config

    shipped = Path(__file__).resolve().parents[2] / "experiments" / "crosscheck" / "compare.yaml"
    assert load_config(shipped).grid.schedules == ("cosine", "paper")
    tiny = yaml.safe_load(shipped.read_text())
    tiny.update(grid={"n": [3], "T": [3], "schedules": ["paper"]}, training={"steps": 3},
                estimators={"trace_elbo_particles": 16, "trace_elbo_batches": 2, "importance_samples": 64})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    paths = compare_main(config, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == set(OUTPUT_FILES)
    table = paths["table"].read_text()
    assert "| 3 | 3 | paper | random |" in table and "| 3 | 3 | paper | trained |" in table
    before = paths["csv"].read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        compare_main(config, tmp_path / "out")
    assert paths["csv"].read_bytes() == before
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {n: [2]}\n")
    with pytest.raises(UserError, match="data.period"):
        load_config(bad)
    bad.write_text("estimators: {samples: 3}\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) \['samples'\] in estimators"):
        load_config(bad)
    bad.write_text("scaling: 5\n")
    with pytest.raises(UserError, match="scaling must be a mapping"):
        load_config(bad)


def test_compare_grid_gives_the_same_numbers_for_the_same_seed():
    """The grid's seeds (cell i: seed + i, the network's weights, its training and the Monte
    Carlo draws) fix every number: values recorded from a run of the same config, float64."""
    from bdiff_pyro.crosscheck import CompareConfig, grid_rows

    config = CompareConfig.from_dict({
        "grid": {"n": [3], "T": [2, 3], "schedules": ["paper", "cosine"]}, "training": {"steps": 5},
        "estimators": {"trace_elbo_particles": 16, "trace_elbo_batches": 2, "importance_samples": 64}})
    rows = {(r["T"], r["schedule"], r["network"]): r for r in grid_rows(config)}
    recorded = {  # K_analytic, trace_elbo, log_p_exact, log_p_importance (bits per sequence)
        (2, "paper", "random"): (-3.021942058274234, -3.008839293298282, -3.019417236810338, -3.01136812068881),
        (2, "cosine", "trained"): (-2.884858221507057, -2.803068491489705, -2.8442321541013915,
                                   -2.8189809990409436),
        (3, "cosine", "trained"): (-3.138823709872812, -3.2848171439477833, -2.8257923558016276,
                                   -2.940938073918922),
    }
    assert len(rows) == 8
    for key, values in recorded.items():
        got = tuple(rows[key][name] for name in ("K_analytic", "trace_elbo", "log_p_exact", "log_p_importance"))
        assert got == pytest.approx(values, rel=1e-9, abs=1e-12), key
