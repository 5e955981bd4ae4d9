"""examples/own_kernel.py runs as documented, in a fresh interpreter (it registers a kernel in
the global registry, which must not leak into other tests): its own asserts check the analytic
bound against TraceEnum_ELBO on every sequence and that most samples are training sequences."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_the_own_kernel_example_runs_and_checks_itself(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "own_kernel.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("analytic ELBO = TraceEnum_ELBO on all 27 sequences"), lines
    share = int(lines[-1].split("%")[0])
    assert share > 50, lines[-1]
