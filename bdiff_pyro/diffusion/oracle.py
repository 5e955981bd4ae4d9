"""The oracle reverse process: the best factorised reverse step when the data distribution is
known and has finite support {d_1..d_M} with weights w_j (docs/math.md §3).

For t >= 2 the bound asks each step to minimise E_{q(x^0, x^t)} KL(q(x^{t-1} | x^t, x^0) ||
p(x^{t-1} | x^t)).  Given x^0 the posterior factorises over dimensions, so for a factorised p the
loss splits into one cross-entropy per dimension and the minimiser is the posterior mean

    f*_i(x^t) = sum_j P(d_j | x^t) q(x^{t-1}_i | x^t_i, d_{j,i}),   P(d_j | x^t) ∝ w_j q(x^t | d_j)
              = sum_v P(x^0_i = v | x^t) q(x^{t-1}_i | x^t_i, x^0_i = v)

(the second line groups the patterns by their value at i; it is
``kernel.q_posterior_log_probs_mixture`` fed the per-dimension marginal posterior).  At t = 1 the
oracle uses the paper's edge step when the kernel has one, and otherwise the per-dimension
marginal P(x^0_i | x^1), which maximises E log p(x^0 | x^1) over factorised steps.

The oracle's bound K* is the limit no network with a factorised reverse step can pass for the
chosen kernel, T and schedule.  Two ways to compute it:

- ``oracle_bound``: Monte Carlo with a standard error, through ``bound.elbo_replicates``.
- ``oracle_elbo_exact``: exact, by grouping dimensions whose column (d_{1,i}..d_{M,i}) is the
  same.  Such dimensions are exchangeable, so x^t enters only through how many dimensions of
  each group sit in each state; the sum over x^t becomes a sum over those counts
  (multinomial weights).  Heartbeat n = 20, period 5 has 5 groups of 4: 5^5 configurations
  instead of 2^20 states.
"""

import itertools
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from bdiff_pyro.diffusion.bound import (
    closed_form_loss,
    elbo_replicates,
    entropy,
    first_stochastic_step,
    kl_categorical,
    log_prob_of,
    papers_K_fields,
    sample_x_t,
)
from bdiff_pyro.diffusion.kernels import normalise
from bdiff_pyro.diffusion.steps import edge_or_step
from bdiff_pyro.errors import UserError
from bdiff_pyro.util.stats import LN2, mean_and_standard_error


