"""What a trained model is judged by: the bound on data (bits/seq with a standard error)
and where its samples fall (training set, held-out set, neither)."""

import copy
import math

import torch
from tqdm.auto import tqdm

from bdiff_pyro.diffusion.bound import (
    LN2,
    elbo_replicates,
    first_stochastic_step,
    mean_and_standard_error,
    papers_K_fields,
)
from bdiff_pyro.diffusion.oracle import OracleReverse, oracle_report
from bdiff_pyro.memory import network_widths, rows_per_chunk


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


def _row_keys(x):
    return {row.tobytes() for row in x.to(torch.uint8).cpu().numpy()}


def held_out_patterns(train, val):
    """How many distinct held-out sequences are not training sequences (0 for heartbeat data,
    whose held-out set is its training set: then no sample can count as held-out)."""
    return len(_row_keys(val) - _row_keys(train))


def membership(samples, train, val):
    """Fractions of samples that are training sequences, held-out (and not training) ones,
    and neither."""
    train_keys, val_keys = _row_keys(train), _row_keys(val) - _row_keys(train)
    rows = [row.tobytes() for row in samples.to(torch.uint8).cpu().numpy()]
    in_train = sum(key in train_keys for key in rows)
    in_val = sum(key in val_keys for key in rows)
    total = len(rows)
    return {"train": in_train / total, "held_out": in_val / total, "neither": (total - in_train - in_val) / total}


def pattern_histogram(samples, patterns):
    """Fraction of samples equal to each pattern (e.g. each heartbeat shift)."""
    matches = (samples.unsqueeze(1) == patterns.to(samples).unsqueeze(0)).all(-1)
    return matches.float().mean(0).tolist()


def reference_bounds(kernel, dataset, max_cost=2 ** 30):
    """The lines a run's bound is judged against, where known, in bits/seq: the data's own
    expected log-likelihood -H (known support, equally likely patterns) and the oracle's
    exact bound K* for this kernel (when its exact computation is cheap: ``max_cost``
    elements over all steps)."""
    if dataset.support is None:
        return {}
    from bdiff_pyro.diffusion.oracle import data_entropy_bits, exact_cost, oracle_report

    support = dataset.support
    references = {"truth (data log-likelihood)": -data_entropy_bits(torch.ones(len(support)))}
    kernel = kernel.double()
    cost = exact_cost(support, kernel.num_states)
    if cost <= 2 ** 23 and cost * kernel.T <= max_cost:  # 2^23: oracle_elbo_exact's own limit per step
        references["oracle K*"] = oracle_report(kernel, support, exact=True)["elbo_bits"]
    return references


def oracle_samples_report(oracle, num, seed, progress=False):
    """Where ``num`` of the oracle's samples fall: the fraction equal to a support pattern (what
    the best-bound reverse process of this kernel and T gives: the reference for a trained
    model's fraction) and the fraction equal to each pattern."""

    fractions = pattern_histogram(oracle.sample(num, seed=seed, progress=progress), oracle.patterns)
    return {"num": num, "seed": seed, "in_support": sum(fractions), "pattern_fractions": fractions}


def oracle_for_config(config, replicates=None, seed=None, exact="auto", samples=0, progress=False):
    """The oracle report for a validated ``config.Config`` (what ``bdiff oracle CONFIG`` prints).

    The support is the data set's known support (heartbeat: its shifts, equally likely); for
    data files it is the empirical distribution of the training sequences (distinct rows weighted
    by their counts), i.e. the oracle of the training set.  pi_1 = "data" is resolved as in
    training.  With ``samples`` > 0, also :func:`oracle_samples_report` of that many samples.
    ``progress``: bars for the Monte Carlo bound and the samples.
    """
    from bdiff_pyro.checkpoints import build_kernel
    from bdiff_pyro.data import load_dataset
    from bdiff_pyro.train import resolve_config

    dataset = load_dataset(config.data)
    config = resolve_config(copy.deepcopy(config), dataset)
    if dataset.support is not None:
        patterns, weights = dataset.support, None
    else:
        patterns, weights = torch.unique(dataset.train, dim=0, return_counts=True)
    kernel = build_kernel(config.model, config.data.levels).double()
    report = oracle_report(kernel, patterns, weights,
                           replicates=config.evaluate.replicates if replicates is None else replicates,
                           seed=config.seed if seed is None else seed, exact=exact,
                           schedule=config.model.schedule,
                           power=config.model.schedule_power if config.model.schedule == "power" else None,
                           progress=progress)
    report["support"] = "known" if dataset.support is not None else "empirical (training set)"
    if samples > 0:
        seed = config.seed if seed is None else seed
        report["samples"] = oracle_samples_report(OracleReverse(kernel, patterns, weights), samples, seed,
                                                     progress)
    return report

