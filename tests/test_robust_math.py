"""Numerical edge cases of the kernels, the oracle and the samplers: float32 underflow, schedules
that reach beta~ = 1 early, states no pattern produces, kernels whose pi has zeros."""

import pytest
import torch

from bdiff_pyro.bound import all_states, elbo_exact
from conftest import make_kernel_process


def test_gaussian_kernel_bound_is_the_same_in_float32_and_float64():
    """K = 4, cosine, T = 200: q(x^t | x^0) reaches ~1e-45, where a mixture formed in float32
    probabilities underflows to 0 and the ELBO to -inf."""
    process = make_kernel_process(("gaussian", 4, None), n=2, T=200)
    x0 = all_states(2, 4)
    with torch.no_grad():
        reference = elbo_exact(process.kernel, process.log_probs, x0)
        process32 = process.float()
        single = elbo_exact(process32.kernel, process32.log_probs, x0.float())
    assert x0.shape == (16, 2) and torch.isfinite(reference).all()
    assert torch.isfinite(single).all(), single
    assert torch.allclose(single.double(), reference, rtol=1e-5, atol=0), (single, reference)
