"""Exact ELBO and log-likelihood by Pyro enumeration, and importance sampling (docs/math.md §5).

The reverse network couples every dimension of x^t, so a time slice cannot be enumerated as
Bernoulli sites inside a plate over dimensions: Pyro would sum each plate element over its
own values independently, while p(x^{t-1} | x^t) reads all of them at once (the
"enumeration pitfall" of docs/math.md §5; tests/test_enumerate.py shows the wrong number
it gives).  Here a time slice is ONE Categorical site over the S = K^n joint states of the
sequence.  A joint state is the integer

    s = sum_i x_i K^(n-1-i)          (lexicographic, the order of ``bound.all_states``)

and ``decode(s)`` gives back the (..., n) sequence, which is what the kernel's closed forms
and the network (``process.log_probs``) read.  The joint transition log-probabilities of a
slice are the sums over dimensions of the per-dimension ones, i.e. the rows of the Kronecker
product of the per-dimension K x K matrices (``joint_log_probs``).  Nothing here
re-implements the network: every reverse step is ``process.log_probs`` on decoded states.

Programs (every site named as in the per-dimension programs of reverse.py and forward.py):

- ``joint_model(process, x0)``: the reverse program, x^T ~ pi, x^{t-1} ~ p(. | x^t), with
  x^0 observed; under ``config_enumerate`` its latents are enumerated (model side).
- ``joint_guide(process, x0)``: the forward chain x^t ~ q(. | x^{t-1}), every site
  enumerated in parallel (guide side).

Both loop with ``pyro.markov``, so only two enumeration dimensions are alive at a time and
the cost is linear in T (about T S^2 per sequence).  Results are per sequence, in nats.
"""

import functools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Importance, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.poutine.util import prune_subsample_sites

from bdiff_pyro.errors import UserError
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.util.stats import effective_sample_size, log_mean_exp_with_se

#: Largest number of joint states per time slice (K^n) that the exact computations accept
#: by default: the enumerated tensors hold S^2 numbers per time step.
MAX_JOINT_STATES = 2**12

#: The sequence plate of the joint programs sits at dim -1; enumeration uses dims to its left.
MAX_PLATE_NESTING = 1


# ---------------------------------------------------------------------------------------
# Joint-state codes


def num_joint_states(n, num_states=2):
    """S = K^n: the number of values of one time slice."""
    return int(num_states) ** int(n)


def encode(x, num_states=2):
    """(..., n) states in 0..K-1 -> (...,) integer codes, first dimension most significant."""
    n = x.shape[-1]
    place = num_states ** torch.arange(n - 1, -1, -1, device=x.device)
    return (x.long() * place).sum(-1)


