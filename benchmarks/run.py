"""`make bench`: every benchmark, each writing its figures under benchmarks/out/."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    for script in ("heartbeat.py",):
        print(f"=== benchmarks/{script}", flush=True)
        sys.argv = [str(HERE / script)]
        runpy.run_path(str(HERE / script), run_name="__main__")
