"""ArviZ diagnostics of a trained run: do independent sampling runs agree (R-hat), how many
effective draws are there and what is the Monte Carlo error of the ELBO (ESS, MCSE), and do
generated sequences look like the data?

Generated sequences are independent draws and the ELBO is a Monte Carlo estimate, so both
are laid out as ArviZ chains and draws, each chain an independent sampling run with its own
seed, and judged with ArviZ's own diagnostics (arviz-base / arviz-stats / arviz-plots, the
DataTree API).  ``diagnose(run_dir)`` writes into the run directory:

- ``diagnostics.nc``: an ArviZ DataTree (NetCDF4 through h5netcdf) with the groups
  ``posterior_predictive``: ``x``, the generated sequences, dims (chain, draw, position);
  ``observed_data``: ``x``, the training sequences, dims (sequence, position);
  ``sample_stats``, dims (chain, draw): ``elbo``, ``num_ones``, ``nearest_distance`` (Hamming
  distance to the nearest training sequence), ``is_train`` / ``is_held_out`` / ``is_other``
  (0/1: a training sequence, a held-out sequence that is not a training one, neither) and, for
  data with a known periodic support (heartbeat), ``phase`` (index of the unique nearest
  support pattern, -1 on a tie).
  Draw d of chain c of ``elbo`` is one independent stratified replicate of the ELBO
  (``bound.elbo_replicates``) averaged over the held-out sequences, in bits/seq: its mean over
  all draws is the estimate of the ELBO and ArviZ's MCSE is that estimate's Monte Carlo error:
  the bound on log2 p(x) that ``bdiff train`` and ``bdiff evaluate`` report as the ELBO;
  the paper's K is the ELBO minus the root attribute ``pi_correction_bits`` (zero for pi_1 = 1/2;
  absent, and ``paper_K_undefined`` says why, for kernels whose pi has zeros).
  When there are more than ``bound_sequences`` held-out sequences, each draw averages a fresh
  random subset of that many (still unbiased for the average over all of them; the MCSE then
  includes the subsampling).
- ``summary.csv`` / ``summary.md``: ``arviz_stats.summary`` (mean, sd, 94% HDI, ESS bulk / tail,
  R-hat, MCSE of the mean and of the sd) of the ELBO, the draw statistics, the phase frequencies and
  the per-position rates, with the data's value in a ``data`` column; the Markdown copy (also
  printed) leads with the ELBO as estimate ± MCSE and folds the per-position rates into one line.
- ``diagnostics_convergence.png``: rank plots and local ESS of the ELBO and the draw statistics, by
  chain; ``diagnostics_ppc.png``: generated against data (number of ones, nearest-neighbour
  distances, per-position rates, pattern frequencies) over replicated data sets.

Earlier results are never overwritten: when the files of slot 1 exist, the first free slot
``diagnostics-2.nc`` / ``summary-2.csv`` / ``summary-2.md`` / ``diagnostics-2_*.png``, then
``-3`` ... is used; ``overwrite=True`` writes slot 1 again.
"""

import math
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import yaml
from tqdm.auto import tqdm

from bdiff_pyro.checkpoints import process_from_checkpoint, read_checkpoint
from bdiff_pyro.data import load_dataset
from bdiff_pyro.diffusion.bound import (
    elbo_replicates,
    first_stochastic_step,
    pi_correction,
    pi_correction_undefined,
)
from bdiff_pyro.errors import UserError
from bdiff_pyro.util.files import claim_file, write_atomically
from bdiff_pyro.util.stats import LN2, distinct_held_out, pattern_codes, row_membership

DEFAULT_CHAINS = 4
DEFAULT_DRAWS = 250
BOUND_SEQUENCES = 16  # held-out sequences averaged per ELBO draw (a random subset when there are more)
CI_PROB = 0.94
SAMPLE_DIMS = ("chain", "draw")
DRAW_STATISTICS = ("elbo", "num_ones", "nearest_distance", "is_train", "is_held_out", "is_other")
_ROWS_PER_CALL = 1 << 16  # (t, x^0) rows per elbo_replicates call: bounds the memory used


