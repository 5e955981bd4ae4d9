"""The reverse (generative) process: a time-conditioned network shared across steps, and the
generative Pyro program of docs/math.md §2.1

    x^T ~ pi,     x^{t-1} ~ p(x^{t-1} | x^t)  for t = T..2,     x^0 ~ p(x^0 | x^1)

where the last (edge) step is the paper's closed form when the kernel has one, and the
network's prediction of x^0 otherwise.  The network is parameterised either

- ``direct``: it outputs the logits of p(x^{t-1} | x^t) (the paper, the reference repo), as
  a correction added to log q(x^t | x^{t-1} = k), or
- ``x0``: it outputs the logits of P(x^0 | x^t) and p(x^{t-1} | x^t) is the posterior
  q(x^{t-1} | x^t, x^0) averaged over that prediction (docs/math.md §3, as in D3PM).

The network reads x^t in one of three codes (``inputs``):

- ``state``: the one-hot code of x^t, and the time t;
- ``evidence``: what each position alone says about its clean value,
  P(x^0_i = v | x^t_i) under a uniform prior, and the time t;
- ``log_evidence``: the same as log-likelihood ratios log q(x^t_i | v) - log q(x^t_i | 0)
  (kernels where q(x^t | x^0) > 0).  For data with finite support {d_k}, the log-posterior of
  d_k given x^t is sum_i of these ratios at d_{k,i}: linear in the inputs, with weights that
  do not depend on t.

With either evidence code and ``add_own_evidence`` (the default), the network's logits for
x^0 are added to the evidence log q(x^t_i | x^0_i = v): by Bayes' rule
log P(x^0_i | x^t) = log q(x^t_i | x^0_i) + log P(x^0_i | x^t_{-i}) + const, so the network
only has to supply what the *other* positions say.  Both are closed forms of the kernel.
Without it, the network gives the logits of P(x^0_i | x^t) itself.  That suits small
networks: for data whose positions fall into classes with equal posteriors (the heartbeat's
phases), the whole answer is then a function of a few class sums, whereas "what the others
say" differs at every position and must be carried through every layer (docs/network.md
measures both).

An ensemble network (``model.members`` > 1, ``networks.ensemble``) predicts once per member;
the step is the uniform mixture of the members' steps, p(x^{t-1} | x^t) = (1/M) sum_m
p_m(x^{t-1} | x^t).  Through x^0 that is the step of the mixed prediction (1/M) sum_m
P_m(x^0 | x^t), since the step is linear in P(x^0 | x^t).
"""

import contextlib
import math
import typing

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch.nn import functional as F

from bdiff_pyro.diffusion.kernels import make_kernel, normalise
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.diffusion.steps import (
    binary_mixture_logits,
    edge_or_step,
    mean_of_bernoullis_logit,
    mean_of_categoricals_log_probs,
)
from bdiff_pyro.errors import UserError
from bdiff_pyro.networks import build_network
from bdiff_pyro.programs import sampling
from bdiff_pyro.programs.plan import BinaryStepPlan
from bdiff_pyro.programs.sites import state_dist
from bdiff_pyro.programs.spec import ModelSpec
from bdiff_pyro.registry import INPUTS, PARAMETERISATIONS


def _per_state(table, t, x):
    """table[t, x_i] for a (T+1, 2) table and bits x (..., n); t an int or one time per
    sequence.  Picked as table[t, 0] (1 - x) + table[t, 1] x, exact for x in {0, 1} and finite
    entries, and cheaper than indexing."""
    rows = table[t]
    if not isinstance(t, int):
        rows = rows.unsqueeze(-2)  # (..., 1, 2): one row per sequence
    x = x.to(table.dtype)
    return rows[..., 0] * (1 - x) + rows[..., 1] * x


def log_softmax_over_states(logits):
    """log softmax over the last dimension (the K states): x_k - log sum_j exp(x_j), computed with
    that dimension moved first.  torch's CPU kernel reduces a short last dimension one row at a
    time; moved first, the reduction runs across rows, 6x faster at K = 2 (forward and backward)."""
    return torch.log_softmax(logits.movedim(-1, 0).contiguous(), dim=0).movedim(0, -1)


