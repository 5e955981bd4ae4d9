"""The diffusion model on the UCI binary benchmarks (dna, mushrooms) beside the published table.

    python benchmarks/uci.py [--datasets dna mushrooms] [--samples 16] [--iw-rows 200] [--out DIR]
                             [--run dna=RUN_DIR ...] [--replicates 1]

For each data set: ``bdiff train experiments/configs/uci_<name>.yaml`` (or an existing run
with ``--run``), then, on the test split and with the weights the run selected on the
validation split (best.pt), in nats per example (lower is better):

- the negative ELBO, --replicates estimates per row (stratified over t);
- the negative importance-weighted bound with --samples forward-chain trajectories per row
  (``bdiff_pyro.evaluation.importance_weighted_report``), with its effective sample size, on a
  seeded uniform subsample of --iw-rows test rows (its cost is S times the ELBO's; the standard
  error over the subsample counts the subsampling).

Both are upper bounds on -log p(x), the published figures are exact negative log-likelihoods
(autoregressive models) or estimates of them.  Standard errors are over test rows (std / sqrt
(rows)), as experiments/uci/baselines.py reports them; wall times are those of training and
of each evaluation.  Writes results.json and results.md to --out (default
benchmarks/out/uci-<time>/), never overwriting one.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, default_out, machine_description  # noqa: E402

from bdiff_pyro.checkpoints import load_with_config  # noqa: E402
from bdiff_pyro.data import load_dataset  # noqa: E402
from bdiff_pyro.diffusion.bound import elbo_replicates  # noqa: E402
from bdiff_pyro.errors import UserError  # noqa: E402
from bdiff_pyro.evaluation import importance_weighted_report  # noqa: E402
from bdiff_pyro.train import resume_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: MADE paper (Germain et al. 2015), Table 2: test NLL in nats per example
PUBLISHED = {model: figures for model, figures in
             json.loads((ROOT / "experiments/uci/published.json").read_text())["nats_per_example"].items()
             if model != "independent bits"}
#: the same models fitted here on the same splits (experiments/uci/baselines.py; experiments/uci/README.md)
MEASURED_HERE = {
    "mixture of Bernoullis": {"dna": 98.25, "mushrooms": 14.10},
    "FVSBN": {"dna": 83.28, "mushrooms": 10.73},
    "MADE (one mask)": {"dna": 84.19, "mushrooms": 9.91},
    "MADE (mask ensemble)": {"dna": 83.27, "mushrooms": 9.85},
}


def train_run(name, out):
    """Train the shipped config; returns (run directory, training wall time in s)."""
    run_dir = out / name
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bdiff_pyro", "train", f"experiments/configs/uci_{name}.yaml",
                    "--out", str(run_dir), "--quiet"], cwd=ROOT, check=True)
    return run_dir, time.perf_counter() - started


def negative_elbo_nats(process, x0, replicates, seed=0):
    """(mean, standard error over rows, wall time): -ELBO per row, averaged over ``replicates``
    stratified estimates, in nats."""
    started = time.perf_counter()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        per_row = torch.cat([elbo_replicates(process.kernel, process.log_probs, block, replicates).mean(1)
                             for block in x0.split(256)]).double()
    return -float(per_row.mean()), float(per_row.std() / math.sqrt(len(per_row))), time.perf_counter() - started


def evaluate(name, run_dir, train_seconds, samples, replicates, iw_rows):
    config, process = load_with_config(run_dir / "best.pt")
    test = load_dataset(config.data).test
    metrics = json.loads((run_dir / "metrics.json").read_text())
    elbo, elbo_se, elbo_seconds = negative_elbo_nats(process, test, replicates)
    generator = torch.Generator().manual_seed(0)
    subsample = test[torch.randperm(len(test), generator=generator)[:iw_rows]]
    started = time.perf_counter()
    iw = importance_weighted_report(process, subsample, samples, seed=0)
    iw_seconds = time.perf_counter() - started
    return {"run_dir": str(run_dir), "selected_step": metrics.get("selected_step"), "steps": metrics["steps"],
            "train_seconds": train_seconds if train_seconds is not None else metrics["wall_time_s"],
            "test_rows": len(test), "neg_elbo_nats": elbo, "neg_elbo_se": elbo_se, "elbo_seconds": elbo_seconds,
            "replicates": replicates, "neg_iw_nats": -iw["nats"], "neg_iw_se": iw["se_nats"],
            "iw_mc_se": iw["mc_se_nats"], "iw_samples": samples, "iw_ess_mean": iw["ess_mean"],
            "iw_ess_min": iw["ess_min"], "iw_seconds": iw_seconds, "iw_rows": len(subsample)}


def markdown(results, machine, command):
    names = list(results)
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} thread(s)). Command: `{command}`.", "",
             "Test negative log-likelihood in nats per example (lower is better); ours are upper bounds "
             "(-ELBO, -importance-weighted bound), ± the standard error over test rows.", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, figures in PUBLISHED.items():
        lines.append(f"| {model} (published) | " + " | ".join(f"{figures[d]:.2f}" for d in names) + " |")
    for model, figures in MEASURED_HERE.items():
        lines.append(f"| {model} (fitted here, experiments/uci) | " + " | ".join(f"{figures[d]:.2f}" for d in names)
                     + " |")
    lines.append("| diffusion, -ELBO | " + " | ".join(
        f"{results[d]['neg_elbo_nats']:.2f} ± {results[d]['neg_elbo_se']:.2f}" for d in names) + " |")
    lines.append("| diffusion, -importance-weighted bound | " + " | ".join(
        f"{results[d]['neg_iw_nats']:.2f} ± {results[d]['neg_iw_se']:.2f} (S = {results[d]['iw_samples']}, "
        f"{results[d]['iw_rows']} rows, ESS mean {results[d]['iw_ess_mean']:.1f})" for d in names) + " |")
    lines += ["", "| data | steps (selected) | training (s) | -ELBO evaluation (s) | importance-weighted (s) |",
              "|---|---|---|---|---|"]
    for d in names:
        r = results[d]
        lines.append(f"| {d} | {r['steps']} ({r['selected_step']}) | {r['train_seconds']:.0f} | "
                     f"{r['elbo_seconds']:.0f} ({r['replicates']} replicates) | {r['iw_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["dna", "mushrooms"], choices=["dna", "mushrooms"])
    parser.add_argument("--samples", type=int, default=16, help="trajectories per row of the importance-weighted bound")
    parser.add_argument("--iw-rows", type=int, default=200,
                        help="test rows (seeded subsample) of that bound; at T = 1000 about 1-1.4 s a row")
    parser.add_argument("--replicates", type=int, default=1,
                        help="-ELBO estimates per test row (each visits all T steps, so one suffices)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="evaluate this trained run instead of training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or default_out("uci")
    if out.exists():
        parser.error(f"{out} exists; refusing to overwrite earlier results")
    torch.set_num_threads(args.threads)
    runs = dict(item.split("=", 1) for item in args.run)
    for name, run_dir in runs.items():  # before hours of evaluation: every run and its test split can be read
        if not (Path(run_dir) / "metrics.json").exists():
            parser.error(f"--run {name}={run_dir}: no metrics.json, the run has not finished "
                         f"(continue it with: {resume_command(run_dir)})")
        try:
            load_dataset(load_with_config(Path(run_dir) / "best.pt")[0].data)
        except UserError as error:
            parser.error(f"--run {name}={run_dir}: {error}")
    machine, command = machine_description(), command_line()
    print(f"machine: {machine}\ncommand: {command}", flush=True)
    out.mkdir(parents=True)
    results = {}
    for name in args.datasets:
        run_dir, seconds = (Path(runs[name]), None) if name in runs else train_run(name, out)
        results[name] = evaluate(name, run_dir, seconds, args.samples, args.replicates, args.iw_rows)
        print(json.dumps({name: results[name]}), flush=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "command": command, "results": results},
                                                 indent=2))
    text = markdown(results, machine, command)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
