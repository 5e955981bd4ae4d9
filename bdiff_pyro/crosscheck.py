"""The exact cross-check behind ``bdiff compare CONFIG`` (docs/compare.md, docs/math.md §5).

For one reverse process and a few sequences x0, ``compare_estimates`` puts side by side, in
bits per sequence (mean over the rows of x0):

- the analytic K, every expectation over x^t exact (``bound.elbo_exact`` - pi correction),
- the ELBO from Pyro's TraceEnum_ELBO with the forward chain enumerated,
- Trace_ELBO's Monte Carlo estimate with its standard error,
- the exact log p(x^0) by enumerating the model's latents,
- the importance-sampled log p(x^0) with its standard error.

``compare_main`` runs it over the config's grid of sequence lengths n, chain lengths T and
schedules, for a random and a briefly trained network, on periodic patterns, and writes
compare.csv, compare.md and compare_bounds.png, refusing to overwrite any of them.  The
config is the typed ``CompareConfig``, validated once when it is read.  Its ``scaling``
section is read by the scaling study (wall time and memory against n), which lives with the
experiment in experiments/crosscheck/.
"""

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import pyro
import torch
import yaml

from bdiff_pyro import registry
from bdiff_pyro.diffusion import bound
from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.errors import UserError
from bdiff_pyro.networks.mlp import MLP
from bdiff_pyro.programs import enumeration
from bdiff_pyro.programs.reverse import PARAMETERISATIONS, ReverseProcess
from bdiff_pyro.util.files import fresh_directory, write_csv
from bdiff_pyro.util.stats import LN2

OUTPUT_FILES = ("compare.csv", "compare.md", "compare_bounds.png")


# ---------------------------------------------------------------------------------------
# Configuration: the keys of compare.yaml, each section a frozen dataclass


@dataclass(frozen=True)
class PeriodicData:
    period: int = 3  # one pulse every `period` positions, at each of the `period` phases


@dataclass(frozen=True)
class KernelSettings:
    pi_1: float = 0.5


@dataclass(frozen=True)
class Grid:
    n: Tuple[int, ...] = (3, 4, 6, 8)
    T: Tuple[int, ...] = (3, 5, 10)
    schedules: Tuple[str, ...] = ("cosine", "paper")


@dataclass(frozen=True)
class NetworkSettings:
    hidden: Tuple[int, ...] = (32, 32)
    activation: str = "silu"
    time_embedding: int = 16
    parameterisation: str = "x0"


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 0.01


@dataclass(frozen=True)
class EstimatorSettings:
    trace_elbo_particles: int = 256
    trace_elbo_batches: int = 16
    importance_samples: int = 4096


@dataclass(frozen=True)
class ScalingSettings:
    """Read by the scaling study (experiments/crosscheck/), not by ``compare_main``."""

    T: int = 5
    schedule: str = "cosine"
    n_max_enumerated: int = 13
    n_max_analytic: int = 16
    memory_budget_gb: float = 6.0


@dataclass(frozen=True)
class CompareConfig:
    seed: int = 0
    threads: int = 1
    data: PeriodicData = PeriodicData()
    kernel: KernelSettings = KernelSettings()
    grid: Grid = Grid()
    network: NetworkSettings = NetworkSettings()
    training: TrainingSettings = TrainingSettings()
    estimators: EstimatorSettings = EstimatorSettings()
    scaling: ScalingSettings = ScalingSettings()

    @classmethod
    def from_dict(cls, given: dict) -> "CompareConfig":
        """A mapping (as read from YAML, any section or key may be left out) over the
        defaults, checked; raises UserError naming the first bad key."""
        config = _build(cls, given, "")
        _validate(config)
        return config


