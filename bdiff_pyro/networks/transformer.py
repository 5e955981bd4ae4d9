"""A small transformer encoder over positions (torch.nn.TransformerEncoder).

Self-attention treats the positions as a set: without position codes (``position_code:
none``) permuting the positions of x^t permutes the logits.  With ``learned`` or
``sinusoidal`` codes, each position also knows where it is.
"""

from typing import Union

import torch
from torch import nn

from bdiff_pyro.networks.blocks import make_activation
from bdiff_pyro.networks.mlp import sinusoidal_embedding

POSITION_CODES = ("learned", "sinusoidal", "none")


class TransformerNet(nn.Module):
    """Per-position features of x^t (..., n, num_features) and t -> (..., n, K - 1) logits.

    Every position's features are embedded linearly into ``channels`` numbers, to which the
    position code and a linear map of the time code tau(t) are added; ``blocks``
    pre-normalised encoder layers with ``heads`` attention heads (feed-forward width
    2 x channels; torch's ``dropout`` on the attention weights and in the residual branches
    while training) follow, then a layer norm and a linear read-out of the logits of states
    1..K-1 against state 0.  With ``film`` the time also scales and shifts the
    normalised tokens before the read-out: (1 + gamma(t)) * h + beta(t), starting at zero.
    """

    def __init__(self, n: int, num_states: int, channels: int = 64, blocks: int = 2, heads: int = 4,
                 position_code: str = "learned", activation: str = "silu", time_embedding: int = 32,
                 num_features: Union[int, None] = None, film: bool = False, dropout: float = 0.0):
        super().__init__()
        if position_code not in POSITION_CODES:
            raise ValueError(f"position_code must be one of {POSITION_CODES} (got {position_code!r})")
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be a multiple of heads ({heads})")
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.num_features = num_states - 1 if num_features is None else num_features
        self.embed = nn.Linear(self.num_features, channels)
        self.time_in = nn.Linear(time_embedding, channels)
        self.position_code = position_code
        if position_code == "learned":
            self.positions = nn.Parameter(0.02 * torch.randn(n, channels))
        elif position_code == "sinusoidal":
            self.register_buffer("positions", sinusoidal_embedding(torch.arange(n), channels).float())
        else:
            self.positions = None
        layer = nn.TransformerEncoderLayer(channels, heads, dim_feedforward=2 * channels, dropout=dropout,
                                           activation=make_activation(activation), batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(channels)
        self.film = nn.Linear(time_embedding, 2 * channels) if film else None
        if film:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.out = nn.Linear(channels, num_states - 1)

    @property
    def activation_widths(self) -> list:
        """Numbers per sequence each layer holds (for the memory estimates): per encoder layer
        the attention weights (heads x n x n) and about 8 x channels per position."""
        channels, heads = self.embed.out_features, self.encoder.layers[0].self_attn.num_heads
        return [self.n * channels] + [heads * self.n ** 2 + 8 * channels * self.n] * len(self.encoder.layers)

    def forward(self, features: torch.Tensor, t) -> torch.Tensor:
        """(..., n, num_features) features and an int or per-sequence t -> (..., n, K - 1)."""
        dtype = self.embed.weight.dtype
        lead = features.shape[:-2]
        time = sinusoidal_embedding(t, self.time_embedding, features.device).to(dtype)
        time = time.reshape(1, -1) if isinstance(t, int) else time.expand(*lead, -1).reshape(-1, time.shape[-1])
        h = self.embed(features.to(dtype).reshape(-1, self.n, self.num_features))
        h = h + self.time_in(time).unsqueeze(-2)
        if self.positions is not None:
            h = h + self.positions.to(dtype)
        h = self.norm_out(self.encoder(h))
        if self.film is not None:
            scale, shift = self.film(time).unsqueeze(-2).chunk(2, dim=-1)
            h = torch.addcmul(h + shift, h, scale)
        return self.out(h).reshape(*lead, self.n, self.num_states - 1)
