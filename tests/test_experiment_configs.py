"""Every experiment config trains for a few steps with tiny overrides, so none can rot."""

from pathlib import Path

import pytest
import yaml

from bdiff_pyro.config import load_config
from bdiff_pyro.train import train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml"))
# Training configs have a `train:` section; other experiments (compare, ...) test their own.
TRAINING_CONFIGS = [c for c in CONFIGS if "train" in (yaml.safe_load(c.read_text()) or {})]
TINY = ["model.T=4", "model.hidden=[8]", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
        "evaluate.num_samples=50", "evaluate.replicates=2", "train.eval_samples=20", "train.eval_sequences=8",
        "evaluate.diagnose=false"]


def test_the_documented_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"heartbeat.yaml", "heartbeat_paper.yaml", "heartbeat_reference.yaml", "heartbeat_text.yaml"} <= names


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
