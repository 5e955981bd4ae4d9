"""What a trained model is judged by: the bound on data (bits/seq with a standard error)
and where its samples fall (training set, held-out set, neither)."""

import math

import torch

from .bound import LN2, elbo_replicates, mean_and_standard_error, pi_correction


def bound_report(process, x0, replicates=8, seed=0, distinct=False):
    """The ELBO (and the paper's K) averaged over the sequences x0, in bits/seq, with their
    Monte Carlo standard errors (stratified over t, ``replicates`` estimates per sequence).

    With ``distinct``, each distinct sequence is scored once and weighted by its count: the
    same average for a data set with repeats (heartbeat: 5 patterns), at a fraction of the cost.
    """
    x0 = x0.to(process.kernel.log_pi.device)
    weights = None
    if distinct:
        x0, counts = torch.unique(x0, dim=0, return_counts=True)
        weights = counts / counts.sum()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        estimates = elbo_replicates(process.kernel, process.log_probs, x0, replicates)
    elbo, se = mean_and_standard_error(estimates, weights)
    corrections = pi_correction(process.kernel, x0)
    correction = float(corrections.mean() if weights is None else (weights.to(corrections) * corrections).sum())
    return {"elbo_bits": elbo / LN2, "K_bits": (elbo - correction) / LN2, "se_bits": se / LN2}


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
    from .oracle import data_entropy_bits, exact_cost, oracle_report

    support = dataset.support
    references = {"truth (data log-likelihood)": -data_entropy_bits(torch.ones(len(support)))}
    kernel = kernel.double()
    cost = exact_cost(support, kernel.num_states)
    if cost <= 2 ** 23 and cost * kernel.T <= max_cost:  # 2^23: oracle_elbo_exact's own limit per step
        references["oracle K*"] = oracle_report(kernel, support, exact=True)["elbo_bits"]
    return references
