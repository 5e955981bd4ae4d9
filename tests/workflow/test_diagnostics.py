"""ArviZ diagnostics of a run: the DataTree on disk, R-hat that can fail, ESS and MCSE against
the bound estimator's own standard error, and never overwriting earlier results."""

import shutil
from pathlib import Path

import arviz_base as azb
import numpy as np
import pytest
import torch
import xarray as xr

from bdiff_pyro import diagnostics
from bdiff_pyro.checkpoints import load
from bdiff_pyro.config import load_config
from bdiff_pyro.data import load_dataset
from bdiff_pyro.diffusion.bound import elbo_replicates
from bdiff_pyro.errors import UserError
from bdiff_pyro.train import train
from bdiff_pyro.util.stats import LN2, mean_and_standard_error

pytestmark = pytest.mark.slow  # ArviZ diagnostics of a trained run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.T=6", "model.hidden=[16]", "train.steps=40", "train.eval_every=40", "train.checkpoint_every=40",
        "evaluate.num_samples=100", "evaluate.replicates=2", "train.eval_samples=100", "train.lr=0.01",
        "evaluate.diagnose=false"]
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run.mkdir()
    config = load_config(ROOT / "experiments/configs/heartbeat.yaml", TINY)
    train(config, run, **QUIET)
    return run


@pytest.fixture(scope="module")
def diagnosed(tiny_run):
    return diagnostics.diagnose(tiny_run, chains=3, draws=60, seed=5, **QUIET)


def test_datatree_on_disk_reopens_with_groups_dims_and_variables(tiny_run, diagnosed):
    path = Path(diagnosed["files"]["datatree"])
    assert path == tiny_run / "diagnostics.nc"
    tree = azb.convert_to_datatree(str(path))  # ArviZ's own reader (xarray.open_datatree)
    assert {"posterior_predictive", "observed_data", "sample_stats"} <= set(tree.children)
    x = tree["posterior_predictive"]["x"]
    assert x.dims == ("chain", "draw", "position") and x.shape == (3, 60, 20)
    observed = tree["observed_data"]["x"]
    assert observed.dims == ("sequence", "position")
    dataset = load_dataset(load_config(tiny_run / "config.yaml").data)
    assert np.array_equal(observed.values, dataset.train.numpy())
    stats = tree["sample_stats"]
    for name in ("elbo", "num_ones", "nearest_distance", "is_train", "is_held_out", "is_other", "phase"):
        assert stats[name].dims == ("chain", "draw"), name
    # each chain is an independent sampling run with its own seed, reproducible from the file
    model = load(tiny_run)
    seeds = tree.attrs["chain_seeds"]
    assert len(set(seeds.tolist())) == 3
    for chain in range(3):
        assert np.array_equal(x.values[chain], model.sample(60, seed=int(seeds[chain])).numpy())
    assert np.array_equal(stats["num_ones"].values, x.values.sum(-1))
    membership = stats["is_train"].values + stats["is_held_out"].values + stats["is_other"].values
    assert np.all(membership == 1)
    train_keys = {row.tobytes() for row in dataset.train.numpy().astype(np.uint8)}
    in_train = [row.astype(np.uint8).tobytes() in train_keys for row in x.values.reshape(-1, 20)]
    assert np.array_equal(stats["is_train"].values.ravel().astype(bool), in_train)
    assert np.array_equal(stats["nearest_distance"].values == 0, stats["is_train"].values == 1)
    assert set(np.unique(stats["phase"].values)) <= set(range(-1, 5))
    # the ELBO: the mean over draws is the reported estimate, in bits/seq
    assert diagnosed["elbo_bits"] == pytest.approx(float(stats["elbo"].mean()))
    assert stats["elbo"].attrs["units"] == "bits/seq"


def test_a_file_that_calls_the_elbo_K_opens_with_it_named_elbo(tiny_run, diagnosed, tmp_path):
    """diagnostics.nc files written before the rename hold the ELBO draws as ``K``."""
    tree = diagnostics.open_diagnostics(diagnosed["files"]["datatree"])
    old = tree.copy()
    old["sample_stats"] = xr.DataTree(tree["sample_stats"].to_dataset().rename({"elbo": "K"}))
    old.to_netcdf(tmp_path / "old.nc", engine="h5netcdf")
    assert "K" in xr.open_datatree(tmp_path / "old.nc", engine="h5netcdf")["sample_stats"]
    reopened = diagnostics.open_diagnostics(tmp_path / "old.nc")
    stats = reopened["sample_stats"]
    assert "K" not in stats and np.array_equal(stats["elbo"].values, tree["sample_stats"]["elbo"].values)
    assert stats["elbo"].attrs["units"] == "bits/seq"
    assert np.array_equal(stats["num_ones"].values, tree["sample_stats"]["num_ones"].values)


