"""What a trained model is judged by: the bound on data (bits/seq with a standard error)
and where its samples fall (training set, held-out set, neither)."""

import torch

from .bound import LN2, elbo_replicates, mean_and_standard_error, papers_K_fields


def bound_report(process, x0, replicates=8, seed=0, distinct=False):
    """The ELBO (and the paper's K, None where undefined: ``bound.papers_K_fields``) averaged
    over the sequences x0, in bits/seq, with their Monte Carlo standard error (stratified over
    t, ``replicates`` estimates per sequence).

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
    return {"elbo_bits": elbo / LN2, **papers_K_fields(process.kernel, x0, elbo / LN2, weights), "se_bits": se / LN2}


def _row_keys(x):
    return {row.tobytes() for row in x.to(torch.uint8).cpu().numpy()}


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
