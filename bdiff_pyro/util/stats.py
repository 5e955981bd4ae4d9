"""Statistics shared by every layer: ln 2, the mean and standard error of replicate estimates,
log-mean-exp with its standard error and effective sample size, and which rows of a sample are
rows of a data set.

No torch import (layer 0): the estimators take torch tensors (or numpy arrays where noted) and
use only their methods, so that they compute exactly what the callers computed before.
"""

import math

import numpy as np

LN2 = math.log(2.0)


def mean_and_standard_error(replicates, weights=None):
    """Mean over sequences of the per-sequence replicate means, and its Monte Carlo standard
    error (docs/math.md §2.4), from a (N, R) tensor of replicate estimates (R >= 2).

    With ``weights`` w_j (N,) summing to 1 (e.g. the frequencies of distinct sequences in a data
    set), mean = sum_j w_j m_j and se = sqrt(sum_j w_j^2 s_j^2 / R), with m_j and s_j^2 the mean
    and unbiased variance of row j; without, w_j = 1/N.  Returns floats in the input's units.
    """
    num, reps = replicates.shape
    if reps < 2:
        raise ValueError(f"a standard error needs at least two replicates (got {reps})")
    if weights is None:
        weights = replicates.new_full((num,), 1.0 / num)
    weights = weights.to(replicates)
    mean = (weights * replicates.mean(1)).sum()
    se = (weights.square() * replicates.var(1, unbiased=True)).sum().div(reps).sqrt()
    return float(mean), float(se)


def log_mean_exp_with_se(log_w):
    """log mean_s exp(log_w_s) over the last dimension of a tensor, and its delta-method standard
    error sd(w) / (sqrt(S) mean(w)) (docs/math.md §5), computed with weights scaled by their
    maximum."""
    S = log_w.shape[-1]
    top = log_w.max(-1, keepdim=True).values
    w = (log_w - top).exp()
    mean = w.mean(-1)
    estimate = mean.log() + top.squeeze(-1)
    se = w.std(-1, unbiased=True) / (math.sqrt(S) * mean)
    return estimate, se


def effective_sample_size(log_w):
    """Kish's effective sample size (sum_s w_s)^2 / sum_s w_s^2 over the last dimension of a
    tensor: far below S when a few weights dominate, and then the delta-method standard error
    is too small."""
    return (2 * log_w.logsumexp(-1) - (2 * log_w).logsumexp(-1)).exp()


# ---------------------------------------------------------------------------------------
# Rows of a sample against rows of a data set (sequences compared as byte strings)


def row_keys(rows):
    """One hashable key per row of a (N, n) array or CPU tensor of states < 256, in order."""
    return [row.tobytes() for row in np.asarray(rows, dtype=np.uint8)]


def distinct_held_out(train, val):
    """How many distinct held-out rows are not training rows."""
    return len(set(row_keys(val)) - set(row_keys(train)))


def row_membership(rows, train, val):
    """(is_train, is_held_out): boolean arrays (N,) saying which rows are training rows and which
    are held-out rows that are not training rows."""
    train_keys = set(row_keys(train))
    val_keys = set(row_keys(val)) - train_keys
    keys = row_keys(rows)
    return (np.array([key in train_keys for key in keys], dtype=bool),
            np.array([key in val_keys for key in keys], dtype=bool))


def membership_fractions(rows, train, val):
    """Fractions of rows that are training rows, held-out (and not training) rows, and neither."""
    is_train, is_held_out = row_membership(rows, train, val)
    total = len(is_train)
    in_train, in_val = int(is_train.sum()), int(is_held_out.sum())
    return {"train": in_train / total, "held_out": in_val / total, "neither": (total - in_train - in_val) / total}


def pattern_codes(rows, patterns):
    """For each row, the index of the equal row of ``patterns``, or len(patterns) if none."""
    index = {key: p for p, key in enumerate(row_keys(patterns))}
    return np.array([index.get(key, len(patterns)) for key in row_keys(rows)])
