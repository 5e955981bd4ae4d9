"""The analytic variational bound and its estimators (docs/math.md §2).  Pure: tensors in,
tensors out, no Pyro, no I/O.  Everything is in nats per sequence; divide by ln 2 for bits.

For a kernel with the paper's closed-form edge step the exact ELBO of x^0 is

    ELBO(x^0) = - sum_{t=2..T} E_{q(x^t | x^0)} KL( q(x^{t-1} | x^t, x^0) || p(x^{t-1} | x^t) )
                + H_q(X^T | x^0) + E_q log pi(x^T)                          (prior part)
                - H_q(X^1 | x^0) + log pi(x^0) - E_q log pi(x^1)            (edge part)

and the paper's K (eq. 14, with -H_p(X^T) read as the cross-entropy E_q log pi(x^T)) is the
same without the pi correction log pi(x^0) - E_q log pi(x^1); for pi_1 = 1/2 they agree.
For a kernel whose edge step is learned, the edge part is E_{q(x^1 | x^0)} log p(x^0 | x^1)
and joins the stochastic terms as t = 1 (D3PM's reconstruction term).

``reverse_log_probs(x_t, t)`` is any callable giving log p(x^{t-1} = k | x^t) with shape
(..., n, K): a network, the oracle, or a brute-force table in a test.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
from torch import Tensor

from bdiff_pyro.util.stats import LN2

if TYPE_CHECKING:
    from bdiff_pyro.diffusion.kernels import DiscreteKernel

#: t: one step for every sequence, or one per sequence (a LongTensor of shape x.shape[:-1])
Time = Union[int, Tensor]
#: (x^t, t) -> log p(x^{t-1} = k | x^t), shape (..., n, K)
ReverseLogProbs = Callable[[Tensor, Time], Tensor]


def kl_categorical(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(q || p) = sum_k q_k (log q_k - log p_k), summed over the last dimension.

    For K = 2 this is the Bernoulli KL from logits (log-probs are logsigmoid(+-logit)).
    Terms with q_k = 0 contribute 0 (their log q is -inf).
    """
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)


def entropy(log_q: Tensor) -> Tensor:
    """H(q) = - sum_k q_k log q_k over the last dimension (0 log 0 = 0)."""
    return -kl_categorical(log_q, torch.zeros_like(log_q))


def cross_entropy(log_q: Tensor, log_p: Tensor) -> Tensor:
    """H(q, p) = - sum_k q_k log p_k = KL(q || p) + H(q) >= 0, over the last dimension."""
    return kl_categorical(log_q, log_p) + entropy(log_q)


def first_stochastic_step(kernel: DiscreteKernel) -> int:
    """t = 2 when the edge term is closed form, t = 1 when p(x^0 | x^1) is learned."""
    return 2 if kernel.closed_form_edge else 1


def prior_kl(kernel: DiscreteKernel, x0: Tensor) -> Tensor:
    """KL( q(x^T | x^0) || pi ) = H(q(x^T | x^0), pi) - H_q(X^T | x^0) >= 0, per sequence: the
    prior part of -ELBO (docs/math.md §2)."""
    log_q_T = kernel.q_marginal_log_probs(x0, kernel.T)
    return (cross_entropy(log_q_T, kernel.log_pi) - entropy(log_q_T)).sum(-1)


def pi_correction_undefined(kernel: DiscreteKernel) -> Optional[str]:
    """Why the pi correction, and with it the paper's K = ELBO - correction, is undefined for
    this kernel, or None when it is defined: it needs log pi finite, i.e. pi > 0 in every state."""
    if bool(torch.isfinite(kernel.log_pi).all()):
        return None
    return ("the paper's K is undefined: the stationary distribution pi has zeros, so log pi(x^0) = -inf "
            "(the absorbing kernel's pi is a point mass on the mask state)")


def pi_correction(kernel: DiscreteKernel, x0: Tensor) -> Tensor:
    """log pi(x^0) - E_{q(x^1 | x^0)} log pi(x^1), per sequence: ELBO - K (docs/math.md §2.3).

    Raises ValueError for a kernel where it is undefined (:func:`pi_correction_undefined`):
    there it would be -inf - (-inf).
    """
    undefined = pi_correction_undefined(kernel)
    if undefined is not None:
        raise ValueError(undefined)
    log_q_1 = kernel.q_marginal_log_probs(x0, 1)
    return (kernel.log_pi[x0.long()] + cross_entropy(log_q_1, kernel.log_pi)).sum(-1)


def papers_K_fields(kernel: DiscreteKernel, x0: Tensor, elbo_bits: float, weights: Optional[Tensor] = None) -> dict:
    """{"K_bits": the paper's K} for a report: ELBO - sum_j w_j pi_correction(x^0_j) in bits
    (w_j = 1/N unless given), or {"K_bits": None, "K_undefined": why} where it is undefined."""
    undefined = pi_correction_undefined(kernel)
    if undefined is not None:
        return {"K_bits": None, "K_undefined": undefined}
    corrections = pi_correction(kernel, x0)
    correction = corrections.mean() if weights is None else (weights.to(corrections) * corrections).sum()
    return {"K_bits": elbo_bits - float(correction) / LN2}


