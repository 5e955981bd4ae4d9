"""Conditioning a trained model on observed positions: impute the missing ones (docs/conditioning.md).

Given observed values y on a set O of positions of x^0 (``mask`` True there), the question is the
model's conditional p(x^0_{-O} | x^0_O = y) and its evidence p(x^0_O = y).  Three methods:

- ``exact``: the model's marginal p(x^0) over all K^n states by a forward pass over joint states
  (small n only), then restricted to the states that agree with y and normalised.
- ``replace``: the reverse chain with the observed positions overwritten at every step by a draw
  from q(x^{t-1} | x^0 = y).  A heuristic: its samples are not the model's conditional.
- ``smc``: sequential Monte Carlo over the reverse chain, twisted by the network's own prediction
  P(x^0_O = y | x^t) (the twisted diffusion sampler of Wu et al. 2023 for discrete states).
  Consistent as the number of particles grows, whatever the twist; its evidence estimate is
  unbiased for p(x^0_O = y).

The entry point is :func:`impute`; it works on any object with the reverse-step interface
(``kernel``, ``n``, ``T``, ``log_probs``; ``x0_log_probs`` and ``parameterisation == "x0"`` for the
twist) and draws every random number from one ``torch.Generator``.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F

from bdiff_pyro.errors import UserError
from bdiff_pyro.programs.enumeration import (
    MAX_JOINT_STATES,
    check_enumerable,
    decode,
    joint_log_probs,
    num_joint_states,
)
from bdiff_pyro.programs.reverse import binary_mixture_logits

METHODS = ("exact", "replace", "smc")

#: Resample a group of particles when its effective sample size falls below this fraction.
ESS_FRACTION = 0.5

#: Weight of the model's own step in the proposal of an observed position (a defensive mixture):
#: the model may reach states the kernel's posterior given y cannot (a learned edge step that
#: changes an unmasked bit), and the proposal must cover every state the target can take.
DEFENSIVE_WEIGHT = 0.1

#: Particles x positions processed at once (bounds the memory of one network evaluation).
MAX_BATCH_POSITIONS = 2**19


@dataclass
class Imputation:
    """What :func:`impute` returns, for B rows of n positions and ``num_samples`` completions.

    completions: (B, num_samples, n) states; observed positions hold the observed values.
    marginals: (B, n, K_data) float64, P(x^0_i = v | x^0_O = y); one-hot at observed positions.
    log_evidence, log_evidence_se: (B,) float64 estimate of log p(x^0_O = y) in nats and its
        standard error (``exact``: the exact value and zeros; ``replace``: None).
    ess: (B,) Kish's effective sample size of the final particle weights (``smc`` only).
    """

    completions: torch.Tensor
    marginals: torch.Tensor
    log_evidence: Optional[torch.Tensor] = None
    log_evidence_se: Optional[torch.Tensor] = None
    ess: Optional[torch.Tensor] = None

    @property
    def probs(self) -> torch.Tensor:
        """Bits: P(x^0_i = 1 | x^0_O = y), shape (B, n)."""
        return self.marginals[..., 1]


def impute(process, values: torch.Tensor, mask: torch.Tensor, method: str = "smc", num_samples: int = 1,
           num_particles: int = 256, num_groups: int = 4, seed: Optional[int] = None,
           generator: Optional[torch.Generator] = None, max_states: int = MAX_JOINT_STATES) -> Imputation:
    """Complete the rows of ``values`` (B, n) at the positions where ``mask`` (B, n) is False.

    ``values`` holds state codes at observed positions (anything, e.g. NaN, elsewhere).  ``smc``
    runs ``num_particles`` particles per row as ``num_groups`` independent filters (the spread of
    their evidence estimates gives the standard error); ``num_samples`` completions are drawn from
    the weighted particles.  Randomness comes from ``generator`` (or one seeded with ``seed``).
    """
    if method not in METHODS:
        raise UserError(f"unknown imputation method {method!r}; choose one of {', '.join(METHODS)}")
    values, mask = _check_observations(process, values, mask)
    if generator is None:
        generator = torch.Generator(device=values.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    with torch.no_grad():
        if method == "exact":
            return exact_impute(process, values, mask, num_samples, generator, max_states)
        if method == "replace":
            return replace_impute(process, values, mask, num_samples, generator)
        if num_particles % num_groups:
            raise UserError(f"--particles {num_particles} must be a multiple of the {num_groups} groups")
        return smc_impute(process, values, mask, num_samples, num_particles // num_groups, num_groups, generator)


def _check_observations(process, values, mask):
    """(values, mask) as (B, n) tensors on the process's device, in its dtype and bool, observed values valid."""
    device = process.kernel.log_pi.device
    values, mask = torch.as_tensor(values, device=device), torch.as_tensor(mask, device=device).bool()
    if values.dim() != 2 or values.shape[-1] != process.n or mask.shape != values.shape:
        raise UserError(f"expected values and a mask of shape (B, {process.n}); got {tuple(values.shape)} "
                        f"and {tuple(mask.shape)}")
    data_states = process.kernel.num_data_states
    observed = values[mask]
    if observed.numel() and (bool((observed != observed.round()).any()) or observed.min() < 0
                             or observed.max() > data_states - 1):
        raise UserError(f"observed values must be the states 0..{data_states - 1}")
    dtype = process.kernel.log_pi.dtype
    return torch.where(mask, values, torch.zeros_like(values)).to(dtype), mask


