"""Choosing a network in the config: validation of its keys, networks.build_network, and the
builder and checkpoints that use it."""

import dataclasses

import pytest
import torch

from bdiff_pyro.checkpoints import load, save_atomically
from bdiff_pyro.config import Config, ModelConfig, config_from_dict, model_spec
from bdiff_pyro.errors import UserError
from bdiff_pyro.networks import build_network
from bdiff_pyro.networks.conv1d import Conv1dNet
from bdiff_pyro.networks.conv2d import Conv2dNet
from bdiff_pyro.networks.mlp import MLP
from bdiff_pyro.networks.transformer import TransformerNet
from bdiff_pyro.programs.reverse import ReverseProcess


def build_process(model, n):
    """The model a ModelConfig describes, built the one way models are built."""
    return ReverseProcess.from_spec(model_spec(Config(model=model), n))


def test_default_builder_gives_the_same_mlp_as_before():
    """model.network defaults to mlp, built with the same arguments in the same order, so the
    same seed gives the same weights."""
    model = ModelConfig()
    torch.manual_seed(5)
    built = build_process(model, 20)
    torch.manual_seed(5)
    direct = MLP(20, 2, hidden=(128, 128), activation="silu", time_embedding=32, num_features=1, film=False)
    assert isinstance(built.net, MLP)
    direct_state = direct.state_dict()
    for key, value in built.net.state_dict().items():
        assert torch.equal(value, direct_state[key]), key


@pytest.mark.parametrize("network,cls", [("conv1d", Conv1dNet), ("conv2d", Conv2dNet),
                                         ("transformer", TransformerNet)])
def test_builder_passes_the_networks_own_keys(network, cls):
    model = ModelConfig(network=network, channels=12, blocks=3, kernel_size=3, padding="zeros", heads=3,
                        image_shape=[4, 4], inputs="evidence")
    process = build_process(model, 16)
    net = process.net
    assert isinstance(net, cls) and net.n == 16 and net.num_features == 1
    if network == "transformer":
        assert len(net.encoder.layers) == 3 and net.encoder.layers[0].self_attn.num_heads == 3
        assert net.embed.out_features == 12
    else:
        assert len(net.blocks) == 3 and net.lift.out_channels == 12
        assert net.lift.kernel_size[0] == 3 and net.lift.padding_mode == "zeros"
    if network == "conv2d":
        assert net.image_shape == (4, 4)


def test_build_network_passes_only_the_options_a_network_names():
    options = dict(hidden=[4, 6], channels=999, heads=7, activation="tanh", time_embedding=4, film=True)
    net = build_network("mlp", 3, 2, 1, options)
    assert [layer.out_features for layer in (net.state_in, *net.hidden)] == [4, 6]
    assert net.film is not None


def test_build_network_errors_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown network 'resnet'"):
        build_network("resnet", 4, 2, 1, {})
    with pytest.raises(UserError, match="model.network conv2d: image_shape 3 x 3 has 9 pixels.*n = 64"):
        build_network("conv2d", 64, 2, 1, {"image_shape": [3, 3]})
    with pytest.raises(UserError, match="n = 20 is not a square"):
        build_network("conv2d", 20, 2, 1, {})


@pytest.mark.parametrize("key,value,message", [
    ("network", "resnet", "model.network must be one of"),
    ("channels", 0, "model.channels must be >= 1"),
    ("blocks", 0, "model.blocks must be >= 1"),
    ("kernel_size", 4, "model.kernel_size must be odd"),
    ("padding", "reflect", "model.padding must be one of circular, zeros"),
    ("image_shape", [8], r"model.image_shape must be \[height, width\]"),
    ("image_shape", [8, 0], r"model.image_shape must be \[height, width\]"),
    ("heads", 0, "model.heads must be >= 1"),
    ("position_code", "rotary", "model.position_code must be one of learned, sinusoidal, none"),
])
def test_network_keys_are_validated(key, value, message):
    with pytest.raises(UserError, match=f"^cfg.yaml: {message}"):
        config_from_dict({"model": {key: value}}, where="cfg.yaml")


def test_transformer_heads_must_divide_channels():
    with pytest.raises(UserError, match="model.channels must be a multiple of model.heads"):
        config_from_dict({"model": {"network": "transformer", "channels": 10, "heads": 4}}, where="cfg.yaml")
    config_from_dict({"model": {"network": "conv1d", "channels": 10, "heads": 4}}, where="cfg.yaml")  # not used


@pytest.mark.parametrize("network", ["conv1d", "conv2d", "transformer"])
def test_checkpoint_of_a_structured_network_reloads_to_the_same_model(tmp_path, network):
    config = config_from_dict({"model": {"network": network, "channels": 8, "heads": 2, "T": 10},
                               "data": {"n": 16}})
    torch.manual_seed(0)
    process = build_process(config.model, 16)
    with torch.no_grad():
        for p in process.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_atomically({"format": 2, "config": dataclasses.asdict(config), "n": 16,
                     "model_state": process.state_dict()}, tmp_path / "checkpoint.pt")
    loaded = load(tmp_path)
    x = (torch.rand(5, 16) < 0.5).float()
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x, 4), process.eval().log_probs(x, 4))


@pytest.mark.parametrize("network", ["mlp", "conv1d", "conv2d", "transformer"])
def test_config_dropout_reaches_every_network(network):
    config = config_from_dict({"model": {"network": network, "dropout": 0.3, "channels": 8, "heads": 2,
                                         "blocks": 2, "T": 5}})
    process = ReverseProcess.from_spec(model_spec(config, n=16))
    rates = [module.p for module in process.net.modules() if isinstance(module, torch.nn.Dropout)]
    assert rates and set(rates) == {0.3}
