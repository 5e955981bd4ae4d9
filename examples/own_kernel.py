"""Write your own kernel: one class, one registration, and every part of the package uses it.

A kernel is a ``DiscreteKernel`` subclass with two members: ``step_matrices()``, the
(T + 1, K, K) float64 stack Q_0 = I, Q_1, ..., Q_T with Q_t[j, k] = q(x^t = k | x^{t-1} = j),
and ``stationary``, the (K,) distribution pi (docs/math.md §4).  Everything else is derived once
in the base class: log Q_t, log Qbar_t (by products, unless you override
``cumulative_matrices`` with a closed form), the posterior table, the closed-form edge step (set
``closed_form_edge = False`` if pi has zeros, and override ``num_data_states`` if some states are
not data, as the absorbing kernel does).

This script defines a "flip to a random *other* state" kernel, registers it, builds it by name
with ``make_kernel``, trains a reverse process with Pyro's SVI and the analytic bound as the
loss, checks the analytic bound against Pyro's ``TraceEnum_ELBO`` exactly, and samples:

    python examples/own_kernel.py          (about ten seconds on one core)

To make the kernel part of the package: put the class in ``bdiff_pyro/diffusion/kernels.py``, add
one line to ``KERNELS`` in ``bdiff_pyro/registry.py`` (configs then accept ``model.kernel: flip``)
and one line to ``KERNEL_CASES`` in ``tests/helpers.py`` (the kernel contract tests then run over
it); docs/architecture.md says more.
"""

import functools
import math

import pyro
import pyro.optim
import torch
from pyro.infer import SVI

from bdiff_pyro import registry
from bdiff_pyro.diffusion.bound import all_states, elbo_exact
from bdiff_pyro.diffusion.kernels import DiscreteKernel, make_kernel
from bdiff_pyro.diffusion.schedules import betas_from_beta_tilde, make_beta_tilde
from bdiff_pyro.networks.mlp import MLP
from bdiff_pyro.programs.enumeration import enumerated_elbo
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.train import AnalyticLoss


class FlipKernel(DiscreteKernel):
    """With probability beta_t a dimension jumps to one of the K - 1 *other* states, uniformly:

        Q_t = (1 - beta_t) I + beta_t (1 1^T - I) / (K - 1)

    Doubly stochastic, so pi is uniform and the paper's closed-form edge step applies.  It is
    uniform resampling at rate beta_t K / (K - 1) while that is at most 1, and something uniform
    resampling cannot express beyond: at beta_t = 1 a dimension is sure to change."""

    def __init__(self, beta_tilde, num_states):
        self.rates = betas_from_beta_tilde(torch.as_tensor(beta_tilde, dtype=torch.float64))
        super().__init__(T=len(self.rates) - 1, num_states=num_states)

    @property
    def stationary(self):
        return torch.full((self.num_states,), 1.0 / self.num_states, dtype=torch.float64)

    def step_matrices(self):
        eye = torch.eye(self.num_states, dtype=torch.float64)
        rate = self.rates[:, None, None]  # rates[0] = 0 gives Q_0 = I
        return (1 - rate) * eye + rate * (1 - eye) / (self.num_states - 1)


def main(steps=300):
    # one registration: make_kernel, config validation and checkpoints now know "flip"
    registry.register(registry.KERNELS, "flip", FlipKernel)

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    torch.manual_seed(0)
    kernel = make_kernel("flip", make_beta_tilde("cosine", 6), num_states=3)
    process = ReverseProcess(kernel, MLP(n=3, num_states=3, hidden=(32, 32)), parameterisation="x0").double()

    # Pyro's SVI with the analytic bound as the loss; the guide is the forward chain
    data = torch.tensor([[0, 1, 2], [2, 1, 0]], dtype=torch.float64)
    pyro.clear_param_store()
    svi = SVI(process, functools.partial(forward_chain, kernel), pyro.optim.Adam({"lr": 0.02}),
              loss=AnalyticLoss(kernel.T))
    for _ in range(steps):
        svi.step(data[torch.randint(len(data), (64,))])

    # the exact cross-check: the analytic bound equals Pyro's TraceEnum_ELBO on every sequence
    x0 = all_states(3, num_states=3)  # all 27 sequences, in lexicographic order
    with torch.no_grad():
        analytic = elbo_exact(kernel, process.log_probs, x0)
    enumerated = enumerated_elbo(process, x0)
    gap = float((analytic - enumerated).abs().max())
    assert torch.allclose(analytic, enumerated, rtol=1e-8, atol=0), gap
    print(f"analytic ELBO = TraceEnum_ELBO on all 27 sequences (largest difference {gap:.1e} nats)")
    # 012 and 210 are codes 0*9 + 1*3 + 2 = 5 and 2*9 + 1*3 + 0 = 21
    print("ELBO of 012 and 210 (bits):", [round(v, 3) for v in (analytic[[5, 21]] / math.log(2)).tolist()],
          "best possible: -1")

    samples = process.sample(1000, seed=0)  # (1000, 3) state codes
    valid = float((samples.unsqueeze(1) == data).all(-1).any(-1).double().mean())
    print(f"{valid:.0%} of the samples are 012 or 210")
    assert valid > 0.5, valid
    return valid


if __name__ == "__main__":
    main()
