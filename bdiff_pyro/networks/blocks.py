"""Pieces the structured networks share: the time code of a batch, and the residual block of
the convolutional networks (1-D and 2-D alike)."""

import math

import torch
from torch import nn

from bdiff_pyro import registry
from bdiff_pyro.networks.mlp import sinusoidal_embedding


def flat_time_code(t, lead_shape, dim, dtype):
    """The sinusoidal code of t for a batch flattened to one dimension: (1, dim) when every
    sequence shares an int t, (prod(lead_shape), dim) for one time per sequence."""
    if isinstance(t, int):
        return sinusoidal_embedding(t, dim).to(dtype).unsqueeze(0)
    t = torch.as_tensor(t).expand(lead_shape).reshape(-1)
    return sinusoidal_embedding(t, dim).to(dtype)


def group_norm(channels):
    """GroupNorm over at most 8 groups: its statistics run over every position, so a shift
    or a permutation of the positions leaves them unchanged (the network stays equivariant)."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


def make_activation(name):
    return registry.resolve(registry.ACTIVATIONS, name, "activation")()


class ResidualBlock(nn.Module):
    """h + conv(act(norm(conv(act(norm(h))) (+) time))): a pre-activation residual block
    (He et al. 2016) whose middle is conditioned on the time code, either additively
    (a + W tau(t), as in DDPM) or by FiLM, a = (1 + gamma(t)) * norm(a) + beta(t), with gamma
    and beta starting at zero.  ``make_conv`` builds one channels -> channels convolution."""

    def __init__(self, make_conv, channels, time_embedding, activation, film):
        super().__init__()
        self.norm_in, self.conv_in = group_norm(channels), make_conv()
        self.norm_mid, self.conv_out = group_norm(channels), make_conv()
        self.act = make_activation(activation)
        self.film = film
        self.time = nn.Linear(time_embedding, 2 * channels if film else channels)
        if film:
            nn.init.zeros_(self.time.weight)
            nn.init.zeros_(self.time.bias)

    def forward(self, h, time):
        """h (B, C, *positions), time (B or 1, time_embedding) -> (B, C, *positions)."""
        a = self.conv_in(self.act(self.norm_in(h)))
        code = self.time(time).reshape(*time.shape[:-1], -1, *(1,) * (h.dim() - 2))
        if self.film:
            a = self.norm_mid(a)
            scale, shift = code.chunk(2, dim=1)
            a = torch.addcmul(a + shift, a, scale)
        else:
            a = self.norm_mid(a + code)
        return h + self.conv_out(self.act(a))
