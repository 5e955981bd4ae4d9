"""The hybrid loss through the command line: its key is checked, a resumed run keeps it, and
training reports the -ELBO part alone."""

import csv
from pathlib import Path

import pytest
from helpers import assert_one_line, bdiff, sets

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = ROOT / "experiments/configs/heartbeat.yaml"
TINY = ["model.T=6", "model.hidden=[16]", "train.steps=2", "train.eval_every=1", "train.checkpoint_every=2",
        "evaluate.num_samples=20", "evaluate.replicates=2", "train.eval_samples=20", "evaluate.diagnose=false"]



def test_a_negative_weight_is_refused_naming_the_key(tmp_path):
    assert_one_line(bdiff("train", HEARTBEAT, "--out", tmp_path / "run", *sets(*TINY, "train.x0_loss_weight=-1")),
                    "train.x0_loss_weight", ">= 0")
    assert not (tmp_path / "run").exists()


def test_the_direct_parameterisation_has_no_x0_prediction_to_score(tmp_path):
    assert_one_line(bdiff("train", HEARTBEAT, "--out", tmp_path / "run",
                          *sets(*TINY, "train.x0_loss_weight=0.1", "model.parameterisation=direct")),
                    "train.x0_loss_weight", "model.parameterisation")


def first_loss_bits(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return float(next(csv.DictReader(f))["loss_bits"])


@pytest.mark.slow
def test_training_reports_the_elbo_part_and_a_resume_keeps_the_weight(tmp_path):
    """Step 1 draws the same minibatch, t and x^t for the ELBO with or without the x^0 term (its
    draws come after), from the same initial weights: the reported loss must not change."""
    for weight in ("0.0", "5.0"):
        code, _, stderr = bdiff("train", HEARTBEAT, "--out", tmp_path / weight, "--quiet",
                                *sets(*TINY, f"train.x0_loss_weight={weight}"))
        assert code == 0, stderr
    assert first_loss_bits(tmp_path / "5.0") == pytest.approx(first_loss_bits(tmp_path / "0.0"), rel=1e-6)
    assert_one_line(bdiff("train", "--resume", tmp_path / "5.0", *sets("train.steps=3", "train.x0_loss_weight=1")),
                    "train.x0_loss_weight")
