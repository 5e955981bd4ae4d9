"""Helpers shared by the tests (imported as ``from helpers import ...``; conftest.py keeps only
fixtures): random reverse processes, the list of kernels every kernel contract test runs over,
and the command line run in this process or in a fresh interpreter."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from bdiff_pyro.diffusion.kernels import BernoulliKernel, make_kernel
from bdiff_pyro.diffusion.schedules import make_beta_tilde
from bdiff_pyro.networks.mlp import MLP
from bdiff_pyro.programs.reverse import ReverseProcess

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# Random reverse processes

# Every kernel, one line each: (name, data states K, pi_1).  A new kernel is tested by adding a
# line here: tests/diffusion/test_kernel_contract.py and the exact cross-checks run over it.
KERNEL_CASES = [
    ("bernoulli", 2, 0.5),
    ("bernoulli", 2, 0.2),
    ("uniform", 3, None),
    ("absorbing", 2, None),
    ("gaussian", 3, None),
]


def make_process(n=2, T=3, pi_1=0.5, schedule="cosine", parameterisation="x0", seed=0, hidden=(16, 16),
                 inputs="state", film=False, add_own_evidence=True):
    """A randomly initialised float64 bit-flip reverse process (weights scaled up so it is far
    from trivial)."""
    torch.manual_seed(seed)
    kernel = BernoulliKernel(make_beta_tilde(schedule, T), pi_1=pi_1)
    return random_process(kernel, n, parameterisation, hidden, inputs, film, add_own_evidence)


def random_process(kernel, n, parameterisation, hidden, inputs, film=False, add_own_evidence=True):
    """A float64 reverse process on ``kernel`` with a random network, weights scaled by 3."""
    net = MLP(n, kernel.num_states, hidden=hidden, activation="tanh", time_embedding=8,
              num_features=ReverseProcess.num_features(kernel, inputs), film=film)
    if film:  # FiLM layers start at zero; make them count
        with torch.no_grad():
            for layer in net.film:
                layer.weight.normal_(0, 0.3)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return ReverseProcess(kernel, net, parameterisation, inputs, add_own_evidence).double()


def make_case_kernel(case, T=3, schedule="cosine"):
    """The kernel of one KERNEL_CASES line."""
    name, num_states, pi_1 = case
    return make_kernel(name, make_beta_tilde(schedule, T), num_states, pi_1 if pi_1 is not None else 0.5)


def make_kernel_process(case, n=2, T=3, schedule="cosine", parameterisation="x0", seed=0, hidden=(16, 16),
                        inputs="state", add_own_evidence=True):
    """A random float64 reverse process for one of KERNEL_CASES."""
    torch.manual_seed(seed)
    kernel = make_case_kernel(case, T, schedule)
    return random_process(kernel, n, parameterisation, hidden, inputs, add_own_evidence=add_own_evidence)


# ---------------------------------------------------------------------------------------
# The command line

class CliResult(NamedTuple):
    """Exit status and output of one ``bdiff`` call (unpacks as a tuple too)."""
    returncode: int
    stdout: str
    stderr: str


def sets(*overrides):
    """``--set`` flags for each ``KEY=VALUE``."""
    return [arg for item in overrides for arg in ("--set", item)]


def bdiff(*args) -> CliResult:
    """``bdiff ARGS`` in this process (argparse's exits included): no interpreter start-up."""
    from bdiff_pyro.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit:  # argparse
            code = exit.code
    return CliResult(code, out.getvalue(), err.getvalue())


def bdiff_subprocess(*args, cwd=None, timeout=300) -> CliResult:
    """``python -m bdiff_pyro ARGS`` in a fresh interpreter, from the repository root by default."""
    done = subprocess.run([sys.executable, "-m", "bdiff_pyro", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


def assert_one_line(result, *fragments, status=2) -> str:
    """Exit ``status`` and one line saying what went wrong, holding every fragment, and no
    traceback (one-line warnings, e.g. about config keys the data's kind ignores, may come
    before it).  Returns the line."""
    code, _, stderr = result
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("bdiff: warning:")]
    assert code == status, (code, stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("bdiff: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tiny_network_options(name, n):
    """Small options for every registered network (conv2d lays n positions out as a 2 x n/2
    or 1 x n image)."""
    return dict(hidden=(8, 8), activation="tanh", time_embedding=8, channels=8, blocks=1, kernel_size=3,
                padding="circular", heads=2, position_code="learned",
                image_shape=(2, n // 2) if name == "conv2d" and n % 2 == 0 else (1, n))


def make_network_process(name, n=2, T=3, case=("bernoulli", 2, 0.5), schedule="cosine", parameterisation="x0",
                         inputs="state", film=False, seed=0, **options):
    """A random float64 reverse process with the registered network ``name`` (FiLM layers
    given random weights, every weight doubled so that the output varies strongly with x^t)."""
    from bdiff_pyro.diffusion.kernels import make_kernel
    from bdiff_pyro.networks import build_network
    kind, num_states, pi_1 = case
    torch.manual_seed(seed)
    kernel = make_kernel(kind, make_beta_tilde(schedule, T), num_states, pi_1 if pi_1 is not None else 0.5)
    net = build_network(name, n, kernel.num_states, ReverseProcess.num_features(kernel, inputs),
                        {**tiny_network_options(name, n), "film": film, **options})
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():  # FiLM starts at zero
                p.normal_(0, 0.3)
            p.mul_(2.0)
    return ReverseProcess(kernel, net, parameterisation, inputs).double()


class StopAfter:
    """Stands in for the Ctrl-C flag of training: reports an interrupt at the 15th check (one
    check per step)."""

    def __init__(self):
        self.checks = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def raised(self):
        self.checks += 1
        return self.checks >= 15
