"""bdiff_pyro: discrete (Bernoulli) diffusion models as Pyro programs.

Time-index convention, used everywhere: x^0 is data, x^t (t = 1..T) is the state after t
forward steps, beta_t is the rate of step t (betas[0] = 0) and beta~_t the cumulative rate
(beta~_0 = 0).  The reverse step at time t maps x^t to x^{t-1}; t = 1 is the edge step
p(x^0 | x^1).  Logs are natural in code; users see bits.

    import bdiff_pyro
    m = bdiff_pyro.load("runs/heartbeat-...")   # a run directory or checkpoint file
    m.n, m.T, m.kernel.betas, m.kernel.pi
    m.reverse_probs(x_t, t)                      # P(x^{t-1} = 1 | x^t)
    m.sample(10, seed=0)
"""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from bdiff_pyro.programs.reverse import ReverseProcess

__all__ = ["load"]
__version__ = "0.1.0"


def load(path: Union[str, PathLike]) -> ReverseProcess:
    """A run directory or checkpoint file -> its ReverseProcess in eval mode (see
    ``bdiff_pyro.checkpoints.load``; imported here on first use, so that ``import bdiff_pyro``
    and the command line start without torch)."""
    from bdiff_pyro.checkpoints import load as load_checkpoint

    return load_checkpoint(path)
