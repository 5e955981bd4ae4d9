"""The UCI baseline script: its data reproduce the published units, and it runs end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bdiff_pyro.baselines.mixture import IndependentBernoulli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "uci" / "baselines.py"
DATA = ROOT / "experiments" / "uci" / "data"


@pytest.mark.parametrize("name, rows, bits, published", [("dna", (1400, 600, 1186), 180, 100.38),
                                                          ("mushrooms", (2000, 500, 5624), 112, 34.23)])
def test_data_have_the_published_splits_and_units(name, rows, bits, published):
    """Independent bits fitted on train + valid with add-one counts give the figure quoted with
    the published benchmarks, in nats per example, to its two decimals."""
    with np.load(DATA / f"{name}.npz") as archive:
        data = {split: archive[split] for split in ("train", "valid", "test")}
    assert tuple(len(x) for x in data.values()) == rows
    assert all(x.shape[1] == bits and x.dtype == np.uint8 and set(np.unique(x)) == {0, 1} for x in data.values())
    model = IndependentBernoulli.fit(np.vstack([data["train"], data["valid"]]), pseudo_count=1.0)
    assert abs(-model.log_prob(data["test"]).mean() - published) < 0.005


def load_script():
    spec = importlib.util.spec_from_file_location("uci_baselines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=600)


@pytest.mark.slow
def test_script_runs_with_tiny_settings_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "uci"
    assert load_script().main(["--quick", "--max-rows", "60", "--datasets", "mushrooms", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "\ncommand: " in printed
    report = json.loads((out / "results.json").read_text())
    models = [row["model"] for row in report["rows"]]
    assert models == ["independent bits", "mixture of Bernoullis", "FVSBN", "MADE (one mask)", "MADE (mask ensemble)"]
    for row in report["rows"]:
        assert row["test_nll"] > 0 and row["test_se"] > 0
        assert row["difference"] == pytest.approx(row["test_nll"] - row["published"])
    assert "| mushrooms | FVSBN |" in (out / "results.md").read_text()
    again = run_script("--quick", "--max-rows", "60", "--datasets", "mushrooms", "--out", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already holds results" in again.stderr


@pytest.mark.slow
def test_script_names_a_missing_data_file(tmp_path):
    result = run_script("--data-dir", str(tmp_path), "--datasets", "dna", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'dna.npz'}: no such data file"


@pytest.mark.slow
def test_benchmark_refuses_an_unfinished_run_or_a_missing_test_split_before_evaluating_anything(tmp_path):
    """benchmarks/uci.py reads every --run's metrics and data first: an unfinished run or a
    missing file is one line, exit 2, and no results directory, rather than a traceback after
    the other set's evaluation."""
    data = tmp_path / "mushrooms.npz"
    data.write_bytes((DATA / "mushrooms.npz").read_bytes())
    tiny = ["model.T=4", "model.hidden=[8]", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
            "train.eval_sequences=4", "train.eval_samples=4", "evaluate.num_samples=4", "evaluate.replicates=2",
            "evaluate.max_rows=100", f"data.file={data}"]
    config = ROOT / "experiments" / "configs" / "uci_mushrooms.yaml"
    train = subprocess.run([sys.executable, "-m", "bdiff_pyro", "train", str(config), "--out", str(tmp_path / "run"),
                            "--quiet", *[a for s in tiny for a in ("--set", s)]],
                           capture_output=True, text=True, cwd=ROOT)
    assert train.returncode == 0, train.stderr
    run = f"mushrooms={tmp_path / 'run'}"

    def benchmark():
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uci.py"), "--run", run,
                               "--datasets", "mushrooms", "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, cwd=ROOT)

    metrics = tmp_path / "run" / "metrics.json"
    metrics.rename(tmp_path / "kept.json")  # as if the run had stopped before its final evaluation
    result = benchmark()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--run {run}: no metrics.json, the run has not finished" in result.stderr.strip().splitlines()[-1]
    (tmp_path / "kept.json").rename(metrics)
    data.unlink()
    result = benchmark()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--run {run}: {data}: cannot read data file" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
