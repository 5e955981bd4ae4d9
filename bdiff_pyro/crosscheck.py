"""The exact cross-check experiment behind ``bdiff compare CONFIG`` (docs/compare.md).

Over a grid of sequence lengths n, chain lengths T and schedules, for a random and a
briefly trained reverse network, it tabulates in bits per sequence (averaged over the
periodic patterns of the data):

- the analytic K, every expectation over x^t exact (``bound.elbo_exact`` - pi correction),
- the ELBO from Pyro's TraceEnum_ELBO with the forward chain enumerated,
- Trace_ELBO's Monte Carlo estimate with its standard error,
- the exact log p(x^0) by enumerating the model's latents,
- the importance-sampled log p(x^0) with its standard error,

and, for one T, the wall time (and peak memory) of the analytic and the enumerated
computations as n grows, up to the largest n the enumeration fits in the memory budget.
Writes compare.csv, compare_scaling.csv, compare.md, compare_bounds.png and
compare_scaling.png into the output directory, refusing to overwrite any of them.
"""

import copy
import math
import time
from pathlib import Path

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

DEFAULTS = {
    "seed": 0,
    "threads": 1,
    "data": {"period": 3},
    "kernel": {"pi_1": 0.5},
    "grid": {"n": [3, 4, 6, 8], "T": [3, 5, 10], "schedules": ["cosine", "paper"]},
    "network": {"hidden": [32, 32], "activation": "silu", "time_embedding": 16,
                "parameterisation": "x0"},
    "training": {"steps": 300, "batch_size": 64, "learning_rate": 0.01},
    "estimators": {"trace_elbo_particles": 256, "trace_elbo_batches": 16,
                   "importance_samples": 4096},
    "scaling": {"T": 5, "schedule": "cosine", "n_max_enumerated": 13, "n_max_analytic": 16,
                "memory_budget_gb": 6.0},
}

OUTPUT_FILES = ("compare.csv", "compare_scaling.csv", "compare.md", "compare_bounds.png",
                "compare_scaling.png")

# Peak memory of the enumerations, bytes per (time step x S^2), measured at n = 11, 12
# (T = 5): guide-side TraceEnum_ELBO keeps about 5.5 tensors of S^2 float64 per step, the
# model-side enumeration of log p(x^0) about 1.5.
BYTES_PER_STEP_STATE_PAIR = {"traceenum_elbo": 5.5 * 8, "exact_log_likelihood": 1.5 * 8}


# ---------------------------------------------------------------------------------------
# Configuration


def _merge(defaults, given, where):
    unknown = set(given) - set(defaults)
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)} in {where or 'the config'}; "
                        f"expected some of {sorted(defaults)}")
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"{where + '.' if where else ''}{key} must be a mapping")
            merged[key] = _merge(defaults[key], value, f"{where + '.' if where else ''}{key}")
        else:
            merged[key] = value
    return merged


def load_config(path):
    """The YAML config merged over DEFAULTS and checked; raises UserError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found")
    try:
        given = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {error}".replace("\n", " "))
    if not isinstance(given, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping")
    config = _merge(DEFAULTS, given, "")
    period = config["data"]["period"]
    if not (isinstance(period, int) and period >= 1):
        raise UserError(f"data.period must be a positive integer (got {period!r})")
    for n in config["grid"]["n"]:
        if not (isinstance(n, int) and period <= n):
            raise UserError(f"every grid n must be an integer >= data.period = {period} (got {n!r})")
        enumeration.check_enumerable(n)
    for T in config["grid"]["T"]:
        if not (isinstance(T, int) and T >= 2):
            raise UserError(f"every grid T must be an integer >= 2 (got {T!r})")
    for name in config["grid"]["schedules"] + [config["scaling"]["schedule"]]:
        if name not in registry.SCHEDULES:
            raise UserError(f"unknown schedule {name!r}; choose one of {sorted(registry.SCHEDULES)}")
    if config["network"]["parameterisation"] not in PARAMETERISATIONS:
        raise UserError(f"network.parameterisation must be one of {PARAMETERISATIONS}")
    if config["estimators"]["trace_elbo_batches"] < 2:
        raise UserError("estimators.trace_elbo_batches must be at least 2 (for a standard error)")
    return config


# ---------------------------------------------------------------------------------------
# Data, networks, training


def periodic_patterns(n, period):
    """The heartbeat-like data: one pulse every ``period`` positions, at each of the
    ``period`` phases; shape (period, n), float64 0/1.  Uniform over the patterns, so the
    data's log-likelihood is -log2(period) bits per sequence."""
    x = torch.zeros(period, n, dtype=torch.float64)
    for phase in range(period):
        x[phase, phase::period] = 1.0
    return x