def _check_support(patterns, weights, num_states):
    patterns = torch.as_tensor(patterns)
    if patterns.dim() != 2 or patterns.shape[0] == 0 or patterns.shape[1] == 0:
        raise UserError(f"patterns must be a non-empty (M, n) array (got shape {tuple(patterns.shape)})")
    codes = patterns.long()
    if not torch.equal(codes.to(patterns.dtype), patterns) or codes.min() < 0 or codes.max() >= num_states:
        raise UserError(f"patterns must hold state codes 0..{num_states - 1}")
    if weights is None:
        weights = torch.ones(len(codes), dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (len(codes),) or bool((weights <= 0).any()):
        raise UserError(f"weights must be {len(codes)} positive numbers (got {weights.tolist()})")
    return codes, weights / weights.sum()


class OracleReverse(nn.Module):
    """The optimal factorised reverse process for data with known finite support.

    ``patterns``: (M, n) state codes d_1..d_M; ``weights``: (M,) positive (normalised here;
    default uniform).  A reverse step (``bdiff_pyro.programs.sampling.ReverseStep``): ``kernel``,
    ``n``, ``T``, ``log_probs(x_t, t)``, ``logits``, ``x0_log_probs``, ``x0_logits``, and
    ``reverse_probs`` as ``ReverseProcess`` has it; the samplers of ``bdiff_pyro.programs.sampling``
    draw from it.
    """

    def __init__(self, kernel, patterns, weights=None):
        super().__init__()
        codes, weights = _check_support(patterns, weights, kernel.num_states)
        self.kernel = kernel
        self.register_buffer("patterns", codes)  # (M, n) long
        self.register_buffer("log_weights", weights.log().to(kernel.log_pi.dtype))  # (M,)
        # [d_{j,i} = v] as (M, n, K), to marginalise over patterns
        one_hot = nn.functional.one_hot(codes, kernel.num_states).to(kernel.log_pi.dtype)
        self.register_buffer("pattern_one_hot", one_hot)
        # log sum_j w_j [d_{j,i} = v], (n, K): what the patterns say about dimension i alone
        self.register_buffer("log_dimension_prior", torch.einsum("j,jiv->iv", weights.to(one_hot), one_hot).log())

    @property
    def n(self):
        return self.patterns.shape[1]

    @property
    def T(self):
        return self.kernel.T

    @property
    def weights(self):
        return self.log_weights.exp()

    def pattern_log_posterior(self, x_t, t):
        """log P(d_j | x^t) = log w_j + log q(x^t | d_j) - log sum_l w_l q(x^t | d_l), shape (..., M),
        and -inf for every j where no pattern can produce x^t (there is no posterior).

        t is an int or a LongTensor of shape x_t.shape[:-1], in 1..T.
        """
        batch = x_t.shape[:-1]
        if isinstance(t, int):
            log_q = self.kernel.q_marginal_log_probs(self.patterns, t)  # (M, n, K)
        else:
            t = torch.as_tensor(t, device=x_t.device).long()
            patterns = self.patterns.expand(*batch, *self.patterns.shape)  # (..., M, n)
            log_q = self.kernel.q_marginal_log_probs(patterns, t.unsqueeze(-1).expand(*batch, len(self.patterns)))
        log_joint = log_prob_of(log_q, x_t.unsqueeze(-2)).sum(-1) + self.log_weights  # (..., M)
        impossible = torch.isneginf(log_joint).all(-1, keepdim=True)
        return torch.where(impossible, -math.inf, normalise(log_joint))

    def x0_log_probs(self, x_t, t):
        """Per-dimension marginal log P(x^0_i = v | x^t) = log sum_j P(d_j | x^t) [d_{j,i} = v], (..., n, K).

        The factorised oracle can reach an x^t that no pattern produces (absorbing kernel: dimensions
        unmasked from different patterns).  There each dimension reads its own evidence, as a network
        given it does (``model.add_own_evidence``), and keeps what is unmasked:

            P(x^0_i = v | x^t_i)  ∝  sum_j w_j [d_{j,i} = v] q(x^t_i | x^0_i = v),

        or sum_j w_j [d_{j,i} = v] alone if no pattern's value at i can produce x^t_i either.
        """
        # A sum of probabilities (no cancellation); the largest P(d_j | x^t) is >= 1/M, so only
        # values below ~1e-308 are lost (they become log 0 = -inf, which the mixture tolerates).
        posterior = self.pattern_log_posterior(x_t, t).exp()
        log_marginal = torch.einsum("...j,jiv->...iv", posterior, self.pattern_one_hot).log()
        own_evidence = self.log_dimension_prior + self.kernel.x0_likelihood(x_t, t)
        fallback = torch.where(torch.isneginf(own_evidence).all(-1, keepdim=True),
                               self.log_dimension_prior.expand_as(own_evidence), own_evidence)
        return torch.where(torch.isneginf(log_marginal).all(-1, keepdim=True), normalise(fallback), log_marginal)

    def log_probs(self, x_t, t):
        """log p*(x^{t-1} = k | x^t), shape (..., n, K); t = 1 is the edge step."""
        if isinstance(t, int) and not 1 <= t <= self.T:
            raise ValueError(f"t must lie in 1..{self.T} (got {t})")
        return edge_or_step(self._edge_log_probs, self._step_log_probs, x_t, t)

    def _edge_log_probs(self, x1):
        """The paper's edge step where the kernel has one, else the marginal P(x^0_i | x^1)."""
        return self.kernel.edge_log_probs(x1) if self.kernel.closed_form_edge else self.x0_log_probs(x1, 1)

    def _step_log_probs(self, x_t, t):
        return self.kernel.q_posterior_log_probs_mixture(x_t, self.x0_log_probs(x_t, t), t)

    def logits(self, x_t, t):
        """Bits: log p*(x^{t-1} = 1 | x^t) - log p*(x^{t-1} = 0 | x^t), shape (..., n)."""
        log_probs = self.log_probs(x_t, t)
        return log_probs[..., 1] - log_probs[..., 0]

    def x0_logits(self, x_t, t):
        """Bits: the logit of the marginal P(x^0_i = 1 | x^t), shape (..., n)."""
        log_probs = self.x0_log_probs(x_t, t)
        return log_probs[..., 1] - log_probs[..., 0]

    def reverse_probs(self, x_t, t):
        """P(x^{t-1} = 1 | x^t) for bits, (B, n)."""
        if self.kernel.num_states != 2:
            raise ValueError("reverse_probs is the binary API; use log_probs for K > 2 states")
        with torch.no_grad():
            return self.log_probs(x_t, t)[..., 1].exp()


# ---------------------------------------------------------------------------------------
# The oracle's bound


def data_entropy_bits(weights):
    """H(w) in bits: -H(w) is the data's expected log-likelihood, the best any model can do."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return float(-(w * w.log()).sum() / LN2)


def oracle_bound(kernel, patterns, weights=None, replicates=16, seed=0):
    """Monte Carlo estimate of the oracle's ELBO averaged over the data distribution,
    (mean_bits, se_bits): sum_j w_j ELBO(d_j), each ELBO(d_j) from ``replicates`` independent
    stratified-over-t estimates (``bound.elbo_replicates``)."""
    oracle = OracleReverse(kernel, patterns, weights)
    estimates = oracle_elbo_replicates(oracle, replicates, seed)
    return _mean_and_se_bits(estimates, oracle.weights)


def step_gaps(oracle, reverse_log_probs, draws=500, seed=0, progress=False):
    """How far a reverse process falls short of the oracle at each step, in nats per sequence:
    for t = 1..T,

        G_t = E_{x^0 ~ w} E_{x^t ~ q(x^t | x^0)} sum_i KL( p*(x^{t-1}_i | x^t) || p(x^{t-1}_i | x^t) ),

    which is exactly K*_t - K_t: given x^t, the step-t term's cross-entropy is linear in
    q(x^{t-1}_i | x^t, x^0), whose average over x^0 given x^t is the oracle's step (docs/math.md
    §3).  So sum_t G_t = K* - K, with far less noise than the difference of two bound estimates:
    the x^0 drawn enter only through x^t.  Steps with a closed-form edge have G_1 = 0.

    ``draws`` x^0 (weighted draws from the patterns) and x^t per step; returns (G, se), two
    (T,) float64 tensors, the Monte Carlo means and standard errors.
    """
    kernel = oracle.kernel
    means, ses = torch.zeros(oracle.T, dtype=torch.float64), torch.zeros(oracle.T, dtype=torch.float64)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for t in tqdm(range(1, oracle.T + 1), disable=not progress, desc="gap to the oracle", unit="step"):
            x0 = oracle.patterns[torch.multinomial(oracle.weights, draws, replacement=True)]
            x_t = sample_x_t(kernel, x0.to(kernel.log_pi.dtype), t)
            gaps = kl_categorical(oracle.log_probs(x_t, t), reverse_log_probs(x_t, t).to(torch.float64)).sum(-1)
            means[t - 1], ses[t - 1] = gaps.mean(), gaps.std() / math.sqrt(draws)
    return means, ses


def oracle_elbo_replicates(oracle, replicates, seed, progress=False):
    """(M, R) ELBO estimates in nats, one row per pattern (``progress``: a bar over the rows)."""
    x0 = oracle.patterns.to(oracle.kernel.log_pi.dtype)
    total = replicates * len(x0) * (oracle.T + 1 - first_stochastic_step(oracle.kernel))
    with torch.random.fork_rng(), tqdm(total=total, disable=not progress, desc="oracle bound", unit="row") as bar:
        torch.manual_seed(seed)
        # rows per batch such that the (rows, M, n, K) tensors of the pattern posterior stay small
        max_rows = max(1, 2 ** 22 // (len(oracle.patterns) * oracle.n * oracle.kernel.num_states))

        def log_probs(x_t, t):
            bar.update(len(x_t))
            return oracle.log_probs(x_t, t)

        return elbo_replicates(oracle.kernel, log_probs, x0, replicates, max_rows=max_rows)


def _mean_and_se_bits(estimates, weights):
    """(sum_j w_j mean_r e_jr, its standard error) in bits, from (M, R) estimates in nats."""
    if estimates.shape[1] < 2:
        raise UserError(f"a standard error needs at least two replicates (got {estimates.shape[1]})")
    mean, se = mean_and_standard_error(estimates, weights)
    return mean / LN2, se / LN2


def _compositions(total, parts):
    """Every vector of ``parts`` non-negative integers summing to ``total``."""
    if parts == 1:
        return [(total,)]
    return [(first,) + rest for first in range(total + 1) for rest in _compositions(total - first, parts - 1)]


def pattern_groups(patterns):
    """Dimensions i with the same column (d_{1,i}..d_{M,i}) form a group: (columns (G, M), sizes (G,))."""
    return torch.unique(patterns.long().T, dim=0, return_counts=True)


def number_of_configurations(patterns, num_states):
    """prod_g C(m_g + K - 1, K - 1): how many count configurations the exact bound sums over."""
    _, sizes = pattern_groups(patterns)
    return math.prod(math.comb(int(size) + num_states - 1, num_states - 1) for size in sizes)


def exact_cost(patterns, num_states):
    """Elements per step of the exact bound's largest tensors: C G K^2 max(M, K)."""
    columns, _ = pattern_groups(patterns)
    return (number_of_configurations(patterns, num_states) * len(columns) * num_states ** 2
            * max(len(patterns), num_states))


