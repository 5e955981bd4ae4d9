"""What every reverse step shares, whatever computes it (a network, the oracle, a test double):
the split between the edge step p(x^0 | x^1) and the steps t >= 2, and the through-x^0 mixture
for bits (docs/math.md §2, §3).  Torch only."""

import math

import torch
import torch.nn.functional as F


def edge_or_step(edge, step, x_t, t):
    """edge(x^1) at t = 1, step(x^t, t) at t >= 2; t an int or one time per sequence
    (shape x_t.shape[:-1]).  With one time per sequence, rows with t = 1 are computed by
    ``step`` at t = 2 and then replaced by ``edge``."""
    if isinstance(t, int):
        return edge(x_t) if t == 1 else step(x_t, t)
    t = torch.as_tensor(t, device=x_t.device)
    out = step(x_t, t.clamp_min(2))
    is_edge = t == 1
    if not bool(is_edge.any()):
        return out
    return torch.where(is_edge.reshape(is_edge.shape + (1,) * (out.dim() - is_edge.dim())), edge(x_t), out)


def binary_mixture_logits(log_posterior, x_t, x0_logits):
    """Bits: logit of sum_v q(x^s = 1 | x^t, x^0 = v) P(x^0 = v), P(x^0 = 1) = sigmoid(x0_logits).

    log_posterior[..., j, v, k] = log q(x^s = k | x^t = j, x^0 = v): one (2, 2, 2) table, or
    one per sequence (..., 2, 2, 2).  The same mixture as
    ``DiscreteKernel.q_posterior_log_probs_mixture``, in probability space (sums of
    non-negative terms), with p(0) and p(1) each formed from their own table entries so that
    neither is computed as 1 minus the other.
    """
    probs = log_posterior.exp()
    if probs.dim() > 3:
        probs = probs.unsqueeze(-4)  # (..., 1, j, v, k): one table per sequence
    x = x_t.to(probs.dtype)
    not_x = 1 - x
    picked = [[probs[..., 0, v, k] * not_x + probs[..., 1, v, k] * x for k in (0, 1)] for v in (0, 1)]
    p_x0_0, p_x0_1 = torch.sigmoid(-x0_logits), torch.sigmoid(x0_logits)
    p0 = p_x0_0 * picked[0][0] + p_x0_1 * picked[1][0]
    p1 = p_x0_0 * picked[0][1] + p_x0_1 * picked[1][1]
    return p1.log() - p0.log()


def mean_of_bernoullis_logit(logits, dim=0):
    """The logit of the uniform mixture (1/M) sum_m sigmoid(l_m) over ``dim``, in log space:

        log sum_m sigmoid(l_m) - log sum_m sigmoid(-l_m)      (the 1/M cancels)
    """
    return torch.logsumexp(F.logsigmoid(logits), dim) - torch.logsumexp(F.logsigmoid(-logits), dim)


def mean_of_categoricals_log_probs(log_probs, dim=0):
    """log (1/M) sum_m p_m(k), the uniform mixture over ``dim`` of categorical log-probabilities."""
    return torch.logsumexp(log_probs, dim) - math.log(log_probs.shape[dim])
