"""A residual 1-D convolutional network over the positions of a sequence.

With ``padding="circular"`` every layer commutes with a cyclic shift of the positions, so
shifting x^t shifts the logits: a pattern learned at one offset is known at every offset
(a heartbeat shift never seen in training is generated like the others).
"""

from typing import Union

import torch
from torch import nn

from bdiff_pyro.networks.blocks import ResidualBlock, flat_time_code, group_norm, make_activation

PADDINGS = ("circular", "zeros")


def check_structure(kernel_size: int, padding: str) -> None:
    """An odd kernel keeps the output on the input's positions; the padding is one of PADDINGS."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd number >= 1 (got {kernel_size})")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS} (got {padding!r})")


class Conv1dNet(nn.Module):
    """Per-position features of x^t (..., n, num_features) and t -> (..., n, K - 1) logits.

    A kernel-size-``kernel_size`` convolution lifts the features to ``channels``, ``blocks``
    residual blocks (``blocks.ResidualBlock``: group normalisation, time conditioning added
    or by FiLM) follow, and a normalised 1 x 1 convolution reads the logits of states 1..K-1
    against state 0 at every position.  Its size does not depend on n or T.
    """

    def __init__(self, n: int, num_states: int, channels: int = 64, blocks: int = 2, kernel_size: int = 5,
                 padding: str = "circular", activation: str = "silu", time_embedding: int = 32,
                 num_features: Union[int, None] = None, film: bool = False):
        super().__init__()
        check_structure(kernel_size, padding)
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.num_features = num_states - 1 if num_features is None else num_features

        def conv(into, out, size=kernel_size):
            return nn.Conv1d(into, out, size, padding=size // 2, padding_mode=padding)

        self.lift = conv(self.num_features, channels)
        self.blocks = nn.ModuleList(ResidualBlock(lambda: conv(channels, channels), channels, time_embedding,
                                                  activation, film) for _ in range(blocks))
        self.norm_out, self.act = group_norm(channels), make_activation(activation)
        self.out = nn.Conv1d(channels, num_states - 1, 1)

    @property
    def activation_widths(self) -> list:
        """Numbers per sequence each layer holds (for the memory estimates): channels x n for
        the lift, and for every block its two convolutions, two norms and their activations."""
        return [self.n * self.lift.out_channels] * (1 + 6 * len(self.blocks))

    def forward(self, features: torch.Tensor, t) -> torch.Tensor:
        """(..., n, num_features) features and an int or per-sequence t -> (..., n, K - 1)."""
        dtype = self.lift.weight.dtype
        lead = features.shape[:-2]
        time = flat_time_code(t, lead, self.time_embedding, dtype)
        h = self.lift(features.to(dtype).reshape(-1, self.n, self.num_features).transpose(-1, -2))
        for block in self.blocks:
            h = block(h, time)
        logits = self.out(self.act(self.norm_out(h)))  # (B, K - 1, n)
        return logits.transpose(-1, -2).reshape(*lead, self.n, self.num_states - 1)
