"""The kernel study: every applicable kernel trained with the same settings on the binary
heartbeat and on the 8x8 digits (binary and 4 grey levels); one table, one figure.

    python experiments/kernels/kernels.py [OUT_DIR] [--datasets heartbeat digits2 digits4]
                                  [--kernels bernoulli uniform absorbing gaussian]
                                  [--set KEY=VALUE ...] [--replicates 8] [--include-duplicates]

Writes to OUT_DIR (default runs/kernels-<timestamp>; an existing non-empty directory is
refused): results.json (every number, the machine and the command), results.md (the table),
samples.png (samples side by side), and one run directory per cell (checkpoint, history,
plots), each trainable alone as `bdiff train experiments/kernels/kernel_<data>.yaml --set ...`.
The uniform kernel at K = 2 is the bernoulli kernel with pi_1 = 1/2 (the same matrices), so
it is reported as that run unless --include-duplicates.  About 20 minutes on two busy cores.
See docs/kernels.md.
"""

import argparse
import importlib.util
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from kernel_study import (
    DATASET_NAMES,
    KERNEL_ORDER,
    figure_examples,
    markdown_table,
    paired_differences,
    plan,
    plot_samples,
    reference,
    run_cell,
    score_set,
    winners,
)

from bdiff_pyro.errors import UserError
from bdiff_pyro.util.files import fresh_directory

HERE = Path(__file__).resolve().parent


def _benchmark_machine():
    """benchmarks/machine.py (what every measurement prints first), imported by its path."""
    spec = importlib.util.spec_from_file_location("machine", HERE.parents[1] / "benchmarks" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = HERE  # kernel_heartbeat.yaml, kernel_digits.yaml


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="output directory (default runs/kernels-<timestamp>)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES), choices=DATASET_NAMES)
    parser.add_argument("--kernels", nargs="+", default=list(KERNEL_ORDER), choices=KERNEL_ORDER,
                        help="kernels to run (each only where it applies: bernoulli needs K = 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every cell, e.g. --set train.steps=500")
    parser.add_argument("--replicates", type=int, default=8,
                        help="independent bound estimates per held-out sequence (for the standard errors)")
    parser.add_argument("--figure-samples", type=int, default=16, help="samples per panel of samples.png")
    parser.add_argument("--include-duplicates", action="store_true",
                        help="also train uniform at K = 2 (identical to bernoulli with pi_1 = 1/2)")
    parser.add_argument("--configs", default=str(CONFIGS), help="directory of kernel_*.yaml")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small tensors on a shared CPU)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cells = plan(args.datasets, args.kernels, args.configs, args.set, args.include_duplicates)
    out = fresh_directory("kernels", args.out)
    machine_module = _benchmark_machine()
    machine = machine_module.machine_description()
    command = machine_module.command_line()
    print(f"machine: {machine}")
    print(f"command: {command}")
    print(f"output directory: {out}")
    print(f"{sum(twin is None for *_, twin in cells)} runs: "
          + ", ".join(f"{spec.name}/{kernel}" for spec, kernel, _, twin in cells if twin is None))

    rows, references, examples, settings = [], {}, {}, {}
    trained = {}
    for spec, kernel, config, twin in cells:
        if spec.name not in references:
            references[spec.name] = reference(config)
            examples[spec.name] = figure_examples(score_set(config)[0], args.figure_samples)
            settings[spec.name] = {**config.to_dict(), "model": {**config.to_dict()["model"], "kernel": "(varies)"}}
        if twin is not None:
            row = {**trained[(spec.name, twin)], "kernel": kernel, "same_as": twin}
        else:
            run_dir = out / f"{spec.name}-{kernel}"
            run_dir.mkdir()
            print(f"\n== {spec.label}: {kernel} ({run_dir})", flush=True)
            row = run_cell(config, run_dir, args.replicates, args.figure_samples, progress=not args.quiet,
                           log=lambda message: print(f"  {message}"))
            trained[(spec.name, kernel)] = row
            valid = "" if row["valid_fraction"] is None else f", {row['valid_fraction']:.1%} valid samples"
            print(f"   -ELBO {row['nll_bits']:.3f} ± {row['mc_se_bits']:.3f} bits/seq on {row['scored_on']}"
                  f"{valid}; trained in {row['train_time_s']:.0f} s", flush=True)
        rows.append({"dataset": spec.name, "label": spec.label, **row})
    paired_differences(rows)
    total = time.perf_counter() - started

    table = markdown_table(rows, references)
    summary = winners(rows)
    header = (f"# Kernels compared: −ELBO on held-out data (bits per sequence, lower is better)\n\n"
              f"Produced by `{command}` in {total / 60:.1f} min on {machine['cpu']} "
              f"({machine['cores']} cores, {machine['torch_threads']} torch thread(s)), "
              f"{datetime.now():%Y-%m-%d}.\n\n")
    notes = ("\nHeld-out data: the digits' test split; for heartbeat the five patterns, which are the whole data "
             "distribution (so there is no sampling error over data, only Monte Carlo error).  Δ: this kernel minus "
             "the best of its data set, paired over the same held-out sequences.  Prior KL: KL(q(x^T | x^0) || pi) "
             "in bits, the part of the bound that no network can remove.  Valid samples: exact heartbeats among "
             "the samples (undefined for digits).\n\n" + "".join(f"- {s}\n" for s in summary))
    (out / "results.md").write_text(header + table + notes)
    results = {
        "command": command, "machine": machine, "total_time_s": total, "replicates": args.replicates,
        "overrides": args.set, "settings": settings,
        "references": {name: {"label": label, "bits": bits, "se_bits": se}
                       for name, (label, bits, se) in references.items()},
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_samples(rows, examples, out / "samples.png")
    print("\n" + table + notes)
    print(f"total {total / 60:.1f} min; wrote {out}/results.json, results.md, samples.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"kernels: error: {error}", file=sys.stderr)
        sys.exit(2)
