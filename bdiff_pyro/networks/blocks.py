"""Pieces the structured networks share: the time code of a batch, the residual block, and the
body of the convolutional networks (1-D and 2-D alike)."""

import math
from typing import Union

import torch
from torch import nn

from bdiff_pyro import registry
from bdiff_pyro.networks.mlp import sinusoidal_embedding


def flat_time_code(t, lead_shape, dim, dtype, device=None):
    """The sinusoidal code of t for a batch flattened to one dimension: (1, dim) when every
    sequence shares an int t (placed on ``device``), (prod(lead_shape), dim) for one time per sequence."""
    if isinstance(t, int):
        return sinusoidal_embedding(t, dim, device).to(dtype).unsqueeze(0)
    t = torch.as_tensor(t, device=device).expand(lead_shape).reshape(-1)
    return sinusoidal_embedding(t, dim).to(dtype)


def group_norm(channels):
    """GroupNorm over at most 8 groups: its statistics run over every position, so a shift
    or a permutation of the positions leaves them unchanged (the network stays equivariant)."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


def make_activation(name):
    return registry.resolve(registry.ACTIVATIONS, name, "activation")()


class ResidualBlock(nn.Module):
    """h + conv(drop(act(norm(conv(act(norm(h))) (+) time)))): a pre-activation residual block
    (He et al. 2016) whose middle is conditioned on the time code, either additively
    (a + W tau(t), as in DDPM) or by FiLM, a = (1 + gamma(t)) * norm(a) + beta(t), with gamma
    and beta starting at zero; ``dropout`` zeroes units before the second convolution while
    training (as DDPM's blocks do).  ``make_conv`` builds one channels -> channels convolution."""

    def __init__(self, make_conv, channels, time_embedding, activation, film, dropout=0.0):
        super().__init__()
        self.norm_in, self.conv_in = group_norm(channels), make_conv()
        self.norm_mid, self.conv_out = group_norm(channels), make_conv()
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
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
        return h + self.conv_out(self.dropout(self.act(a)))


PADDINGS = ("circular", "zeros")


def check_structure(kernel_size: int, padding: str) -> None:
    """An odd kernel keeps the output on the input's positions; the padding is one of PADDINGS."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd number >= 1 (got {kernel_size})")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS} (got {padding!r})")


class ResidualConvNet(nn.Module):
    """Per-position features of x^t (..., n, num_features) and t -> (..., n, K - 1) logits over
    a grid of positions that a subclass lays out (``to_grid`` / ``from_grid``) and convolves
    with ``convolution`` (nn.Conv1d or nn.Conv2d).

    A kernel-size-``kernel_size`` convolution lifts the features to ``channels``, ``blocks``
    residual blocks (``ResidualBlock``: group normalisation, time conditioning added or by
    FiLM; ``dropout`` inside each while training) follow, and a normalised 1 x 1 convolution
    reads the logits of states 1..K-1 against state 0 at every position.  Its size does not
    depend on n or T.
    """

    convolution = None

    def __init__(self, n: int, num_states: int, channels: int, blocks: int, kernel_size: int, padding: str,
                 activation: str, time_embedding: int, num_features: Union[int, None], film: bool,
                 dropout: float = 0.0):
        super().__init__()
        check_structure(kernel_size, padding)
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.num_features = num_states - 1 if num_features is None else num_features

        def conv(into, out, size=kernel_size):
            return self.convolution(into, out, size, padding=size // 2, padding_mode=padding)

        self.lift = conv(self.num_features, channels)
        self.blocks = nn.ModuleList(ResidualBlock(lambda: conv(channels, channels), channels, time_embedding,
                                                  activation, film, dropout) for _ in range(blocks))
        self.norm_out, self.act = group_norm(channels), make_activation(activation)
        self.out = self.convolution(channels, num_states - 1, 1)

    @property
    def activation_widths(self) -> list:
        """Numbers per sequence each layer holds (for the memory estimates): channels x n for
        the lift, and for every block its two convolutions, two norms and their activations."""
        return [self.n * self.lift.out_channels] * (1 + 6 * len(self.blocks))

    def to_grid(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n, num_features) -> (B, num_features, *grid)."""
        raise NotImplementedError

    def from_grid(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K - 1, *grid) -> (B, n, K - 1)."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, t) -> torch.Tensor:
        """(..., n, num_features) features and an int or per-sequence t -> (..., n, K - 1)."""
        dtype = self.lift.weight.dtype
        lead = features.shape[:-2]
        time = flat_time_code(t, lead, self.time_embedding, dtype, features.device)
        h = self.lift(self.to_grid(features.to(dtype).reshape(-1, self.n, self.num_features)))
        for block in self.blocks:
            h = block(h, time)
        logits = self.out(self.act(self.norm_out(h)))
        return self.from_grid(logits).reshape(*lead, self.n, self.num_states - 1)
