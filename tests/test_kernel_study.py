"""The kernel study (experiments/kernels.py, bdiff_pyro/kernel_study.py): its plan, and a
tiny end-to-end run of the script's main function that writes the table and the figure."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bdiff_pyro.diffusion.kernels import BernoulliKernel, UniformKernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.errors import UserError
from bdiff_pyro.kernel_study import independent_baseline_bits, paired_differences, plan, score_set

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
TINY = ["model.T=4", "model.hidden=[8]", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=4",
        "evaluate.num_samples=50", "evaluate.replicates=2", "train.eval_samples=20", "train.eval_sequences=8"]


def load_script():
    spec = importlib.util.spec_from_file_location("kernels_script", ROOT / "experiments" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_runs_each_applicable_kernel_once_and_reuses_the_k2_uniform_twin():
    cells = plan(["heartbeat", "digits2", "digits4"], ["bernoulli", "uniform", "absorbing", "gaussian"], CONFIGS, TINY)
    table = [(spec.name, kernel, twin) for spec, kernel, _, twin in cells]
    assert table == [
        ("heartbeat", "bernoulli", None), ("heartbeat", "uniform", "bernoulli"), ("heartbeat", "absorbing", None),
        ("heartbeat", "gaussian", None),
        ("digits2", "bernoulli", None), ("digits2", "uniform", "bernoulli"), ("digits2", "absorbing", None),
        ("digits2", "gaussian", None),
        ("digits4", "uniform", None), ("digits4", "absorbing", None), ("digits4", "gaussian", None),
    ]
    for spec, kernel, config, _ in cells:  # same settings for every kernel of a data set
        assert config.model.kernel == kernel and config.model.T == 4
        assert config.data.levels == (4 if spec.name == "digits4" else 2)
    # without its twin, or on request, the K = 2 uniform kernel is trained
    assert [twin for *_, twin in plan(["heartbeat"], ["uniform"], CONFIGS, TINY)] == [None]
    assert all(twin is None for *_, twin in plan(["digits2"], ["bernoulli", "uniform"], CONFIGS, TINY,
                                                include_duplicates=True))
    with pytest.raises(UserError, match="nothing to run"):
        plan(["digits4"], ["bernoulli"], CONFIGS, TINY)


def test_uniform_at_k2_is_the_bernoulli_kernel_exactly():
    """Why the study reports uniform at K = 2 as the bernoulli run: same matrices, same pi."""
    beta_tilde = make_beta_tilde("cosine", 50)
    uniform, bernoulli = UniformKernel(beta_tilde, 2), BernoulliKernel(beta_tilde, 0.5)
    for name in ("log_Q", "log_Qbar", "log_pi", "log_posterior"):
        assert torch.equal(getattr(uniform, name), getattr(bernoulli, name)), name


def test_independent_baseline_and_paired_differences_by_hand():
    train = np.array([[0, 1], [0, 1], [1, 1]])
    test = np.array([[0, 1]])
    # position 0: counts (2.5, 1.5) / 4; position 1: (0.5, 3.5) / 4
    expected = -(math.log2(2.5 / 4) + math.log2(3.5 / 4))
    bits, se = independent_baseline_bits(train, np.vstack([test, test]), 2)
    assert bits == pytest.approx(expected) and se == 0.0
    rows = [{"dataset": "d", "kernel": "a", "nll_bits": 2.0, "mc_se_bits": 0.1, "data_se_bits": 1.0,
             "per_sequence_bits": [1.0, 3.0]},
            {"dataset": "d", "kernel": "b", "nll_bits": 3.5, "mc_se_bits": 0.1, "data_se_bits": 1.0,
             "per_sequence_bits": [3.0, 4.0]}]
    paired_differences(rows)
    assert rows[0]["delta_bits"] == 0.0 and rows[0]["best_in_dataset"]
    assert rows[1]["delta_bits"] == pytest.approx(1.5)
    assert rows[1]["delta_se_bits"] == pytest.approx(np.std([2.0, 1.0], ddof=1) / math.sqrt(2))


def test_heartbeat_is_scored_on_its_whole_distribution_and_digits_on_test():
    from bdiff_pyro.config import load_config
    heartbeat, _, whole = score_set(load_config(CONFIGS / "kernel_heartbeat.yaml"))
    assert whole and heartbeat.shape == (5, 20)
    digits, _, whole = score_set(load_config(CONFIGS / "kernel_digits.yaml", ["data.levels=4", "model.kernel=uniform"]))
    assert not whole and digits.shape == (269, 64) and set(digits.unique().tolist()) <= {0, 1, 2, 3}


def test_tiny_run_of_the_script_writes_the_table_and_the_figure(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "kernels"
    args = [str(out), "--quiet", "--datasets", "heartbeat", "digits4", "--kernels", "uniform", "absorbing",
            "--replicates", "2", "--figure-samples", "4"] + [a for key in TINY for a in ("--set", key)]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    assert "machine:" in printed and "command:" in printed

    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["dataset"], r["kernel"]) for r in rows] == [
        ("heartbeat", "uniform"), ("heartbeat", "absorbing"), ("digits4", "uniform"), ("digits4", "absorbing")]
    for row in rows:
        assert math.isfinite(row["nll_bits"]) and row["mc_se_bits"] > 0 and row["train_time_s"] > 0
        assert row["delta_bits"] >= 0 and len(row["samples"]) == 4
        assert (row["valid_fraction"] is None) == (row["dataset"] == "digits4")
        assert (row["data_se_bits"] is None) == (row["dataset"] == "heartbeat")
        assert (out / f"{row['dataset']}-{row['kernel']}" / "checkpoint.pt").is_file()
    assert max(max(s) for r in rows if r["dataset"] == "digits4" for s in r["samples"]) <= 3  # no mask state
    assert results["machine"]["cores"] >= 1 and results["command"]

    table = (out / "results.md").read_text()
    assert "| data | kernel |" in table and "n/a" in table and "independent pixels" in table
    assert (out / "samples.png").stat().st_size > 1000

    with pytest.raises(UserError, match="refusing to overwrite"):
        script.main(args)
