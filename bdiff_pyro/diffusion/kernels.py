"""Discrete transition kernels: closed forms only, no training (docs/math.md sections 1, 4).

A kernel acts independently on each of the n dimensions of a sequence; each dimension
takes one of K states (K = 2 for bits). It is described by row-stochastic matrices

    Q_t[j, k]    = q(x^t = k | x^{t-1} = j),          t = 1..T   (docs/math.md §4)
    Qbar_t[j, k] = q(x^t = k | x^0 = j) = (Q_1 ... Q_t)[j, k],     Qbar_0 = I

and a stationary distribution pi.  Everything downstream (the Pyro programs, the bound,
the oracle) reads a kernel only through the methods of :class:`DiscreteKernel`, so a new
kernel is one subclass that provides ``step_matrices`` (and, if it has one, a cheaper
closed form for ``cumulative_matrices``).

States are integer codes 0..K-1; for bits the code is the bit.  Tables are built in
float64 and stored as log-probabilities, so ``kernel.double()`` gives float64 everywhere.
They are derived from the configuration, so they are not saved in checkpoints.
"""

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from bdiff_pyro import registry
from bdiff_pyro.diffusion.schedules import betas_from_beta_tilde
from bdiff_pyro.errors import UserError

# ---------------------------------------------------------------------------------------
# Kernels

#: t: one step for every sequence, or one per sequence (a LongTensor of shape x.shape[:-1])
Time = Union[int, Tensor]


def _index(x):
    """State codes as a LongTensor (Pyro's Bernoulli sites hold floats 0./1.)."""
    return x.long() if x.dtype != torch.long else x


def _rows(table, t, x):
    """table[t][x_i, :] for every dimension: (T+1, K, K), t, (..., n) -> (..., n, K).

    t is an int or a LongTensor of shape x.shape[:-1] (one time per sequence).
    """
    x = _index(x)
    if isinstance(t, int):
        return table[t][x]
    t = torch.as_tensor(t, device=x.device).long().unsqueeze(-1).expand(x.shape)
    return table[t, x]


def normalise(log_weights):
    """Log-probabilities from unnormalised log-weights over the last dimension."""
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