def make_process(n, T, schedule, config, seed):
    torch.manual_seed(seed)
    kernel = BernoulliKernel(make_beta_tilde(schedule, T), pi_1=config["kernel"]["pi_1"])
    network = config["network"]
    net = MLP(n, 2, hidden=tuple(network["hidden"]), activation=network["activation"],
                     time_embedding=network["time_embedding"])
    return ReverseProcess(kernel, net, network["parameterisation"]).double()


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


class PeakMemory:
    """Peak resident memory of a block above what was resident before it, in bytes, from
    /proc/self (VmHWM reset through clear_refs); None where Linux does not allow it."""

    def __enter__(self):
        self.peak = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.before = self._read("VmRSS")
        except OSError:
            self.before = None
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            self.peak = max(0, self._read("VmHWM") - self.before)

    @staticmethod
    def _read(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(field)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def best_time(function, *args, repeats=3, enough=0.5, **kwargs):
    """Least wall time of up to ``repeats`` calls (one call when a call takes ``enough`` s)."""
    best = math.inf
    for _ in range(repeats):
        _, seconds = timed(function, *args, **kwargs)
        best = min(best, seconds)
        if seconds >= enough:
            break
    return best


def evaluate(process, x0, config):
    """Every estimate for the patterns x0, in bits per sequence (mean over the patterns)."""
    P = len(x0)
    est = config["estimators"]
    kernel = process.kernel
    with torch.no_grad():
        analytic, t_analytic = timed(bound.elbo_exact, kernel, process.log_probs, x0)
        k_value = analytic - bound.pi_correction(kernel, x0)
    traceenum, t_enum = timed(enumeration.enumerated_elbo, process, x0)
    log_p, t_log_p = timed(enumeration.exact_log_likelihood, process, x0)
    mc_sum, mc_se_sum = enumeration.trace_elbo_estimate(process, x0, est["trace_elbo_particles"],
                                                 est["trace_elbo_batches"])
    is_values, is_se, is_ess = enumeration.importance_log_likelihood(process, x0, est["importance_samples"],
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


def scaling_rows(config, progress):
    """Time (and peak memory) of the analytic ELBO, TraceEnum_ELBO and the exact log p(x^0)
    for one pattern as n grows, while the enumeration fits in the memory budget."""
    sc = config["scaling"]
    T, budget = sc["T"], sc["memory_budget_gb"] * 2**30
    rows = []
    for n in range(1, sc["n_max_analytic"] + 1):
        process = make_process(n, T, sc["schedule"], config, config["seed"] + 1000 + n)
        x0 = periodic_patterns(n, min(config["data"]["period"], n))[:1]
        S = enumeration.num_joint_states(n)
        row = {"n": n, "T": T, "states_per_slice": S}
        with torch.no_grad(), PeakMemory() as memory:
            row["seconds_analytic"] = best_time(bound.elbo_exact, process.kernel, process.log_probs, x0)
        row["peak_mb_analytic"] = memory.peak and memory.peak / 2**20
        for name, function in (("traceenum_elbo", enumeration.enumerated_elbo),
                               ("exact_log_likelihood", enumeration.exact_log_likelihood)):
            needed = BYTES_PER_STEP_STATE_PAIR[name] * T * S * S
            row[f"estimated_gb_{name}"] = needed / 2**30
            if n <= sc["n_max_enumerated"] and needed <= budget:
                with PeakMemory() as memory:
                    row[f"seconds_{name}"] = best_time(function, process, x0, max_states=S)
                row[f"peak_mb_{name}"] = memory.peak and memory.peak / 2**20
            else:
                row[f"seconds_{name}"] = None
                row[f"peak_mb_{name}"] = None
        rows.append(row)
        progress.update(1)
    return rows


# ---------------------------------------------------------------------------------------
# Output


def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def markdown_tables(rows, scaling, config):
    period = config["data"]["period"]
    lines = [
        f"Bits per sequence, mean over the {period} periodic patterns (true log-likelihood "
        f"-log2({period}) = {-math.log2(period):.3f}); pi_1 = {config['kernel']['pi_1']}, "
        f"{config['network']['parameterisation']} parameterisation. "
        "K: analytic bound, exact in x^t. TraceEnum: Pyro TraceEnum_ELBO, forward chain "
        "enumerated. |diff|: largest |analytic ELBO - TraceEnum| over the patterns. "
        "Trace_ELBO and IS: Monte Carlo, ± one standard error; ESS: the smallest effective "
        f"sample size of the {config['estimators']['importance_samples']} importance weights "
        "over the patterns (when it is small the IS standard error is not to be trusted).",
        "",
        "| n | T | schedule | network | K | TraceEnum ELBO | \\|diff\\| | Trace_ELBO | log p exact | log p IS | ESS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['T']} | {r['schedule']} | {r['network']} | {_fmt(r['K_analytic'])} "
            f"| {_fmt(r['elbo_traceenum'])} | {r['max_abs_diff_analytic_traceenum']:.1e} "
            f"| {_fmt(r['trace_elbo'])} ± {_fmt(r['trace_elbo_se'])} | {_fmt(r['log_p_exact'])} "
            f"| {_fmt(r['log_p_importance'])} ± {_fmt(r['log_p_importance_se'])} "
            f"| {r['importance_min_ess']:.0f} |")
    sc = config["scaling"]
    lines += [
        "",
        f"Wall time in seconds (peak extra memory in MB) for one sequence, T = {sc['T']}, "
        f"{sc['schedule']} schedule, {config['threads']} thread(s), best of up to 3 runs; '-': not "
        f"run (n above {sc['n_max_enumerated']} or the estimated memory, in brackets, above the "
        f"{sc['memory_budget_gb']} GB budget).",
        "",
        "| n | states 2^n | analytic (exact in x^t) | TraceEnum_ELBO | exact log p (model enumeration) |",
        "|---|---|---|---|---|",
    ]

    def cell(r, name):
        if r[f"seconds_{name}"] is None:
            return f"- (~{r[f'estimated_gb_{name}']:.3g} GB)"
        peak = r[f"peak_mb_{name}"]
        return f"{r[f'seconds_{name}']:.3g} ({_fmt(peak, 0)} MB)"

    for r in scaling:
        peak = r["peak_mb_analytic"]
        lines.append(f"| {r['n']} | {r['states_per_slice']} | {r['seconds_analytic']:.3g} "
                     f"({_fmt(peak, 0)} MB) | {cell(r, 'traceenum_elbo')} | "
                     f"{cell(r, 'exact_log_likelihood')} |")
    return "\n".join(lines) + "\n"


def plot_bounds(rows, config, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    networks = [name for name in ("random", "trained") if any(r["network"] == name for r in rows)]
    schedules = config["grid"]["schedules"]
    ns = config["grid"]["n"]
    colours = plt.cm.viridis([i / max(1, len(ns) - 1) * 0.85 for i in range(len(ns))])
    fig, axes = plt.subplots(len(networks), len(schedules), figsize=(5.2 * len(schedules), 4 * len(networks)),
                             squeeze=False, sharex=True)
    for i, network in enumerate(networks):
        for j, schedule in enumerate(schedules):
            ax = axes[i][j]
            for colour, n in zip(colours, ns):
                sel = [r for r in rows if r["network"] == network and r["schedule"] == schedule and r["n"] == n]
                Ts = [r["T"] for r in sel]
                shift = 0.015 * (max(config["grid"]["T"]) - min(config["grid"]["T"]) + 1)
                left, right = [T - shift for T in Ts], [T + shift for T in Ts]  # Monte Carlo beside
                ax.plot(Ts, [r["K_analytic"] for r in sel], "-o", color=colour, ms=4, label=f"n = {n}")
                ax.plot(Ts, [r["elbo_traceenum"] for r in sel], "x", color="k", ms=7)
                ax.errorbar(left, [r["trace_elbo"] for r in sel], yerr=[r["trace_elbo_se"] for r in sel],
                            fmt="s", color=colour, ms=3, capsize=2, alpha=0.7)
                ax.plot(Ts, [r["log_p_exact"] for r in sel], "--", color=colour)
                ax.errorbar(right, [r["log_p_importance"] for r in sel],
                            yerr=[r["log_p_importance_se"] for r in sel], fmt="^", color=colour, ms=4,
                            capsize=2, mfc="none")
            ax.axhline(-math.log2(config["data"]["period"]), color="grey", lw=0.8, ls=":")
            ax.set_title(f"{network} network, {schedule} schedule")
            ax.set_xlabel("T (steps)")
            ax.set_ylabel("bits per sequence")
            ax.set_xticks(config["grid"]["T"])
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


def plot_scaling(scaling, config, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, marker in (("seconds_analytic", "analytic ELBO (exact in x^t)", "o"),
                               ("seconds_traceenum_elbo", "TraceEnum_ELBO (guide enumerated)", "x"),
                               ("seconds_exact_log_likelihood", "exact log p (model enumerated)", "s")):
        points = [(r["n"], r[key]) for r in scaling if r[key] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "-" + marker, label=label, ms=5)
    ax.set_yscale("log")
    ax.set_xlabel("n (bits per sequence); a time slice has 2^n states")
    ax.set_ylabel("wall time for one sequence (s)")
    ax.set_title(f"T = {config['scaling']['T']}, {config['scaling']['schedule']} schedule, "
                 f"{config['threads']} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------


def compare_main(config_path, out_dir=None):
    """Run the comparison experiment of ``config_path`` (YAML) and write its results into
    ``out_dir`` (default runs/compare-<timestamp>; a directory that holds anything is refused,
    so earlier results are never overwritten: UserError).  Returns {"csv", "scaling_csv", "table", "bounds_plot",
    "scaling_plot", "out_dir"}: the paths written."""
    from tqdm.auto import tqdm

    config = load_config(config_path)
    out = fresh_directory("compare", out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(config["threads"]))
    try:
        grid = config["grid"]
        cells = [(n, T, s) for n in grid["n"] for T in grid["T"] for s in grid["schedules"]]
        total = len(cells) + config["scaling"]["n_max_analytic"]
        rows = []
        with tqdm(total=total, desc="bdiff compare", unit="step") as progress:
            for index, (n, T, schedule) in enumerate(cells):
                progress.set_postfix_str(f"n={n} T={T} {schedule}")
                seed = config["seed"] + index
                x0 = periodic_patterns(n, config["data"]["period"])
                process = make_process(n, T, schedule, config, seed)
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                rows.append({"n": n, "T": T, "schedule": schedule, "network": "random",
                             **evaluate(process, x0, config), "seconds_training": 0.0})
                tr = config["training"]
                losses, seconds = timed(train_briefly, process, x0, tr["steps"], tr["batch_size"],
                                        tr["learning_rate"], seed)
                pyro.set_rng_seed(seed)
                rows.append({"n": n, "T": T, "schedule": schedule, "network": "trained",
                             **evaluate(process, x0, config), "seconds_training": seconds})
                progress.update(1)
            progress.set_postfix_str("scaling")
            scaling = scaling_rows(config, progress)
    finally:
        torch.set_num_threads(threads)
    paths = {"out_dir": out, "csv": out / "compare.csv", "scaling_csv": out / "compare_scaling.csv",
             "table": out / "compare.md", "bounds_plot": out / "compare_bounds.png",
             "scaling_plot": out / "compare_scaling.png"}
    write_csv(paths["csv"], rows, exclusive=True)
    write_csv(paths["scaling_csv"], scaling, exclusive=True)
    with open(paths["table"], "x") as handle:
        handle.write(markdown_tables(rows, scaling, config))
    plot_bounds(rows, config, paths["bounds_plot"])
    plot_scaling(scaling, config, paths["scaling_plot"])
    return paths