def _pick(log_probs, states):
    """log_probs[..., i, states_i]: (..., n, K), (..., n) -> (..., n)."""
    return log_probs.gather(-1, states.long().unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------
# exact


def model_log_marginal(process, max_states: int = MAX_JOINT_STATES) -> torch.Tensor:
    """log p(x^0 = s) for every joint state s (in the order of ``enumeration.encode``), shape (K^n,):

        log a_T(s) = sum_i log pi(s_i),
        log a_{t-1}(s') = log sum_s a_t(s) p(x^{t-1} = s' | x^t = s),   t = T..1,

    the reverse chain's forward pass over joint states (docs/math.md §5); cost T K^(2n)."""
    return _forward_pass(process, max_states)


@torch.no_grad()
def _forward_pass(process, max_states):
    kernel, n = process.kernel, process.n
    check_enumerable(n, kernel.num_states, max_states)
    dtype = kernel.log_pi.dtype
    states = decode(torch.arange(num_joint_states(n, kernel.num_states), device=kernel.log_pi.device), n,
                    kernel.num_states, dtype)
    log_alpha = joint_log_probs(kernel.prior_log_probs((n,)))
    for t in range(process.T, 0, -1):
        transition = joint_log_probs(process.log_probs(states, t))  # (S, S')
        log_alpha = torch.logsumexp(log_alpha.unsqueeze(-1) + transition, dim=0)
    return log_alpha


def exact_impute(process, values, mask, num_samples, generator, max_states=MAX_JOINT_STATES):
    """The exact conditional p(x^0 | x^0_O = y) ∝ p(x^0) 1[x^0_O = y] from :func:`model_log_marginal`."""
    kernel, n = process.kernel, process.n
    states = num_joint_states(n, kernel.num_states)
    if states > max_states:
        raise UserError(f"the exact method enumerates all {kernel.num_states}^{n} = {states} states of a sequence, "
                        f"more than the limit of {max_states}; use the smc method")
    log_marginal = model_log_marginal(process, max_states).double()
    states = decode(torch.arange(len(log_marginal), device=log_marginal.device), n, kernel.num_states, torch.float64)
    agrees = ((states.unsqueeze(0) == values.double().unsqueeze(1)) | ~mask.unsqueeze(1)).all(-1)  # (B, S)
    joint = torch.where(agrees, log_marginal, -math.inf)
    log_evidence = torch.logsumexp(joint, -1)
    conditional = (joint - log_evidence.unsqueeze(-1)).exp()  # (B, S)
    one_hot = torch.nn.functional.one_hot(states.long(), kernel.num_states)[..., :kernel.num_data_states]
    marginals = torch.einsum("bs,snk->bnk", conditional, one_hot.double())
    draws = torch.multinomial(conditional, num_samples, replacement=True, generator=generator)
    completions = states[draws].to(values.dtype)
    return Imputation(completions, marginals, log_evidence, torch.zeros_like(log_evidence))


# ---------------------------------------------------------------------------------------
# replace (heuristic)


def replace_impute(process, values, mask, num_samples, generator):
    """The replacement heuristic: x^T ~ pi, then for t = T..1

        x^{t-1}_i ~ p(x^{t-1}_i | x^t)   for missing i,   x^{t-1}_i ~ q(x^{t-1}_i | x^0_i = y_i)   for observed i,

    and x^0_O = y.  The observed positions never feel the model, and the missing ones never
    feel the observed ones except through the network's reading of x^t: not the conditional
    (docs/conditioning.md measures the bias).  Marginals average p(x^0_i | x^1) over the chains."""
    kernel = process.kernel
    B, n = values.shape
    y = values.unsqueeze(1).expand(B, num_samples, n)
    observed = mask.unsqueeze(1).expand(B, num_samples, n)
    x = kernel.sample_states(kernel.prior_log_probs((B, num_samples, n)), generator)
    x = torch.where(observed, kernel.sample_states(kernel.q_marginal_log_probs(y, process.T), generator), x)
    for t in range(process.T, 0, -1):
        step = process.log_probs(x, t)
        x_prev = kernel.sample_states(step, generator)
        truth = y if t == 1 else kernel.sample_states(kernel.q_marginal_log_probs(y, t - 1), generator)
        x = torch.where(observed, truth.to(x_prev.dtype), x_prev)
    marginals = step.double().exp().mean(1)[..., :kernel.num_data_states]
    marginals = torch.where(mask.unsqueeze(-1), _one_hot(values, kernel), marginals)
    return Imputation(x.to(values.dtype), marginals)


def _one_hot(values, kernel):
    return torch.nn.functional.one_hot(values.long(), kernel.num_states)[..., :kernel.num_data_states].double()


# ---------------------------------------------------------------------------------------
# smc (twisted)


def step_and_log_twist(process, x_t, t, y, mask):
    """The reverse step log p(x^{t-1} | x^t) (..., n, K) and the log twist (...,) at x^t:

        log tw_t(x^t) = sum_{i in O} log P(x^0_i = y_i | x^t)

    from the process's prediction of x^0 (one network evaluation gives both), and
    at t = 1 from the edge step itself, p(x^0_O = y | x^1) (exact: it factorises over positions).
    Without a prediction of x^0 (direct parameterisation) tw_t = 1 for t >= 2."""
    if t == 1 or not _predicts_x0(process):
        step = process.log_probs(x_t, t)
        if t > 1:
            return step, torch.zeros(x_t.shape[:-1], dtype=step.dtype, device=step.device)
        return step, torch.where(mask, _pick(step, y), 0.0).sum(-1)
    if process.kernel.num_states == 2 and hasattr(process, "x0_logits"):  # bits: the network's fast path
        x0_logits = process.x0_logits(x_t, t)
        step_logits = binary_mixture_logits(process.kernel.log_posterior[t], x_t, x0_logits)
        step = torch.stack([F.logsigmoid(-step_logits), F.logsigmoid(step_logits)], -1)
        x0_log_probs = torch.stack([F.logsigmoid(-x0_logits), F.logsigmoid(x0_logits)], -1)
    else:
        x0_log_probs = process.x0_log_probs(x_t, t)
        step = process.kernel.q_posterior_log_probs_mixture(x_t, x0_log_probs, t)
    return step, torch.where(mask, _pick(x0_log_probs, y), 0.0).sum(-1)


def _predicts_x0(process):
    """Whether p(x^{t-1} | x^t) is the posterior q(x^{t-1} | x^t, x^0) averaged over the process's own
    P(x^0 | x^t) (``x0_log_probs``): the x0 parameterisation and the oracle (docs/math.md §3)."""
    return hasattr(process, "x0_log_probs") and getattr(process, "parameterisation", "x0") == "x0"


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ancestor indices (..., N) by systematic resampling of normalised weights w (..., N):
    index j is taken floor(N C_j + u) - floor(N C_{j-1} + u) times, C the cumulative weights and
    u ~ U(0, 1) one draw per batch (Pyro's ``smcfilter._systematic_sample``, with a generator)."""
    probs = torch.softmax(log_weights, -1)
    size = probs.shape[-1]
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, dtype=probs.dtype, device=probs.device)
    counts = (probs.cumsum(-1) * size + u).floor().clamp(0, size).long()
    diff = torch.zeros(probs.shape[:-1] + (size + 1,), dtype=torch.long, device=probs.device)
    diff.scatter_add_(-1, counts, torch.ones_like(counts))
    return diff[..., :-1].cumsum(-1).clamp_max(size - 1)


def log_mean_exp(log_w, dim=-1):
    """log mean_j exp(log_w_j); -inf when every weight is zero."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def ess_of(log_w):
    """Kish's effective sample size (sum w)^2 / sum w^2 over the last dimension (0 if all w = 0)."""
    ess = torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))
    return torch.nan_to_num(ess, nan=0.0)


