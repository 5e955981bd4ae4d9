"""The reverse (generative) process: a time-conditioned network shared across steps, and the
generative Pyro program of DESIGN.md section 2

    x^T ~ pi,     x^{t-1} ~ p(x^{t-1} | x^t)  for t = T..2,     x^0 ~ p(x^0 | x^1)

where the last (edge) step is the paper's closed form when the kernel has one, and the
network's prediction of x^0 otherwise.  The network is parameterised either

- ``direct``: it outputs the logits of p(x^{t-1} | x^t) (the paper, the reference repo), as
  a correction added to log q(x^t | x^{t-1} = k), or
- ``x0``: it outputs the logits of P(x^0 | x^t) and p(x^{t-1} | x^t) is the posterior
  q(x^{t-1} | x^t, x^0) averaged over that prediction (DESIGN.md section 3, as in D3PM).
"""

import contextlib
import math

import pyro
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn
from torch.nn import functional as F

from .errors import UserError
from .kernels import normalise

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}
PARAMETERISATIONS = ("direct", "x0")


def sinusoidal_embedding(t, dim):
    """[sin(t w_k), cos(t w_k)] with w_k = 10000^(-k / (dim/2)): the transformer time code."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = torch.as_tensor(t, dtype=torch.float64).unsqueeze(-1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ReverseNet(nn.Module):
    """An MLP from (x^t, t) to n x (K-1) logits (the logit of state 0 is fixed at 0).

    Input: the one-hot code of every dimension without its state-0 column (for bits: x^t
    itself) and a sinusoidal embedding of t.  The first layer is split into a state part and
    a time part so that, when every sequence shares t (sampling), the time part is computed
    once per step.  One network for all steps: its size does not grow with T.
    """

    def __init__(self, n, num_states, hidden=(128, 128), activation="silu", time_embedding=32):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.state_in = nn.Linear(n * (num_states - 1), hidden[0])
        self.time_in = nn.Linear(time_embedding, hidden[0], bias=False)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:]))
        self.out = nn.Linear(hidden[-1], n * (num_states - 1))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x_t, t):
        """(..., n) states and an int or per-sequence t -> (..., n, K) normalised log-probs."""
        dtype = self.state_in.weight.dtype
        features = F.one_hot(x_t.long(), self.num_states)[..., 1:].to(dtype).flatten(-2)
        time = sinusoidal_embedding(t, self.time_embedding).to(dtype)
        h = self.act(self.state_in(features) + self.time_in(time))
        for layer in self.hidden:
            h = self.act(layer(h))
        logits = self.out(h).unflatten(-1, (self.n, self.num_states - 1))
        return torch.log_softmax(F.pad(logits, (1, 0)), dim=-1)


class ReverseProcess(PyroModule):
    """p_theta(x^{0:T}): a kernel (its prior and edge step) plus a shared reverse network.

    This is the object ``bdiff_pyro.load`` returns.  ``n``, ``T`` and ``kernel`` describe
    it; ``reverse_probs`` and ``sample`` are the stable API; ``forward`` is the Pyro program.
    """

    def __init__(self, kernel, net, parameterisation="x0"):
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise UserError(f"unknown parameterisation {parameterisation!r}; choose one of {PARAMETERISATIONS}")
        self.kernel = kernel
        self.net = net
        self.parameterisation = parameterisation
        # Every layer must go through pyro.param to be trained by SVI (see README, pitfalls).
        to_pyro_module_(self.net)

    @property
    def n(self):
        return self.net.n

    @property
    def T(self):
        return self.kernel.T

    def log_probs(self, x_t, t):
        """log p(x^{t-1} = k | x^t), shape (..., n, K); t = 1 is the edge step p(x^0 | x^1).
        t is an int or one time per sequence (shape x_t.shape[:-1])."""
        if isinstance(t, int):
            return self._edge_log_probs(x_t) if t == 1 else self._step_log_probs(x_t, t)
        t = torch.as_tensor(t, device=x_t.device)
        step = self._step_log_probs(x_t, t.clamp_min(2))  # rows with t = 1 are replaced below
        is_edge = (t == 1)[..., None, None]
        return torch.where(is_edge, self._edge_log_probs(x_t), step) if bool(is_edge.any()) else step

    def _edge_log_probs(self, x1):
        if self.kernel.closed_form_edge:
            return self.kernel.edge_log_probs(x1)
        return self.x0_log_probs(x1, 1)  # the learned edge step

    def _step_log_probs(self, x_t, t):
        if self.parameterisation == "direct":
            # The network corrects the forward step's likelihood q(x^t | x^{t-1} = k): at
            # beta_t ~ 1/T the reverse step is nearly "stay", which a bare network would
            # have to learn from scratch at every t.
            likelihood = self.kernel.q_step_likelihood(x_t, t)
            # an x^t that no x^{t-1} can reach (absorbing kernels at beta_t = 1): no prior shape
            likelihood = torch.where(torch.isneginf(likelihood).all(-1, keepdim=True), 0.0, likelihood)
            return normalise(self.net(x_t, t) + likelihood)
        return self.kernel.q_posterior_log_probs_mixture(x_t, self.x0_log_probs(x_t, t), t)

    def x0_log_probs(self, x_t, t):
        """The network read as log P(x^0 = v | x^t), restricted to the states data can take
        (an absorbing kernel's mask state is not one)."""
        out = self.net(x_t, t)
        data_states = self.kernel.num_data_states
        if data_states == self.kernel.num_states:
            return out
        data_log_probs = torch.log_softmax(out[..., :data_states], dim=-1)
        return F.pad(data_log_probs, (0, self.kernel.num_states - data_states), value=-math.inf)

    def reverse_probs(self, x_t, t):
        """P(x^{t-1} = 1 | x^t) for bits: (B, n) float tensor of 0/1 and t in 2..T -> (B, n)."""
        if self.kernel.num_states != 2:
            raise ValueError("reverse_probs is the binary API; use log_probs for K > 2 states")
        with torch.no_grad():
            return self.log_probs(x_t, t)[..., 1].exp()

    def forward(self, x0=None, num_sequences=None):
        """The generative Pyro program; x^0 is observed when ``x0`` is given."""
        num = x0.shape[0] if x0 is not None else num_sequences
        with pyro.plate("sequences", num, dim=-2), pyro.plate("dims", self.n, dim=-1):
            x = pyro.sample(f"x_{self.T}", self.kernel.site_dist(self.kernel.prior_log_probs((num, self.n))))
            for t in pyro.markov(range(self.T, 0, -1)):
                x = pyro.sample(f"x_{t - 1}", self.kernel.site_dist(self.log_probs(x, t)),
                                obs=x0 if t == 1 else None)
        return x

    def sample(self, num, seed=None, steps=None):
        """(num, n) samples of x^0.

        Without ``steps``: every reverse step, the same draws as the Pyro program under the
        same seed.  With ``steps`` (through-x^0 parameterisation only): ``steps`` network
        evaluations on an evenly spaced grid T = t_1 > ... > t_steps > 0; each jump t -> s
        draws x^s from q(x^s | x^t, x^0) averaged over the predicted P(x^0 | x^t), and the
        last draws x^0 from the prediction itself.
        """
        rng = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
        with rng, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            x = self.kernel.site_dist(self.kernel.prior_log_probs((num, self.n))).sample()
            if steps is None:
                for t in range(self.T, 0, -1):
                    x = self.kernel.site_dist(self.log_probs(x, t)).sample()
                return x
            for t, s in self.stride_grid(steps):
                x0_log_probs = self.x0_log_probs(x, t)
                log_probs = x0_log_probs if s == 0 else self.kernel.q_posterior_log_probs_mixture(x, x0_log_probs, t, s)
                x = self.kernel.site_dist(log_probs).sample()
        return x

    def stride_grid(self, steps):
        """[(t, s), ...] jumps from T to 0 with ``steps`` network evaluations."""
        if self.parameterisation != "x0":
            raise UserError("strided sampling (--steps) needs the through-x^0 parameterisation (model.parameterisation: x0)")
        if not 1 <= steps <= self.T:
            raise UserError(f"--steps must be between 1 and T = {self.T} (got {steps})")
        times = torch.linspace(self.T, 0, steps + 1).round().long().tolist()
        return list(zip(times[:-1], times[1:]))