def closed_form_edge_nll(kernel: DiscreteKernel, x0: Tensor) -> Tensor:
    """-E_{q(x^1 | x^0)} log p(x^0 | x^1) for the paper's edge step, per sequence (docs/math.md §2):
    H_q(X^1 | x^0) - (log pi(x^0) - E_q log pi(x^1)), the edge part of -ELBO."""
    return entropy(kernel.q_marginal_log_probs(x0, 1)).sum(-1) - pi_correction(kernel, x0)


def closed_form_loss(kernel: DiscreteKernel, x0: Tensor) -> Tensor:
    """The part of -ELBO that needs no network, per sequence: prior_kl + (for kernels with the
    paper's edge step) closed_form_edge_nll."""
    loss = prior_kl(kernel, x0)
    if kernel.closed_form_edge:
        loss = loss + closed_form_edge_nll(kernel, x0)
    return loss


def log_prob_of(log_probs: Tensor, x: Tensor) -> Tensor:
    """log_probs[..., i, x_i] with broadcasting: (..., n, K), (..., n) -> (..., n)."""
    index = x.long().unsqueeze(-1)
    shape = torch.broadcast_shapes(log_probs.shape[:-1], index.shape[:-1])
    return log_probs.expand(*shape, log_probs.shape[-1]).gather(-1, index.expand(*shape, 1)).squeeze(-1)


def step_loss(kernel: DiscreteKernel, reverse_log_probs: ReverseLogProbs, x0: Tensor, x_t: Tensor,
              t: Time) -> Tensor:
    """L_t >= 0, the loss of step t at one x^t, per sequence (its expectation over x^t enters -ELBO):

    t >= 2:  KL( q(x^{t-1} | x^t, x^0) || p(x^{t-1} | x^t) )
    t = 1:   -log p(x^0 | x^1)        (only for kernels with a learned edge step)
    """
    log_p = reverse_log_probs(x_t, t)
    if isinstance(t, int) and t == 1:
        return -log_prob_of(log_p, x0).sum(-1)
    # Rows with t = 1 (learned edge only) take the reconstruction branch below; the
    # posterior, defined for t >= 2, is evaluated there at t = 2 and discarded.
    t_kl = t if isinstance(t, int) else torch.as_tensor(t, device=x_t.device).clamp_min(2)
    kl = kl_categorical(kernel.q_posterior_log_probs(x_t, x0, t_kl), log_p).sum(-1)
    if isinstance(t, int) or kernel.closed_form_edge:
        return kl
    return torch.where(torch.as_tensor(t, device=x_t.device) == 1, -log_prob_of(log_p, x0).sum(-1), kl)


def sample_x_t(kernel: DiscreteKernel, x0: Tensor, t: Time) -> Tensor:
    """x^t ~ q(x^t | x^0) in closed form (t an int or one time per sequence)."""
    return kernel.sample_marginal(x0, t)


# ---------------------------------------------------------------------------------------
# Exact evaluation (small n): the expectation over x^t as a sum over all K^n states.


def all_states(n: int, num_states: int = 2, dtype: torch.dtype = torch.float64) -> Tensor:
    """Every sequence in {0..K-1}^n, shape (K^n, n), in lexicographic order."""
    return torch.tensor(list(itertools.product(range(num_states), repeat=n)), dtype=dtype)


def elbo_exact(kernel: DiscreteKernel, reverse_log_probs: ReverseLogProbs, x0: Tensor) -> Tensor:
    """The ELBO of each x^0 (nats), every expectation over x^t taken exactly.

    Costs T x K^n network evaluations: a reference for tests and small cross-checks.
    """
    states = all_states(x0.shape[-1], kernel.num_states, dtype=kernel.log_pi.dtype).to(x0.device)
    negative_elbo = closed_form_loss(kernel, x0)
    for t in range(first_stochastic_step(kernel), kernel.T + 1):
        log_q_t = kernel.q_marginal_log_probs(x0, t).unsqueeze(-3)  # (B, 1, n, K)
        weights = log_prob_of(log_q_t, states).sum(-1).exp()  # q(x^t = s | x^0), (B, S)
        log_p = reverse_log_probs(states, t)  # (S, n, K), shared by every x^0
        losses = step_loss(kernel, lambda x, s: log_p, x0.unsqueeze(-2), states, t)  # (B, S)
        # states q cannot reach carry no weight, even where the model rules them out (inf losses)
        negative_elbo = negative_elbo + torch.where(weights > 0, weights * losses, 0.0).sum(-1)
    return -negative_elbo


# ---------------------------------------------------------------------------------------
# Monte Carlo estimators


