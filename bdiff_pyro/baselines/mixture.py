"""Exact-likelihood baselines for binary data (numpy, float64, vectorised).

- ``IndependentBernoulli``: one probability per position, p_d = (S_d + 1) / (N + 2)
  (Laplace's rule, the posterior mean under a Beta(1, 1) prior), so no log 0.
- ``BernoulliMixture``: p(x) = sum_k w_k prod_d p_kd^x_d (1 - p_kd)^(1 - x_d), fitted by
  EM in log space (logsumexp).  The M-step is a MAP step with ``alpha`` pseudo-counts per
  outcome on every p_kd (a Beta(alpha + 1, alpha + 1) prior) and ``gamma`` pseudo-counts
  per component on the weights (a Dirichlet(gamma + 1) prior):

      p_kd = (sum_i r_ik x_id + alpha) / (N_k + 2 alpha),   w_k = (N_k + gamma) / (N + C gamma)

  with C = ``num_components``, so that 0 < p_kd < 1 and w_k > 0.  EM never decreases the objective it maximises, the
  log-likelihood plus the log prior (``log_posterior``); with alpha = gamma = 0 that is the
  plain log-likelihood.
- ``select_mixture``: the number of components (and alpha) chosen by validation
  log-likelihood over a grid, the best of several random restarts for each.

All log-likelihoods are log p(x) per sequence in nats; ``bits_per_sequence`` averages and
converts to bits (what the diffusion bound is compared with).
"""

import contextlib
import functools
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from bdiff_pyro.util.stats import LN2

COMPONENT_GRID = (1, 2, 5, 10, 20, 30, 50, 80, 120)
ALPHA_GRID = (0.1, 0.5, 1.0, 2.0)


def single_threaded(function):
    """Run with one BLAS thread: these matrices are small, and multi-threaded BLAS on a
    shared CPU spends far more time spinning than computing (30x slower on 2 busy cores)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
            limit = threadpool_limits(1)
        except ImportError:  # threadpoolctl comes with scikit-learn; without it, just run
            limit = contextlib.nullcontext()
        with limit:
            return function(*args, **kwargs)

    return wrapper


def _array(x):
    """A (N, n) float64 0/1 array from a numpy array or a torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of sequences (got shape {x.shape})")
    return x


def logsumexp(a, axis=-1):
    top = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def bits_per_sequence(log_likelihoods):
    """Mean -log2 p(x) over sequences, and its standard error over sequences."""
    bits = -np.asarray(log_likelihoods, dtype=np.float64) / LN2
    se = bits.std(ddof=1) / math.sqrt(len(bits)) if len(bits) > 1 else float("nan")
    return float(bits.mean()), float(se)


def bernoulli_log_likelihoods(x, probs):
    """log prod_d p_kd^x_d (1 - p_kd)^(1 - x_d) for every sequence and row of ``probs``:
    (N, n), (C, n) -> (N, C), C the number of components."""
    return x @ np.log(probs).T + (1.0 - x) @ np.log1p(-probs).T


@dataclass
class IndependentBernoulli:
    probs: np.ndarray  # (n,)

    @classmethod
    def fit(cls, x, pseudo_count=1.0):
        """p_d = (S_d + c) / (N + 2c); c = 1 is Laplace's rule (Beta(1, 1) posterior mean)."""
        x = _array(x)
        return cls((x.sum(0) + pseudo_count) / (len(x) + 2 * pseudo_count))

    def log_prob(self, x):
        return bernoulli_log_likelihoods(_array(x), self.probs[None, :])[:, 0]


@dataclass
class BernoulliMixture:
    log_weights: np.ndarray  # (num_components,)
    probs: np.ndarray  # (num_components, n), strictly inside (0, 1)
    alpha: float = 0.0
    gamma: float = 0.0
    history: list = field(default_factory=list)  # objective (log posterior, nats) after each EM step
    converged: bool = False

    @property
    def num_components(self):
        return len(self.log_weights)

    def joint_log_probs(self, x):
        """log w_k + log p(x | k), shape (N, num_components)."""
        return self.log_weights[None, :] + bernoulli_log_likelihoods(_array(x), self.probs)

    def log_prob(self, x):
        """log p(x) per sequence, (N,)."""
        return logsumexp(self.joint_log_probs(x), axis=1)

    def log_prior(self):
        """Log density of the Beta / Dirichlet priors, up to their constants."""
        return float(self.alpha * (np.log(self.probs) + np.log1p(-self.probs)).sum()
                     + self.gamma * self.log_weights.sum())

    def log_posterior(self, x):
        """The objective EM increases: sum_i log p(x_i) + log prior (nats)."""
        return float(self.log_prob(x).sum()) + self.log_prior()

    def sample(self, num, seed=0):
        rng = np.random.default_rng(seed)
        k = rng.choice(self.num_components, size=num, p=np.exp(self.log_weights - logsumexp(self.log_weights, 0)))
        return (rng.random((num, self.probs.shape[1])) < self.probs[k]).astype(np.float64)


