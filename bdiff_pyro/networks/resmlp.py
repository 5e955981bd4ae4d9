"""A residual MLP with layer normalisation and dropout over the flattened sequence: the MLP of
``networks.mlp`` made for tabular bits, where n = 100-200 positions and a few thousand rows
overfit a plain MLP quickly.

    h_0 = W_in [x] + W_t e(t)
    h_l = h_{l-1} + W_2 drop(act(W_1 LN(h_{l-1}) + U_l e(t)))      l = 1..L
    logits = W_out act(LN(h_L))

(pre-activation residual blocks, He et al. 2016; LN: layer normalisation).  The time enters
every block, so each block can weigh its input differently at each noise level; the second
layer of each block starts at zero, so the network starts as a linear map of its input.
"""

import torch
from torch import nn

from bdiff_pyro import registry
from bdiff_pyro.networks.mlp import sinusoidal_embedding


class ResMLP(nn.Module):
    """Per-position features of x^t (..., n, num_features) and the time t -> (..., n, K - 1)
    logits of states 1..K-1 against state 0: the interface of ``networks.mlp.MLP``.

    ``hidden``: one width per residual block (all equal: the residual stream has one width);
    ``dropout``: the probability of zeroing a unit inside each block while training.
    """

    def __init__(self, n, num_states, hidden=(256, 256), activation="silu", time_embedding=32, num_features=None,
                 dropout=0.0):
        super().__init__()
        if len(set(hidden)) != 1:
            raise ValueError(f"a residual MLP has one width; got hidden sizes {list(hidden)}")
        width = hidden[0]
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.num_features = num_states - 1 if num_features is None else num_features
        self.state_in = nn.Linear(n * self.num_features, width)
        self.time_in = nn.Linear(time_embedding, width, bias=False)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in hidden)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in hidden)
        self.times = nn.ModuleList(nn.Linear(time_embedding, width, bias=False) for _ in hidden)
        self.second = nn.ModuleList(nn.Linear(width, width) for _ in hidden)
        for layer in self.second:  # each block starts as the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, n * (num_states - 1))
        self.act = registry.resolve(registry.ACTIVATIONS, activation, "activation")()
        self.dropout = nn.Dropout(dropout)

    @property
    def activation_widths(self):
        """Numbers per sequence each layer holds (for the memory estimates): the stream and,
        in each block, its normalised input, its hidden layer and its output."""
        width = self.state_in.out_features
        return [width] + [width] * (3 * len(self.hidden))

    def forward(self, features: torch.Tensor, t) -> torch.Tensor:
        """(..., n, num_features) features and an int or per-sequence t -> (..., n, K - 1) logits."""
        dtype = self.state_in.weight.dtype
        time = sinusoidal_embedding(t, self.time_embedding, features.device).to(dtype)
        h = self.state_in(features.to(dtype).flatten(-2)) + self.time_in(time)
        for norm, first, times, second in zip(self.norms, self.hidden, self.times, self.second):
            h = h + second(self.dropout(self.act(first(norm(h)) + times(time))))
        return self.out(self.act(self.norm_out(h))).unflatten(-1, (self.n, self.num_states - 1))