def uniform_step_proposal(kernel: DiscreteKernel) -> Tensor:
    """r(t) = 1 / (number of stochastic steps), as a (T+1,) table with zeros below the first."""
    first = first_stochastic_step(kernel)
    probs = torch.zeros(kernel.T + 1, dtype=kernel.log_pi.dtype, device=kernel.log_pi.device)
    probs[first:] = 1.0 / (kernel.T + 1 - first)
    return probs


def negative_elbo_estimate(kernel: DiscreteKernel, reverse_log_probs: ReverseLogProbs, x0: Tensor,
                           step_proposal: Optional[Tensor] = None,
                           rows: slice = slice(None)) -> tuple[Tensor, Tensor, Tensor]:
    """Unbiased one-sample estimate of -ELBO(x^0) per sequence, for training.

    t ~ r(t) (uniform over the stochastic steps unless ``step_proposal``, a (T+1,) table of
    probabilities, is given), x^t ~ q(x^t | x^0); the estimate is L_t(x^0, x^t) / r(t) plus
    the closed-form loss, whose expectation is -ELBO for any r that is positive wherever
    L_t can be.  The closed-form loss is added once, not once per step.

    t and x^t are drawn for every row of x0 and the estimate is computed for ``x0[rows]``
    only: a process that scores its slice of a minibatch draws what one process scoring the
    whole minibatch draws.  Returns (estimates, t, L_t) of those rows.
    """
    probs = uniform_step_proposal(kernel) if step_proposal is None else step_proposal
    t = torch.multinomial(probs.float(), x0.shape[0], replacement=True)
    x_t = sample_x_t(kernel, x0, t)
    x0, x_t, t = x0[rows], x_t[rows], t[rows]
    losses = step_loss(kernel, reverse_log_probs, x0, x_t, t)
    return losses / probs[t] + closed_form_loss(kernel, x0), t, losses


def x0_cross_entropy(x0_log_probs: Tensor, x0: Tensor) -> Tensor:
    """-sum_i log p(x^0_i | x^t) per sequence, from the predicted log P(x^0_i = v | x^t), (..., n, K).

    The auxiliary term of the hybrid loss (Austin et al. 2021).  Its expectation over
    x^0 ~ data, x^t ~ q(x^t | x^0) is smallest at the posterior marginals P(x^0_i | x^t), which
    is also where the through-x^0 step is the best factorised step (docs/math.md §3), so it does
    not move the ELBO's optimum; it gives every t a gradient of the same scale, where the ELBO
    weighs step t by how much x^0 still changes it.
    """
    return -log_prob_of(x0_log_probs, x0).sum(-1)


def x0_loss_estimate(kernel: DiscreteKernel, x0_log_probs: ReverseLogProbs, x0: Tensor,
                     rows: slice = slice(None)) -> Tensor:
    """One-sample estimate of E_{t ~ U(1..T)} E_{x^t ~ q(x^t | x^0)} [-log p(x^0 | x^t)] per
    sequence (:func:`x0_cross_entropy`), with its own t and x^t.  Like
    :func:`negative_elbo_estimate`, t and x^t are drawn for every row and ``x0[rows]`` is scored."""
    t = torch.randint(1, kernel.T + 1, (x0.shape[0],), device=x0.device)
    x_t = sample_x_t(kernel, x0, t)
    return x0_cross_entropy(x0_log_probs(x_t[rows], t[rows]), x0[rows])


def elbo_replicates(kernel: DiscreteKernel, reverse_log_probs: ReverseLogProbs, x0: Tensor, replicates: int = 4,
                    max_rows: int = 65536) -> Tensor:
    """Independent unbiased estimates of ELBO(x^0), shape (N, replicates), in nats.

    Each replicate visits every step t once with one x^t ~ q(x^t | x^0) (stratified over t,
    which has far less variance than sampling t).  Rows (replicate, step, sequence) are
    visited in that order ``max_rows`` at a time and never held all at once: the memory is
    O(max_rows + N x replicates) whatever T and N are.
    """
    first = first_stochastic_step(kernel)
    steps = torch.arange(first, kernel.T + 1, device=x0.device)
    num = x0.shape[0]
    total = replicates * len(steps) * num
    # sum over t of L_t, per (replicate, sequence)
    stochastic = torch.zeros(replicates * num, dtype=kernel.log_pi.dtype, device=x0.device)
    with torch.no_grad():
        for start in range(0, total, max_rows):
            row = torch.arange(start, min(start + max_rows, total), device=x0.device)
            sequence, step, replicate = row % num, steps[(row // num) % len(steps)], row // (num * len(steps))
            x_t = sample_x_t(kernel, x0[sequence], step)
            losses = step_loss(kernel, reverse_log_probs, x0[sequence], x_t, step)
            stochastic.index_add_(0, replicate * num + sequence, losses.to(stochastic.dtype))
        return (-(closed_form_loss(kernel, x0) + stochastic.view(replicates, num))).T