def smc_impute(process, values, mask, num_samples, num_particles, num_groups, generator):
    """Twisted SMC for B rows, ``num_groups`` independent filters of ``num_particles`` each per row.

    Rows are processed in chunks that keep one network evaluation below MAX_BATCH_POSITIONS."""
    chunk = max(1, MAX_BATCH_POSITIONS // (num_particles * num_groups * process.n))
    parts = [_smc_rows(process, values[i:i + chunk], mask[i:i + chunk], num_samples, num_particles, num_groups,
                       generator) for i in range(0, len(values), chunk)]
    return Imputation(*(torch.cat([getattr(p, f) for p in parts]) for f in
                        ("completions", "marginals", "log_evidence", "log_evidence_se", "ess")))


def _smc_rows(process, values, mask, num_samples, N, R, generator):
    """The filter (docs/conditioning.md).  Targets gamma_t(x^{t:T}) = p(x^{t:T}) tw_t(x^t), tw_0 = 1[x^0_O = y];
    proposal r_t: missing positions from p(x^{t-1}_i | x^t), observed ones from
    (1 - lambda) q(x^{t-1}_i | x^t_i, x^0_i = y_i) + lambda p(x^{t-1}_i | x^t) (x^T_i: q(x^T_i | x^0_i = y_i)
    against pi; lambda = DEFENSIVE_WEIGHT); incremental weight

        w_t = prod_{i in O} [p(x^{t-1}_i | x^t) / r_t(x^{t-1}_i)] tw_{t-1}(x^{t-1}) / tw_t(x^t),

    log Z = sum over resampling epochs of log mean_j W_j: unbiased for p(x^0_O = y)."""
    kernel = process.kernel
    B, n = values.shape
    shape = (B, R, N, n)
    y = values[:, None, None, :].expand(shape)
    observed = mask[:, None, None, :].expand(shape)
    prior = kernel.prior_log_probs(shape)
    x, log_w = _propose(kernel, prior, kernel.q_marginal_log_probs(y, process.T), observed, generator)
    log_z = torch.zeros(B, R, dtype=torch.float64, device=values.device)
    for t in range(process.T, 0, -1):
        step, log_twist = step_and_log_twist(process, x, t, y, observed)
        log_w = log_w + log_twist.double()
        if t > 1:  # at t = 1 the remaining weight is exactly 1 (see step_and_log_twist)
            resample = ess_of(log_w) < ESS_FRACTION * N  # (B, R)
            if bool(resample.any()):
                log_z = log_z + torch.where(resample, log_mean_exp(log_w), 0.0)
                # a group whose weights are all zero (Z_r = 0) resamples uniformly: its Z_r stays 0
                feasible = torch.where(torch.isfinite(log_w).any(-1, keepdim=True), log_w, 0.0)
                ancestors = systematic_resample(feasible, generator)
                keep = torch.arange(N, device=values.device).expand(B, R, N)
                ancestors = torch.where(resample.unsqueeze(-1), ancestors, keep)
                x, step, log_twist = (_take(a, ancestors) for a in (x, step, log_twist))
                log_w = torch.where(resample.unsqueeze(-1), torch.zeros_like(log_w), log_w)
            x, log_ratio = _propose(kernel, step, kernel.q_posterior_log_probs(x, y, t), observed, generator)
            log_w = log_w + log_ratio - log_twist.double()
    log_z = log_z + log_mean_exp(log_w)  # (B, R): one unbiased estimate per group
    # x^0: observed positions are y, missing ones drawn from the edge step of each particle
    x0 = torch.where(observed, y, kernel.sample_states(step, generator).to(y.dtype))
    # pooled weights: group r's particles weighted by Z_r W_rj / sum_r Z_r
    pooled = (log_z.unsqueeze(-1) + log_w - torch.logsumexp(log_w, -1, keepdim=True)).reshape(B, R * N)
    pooled = torch.where(torch.isfinite(pooled).any(-1, keepdim=True), pooled, 0.0)
    weights = torch.softmax(pooled, -1)
    edge = step.double().exp()[..., :kernel.num_data_states].reshape(B, R * N, n, -1)
    marginals = torch.einsum("bj,bjnk->bnk", weights, edge)  # Rao-Blackwellised over x^0 | x^1
    marginals = torch.where(mask.unsqueeze(-1), _one_hot(values, kernel), marginals)
    draws = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    completions = x0.reshape(B, R * N, n).gather(1, draws.unsqueeze(-1).expand(B, num_samples, n))
    log_evidence = log_mean_exp(log_z)
    z = (log_z - log_evidence.unsqueeze(-1)).exp()  # Z_r / mean Z
    se = (z.std(-1, unbiased=True) / math.sqrt(R) if R > 1
          else torch.full((B,), math.nan, dtype=torch.float64, device=values.device))
    return Imputation(completions, marginals, log_evidence, se, ess_of(pooled))


def _propose(kernel, model_log_probs, guided_log_probs, observed, generator):
    """Draw every position: missing ones from the model, observed ones from the defensive mixture

        r(k) = (1 - lambda) guided(k) + lambda model(k),

    and return (states, sum_{i in O} log model(x_i) - log r(x_i)) in float64."""
    lam = DEFENSIVE_WEIGHT
    model_draw = kernel.sample_states(model_log_probs, generator)
    guided_draw = kernel.sample_states(guided_log_probs, generator).to(model_draw.dtype)
    use_model = torch.rand(observed.shape, generator=generator, device=observed.device) < lam
    x = torch.where(observed & ~use_model, guided_draw, model_draw)
    model_lp, guided_lp = _pick(model_log_probs, x).double(), _pick(guided_log_probs, x).double()
    proposal_lp = torch.logaddexp(math.log1p(-lam) + guided_lp, math.log(lam) + model_lp)
    return x, torch.where(observed, model_lp - proposal_lp, 0.0).sum(-1)


def _take(tensor, ancestors):
    """tensor[b, r, ancestors[b, r, j], ...]: particles picked along dim 2."""
    index = ancestors.reshape(ancestors.shape + (1,) * (tensor.dim() - 3)).expand(
        ancestors.shape + tensor.shape[3:])
    return tensor.gather(2, index)