def count_configurations(patterns, num_states, max_configurations=200_000):
    """The groups of exchangeable dimensions and every configuration of counts.

    Returns (columns (G, M) long, sizes (G,) long, counts (C, G, K) float64): a configuration
    says how many dimensions of each group are in each state.
    """
    number = number_of_configurations(patterns, num_states)
    if number > max_configurations:
        raise UserError(f"{number} count configurations (more than {max_configurations}); "
                        "use the Monte Carlo oracle_bound instead")
    columns, sizes = pattern_groups(patterns)
    per_group = [_compositions(int(size), num_states) for size in sizes]
    configurations = torch.tensor(list(itertools.product(*per_group)), dtype=torch.float64)
    return columns, sizes, configurations.view(-1, len(columns), num_states)


def oracle_elbo_exact(kernel, patterns, weights=None, max_configurations=200_000, max_elements=2 ** 23):
    """The oracle's ELBO of each pattern, exactly (nats, shape (M,)).

    ELBO(d_j) = closed-form terms - sum_t E_{q(x^t | d_j)} L_t(d_j, x^t), the expectation over x^t
    taken over count configurations (module docstring).  Under x^0 = d_j the counts c_{g,.} of
    group g are Multinomial(m_g, Qbar_t[d_{j,g}, :]); the pattern posterior, hence the oracle's
    step f*_{g,k} for a dimension of group g in state k, depends on x^t only through the counts:

        L_t = sum_g sum_k c_{g,k} KL(q(x^{t-1} | x^t = k, d_{j,g}) || f*_{g,k})          (t >= 2)
            = sum_g sum_k c_{g,k} [ -H(q(. | k, d_{j,g})) - sum_k' q(k' | k, d_{j,g}) log f*_{g,k}(k') ]

    The entropy part has expectation sum_{g,k} m_g Qbar_t[d_{j,g}, k] (-H); the cross-entropy part
    is summed over configurations.  For a learned edge step the t = 1 loss is
    -sum_g m_g log P(x^0_i = d_{j,g} | x^1).
    """
    codes, w = _check_support(patterns, weights, kernel.num_states)
    if exact_cost(codes, kernel.num_states) > max_elements:
        raise UserError(f"the exact oracle bound needs {exact_cost(codes, kernel.num_states)} elements per step "
                        f"(more than {max_elements}); use the Monte Carlo oracle_bound instead")
    dtype = kernel.log_pi.dtype
    log_w = w.log().to(dtype)
    columns, sizes, counts = count_configurations(codes, kernel.num_states, max_configurations)
    num_configurations, num_groups, K = counts.shape
    M = len(codes)
    counts, sizes = counts.to(dtype), sizes.to(dtype)
    log_multinomial = torch.lgamma(sizes + 1).sum() - torch.lgamma(counts + 1).sum((-1, -2))  # (C,)
    column_one_hot = nn.functional.one_hot(columns, K).to(dtype)  # (G, M, K_v): [d_{l,g} = v]

    def configuration_terms(t):
        """For steps t (S,): log q(counts | d_l) (C, S, M) without the multinomial coefficient,
        and the marginal P(x^0_i = v | x^t) for i in group g, (C, S, G, K_v)."""
        log_q_rows = kernel.log_Qbar[t][:, columns]  # log Qbar_t[d_{l,g}, k]: (S, G, M, K)
        finite = torch.nan_to_num(log_q_rows, neginf=-1e300)  # a zero-probability state has count 0
        log_likelihood = torch.einsum("cgk,sglk->csl", counts, finite)
        log_joint = log_likelihood + log_w
        pattern_posterior = (log_joint - log_joint.amax(-1, keepdim=True)).exp()  # P(d_l | x^t), unnormalised
        pattern_posterior = pattern_posterior / pattern_posterior.sum(-1, keepdim=True)
        return log_likelihood, torch.einsum("csl,glv->csgv", pattern_posterior, column_one_hot)

    expected_loss = torch.zeros(M, dtype=dtype)
    if not kernel.closed_form_edge:  # t = 1: the oracle's p(x^0 | x^1) is the marginal posterior
        log_likelihood, x0_probs = configuration_terms(torch.tensor([1]))
        log_true = x0_probs.gather(-1, columns.expand(*x0_probs.shape[:2], -1, -1)).log()  # (C, 1, G, M)
        weight = (log_multinomial[:, None, None] + log_likelihood).exp()  # P(counts | d_j): (C, 1, M)
        log_true = torch.where(weight[:, :, None, :] > 0, log_true, torch.zeros_like(log_true))
        expected_loss -= torch.einsum("csm,g,csgm->m", weight, sizes, log_true)

    steps = torch.arange(2, kernel.T + 1)
    chunk = max(1, max_elements // (num_configurations * num_groups * K * K * max(M, K)))
    state_grid = torch.arange(K).repeat_interleave(K)  # x^t = k, then x^0 = v: (K*K,)
    value_grid = torch.arange(K).repeat(K)
    for start in range(0, len(steps), chunk):
        t = steps[start:start + chunk]  # (S,)
        log_likelihood, x0_probs = configuration_terms(t)
        # q(x^{t-1} = k' | x^t = k, x^0 = v): (S, K, K_v, K')
        log_posterior = kernel.q_posterior_log_probs(state_grid.expand(len(t), -1),
                                                     value_grid.expand(len(t), -1), t).view(len(t), K, K, K)
        posterior = log_posterior.exp()
        # the oracle's step for a dimension of group g in state k: sum_v P(v | x^t) q(. | k, v)
        oracle = torch.einsum("csgv,skvq->csgkq", x0_probs, posterior)
        # a zero here can only meet a zero of q(. | x^t, x^0) below (0 log 0 = 0): clamp, not -inf
        log_oracle = oracle.clamp_min(1e-300).log()
        weight = (log_multinomial[:, None, None] + log_likelihood).exp()  # P(counts | d_j): (C, S, M)
        # sum_c P(c | d_j) sum_{g,k} c_{g,k} log f*_{g,k}(k'), then against q(k' | k, d_{j,g})
        weighted_log_oracle = torch.einsum("csm,cgk,csgkq->smgkq", weight, counts, log_oracle)
        true_posterior = posterior[:, :, columns]  # q(k' | k, d_{j,g}): (S, K, G, M, K')
        cross_entropy = -torch.einsum("smgkq,skgmq->m", weighted_log_oracle, true_posterior)
        # expected counts m_g Qbar_t[d_{j,g}, k] times the posterior's negative entropy
        expected_counts = sizes[None, :, None, None] * kernel.log_Qbar[t][:, columns].exp()  # (S, G, M, K)
        negative_entropy = -entropy(log_posterior)[:, :, columns]  # (S, K, G, M)
        expected_loss += cross_entropy + torch.einsum("sgmk,skgm->m", expected_counts, negative_entropy)
    return -(closed_form_loss(kernel, codes.to(dtype)) + expected_loss)


def oracle_report(kernel, patterns, weights=None, replicates=16, seed=0, exact="auto", schedule=None, power=None,
                  progress=False):
    """The oracle's bound on the data distribution, in bits/seq, as a dict.

    ``elbo_bits`` is the ELBO, ``K_bits`` the paper's K (the ELBO without the pi correction; equal
    for pi_1 = 1/2; None, with ``K_undefined`` saying why, where pi has zeros), ``se_bits`` the
    Monte Carlo standard error (0 when computed exactly), ``gap_bits`` = -H(w) - ELBO >= 0.
    ``exact``: True, False or "auto" (exact when the count configurations are few).  Keys named
    as in ``evaluation.bound_report``.  ``progress``: a bar
    for the Monte Carlo estimate.
    """
    oracle = OracleReverse(kernel, patterns, weights)
    x0 = oracle.patterns.to(kernel.log_pi.dtype)
    w = oracle.weights
    method = "exact"
    if exact == "auto":
        exact = exact_cost(oracle.patterns, kernel.num_states) <= 2 ** 23
    if exact:
        per_pattern = oracle_elbo_exact(kernel, oracle.patterns, w)
        elbo_bits, se_bits = float((w * per_pattern).sum()) / LN2, 0.0
    else:
        method = f"monte carlo, {replicates} replicates, seed {seed}"
        elbo_bits, se_bits = _mean_and_se_bits(oracle_elbo_replicates(oracle, replicates, seed, progress), w)
    data_entropy = data_entropy_bits(w)
    beta_tilde = getattr(kernel, "beta_tilde", None)
    return {
        "elbo_bits": elbo_bits,
        **papers_K_fields(kernel, x0, elbo_bits, w),
        "se_bits": se_bits,
        "data_log_likelihood_bits": -data_entropy,
        "gap_bits": -data_entropy - elbo_bits,
        "T": kernel.T,
        "schedule": schedule,
        "schedule_power": power,
        "pi_1": float(kernel.pi[-1]) if kernel.num_states == 2 else None,
        "beta_tilde_1": float(beta_tilde[1]) if beta_tilde is not None else None,
        "n": oracle.n,
        "num_patterns": len(oracle.patterns),
        "method": method,
    }
