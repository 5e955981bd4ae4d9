"""An ensemble of independently initialised networks of one kind (``model.members``).

The members' predictions are not averaged here: :meth:`Ensemble.forward` stacks them on a
leading axis, and ``programs.reverse.ReverseProcess`` mixes them as probabilities, after each
member's own evidence is added (a uniform mixture of the members' reverse steps).  Training
scores each member on its own bound (``train.AnalyticLoss``), as a deep ensemble is trained
(Lakshminarayanan et al. 2017); the selection and every evaluation read the mixture.
"""

import torch
from torch import nn


class Ensemble(nn.Module):
    """M networks with one interface: (..., n, num_features) features and t ->
    (M, ..., n, K - 1) logits, one slice per member."""

    def __init__(self, members):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members (got {len(members)})")
        self.nets = nn.ModuleList(members)
        self.n, self.num_features = members[0].n, members[0].num_features

    @property
    def num_members(self):
        return len(self.nets)

    @property
    def activation_widths(self):
        """Numbers per sequence the members hold at once (for the memory estimates)."""
        return [width for net in self.nets for width in net.activation_widths]

    def forward(self, features: torch.Tensor, t) -> torch.Tensor:
        return torch.stack([net(features, t) for net in self.nets])