def _m_step(x, log_resp, alpha, gamma):
    """MAP parameters from log responsibilities (N, num_components)."""
    resp = np.exp(log_resp)
    counts = resp.sum(0)  # N_k
    probs = (resp.T @ x + alpha) / (counts[:, None] + 2 * alpha)
    # Without a prior an empty component or a constant pixel would give log 0: keep inside (0, 1).
    probs = np.clip(probs, 1e-12, 1 - 1e-12) if alpha == 0 else probs
    log_weights = np.log(counts + gamma) - np.log(len(x) + len(counts) * gamma)
    return log_weights, probs


@single_threaded
def fit_mixture(x, num_components, alpha=1.0, gamma=1.0, max_iter=500, tol=1e-7, seed=0, init=None):
    """One EM run from a random start; returns a BernoulliMixture with its objective history.

    Start: responsibilities concentrated on ``num_components`` distinct random training sequences (each
    sequence is assigned to its nearest chosen sequence by Hamming distance, plus 10% uniform
    mass), then alternating M and E steps until the objective improves by less than
    ``tol`` nats per sequence.  ``init`` may give starting (log_weights, probs) instead.
    """
    x = _array(x)
    num, n = x.shape
    rng = np.random.default_rng(seed)
    if init is None:
        centres = x[rng.choice(num, size=num_components, replace=num_components > num)]
        distance = x @ (1 - centres).T + (1 - x) @ centres.T  # Hamming, (N, num_components)
        distance = distance + rng.random(distance.shape) * 1e-3  # break ties at random
        resp = np.full((num, num_components), 0.1 / num_components)
        resp[np.arange(num), distance.argmin(1)] += 0.9
        log_weights, probs = _m_step(x, np.log(resp), alpha, gamma)
    else:
        log_weights, probs = (np.asarray(a, dtype=np.float64) for a in init)
    model = BernoulliMixture(log_weights, probs, alpha, gamma)
    previous = -np.inf
    for _ in range(max_iter):
        joint = model.joint_log_probs(x)
        log_px = logsumexp(joint, axis=1)
        objective = float(log_px.sum()) + model.log_prior()
        model.history.append(objective)
        if objective - previous < tol * num:
            model.converged = True
            break
        previous = objective
        model.log_weights, model.probs = _m_step(x, joint - log_px[:, None], alpha, gamma)
    return model


@single_threaded
def select_mixture(train, val, components=COMPONENT_GRID, alphas=ALPHA_GRID, gamma=1.0, restarts=5,
                   seed=0, max_iter=500, log=None):
    """Fit every (num_components, alpha) on the grid with ``restarts`` starts each, keep the start with the
    best training objective, and choose the (num_components, alpha) with the best validation
    log-likelihood.  Returns (best model, table of rows with the validation bits of each)."""
    train, val = _array(train), _array(val)
    rows, best, best_val = [], None, -np.inf
    for num_components, alpha in itertools.product(components, alphas):
        started = time.perf_counter()
        fits = [fit_mixture(train, num_components, alpha, gamma, max_iter=max_iter, seed=seed + 1000 * r)
                for r in range(restarts)]
        model = max(fits, key=lambda m: m.history[-1])
        val_ll = float(model.log_prob(val).mean())
        row = {"num_components": num_components, "alpha": alpha,
               "train_bits": -float(model.log_prob(train).mean()) / LN2, "val_bits": -val_ll / LN2,
               "iterations": len(model.history), "seconds": time.perf_counter() - started}
        rows.append(row)
        if log is not None:
            log(f"  components={num_components:4d} alpha={alpha:4g}: "
                f"train {row['train_bits']:.3f}  val {row['val_bits']:.3f} bits "
                f"({row['iterations']} EM steps, {row['seconds']:.1f} s for {restarts} starts)")
        if val_ll > best_val:
            best, best_val = model, val_ll
    return best, rows


def all_sequences(n):
    """Every binary sequence of length n, (2^n, n) float64, for exact sums in tests."""
    return np.array(list(itertools.product((0.0, 1.0), repeat=n)))
