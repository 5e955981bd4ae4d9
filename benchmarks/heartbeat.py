"""Core benchmark: train the heartbeat configs (default, paper, reference, and the paper and
reference settings with the default network) from scratch and measure each.

    python benchmarks/heartbeat.py [--configs a.yaml b.yaml ...] [--out DIR] [--trained]

For each config: wall time of training, the bound K on the five heartbeat patterns (bits/seq
with its standard error), the fraction of 10,000 samples that are exact heartbeats, the
histogram over the five shifts, and sampling throughput at the config's T (2000 samples,
median of 3); next to them, the oracle's K* and the fraction of 10,000 oracle samples that are
exact (what the best-bound reverse process gives at that T and schedule).
Writes results.json and results.md to --out (default benchmarks/out/heartbeat-<time>/).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import command_line, default_out, machine_description, start

from bdiff_pyro.config import load_config
from bdiff_pyro.data import load_dataset
from bdiff_pyro.evaluation import oracle_for_config
from bdiff_pyro.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["heartbeat.yaml", "heartbeat_paper.yaml", "heartbeat_reference.yaml", "heartbeat_paper_wide.yaml",
                   "heartbeat_reference_wide.yaml"]


def sampling_rate(run_dir, num=2000, repeats=3):
    import bdiff_pyro
    model = bdiff_pyro.load(run_dir)
    seconds = []
    for seed in range(repeats):
        start = time.perf_counter()
        model.sample(num, seed=seed)
        seconds.append(time.perf_counter() - start)
    return num / statistics.median(seconds)


def shift_check(run_dir, support, seeds=(1, 2), num=10000):
    """More draws of 10,000 samples (other seeds than the run's own seed 0): the shift
    fractions of each and the chi-square p-value of 'the shifts are uniform' on exact heartbeats."""
    from scipy.stats import chisquare

    import bdiff_pyro
    from bdiff_pyro.evaluation import pattern_histogram
    model = bdiff_pyro.load(run_dir)
    rows = []
    for seed in seeds:
        fractions = pattern_histogram(model.sample(num, seed=seed), support)
        counts = [round(f * num) for f in fractions]
        rows.append({"seed": seed, "fractions": fractions, "chi2_p": float(chisquare(counts).pvalue)})
    return rows


def run(config_path, out_dir, trained=False):
    """Train the config into out_dir/<config name> (or, with ``trained``, measure the run
    already there) and measure it."""
    config = load_config(config_path)
    run_dir = out_dir / Path(config_path).stem
    if trained:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        run_dir.mkdir(parents=True)
        metrics = train(config, run_dir, progress=True, log=print)
    samples = metrics["samples"]
    oracle = oracle_for_config(config, samples=10000)
    return {
        "config": str(Path(config_path).resolve().relative_to(ROOT)), "T": config.model.T,
        "schedule": config.model.schedule,
        "pi_1": config.model.pi_1, "parameterisation": config.model.parameterisation,
        "train_seconds": metrics["wall_time_s"], "steps": metrics["steps"],
        "K_bits": metrics["held_out"]["elbo_bits"], "K_se_bits": metrics["held_out"]["se_bits"],
        "paper_K_bits": metrics["held_out"]["K_bits"],
        "exact_fraction": samples["train"], "shift_fractions": samples["pattern_fractions"],
        "samples_per_second": sampling_rate(run_dir), "num_parameters": metrics["num_parameters"],
        "more_seeds": shift_check(run_dir, load_dataset(config.data).support),
        "oracle_K_bits": oracle["elbo_bits"], "oracle_exact_fraction": oracle["samples"]["in_support"],
    }


def markdown(results, machine, command):
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads). Command: `{command}`.", "",
             "| config | T | schedule | pi_1 | train time (s) | K (bits/seq) | oracle K* | exact heartbeats "
             "| oracle's exact | shifts (seed 0) | shifts (seeds 1, 2; chi-square p) | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        shifts = " ".join(f"{f:.3f}" for f in r["shift_fractions"])
        more = "; ".join(" ".join(f"{f:.3f}" for f in m["fractions"]) + f" (p {m['chi2_p']:.2f})"
                         for m in r["more_seeds"])
        lines.append(f"| {r['config']} | {r['T']} | {r['schedule']} | {r['pi_1']:g} | {r['train_seconds']:.0f} | "
                     f"{r['K_bits']:.4f} ± {r['K_se_bits']:.4f} | {r['oracle_K_bits']:.4f} | "
                     f"{r['exact_fraction']:.2%} | "
                     f"{r['oracle_exact_fraction']:.2%} | {shifts} | {more} | "
                     f"{r['samples_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+",
                        default=[str(ROOT / "experiments/configs" / c) for c in DEFAULT_CONFIGS])
    parser.add_argument("--out", type=Path, default=default_out("heartbeat"))
    parser.add_argument("--trained", action="store_true",
                        help="measure the runs already trained in --out (after an interrupted benchmark)")
    args = parser.parse_args(argv)
    if args.trained:
        if (args.out / "results.json").exists():
            parser.error(f"{args.out / 'results.json'} exists; refusing to overwrite earlier results")
        machine, command = machine_description(), command_line()
        print(f"machine: {machine}\ncommand: {command}", flush=True)
    else:
        machine, command = start(parser, args)
    results = [run(c, args.out, args.trained) for c in args.configs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "command": command, "results": results},
                                                      indent=2))
    table = markdown(results, machine, command)
    (args.out / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
