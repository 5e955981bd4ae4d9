"""The "Writing your own kernel" example of README.md runs as documented: its python
code blocks, joined in order, are executed in a fresh interpreter (the example registers a
kernel in the global KERNELS table, which must not leak into other tests).  The example
asserts its own exact cross-check (analytic bound == TraceEnum_ELBO to 1e-8)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "README.md"


def python_blocks(text):
    """The python blocks of the section "Writing your own kernel" (up to the next section)."""
    section = text[text.index("### Writing your own kernel"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def test_the_doc_has_a_complete_kernel_example():
    code = "\n".join(python_blocks(DOC.read_text()))
    assert re.search(r"class \w+\(DiscreteKernel\)", code)
    for needed in ("def step_matrices", "def stationary", "KERNELS[", "SVI(", "AnalyticLoss",
                   "elbo_exact", "enumerated_elbo", "assert torch.allclose", ".sample("):
        assert needed in code, needed


def test_the_documented_example_runs(tmp_path):
    code = "\n".join(python_blocks(DOC.read_text()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert "of the samples are 012 or 210" in done.stdout
