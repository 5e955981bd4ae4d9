"""The experiments under experiments/<name>/: each script run end to end with tiny arguments in
a subprocess, as a user runs it (marked slow), and the unit checks of their pure functions,
imported from the experiment's module by its path.  (experiments/uci: tests/test_experiments_uci.py.)"""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bdiff_pyro.diffusion.kernels import BernoulliKernel, UniformKernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.errors import UserError
from bdiff_pyro.util.files import write_csv

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
KERNEL_CONFIGS = EXPERIMENTS / "kernels"
TINY_TRAINING = ["model.T=4", "model.hidden=[8]", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=4",
                 "evaluate.num_samples=50", "evaluate.replicates=2", "train.eval_samples=20", "train.eval_sequences=8"]


def load_module(path):
    """An experiment's module, imported by its path (experiments are not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, cwd):
    """``python experiments/<name>/<script>.py ARGS`` with this checkout's package first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(EXPERIMENTS / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)


def assert_refuses_to_overwrite(result):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to overwrite" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------
# experiments/kernels


@pytest.fixture(scope="module")
def kernel_study():
    return load_module(EXPERIMENTS / "kernels" / "kernel_study.py")


def test_plan_runs_each_applicable_kernel_once_and_reuses_the_k2_uniform_twin(kernel_study):
    plan = kernel_study.plan
    cells = plan(["heartbeat", "digits2", "digits4"], ["bernoulli", "uniform", "absorbing", "gaussian"],
                 KERNEL_CONFIGS, TINY_TRAINING)
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
    assert [twin for *_, twin in plan(["heartbeat"], ["uniform"], KERNEL_CONFIGS, TINY_TRAINING)] == [None]
    assert all(twin is None for *_, twin in plan(["digits2"], ["bernoulli", "uniform"], KERNEL_CONFIGS,
                                                TINY_TRAINING, include_duplicates=True))
    with pytest.raises(UserError, match="nothing to run"):
        plan(["digits4"], ["bernoulli"], KERNEL_CONFIGS, TINY_TRAINING)


def test_uniform_at_k2_is_the_bernoulli_kernel_exactly():
    """Why the kernel study reports uniform at K = 2 as the bernoulli run: same matrices, same pi."""
    beta_tilde = make_beta_tilde("cosine", 50)
    uniform, bernoulli = UniformKernel(beta_tilde, 2), BernoulliKernel(beta_tilde, 0.5)
    for name in ("log_Q", "log_Qbar", "log_pi", "log_posterior"):
        assert torch.equal(getattr(uniform, name), getattr(bernoulli, name)), name


def test_independent_baseline_and_paired_differences_by_hand(kernel_study):
    train = np.array([[0, 1], [0, 1], [1, 1]])
    test = np.array([[0, 1]])
    # position 0: counts (2.5, 1.5) / 4; position 1: (0.5, 3.5) / 4
    expected = -(math.log2(2.5 / 4) + math.log2(3.5 / 4))
    bits, se = kernel_study.independent_baseline_bits(train, np.vstack([test, test]), 2)
    assert bits == pytest.approx(expected) and se == 0.0
    rows = [{"dataset": "d", "kernel": "a", "nll_bits": 2.0, "mc_se_bits": 0.1, "data_se_bits": 1.0,
             "per_sequence_bits": [1.0, 3.0]},
            {"dataset": "d", "kernel": "b", "nll_bits": 3.5, "mc_se_bits": 0.1, "data_se_bits": 1.0,
             "per_sequence_bits": [3.0, 4.0]}]
    kernel_study.paired_differences(rows)
    assert rows[0]["delta_bits"] == 0.0 and rows[0]["best_in_dataset"]
    assert rows[1]["delta_bits"] == pytest.approx(1.5)
    assert rows[1]["delta_se_bits"] == pytest.approx(np.std([2.0, 1.0], ddof=1) / math.sqrt(2))


