"""The optimiser a config describes: ClippedAdam with its decaying learning rate, and
decoupled (AdamW-style) weight decay checked against torch.optim.AdamW and a closed form."""

import pyro.optim
import pytest
import torch

from bdiff_pyro.config import config_from_dict
from bdiff_pyro.errors import UserError
from bdiff_pyro.train import ClippedAdamW, make_optimiser


def test_clipped_adamw_without_decay_or_clipping_is_torch_adamw():
    """eps = 0: the two add eps at different places (before and after the bias correction)."""
    torch.manual_seed(0)
    start = torch.randn(5, 3, dtype=torch.float64)
    ours, reference = start.clone().requires_grad_(), start.clone().requires_grad_()
    mine = ClippedAdamW([ours], lr=0.01, decoupled_weight_decay=0.3, clip_norm=1e9, lrd=1.0, eps=0.0)
    torchs = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.3, eps=0.0)
    for _ in range(6):
        gradient = torch.randn(5, 3, dtype=torch.float64)
        ours.grad, reference.grad = gradient.clone(), gradient.clone()
        mine.step()
        torchs.step()
    assert torch.allclose(ours, reference, rtol=0, atol=1e-14)
    assert not torch.allclose(ours, start, atol=1e-3)


def test_with_zero_gradients_the_weights_shrink_by_the_decayed_rate():
    """Zero gradients leave Adam's update at zero: w_k = w_0 prod_{i=1..k} (1 - lr lrd^i lambda)."""
    lr, lrd, decay, steps = 0.05, 0.9, 2.0, 4
    start = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    weights = start.clone().requires_grad_()
    optimiser = ClippedAdamW([weights], lr=lr, lrd=lrd, decoupled_weight_decay=decay)
    for _ in range(steps):
        weights.grad = torch.zeros_like(weights)
        optimiser.step()
    factor = 1.0
    for i in range(1, steps + 1):
        factor *= 1 - lr * lrd ** i * decay
    assert torch.allclose(weights, start * factor, rtol=1e-15, atol=0)


def test_the_config_picks_the_optimiser():
    plain = make_optimiser(config_from_dict({"train": {"weight_decay": 1e-4}}).train)
    assert isinstance(plain, pyro.optim.PyroOptim) and plain.pt_optim_constructor is not ClippedAdamW
    assert plain.pt_optim_args["weight_decay"] == 1e-4
    train = config_from_dict({"train": {"decoupled_weight_decay": 0.1, "lr": 1e-3, "lr_final": 1e-4,
                                        "steps": 100}}).train
    decoupled = make_optimiser(train)
    assert decoupled.pt_optim_constructor is ClippedAdamW
    assert decoupled.pt_optim_args["decoupled_weight_decay"] == 0.1
    assert decoupled.pt_optim_args["lrd"] == pytest.approx(0.1 ** (1 / 100), rel=1e-15)


def test_decoupled_weight_decay_is_validated():
    with pytest.raises(UserError, match="train.decoupled_weight_decay must be >= 0"):
        config_from_dict({"train": {"decoupled_weight_decay": -0.1}})
    with pytest.raises(UserError, match="train.decoupled_weight_decay x train.lr must be < 1"):
        config_from_dict({"train": {"decoupled_weight_decay": 1000.0, "lr": 1e-3}})
