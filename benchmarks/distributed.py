"""Training on 1 and 2 processes: steps per second of the training loop.

    python benchmarks/distributed.py [--configs a.yaml ...] [--steps N] [--repeats R] [--out DIR]

For each config, ``bdiff train`` alone (1 process) and ``bdiff train --nproc 2`` (torchrun, two
gloo processes on the CPU) with the config's global batch, one torch thread per process, the
runs interleaved (config by config, 1 then 2 processes, R times).  The figure is the training
loop's steps per second (the steps over the loop's wall time, metrics.json ``wall_time_s``,
which holds one small evaluation at the last step but not the start-up of the processes or the
final evaluation); the median of R runs, with the start-to-end time of the whole command beside it.
Writes results.json and results.md to --out (default benchmarks/out/distributed-<time>/).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import default_out, start

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["heartbeat.yaml", "digits.yaml"]
# the loop alone: one evaluation (at the last step, small), no checkpoints before it, a small final evaluation
QUICK = ["train.eval_samples=1", "train.eval_sequences=2", "evaluate.num_samples=10", "evaluate.replicates=2",
         "evaluate.max_rows=20000", "evaluate.diagnose=false", "threads=1"]


def train_once(config, nproc, steps, out_dir):
    """(steps per second of the loop, seconds of the whole command) of one run."""
    overrides = [*QUICK, f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    command = [sys.executable, "-m", "bdiff_pyro", "train", str(config), "--out", str(out_dir), "--quiet",
               *[a for item in overrides for a in ("--set", item)]] + (["--nproc", str(nproc)] if nproc > 1 else [])
    began = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    total = time.perf_counter() - began
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return metrics["steps"] / metrics["wall_time_s"], total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+",
                        default=[str(ROOT / "experiments/configs" / c) for c in DEFAULT_CONFIGS])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=default_out("distributed"))
    args = parser.parse_args()
    machine, command = start(parser, args)
    args.out.mkdir(parents=True)
    runs = []
    for repeat in range(args.repeats):
        for config in args.configs:
            for nproc in args.processes:
                name = f"{Path(config).stem}-p{nproc}-r{repeat}"
                before = os.getloadavg()[0]
                rate, total = train_once(config, nproc, args.steps, args.out / name)
                runs.append({"config": Path(config).stem, "processes": nproc, "repeat": repeat,
                             "steps_per_s": rate, "command_s": total, "load_before": before})
                print(f"{name}: {rate:.1f} steps/s (command {total:.1f} s; 1-minute load before {before:.2f})",
                      flush=True)
    table = []
    for config in args.configs:
        stem = Path(config).stem
        single = None
        for nproc in args.processes:
            mine = [r for r in runs if r["config"] == stem and r["processes"] == nproc]
            rate = statistics.median(r["steps_per_s"] for r in mine)
            single = rate if nproc == 1 else single
            table.append({"config": stem, "processes": nproc, "median_steps_per_s": rate,
                          "rates": [r["steps_per_s"] for r in mine],
                          "median_command_s": statistics.median(r["command_s"] for r in mine),
                          "speed_up": rate / single if single else None})
    results = {"machine": machine, "command": command, "steps": args.steps, "repeats": args.repeats,
               "table": table, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; one torch thread per "
             f"process; 1-minute load average before the runs {min(r['load_before'] for r in runs):.2f} to "
             f"{max(r['load_before'] for r in runs):.2f} (the machine is shared).",
             f"Command: `{command}`", "",
             f"{args.steps} steps of each config's global batch, median of {args.repeats} interleaved runs.", "",
             "| config | processes | steps/s (median) | runs | speed-up | whole command (s, median) |",
             "|---|---|---|---|---|---|"]
    for row in table:
        speed_up = f"{row['speed_up']:.2f}x" if row["speed_up"] else "-"
        lines.append(f"| {row['config']} | {row['processes']} | {row['median_steps_per_s']:.1f} | "
                     f"{', '.join(f'{r:.1f}' for r in row['rates'])} | {speed_up} | {row['median_command_s']:.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
