"""Noise schedules: beta~_t for t = 0..T, increasing from beta~_0 = 0 (docs/math.md section 1).

Schedules are computed in float64; the registry (``bdiff_pyro.registry.SCHEDULES``) is the one
list of their names.
"""

import math

import torch

from bdiff_pyro import registry


def beta_tilde_paper(T):
    """The paper's binary schedule beta_t = 1/(T - t + 1), i.e. beta~_t = t / T."""
    return torch.arange(T + 1, dtype=torch.float64) / T


def beta_tilde_cosine(T):
    """Cosine schedule beta~_t = 1 - cos(pi t / 2T): gentle start, beta~_T = 1."""
    t = torch.arange(T + 1, dtype=torch.float64)
    beta_tilde = 1.0 - torch.cos(math.pi * t / (2 * T))
    beta_tilde[-1] = 1.0  # cos(pi/2) is 6e-17 in floating point, not 0
    return beta_tilde


def beta_tilde_power(T, power):
    """Power family beta~_t = (t / T)^power; power > 1 starts gently (power = 1: paper)."""
    return (torch.arange(T + 1, dtype=torch.float64) / T) ** power


def make_beta_tilde(name, T, power=2.0):
    """beta~_0..beta~_T for the named schedule (``bdiff_pyro.registry.SCHEDULES``); ``power``
    is read only by schedules that take one."""
    schedule = registry.resolve(registry.SCHEDULES, name, "schedule")
    return schedule(T, power) if name in registry.SCHEDULES_WITH_POWER else schedule(T)


def betas_from_beta_tilde(beta_tilde):
    """Per-step rates from the cumulative ones: 1 - beta_t = (1 - beta~_t) / (1 - beta~_{t-1}).

    betas[0] = 0.  Where beta~_{t-1} = 1 the chain has already forgotten x^0 and beta_t = 1.
    """
    keep = 1.0 - beta_tilde
    betas = torch.zeros_like(beta_tilde)
    previous = keep[:-1]
    betas[1:] = torch.where(previous > 0, 1.0 - keep[1:] / previous, torch.ones_like(previous))
    return betas