def test_heartbeat_is_scored_on_its_whole_distribution_and_digits_on_test(kernel_study):
    from bdiff_pyro.config import load_config

    heartbeat, _, whole = kernel_study.score_set(load_config(KERNEL_CONFIGS / "kernel_heartbeat.yaml"))
    assert whole and heartbeat.shape == (5, 20)
    digits, _, whole = kernel_study.score_set(load_config(KERNEL_CONFIGS / "kernel_digits.yaml",
                                                          ["data.levels=4", "model.kernel=uniform"]))
    assert not whole and digits.shape == (269, 64) and set(digits.unique().tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_kernel_study_script_writes_the_table_and_the_figure(tmp_path):
    out = tmp_path / "kernels"
    args = [out, "--quiet", "--datasets", "heartbeat", "digits4", "--kernels", "uniform", "absorbing",
            "--replicates", "2", "--figure-samples", "4"] + [a for key in TINY_TRAINING for a in ("--set", key)]
    result = run_script("kernels/kernels.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "machine:" in result.stdout and "command:" in result.stdout

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
    # heartbeat is 20 bits: a negative ELBO below 0 or far above 20 bits per sequence is wrong
    assert all(0 < r["nll_bits"] < 60 for r in rows if r["dataset"] == "heartbeat")
    assert max(max(s) for r in rows if r["dataset"] == "digits4" for s in r["samples"]) <= 3  # no mask state
    assert results["machine"]["cores"] >= 1 and results["command"]

    table = (out / "results.md").read_text()
    assert "| data | kernel |" in table and "n/a" in table and "independent pixels" in table
    assert (out / "samples.png").stat().st_size > 1000

    assert_refuses_to_overwrite(run_script("kernels/kernels.py", *args, cwd=tmp_path))


# ---------------------------------------------------------------------------------------
# experiments/schedules


def test_schedule_study_functions(tmp_path):
    study = load_module(EXPERIMENTS / "schedules" / "schedule_study.py")
    positions = torch.arange(6)
    patterns = torch.stack([(positions % 3 == shift).double() for shift in range(3)])
    rows = study.run_study(patterns, specs=study.DEFAULT_SPECS[:3], Ts=(10, 20), replicates=2)
    assert len(rows) == 6
    for row in rows:
        assert row["gap_bits"] > 0 and row["elbo_bits"] == pytest.approx(-math.log2(3) - row["gap_bits"])
    write_csv(tmp_path / "study.csv", rows, study.CSV_FIELDS)
    assert (tmp_path / "study.csv").read_text().count("\n") == 7
    search = study.T_for_gap(study.DEFAULT_SPECS[2], patterns, None, 0.05, known=rows, tolerance=0.05)
    T_lo, T_hi = search["T_bracket"]
    assert search["gaps"][T_lo] > 0.05 >= search["gaps"][T_hi] and T_hi - T_lo <= max(1, 0.05 * T_hi)
    assert "| 10 |" in study.markdown_tables(rows, [search], -math.log2(3))
    study.plot_gaps(rows, tmp_path / "gap.png", target=0.05)
    assert (tmp_path / "gap.png").stat().st_size > 0


@pytest.mark.slow
def test_schedule_study_script_writes_its_tables_once(tmp_path):
    out = tmp_path / "study"
    args = [out, "--T", "8", "16", "--n", "4", "--period", "2", "--replicates", "2", "--target-gap", "0.5"]
    result = run_script("schedules/schedules.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"study.csv", "study.md", "gap.png", "search.json"}
    with open(out / "study.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({int(row["T"]) for row in rows}) == [8, 16] and len(rows) == 2 * len({r["schedule"] for r in rows})
    assert all(float(row["gap_bits"]) > 0 for row in rows)  # the oracle's ELBO lies below -log2 2
    before = (out / "study.csv").read_text()
    assert_refuses_to_overwrite(run_script("schedules/schedules.py", *args, cwd=tmp_path))
    assert (out / "study.csv").read_text() == before


# ---------------------------------------------------------------------------------------
# experiments/crosscheck


@pytest.mark.slow
def test_crosscheck_script_writes_the_grid_and_the_scaling_study(tmp_path):
    tiny = yaml.safe_load((EXPERIMENTS / "crosscheck" / "compare.yaml").read_text())
    tiny.update(grid={"n": [3], "T": [3], "schedules": ["paper"]}, training={"steps": 3},
                estimators={"trace_elbo_particles": 16, "trace_elbo_batches": 2, "importance_samples": 64},
                scaling={"T": 2, "n_max_enumerated": 2, "n_max_analytic": 3})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    out = tmp_path / "out"
    result = run_script("crosscheck/compare.py", config, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"compare.csv", "compare_scaling.csv", "compare.md",
                                                "compare_bounds.png", "compare_scaling.png"}
    table = (out / "compare.md").read_text()
    assert "| 3 | 3 | paper | random |" in table and "| 3 | 3 | paper | trained |" in table
    assert "| 3 | 8 |" in table and "- (~" in table  # n = 3 above n_max_enumerated: not run
    with open(out / "compare_scaling.csv", newline="") as handle:
        scaling = list(csv.DictReader(handle))
    assert [row["n"] for row in scaling] == ["1", "2", "3"]
    assert float(scaling[0]["seconds_traceenum_elbo"]) > 0 and scaling[2]["seconds_traceenum_elbo"] == ""
    with open(out / "compare.csv", newline="") as handle:
        grid = list(csv.DictReader(handle))
    assert len(grid) == 2
    for row in grid:
        # the analytic ELBO and TraceEnum_ELBO agree; log p(x^0) >= ELBO; -log2 p of 3 bits <= 3 + log2 3
        assert float(row["max_abs_diff_analytic_traceenum"]) < 1e-9
        assert float(row["log_p_exact"]) >= float(row["elbo_analytic"]) - 1e-12
        assert -3 - math.log2(3) <= float(row["log_p_exact"]) < 0
    assert_refuses_to_overwrite(run_script("crosscheck/compare.py", config, "--out", out, cwd=tmp_path))


# ---------------------------------------------------------------------------------------
# experiments/digits


@pytest.mark.slow
def test_digits_script_compares_the_model_with_the_baselines(tmp_path):
    from bdiff_pyro.config import apply_overrides

    raw = yaml.safe_load((ROOT / "experiments" / "configs" / "digits.yaml").read_text())
    config = tmp_path / "digits_tiny.yaml"
    config.write_text(yaml.safe_dump(apply_overrides(raw, TINY_TRAINING)))
    out = tmp_path / "digits"
    args = ["--config", config, "--out", out, "--restarts", "1", "--replicates", "2", "--components", "1", "2"]
    result = run_script("digits/digits.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    independent, mixture = results["baselines"]["independent"], results["baselines"]["mixture"]
    diffusion = results["diffusion"]
    # 64 binary pixels: every model between 0 and 64 bits per image (plus the bound's slack);
    # two components fit the training split at least as well as one (independent pixels)
    assert 0 < mixture["test_bits"] <= independent["test_bits"] + 1.0 and independent["test_bits"] < 64
    assert 0 < diffusion["test_bits"] < 200 and diffusion["test_se_mc"] > 0 and diffusion["T"] == 4
    assert results["split"] == {"train": 1258, "val": 270, "test": 269}
    assert results["paired"]["mean_bits"] == pytest.approx(diffusion["test_bits"] - mixture["test_bits"], abs=1e-3)
    for name in ("results.md", "samples_diffusion.png", "samples_mixture.png", "test_images.png"):
        assert (out / name).stat().st_size > 0
    result = run_script("digits/digits.py", *args, cwd=tmp_path)
    assert result.returncode == 2 and "refusing to overwrite" in result.stderr
