"""The schedule study: the oracle's bound K* against T for several noise schedules.

K* is the best bound any factorised reverse step can reach for a kernel, T and schedule
(``oracle.py``), so its gap to the data's log-likelihood, -H(w) (-log2 5 for heartbeat), is the
price of the schedule and T alone.  Every number here is exact (``oracle_elbo_exact``); an
independent Monte Carlo estimate with its standard error is recorded beside it as a check.
``schedules.py`` beside it is the script.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from bdiff_pyro.diffusion.bound import entropy, pi_correction
from bdiff_pyro.diffusion.kernels import BernoulliKernel
from bdiff_pyro.diffusion.oracle import (
    OracleReverse,
    data_entropy_bits,
    oracle_elbo_exact,
    oracle_elbo_replicates,
)
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.util.stats import LN2, mean_and_standard_error


@dataclass(frozen=True)
class ScheduleSpec:
    label: str
    schedule: str  # paper | cosine | power
    power: Optional[float] = None  # power schedule only
    pi_1: float = 0.5

    def kernel(self, T):
        beta_tilde = make_beta_tilde(self.schedule, T, 2.0 if self.power is None else self.power)
        return BernoulliKernel(beta_tilde, self.pi_1).double()


DEFAULT_SPECS = (
    ScheduleSpec("paper", "paper"),
    ScheduleSpec("paper, pi_1 = 0.2", "paper", pi_1=0.2),
    ScheduleSpec("cosine", "cosine"),
    ScheduleSpec("power 2", "power", 2.0),
    ScheduleSpec("power 3", "power", 3.0),
)
DEFAULT_TS = (50, 100, 200, 500, 1000, 2000)


def evaluate(spec, T, patterns, weights=None, replicates=0, seed=0):
    """One row of the study: the oracle's exact ELBO and paper's K, the gap to -H(w), the edge
    entropy H_q(X^1 | X^0) (all bits/seq, averaged over the data), and a Monte Carlo check."""
    kernel = spec.kernel(T)
    oracle = OracleReverse(kernel, patterns, weights)
    w = oracle.weights
    x0 = oracle.patterns.to(torch.float64)
    elbo = float((w * oracle_elbo_exact(kernel, oracle.patterns, w)).sum()) / LN2
    correction = float((w * pi_correction(kernel, x0)).sum()) / LN2
    edge = float((w * entropy(kernel.q_marginal_log_probs(x0, 1)).sum(-1)).sum()) / LN2
    row = {
        "schedule": spec.label, "T": T, "pi_1": spec.pi_1, "beta_tilde_1": float(kernel.beta_tilde[1]),
        "elbo_bits": elbo, "K_bits": elbo - correction, "gap_bits": -data_entropy_bits(w) - elbo,
        "edge_entropy_bits": edge, "mc_elbo_bits": math.nan, "mc_se_bits": math.nan, "mc_replicates": replicates,
    }
    if replicates >= 2:
        estimates = oracle_elbo_replicates(oracle, replicates, seed)
        mean, se = mean_and_standard_error(estimates, w)
        row["mc_elbo_bits"], row["mc_se_bits"] = mean / LN2, se / LN2
    return row


def run_study(patterns, weights=None, specs=DEFAULT_SPECS, Ts=DEFAULT_TS, replicates=8, seed=0, progress=None):
    """Rows for every (schedule, T).  ``progress``: a callable taking the number of steps done
    (e.g. a tqdm bar's ``update``)."""
    rows = []
    for spec in specs:
        for T in Ts:
            rows.append(evaluate(spec, T, patterns, weights, replicates, seed))
            if progress is not None:
                progress(T)
    return rows


def _log_interpolate(T_lo, gap_lo, T_hi, gap_hi, target):
    """T where the straight line through (log T, log gap) at T_lo and T_hi reaches target."""
    slope = (math.log(gap_hi) - math.log(gap_lo)) / (math.log(T_hi) - math.log(T_lo))
    return math.exp(math.log(T_lo) + (math.log(target) - math.log(gap_lo)) / slope)


def T_for_gap(spec, patterns, weights, target, known=(), max_T=16000, tolerance=0.02, progress=None):
    """Bracket the smallest T whose exact gap is <= target: gap(T_lo) > target >= gap(T_hi) with
    T_hi - T_lo <= tolerance * T_hi.

    Starts from the ``known`` rows of this schedule, doubles T until the gap is below the target,
    then evaluates just either side of the log-log interpolation (the gap is close to a power
    law in T) until the bracket is narrow.  T_hi is None when even max_T is not enough.
    """
    gaps = {row["T"]: row["gap_bits"] for row in known if row["schedule"] == spec.label}
    evaluated_before = len(gaps)

    def gap(T):
        if T not in gaps:
            gaps[T] = evaluate(spec, T, patterns, weights)["gap_bits"]
            if progress is not None:
                progress(T)
        return gaps[T]

    def result(T_lo, T_hi):
        interpolated = None if T_hi is None or T_lo not in gaps else \
            _log_interpolate(T_lo, gaps[T_lo], T_hi, gaps[T_hi], target)
        return {"schedule": spec.label, "target_gap_bits": target, "T_bracket": (T_lo, T_hi),
                "gaps": dict(sorted(gaps.items())), "T_interpolated": interpolated,
                "evaluations": len(gaps) - evaluated_before}

    if not gaps:
        gap(2)
    while min(gaps.values()) > target:
        largest = max(gaps)
        if largest >= max_T:
            return result(largest, None)
        gap(min(max_T, 2 * largest))
    for _ in range(20):
        T_hi = min(T for T, g in gaps.items() if g <= target)
        T_lo = max((T for T, g in gaps.items() if g > target and T < T_hi), default=None)
        if T_lo is None:  # even the smallest T evaluated meets the target: look below it
            if T_hi <= 2:
                return result(1, T_hi)
            gap(max(2, T_hi // 2))
            continue
        if T_hi - T_lo <= max(1, tolerance * T_hi):
            return result(T_lo, T_hi)
        guess = _log_interpolate(T_lo, gaps[T_lo], T_hi, gaps[T_hi], target)
        half_width = tolerance * guess / 2
        for T in {int(math.floor(guess - half_width)), int(math.ceil(guess + half_width))}:
            if T_lo < T < T_hi:
                gap(T)
    return result(T_lo, T_hi)


# ---------------------------------------------------------------------------------------
# Output


CSV_FIELDS = ("schedule", "T", "pi_1", "beta_tilde_1", "elbo_bits", "K_bits", "gap_bits", "edge_entropy_bits",
              "mc_elbo_bits", "mc_se_bits", "mc_replicates")


def markdown_tables(rows, searches=(), data_log_likelihood=None):
    """The K* table (rows T, columns schedules), the Monte Carlo check and the T for a target gap."""
    labels = list(dict.fromkeys(row["schedule"] for row in rows))
    Ts = sorted({row["T"] for row in rows})
    cell = {(row["schedule"], row["T"]): row for row in rows}
    lines = []
    if data_log_likelihood is not None:
        lines += [f"Data log-likelihood -H(w) = {data_log_likelihood:.4f} bits/seq.", ""]
    lines += ["Oracle ELBO K* in bits/seq, exact (gap to -H(w) in parentheses):", "",
              "| T | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for T in Ts:
        entries = [f"{cell[label, T]['elbo_bits']:.4f} ({cell[label, T]['gap_bits']:.4f})" if (label, T) in cell
                   else "" for label in labels]
        lines.append(f"| {T} | " + " | ".join(entries) + " |")
    if any(not math.isnan(row["mc_elbo_bits"]) for row in rows):
        replicates = max(row["mc_replicates"] for row in rows)
        lines += ["", f"Independent Monte Carlo check (mean ± standard error, {replicates} stratified "
                  "replicates per pattern; the exact value should lie within a few SE):", "",
                  "| T | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
        for T in Ts:
            entries = [f"{cell[label, T]['mc_elbo_bits']:.3f} ± {cell[label, T]['mc_se_bits']:.3f}"
                       if (label, T) in cell else "" for label in labels]
            lines.append(f"| {T} | " + " | ".join(entries) + " |")
    edge_rows = [row for row in rows if row["T"] == Ts[-1]]
    lines += ["", f"Edge entropy H_q(X^1 | X^0) at T = {Ts[-1]} (bits/seq): "
              + ", ".join(f"{row['schedule']} {row['edge_entropy_bits']:.4f}" for row in edge_rows)]
    if searches:
        target = searches[0]["target_gap_bits"]
        lines += ["", f"Smallest T with gap <= {target} bits (exact bracket: gap(T_lo) > {target} >= gap(T_hi)):", "",
                  "| schedule | T_lo | T_hi | gap(T_hi) | log-log interpolation |", "|---|---:|---:|---:|---:|"]
        for search in searches:
            T_lo, T_hi = search["T_bracket"]
            if T_hi is None:
                lines.append(f"| {search['schedule']} | > {T_lo} | | | |")
            else:
                lines.append(f"| {search['schedule']} | {T_lo} | {T_hi} | {search['gaps'][T_hi]:.4f} | "
                             f"{search['T_interpolated']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_gaps(rows, path, target=None, title=None):
    """Gap to -H(w) against T, both on log scales, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.6))
    for label in dict.fromkeys(row["schedule"] for row in rows):
        points = sorted((row["T"], row["gap_bits"]) for row in rows if row["schedule"] == label)
        axes.plot([T for T, _ in points], [g for _, g in points], marker="o", label=label)
    if target is not None:
        axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"{target} bits")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("T (number of diffusion steps)")
    axes.set_ylabel("gap -H(w) - K* (bits/seq)")
    axes.set_title(title or "Oracle bound gap against T")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
