"""The bdiff command end to end: a tiny training run, sampling, evaluation, every bad input
(exit 2, one line, no traceback), interruption and resume, divergence."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import StopAfter, assert_one_line, bdiff, bdiff_subprocess

import bdiff_pyro
from bdiff_pyro import train as train_module
from bdiff_pyro.config import load_config
from bdiff_pyro.train import TrainingStopped, train

pytestmark = pytest.mark.slow  # end-to-end runs of the bdiff command

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.T=6", "--set", "model.hidden=[16]", "--set", "train.steps=40",
        "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20", "--set", "evaluate.num_samples=500",
        "--set", "evaluate.replicates=2", "--set", "train.eval_samples=100", "--set", "evaluate.diagnose=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = bdiff_subprocess("train", "experiments/configs/heartbeat.yaml", "--out", out, "--quiet", *TINY)
    assert result.returncode == 0, result.stderr
    return out, result


def test_tiny_training_run_writes_everything(tiny_run):
    out, result = tiny_run
    for name in ("config.yaml", "checkpoint.pt", "metrics.json", "history.csv", "bound_curve.png",
                 "proportions.png", "samples.png", "sample_evolution.gif"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40
    fractions = metrics["samples"]
    assert abs(fractions["train"] + fractions["held_out"] + fractions["neither"] - 1) < 1e-12
    assert metrics["held_out"]["se_bits"] > 0 and metrics["held_out"]["elbo_bits"] < 0
    assert "bits/seq" in result.stdout and str(out) in result.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["T"] == 6 and saved["model"]["pi_1"] == 0.5


def test_load_api(tiny_run):
    out, _ = tiny_run
    model = bdiff_pyro.load(out)
    assert (model.n, model.T) == (20, 6)
    assert model.kernel.betas.shape == (7,) and model.kernel.betas[0] == 0
    assert torch.allclose(model.kernel.pi, torch.tensor([0.5, 0.5]))
    x = model.sample(7, seed=3)
    assert x.shape == (7, 20) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x, bdiff_pyro.load(out / "checkpoint.pt").sample(7, seed=3))
    probs = model.reverse_probs(x, 2)
    assert probs.shape == (7, 20) and torch.all((probs >= 0) & (probs <= 1))


def test_sample_and_evaluate_commands(tiny_run, tmp_path):
    out, _ = tiny_run
    result = bdiff_subprocess("sample", out, "-n", 5, "--seed", 1)
    lines = result.stdout.split()
    assert result.returncode == 0 and len(lines) == 5
    assert all(len(line) == 20 and set(line) <= {"0", "1"} for line in lines)
    target = tmp_path / "s.txt"
    assert bdiff_subprocess("sample", out, "-n", 5, "--seed", 1, "--out", target).returncode == 0
    assert target.read_text().split() == lines
    assert_one_line(bdiff_subprocess("sample", out, "-n", 5, "--out", target), "file exists")
    result = bdiff_subprocess("evaluate", out, "experiments/data/heartbeat_text/val.txt")
    assert result.returncode == 0 and "bits/seq" in result.stdout and "±" in result.stdout


def test_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path):
    out, _ = tiny_run
    bad_data = tmp_path / "bad.txt"
    bad_data.write_text("0101\n01a1\n")
    assert_one_line(bdiff_subprocess("evaluate", out, bad_data), "bad.txt:2: unexpected character 'a'")
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("0101\n011\n")
    assert_one_line(bdiff("evaluate", out, ragged), "ragged.txt:2: sequence of length 3")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line(bdiff("evaluate", out, empty), "empty.txt: no sequences")
    short = tmp_path / "short.txt"
    short.write_text("0101\n")
    assert_one_line(bdiff("evaluate", out, short), "the model has n = 20")
    result = bdiff_subprocess("train", "experiments/configs/heartbeat.yaml", "--set", "model.T=1")
    assert_one_line(result, "model.T must be >= 2")
    assert_one_line(bdiff("train", "experiments/configs/heartbeat.yaml", "--set", "train.lr=0"), "train.lr must be > 0")
    assert_one_line(bdiff("train", "experiments/configs/heartbeat.yaml", "--set", "model.schedule=linear"),
                      "model.schedule must be one of")
    assert_one_line(bdiff("train", "experiments/configs/heartbeat.yaml", "--set", "model.depth=3"),
                      "unknown config key 'model.depth'")
    assert_one_line(bdiff("train", tmp_path / "missing.yaml"), "missing.yaml: cannot read config")
    assert_one_line(bdiff("sample", tmp_path, "-n", 3), "no checkpoint here")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert_one_line(bdiff("sample", garbage, "-n", 3), "not a readable checkpoint")
    # a checkpoint that does not match the config it is resumed with
    assert_one_line(bdiff("train", "experiments/configs/heartbeat.yaml", "--resume", out, *TINY[:-2],
                            "--set", "model.T=7"), "checkpoint was trained with model.T=6")
    # a run never overwrites an earlier run's directory
    assert_one_line(bdiff("train", "experiments/configs/heartbeat.yaml", "--out", out, *TINY),
                      "refusing to overwrite")
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("layout", ["spec", "config only"])
def test_checkpoint_whose_weights_do_not_match_its_spec(tiny_run, tmp_path, layout):
    """The model is built from the saved spec, or for a checkpoint without one from its config."""
    out, _ = tiny_run
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    if layout == "spec":
        payload["spec"]["hidden"] = [32]
    else:
        del payload["spec"]
        payload["config"]["model"]["hidden"] = [32]
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert_one_line(bdiff_subprocess("sample", tmp_path, "-n", 2), "weights do not match")


def test_interrupt_then_resume(tmp_path):
    out = tmp_path / "run"
    args = [*TINY[:4], "--set", "train.steps=100000", "--set", "train.checkpoint_every=10",
            "--set", "train.eval_every=50000", "--set", "evaluate.replicates=2", "--set", "evaluate.num_samples=100",
            "--set", "evaluate.diagnose=false"]
    process = subprocess.Popen([sys.executable, "-m", "bdiff_pyro", "train", "experiments/configs/heartbeat.yaml",
                                "--out", str(out), "--quiet", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted at step" in stderr, stderr
    step = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["step"]
    assert step >= 10
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint file was left behind"
    finish = step + 15
    result = bdiff_subprocess("train", "experiments/configs/heartbeat.yaml", "--resume", out, "--quiet",
                   *[a.replace("train.steps=100000", f"train.steps={finish}") for a in args])
    assert result.returncode == 0, result.stderr
    assert f"resuming {out} at step {step}" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == finish




@pytest.mark.parametrize("ema, decoupled_weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5)])
def test_resumed_run_continues_exactly_where_it_stopped(tmp_path, monkeypatch, ema, decoupled_weight_decay):
    """30 steps straight give the same weights as 15 steps, an interrupt, and a resume
    (with a weight average: the same average and the same raw weights; with decoupled weight
    decay: the optimiser's saved state carries it)."""
    overrides = [o for o in TINY if "=" in o] + ["train.checkpoint_every=100", "train.eval_every=10",
                                                 "train.steps=30", f"train.ema={ema}",
                                                 f"train.decoupled_weight_decay={decoupled_weight_decay}"]
    config_path = ROOT / "experiments/configs/heartbeat.yaml"
    quiet = dict(progress=False, log=lambda *_: None)
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    train(load_config(config_path, overrides), straight, **quiet)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_InterruptFlag", StopAfter)
        with pytest.raises(TrainingStopped, match="interrupted at step 15"):
            train(load_config(config_path, overrides), split, **quiet)
    train(load_config(config_path, overrides), split, resume=True, **quiet)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(split / "checkpoint.pt", weights_only=False)
    keys = ["model_state"] + (["raw_model_state"] if ema else [])
    assert all(torch.equal(a[key][k], b[key][k]) for key in keys for k in a[key])
    if ema:  # the average is not the raw weights
        assert not torch.equal(a["model_state"]["net.out.weight"], a["raw_model_state"]["net.out.weight"])


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = load_config(ROOT / "experiments/configs/heartbeat.yaml",
                         [o for o in TINY if "=" in o] + ["train.checkpoint_every=10", "train.steps=30"])
    real_call = train_module.AnalyticLoss.__call__
    calls = {"n": 0}

    def poisoned(self, model, guide, x0):
        calls["n"] += 1
        loss = real_call(self, model, guide, x0)
        return loss * float("nan") if calls["n"] == 15 else loss

    monkeypatch.setattr(train_module.AnalyticLoss, "__call__", poisoned)
    with pytest.raises(TrainingStopped, match="diverged at step 15"):
        train(config, tmp_path, progress=False, log=lambda *_: None)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert payload["state"]["step"] == 10
    weights = {k: v for k, v in payload["model_state"].items() if k.startswith("net.")}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_oracle_command_measures_a_runs_gap(tiny_run):
    out, _ = tiny_run
    result = bdiff("oracle", "experiments/configs/heartbeat.yaml", "--set", "model.T=6", "--gap", out,
                   "--gap-draws", 50, "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    oracle_line, gap_line, report = result.stdout.strip().splitlines()
    gap = json.loads(report)["gap_to_run"]
    assert gap["gap_bits"] > 0 and [part["first"] for part in gap["by_steps"]] == [1, 2, 3, 4, 5, 6]
    assert f"falls short of the oracle by {gap['gap_bits']:.4f}" in gap_line
    assert_one_line(bdiff("oracle", "experiments/configs/heartbeat.yaml", "--gap", out), f"--gap {out}", "T")


def test_oracle_command_with_samples():
    result = bdiff("oracle", "experiments/configs/heartbeat.yaml", "--set", "model.T=20", "--samples", 300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("oracle ELBO = ") and "T = 20" in lines[0]
    assert lines[1].startswith("of 300 oracle samples (seed 0): ") and "% in the support" in lines[1]
    assert len(lines[1].split("pattern fractions ")[1].split()) == 5  # the five heartbeat shifts
    assert_one_line(bdiff("oracle", "experiments/configs/heartbeat.yaml", "--samples", -1),
                      "--samples: must be at least 0")
    assert_one_line(bdiff("train", "experiments/configs/heartbeat.yaml", "--set",
                                       "model.add_own_evidence=maybe"), "model.add_own_evidence")
