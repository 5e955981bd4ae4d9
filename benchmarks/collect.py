"""Collect the newest result of every benchmark under benchmarks/out/ into one file pair:
benchmarks/results.json and benchmarks/results.md (the tables the README quotes).

    python benchmarks/collect.py        (the last step of `make bench`)

Each piece keeps its own machine and command lines; a piece that has not been run is listed
as missing rather than guessed.
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
#: pages written by hand, each a table of figures against their targets with its machine and commands
HAND_WRITTEN = ("summary.md", "networks.md")
PIECES = [  # (name, directory pattern under benchmarks/out, what it is)
    ("heartbeat", "heartbeat-*", "Default, paper and reference configs (and the _wide variants)"),
    ("heartbeat_t1000", "heartbeat_t1000", "Cosine, T = 1000"),
    ("sampling", "sampling-*", "Sampling speed against the floor and the reference loop; strided sampling "
                               "of the T = 1000 run"),
    ("heartbeat64", "heartbeat64*", "n = 64, period 32"),
    ("digits", "digits-*", "8x8 digits against exact baselines"),
    ("uci", "uci-*", "UCI binary benchmarks (dna, mushrooms) beside the published table"),
    ("distributed", "distributed-*", "Training on 1 and 2 processes (torchrun, gloo)"),
]


def finished(run_dir):
    """A piece's directory holds a result once it has results.md (a benchmark) or metrics.json
    (a training run); an interrupted run has neither."""
    return run_dir.is_dir() and ((run_dir / "results.md").exists() or (run_dir / "metrics.json").exists())


def newest(pattern):
    candidates = sorted((p for p in OUT.glob(pattern) if finished(p)), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def heartbeat64_markdown(run_dir):
    """A plain training run (bdiff train) has metrics.json rather than results.md."""
    m = json.loads((run_dir / "metrics.json").read_text())
    fractions = m["samples"]["pattern_fractions"]
    return (f"`bdiff train experiments/configs/heartbeat64.yaml --out {run_dir.relative_to(OUT.parent.parent)}`: "
            f"K = {m['held_out']['elbo_bits']:.4f} ± {m['held_out']['se_bits']:.4f} bits/seq, "
            f"{m['samples']['train']:.2%} of {m['samples']['num']} samples exact heartbeats "
            f"(shift fractions {min(fractions):.3f}-{max(fractions):.3f}), {m['wall_time_s']:.0f} s of training, "
            f"{m['steps']} steps.\n"), m


def main():
    merged, sections = {}, ["# Benchmark results", "", "Collected by `python benchmarks/collect.py` from "
                            "`benchmarks/out/`; single runs unless a table says median.", ""]
    for written_by_hand in HAND_WRITTEN:
        page = Path(__file__).resolve().parent / written_by_hand
        if page.exists():
            sections += [page.read_text(), ""]
    for name, pattern, title in PIECES:
        run_dir = newest(pattern)
        sections += [f"## {title}", ""]
        if run_dir is None:
            sections += ["(not run)", ""]
            merged[name] = None
            continue
        if (run_dir / "results.md").exists():
            sections += [(run_dir / "results.md").read_text(), ""]
            merged[name] = json.loads((run_dir / "results.json").read_text())
        else:
            text, merged[name] = heartbeat64_markdown(run_dir)
            sections += [text, ""]
    here = Path(__file__).resolve().parent
    (here / "results.json").write_text(json.dumps(merged, indent=2))
    (here / "results.md").write_text("\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
