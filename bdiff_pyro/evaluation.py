"""What a trained model is judged by: the bound on data (bits/seq with a standard error)
and where its samples fall (training set, held-out set, neither)."""

import math

import torch
from tqdm.auto import tqdm

from bdiff_pyro.config import model_spec
from bdiff_pyro.diffusion.bound import elbo_replicates, first_stochastic_step, papers_K_fields
from bdiff_pyro.diffusion.oracle import OracleReverse, oracle_report, step_gaps
from bdiff_pyro.errors import UserError
from bdiff_pyro.memory import network_widths, rows_per_chunk
from bdiff_pyro.programs.reverse import kernel_from_spec
from bdiff_pyro.programs.sampling import ancestral_sample
from bdiff_pyro.util.stats import LN2, mean_and_standard_error


def bound_report(process, x0, replicates=8, seed=0, distinct=False, max_sequences=None, progress=False):
    """The ELBO (and the paper's K, None where undefined: ``bound.papers_K_fields``) averaged
    over the sequences x0, in bits/seq, with their Monte Carlo standard error (stratified over
    t, ``replicates`` estimates per sequence).

    With ``distinct``, each distinct sequence is scored once and weighted by its count: the
    same average for a data set with repeats (heartbeat: 5 patterns), at a fraction of the cost.

    With ``max_sequences`` and more sequences than that, the average is taken over a seeded
    uniform subsample of ``max_sequences`` of them (without replacement) and the standard
    error also counts the subsampling: se^2 = s^2 / m + se_MC^2, s^2 the sample variance of
    the m per-sequence estimates (a slight overestimate: it also holds their Monte Carlo noise).

    The rows are evaluated in chunks of bounded memory (``memory.rows_per_chunk``);
    ``progress``, if a string, labels a progress bar over the replicates.
    """
    x0 = x0.to(process.kernel.log_pi.device)
    total = len(x0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        subsampled = max_sequences is not None and total > max_sequences
        if subsampled:
            x0 = x0[torch.randperm(total)[:max_sequences].to(x0.device)]
        weights, inverse = None, None
        if distinct or subsampled:
            x0, inverse, counts = torch.unique(x0, dim=0, return_inverse=True, return_counts=True)
            weights = counts / counts.sum()
        estimates = _replicates_in_chunks(process, x0, replicates, progress)
    elbo, se = mean_and_standard_error(estimates, weights)
    if subsampled:
        per_sequence = estimates.mean(1)[inverse]
        se = math.sqrt(float(per_sequence.var()) / len(per_sequence) + se ** 2)
    return {"elbo_bits": elbo / LN2, **papers_K_fields(process.kernel, x0, elbo / LN2, weights), "se_bits": se / LN2,
            "sequences": total, "distinct_scored": len(x0), "replicates": replicates,
            "subsample": max_sequences if subsampled else None}


def _replicates_in_chunks(process, x0, replicates, progress=False):
    """``bound.elbo_replicates`` (N, R), a few replicates per call so that one call's rows
    fit in one chunk (at least one replicate per call; elbo_replicates chunks its rows too)."""
    kernel = process.kernel
    rows = rows_per_chunk(process.n, kernel.num_states, network_widths(process))
    steps = kernel.T + 1 - first_stochastic_step(kernel)
    per_call = max(1, rows // (steps * len(x0)))
    blocks = []
    with tqdm(total=replicates, disable=not progress, desc=progress or None, unit="replicate", leave=False) as bar:
        for start in range(0, replicates, per_call):
            count = min(per_call, replicates - start)
            blocks.append(elbo_replicates(kernel, process.log_probs, x0, count, max_rows=rows))
            bar.update(count)
    return torch.cat(blocks, dim=1)


#: trajectory-rows x T x n numbers the importance-weighted bound traces at once (a few copies of
#: this many float32 numbers live in one Pyro trace: about 130 MB each)
IMPORTANCE_ELEMENTS = 2 ** 25


def importance_weighted_report(process, x0, num_samples, seed=0, max_elements=IMPORTANCE_ELEMENTS):
    """The importance-weighted bound (docs/math.md §5; Burda et al. 2016) averaged over the rows of x0,
    the forward chain as proposal:

        L_S(x^0) = log (1/S) sum_s p(x^{0:T}_s) / q(x^{1:T}_s | x^0),   x^{1:T}_s ~ q(. | x^0),

    a lower bound on log p(x^0) in expectation for every S, increasing with S; S = 1 is the
    ELBO (``programs.enumeration.importance_log_likelihood`` per row).  Each distinct row is
    scored once, weighted by its count; the trajectories are drawn in blocks of rows and
    trajectories of at most ``max_elements`` rows x T x n numbers, from ``seed``.

    Returns nats and bits per sequence, ``se_*``: the standard error over sequences (the
    baselines' and the published tables' error bar; it includes the Monte Carlo error),
    ``mc_se_nats``: the Monte Carlo part alone (delta method, from the weights), and Kish's
    effective sample size of the weights (mean and smallest over rows): far below S means the
    bound is still far from log p(x^0).
    """
    from bdiff_pyro.programs.enumeration import effective_sample_size, importance_log_weights, log_mean_exp_with_se

    x0 = x0.to(process.kernel.log_pi)
    unique, inverse, counts = torch.unique(x0, dim=0, return_inverse=True, return_counts=True)
    per_call = max(1, max_elements // (process.T * process.n))  # trajectory-rows per trace
    trajectories = min(num_samples, per_call)
    rows = max(1, per_call // trajectories)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        blocks = []
        for first in range(0, len(unique), rows):
            block = unique[first:first + rows]
            blocks.append(torch.cat([importance_log_weights(process, block, min(trajectories, num_samples - start))
                                     for start in range(0, num_samples, trajectories)]).T.double())  # (rows, S)
    log_w = torch.cat(blocks)
    estimate, mc_se = log_mean_exp_with_se(log_w) if num_samples > 1 else (log_w[:, 0], torch.zeros(len(log_w)))
    per_sequence = estimate[inverse]
    ess = effective_sample_size(log_w)[inverse]
    nats = float(per_sequence.mean())
    se = float(per_sequence.std() / math.sqrt(len(per_sequence))) if len(per_sequence) > 1 else float("nan")
    mc_se_nats = float(mc_se[inverse].pow(2).sum().sqrt()) / len(per_sequence)
    return {"samples": num_samples, "nats": nats, "se_nats": se, "mc_se_nats": mc_se_nats, "bits": nats / LN2,
            "se_bits": se / LN2, "ess_mean": float(ess.mean()), "ess_min": float(ess.min()),
            "sequences": len(x0), "distinct_scored": len(unique), "seed": seed}


def bound_fell(start, end, margin_bits=1.0, num_se=4.0):
    """Why the bound ``end`` lies far below ``start`` (dicts with elbo_bits, se_bits), or None.

    Far: start - end > max(margin_bits, num_se * sqrt(se_start^2 + se_end^2)), a drop no Monte
    Carlo error explains.  A learning rate far too large for the clipped optimiser trains to such
    a collapsed model while every loss stays finite."""
    drop = start["elbo_bits"] - end["elbo_bits"]
    noise = num_se * math.hypot(start["se_bits"], end["se_bits"])
    if drop > max(margin_bits, noise):
        return (f"the held-out bound fell during training, from {start['elbo_bits']:.3f} to "
                f"{end['elbo_bits']:.3f} bits/seq")
    return None


def independent_log_likelihood_bits(train, val, num_states=2):
    """Mean log2 p(x) over the rows of ``val`` under independent positions fitted on ``train``
    with add-one counts: p_i(k) = (#{x_i = k} + 1) / (N + K); for bits Laplace's rule, the
    ``IndependentBernoulli`` baseline.  The floor a model of dependent positions should clear."""
    train, val = train.long().cpu(), val.long().cpu()
    counts = torch.nn.functional.one_hot(train, num_states).sum(0).double()  # (n, K)
    log_probs = (counts + 1).log() - math.log(len(train) + num_states)
    per_row = log_probs.gather(1, val.T).sum(0)  # sum_i log p_i(val_i), (rows,)
    return float(per_row.mean()) / LN2


def pattern_histogram(samples, patterns):
    """Fraction of samples equal to each pattern (e.g. each heartbeat shift)."""
    matches = (samples.unsqueeze(1) == patterns.to(samples).unsqueeze(0)).all(-1)
    return matches.float().mean(0).tolist()


def reference_bounds(kernel, dataset, max_cost=2 ** 30):
    """The lines a run's bound is judged against, where known, in bits/seq: the data's own
    expected log-likelihood -H (known support, equally likely patterns) and the oracle's
    exact ELBO for this kernel (when its exact computation is cheap: ``max_cost``
    elements over all steps)."""
    if dataset.support is None:
        return {}
    from bdiff_pyro.diffusion.oracle import data_entropy_bits, exact_cost, oracle_report

    support = dataset.support
    references = {"truth (data log-likelihood)": -data_entropy_bits(torch.ones(len(support)))}
    kernel = kernel.double()
    cost = exact_cost(support, kernel.num_states)
    if cost <= 2 ** 23 and cost * kernel.T <= max_cost:  # 2^23: oracle_elbo_exact's own limit per step
        references["oracle ELBO"] = oracle_report(kernel, support, exact=True)["elbo_bits"]
    return references


def oracle_samples_report(oracle, num, seed, progress=False):
    """Where ``num`` of the oracle's samples fall: the fraction equal to a support pattern (what
    the best-bound reverse process of this kernel and T gives: the reference for a trained
    model's fraction) and the fraction equal to each pattern."""

    samples = ancestral_sample(oracle, num, seed, progress=progress and "oracle samples")
    fractions = pattern_histogram(samples, oracle.patterns)
    return {"num": num, "seed": seed, "in_support": sum(fractions), "pattern_fractions": fractions}


def _oracle_support(config):
    """(resolved config, float64 kernel, patterns, weights) of the oracle of ``config``'s data:
    the data set's known support, equally likely, or the training set's distinct rows weighted by
    their counts."""
    from bdiff_pyro.data import load_dataset
    from bdiff_pyro.train import resolve_config

    dataset = load_dataset(config.data)
    config = resolve_config(config, dataset)
    if dataset.support is not None:
        patterns, weights = dataset.support, None
    else:
        patterns, weights = torch.unique(dataset.train, dim=0, return_counts=True)
    return config, kernel_from_spec(model_spec(config, dataset.n)).double(), patterns, weights


def oracle_gap_report(config, process, draws=500, seed=0, progress=False):
    """How far the trained ``process`` falls short of the oracle of ``config``'s data, step by
    step (``oracle.step_gaps``), in bits per sequence: the total sum_t G_t = K* - K with its
    standard error, and the total over each tenth of the steps.  The run's ELBO is the oracle's
    (``oracle_for_config``) minus the total."""
    config, kernel, patterns, weights = _oracle_support(config)
    theirs = process.kernel.log_Qbar.double().cpu()
    if theirs.shape != kernel.log_Qbar.shape or not torch.allclose(theirs, kernel.log_Qbar):
        raise UserError("the run's kernel, T or schedule differ from the config's; compare a run with its own config")
    oracle = OracleReverse(kernel, patterns, weights)
    dtype = next(process.parameters()).dtype
    gaps, ses = step_gaps(oracle, lambda x_t, t: process.log_probs(x_t.to(dtype), t), draws, seed, progress)
    total, se = float(gaps.sum()) / LN2, float(ses.square().sum().sqrt()) / LN2
    edges = [round(kernel.T * k / 10) for k in range(11)]
    return {"T": kernel.T, "draws": draws, "seed": seed, "gap_bits": total, "se_bits": se,
            "by_steps": [{"first": lo + 1, "last": hi, "gap_bits": float(gaps[lo:hi].sum()) / LN2}
                         for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]}


def oracle_for_config(config, replicates=None, seed=None, exact="auto", samples=0, progress=False):
    """The oracle report for a validated ``config.Config`` (what ``bdiff oracle CONFIG`` prints).

    The support is the data set's known support (heartbeat: its shifts, equally likely); for
    data files it is the empirical distribution of the training sequences (distinct rows weighted
    by their counts), i.e. the oracle of the training set.  pi_1 = "data" is resolved as in
    training.  With ``samples`` > 0, also :func:`oracle_samples_report` of that many samples.
    ``progress``: bars for the Monte Carlo bound and the samples.
    """
    config, kernel, patterns, weights = _oracle_support(config)
    report = oracle_report(kernel, patterns, weights,
                           replicates=config.evaluate.replicates if replicates is None else replicates,
                           seed=config.seed if seed is None else seed, exact=exact,
                           schedule=config.model.schedule,
                           power=config.model.schedule_power if config.model.schedule == "power" else None,
                           progress=progress)
    report["support"] = "known" if weights is None else "empirical (training set)"
    if samples > 0:
        seed = config.seed if seed is None else seed
        report["samples"] = oracle_samples_report(OracleReverse(kernel, patterns, weights), samples, seed,
                                                     progress)
    return report

