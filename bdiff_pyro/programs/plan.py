"""The binary reverse step of a ``ReverseProcess`` with everything that depends on t alone
tabulated once per sampling call (docs/math.md §6): the network's time terms, the features
and the own evidence of each state of x^t_i, the direct step's likelihood logits and the
posterior entries.  A step is then the network plus a few elementwise operations.

The sampler and the Pyro program both draw from :meth:`BinaryStepPlan.probs` (the program
through :meth:`BinaryStepPlan.step_dist`), so the same seed gives the same samples; the Pyro
site scores with the through-x^0 mixture of ``diffusion.steps.binary_mixture_logits`` on the
same network output.  A plan is built from the weights of the moment and never kept, so
training cannot make one stale.
"""

import torch

from bdiff_pyro.diffusion.steps import binary_mixture_logits, mean_of_bernoullis_logit
from bdiff_pyro.programs.sites import bernoulli_site


class _PerState:
    """c_t(x_i) from a (T+1, 2) table c for the bits x of x^t (floats 0./1.), as the one fused
    operation c_t(0) + (c_t(1) - c_t(0)) x_i (c_t(0) exactly, c_t(1) up to rounding): on the
    CPU a torch.where select costs dozens of times as much."""

    def __init__(self, table):
        self.at_zero = table[:, 0]
        self.difference = (table[:, 1] - table[:, 0]).tolist()

    def __call__(self, t, x):
        return torch.add(self.at_zero[t], x, alpha=self.difference[t])


class _ModuleNetwork:
    """A network without a time table: its own forward pass, one feature per position."""

    def __init__(self, net):
        self.net = net

    def __call__(self, features, t):
        return self.net(features.unsqueeze(-1), t)


class _Members:
    """An ensemble's members, each tabulated: their logits stacked on a leading axis."""

    def __init__(self, nets):
        self.nets = nets

    def __call__(self, features, t):
        return torch.stack([net(features, t) for net in self.nets])


def _tabulated(net, T):
    return net.with_time_table(T) if hasattr(net, "with_time_table") else _ModuleNetwork(net)


class BinaryStepPlan:
    """p(x^{t-1} | x^t) of a two-state ``ReverseProcess`` for t = 1..T, from the weights the
    process holds when the plan is built.  With l the network's logit (of x^0, or the direct
    correction), per position and for the state x = x^t_i:

        x0:      P(x^{t-1} = 1 | x^t) = a_t(x) + (b_t(x) - a_t(x)) sigmoid(l),
                 a_t(x) = q(x^{t-1} = 1 | x^t = x, x^0 = 0),  b_t(x) = the same with x^0 = 1
        direct:  sigmoid(l + log Q_t[1, x] - log Q_t[0, x])
        t = 1:   the process's edge step

    An ensemble's l is that of the mixed prediction (x0) or step (direct): the logit of
    (1/M) sum_m sigmoid(l_m).

    It has the reverse-step attributes the samplers read (``kernel``, ``n``, ``T``,
    ``logits``, ``x0_logits``) and ``probs``, from which they draw.
    """

    def __init__(self, process):
        kernel = process.kernel
        self.kernel, self.n, self.T = kernel, process.n, kernel.T
        self.process = process  # for its edge step
        self.direct = process.parameterisation == "direct"
        net = process.net
        self.ensemble = process.num_members > 1
        self.net = _Members([_tabulated(member, kernel.T) for member in net.nets]) if self.ensemble \
            else _tabulated(net, kernel.T)
        evidence = kernel.log_Qbar[:, 1, :] - kernel.log_Qbar[:, 0, :]  # (T+1, x): log q(x | 1) - log q(x | 0)
        features = {"state": None, "evidence": torch.sigmoid(evidence), "log_evidence": evidence}[process.inputs]
        self.features = None if features is None else _PerState(features)
        # the own evidence enters the prediction of x^0 (a direct step has none)
        self.own_evidence = _PerState(evidence) if process.add_own_evidence and not self.direct else None
        if self.direct:
            self.likelihood = _PerState(kernel.log_Q[:, 1, :] - kernel.log_Q[:, 0, :])
        else:
            one = kernel.log_posterior[..., 1].exp()  # (T+1, x^t, x^0): q(x^{t-1} = 1 | x^t, x^0)
            self.if_x0_is_0, self.if_x0_is_1 = _PerState(one[..., 0]), _PerState(one[..., 1])

    def _network_logits(self, x, t):
        """The network's logit l per position (x0: own evidence added), x^t as floats 0./1.;
        an ensemble's members on a leading axis, unmixed."""
        features = x if self.features is None else self.features(t, x)
        logits = self.net(features, t)[..., 0]
        if self.own_evidence is not None:
            logits = logits + self.own_evidence(t, x)  # Bayes' rule: the position's own evidence
        return logits

    def _mixed(self, logits):
        """An ensemble's members' logits -> the logit of their mean probability."""
        return mean_of_bernoullis_logit(logits, 0) if self.ensemble else logits

    #: sequences per block: a block's activations stay in the CPU's cache through a whole step
    #: (those of 10,000 sequences do not); benchmarks/sampling.py measures the effect
    rows_per_block = 2048

    def _step(self, x, t, scoring):
        """(logits or None, probabilities) of x^{t-1} = 1; the logits only when ``scoring``
        (or when the probabilities are formed from them)."""
        if t == 1:
            logits = self.process._edge_logits(x)
            return logits, torch.sigmoid(logits)
        net_logits = self._network_logits(x, t)
        if self.direct:
            logits = self._mixed(net_logits + self.likelihood(t, x))
            return logits, torch.sigmoid(logits)
        net_logits = self._mixed(net_logits)
        # lerp stays between its ends: a probability, as torch.bernoulli requires
        probs = torch.lerp(self.if_x0_is_0(t, x), self.if_x0_is_1(t, x), torch.sigmoid(net_logits))
        logits = binary_mixture_logits(self.kernel.log_posterior[t], x, net_logits) if scoring else None
        return logits, probs

    def _step_in_blocks(self, x, t, scoring):
        """:meth:`_step` on blocks of ``rows_per_block`` sequences of a (B, n) batch, joined:
        the numbers the sampler draws from block by block."""
        if x.dim() != 2 or len(x) <= self.rows_per_block:
            return self._step(x, t, scoring)
        blocks = [self._step(block, t, scoring) for block in x.split(self.rows_per_block)]
        logits, probs = zip(*blocks)
        return (torch.cat(logits) if scoring else None), torch.cat(probs)

    def probs(self, x_t, t: int):
        """P(x^{t-1} = 1 | x^t), shape (..., n): what the sampler and the Pyro site draw from."""
        return self._step_in_blocks(x_t, t, scoring=False)[1]

    def logits(self, x_t, t: int):
        """The logit of the same step, formed in log space for scoring."""
        return self._step_in_blocks(x_t, t, scoring=True)[0]

    def x0_logits(self, x_t, t: int):
        """The logit of the predicted P(x^0 = 1 | x^t) (through-x^0 parameterisation)."""
        return self._mixed(self._network_logits(x_t, t))

    def step_dist(self, x_t, t: int):
        """p(x^{t-1} | x^t) as the Pyro site of one time slice: drawn from :meth:`probs`,
        scored with :meth:`logits`."""
        return bernoulli_site(*self._step_in_blocks(x_t, t, scoring=True))
