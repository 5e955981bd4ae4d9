"""The residual MLP: the network interface, its formula at initialisation, dropout only while
training, and its config keys."""

import pytest
import torch
from torch.nn import functional as F

from bdiff_pyro.config import config_from_dict, model_spec
from bdiff_pyro.errors import UserError
from bdiff_pyro.networks.mlp import sinusoidal_embedding
from bdiff_pyro.networks.resmlp import ResMLP
from bdiff_pyro.programs.reverse import ReverseProcess


def test_shapes_follow_the_network_interface():
    net = ResMLP(n=5, num_states=3, hidden=(8, 8), time_embedding=4).double()
    features = torch.rand(2, 3, 5, 2, dtype=torch.float64)
    assert net(features, 7).shape == (2, 3, 5, 2)
    assert net(features, torch.tensor([[1, 2, 3], [4, 5, 6]])).shape == (2, 3, 5, 2)


def test_at_initialisation_the_blocks_are_the_identity():
    """Second layers start at zero: logits = W_out silu(LN(W_in x + W_t e(t)))."""
    torch.manual_seed(0)
    net = ResMLP(n=4, num_states=2, hidden=(6, 6, 6), time_embedding=4).double()
    x = torch.randint(0, 2, (3, 4, 1)).double()
    time = sinusoidal_embedding(torch.tensor([1, 5, 9]), 4)
    h = x.flatten(-2) @ net.state_in.weight.T + net.state_in.bias + time @ net.time_in.weight.T
    expected = F.silu(F.layer_norm(h, (6,))) @ net.out.weight.T + net.out.bias
    assert torch.allclose(net(x, torch.tensor([1, 5, 9]))[..., 0], expected, rtol=0, atol=1e-12)


def test_dropout_acts_only_while_training():
    torch.manual_seed(0)
    net = ResMLP(n=6, num_states=2, hidden=(32, 32), dropout=0.5).double()
    for layer in net.second:  # make the blocks count
        torch.nn.init.normal_(layer.weight)
    x = torch.randint(0, 2, (4, 6, 1)).double()
    assert not torch.equal(net(x, 3), net(x, 3))
    net.eval()
    assert torch.equal(net(x, 3), net(x, 3))


def test_config_builds_a_residual_network_and_checks_its_widths():
    config = config_from_dict({"model": {"network": "resmlp", "hidden": [16, 16], "dropout": 0.2, "T": 5}})
    process = ReverseProcess.from_spec(model_spec(config, n=7))
    assert isinstance(process.net, ResMLP) and process.net.dropout.p == 0.2
    assert process.log_probs(torch.zeros(3, 7), 4).shape == (3, 7, 2)
    with pytest.raises(UserError, match="model.network resmlp needs equal model.hidden sizes"):
        config_from_dict({"model": {"network": "resmlp", "hidden": [16, 8]}})
    with pytest.raises(UserError, match=r"model.dropout must be in \[0, 1\)"):
        config_from_dict({"model": {"dropout": 1.0}})
    with pytest.raises(UserError, match="model.network must be one of"):
        config_from_dict({"model": {"network": "no-such-network"}})
    with pytest.raises(UserError, match="train.weight_decay must be >= 0"):
        config_from_dict({"train": {"weight_decay": -1e-4}})
