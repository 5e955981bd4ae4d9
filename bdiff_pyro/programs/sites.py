"""The distribution of one time slice of a chain, as a Pyro sample site sees it."""

import pyro.distributions as dist


def state_dist(kernel, log_probs):
    """Bernoulli sites for two-state kernels (values 0./1., on the logit), Categorical
    otherwise; batch shape log_probs.shape[:-1].  ``DiscreteKernel.sample_states`` draws the
    same values from the same random state."""
    if kernel.num_states == 2:
        return dist.Bernoulli(logits=log_probs[..., 1] - log_probs[..., 0])
    return dist.Categorical(logits=log_probs)


def bernoulli_site(logits, probs):
    """Bernoulli on ``logits`` whose draws are torch.bernoulli(``probs``): one distribution
    given in both forms, each computed where it is accurate (probs in probability space for
    drawing, logits in log space for log_prob).  ``probs`` takes the place of the
    sigmoid(logits) that torch's Bernoulli would otherwise compute and cache on first use."""
    site = dist.Bernoulli(logits=logits)
    site.probs = probs
    return site
