"""The kernel study (docs/kernels.md): every kernel that applies, trained with the same
settings on the binary heartbeat and on the 8x8 digits (binary and 4 grey levels), scored on
held-out data, and its samples drawn side by side.  ``kernels.py`` beside it is the script.

One config per data set (kernel_heartbeat.yaml, kernel_digits.yaml, beside this file); a
cell of the study is that config with ``--set`` overrides for the data set and the kernel, so
every cell is also ``bdiff train CONFIG --set model.kernel=...``.

Scores are the negative ELBO in bits per sequence (an upper bound on -log2 p(x^0): lower is
better), on the data the model never trained on: the digits' test split, and for heartbeat the
``period`` patterns themselves (the whole data distribution, each equally likely, so the
average is exact and only Monte Carlo error remains).
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from bdiff_pyro.checkpoints import load_with_config
from bdiff_pyro.config import DataConfig, apply_overrides, load_config
from bdiff_pyro.data.datasets import heartbeat
from bdiff_pyro.diffusion.bound import elbo_replicates, prior_kl
from bdiff_pyro.errors import UserError
from bdiff_pyro.train import train
from bdiff_pyro.util.stats import LN2

#: Kernels in table order; the 4-level data leaves out bernoulli (a K = 2 kernel).
KERNEL_ORDER = ("bernoulli", "uniform", "absorbing", "gaussian")


@dataclass(frozen=True)
class DataSpec:
    """One data set of the study: a config file (in the configs directory) plus overrides."""

    name: str
    label: str
    config: str
    overrides: tuple = ()
    #: kernels not trained because they are another kernel exactly (same matrices, same
    #: network, same seed: the same run), reported as that kernel's row
    same_as: dict = field(default_factory=dict)


DATASETS = (
    DataSpec("heartbeat", "heartbeat, binary (n = 20, K = 2)", "kernel_heartbeat.yaml", (),
             {"uniform": "bernoulli"}),
    DataSpec("digits2", "digits, binary (n = 64, K = 2)", "kernel_digits.yaml", ("data.levels=2",),
             {"uniform": "bernoulli"}),
    DataSpec("digits4", "digits, 4 levels (n = 64, K = 4)", "kernel_digits.yaml", ("data.levels=4",)),
)
DATASET_NAMES = tuple(spec.name for spec in DATASETS)


def dataset_spec(name):
    for spec in DATASETS:
        if spec.name == name:
            return spec
    raise UserError(f"unknown data set {name!r}; choose from {', '.join(DATASET_NAMES)}")


def applicable_kernels(levels):
    """Kernels defined for data with ``levels`` states: bernoulli needs K = 2."""
    return tuple(k for k in KERNEL_ORDER if levels == 2 or k != "bernoulli")


def cell_config(spec, kernel, configs_dir, overrides=()):
    """The config of one cell: the data set's file, its overrides, the user's, then the kernel."""
    path = Path(configs_dir) / spec.config
    return load_config(path, [*spec.overrides, *overrides, f"model.kernel={kernel}"])


def _levels(path, overrides):
    """data.levels of a config file with overrides, read before choosing a kernel (a full
    load would validate the file's own kernel against the levels)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise UserError(f"{path}: cannot read config ({error.strerror})") from None
    levels = apply_overrides(raw, overrides).get("data", {}).get("levels", DataConfig.levels)
    if not isinstance(levels, int) or levels < 2:
        raise UserError(f"{path}: data.levels must be an integer >= 2 (got {levels!r})")
    return levels


def plan(datasets, kernels, configs_dir, overrides=(), include_duplicates=False):
    """[(spec, kernel, config, same_as)] for every applicable (data set, kernel) pair, in
    table order; ``same_as`` names the trained kernel a duplicate row copies (else None)."""
    cells = []
    for name in datasets:
        spec = dataset_spec(name)
        levels = _levels(Path(configs_dir) / spec.config, [*spec.overrides, *overrides])
        for kernel in applicable_kernels(levels):
            if kernel not in kernels:
                continue
            twin = None if include_duplicates else spec.same_as.get(kernel)
            if twin is not None and twin not in kernels:
                twin = None  # its twin is not run: train this one
            cells.append((spec, kernel, cell_config(spec, kernel, configs_dir, overrides), twin))
    if not cells:
        raise UserError("nothing to run: no kernel applies to the chosen data sets")
    return cells


# ---------------------------------------------------------------------------------------
# Scoring


def score_set(config):
    """(held-out sequences, description, whole_distribution) for a config's data."""
    if config.data.kind == "heartbeat":
        patterns = heartbeat(config.data.n, config.data.period, config.data.levels)
        return patterns, f"the {len(patterns)} heartbeat patterns (the whole data distribution)", True
    if config.data.kind == "digits":
        from bdiff_pyro.data.digits import digits_splits
        test = digits_splits(binary=config.data.levels == 2, seed=config.data.split_seed,
                             levels=config.data.levels)["test"]
        return test, f"the {len(test)} test images (split seed {config.data.split_seed})", False
    raise UserError(f"the kernel study scores heartbeat and digits data, not {config.data.kind!r}")


def score(process, x0, replicates, seed, whole_distribution):
    """The negative ELBO in bits/seq on x0 with its standard errors and per-sequence values.

    ``mc_se``: Monte Carlo error of the estimate for this fixed set of sequences.
    ``data_se``: the error of the mean as an estimate over the data distribution (sequences
    drawn from it; None when x0 is the whole distribution).
    ``prior_kl_bits``: KL(q(x^T | x^0) || pi) summed over dimensions, the part of the bound no
    network can reduce (about 0 when the chain forgets x^0 by step T).
    """
    if replicates < 2:
        raise UserError(f"--replicates must be at least 2 for a standard error (got {replicates})")
    x0 = x0.to(process.kernel.log_pi.device)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        estimates = elbo_replicates(process.kernel, process.log_probs, x0, replicates).double()  # (N, R) nats
    nll = -estimates / LN2
    per_sequence = nll.mean(1)
    num = len(x0)
    mc_se = float(nll.var(1, unbiased=True).sum().div(replicates).sqrt() / num)
    data_se = None if whole_distribution or num < 2 else float(per_sequence.std(unbiased=True) / math.sqrt(num))
    with torch.no_grad():
        prior_kl_bits = float(prior_kl(process.kernel, x0.to(process.kernel.log_pi.dtype)).mean()) / LN2
    prior_kl_bits = prior_kl_bits if prior_kl_bits > 0 else 0.0  # a KL: -0.0 and tiny negatives are rounding
    return {"nll_bits": float(per_sequence.mean()), "mc_se_bits": mc_se, "data_se_bits": data_se,
            "prior_kl_bits": prior_kl_bits, "per_sequence_bits": per_sequence.tolist()}


def independent_baseline_bits(train_x, test_x, levels):
    """-log2 p(x) per sequence, averaged over test_x, of independent per-position categoricals
    fitted to train_x with half a pseudo-count per state (exact; no diffusion)."""
    train_x = np.asarray(train_x, dtype=np.int64)
    test_x = np.asarray(test_x, dtype=np.int64)
    counts = np.stack([(train_x == k).sum(0) for k in range(levels)], axis=-1) + 0.5  # (n, K)
    log_p = np.log2(counts / counts.sum(-1, keepdims=True))
    per_sequence = -log_p[np.arange(test_x.shape[1]), test_x].sum(-1)
    return float(per_sequence.mean()), float(per_sequence.std(ddof=1) / math.sqrt(len(per_sequence)))


def reference(config):
    """A yardstick for a data set's row block: the exact entropy for heartbeat, the
    independent-pixels model for digits.  (label, bits/seq, standard error or None)."""
    if config.data.kind == "heartbeat":
        return f"data entropy log2 {config.data.period} (the best possible)", math.log2(config.data.period), None
    from bdiff_pyro.data.digits import digits_splits
    splits = digits_splits(binary=config.data.levels == 2, seed=config.data.split_seed, levels=config.data.levels)
    bits, se = independent_baseline_bits(splits["train"], splits["test"], config.data.levels)
    return "independent pixels (exact log-likelihood)", bits, se


def validity(metrics, config):
    """Fraction of samples that are valid, where validity is defined: an exact heartbeat."""
    if config.data.kind != "heartbeat":
        return None
    return metrics["samples"]["train"]  # heartbeat: the training set is every pattern


# ---------------------------------------------------------------------------------------
# Running


def run_cell(config, run_dir, replicates=8, figure_samples=16, progress=False, log=print):
    """Train one cell in run_dir, score it on held-out data, draw its figure samples."""
    started = time.perf_counter()
    metrics = train(config, run_dir, progress=progress, log=log)
    _, process = load_with_config(run_dir)
    x0, description, whole = score_set(config)
    result = score(process, x0, replicates, config.seed + 1, whole)
    samples = process.sample(figure_samples, seed=config.seed)
    pattern_fractions = metrics["samples"].get("pattern_fractions")
    return {
        "kernel": config.model.kernel, "levels": config.data.levels, "run_dir": str(run_dir),
        "scored_on": description, "replicates": replicates, **result,
        "val_elbo_bits": metrics["held_out"]["elbo_bits"], "val_se_bits": metrics["held_out"]["se_bits"],
        "valid_fraction": validity(metrics, config), "num_samples": metrics["samples"]["num"],
        "pattern_fractions": pattern_fractions,
        "train_time_s": metrics["wall_time_s"], "cell_time_s": time.perf_counter() - started,
        "steps": metrics["steps"], "T": metrics["T"], "num_parameters": metrics["num_parameters"],
        "samples": samples.to(torch.int64).tolist(),
    }


def paired_differences(rows):
    """Add ``delta_bits`` (this kernel minus the best of its data set, >= 0) and its standard
    error to every row: paired over the held-out sequences (both kernels scored the same ones),
    so the spread of the sequences' own difficulty cancels."""
    for dataset in {row["dataset"] for row in rows}:
        block = [row for row in rows if row["dataset"] == dataset]
        best = min((row for row in block if not row.get("same_as")), key=lambda row: row["nll_bits"])
        for row in block:
            row["best_in_dataset"] = row is best or row.get("same_as") == best["kernel"]
            if row is best or row.get("same_as") == best["kernel"]:
                row["delta_bits"], row["delta_se_bits"] = 0.0, 0.0
                continue
            diff = np.asarray(row["per_sequence_bits"]) - np.asarray(best["per_sequence_bits"])
            row["delta_bits"] = float(diff.mean())
            mc = math.hypot(row["mc_se_bits"], best["mc_se_bits"])
            if row["data_se_bits"] is None:
                row["delta_se_bits"] = mc  # the whole distribution: Monte Carlo error only
            else:  # per-sequence differences already carry their Monte Carlo noise
                row["delta_se_bits"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return rows


# ---------------------------------------------------------------------------------------
# Reporting


def _pm(value, se, digits=2):
    return f"{value:.{digits}f}" if se is None else f"{value:.{digits}f} ± {se:.{digits}f}"


def markdown_table(rows, references):
    """The study's table: one row per (data set, kernel), a reference row per data set."""
    lines = [
        "| data | kernel | −ELBO, bits/seq (± MC SE) | ± SE over held-out data | Δ to best (paired SE) "
        "| prior KL, bits | valid samples | training time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        block = [row for row in rows if row["dataset"] == dataset]
        for row in block:
            kernel = f"**{row['kernel']}**" if row["best_in_dataset"] and row.get("same_as") is None else row["kernel"]
            if row.get("same_as"):
                kernel += f" (≡ {row['same_as']})"
            data_se = "n/a (all patterns)" if row["data_se_bits"] is None else f"± {row['data_se_bits']:.2f}"
            delta = "best" if row["delta_bits"] == 0.0 else f"+{_pm(row['delta_bits'], row['delta_se_bits'])}"
            if row["valid_fraction"] is None:
                valid = "n/a"
            else:
                valid = f"{row['valid_fraction']:.1%} exact heartbeats"
                if row.get("pattern_fractions"):
                    fractions = row["pattern_fractions"]
                    valid += f" (shifts {min(fractions):.2f}–{max(fractions):.2f})"
            time_s = "same run" if row.get("same_as") else f"{row['train_time_s']:.0f} s"
            lines.append(f"| {row['label']} | {kernel} | {_pm(row['nll_bits'], row['mc_se_bits'])} | {data_se} "
                         f"| {delta} | {row['prior_kl_bits']:.2f} | {valid} | {time_s} |")
        label, bits, se = references[dataset]
        lines.append(f"| {block[0]['label']} | *{label}* | {_pm(bits, se)} | | | | | |")
    return "\n".join(lines) + "\n"


def winners(rows):
    """One sentence per data set: which kernel wins and by how much over the runner-up."""
    sentences = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        block = sorted((r for r in rows if r["dataset"] == dataset and not r.get("same_as")),
                       key=lambda r: r["nll_bits"])
        if len(block) < 2:
            continue
        best, second = block[0], block[1]
        sentences.append(f"{best['label']}: {best['kernel']} wins by {second['delta_bits']:.2f} ± "
                         f"{second['delta_se_bits']:.2f} bits/seq over {second['kernel']}")
    return sentences


def figure_examples(held_out, num, seed=0):
    """``num`` held-out sequences for the figure's data column: a seeded random choice, or
    all of them repeated in order when there are fewer (the five heartbeat patterns)."""
    if len(held_out) > num:
        return held_out[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))[:num]]
    return held_out.repeat(-(-num // len(held_out)), 1)[:num]


def plot_samples(rows, data_examples, path, columns=4):
    """One row of panels per data set: held-out data, then each trained kernel's samples
    (heartbeat: one sample per line; digits: 8x8 images, 4 x 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bdiff_pyro.data.digits import SIDE
    from bdiff_pyro.plots import image_grid

    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    panels = {d: [("held-out data", data_examples[d], None)] +
              [(r["kernel"], torch.tensor(r["samples"]), r) for r in rows if r["dataset"] == d and not r.get("same_as")]
              for d in datasets}
    width = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(datasets), width, figsize=(2.3 * width, 2.6 * len(datasets)), squeeze=False)
    cmap = plt.get_cmap("Greys").copy()
    cmap.set_bad("#b0c4de")
    for i, dataset in enumerate(datasets):
        levels = next(r["levels"] for r in rows if r["dataset"] == dataset)
        label = next(r["label"] for r in rows if r["dataset"] == dataset)
        for j in range(width):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(panels[dataset]):
                ax.set_axis_off()
                continue
            title, samples, row = panels[dataset][j]
            samples = samples.float().numpy()
            if samples.shape[1] == SIDE * SIDE:
                image = np.ma.masked_less(image_grid(samples, columns=columns), 0)
                ax.imshow(image, cmap=cmap, vmin=0, vmax=levels - 1, interpolation="nearest")
            else:
                ax.imshow(samples, cmap=cmap, vmin=0, vmax=levels - 1, interpolation="nearest", aspect="auto")
            if row is not None:
                title += f"\n{row['nll_bits']:.1f} bits/seq"
                if row["valid_fraction"] is not None:
                    title += f", {row['valid_fraction']:.0%} valid"
            ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(label.replace(" (", "\n("), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
