"""Model selection on held-out data (best.pt, the final metrics from its weights), the warning
when the chosen model is worse than independent bits, and the importance-weighted bound."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bdiff, make_process

from bdiff_pyro import train
from bdiff_pyro.checkpoints import load_with_config
from bdiff_pyro.config import load_config
from bdiff_pyro.data import load_dataset
from bdiff_pyro.diffusion import bound
from bdiff_pyro.errors import TrainingWarning
from bdiff_pyro.evaluation import bound_report, importance_weighted_report, independent_log_likelihood_bits
from bdiff_pyro.programs import enumeration

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.T=4", "model.hidden=[8]", "model.time_embedding=4", "train.steps=40", "train.eval_every=10",
        "train.checkpoint_every=10", "train.eval_samples=20", "evaluate.num_samples=20", "evaluate.replicates=2",
        "evaluate.diagnose=false", "train.ema=0.9"]


def write_data(directory, p_one=0.1, n=6, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {key: (rng.random((rows, n)) < p_one).astype(np.uint8) for key, rows in
              (("train", 40), ("valid", 20), ("test", 30))}
    np.savez(directory / "d.npz", **arrays)
    (directory / "c.yaml").write_text("data:\n  kind: npz\n  file: d.npz\nmodel:\n  pi_1: 0.5\n")
    return directory / "c.yaml"


def test_independent_bits_is_the_add_one_bernoulli_log_likelihood():
    train_rows = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    val = torch.tensor([[1, 1, 1], [0, 0, 1]])
    p = (train_rows.sum(0).double() + 1) / (len(train_rows) + 2)  # Laplace: (3+1)/6, (1+1)/6, (1+1)/6
    expected = float(sum(torch.where(row == 1, p, 1 - p).log().sum() for row in val)) / 2 / math.log(2)
    assert independent_log_likelihood_bits(train_rows, val) == pytest.approx(expected, rel=1e-12)
    # three states: (count + 1) / (N + 3)
    three = independent_log_likelihood_bits(torch.tensor([[0], [2], [2]]), torch.tensor([[2], [1]]), 3)
    assert three == pytest.approx((math.log(3 / 6) + math.log(1 / 6)) / 2 / math.log(2), rel=1e-12)


def test_the_final_metrics_are_those_of_the_best_validated_weights(tmp_path, monkeypatch):
    """A held-out score that peaks at step 20 of 40: best.pt holds step 20, the final held-out
    figure is best.pt's bound (same seed, same numbers), and checkpoint.pt stays the last step."""
    config = load_config(write_data(tmp_path), TINY)
    real = train._held_out_bound

    def peaked(process, dataset, config, state):
        report = real(process, dataset, config, state)
        return {**report, "elbo_bits": -abs(state.step - 20) - 1.0}

    monkeypatch.setattr(train, "_held_out_bound", peaked)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = train.train(config, run_dir, progress=False, log=lambda *a: None)
    assert metrics["selected_step"] == 20
    best = torch.load(run_dir / "best.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert best["state"]["step"] == 20 and last["state"]["step"] == 40
    assert [row["step"] for row in last["state"]["history"]] == [10, 20, 30, 40]
    changed = [k for k in best["model_state"] if not torch.equal(best["model_state"][k], last["model_state"][k])]
    assert changed  # the selection is not the last step's weights
    loaded_config, process = load_with_config(run_dir / "best.pt")
    # the run directory means the selected model; --resume continues from the last step
    _, from_dir = load_with_config(run_dir)
    assert all(torch.equal(v, best["model_state"][k]) for k, v in from_dir.state_dict().items())
    assert train.prepare_training(config, resume_dir=run_dir).payload["state"]["step"] == 40
    dataset = load_dataset(loaded_config.data)
    again = bound_report(process, dataset.val, loaded_config.evaluate.replicates, seed=loaded_config.seed + 1,
                         distinct=True)
    assert again["elbo_bits"] == metrics["held_out"]["elbo_bits"]
    test = bound_report(process, dataset.test, loaded_config.evaluate.replicates, seed=loaded_config.seed + 2,
                        distinct=True)
    assert test["elbo_bits"] == metrics["test"]["elbo_bits"]
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["selected_step"] == 20 and on_disk["test"]["sequences"] == 30


def test_every_evaluation_during_training_draws_the_same_x_t(tmp_path):
    """Common random numbers: the same weights give the same held-out estimate at every step,
    so the selection compares weights, not draws (with fresh draws per step it compared noise)."""
    config = load_config(write_data(tmp_path), TINY)
    process = make_process(n=6, T=4, seed=1).float()
    dataset = load_dataset(config.data)
    estimates = {train._held_out_bound(process, dataset, config, train.TrainingState(step=step))["elbo_bits"]
                 for step in (10, 20, 30)}
    assert len(estimates) == 1
    other = load_config(write_data(tmp_path), [*TINY, "seed=5"])
    assert train._held_out_bound(process, dataset, other, train.TrainingState(step=10))["elbo_bits"] not in estimates
    more = load_config(write_data(tmp_path), [*TINY, "train.eval_replicates=7"])
    assert train._held_out_bound(process, dataset, more, train.TrainingState(step=10))["replicates"] == 7


def test_a_model_worse_than_independent_bits_on_held_out_data_warns(tmp_path):
    """Sparse bits (P(1) = 0.05) and a model trained for two steps from pi_1 = 0.5: its held-out
    ELBO is near -n bits, independent bits give about -n H(0.05) = -1.7 bits."""
    config = load_config(write_data(tmp_path, p_one=0.05), [*TINY, "train.steps=2", "train.lr=1e-6",
                                                              "train.lr_final=1e-6", "train.ema=0"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train.train(config, run_dir, progress=False, log=lambda *a: None)
    messages = [str(w.message) for w in caught if issubclass(w.category, TrainingWarning)]
    assert metrics["held_out"]["elbo_bits"] < metrics["held_out_independent_bits"] - 1
    assert len(messages) == 1 and "generalises worse than independent bits" in messages[0], messages
    assert "\n" not in messages[0]


def test_no_warning_when_the_model_beats_independent_bits():
    metrics = {"held_out": {"elbo_bits": -3.0, "se_bits": 0.1}, "held_out_independent_bits": -3.5,
               "selected_step": 5}
    assert train.worse_than_independent(metrics) is None
    metrics["held_out"]["elbo_bits"] = -3.6
    assert "step 5" in train.worse_than_independent(metrics)


# ---------------------------------------------------------------------------------------
# The importance-weighted bound, float64, against the exact ELBO and log p by enumeration


@pytest.fixture(scope="module")
def tiny_model():
    process = make_process(n=3, T=4, schedule="paper", pi_1=0.3, seed=3)
    x0 = torch.tensor([[0, 1, 1], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    with torch.no_grad():
        elbo = float(bound.elbo_exact(process.kernel, process.log_probs, x0).mean())
    log_p = float(enumeration.exact_log_likelihood(process, x0).mean())
    assert log_p - elbo > 0.05  # room between the two, so that "between" means something
    return process, x0, elbo, log_p


def test_one_sample_is_the_elbo_in_expectation(tiny_model):
    process, x0, elbo, _ = tiny_model
    values = [importance_weighted_report(process, x0, 1, seed=seed)["nats"] for seed in range(300)]
    mean, se = np.mean(values), np.std(values, ddof=1) / math.sqrt(len(values))
    assert abs(mean - elbo) < 4 * se, (mean, elbo, se)


def test_the_bound_rises_with_samples_towards_log_p(tiny_model):
    process, x0, elbo, log_p = tiny_model
    means = []
    for samples, replicates in [(1, 400), (8, 100), (512, 10)]:
        values = [importance_weighted_report(process, x0, samples, seed=seed)["nats"] for seed in range(replicates)]
        means.append((np.mean(values), np.std(values, ddof=1) / math.sqrt(replicates)))
    for (low, low_se), (high, high_se) in zip(means, means[1:]):
        assert high - low > 3 * math.hypot(low_se, high_se), means
    assert elbo < means[0][0] and means[-1][0] < log_p + 4 * means[-1][1]
    assert log_p - means[-1][0] < (log_p - elbo) / 10, (means, elbo, log_p)
    report = importance_weighted_report(process, x0, 512, seed=0)
    assert report["bits"] == pytest.approx(report["nats"] / math.log(2), rel=1e-12)
    assert 1 <= report["ess_min"] <= report["ess_mean"] <= 512


def test_blocks_of_rows_and_trajectories_estimate_the_same_bound(tiny_model):
    """The blocks (max_elements) change which draws go together, not what is estimated."""
    process, x0, _, log_p = tiny_model
    small = importance_weighted_report(process, x0, 256, seed=1, max_elements=4 * 3 * 5)
    large = importance_weighted_report(process, x0, 256, seed=1)
    assert abs(small["nats"] - large["nats"]) < 4 * math.hypot(small["mc_se_nats"], large["mc_se_nats"]) + 1e-3
    assert abs(small["nats"] - log_p) < 0.05


def test_evaluate_reports_the_importance_weighted_bound_in_nats_and_bits(tmp_path):
    config_path = write_data(tmp_path, p_one=0.3)
    sets = [item for key in [*TINY, "train.steps=2"] for item in ("--set", key)]
    code, _, err = bdiff("train", config_path, "--out", tmp_path / "run", "--quiet", *sets)
    assert code == 0, err
    code, out, err = bdiff("evaluate", tmp_path / "run" / "best.pt", tmp_path / "d.npz", "--split", "valid",
                           "--samples", "8", "--importance", "4", "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    iw = report["importance_weighted"]
    assert report["sequences"] == 20 and iw["samples"] == 8 and iw["sequences"] == 20
    assert iw["bits"] == pytest.approx(iw["nats"] / math.log(2), rel=1e-12)
    assert 1 <= iw["ess_min"] <= iw["ess_mean"] <= 8
    assert "importance_bits" in report  # --importance as before
    line = next(line for line in out.splitlines() if line.startswith("importance-weighted bound"))
    assert f"{iw['nats']:.4f} ± {iw['se_nats']:.4f} nats/seq" in line and "ESS" in line


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uci_dna", "uci_mushrooms"])
def test_uci_configs_train_two_steps(tmp_path, name):
    sets = ["model.T=4", "model.hidden=[16,16]", "train.steps=2", "train.eval_every=1", "train.checkpoint_every=2",
            "train.eval_samples=10", "train.eval_sequences=10", "evaluate.num_samples=10", "evaluate.max_rows=1000"]
    code, out, err = bdiff("train", ROOT / "experiments" / "configs" / f"{name}.yaml", "--out", tmp_path / "run",
                           "--quiet", *[item for key in sets for item in ("--set", key)])
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["sequences"] == {"uci_dna": 1186, "uci_mushrooms": 5624}[name]
    assert metrics["steps"] == 2 and (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "marginals.png").stat().st_size > 10_000
