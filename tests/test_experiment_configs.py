"""Every shipped config loads, validates and is listed in the README, and trains for a few steps
with tiny overrides, so none can rot."""

import re
from pathlib import Path

import pytest
import yaml

from bdiff_pyro.config import load_config
from bdiff_pyro.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
# Training configs have a `train:` section; other experiments (compare, ...) test their own.
TRAINING_CONFIGS = [c for c in CONFIGS if "train" in (yaml.safe_load(c.read_text()) or {})]
TINY = ["model.T=4", "model.hidden=[8]", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
        "evaluate.num_samples=50", "evaluate.replicates=2", "train.eval_samples=20", "train.eval_sequences=8",
        "evaluate.diagnose=false"]


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.stem)
def test_every_training_config_loads_and_validates(path):
    config = load_config(path)  # raises UserError naming the file and key on any invalid entry
    assert config.model.T >= 2 and config.train.steps >= 1


def test_the_readme_lists_exactly_the_shipped_configs():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configs", 1)[1].split("Keys (", 1)[0]
    listed = set(re.findall(r"`(\w+\.yaml)`", table))
    assert listed == {c.name for c in CONFIGS}


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.stem)
def test_config_trains_with_tiny_overrides(path, tmp_path):
    config = load_config(path, TINY)
    metrics = train(config, tmp_path, progress=False, log=lambda *_: None)
    assert metrics["steps"] == 4 and (tmp_path / "metrics.json").is_file()


def test_paper_and_reference_configs_say_what_they_claim():
    paper = load_config(CONFIGS[0].parent / "heartbeat_paper.yaml")
    reference = load_config(CONFIGS[0].parent / "heartbeat_reference.yaml")
    for config in (paper, reference):
        assert (config.data.n, config.data.period, config.model.T, config.model.schedule) == (20, 5, 2000, "paper")
        assert config.model.hidden == [50, 50, 50] and config.model.activation == "sigmoid"
    assert paper.model.pi_1 == 0.2 and reference.model.pi_1 == 0.5


@pytest.mark.parametrize("mlp_name, conv_name", [("heartbeat_t1000.yaml", "heartbeat_t1000_conv1d.yaml"),
                                                ("heartbeat64.yaml", "heartbeat64_conv1d.yaml")])
def test_conv1d_configs_change_only_the_network_and_its_budget(mlp_name, conv_name):
    """The measured comparisons in docs/networks.md hold data, diffusion and inputs fixed."""
    mlp, conv = (load_config(CONFIGS[0].parent / name) for name in (mlp_name, conv_name))
    assert mlp.data == conv.data
    for key in ("T", "schedule", "pi_1", "parameterisation", "kernel"):
        assert getattr(mlp.model, key) == getattr(conv.model, key), key
    assert (mlp.model.network, conv.model.network, conv.model.padding) == ("mlp", "conv1d", "circular")


def test_the_digits_conv2d_config_changes_the_network_t_and_its_regularisation_only():
    mlp, conv = (load_config(CONFIGS[0].parent / name) for name in ("digits.yaml", "digits_conv2d.yaml"))
    assert mlp.data == conv.data
    for key in ("schedule", "pi_1", "parameterisation", "inputs", "kernel"):
        assert getattr(mlp.model, key) == getattr(conv.model, key), key
    assert (conv.model.network, conv.model.padding, list(conv.model.image_shape)) == ("conv2d", "zeros", [8, 8])
    # what docs/networks.md measured on top of the network: importance-sampled t and dropout
    assert (conv.train.t_sampling, conv.model.dropout) == ("importance", 0.1)
    assert (mlp.train.t_sampling, mlp.model.dropout) == ("uniform", 0.0)