def kernel_from_spec(spec: ModelSpec):
    """The forward kernel a spec names (``make_kernel`` on the ``make_beta_tilde`` schedule)."""
    beta_tilde = make_beta_tilde(spec.schedule, spec.T, spec.schedule_power)
    return make_kernel(spec.kernel, beta_tilde, spec.num_states, 0.5 if spec.pi_1 is None else spec.pi_1)


class ReverseProcess(PyroModule):
    """p_theta(x^{0:T}): a kernel (its prior and edge step) plus a shared reverse network.

    This is the object ``bdiff_pyro.load`` returns.  ``n``, ``T`` and ``kernel`` describe
    it; ``reverse_probs`` and ``sample`` are the stable API; ``forward`` is the Pyro program.
    """

    def __init__(self, kernel, net, parameterisation="x0", inputs="state", add_own_evidence=True):
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise UserError(f"unknown parameterisation {parameterisation!r}; choose one of {PARAMETERISATIONS}")
        if inputs not in INPUTS:
            raise UserError(f"unknown network inputs {inputs!r}; choose one of {INPUTS}")
        if inputs == "log_evidence":
            data = kernel.num_data_states
            if bool(torch.isneginf(kernel.log_Qbar[1:, :data, :data]).any()):
                raise UserError("model.inputs log_evidence needs q(x^t | x^0) > 0 for every pair of data states, "
                                "which this kernel does not have; use evidence")
        expected = self.num_features(kernel, inputs)
        if net.num_features != expected:
            raise ValueError(f"{inputs!r} inputs give {expected} features per position; "
                             f"the network takes {net.num_features}")
        self.kernel = kernel
        self.net = net
        self.parameterisation = parameterisation
        self.inputs = inputs
        self.add_own_evidence = add_own_evidence and inputs != "state"
        self._members_apart = False
        # Every layer must go through pyro.param to be trained by SVI (see README, pitfalls).
        to_pyro_module_(self.net)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "ReverseProcess":
        """A freshly initialised float32 reverse process as ``spec`` describes it: the kernel
        through ``make_kernel`` / ``make_beta_tilde``, the network through ``registry.NETWORKS``."""
        kernel = kernel_from_spec(spec)
        options = {"hidden": tuple(spec.hidden), "activation": spec.activation,
                   "time_embedding": spec.time_embedding, "film": spec.film, **spec.network_options}
        net = build_network(spec.network, spec.n, kernel.num_states, cls.num_features(kernel, spec.inputs), options)
        return cls(kernel, net, spec.parameterisation, spec.inputs, spec.add_own_evidence).float()

    @staticmethod
    def num_features(kernel, inputs):
        """Numbers per position the network reads: K - 1 (one-hot) or K_data - 1 (evidence)."""
        return (kernel.num_states if inputs == "state" else kernel.num_data_states) - 1

    @property
    def n(self):
        return self.net.n

    @property
    def T(self):
        return self.kernel.T

    @property
    def num_members(self):
        """Networks whose steps are mixed (``model.members``; 1 for a single network)."""
        return getattr(self.net, "num_members", 1)

    @contextlib.contextmanager
    def members_apart(self):
        """Within: an ensemble's predictions and steps keep the members apart on a leading
        axis (M, ...) instead of mixing them, so that each member is scored on its own bound."""
        self._members_apart = True
        try:
            yield self
        finally:
            self._members_apart = False

    def _mixed(self, member_values, mixture):
        """``mixture`` over the members' axis 0 of an ensemble's predictions (unless kept apart)."""
        if self.num_members == 1 or self._members_apart:
            return member_values
        return mixture(member_values, 0)

    @property
    def binary(self):
        """Two states: every step is one Bernoulli logit per position (the fast path)."""
        return self.kernel.num_states == 2

    # -- what the network reads and says --------------------------------------------------
    def _net(self, x_t, t, evidence=None):
        """The network's logits (..., n, K - 1) (state 0 fixed at 0) on x^t coded as
        ``inputs`` says (``evidence``: :meth:`_data_evidence` of x^t, if the caller has it)."""
        if self.inputs == "state":
            features = x_t.unsqueeze(-1) if self.binary else F.one_hot(x_t.long(), self.kernel.num_states)[..., 1:]
        elif self.binary:
            features = self._evidence_logit(x_t, t).unsqueeze(-1)
            if self.inputs == "evidence":
                features = torch.sigmoid(features)  # P(x^0_i = 1 | x^t_i)
        else:
            evidence = self._data_evidence(x_t, t) if evidence is None else evidence
            features = (log_softmax_over_states(evidence).exp() if self.inputs == "evidence"
                        else evidence - evidence[..., :1])[..., 1:]
        return self.net(features, t)

    def _data_evidence(self, x_t, t):
        """log q(x^t_i | x^0_i = v) over the data states v, shape (..., n, K_data); zero
        (no evidence) for an x^t_i that no data state reaches (absorbing kernels at t = T)."""
        evidence = self.kernel.x0_likelihood(x_t, t)[..., :self.kernel.num_data_states]
        return torch.where(torch.isneginf(evidence).all(-1, keepdim=True), 0.0, evidence)

    def _evidence_logit(self, x_t, t):
        """Bits: log q(x^t_i | x^0_i = 1) - log q(x^t_i | x^0_i = 0)."""
        log_Qbar = self.kernel.log_Qbar
        return _per_state(log_Qbar[:, 1, :] - log_Qbar[:, 0, :], t, x_t)

    # -- the reverse step ---------------------------------------------------------------------
    def log_probs(self, x_t, t):
        """log p(x^{t-1} = k | x^t), shape (..., n, K); t = 1 is the edge step p(x^0 | x^1).
        t is an int or one time per sequence (shape x_t.shape[:-1])."""
        if self.binary:
            logits = self.logits(x_t, t)
            return torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
        return edge_or_step(self._edge_log_probs, self._step_log_probs, x_t, t)

    def logits(self, x_t, t):
        """Bits: the logit of p(x^{t-1} = 1 | x^t), shape (..., n)."""
        return edge_or_step(self._edge_logits, self._step_logits, x_t, t)

    def step_plan(self):
        """The steps as they are drawn (two states: a ``BinaryStepPlan`` of the current
        weights, per-t tables computed once; otherwise the process itself)."""
        return BinaryStepPlan(self) if self.binary else self

    def step_dist(self, x_t, t):
        """p(x^{t-1} | x^t) as the Pyro distribution of one time slice.  The Pyro program and
        ``sample`` both draw from the step plan, so they give the same samples for the same seed
        (this builds a plan for one step; the program builds one for all)."""
        if self.binary:
            return self.step_plan().step_dist(x_t, t)
        return dist.Categorical(logits=self.log_probs(x_t, t))

    def _edge_log_probs(self, x1):
        if self.kernel.closed_form_edge:
            return self.kernel.edge_log_probs(x1)
        return self.x0_log_probs(x1, 1)  # the learned edge step

    def _edge_logits(self, x1):
        log_probs = self._edge_log_probs(x1)
        return log_probs[..., 1] - log_probs[..., 0]

    def _step_log_probs(self, x_t, t):
        if self.parameterisation == "direct":
            # The network corrects the forward step's likelihood q(x^t | x^{t-1} = k): at
            # beta_t ~ 1/T the reverse step is nearly "stay", which a bare network would
            # have to learn from scratch at every t.
            likelihood = self.kernel.q_step_likelihood(x_t, t)
            # an x^t that no x^{t-1} can reach (absorbing kernels at beta_t = 1): no prior shape
            likelihood = torch.where(torch.isneginf(likelihood).all(-1, keepdim=True), 0.0, likelihood)
            return self._mixed(normalise(F.pad(self._net(x_t, t), (1, 0)) + likelihood),
                               mean_of_categoricals_log_probs)
        return self.kernel.q_posterior_log_probs_mixture(x_t, self.x0_log_probs(x_t, t), t)

    def _step_logits(self, x_t, t):
        """Bits: the same step as :meth:`_step_log_probs`, one logit per position."""
        if self.parameterisation == "direct":
            log_Q = self.kernel.log_Q
            return self._mixed(self._net(x_t, t)[..., 0] + _per_state(log_Q[:, 1, :] - log_Q[:, 0, :], t, x_t),
                               mean_of_bernoullis_logit)
        return binary_mixture_logits(self.kernel.log_posterior[t], x_t, self.x0_logits(x_t, t))

    def x0_logits(self, x_t, t):
        """Bits: the logit of the predicted P(x^0 = 1 | x^t), shape (..., n)."""
        logits = self._net(x_t, t)[..., 0]
        if self.add_own_evidence:
            logits = logits + self._evidence_logit(x_t, t)  # Bayes' rule: the position's own evidence
        return self._mixed(logits, mean_of_bernoullis_logit)

    def x0_log_probs(self, x_t, t):
        """The network read as log P(x^0 = v | x^t), restricted to the states data can take
        (an absorbing kernel's mask state is not one)."""
        if self.binary:
            logits = self.x0_logits(x_t, t)
            return torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
        data_states = self.kernel.num_data_states
        evidence = None if self.inputs == "state" else self._data_evidence(x_t, t)  # formed once, read twice
        out = F.pad(self._net(x_t, t, evidence), (1, 0))[..., :data_states]
        if self.add_own_evidence:
            out = out + evidence  # Bayes' rule: the position's own evidence
        data_log_probs = self._mixed(log_softmax_over_states(out), mean_of_categoricals_log_probs)
        return F.pad(data_log_probs, (0, self.kernel.num_states - data_states), value=-math.inf)

    def reverse_probs(self, x_t, t):
        """P(x^{t-1} = 1 | x^t) for bits: (B, n) float tensor of 0/1 and t in 2..T -> (B, n)."""
        if not self.binary:
            raise ValueError("reverse_probs is the binary API; use log_probs for K > 2 states")
        with torch.no_grad():
            return torch.sigmoid(self.logits(x_t, t))

    # -- the generative program ------------------------------------------------------------
    def forward(self, x0=None, num_sequences=None):
        """The generative Pyro program; x^0 is observed when ``x0`` is given."""
        num = x0.shape[0] if x0 is not None else num_sequences
        plan = self.step_plan()
        with pyro.plate("sequences", num, dim=-2), pyro.plate("dims", self.n, dim=-1):
            x = pyro.sample(f"x_{self.T}", state_dist(self.kernel, self.kernel.prior_log_probs((num, self.n))))
            for t in pyro.markov(range(self.T, 0, -1)):
                x = pyro.sample(f"x_{t - 1}", plan.step_dist(x, t), obs=x0 if t == 1 else None)
        return x

    def sample(self, num: int, seed=None, steps: typing.Optional[int] = None,
               generator: typing.Optional[torch.Generator] = None) -> torch.Tensor:
        """(num, n) samples of x^0, drawn with ``generator`` or, given ``seed``, with a fresh
        generator seeded with it (neither: torch's global generator); the global random state
        is never reseeded.

        Without ``steps``: every reverse step (``sampling.ancestral_sample``), the same draws as
        the Pyro program under ``pyro.set_rng_seed(seed)``.  With ``steps`` (through-x^0
        parameterisation only): ``steps`` jumps through the predicted x^0
        (``sampling.strided_sample``); ``steps = T`` is ``sample()``, draw for draw.
        """
        if seed is not None and generator is not None:
            raise ValueError("give a seed or a generator, not both")
        generator = seed if generator is None else generator
        if steps is None:
            return sampling.ancestral_sample(self.step_plan(), num, generator)
        self.stride_grid(steps)  # refuses a direct parameterisation
        return sampling.strided_sample(self.step_plan(), num, steps, generator)

    def stride_grid(self, steps: int):
        """[(t, s), ...]: ``steps`` jumps from T to 0 (``sampling.stride_grid``); the jumps read
        the prediction of x^0, which only the through-x^0 parameterisation trains."""
        if self.parameterisation != "x0":
            raise UserError("strided sampling (--steps) needs the through-x^0 parameterisation "
                            "(model.parameterisation: x0)")
        return sampling.stride_grid(self.T, steps)