class DiscreteKernel(nn.Module):
    """A forward noising kernel with K states per dimension and T steps.

    Subclasses implement :meth:`step_matrices` and :attr:`stationary`; they may override
    :meth:`cumulative_matrices` with a closed form.  Buffers (all log-probabilities):
    ``log_Q`` (T+1, K, K) with log_Q[0] = log I, ``log_Qbar`` (T+1, K, K), ``log_pi`` (K,).
    """

    #: True when the paper's edge step p(x^0 | x^1) = q(x^1 | x^0) pi(x^0) / pi(x^1) is a
    #: proper distribution with full support (pi > 0 in every state), so the t = 1 term of
    #: the bound is closed form (docs/math.md §2.1).  Otherwise p(x^0 | x^1) is learned.
    closed_form_edge = True

    @property
    def num_data_states(self) -> int:
        """States data can take (all K, except for kernels with an extra mask state)."""
        return self.num_states

    @classmethod
    def build(cls, beta_tilde: Tensor, num_states: int, pi_1: float = 0.5) -> "DiscreteKernel":
        """The kernel for a schedule and data with ``num_states`` states per dimension: how
        ``make_kernel`` builds a registered kernel (``pi_1`` is for two-state kernels)."""
        return cls(beta_tilde, num_states)

    def __init__(self, T, num_states):
        super().__init__()
        if T < 2:
            raise UserError(f"T must be at least 2 (got {T})")
        self.T = int(T)
        self.num_states = int(num_states)
        Q = self.step_matrices()
        self.register_buffer("log_Q", torch.log(Q), persistent=False)
        self.register_buffer("log_Qbar", torch.log(self.cumulative_matrices(Q)), persistent=False)
        self.register_buffer("log_pi", torch.log(self.stationary), persistent=False)
        # posterior table [t, x^t, x^0, k] = log q(x^{t-1} = k | x^t, x^0), built once in float64
        # (row t = 0 is never used and holds the uniform distribution, not NaN)
        table = torch.full((self.T + 1,) + (self.num_states,) * 3, -math.log(self.num_states), dtype=Q.dtype)
        for t in range(1, self.T + 1):
            table[t] = posterior_table(self.log_Q[t], self.log_Qbar[t - 1])
        self.register_buffer("log_posterior", table, persistent=False)

    # -- what a kernel defines ------------------------------------------------------------
    def step_matrices(self) -> Tensor:
        """(T+1, K, K) float64: Q_0 = I, then Q_t[j, k] = q(x^t = k | x^{t-1} = j)."""
        raise NotImplementedError

    @property
    def stationary(self) -> Tensor:
        """(K,) float64 stationary distribution pi of the chain."""
        raise NotImplementedError

    def cumulative_matrices(self, Q: Tensor) -> Tensor:
        """Qbar_t = Q_1 ... Q_t by repeated products (kernels with a closed form override)."""
        Qbar = torch.empty_like(Q)
        Qbar[0] = torch.eye(self.num_states, dtype=Q.dtype)
        for t in range(1, self.T + 1):
            Qbar[t] = Qbar[t - 1] @ Q[t]
        return Qbar

    # -- the closed forms every consumer uses -----------------------------------------------
    @property
    def pi(self) -> Tensor:
        """Stationary distribution over states, e.g. tensor([1 - pi_1, pi_1]) for bits."""
        return self.log_pi.exp()

    def prior_log_probs(self, shape: tuple) -> Tensor:
        """log pi(x^T = k) broadcast to shape + (K,)."""
        return self.log_pi.expand(*shape, self.num_states)

    def q_step_log_probs(self, x_prev: Tensor, t: Time) -> Tensor:
        """log q(x^t = k | x^{t-1}) = log Q_t[x^{t-1}, k], shape (..., n, K)."""
        return _rows(self.log_Q, t, x_prev)

    def q_step_likelihood(self, x_t: Tensor, t: Time) -> Tensor:
        """log q(x^t | x^{t-1} = k) = log Q_t[k, x^t] over k, shape (..., n, K)."""
        return _rows(self.log_Q.transpose(-1, -2), t, x_t)

    def x0_likelihood(self, x_t: Tensor, t: Time) -> Tensor:
        """log q(x^t | x^0 = v) = log Qbar_t[v, x^t] over v, shape (..., n, K)."""
        return _rows(self.log_Qbar.transpose(-1, -2), t, x_t)

    def q_marginal_log_probs(self, x0: Tensor, t: Time) -> Tensor:
        """log q(x^t = k | x^0) = log Qbar_t[x^0, k], shape (..., n, K)."""
        return _rows(self.log_Qbar, t, x0)

    def q_posterior_log_probs(self, x_t: Tensor, x0: Tensor, t: Time) -> Tensor:
        """Normalised log q(x^{t-1} = k | x^t, x^0), for t >= 2 (docs/math.md §4):
        a look-up in the table built by :func:`posterior_table`."""
        x_t, x0 = torch.broadcast_tensors(_index(x_t), _index(x0))
        if isinstance(t, int):
            return self.log_posterior[t][x_t, x0]
        t = torch.as_tensor(t, device=x_t.device).long().unsqueeze(-1).expand(x_t.shape)
        return self.log_posterior[t, x_t, x0]

    def q_posterior_log_probs_mixture(self, x_t: Tensor, x0_log_probs: Tensor, t: Time,
                                      s: Optional[int] = None) -> Tensor:
        """log sum_v q(x^s = k | x^t, x^0 = v) P(x^0 = v), s = t - 1 unless given (docs/math.md §3).

        x0_log_probs: (..., n, K) log P(x^0 = v) per dimension.  This is the through-x^0
        parameterisation of the reverse step (also the oracle's form); with s < t - 1 it is
        the strided jump.  Mixed in log space: in float32 both factors can be ~1e-45, whose
        product underflows to 0 and would make a possible state impossible.
        """
        if s is None or (isinstance(t, int) and s == t - 1):
            table = _rows(self.log_posterior, t, x_t)  # (..., n, K_v, K)
        else:
            table = self.posterior_rows(t, s)[_index(x_t)]
        return safe_logsumexp(x0_log_probs.unsqueeze(-1) + table, dim=-2)  # (..., n, K)

    def posterior_rows(self, t: int, s: Optional[int] = None) -> Tensor:
        """(K, K, K) table [j, v, k] = log q(x^s = k | x^t = j, x^0 = v), s = t - 1 unless given:
        the table built at construction, or :func:`posterior_table` of the s -> t span."""
        if s is None or s == t - 1:
            return self.log_posterior[t]
        return posterior_table(self.log_span(s, t), self.log_Qbar[s])

    def log_span(self, s: int, t: int) -> Tensor:
        """log of the s -> t transition matrix Q_{s+1} ... Q_t (products; closed forms override)."""
        span = torch.eye(self.num_states, dtype=self.log_Q.dtype, device=self.log_Q.device)
        for step in range(s + 1, t + 1):
            span = span @ self.log_Q[step].exp()
        return span.log()

    def edge_log_probs(self, x1: Tensor) -> Tensor:
        """The paper's edge step log p(x^0 = k | x^1) = log q(x^1 | x^0 = k) + log pi_k - log pi(x^1).

        Normalised because pi is stationary: sum_k pi_k Q_1[k, j] = pi_j.
        """
        x1 = _index(x1)
        return self.q_step_likelihood(x1, 1) + self.log_pi - self.log_pi[x1].unsqueeze(-1)

    def sample_marginal(self, x0: Tensor, t: Time) -> Tensor:
        """x^t ~ q(x^t | x^0) = Qbar_t[x^0, :] for every dimension, from torch's global generator
        (kernels with a cheaper exact draw override)."""
        return self.sample_states(self.q_marginal_log_probs(x0, t))

    def sample_states(self, log_probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One draw of every position from log_probs (..., n, K): floats 0./1. for K = 2,
        integer codes otherwise.  The same torch operations, hence the same draws for the same
        random state, as sampling the Pyro sites of ``bdiff_pyro.programs.reverse.state_dist``
        (Bernoulli on the logit, Categorical on the normalised logits)."""
        if self.num_states == 2:
            return torch.bernoulli(torch.sigmoid(log_probs[..., 1] - log_probs[..., 0]), generator=generator)
        probs = torch.softmax(normalise(log_probs), dim=-1)
        draws = torch.multinomial(probs.reshape(-1, self.num_states), 1, True, generator=generator)
        return draws.reshape(probs.shape[:-1])


def safe_logsumexp(log_terms, dim):
    """log sum_k exp(a_k) over ``dim`` = m + log sum_k exp(a_k - m), m = max_k a_k: the largest
    term is 1 after the shift, so a sum of terms that each underflow in probabilities is finite.

    m is held constant (the value does not depend on it) and taken as 0 where every a_k = -inf;
    there the sum is 0 and :func:`safe_log` gives -inf with a zero gradient (torch.logsumexp's
    gradient exp(a_k - result) would be exp(-inf + inf) = NaN).
    """
    shift = log_terms.detach().amax(dim, keepdim=True)
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)
    return safe_log((log_terms - shift).exp().sum(dim)) + shift.squeeze(dim)


def safe_log(p):
    """log p with log 0 = -inf and a zero (not NaN) gradient there: the double-where trick.

    A plain p.log() has derivative 1/p = inf at p = 0, so the zero gradient that a term
    ignoring the entry sends back (a KL where q = 0, an unselected torch.where branch)
    becomes 0 * inf = NaN.  Zeros happen whenever a kernel has zeros in Q_t: absorbing
    (an unmasked x^t), flip-to-another-state at beta_t = 1.
    """
    positive = p > 0
    return torch.where(positive, torch.where(positive, p, torch.ones_like(p)).log(), torch.full_like(p, -math.inf))


def posterior_table(log_span, log_prior):
    """The one place the posterior is formed: table[j, v, k] = log q(x^s = k | x^t = j, x^0 = v)

        q(x^s = k | x^t = j, x^0 = v)  ∝  M[k, j] Qbar_s[v, k]

    with M the s -> t transition (Q_t for s = t - 1), normalised over k by logsumexp.
    Where x^t = j cannot follow x^0 = v (absorbing kernels: an unmasked state that differs
    from the data) the row is defined as ∝ M[k, j], and where x^t = j cannot happen at all
    as uniform: finite choices that keep the through-x^0 mixture a distribution; the bound
    never weights such rows.
    """
    likelihood = log_span.T.unsqueeze(1)  # (j, 1, k)
    joint = likelihood + log_prior.unsqueeze(0)  # (j, v, k)
    for fallback in (likelihood, torch.zeros_like(likelihood)):
        joint = torch.where(torch.isneginf(joint).all(-1, keepdim=True), fallback.expand_as(joint), joint)
    return normalise(joint)


class ResampleKernel(DiscreteKernel):
    """With probability beta_t a dimension is redrawn from pi; otherwise it stays.

        Q_t    = (1 - beta_t)  I + beta_t  1 pi^T
        Qbar_t = (1 - beta~_t) I + beta~_t 1 pi^T,   1 - beta~_t = prod_{s<=t} (1 - beta_s)

    K = 2 with pi = (1 - pi_1, pi_1) is Bernoulli (bit-flip) diffusion (docs/math.md §1);
    a uniform pi over K states is multinomial diffusion (Hoogeboom et al. 2021).
    """

    def __init__(self, pi, beta_tilde):
        pi = torch.as_tensor(pi, dtype=torch.float64)
        if torch.any(pi <= 0) or abs(float(pi.sum()) - 1.0) > 1e-12:
            raise UserError(f"stationary distribution must be positive and sum to 1 (got {pi.tolist()})")
        self._pi = pi
        self._beta_tilde = torch.as_tensor(beta_tilde, dtype=torch.float64)
        super().__init__(len(self._beta_tilde) - 1, len(pi))
        self.register_buffer("beta_tilde", self._beta_tilde.clone(), persistent=False)
        self.register_buffer("betas", betas_from_beta_tilde(self._beta_tilde), persistent=False)

    @property
    def stationary(self):
        return self._pi

    def _mix(self, rates):
        """(1 - r) I + r 1 pi^T for every rate r: (T+1,) -> (T+1, K, K), where pi is (the CPU)."""
        eye = torch.eye(self.num_states, dtype=torch.float64, device=self._pi.device)
        rates = rates[:, None, None]
        return (1 - rates) * eye + rates * self._pi[None, None, :]

    def step_matrices(self):
        return self._mix(betas_from_beta_tilde(self._beta_tilde))

    def cumulative_matrices(self, Q):
        return self._mix(self._beta_tilde)

    def log_span(self, s, t):
        """s -> t in closed form: (1 - r) I + r 1 pi^T with 1 - r = (1 - beta~_t) / (1 - beta~_s),
        and r = 1 where beta~_s = 1 (x^0 is forgotten by s and every later step redraws, as in
        ``betas_from_beta_tilde``)."""
        kept_until_s = 1 - float(self._beta_tilde[s])
        keep = (1 - float(self._beta_tilde[t])) / kept_until_s if kept_until_s > 0 else 0.0
        return self._mix(torch.tensor([1 - keep], dtype=torch.float64, device=self._pi.device))[0].log().to(self.log_Q)


class BernoulliKernel(ResampleKernel):
    """Bit-flip diffusion: q(x^t_i | x^{t-1}_i) = Bern(x^{t-1}_i (1 - beta_t) + beta_t pi_1)."""

    @classmethod
    def build(cls, beta_tilde, num_states, pi_1=0.5):
        if num_states != 2:
            others = ", ".join(name for name in registry.KERNELS if name != "bernoulli")
            raise UserError(f"the bernoulli kernel has 2 states, not {num_states}; use one of {others}")
        return cls(beta_tilde, pi_1)

    def __init__(self, beta_tilde, pi_1=0.5):
        if not 0.0 < float(pi_1) < 1.0:
            raise UserError(f"pi_1 must lie strictly between 0 and 1 (got {pi_1})")
        super().__init__([1.0 - float(pi_1), float(pi_1)], beta_tilde)
        self.pi_1 = float(pi_1)


class UniformKernel(ResampleKernel):
    """Multinomial diffusion (Hoogeboom et al. 2021): redraw uniformly among K states."""

    def __init__(self, beta_tilde, num_states):
        super().__init__(torch.full((num_states,), 1.0 / num_states, dtype=torch.float64), beta_tilde)


class AbsorbingKernel(DiscreteKernel):
    """Absorbing / mask diffusion (Austin et al. 2021): K data states plus a mask state K; each
    step masks a dimension with probability beta_t, and a masked dimension stays masked.

        Q_t = (1 - beta_t) I + beta_t 1 e_mask^T,   Qbar_t = (1 - beta~_t) I + beta~_t 1 e_mask^T

    pi = e_mask has zeros, so the edge step p(x^0 | x^1) is learned (D3PM's reconstruction
    term); beta~_T must be 1 so that x^T is masked surely.
    """

    closed_form_edge = False

    def __init__(self, beta_tilde, num_data_states):
        self._beta_tilde = torch.as_tensor(beta_tilde, dtype=torch.float64)
        if abs(float(self._beta_tilde[-1]) - 1.0) > 1e-12:
            raise UserError("the absorbing kernel needs a schedule with beta~_T = 1")
        super().__init__(len(self._beta_tilde) - 1, int(num_data_states) + 1)
        self.register_buffer("beta_tilde", self._beta_tilde.clone(), persistent=False)
        self.register_buffer("betas", betas_from_beta_tilde(self._beta_tilde), persistent=False)

    @property
    def num_data_states(self):
        return self.num_states - 1

    @property
    def stationary(self):
        pi = torch.zeros(self.num_states, dtype=torch.float64)
        pi[-1] = 1.0
        return pi

    def _mask(self, rates):
        eye = torch.eye(self.num_states, dtype=torch.float64)
        rates = rates[:, None, None]
        return (1 - rates) * eye + rates * self.stationary[None, None, :]

    def step_matrices(self):
        return self._mask(betas_from_beta_tilde(self._beta_tilde))

    def cumulative_matrices(self, Q):
        return self._mask(self._beta_tilde)

    @property
    def mask(self) -> int:
        """The code of the mask state: the last one."""
        return self.num_states - 1

    def sample_marginal(self, x0, t):
        """x^t ~ q(x^t | x^0): each dimension is masked with probability beta~_t, independently,
        and keeps x^0 otherwise (integer codes)."""
        beta_tilde = self.beta_tilde[t]
        if not isinstance(t, int):
            beta_tilde = beta_tilde.unsqueeze(-1)  # one rate per sequence
        masked = torch.rand(x0.shape, dtype=self.beta_tilde.dtype, device=x0.device) < beta_tilde
        return torch.where(masked, self.mask, _index(x0))

    def q_posterior_log_probs_mixture(self, x_t, x0_log_probs, t, s=None):
        """The through-x^0 step in closed form, for P(x^0) normalised over all K states
        (docs/math.md §3).  With w = q(x^s = v | x^t = mask, x^0 = v) = (beta~_t - beta~_s) / beta~_t,
        the same for every data state v:

            x^t_i masked:    p(x^s_i = v) = w P(x^0_i = v),   p(x^s_i = mask) = 1 - w + w P(x^0_i = mask)
            x^t_i = j:       q(x^s_i | x^t_i = j, x^0_i = j), the posterior's row (it stays at j)

        The base class's sum over v gives the same numbers at K times the cost; w, 1 - w and the
        unmasked rows are read from the kernel's posterior table."""
        if isinstance(t, int):
            table = self.posterior_rows(t, s)  # (j, v, k)
        elif s is None:
            table = self.log_posterior[t]  # (B, j, v, k): one table per sequence
        else:
            raise ValueError("a jump to s < t - 1 takes one t for all sequences")
        data, mask = self.num_data_states, self.mask
        log_unmask, log_stay_masked = table[..., mask, 0, 0], table[..., mask, 0, mask]
        x_t = _index(x_t)
        if isinstance(t, int):
            kept = table[x_t, x_t]  # (..., n, K): the row q(x^s | x^t = j, x^0 = j)
        else:
            log_unmask, log_stay_masked = log_unmask.unsqueeze(-1), log_stay_masked.unsqueeze(-1)  # (B, 1)
            kept = self.log_posterior[t.unsqueeze(-1).expand(x_t.shape), x_t, x_t]
        log_unmask = log_unmask.to(x0_log_probs.dtype)
        unmasked_data = x0_log_probs[..., :data] + log_unmask.unsqueeze(-1)
        still_masked = torch.logaddexp(log_stay_masked.to(x0_log_probs.dtype), log_unmask + x0_log_probs[..., mask])
        masked = torch.cat([unmasked_data, still_masked.unsqueeze(-1)], dim=-1)
        return torch.where((x_t == mask).unsqueeze(-1), masked, kept.to(x0_log_probs.dtype))


class DiscretisedGaussianKernel(DiscreteKernel):
    """D3PM's discretised Gaussian kernel for ordinal states 0..K-1 (Austin et al. 2021, A.2.2):

        Q_t[i, j] ∝ exp(-4 (i - j)^2 / ((K - 1)^2 beta_t))  for i != j,
        Q_t[i, i] = 1 - sum_{j != i} Q_t[i, j],
        normaliser sum_{m = -(K-1)..K-1} exp(-4 m^2 / ((K - 1)^2 beta_t)).

    Symmetric and doubly stochastic, so pi is uniform and the paper's edge step applies.
    Nearby grey levels are likelier than far ones; Qbar_t is a product (no closed form).
    """

    def __init__(self, beta_tilde, num_states):
        self._betas = betas_from_beta_tilde(torch.as_tensor(beta_tilde, dtype=torch.float64))
        self._size = int(num_states)
        super().__init__(len(self._betas) - 1, num_states)
        self.register_buffer("betas", self._betas.clone(), persistent=False)

    @property
    def stationary(self):
        return torch.full((self._size,), 1.0 / self._size, dtype=torch.float64)

    def step_matrices(self):
        K = self._size
        offsets = torch.arange(-(K - 1), K, dtype=torch.float64)
        index = torch.arange(K, dtype=torch.float64)
        distance2 = (index[:, None] - index[None, :]) ** 2
        Q = torch.empty(self.T + 1, K, K, dtype=torch.float64)
        Q[0] = torch.eye(K, dtype=torch.float64)
        for t in range(1, self.T + 1):
            scale = (K - 1) ** 2 * float(self._betas[t])
            off = torch.exp(-4 * distance2 / scale) / torch.exp(-4 * offsets ** 2 / scale).sum()
            off.fill_diagonal_(0.0)
            Q[t] = off + torch.diag(1.0 - off.sum(1))
        return Q


def make_kernel(name, beta_tilde, num_states=2, pi_1=0.5):
    """A kernel by name (``bdiff_pyro.registry.KERNELS``) for data with ``num_states`` states per
    dimension; ``pi_1`` is read only by kernels that take it (bernoulli)."""
    return registry.resolve(registry.KERNELS, name, "kernel").build(beta_tilde, num_states, pi_1)
