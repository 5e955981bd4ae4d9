"""Sampling benchmark: throughput of the full sampler, and the strided sampler's validity
against the number of network evaluations.

    python benchmarks/sampling.py RUN_DIR [--out DIR]

RUN_DIR is a trained heartbeat run with the through-x^0 parameterisation (benchmarks/run.py
uses the heartbeat_t1000 run).  Throughput: samples per second of the full T-step sampler
(median of 3 runs of 10,000 samples, batched).  Strided: for each number of evaluations,
the fraction of 10,000 samples that are exact heartbeats and the shift histogram.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from machine import default_out, start

from bdiff_pyro.checkpoints import load_with_config
from bdiff_pyro.data import load_dataset
from bdiff_pyro.evaluation import pattern_histogram
from bdiff_pyro.util.stats import membership_fractions

ROOT = Path(__file__).resolve().parents[1]
STEPS = (5, 10, 20, 30, 50, 100, 200, 1000)


def timed_samples(model, num, seed, steps=None):
    start = time.perf_counter()
    samples = model.sample(num, seed=seed, steps=steps)
    return samples, time.perf_counter() - start


def bernoulli_floor(num, n, T):
    """Samples per second of drawing T slices of (num, n) Bernoulli variates and nothing else:
    the random-number cost every exact T-step sampler pays, whatever its network."""
    import torch
    probs = torch.full((num, n), 0.3)
    start = time.perf_counter()
    for _ in range(T):
        torch.bernoulli(probs)
    return num / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=default_out("sampling"))
    args = parser.parse_args(argv)
    machine, command = start(parser, args)
    config, model = load_with_config(args.run_dir)
    dataset = load_dataset(config.data)
    full = [timed_samples(model, args.num, seed)[1] for seed in range(3)]
    throughput = {"T": model.T, "num": args.num, "median_seconds": statistics.median(full),
                  "samples_per_second": args.num / statistics.median(full),
                  "per_second_at_T1000": args.num / statistics.median(full) * model.T / 1000,
                  "bernoulli_floor_per_second": statistics.median(bernoulli_floor(args.num, model.n, model.T)
                                                                  for _ in range(3))}
    print(f"full sampler: {throughput['samples_per_second']:.0f} samples/s at T = {model.T}; drawing the "
          f"Bernoulli variates alone: {throughput['bernoulli_floor_per_second']:.0f}/s", flush=True)
    strided = []
    for steps in [s for s in STEPS if s <= model.T]:
        samples, seconds = timed_samples(model, args.num, 0, steps)
        exact_fraction = membership_fractions(samples, dataset.train, dataset.val)["train"]
        strided.append({"evaluations": steps, "exact_fraction": exact_fraction,
                        "shift_fractions": pattern_histogram(samples, dataset.support), "seconds": seconds,
                        "samples_per_second": args.num / seconds})
        print(f"{steps:5d} evaluations: {strided[-1]['exact_fraction']:.2%} exact, {seconds:.2f} s", flush=True)
    args.out.mkdir(parents=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "command": command, "run": str(args.run_dir),
                                                        "throughput": throughput, "strided": strided}, indent=2))
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} "
             f"threads). Command: `{command}`.", "",
             f"Full sampler at T = {model.T}: {throughput['samples_per_second']:.0f} samples/s "
             f"(median of 3 x {args.num}); drawing its T x n Bernoulli variates alone, with no network: "
             f"{throughput['bernoulli_floor_per_second']:.0f} samples/s.", "",
             "| network evaluations | exact heartbeats | shifts | samples/s |", "|---|---|---|---|"]
    for row in strided:
        shifts = " ".join(f"{f:.3f}" for f in row["shift_fractions"])
        lines.append(f"| {row['evaluations']} | {row['exact_fraction']:.2%} | {shifts} "
                     f"| {row['samples_per_second']:.0f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogx([r["evaluations"] for r in strided], [100 * r["exact_fraction"] for r in strided], marker="o")
    ax.axhline(99, color="grey", ls="--", lw=1, label="99%")
    ax.set_xlabel("network evaluations (strided sampler)")
    ax.set_ylabel("exact heartbeats (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "strided.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
