"""`make bench`: every benchmark in turn, each writing its figures under benchmarks/out/.

Long: about an hour and a half on a 2-core CPU.  Run one piece alone with its own script.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
T1000_OUT = ROOT / "benchmarks" / "out" / "heartbeat_t1000"
H64_OUT = ROOT / "benchmarks" / "out" / "heartbeat64"

STEPS = [
    # the paper's, the reference repository's and the default heartbeat configs
    [PY, "benchmarks/heartbeat.py"],
    # cosine schedule, T = 1000 (trained once, then sampled), and n = 64
    [PY, "benchmarks/heartbeat.py", "--configs", "experiments/configs/heartbeat_t1000.yaml", "--out", str(T1000_OUT)],
    [PY, "-m", "bdiff_pyro", "oracle", "experiments/configs/heartbeat_t1000.yaml"],
    [PY, "benchmarks/sampling.py", str(T1000_OUT / "heartbeat_t1000")],
    [PY, "-m", "bdiff_pyro", "train", "experiments/configs/heartbeat64.yaml", "--out", str(H64_OUT), "--quiet"],
    # the studies under experiments/ (each README says what it measures)
    [PY, "experiments/schedules/schedules.py"],
    [PY, "experiments/digits/digits.py"],
    [PY, "experiments/kernels/kernels.py"],
    [PY, "experiments/crosscheck/compare.py"],
    # the UCI binary benchmarks (dna, mushrooms) beside the published table: about 30 minutes
    [PY, "benchmarks/uci.py"],
    # steps per second on 1 and 2 processes, default and digits configs: about 10 minutes
    [PY, "benchmarks/distributed.py"],
    # benchmarks/results.json and results.md: the newest result of each piece
    [PY, "benchmarks/collect.py"],
]

if __name__ == "__main__":
    for out in (T1000_OUT, H64_OUT):
        if out.exists():
            sys.exit(f"{out} exists; move it away first (results are never overwritten)")
    for command in STEPS:
        print("=== " + " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