def _build(cls, given, where):
    """``cls`` with the keys of ``given`` over its defaults; nested sections recursively,
    lists as tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(given) - set(fields)
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)} in {where or 'the config'}; "
                        f"expected some of {sorted(fields)}")
    values = {}
    for key, value in given.items():
        name = f"{where + '.' if where else ''}{key}"
        default = fields[key].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise UserError(f"{name} must be a mapping")
            values[key] = _build(type(default), value, name)
        else:
            values[key] = tuple(value) if isinstance(value, list) else copy.deepcopy(value)
    return cls(**values)


def _validate(config):
    period = config.data.period
    if not (isinstance(period, int) and period >= 1):
        raise UserError(f"data.period must be a positive integer (got {period!r})")
    for n in config.grid.n:
        if not (isinstance(n, int) and period <= n):
            raise UserError(f"every grid n must be an integer >= data.period = {period} (got {n!r})")
        enumeration.check_enumerable(n)
    for T in config.grid.T:
        if not (isinstance(T, int) and T >= 2):
            raise UserError(f"every grid T must be an integer >= 2 (got {T!r})")
    for name in tuple(config.grid.schedules) + (config.scaling.schedule,):
        if name not in registry.SCHEDULES:
            raise UserError(f"unknown schedule {name!r}; choose one of {sorted(registry.SCHEDULES)}")
    if config.network.parameterisation not in PARAMETERISATIONS:
        raise UserError(f"network.parameterisation must be one of {PARAMETERISATIONS}")
    if config.estimators.trace_elbo_batches < 2:
        raise UserError("estimators.trace_elbo_batches must be at least 2 (for a standard error)")


def load_config(path: Union[str, Path]) -> CompareConfig:
    """The YAML config over the defaults, checked; raises UserError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found")
    try:
        given = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {error}".replace("\n", " "))
    if not isinstance(given, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping")
    return CompareConfig.from_dict(given)


# ---------------------------------------------------------------------------------------
# Data, networks, training


def periodic_patterns(n: int, period: int) -> torch.Tensor:
    """The heartbeat-like data: one pulse every ``period`` positions, at each of the
    ``period`` phases; shape (period, n), float64 0/1.  Uniform over the patterns, so the
    data's log-likelihood is -log2(period) bits per sequence."""
    x = torch.zeros(period, n, dtype=torch.float64)
    for phase in range(period):
        x[phase, phase::period] = 1.0
    return x


def make_process(n: int, T: int, schedule: str, config: CompareConfig, seed: int) -> ReverseProcess:
    """A float64 Bernoulli-kernel reverse process with the config's network, its weights
    drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    kernel = BernoulliKernel(make_beta_tilde(schedule, T), pi_1=config.kernel.pi_1)
    network = config.network
    net = MLP(n, 2, hidden=tuple(network.hidden), activation=network.activation,
              time_embedding=network.time_embedding)
    return ReverseProcess(kernel, net, network.parameterisation).double()


def train_briefly(process, data, steps, batch_size, learning_rate, seed):
    """Adam on the unbiased analytic loss: minimise the mean of
    bound.negative_elbo_estimate over batches of patterns.  Returns the last losses."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(process.net.parameters(), lr=learning_rate)
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(len(data), (batch_size,), generator=generator)]
        loss = bound.negative_elbo_estimate(process.kernel, process.log_probs, batch)[0].mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------
# Measurements


def timed(function: Callable, *args, **kwargs):
    """(function(*args, **kwargs), its wall time in seconds)."""
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def compare_estimates(process, x0: torch.Tensor, trace_elbo_particles: int = 256, trace_elbo_batches: int = 16,
                      importance_samples: int = 4096) -> Dict[str, float]:
    """Every estimate of the bound and of log p(x^0) for the rows of x0, in bits per sequence
    (mean over the rows), with the wall times of the exact ones (docs/math.md §5):
    K_analytic = ELBO - pi correction (§2.3), the analytic and the TraceEnum_ELBO ELBO and
    their largest difference, Trace_ELBO ± se, the exact and the importance-sampled
    log p(x^0) ± se and the smallest effective sample size of the importance weights.
    The Monte Carlo ones draw from the global generators (seed them with
    ``pyro.set_rng_seed`` first)."""
    P = len(x0)
    kernel = process.kernel
    with torch.no_grad():
        analytic, t_analytic = timed(bound.elbo_exact, kernel, process.log_probs, x0)
        k_value = analytic - bound.pi_correction(kernel, x0)
    traceenum, t_enum = timed(enumeration.enumerated_elbo, process, x0)
    log_p, t_log_p = timed(enumeration.exact_log_likelihood, process, x0)
    mc_sum, mc_se_sum = enumeration.trace_elbo_estimate(process, x0, trace_elbo_particles, trace_elbo_batches)
    is_values, is_se, is_ess = enumeration.importance_log_likelihood(process, x0, importance_samples,
                                                                     return_ess=True)
    bits = lambda v: float(v) / LN2  # noqa: E731
    return {
        "K_analytic": bits(k_value.mean()),
        "elbo_analytic": bits(analytic.mean()),
        "elbo_traceenum": bits(traceenum.mean()),
        "max_abs_diff_analytic_traceenum": bits((analytic - traceenum).abs().max()),
        "trace_elbo": bits(mc_sum / P),
        "trace_elbo_se": bits(mc_se_sum / P),
        "log_p_exact": bits(log_p.mean()),
        "log_p_importance": bits(is_values.mean()),
        "log_p_importance_se": bits(is_se.pow(2).sum().sqrt() / P),
        "importance_min_ess": float(is_ess.min()),
        "seconds_analytic": t_analytic,
        "seconds_traceenum": t_enum,
        "seconds_exact_log_p": t_log_p,
    }


