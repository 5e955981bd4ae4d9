"""A residual 2-D convolutional network over the pixels of an image of known height x width
(e.g. the 8 x 8 digits, stored row by row as sequences of n = height * width positions)."""

import math
from typing import Sequence, Union

import torch
from torch import nn

from bdiff_pyro.networks.blocks import ResidualBlock, flat_time_code, group_norm, make_activation
from bdiff_pyro.networks.conv1d import check_structure


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


class Conv2dNet(nn.Module):
    """Per-pixel features of x^t (..., n, num_features) and t -> (..., n, K - 1) logits.

    The features are laid out as a (height, width) image, row by row; then the same design
    as ``conv1d.Conv1dNet`` with square ``kernel_size`` x ``kernel_size`` convolutions
    (``padding``: zeros by default, since an image's edges do not wrap around).
    """

    def __init__(self, n: int, num_states: int, channels: int = 64, blocks: int = 2, kernel_size: int = 3,
                 padding: str = "zeros", image_shape: Union[Sequence[int], None] = None, activation: str = "silu",
                 time_embedding: int = 32, num_features: Union[int, None] = None, film: bool = False):
        super().__init__()
        check_structure(kernel_size, padding)
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.num_features = num_states - 1 if num_features is None else num_features
        self.image_shape = image_shape_for(n, image_shape)

        def conv(into, out, size=kernel_size):
            return nn.Conv2d(into, out, size, padding=size // 2, padding_mode=padding)

        self.lift = conv(self.num_features, channels)
        self.blocks = nn.ModuleList(ResidualBlock(lambda: conv(channels, channels), channels, time_embedding,
                                                  activation, film) for _ in range(blocks))
        self.norm_out, self.act = group_norm(channels), make_activation(activation)
        self.out = nn.Conv2d(channels, num_states - 1, 1)

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
        image = features.to(dtype).reshape(-1, *self.image_shape, self.num_features).permute(0, 3, 1, 2)
        h = self.lift(image)
        for block in self.blocks:
            h = block(h, time)
        logits = self.out(self.act(self.norm_out(h)))  # (B, K - 1, height, width)
        return logits.permute(0, 2, 3, 1).reshape(*lead, self.n, self.num_states - 1)
