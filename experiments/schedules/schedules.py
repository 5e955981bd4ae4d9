"""The oracle bound K* against T for several noise schedules, on heartbeat data.

    python experiments/schedules/schedules.py [OUT_DIR] [--T 50 100 ...] [--replicates 16] [--target-gap 0.02]

Writes to OUT_DIR (default runs/schedule_study-<timestamp>; an existing non-empty directory is
refused): study.csv (one row per schedule and T), study.md (the tables), gap.png (the gap to
-log2 period against T, log-log), search.json (the T each schedule needs for the target gap).
K* is exact (bdiff_pyro.diffusion.oracle.oracle_elbo_exact); the Monte Carlo column is an independent check.
About three minutes on two busy cores with the defaults.
"""

import argparse
import json
import sys
import time

import torch
from schedule_study import CSV_FIELDS, DEFAULT_SPECS, DEFAULT_TS, T_for_gap, markdown_tables, plot_gaps, run_study
from tqdm import tqdm

from bdiff_pyro.data.datasets import heartbeat
from bdiff_pyro.diffusion.oracle import data_entropy_bits
from bdiff_pyro.errors import UserError
from bdiff_pyro.util.files import fresh_directory, write_csv


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="output directory (default runs/schedule_study-<timestamp>)")
    parser.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_TS), help="numbers of steps")
    parser.add_argument("--n", type=int, default=20, help="heartbeat sequence length")
    parser.add_argument("--period", type=int, default=5, help="heartbeat period")
    parser.add_argument("--replicates", type=int, default=16,
                        help="Monte Carlo replicates per pattern for the check column (0: no check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-gap", type=float, default=0.02,
                        help="also bracket the smallest T with gap <= this many bits (0: skip)")
    parser.add_argument("--max-T", type=int, default=16000, help="largest T the search may evaluate")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative width of the T bracket")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine: small reductions "
                             "stall on busy OpenMP threads)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replicates == 1:
        raise UserError("--replicates must be 0 (no check) or at least 2")
    out = fresh_directory("schedule_study", args.out)
    patterns = heartbeat(args.n, args.period).double()
    log_likelihood = -data_entropy_bits(torch.ones(len(patterns)))
    print(f"output directory: {out}")
    start = time.time()
    with tqdm(total=len(DEFAULT_SPECS) * sum(args.T), unit="step", desc="grid") as bar:
        rows = run_study(patterns, None, DEFAULT_SPECS, args.T, args.replicates, args.seed, progress=bar.update)
    write_csv(out / "study.csv", rows, CSV_FIELDS)
    searches = []
    if args.target_gap > 0:
        with tqdm(unit="step", desc=f"T for gap {args.target_gap}") as bar:
            for spec in DEFAULT_SPECS:
                searches.append(T_for_gap(spec, patterns, None, args.target_gap, known=rows, max_T=args.max_T,
                                          tolerance=args.tolerance, progress=bar.update))
        (out / "search.json").write_text(json.dumps(searches, indent=2))
    header = (f"# Oracle bound against T: heartbeat n = {args.n}, period {args.period}\n\n"
              f"Produced by `python experiments/schedules/schedules.py` ({time.time() - start:.0f} s).\n\n")
    table = markdown_tables(rows, searches, log_likelihood)
    (out / "study.md").write_text(header + table)
    plot_gaps(rows, out / "gap.png", target=args.target_gap or None,
              title=f"Oracle gap to -log2 {args.period}, heartbeat n = {args.n}")
    print(table)
    print(f"wrote {out}/study.csv, study.md, gap.png" + (", search.json" if searches else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"schedule_study: error: {error}", file=sys.stderr)
        sys.exit(2)
