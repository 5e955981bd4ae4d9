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
    inputs differently at each noise level; gamma and beta start at zero.  ``dropout`` zeroes
    hidden units while training.  One network for all steps: its size does not grow with T.
    """

    def __init__(self, n, num_states, hidden=(128, 128), activation="silu", time_embedding=32, num_features=None,
                 film=False, dropout=0.0):
        super().__init__()
        self.n, self.num_states, self.time_embedding = n, num_states, time_embedding
        self.num_features = num_states - 1 if num_features is None else num_features
        self.state_in = nn.Linear(n * self.num_features, hidden[0])
        self.time_in = nn.Linear(time_embedding, hidden[0], bias=False)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:]))
        self.out = nn.Linear(hidden[-1], n * (num_states - 1))
        self.act = registry.resolve(registry.ACTIVATIONS, activation, "activation")()
        self.dropout = nn.Dropout(dropout)
        self.film = nn.ModuleList(nn.Linear(time_embedding, 2 * size) for size in hidden) if film else None
        if film:
            for layer in self.film:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def activation_widths(self):
        """Numbers per sequence each layer holds (for the memory estimates)."""
        return [layer.out_features for layer in [self.state_in, *self.hidden]]

    def time_terms(self, t):
        """What the time adds to the layers, a function of t alone: the first layer's U tau(t)
        and, with FiLM, every layer's (gamma_l(t), beta_l(t)) (else None).  t an int, or a
        tensor of times giving one row per time."""
        weight = self.state_in.weight
        time = sinusoidal_embedding(t, self.time_embedding, weight.device).to(weight.dtype)
        film = None if self.film is None else [layer(time).chunk(2, dim=-1) for layer in self.film]
        return self.time_in(time), film

    def forward(self, features, t):
        """(..., n, num_features) features and an int or per-sequence t -> (..., n, K - 1)
        logits of states 1..K-1 against state 0."""
        time_in, film = self.time_terms(t)
        h = features.to(self.state_in.weight.dtype).flatten(-2)
        for index, layer in enumerate([self.state_in, *self.hidden]):
            pre = layer(h)
            if film is not None:
                scale, shift = film[index]
                pre = torch.addcmul(pre + shift, pre, scale)
            if index == 0:
                pre = pre + time_in  # the time enters at the first layer
            h = self.dropout(self.act(pre))
        return self.out(h).unflatten(-1, (self.n, self.num_states - 1))

    def with_time_table(self, T):
        """This network's forward pass for one time shared by the batch, t in 0..T, as a
        :class:`TimeTabulatedMLP` (for a sampling call, in evaluation mode: it has no dropout)."""
        return TimeTabulatedMLP(self, T)


#: activations with an in-place form, applied to a fresh pre-activation that needs no gradient
_IN_PLACE = ((nn.Sigmoid, torch.sigmoid_), (nn.Tanh, torch.tanh_), (nn.ReLU, torch.relu_),
             (nn.SiLU, lambda h: nn.functional.silu(h, inplace=True)))


class TimeTabulatedMLP:
    """``MLP.forward`` for a batch sharing one time t in 0..T, with the weights read once and
    what t adds to the layers tabulated for every t at once (``MLP.time_terms`` on 0..T), so
    that a step is the matrix products and activations alone:

        h_1 = act(W_1 x + (b_1 + U tau(t)))          h_l = act(W_l h_{l-1} + b_l)

    (with FiLM each pre-activation a becomes (1 + gamma_l(t)) a + beta_l(t), as in the module).
    Built per sampling call from the current weights, so it is never stale; the numbers
    differ from the module's only by rounding (the first bias is added before the product).
    """

    def __init__(self, mlp: MLP, T: int):
        time_in, film = mlp.time_terms(torch.arange(T + 1, device=mlp.state_in.weight.device))
        layers = [mlp.state_in, *mlp.hidden]
        self.n, self.outputs = mlp.n, mlp.num_states - 1
        self.weights = [layer.weight.T for layer in layers]
        self.biases = [layer.bias for layer in layers]
        self.film, self.time_in = film, time_in  # (T + 1, width) each
        self.first_bias = self.biases[0] + time_in
        self.out_weight, self.out_bias = mlp.out.weight.T, mlp.out.bias
        self.act = mlp.act
        self.act_in_place = next((fn for kind, fn in _IN_PLACE if isinstance(mlp.act, kind)), mlp.act)

    def __call__(self, features, t: int):
        """(..., n) features (one per position) at time t -> (..., n, K - 1) logits."""
        h = features.reshape(-1, self.n).to(self.out_weight.dtype)
        for index, weight in enumerate(self.weights):
            if self.film is None:
                pre = torch.addmm(self.first_bias[t] if index == 0 else self.biases[index], h, weight)
            else:
                pre = torch.addmm(self.biases[index], h, weight)
                scale, shift = self.film[index]
                pre = torch.addcmul(pre + shift[t], pre, scale[t])
                if index == 0:
                    pre = pre + self.time_in[t]
            h = self.act(pre) if pre.requires_grad else self.act_in_place(pre)
        out = torch.addmm(self.out_bias, h, self.out_weight)
        return out.reshape(*features.shape, self.outputs)