def grid_cells(config: CompareConfig) -> List[Tuple[int, int, str]]:
    """(n, T, schedule) of every cell, in the order they are run (cell i has seed seed + i)."""
    grid = config.grid
    return [(n, T, s) for n in grid.n for T in grid.T for s in grid.schedules]


def grid_rows(config: CompareConfig, progress=None) -> List[dict]:
    """One row per cell and network (random, then briefly trained), as ``compare_estimates``
    plus n, T, schedule, network and the training time.  ``progress``: a tqdm bar or None."""
    rows = []
    estimators = dataclasses.asdict(config.estimators)
    for index, (n, T, schedule) in enumerate(grid_cells(config)):
        if progress is not None:
            progress.set_postfix_str(f"n={n} T={T} {schedule}")
        seed = config.seed + index
        x0 = periodic_patterns(n, config.data.period)
        process = make_process(n, T, schedule, config, seed)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        rows.append({"n": n, "T": T, "schedule": schedule, "network": "random",
                     **compare_estimates(process, x0, **estimators), "seconds_training": 0.0})
        tr = config.training
        losses, seconds = timed(train_briefly, process, x0, tr.steps, tr.batch_size, tr.learning_rate, seed)
        pyro.set_rng_seed(seed)
        rows.append({"n": n, "T": T, "schedule": schedule, "network": "trained",
                     **compare_estimates(process, x0, **estimators), "seconds_training": seconds})
        if progress is not None:
            progress.update(1)
    return rows


# ---------------------------------------------------------------------------------------
# Output


