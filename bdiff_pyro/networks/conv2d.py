"""A residual 2-D convolutional network over the pixels of an image of known height x width
(e.g. the 8 x 8 digits, stored row by row as sequences of n = height * width positions)."""

import math
from typing import Sequence, Union

import torch
from torch import nn

from bdiff_pyro.networks.blocks import ResidualConvNet


def image_shape_for(n: int, image_shape: Union[Sequence[int], None]) -> tuple:
    """(height, width) with height * width = n; without a shape, the square one."""
    if image_shape is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"n = {n} is not a square: give image_shape (height, width)")
        return side, side
    height, width = (int(size) for size in image_shape)
    if height * width != n:
        raise ValueError(f"image_shape {height} x {width} has {height * width} pixels, but sequences have n = {n}")
    return height, width


class Conv2dNet(ResidualConvNet):
    """Per-pixel features of x^t (..., n, num_features) and t -> (..., n, K - 1) logits.

    The features are laid out as a (height, width) image, row by row; then
    ``blocks.ResidualConvNet`` with square ``kernel_size`` x ``kernel_size`` convolutions
    (``padding``: zeros by default, since an image's edges do not wrap around).
    """

    convolution = nn.Conv2d

    def __init__(self, n: int, num_states: int, channels: int = 64, blocks: int = 2, kernel_size: int = 3,
                 padding: str = "zeros", image_shape: Union[Sequence[int], None] = None, activation: str = "silu",
                 time_embedding: int = 32, num_features: Union[int, None] = None, film: bool = False,
                 dropout: float = 0.0):
        shape = image_shape_for(n, image_shape)  # refused before any layer is built
        super().__init__(n, num_states, channels, blocks, kernel_size, padding, activation, time_embedding,
                         num_features, film, dropout)
        self.image_shape = shape

    def to_grid(self, features: torch.Tensor) -> torch.Tensor:
        return features.reshape(-1, *self.image_shape, self.num_features).permute(0, 3, 1, 2)

    def from_grid(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.permute(0, 2, 3, 1).reshape(logits.shape[0], self.n, -1)
