"""The forward (noising) chain as a Pyro program: the guide of the ELBO.

    x^t_i ~ q(x^t_i | x^{t-1}_i),  t = 1..T,  independently over sequences and dimensions

With the Bernoulli kernel every site is a Bernoulli(x^{t-1}_i (1 - beta_t) + beta_t pi_1).
It takes the same arguments as the reverse program, as SVI requires of a guide.
"""

import pyro

from bdiff_pyro.programs.sites import state_dist


def forward_chain(kernel, x0, num_sequences=None):
    """Draw one trajectory x^1..x^T per sequence of x0 (num, n); returns x^T."""
    num, n = x0.shape
    with pyro.plate("sequences", num, dim=-2), pyro.plate("dims", n, dim=-1):
        x = x0
        for t in pyro.markov(range(1, kernel.T + 1)):
            x = pyro.sample(f"x_{t}", state_dist(kernel, kernel.q_step_log_probs(x, t)))
    return x