def format_value(value, digits=3):
    """``value`` to ``digits`` decimals; "-" for None (not measured)."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def grid_table(rows: List[dict], config: CompareConfig) -> str:
    """The Markdown table of ``grid_rows``, with the paragraph that explains its columns."""
    period = config.data.period
    fmt = format_value
    lines = [
        f"Bits per sequence, mean over the {period} periodic patterns (true log-likelihood "
        f"-log2({period}) = {-math.log2(period):.3f}); pi_1 = {config.kernel.pi_1}, "
        f"{config.network.parameterisation} parameterisation. "
        "K: analytic bound, exact in x^t. TraceEnum: Pyro TraceEnum_ELBO, forward chain "
        "enumerated. |diff|: largest |analytic ELBO - TraceEnum| over the patterns. "
        "Trace_ELBO and IS: Monte Carlo, ± one standard error; ESS: the smallest effective "
        f"sample size of the {config.estimators.importance_samples} importance weights "
        "over the patterns (when it is small the IS standard error is not to be trusted).",
        "",
        "| n | T | schedule | network | K | TraceEnum ELBO | \\|diff\\| | Trace_ELBO | log p exact | log p IS | ESS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['T']} | {r['schedule']} | {r['network']} | {fmt(r['K_analytic'])} "
            f"| {fmt(r['elbo_traceenum'])} | {r['max_abs_diff_analytic_traceenum']:.1e} "
            f"| {fmt(r['trace_elbo'])} ± {fmt(r['trace_elbo_se'])} | {fmt(r['log_p_exact'])} "
            f"| {fmt(r['log_p_importance'])} ± {fmt(r['log_p_importance_se'])} "
            f"| {r['importance_min_ess']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_bounds(rows: List[dict], config: CompareConfig, path) -> None:
    """Bits per sequence against T, one panel per network and schedule, one colour per n."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    networks = [name for name in ("random", "trained") if any(r["network"] == name for r in rows)]
    schedules = config.grid.schedules
    ns = config.grid.n
    colours = plt.cm.viridis([i / max(1, len(ns) - 1) * 0.85 for i in range(len(ns))])
    fig, axes = plt.subplots(len(networks), len(schedules), figsize=(5.2 * len(schedules), 4 * len(networks)),
                             squeeze=False, sharex=True)
    for i, network in enumerate(networks):
        for j, schedule in enumerate(schedules):
            ax = axes[i][j]
            for colour, n in zip(colours, ns):
                sel = [r for r in rows if r["network"] == network and r["schedule"] == schedule and r["n"] == n]
                Ts = [r["T"] for r in sel]
                shift = 0.015 * (max(config.grid.T) - min(config.grid.T) + 1)
                left, right = [T - shift for T in Ts], [T + shift for T in Ts]  # Monte Carlo beside
                ax.plot(Ts, [r["K_analytic"] for r in sel], "-o", color=colour, ms=4, label=f"n = {n}")
                ax.plot(Ts, [r["elbo_traceenum"] for r in sel], "x", color="k", ms=7)
                ax.errorbar(left, [r["trace_elbo"] for r in sel], yerr=[r["trace_elbo_se"] for r in sel],
                            fmt="s", color=colour, ms=3, capsize=2, alpha=0.7)
                ax.plot(Ts, [r["log_p_exact"] for r in sel], "--", color=colour)
                ax.errorbar(right, [r["log_p_importance"] for r in sel],
                            yerr=[r["log_p_importance_se"] for r in sel], fmt="^", color=colour, ms=4,
                            capsize=2, mfc="none")
            ax.axhline(-math.log2(config.data.period), color="grey", lw=0.8, ls=":")
            ax.set_title(f"{network} network, {schedule} schedule")
            ax.set_xlabel("T (steps)")
            ax.set_ylabel("bits per sequence")
            ax.set_xticks(config.grid.T)
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], color="k", marker="o", ls="-", ms=4), Line2D([], [], color="k", marker="x", ls=""),
                Line2D([], [], color="k", marker="s", ls="", ms=3),
                Line2D([], [], color="k", ls="--"), Line2D([], [], color="k", marker="^", ls="", mfc="none"),
                Line2D([], [], color="grey", ls=":")]
    labels += ["K (analytic)", "TraceEnum_ELBO", "Trace_ELBO ± se", "log p exact", "log p IS ± se",
               "data: -log2(period)"]
    # as many legend columns as the figure's width holds (a one-panel grid is 5.2 in wide); the
    # panels leave room below for the legend's rows
    width, height = fig.get_size_inches()
    columns = max(1, min(5, int(width // 2.2)))
    legend_rows = -(-len(labels) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------


def compare_main(config_path: Union[str, Path], out_dir: Optional[Union[str, Path]] = None) -> Dict[str, Path]:
    """Run the grid of ``config_path`` (YAML) and write its results into ``out_dir``
    (default runs/compare-<timestamp>; a directory that holds anything is refused, so
    earlier results are never overwritten: UserError).  Returns {"out_dir", "csv", "table",
    "bounds_plot"}: the paths written."""
    from tqdm.auto import tqdm

    config = load_config(config_path)
    out = fresh_directory("compare", out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(config.threads))
    try:
        with tqdm(total=len(grid_cells(config)), desc="bdiff compare", unit="cell") as progress:
            rows = grid_rows(config, progress)
    finally:
        torch.set_num_threads(threads)
    paths = {"out_dir": out, "csv": out / "compare.csv", "table": out / "compare.md",
             "bounds_plot": out / "compare_bounds.png"}
    write_csv(paths["csv"], rows, exclusive=True)
    with open(paths["table"], "x") as handle:
        handle.write(grid_table(rows, config))
    plot_bounds(rows, config, paths["bounds_plot"])
    return paths
