"""The exact cross-check experiment (docs/compare.md): ``bdiff compare``'s grid, then the
scaling study: the wall time and peak memory of the analytic ELBO, TraceEnum_ELBO and the
exact log p(x^0) for one sequence as n grows, up to the largest n the enumeration fits in
the memory budget (the config's ``scaling`` section).

    python experiments/crosscheck/compare.py [experiments/crosscheck/compare.yaml] [--out runs/compare]

Writes compare.csv, compare_scaling.csv, compare.md (both tables), compare_bounds.png and
compare_scaling.png into the output directory, refusing to overwrite any of them.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bdiff_pyro.crosscheck import (
    format_value,
    grid_cells,
    grid_rows,
    grid_table,
    load_config,
    make_process,
    periodic_patterns,
    plot_bounds,
    timed,
)
from bdiff_pyro.diffusion import bound
from bdiff_pyro.errors import UserError
from bdiff_pyro.programs import enumeration
from bdiff_pyro.util.files import fresh_directory, write_csv

HERE = Path(__file__).resolve().parent
OUTPUT_FILES = ("compare.csv", "compare_scaling.csv", "compare.md", "compare_bounds.png", "compare_scaling.png")

# Peak memory of the enumerations, bytes per (time step x S^2), measured at n = 11, 12
# (T = 5): guide-side TraceEnum_ELBO keeps about 5.5 tensors of S^2 float64 per step, the
# model-side enumeration of log p(x^0) about 1.5.
BYTES_PER_STEP_STATE_PAIR = {"traceenum_elbo": 5.5 * 8, "exact_log_likelihood": 1.5 * 8}


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


def best_time(function, *args, repeats=3, enough=0.5, **kwargs):
    """Least wall time of up to ``repeats`` calls (one call when a call takes ``enough`` s)."""
    best = math.inf
    for _ in range(repeats):
        _, seconds = timed(function, *args, **kwargs)
        best = min(best, seconds)
        if seconds >= enough:
            break
    return best


def scaling_rows(config, progress):
    """Time (and peak memory) of the analytic ELBO, TraceEnum_ELBO and the exact log p(x^0)
    for one pattern as n grows, while the enumeration fits in the memory budget."""
    sc = config.scaling
    T, budget = sc.T, sc.memory_budget_gb * 2**30
    rows = []
    for n in range(1, sc.n_max_analytic + 1):
        process = make_process(n, T, sc.schedule, config, config.seed + 1000 + n)
        x0 = periodic_patterns(n, min(config.data.period, n))[:1]
        S = enumeration.num_joint_states(n)
        row = {"n": n, "T": T, "states_per_slice": S}
        with torch.no_grad(), PeakMemory() as memory:
            row["seconds_analytic"] = best_time(bound.elbo_exact, process.kernel, process.log_probs, x0)
        row["peak_mb_analytic"] = memory.peak and memory.peak / 2**20
        for name, function in (("traceenum_elbo", enumeration.enumerated_elbo),
                               ("exact_log_likelihood", enumeration.exact_log_likelihood)):
            needed = BYTES_PER_STEP_STATE_PAIR[name] * T * S * S
            row[f"estimated_gb_{name}"] = needed / 2**30
            if n <= sc.n_max_enumerated and needed <= budget:
                with PeakMemory() as memory:
                    row[f"seconds_{name}"] = best_time(function, process, x0, max_states=S)
                row[f"peak_mb_{name}"] = memory.peak and memory.peak / 2**20
            else:
                row[f"seconds_{name}"] = None
                row[f"peak_mb_{name}"] = None
        rows.append(row)
        progress.update(1)
    return rows


def scaling_table(scaling, config):
    sc = config.scaling
    lines = [
        f"Wall time in seconds (peak extra memory in MB) for one sequence, T = {sc.T}, "
        f"{sc.schedule} schedule, {config.threads} thread(s), best of up to 3 runs; '-': not "
        f"run (n above {sc.n_max_enumerated} or the estimated memory, in brackets, above the "
        f"{sc.memory_budget_gb} GB budget).",
        "",
        "| n | states 2^n | analytic (exact in x^t) | TraceEnum_ELBO | exact log p (model enumeration) |",
        "|---|---|---|---|---|",
    ]

    def cell(r, name):
        if r[f"seconds_{name}"] is None:
            return f"- (~{r[f'estimated_gb_{name}']:.3g} GB)"
        peak = r[f"peak_mb_{name}"]
        return f"{r[f'seconds_{name}']:.3g} ({format_value(peak, 0)} MB)"

    for r in scaling:
        peak = r["peak_mb_analytic"]
        lines.append(f"| {r['n']} | {r['states_per_slice']} | {r['seconds_analytic']:.3g} "
                     f"({format_value(peak, 0)} MB) | {cell(r, 'traceenum_elbo')} | "
                     f"{cell(r, 'exact_log_likelihood')} |")
    return "\n".join(lines) + "\n"


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
    ax.set_title(f"T = {config.scaling.T}, {config.scaling.schedule} schedule, {config.threads} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config_path, out_dir=None):
    """The grid, then the scaling study; returns the paths written."""
    config = load_config(config_path)
    out = fresh_directory("compare", out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(config.threads))
    try:
        total = len(grid_cells(config)) + config.scaling.n_max_analytic
        with tqdm(total=total, desc="compare", unit="step") as progress:
            rows = grid_rows(config, progress)
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
        handle.write(grid_table(rows, config) + "\n" + scaling_table(scaling, config))
    plot_bounds(rows, config, paths["bounds_plot"])
    plot_scaling(scaling, config, paths["scaling_plot"])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(HERE / "compare.yaml"),
                        help="YAML config (default: compare.yaml beside this script)")
    parser.add_argument("--out", default=None, help="output directory (default runs/compare-<time>); "
                        "existing result files are never overwritten")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        paths = run(args.config, args.out)
    except UserError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        print(f"{key}: {path}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