def test_summary_files_and_plots(tiny_run, diagnosed):
    files = {key: Path(value) for key, value in diagnosed["files"].items()}
    for key in ("summary_csv", "summary_md", "convergence_plot", "ppc_plot"):
        assert files[key].parent == tiny_run and files[key].is_file(), key
    for key in ("convergence_plot", "ppc_plot"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = diagnosed["summary"]
    for column in ("mean", "sd", "hdi94_lb", "hdi94_ub", "ess_bulk", "ess_tail", "r_hat", "mcse_mean", "data"):
        assert column in table.columns, column
    for row in ("elbo", "num_ones", "nearest_distance", "is_train", "phase_frequency[0]", "rate[19]"):
        assert row in table.index, row
    csv = files["summary_csv"].read_text()
    assert csv.startswith("statistic,data,mean") and "rate[19]" in csv
    markdown = files["summary_md"].read_text()
    k = table.loc["elbo"]
    assert f"ELBO = {k['mean']:.4f} ± {k['mcse_mean']:.4f} bits/seq" in markdown
    assert "| num_ones |" in markdown
    # the HDI really is the highest-density interval (arviz-stats 0.8.0's summary computes an ETI)
    values = np.sort(xr.open_datatree(files["datatree"])["sample_stats"]["elbo"].values.ravel())
    width = k["hdi94_ub"] - k["hdi94_lb"]
    inside = np.mean((values >= k["hdi94_lb"]) & (values <= k["hdi94_ub"]))
    assert inside == pytest.approx(0.94, abs=0.01)
    count = int(np.floor(0.94 * len(values))) + 1  # the narrowest window holding this many draws
    assert width <= np.min(values[count - 1:] - values[:len(values) - count + 1]) + 1e-9


def test_never_overwrites_earlier_results(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.yaml"):
        shutil.copy(tiny_run / name, run / name)
    first = diagnostics.diagnose(run, chains=2, draws=20, seed=0, plots=False, **QUIET)
    path = Path(first["files"]["datatree"])
    assert path == run / "diagnostics.nc"
    before = path.read_bytes()
    again = diagnostics.diagnose(run, chains=3, draws=20, seed=1, plots=False, **QUIET)
    assert Path(again["files"]["datatree"]) == run / "diagnostics-2.nc"
    assert Path(again["files"]["summary_csv"]) == run / "summary-2.csv"
    assert Path(again["files"]["summary_md"]) == run / "summary-2.md"
    assert path.read_bytes() == before
    with xr.open_datatree(run / "diagnostics-2.nc") as tree:
        assert tree["posterior_predictive"].sizes["chain"] == 3
    forced = diagnostics.diagnose(run, chains=3, draws=20, seed=1, plots=False, overwrite=True, **QUIET)
    assert Path(forced["files"]["datatree"]) == path
    assert path.read_bytes() != before
    assert not list(run.glob(".*.tmp"))
    with pytest.raises(UserError, match="chains"):
        diagnostics.diagnose(run, chains=1, draws=20, **QUIET)
    assert sorted(p.name for p in run.glob("diagnostics*")) == ["diagnostics-2.nc", "diagnostics.nc"]


def _tree_of(chains_of_samples, dataset):
    samples = np.stack(chains_of_samples)
    stats = diagnostics.draw_statistics(samples, dataset)
    stats["elbo"] = np.random.default_rng(0).normal(size=samples.shape[:2])  # not under test here
    return diagnostics.build_datatree(samples, dataset, stats, attrs={"chains": len(samples),
                                                                      "draws": samples.shape[1], "seed": 0})


def test_r_hat_is_near_one_for_one_model_and_fails_when_a_chain_differs(tiny_run):
    process = load(tiny_run)
    dataset = load_dataset(load_config(tiny_run / "config.yaml").data)
    draws = 1500
    seeds = diagnostics.chain_seeds(0, 4)
    same = diagnostics.generate(process, 4, draws, seeds)
    table = diagnostics.summarise(_tree_of(list(same), dataset), dataset)
    assert table.loc["num_ones", "sd"] > 0.5  # a statistic that varies, so R-hat means something
    assert table.loc["num_ones", "mean"] < 7  # and the model is not the uniform distribution (mean 10)
    r_hat = table["r_hat"].dropna()
    assert len(r_hat) > 10 and r_hat.max() < 1.01, r_hat.sort_values().tail()
    # one chain of uniformly random bits among three chains of the model
    uniform = np.random.default_rng(1).integers(0, 2, size=(draws, process.n), dtype=np.uint8)
    mixed = diagnostics.summarise(_tree_of([*same[:3], uniform], dataset), dataset)
    assert mixed.loc["num_ones", "r_hat"] > 1.05
    assert mixed.loc["nearest_distance", "r_hat"] > 1.05


def test_ess_of_independent_draws_and_mcse_of_k_match_the_bound_estimator(tiny_run):
    process = load(tiny_run)
    dataset = load_dataset(load_config(tiny_run / "config.yaml").data)
    chains, draws = 4, 500
    k = diagnostics.bound_draws(process, dataset.val, draws, diagnostics.chain_seeds(0, chains, stream=1))
    samples = diagnostics.generate(process, chains, draws, diagnostics.chain_seeds(0, chains))
    stats = diagnostics.draw_statistics(samples, dataset)
    stats["elbo"] = k
    table = diagnostics.summarise(diagnostics.build_datatree(samples, dataset, stats), dataset)
    total = chains * draws
    for name in ("elbo", "num_ones"):
        assert 0.8 * total < table.loc[name, "ess_bulk"] < 1.2 * total, (name, table.loc[name, "ess_bulk"])
    # the same kind of replicates, scored by the bound module's own standard error
    with torch.random.fork_rng():
        torch.manual_seed(123)
        replicates = elbo_replicates(process.kernel, process.log_probs, dataset.val, total)
    mean, se = mean_and_standard_error(replicates)
    assert table.loc["elbo", "mcse_mean"] == pytest.approx(se / LN2, rel=0.2)
    assert table.loc["elbo", "mean"] == pytest.approx(mean / LN2, abs=5 * se / LN2)
    # and a correlated chain is caught: repeating each draw 4 times leaves a quarter of the ESS
    repeated = np.repeat(k[:, : draws // 4], 4, axis=1)
    stats["elbo"] = repeated
    table = diagnostics.summarise(diagnostics.build_datatree(samples, dataset, stats), dataset)
    assert table.loc["elbo", "ess_bulk"] < 0.5 * total
