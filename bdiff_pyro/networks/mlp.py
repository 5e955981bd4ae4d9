"""The multilayer perceptron over the flattened sequence: the network of the paper's kind, one
for every step (its size does not grow with T)."""

import math

import torch
from torch import nn

from bdiff_pyro import registry


def sinusoidal_embedding(t, dim, device=None):
    """[sin(t w_k), cos(t w_k)] with w_k = 10000^(-k / (dim/2)): the transformer time code, on
    t's device (an int t: on ``device``)."""
    half = dim // 2
    t = torch.as_tensor(t, dtype=torch.float64, device=t.device if torch.is_tensor(t) else device)
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.unsqueeze(-1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)



class MLP(nn.Module):
    """An MLP from per-position features of x^t and the time t to n x (K-1) logits (the
    logit of state 0 is fixed at 0).

    Input: ``num_features`` numbers per position (by default K - 1: the one-hot code of the
    state without its state-0 column, for bits x^t itself) and a sinusoidal embedding of t.
    The first layer is split into a state part and a time part so that, when every sequence
    shares t (sampling), the time part is computed once per step.  With ``film``, the time
    also scales and shifts every layer's pre-activation (FiLM, Perez et al. 2018):
    a_l = (1 + gamma_l(t)) * (W_l h + b_l) + beta_l(t), which lets one network weigh its
    inputs differently at each noise level; gamma and beta start at zero.  One network for
    all steps: its size does not grow with T.
    """

    def __init__(self, n, num_states, hidden=(128, 128), activation="silu", time_embedding=32, num_features=None,
                 film=False):
        super().__init__()
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.num_features = num_states - 1 if num_features is None else num_features
        self.state_in = nn.Linear(n * self.num_features, hidden[0])
        self.time_in = nn.Linear(time_embedding, hidden[0], bias=False)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:]))
        self.out = nn.Linear(hidden[-1], n * (num_states - 1))
        self.act = registry.resolve(registry.ACTIVATIONS, activation, "activation")()
        self.film = nn.ModuleList(nn.Linear(time_embedding, 2 * size) for size in hidden) if film else None
        if film:
            for layer in self.film:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def activation_widths(self):
        """Numbers per sequence each layer holds (for the memory estimates)."""
        return [layer.out_features for layer in [self.state_in, *self.hidden]]

    def forward(self, features, t):
        """(..., n, num_features) features and an int or per-sequence t -> (..., n, K - 1)
        logits of states 1..K-1 against state 0."""
        dtype = self.state_in.weight.dtype
        time = sinusoidal_embedding(t, self.time_embedding, features.device).to(dtype)
        h = features.to(dtype).flatten(-2)
        for index, layer in enumerate([self.state_in, *self.hidden]):
            pre = layer(h)
            if self.film is not None:
                scale, shift = self.film[index](time).chunk(2, dim=-1)
                pre = torch.addcmul(pre + shift, pre, scale)
            if index == 0:
                pre = pre + self.time_in(time)  # the time enters at the first layer
            h = self.act(pre)
        return self.out(h).unflatten(-1, (self.n, self.num_states - 1))
