"""A residual 1-D convolutional network over the positions of a sequence.

With ``padding="circular"`` every layer commutes with a cyclic shift of the positions, so
shifting x^t shifts the logits: a pattern learned at one offset is known at every offset
(a heartbeat shift never seen in training is generated like the others).
"""

from typing import Union

import torch
from torch import nn

from bdiff_pyro.networks.blocks import ResidualConvNet


class Conv1dNet(ResidualConvNet):
    """Per-position features of x^t (..., n, num_features) and t -> (..., n, K - 1) logits:
    ``blocks.ResidualConvNet`` over the n positions of a sequence."""

    convolution = nn.Conv1d

    def __init__(self, n: int, num_states: int, channels: int = 64, blocks: int = 2, kernel_size: int = 5,
                 padding: str = "circular", activation: str = "silu", time_embedding: int = 32,
                 num_features: Union[int, None] = None, film: bool = False,
                 dropout: float = 0.0):
        super().__init__(n, num_states, channels, blocks, kernel_size, padding, activation, time_embedding,
                         num_features, film, dropout)

    def to_grid(self, features: torch.Tensor) -> torch.Tensor:
        return features.transpose(-1, -2)  # (B, num_features, n)

    def from_grid(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.transpose(-1, -2)  # (B, n, K - 1)