def diagnose(run_dir, chains=DEFAULT_CHAINS, draws=DEFAULT_DRAWS, seed=0, *, overwrite=False,
             bound_sequences=BOUND_SEQUENCES, plots=True, progress=True, log=print):
    """ArviZ diagnostics of the model in ``run_dir`` (see the module docstring for the files).

    ``chains`` independent sampling runs of ``draws`` sequences each, chain c seeded from
    (seed, c); the bound gets ``draws`` independent replicates per chain.  Returns a dict:
    ``files`` (name -> path), ``elbo_bits`` / ``elbo_mcse_bits`` / ``elbo_ess`` / ``elbo_r_hat``,
    ``max_r_hat`` (over every row of the summary), ``summary`` (the pandas summary DataFrame),
    ``table`` (its Markdown text), ``seconds``.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if chains < 2:
        raise UserError(f"chains must be at least 2: R-hat compares chains (got {chains})")
    if draws < 10:
        raise UserError(f"draws must be at least 10 (got {draws})")
    if bound_sequences < 1:
        raise UserError(f"bound_sequences must be at least 1 (got {bound_sequences})")
    where, payload = read_checkpoint(run_dir)
    if not run_dir.is_dir():
        run_dir = where.parent
    config, process = process_from_checkpoint(where, payload)
    process = process.eval()
    dataset = load_dataset(config.data)
    if dataset.n != process.n:
        raise UserError(f"{where}: the model has n = {process.n} but its data has sequences of length {dataset.n}")

    files = _claim_outputs(run_dir, overwrite)
    try:
        seeds = chain_seeds(seed, chains)
        samples = generate(process, chains, draws, seeds, progress)
        stats = draw_statistics(samples, dataset)
        stats["elbo"] = bound_draws(process, dataset.val, draws, chain_seeds(seed, chains, stream=1),
                                 bound_sequences, progress)
        tree = build_datatree(samples, dataset, stats, attrs={
            "run_dir": str(run_dir), "checkpoint_step": int(payload["state"]["step"]), "chains": chains,
            "draws": draws, "seed": seed, "chain_seeds": np.asarray(seeds, dtype=np.int64),
            "bound_sequences": min(bound_sequences, len(dataset.val)),
            "held_out_sequences": len(dataset.val),
            **_papers_K_attrs(process.kernel, dataset.val),
            "held_out_patterns": distinct_held_out(dataset.train, dataset.val),
            "config": yaml.safe_dump(config.to_dict(), sort_keys=False)})
        _write_netcdf(tree, files["datatree"])
    except BaseException:
        if not overwrite:
            files["datatree"].unlink(missing_ok=True)  # release the slot claimed above
        raise

    table = summarise(tree, dataset)
    table.to_csv(files["summary_csv"], index_label="statistic")
    markdown = summary_markdown(tree, table)
    files["summary_md"].write_text(markdown + "\n")
    log(markdown)

    if plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arviz-plots' notes on binary / discrete data
            plot_convergence(tree, files["convergence_plot"])
            plot_ppc(tree, dataset, files["ppc_plot"])
    else:
        for key in ("convergence_plot", "ppc_plot"):
            files.pop(key)
    seconds = time.perf_counter() - started
    elbo = table.loc["elbo"]
    result = {
        "files": {key: str(path) for key, path in files.items()},
        "elbo_bits": float(elbo["mean"]), "elbo_mcse_bits": float(elbo["mcse_mean"]),
        "elbo_ess": float(elbo["ess_bulk"]), "elbo_r_hat": float(elbo["r_hat"]),
        "max_r_hat": float(np.nanmax(table["r_hat"].to_numpy(dtype=float))),
        "summary": table, "table": markdown, "seconds": seconds,
    }
    log(f"diagnostics of {chains} chains x {draws} draws in {seconds:.1f} s: {files['datatree']}, "
        f"{files['summary_csv'].name}, {files['summary_md'].name}"
        + (f", {files['convergence_plot'].name}, {files['ppc_plot'].name}" if plots else ""))
    return result


# ---------------------------------------------------------------------------------------
# Output files


def output_names(slot):
    """File names of the ``slot``-th diagnose run in a run directory (1, 2, ...)."""
    stem, summary = ("diagnostics", "summary") if slot == 1 else (f"diagnostics-{slot}", f"summary-{slot}")
    return {"datatree": f"{stem}.nc", "summary_csv": f"{summary}.csv", "summary_md": f"{summary}.md",
            "convergence_plot": f"{stem}_convergence.png", "ppc_plot": f"{stem}_ppc.png"}


def _claim_outputs(run_dir, overwrite):
    """The paths of the first free slot, its .nc file created empty so that a concurrent run
    takes the next one; with ``overwrite`` the first slot, whatever it holds."""
    for slot in range(1, 10000):
        paths = {key: run_dir / name for key, name in output_names(slot).items()}
        if overwrite:
            return paths
        if not any(path.exists() for path in paths.values()) and claim_file(paths["datatree"]):
            return paths
    raise UserError(f"{run_dir}: no free name for diagnostics (9999 earlier runs); pass overwrite")


def _write_netcdf(tree, path):
    """DataTree -> NetCDF4 (h5netcdf) through a temporary file renamed over ``path``."""
    try:
        write_atomically(path, lambda temporary: tree.to_netcdf(temporary, engine="h5netcdf"))
    except ImportError:
        raise UserError("writing diagnostics.nc needs the h5netcdf package (pip install h5netcdf)") from None


def open_diagnostics(path):
    """Read a diagnostics.nc back as an ArviZ DataTree (loaded into memory, file closed).  Files
    written before the ELBO was named ``elbo`` call it ``K``: it is renamed."""
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        tree = tree.load()
    stats = tree["sample_stats"].to_dataset()
    if "K" in stats and "elbo" not in stats:
        tree["sample_stats"] = xr.DataTree(stats.rename({"K": "elbo"}))
    return tree


# ---------------------------------------------------------------------------------------
# Draws


def chain_seeds(seed, chains, stream=0):
    """One independent torch seed per chain (stream 0: sampling, 1: the bound); chain c's seed
    does not depend on the number of chains."""
    children = np.random.SeedSequence([seed, stream]).spawn(chains)
    return [int(child.generate_state(1, dtype=np.uint32)[0]) for child in children]


def generate(process, chains, draws, seeds, progress=False):
    """(chains, draws, n) int8 sequences, chain c = process.sample(draws, seed=seeds[c])."""
    out = np.empty((chains, draws, process.n), dtype=np.int8)
    with tqdm(total=chains * draws, disable=not progress, desc="sample", unit="seq") as bar:
        for c in range(chains):
            out[c] = process.sample(draws, seed=seeds[c]).to(torch.int8).cpu().numpy()
            bar.update(draws)
    return out


def hamming_to_nearest(x, reference, chunk=1024):
    """(M, n) and (R, n) 0/1 arrays -> (distance to the nearest reference row, its index);
    the index is -1 where several rows are equally near."""
    xs = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    best = torch.full((len(xs),), xs.shape[1] + 1, dtype=torch.int64)
    index = torch.full((len(xs),), -1, dtype=torch.int64)
    for start in range(0, len(reference), chunk):
        ref = torch.as_tensor(np.asarray(reference[start:start + chunk]), dtype=torch.float32)
        distance = (xs @ (1 - ref).T + (1 - xs) @ ref.T).round().to(torch.int64)  # (M, chunk)
        low, where = distance.min(1)
        ties = (distance == low.unsqueeze(1)).sum(1) > 1
        closer, equal = low < best, low == best
        index = torch.where(closer, torch.where(ties, -1, where + start), torch.where(equal, -1, index))
        best = torch.minimum(best, low)
    return best.numpy(), index.numpy()


def draw_statistics(samples, dataset):
    """Per-draw statistics of (chains, draws, n) samples, each of shape (chains, draws)."""
    chains, draws, n = samples.shape
    flat = samples.reshape(-1, n)
    train = dataset.train.to(torch.uint8).cpu().numpy()
    val = dataset.val.to(torch.uint8).cpu().numpy()
    is_train, is_held_out = row_membership(flat, train, val)
    stats = {
        "num_ones": flat.sum(1, dtype=np.int64),
        "nearest_distance": hamming_to_nearest(flat, train)[0],
        "is_train": is_train, "is_held_out": is_held_out, "is_other": ~(is_train | is_held_out),
    }
    if dataset.support is not None:
        stats["phase"] = hamming_to_nearest(flat, dataset.support.to(torch.uint8).cpu().numpy())[1]
    small = {"num_ones": np.int16, "nearest_distance": np.int16, "phase": np.int16}
    return {name: value.astype(small.get(name, np.int8)).reshape(chains, draws) for name, value in stats.items()}


def bound_draws(process, x_val, draws, seeds, bound_sequences=BOUND_SEQUENCES, progress=False):
    """(chains, draws) independent estimates of the bound (ELBO) averaged over the held-out
    sequences, in bits/seq: draw d of chain c is one stratified replicate
    (``bound.elbo_replicates``) averaged over the held-out sequences, or, when there are more
    than ``bound_sequences`` of them, over a fresh uniformly random subset of that many (an
    unbiased estimate of the same average).  Chain c runs under torch seed ``seeds[c]``."""
    kernel = process.kernel
    x_val = x_val.to(kernel.log_pi.device)
    num = len(x_val)
    size = min(num, bound_sequences)
    steps = kernel.T + 1 - first_stochastic_step(kernel)
    per_call = max(1, _ROWS_PER_CALL // (steps * size))
    out = np.empty((len(seeds), draws))
    with tqdm(total=len(seeds) * draws, disable=not progress, desc="bound", unit="draw") as bar:
        for c, chain_seed in enumerate(seeds):
            with torch.random.fork_rng(), torch.no_grad():
                torch.manual_seed(chain_seed)
                for start in range(0, draws, per_call):
                    r = min(per_call, draws - start)
                    if size == num:
                        estimates = elbo_replicates(kernel, process.log_probs, x_val, r).mean(0)
                    else:
                        subsets = torch.stack([torch.randperm(num)[:size] for _ in range(r)])
                        rows = elbo_replicates(kernel, process.log_probs, x_val[subsets.reshape(-1)], 1)
                        estimates = rows.view(r, size).mean(1)
                    out[c, start:start + r] = estimates.double().cpu().numpy() / LN2
                    bar.update(r)
    return out


# ---------------------------------------------------------------------------------------
# The DataTree


def _papers_K_attrs(kernel, x0):
    """The root attribute that turns the ELBO into the paper's K: ``pi_correction_bits``, or
    ``paper_K_undefined`` saying why there is none (``bound.pi_correction_undefined``)."""
    undefined = pi_correction_undefined(kernel)
    if undefined is not None:
        return {"paper_K_undefined": undefined}
    return {"pi_correction_bits": float(pi_correction(kernel, x0).mean()) / LN2}


def build_datatree(samples, dataset, stats, attrs=None):
    """The ArviZ DataTree of a diagnose run (groups posterior_predictive, observed_data,
    sample_stats; see the module docstring)."""
    chains, draws, n = samples.shape
    coords = {"chain": np.arange(chains), "draw": np.arange(draws)}
    train = dataset.train.to(torch.int8).cpu().numpy()
    # int8, not uint8: ArviZ's checks for discrete data look for signed integers
    predictive = xr.Dataset(
        {"x": (("chain", "draw", "position"), samples.astype(np.int8), {"description": "generated sequences"})},
        coords={**coords, "position": np.arange(n)})
    observed = xr.Dataset(
        {"x": (("sequence", "position"), train, {"description": "training sequences"})},
        coords={"sequence": np.arange(len(train)), "position": np.arange(n)})
    descriptions = {
        "elbo": ("bits/seq", "one independent Monte Carlo replicate of the bound (ELBO on log2 p) "
              "averaged over the held-out sequences; its mean over draws is the ELBO"),
        "num_ones": ("", "number of ones in the generated sequence"),
        "nearest_distance": ("", "Hamming distance to the nearest training sequence"),
        "is_train": ("", "1 if the generated sequence is a training sequence"),
        "is_held_out": ("", "1 if it is a held-out sequence and not a training sequence"),
        "is_other": ("", "1 if it is neither a training nor a held-out sequence"),
        "phase": ("", "index of the unique nearest support pattern (periodic data), -1 on a tie"),
    }
    variables = {}
    for name in ("elbo", *[key for key in descriptions if key != "elbo"]):
        if name in stats:
            units, text = descriptions[name]
            variables[name] = (SAMPLE_DIMS, stats[name], {"description": text, **({"units": units} if units else {})})
    sample_stats = xr.Dataset(variables, coords=coords)
    root = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inference_library": "bdiff_pyro", **(attrs or {})}
    if dataset.support is not None:
        # the patterns the phase indexes, as one string "10000... 01000... ..."
        sample_stats["phase"].attrs["support"] = " ".join(
            "".join(map(str, row)) for row in dataset.support.to(torch.uint8).tolist())
    tree = xr.DataTree.from_dict({"posterior_predictive": predictive, "observed_data": observed,
                                  "sample_stats": sample_stats})
    tree.attrs = root
    return tree


# ---------------------------------------------------------------------------------------
# Summary


def _summary_dataset(tree):
    """The draw statistics, phase frequencies and per-position rates, each with dims
    (chain, draw[, ...]): the quantities the summary table describes."""
    stats = tree["sample_stats"].to_dataset()
    variables = {name: stats[name].astype(float) for name in DRAW_STATISTICS}
    if "phase" in stats:
        phases = np.arange(len(stats["phase"].attrs["support"].split()))
        frequency = (stats["phase"] == xr.DataArray(phases, dims="phase")).astype(float)
        variables["phase_frequency"] = frequency.assign_coords(phase=phases)
    variables["rate"] = tree["posterior_predictive"]["x"].astype(float)
    return xr.Dataset(variables)


def _data_values(tree, dataset, index):
    """The data's value of each summary row (NaN where there is none): training sequences,
    except for nearest_distance, where it is the held-out sequences' distance to the training
    set (what a new sequence from the data distribution would show)."""
    train = dataset.train.to(torch.uint8).cpu().numpy()
    val = dataset.val.to(torch.uint8).cpu().numpy()
    values = {"num_ones": train.sum(1).mean(), "nearest_distance": hamming_to_nearest(val, train)[0].mean(),
              "is_train": 1.0, "is_held_out": 0.0, "is_other": 0.0}
    for i, rate in enumerate(train.mean(0)):
        values[f"rate[{i}]"] = rate
    if "phase" in tree["sample_stats"]:
        support = dataset.support.to(torch.uint8).cpu().numpy()
        _, phase = hamming_to_nearest(train, support)
        for p in range(len(support)):
            values[f"phase_frequency[{p}]"] = float(np.mean(phase == p))
    return [values.get(name, np.nan) for name in index]


def summarise(tree, dataset, ci_prob=CI_PROB):
    """arviz_stats.summary of the draw statistics, phase frequencies and per-position rates
    (rows), with a ``data`` column holding the training data's value.

    arviz-stats 0.8.0's summary labels its interval with ``ci_kind`` but always computes an
    equal-tailed one; the HDI columns are therefore recomputed here with arviz_stats.hdi."""
    import arviz_stats as azs
    from arviz_base import dataset_to_dataframe

    data = _summary_dataset(tree)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # R-hat of a constant statistic is NaN
        table = azs.summary(data, kind="all", ci_kind="hdi", ci_prob=ci_prob, round_to="none")
        hdi = data.azstats.hdi(prob=ci_prob, dim=list(SAMPLE_DIMS))
    bounds = dataset_to_dataframe(hdi, sample_dims=["ci_bound"]).T
    percent = round(ci_prob * 100)
    table[f"hdi{percent}_lb"] = bounds.loc[table.index, "lower"].to_numpy(dtype=float)
    table[f"hdi{percent}_ub"] = bounds.loc[table.index, "upper"].to_numpy(dtype=float)
    table.insert(0, "data", _data_values(tree, dataset, table.index))
    return table


def _fmt(value, digits):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def ess_phrase(ess, draws):
    """"ESS 950 of 1000 draws"; an ESS above the number of draws (negatively correlated
    draws, e.g. the stratified bound replicates) says so instead of looking like an error."""
    if ess > draws:
        return f"ESS {ess:.0f} of {draws} draws (more than the draws: negatively correlated draws)"
    return f"ESS {ess:.0f} of {draws} draws"


def summary_markdown(tree, table):
    """The Markdown summary: the ELBO as estimate ± MCSE, then the table (per-position rates folded
    into one line; they are all in summary.csv)."""
    attrs = tree.attrs
    elbo = table.loc["elbo"]
    percent = [c for c in table.columns if c.startswith("hdi")][0][3:-3]
    draws = attrs['chains'] * attrs['draws']
    lines = [f"ELBO = {elbo['mean']:.4f} ± {elbo['mcse_mean']:.4f} bits/seq (estimate ± MCSE; "
             f"{ess_phrase(elbo['ess_bulk'], draws)}, R-hat {elbo['r_hat']:.3f}), "
             f"{attrs['chains']} chains x {attrs['draws']} draws, seed {attrs['seed']}; each draw one replicate "
             f"stratified over t on {attrs['bound_sequences']} of the {attrs['held_out_sequences']} held-out sequences",
             "",
             f"| statistic | data | mean ± MCSE | sd | hdi{percent} | ess bulk | ess tail | r_hat |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in table.iterrows():
        if name.startswith("rate["):
            continue
        d = 4 if name == "elbo" else 3
        if name == "is_held_out" and attrs.get("held_out_patterns") == 0:
            lines.append("| is_held_out | no held-out patterns (the held-out set is the training set) "
                         "| | | | | | |")
            continue
        lines.append(
            f"| {name} | {_fmt(row['data'], d)} | {_fmt(row['mean'], d)} ± {_fmt(row['mcse_mean'], d)} "
            f"| {_fmt(row['sd'], d)} | [{_fmt(row[f'hdi{percent}_lb'], d)}, {_fmt(row[f'hdi{percent}_ub'], d)}] "
            f"| {_fmt(row['ess_bulk'], 0)} | {_fmt(row['ess_tail'], 0)} | {_fmt(row['r_hat'], 3)} |")
    rates = table[table.index.str.startswith("rate[")]
    r_hat = table["r_hat"].dropna()
    high = r_hat[r_hat > 1.01]
    verdict = ("R-hat <= 1.01 for every statistic: the chains agree" if high.empty else
               "R-hat > 1.01 (the chains may disagree; more draws tell) for: "
               + ", ".join(f"{name} ({value:.3f})" for name, value in high.items()))
    if len(rates):
        gap = (rates["mean"] - rates["data"]).abs()
        lines += ["", f"per-position rates ({len(rates)} positions, rows rate[i] of the CSV): "
                      f"max |generated - data| = {gap.max():.3f} (at {gap.idxmax()}), "
                      f"max MCSE {rates['mcse_mean'].max():.3f}, max R-hat {np.nanmax(rates['r_hat']):.3f}"]
    return "\n".join(lines + ["", verdict])


# ---------------------------------------------------------------------------------------
# Plots (arviz-plots, matplotlib backend)

CONVERGENCE_VARIABLES = ("elbo", "num_ones", "nearest_distance", "phase")
LABELS = {"elbo": "ELBO (bits/seq)", "num_ones": "number of ones",
          "nearest_distance": "distance to nearest training seq.", "phase": "phase"}
MAX_PATTERNS = 8  # pattern frequencies: the support, or the most frequent training sequences


def _use_agg():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen (as bdiff_pyro.plots)


def _figure(pc):
    return pc.viz["figure"].item()


def _save(fig, path):
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_convergence(tree, path, seed=0):
    """Rank plots (left) and local ESS (right) of the ELBO and the draw statistics, one row each
    (statistics that are the same in every draw have nothing to rank and are left out).

    The integer statistics tie a lot (a good model puts most draws at distance 0), and tied
    draws share a rank, which makes their rank ECDFs steps that are hard to read: their ties
    are broken at random (value + u, u ~ U(0, 1/2), seeded), which leaves every chain's ranks
    uniform when the chains agree."""
    _use_agg()
    import arviz_plots as azp

    stats = tree["sample_stats"]
    names = [name for name in CONVERGENCE_VARIABLES if name in stats and np.ptp(stats[name].values) > 0]
    rng = np.random.default_rng(seed)
    jittered = stats.to_dataset()
    for name in names:
        if np.issubdtype(stats[name].dtype, np.integer):
            jittered[name] = stats[name] + rng.uniform(0, 0.5, stats[name].shape)
    tree = xr.DataTree.from_dict({"sample_stats": jittered})
    total = stats.sizes["chain"] * stats.sizes["draw"]
    pc = azp.combine_plots(
        tree, [(azp.plot_rank, {}), (azp.plot_ess, {"min_ess": min(400, total)})], group="sample_stats",
        var_names=names, backend="matplotlib", plot_names=["rank", "ess"], aes={"color": ["chain"]},
        figure_kwargs={"figsize": (10, 2.7 * len(names) + 0.6)})
    for row, name in enumerate(names):
        rank, ess = pc.iget_target(row, 0), pc.iget_target(row, 1)
        ties = ", ties broken at random" if np.issubdtype(stats[name].dtype, np.integer) else ""
        rank.set_title(f"{LABELS[name]}\nrank ECDF minus uniform, by chain{ties}", fontsize=9)
        ess.set_title(f"{LABELS[name]}\nlocal ESS (dotted: all {total} draws; dash-dot: {min(400, total)})",
                      fontsize=9)
        ess.axhline(total, color="0.3", lw=0.8, ls=":")
        ess.set_ylim(0, 1.15 * max(total, ess.get_ylim()[1]))
        ess.set_ylabel("ESS")
        rank.set_xlabel("fractional rank")
        ess.set_xlabel("quantile")
    fig = _figure(pc)
    handles = [matplotlib_line(f"C{c}", f"chain {c}") for c in range(stats.sizes["chain"])]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path)


def matplotlib_line(color, label):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, label=label)


def _patterns(dataset):
    """The patterns whose frequencies are compared: the support (periodic data), otherwise the
    most frequent training sequences; (uint8 (P, n) array, training frequency of each)."""
    train = dataset.train.to(torch.uint8).cpu().numpy()
    if dataset.support is not None:
        patterns = dataset.support.to(torch.uint8).cpu().numpy()
    else:
        unique, counts = np.unique(train, axis=0, return_counts=True)
        patterns = unique[np.argsort(-counts, kind="stable")[:MAX_PATTERNS]]
    codes = pattern_codes(train, patterns)
    return patterns, np.bincount(codes, minlength=len(patterns) + 1) / len(train)


def replicate_size(num_train, chains, draws):
    """Sequences per replicated data set in the predictive checks: the training set's size,
    but small enough to leave at least 100 replicates."""
    return max(1, min(num_train, chains * draws // 100))


def _ppc_tree(tree, dataset, seed=0):
    """Replicated data sets of m generated sequences (m = replicate_size) next to the data,
    as an ArviZ posterior_predictive / observed_data pair, one variable per panel."""
    x = tree["posterior_predictive"]["x"].values.astype(np.int64)
    distance = tree["sample_stats"]["nearest_distance"].values.astype(np.int64)
    chains, draws, n = x.shape
    train = dataset.train.to(torch.uint8).cpu().numpy().astype(np.int64)
    val = dataset.val.to(torch.uint8).cpu().numpy().astype(np.int64)
    m = replicate_size(len(train), chains, draws)
    reps = draws // m
    x = x[:, :reps * m].reshape(chains, reps, m, n)
    m_val = min(m, len(val))
    patterns, data_frequency = _patterns(dataset)
    codes = pattern_codes(x.reshape(-1, n), patterns)
    frequency = (codes.reshape(chains, reps, m, 1) == np.arange(len(patterns) + 1)).mean(2)
    rng = np.random.default_rng(seed)
    observed_train = train[rng.choice(len(train), m, replace=False)]
    observed_val = val[rng.choice(len(val), m_val, replace=False)]
    predictive = xr.Dataset({
        "num_ones": (("chain", "draw", "sequence"), x.sum(-1)),
        "nearest_distance": (("chain", "draw", "held_out_sequence"),
                             distance[:, :reps * m].reshape(chains, reps, m)[:, :, :m_val]),
        "rate": (("chain", "draw", "position"), x.mean(2)),
        "pattern_frequency": (("chain", "draw", "pattern"), frequency),
    }, coords={"chain": np.arange(chains), "draw": np.arange(reps)})
    observed = xr.Dataset({
        "num_ones": ("sequence", observed_train.sum(-1)),
        "nearest_distance": ("held_out_sequence", hamming_to_nearest(observed_val, train)[0].astype(np.int64)),
        "rate": ("position", train.mean(0)),
        "pattern_frequency": ("pattern", data_frequency),
    })
    return xr.DataTree.from_dict({"posterior_predictive": predictive, "observed_data": observed}), m, m_val, patterns


def _pattern_label(row):
    text = "".join(map(str, row))
    return text if len(text) <= 24 else text[:21] + "..."


def plot_ppc(tree, dataset, path):
    """Generated against training data, over replicated data sets of m generated sequences
    (m = the training set's size when there are enough draws): number of ones and distance to
    the nearest training sequence (rootograms), per-position rates and pattern frequencies
    (mean and 50% / 94% intervals over the replicates; the data as black dots)."""
    _use_agg()
    import arviz_plots as azp
    from arviz_plots import PlotCollection

    ppc, m, m_val, patterns = _ppc_tree(tree, dataset)
    pc = PlotCollection.wrap(ppc["posterior_predictive"].to_dataset(), cols=["__variable__"], col_wrap=2,
                             backend="matplotlib", figure_kwargs={"figsize": (11, 7.5)})
    off = {"xlabel": False, "ylabel": False, "title": False}
    azp.plot_ppc_rootogram(ppc, var_names=["num_ones", "nearest_distance"], plot_collection=pc,
                           yscale="linear", visuals=off, ci_prob=CI_PROB)
    azp.plot_ppc_interval(ppc, var_names=["rate", "pattern_frequency"], plot_collection=pc, point_estimate="mean",
                          ci_probs=(0.5, CI_PROB), visuals=off)
    titles = {
        "num_ones": (f"number of ones, in {m} sequences", "number of ones", "sequences"),
        "nearest_distance": (f"distance to nearest training seq., {m_val} sequences",
                             "Hamming distance", "sequences"),
        "rate": (f"per-position rate of ones, in {m} sequences", "position", "rate"),
        "pattern_frequency": (f"pattern frequencies, in {m} sequences", "", "frequency"),
    }
    from matplotlib.ticker import MaxNLocator

    for name, (title, xlabel, ylabel) in titles.items():
        ax = pc.get_target(name, {})
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name, size in (("num_ones", m), ("nearest_distance", m_val)):
        values = np.concatenate([ppc["posterior_predictive"][name].values.ravel(), ppc["observed_data"][name].values])
        ax = pc.get_target(name, {})
        ax.set_xlim(max(values.min() - 1.5, -0.7), values.max() + 1.5)
        ax.set_ylim(-0.03 * size, 1.08 * size)
    ax = pc.get_target("pattern_frequency", {})
    labels = [_pattern_label(row) for row in patterns] + ["other"]
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=7, family="monospace")
    fig = _figure(pc)
    fig.legend(handles=[matplotlib_line("C0", f"generated: mean and {round(CI_PROB * 100)}% interval over "
                                              "replicated data sets"),
                        matplotlib_line("black", "data (held-out for the distance, training otherwise)")],
               loc="lower center", ncol=2, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path)