def decode(codes, n, num_states=2, dtype=torch.float64):
    """(...,) integer codes -> (..., n) states (as ``dtype``, like Pyro's Bernoulli values)."""
    place = num_states ** torch.arange(n - 1, -1, -1, device=codes.device)
    return (codes.long().unsqueeze(-1) // place % num_states).to(dtype)


def joint_log_probs(log_probs):
    """(..., n, K) per-dimension log-probabilities of independent dimensions -> (..., K^n)
    log-probabilities of the joint states, in the order of ``encode``.

    For a transition this is one row of the Kronecker product of the per-dimension
    matrices: log M[s, s'] = sum_i log Q[s_i, s'_i].
    """
    joint = log_probs[..., 0, :]
    for i in range(1, log_probs.shape[-2]):
        joint = (joint.unsqueeze(-1) + log_probs[..., i, :].unsqueeze(-2)).flatten(-2)
    return joint


# ---------------------------------------------------------------------------------------
# The joint-state Pyro programs


def joint_model(process, x0):
    """The reverse program with x^0 observed, one Categorical site per time slice.

    Sites "x_T" .. "x_1" are latent, "x_0" is observed; inside the plate "sequences".
    Each site reads the previous slice by decoding it, inside the ``pyro.markov`` loop.
    """
    kernel, n = process.kernel, x0.shape[-1]
    K, T, dtype = kernel.num_states, kernel.T, kernel.log_pi.dtype
    prior = joint_log_probs(kernel.prior_log_probs((n,)))  # (S,)
    with pyro.plate("sequences", x0.shape[0], dim=-1):
        x = pyro.sample(f"x_{T}", dist.Categorical(logits=prior))
        for t in pyro.markov(range(T, 0, -1)):
            logits = joint_log_probs(process.log_probs(decode(x, n, K, dtype), t))
            x = pyro.sample(f"x_{t - 1}", dist.Categorical(logits=logits),
                            obs=encode(x0, K) if t == 1 else None)
    return x


def joint_guide(process, x0):
    """The forward chain q(x^{1:T} | x^0), one Categorical site per time slice, every site
    enumerated in parallel (the guide of the enumerated ELBO).

    The sites are visited in the model's order, x^T first, as the time reversal of the
    chain: q(x^T | x^0) prod_{t=T..2} q(x^{t-1} | x^t, x^0), which is the same joint
    distribution as prod_t q(x^t | x^{t-1}) (Bayes' rule on a Markov chain; a test checks the
    two log-probabilities trajectory by trajectory).  The order matters to Pyro: with
    guide-side enumeration a model site can only use the enumeration dims that existed when
    the guide sampled the same site, and the model's p(x^{t-1} | x^t) needs x^t's.
    """
    kernel, n = process.kernel, x0.shape[-1]
    K, T, dtype = kernel.num_states, kernel.T, kernel.log_pi.dtype
    with pyro.plate("sequences", x0.shape[0], dim=-1):
        logits = joint_log_probs(kernel.q_marginal_log_probs(x0, T))
        x = pyro.sample(f"x_{T}", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        for t in pyro.markov(range(T, 1, -1)):
            logits = joint_log_probs(kernel.q_posterior_log_probs(decode(x, n, K, dtype), x0, t))
            x = pyro.sample(f"x_{t - 1}", dist.Categorical(logits=logits),
                            infer={"enumerate": "parallel"})
    return x


def empty_guide(process, x0):
    """No latent variables in the guide: TraceEnum_ELBO then enumerates the model's."""


# ---------------------------------------------------------------------------------------
# Exact values by enumeration


def check_enumerable(n, num_states=2, max_states=MAX_JOINT_STATES):
    """Raise UserError unless a time slice of n dimensions (K^n states) can be enumerated."""
    S = num_joint_states(n, num_states)
    if S > max_states:
        limit = int(math.log(max_states, num_states) + 1e-9)
        raise UserError(
            f"exact evaluation enumerates all {num_states}^{n} = {S} states of a time slice "
            f"(memory and time grow as {num_states}^(2n) per step), so n = {n} is too long: "
            f"the limit is {max_states} states (n <= {limit}); use the importance-sampled "
            "estimate instead"
        )


def check_sequences(process, x0):
    """Raise UserError unless x0 is a (B, n) batch of states 0..K-1 matching the process."""
    K = process.kernel.num_states
    if x0.dim() != 2 or x0.shape[-1] != process.n:
        raise UserError(f"expected sequences of shape (B, {process.n}), got {tuple(x0.shape)}")
    if x0.numel() and (bool((x0 != x0.round()).any()) or x0.min() < 0 or x0.max() > K - 1):
        raise UserError(f"sequences must hold the states 0..{K - 1} only")


def _unique_rows(x0):
    """Distinct sequences and, for every row, the index of its distinct sequence."""
    unique, inverse = torch.unique(x0, dim=0, return_inverse=True)
    return unique, inverse


def _per_sequence(loss_fn, x0):
    """-loss_fn(row) for every distinct row of x0, gathered back to all rows."""
    unique, inverse = _unique_rows(x0)
    values = torch.stack([-torch.as_tensor(loss_fn(unique[i:i + 1]), dtype=torch.float64)
                          for i in range(len(unique))])
    return values[inverse]


def enumerated_elbo(process, x0, max_states=MAX_JOINT_STATES):
    """The exact ELBO E_q[log p(x^{0:T}) - log q(x^{1:T} | x^0)] of every row of x0 (nats),
    from TraceEnum_ELBO with the forward chain enumerated in the guide.  Shape (B,)."""
    check_enumerable(x0.shape[-1], process.kernel.num_states, max_states)
    check_sequences(process, x0)
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    model = functools.partial(joint_model, process)
    guide = functools.partial(joint_guide, process)
    with torch.no_grad():
        return _per_sequence(lambda row: elbo.loss(model, guide, row), x0)


def exact_log_likelihood(process, x0, max_states=MAX_JOINT_STATES):
    """log p(x^0) of every row of x0 (nats), shape (B,): the model's latents x^1..x^T
    enumerated by TraceEnum_ELBO with an empty guide (then -loss is log p(x^0) exactly).

    Costs about T S^2 per distinct sequence, S = K^n; raises UserError when S > max_states
    or x0 is not a batch of this process's sequences.  Exact to the precision of the
    process: call ``process.double()`` first for float64.
    """
    check_enumerable(x0.shape[-1], process.kernel.num_states, max_states)
    check_sequences(process, x0)
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    model = config_enumerate(functools.partial(joint_model, process), default="parallel")
    guide = functools.partial(empty_guide, process)
    with torch.no_grad():
        return _per_sequence(lambda row: elbo.loss(model, guide, row), x0)


# ---------------------------------------------------------------------------------------
# Monte Carlo: Trace_ELBO and importance sampling, on the per-dimension programs


def _programs(process):
    """(model, guide) with one signature f(x0): the reverse program and the forward chain
    of reverse.py and forward.py (Bernoulli sites in plates: right for sampling)."""
    return process.forward, functools.partial(forward_chain, process.kernel)


def trace_elbo_estimate(process, x0, num_particles=256, num_batches=16):
    """Monte Carlo ELBO of x0 from Pyro's Trace_ELBO (vectorised particles), in nats,
    summed over the rows of x0: (mean, standard error) from ``num_batches`` independent
    estimates of ``num_particles`` trajectories each."""
    if num_batches < 2:
        raise ValueError("a standard error needs at least two batches")
    model, guide = _programs(process)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=2)
    with torch.no_grad():
        values = torch.tensor([-elbo.loss(model, guide, x0) for _ in range(num_batches)],
                              dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(num_batches))


def _vectorised(fn, num_samples):
    """fn inside a plate of ``num_samples`` trajectories at dim -3 (left of the programs'
    "sequences" and "dims" plates)."""
    def wrapped(x0):
        with pyro.plate("trajectories", num_samples, dim=-3):
            return fn(x0)
    return wrapped


def sample_trajectories(process, x0, num_samples):
    """Trajectories of the forward chain from a Pyro trace of the vectorised guide:
    {"x_t": (S, B, n)} for t = 1..T."""
    _, guide = _programs(process)
    with torch.no_grad():
        trace = poutine.trace(_vectorised(guide, num_samples)).get_trace(x0)
    return {f"x_{t}": trace.nodes[f"x_{t}"]["value"] for t in range(1, process.T + 1)}


def _log_prob_per_sequence(trace):
    """Sum of every sample site's log-probability over the dims plate: (S, B)."""
    trace = prune_subsample_sites(trace)  # the plates' own sites
    trace.compute_log_prob()
    return sum(site["log_prob"].sum(-1) for site in trace.nodes.values() if site["type"] == "sample")


def trajectory_log_weights(process, x0, trajectories):
    """log p(x^{0:T}) - log q(x^{1:T} | x^0) of given trajectories {"x_t": (S, B or 1, n)},
    shape (S, B): the model and the guide traced with every latent site conditioned."""
    model, guide = _programs(process)
    num_samples = trajectories["x_1"].shape[0]
    with torch.no_grad():
        model_trace = poutine.trace(
            poutine.condition(_vectorised(model, num_samples), data=trajectories)).get_trace(x0)
        guide_trace = poutine.trace(
            poutine.condition(_vectorised(guide, num_samples), data=trajectories)).get_trace(x0)
        return _log_prob_per_sequence(model_trace) - _log_prob_per_sequence(guide_trace)


def importance_log_weights(process, x0, num_samples):
    """Importance log-weights of ``num_samples`` forward-chain trajectories drawn from each
    row of x0 (B, n), vectorised over samples and sequences: shape (S, B)."""
    return trajectory_log_weights(process, x0, sample_trajectories(process, x0, num_samples))


def importance_log_weights_sequential(process, x0_row, num_samples):
    """The same weights from pyro.infer.Importance (one trace pair per sample; slow), for
    one sequence x0_row (1, n).  Returns (log_weights (S,), trajectories {"x_t": (S, 1, n)})
    so that a test can score the same trajectories with the vectorised path."""
    model, guide = _programs(process)
    with torch.no_grad():
        posterior = Importance(model, guide, num_samples=num_samples).run(x0_row)
    log_w = torch.stack([torch.as_tensor(w) for w in posterior.log_weights])
    trajectories = {f"x_{t}": torch.stack([tr.nodes[f"x_{t}"]["value"] for tr in posterior.exec_traces])
                    for t in range(1, process.T + 1)}
    return log_w, trajectories


def importance_log_likelihood(process, x0, num_samples=1000, chunk=4096, return_ess=False):
    """Importance-sampled log p(x^0) of every row of x0 (nats), the forward chain as the
    proposal: log mean_s exp(log p(x^{0:T}_s) - log q(x^{1:T}_s | x^0)), s = 1..S.

    Returns (estimates (B,), standard errors (B,) by the delta method), and the effective
    sample sizes (B,) when ``return_ess``.  For finite S it is biased low (Jensen): its
    expectation lies between the ELBO and log p(x^0), and it converges to log p(x^0) as S
    grows.  ``chunk`` bounds the trajectories drawn at once.
    """
    unique, inverse = _unique_rows(x0)
    log_w = torch.cat([importance_log_weights(process, unique, min(chunk, num_samples - start))
                       for start in range(0, num_samples, chunk)]).T  # (U, S)
    estimate, se = log_mean_exp_with_se(log_w)
    if return_ess:
        return estimate[inverse], se[inverse], effective_sample_size(log_w)[inverse]
    return estimate[inverse], se[inverse]
