"""Every tensor on the model's device: no module creates one on a hard-coded device, or on torch's
default device where the model's is meant.  On the CPU this is checked by running the model on
the CPU while torch's default device is ``meta``: a tensor made without a device then lands on
meta and the first operation mixing it with the model's tensors fails, as it would on a GPU.  The
source is also read for device names written into it.  Tests that need CUDA run when it is there."""

import ast

import pytest
import torch
from helpers import KERNEL_CASES, ROOT, assert_one_line, bdiff, make_network_process
from pyro.infer import SVI

from bdiff_pyro import checkpoints
from bdiff_pyro.config import load_config
from bdiff_pyro.diffusion.bound import elbo_replicates
from bdiff_pyro.distributed import resolve_device
from bdiff_pyro.evaluation import bound_report
from bdiff_pyro.programs.conditioning import impute
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.programs.sampling import ancestral_sample, strided_sample
from bdiff_pyro.train import AnalyticLoss

PACKAGE = ROOT / "bdiff_pyro"
HEARTBEAT_CONFIG = ROOT / "experiments/configs/heartbeat.yaml"
NETWORKS = ("mlp", "resmlp", "conv1d", "conv2d", "transformer")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def training_step_bound_and_samples(process):
    """What training, evaluation and sampling do with a model, as a function of x^0 to call
    later: one SVI step of the analytic loss (importance-sampled t), the bound's replicates and
    report, ancestral and strided samples.  The loss and optimiser are made now, as training
    makes them before its loop (the loss keeps its statistics of t on the CPU)."""
    import pyro
    import pyro.optim

    pyro.clear_param_store()
    loss = AnalyticLoss(process.T, importance=True)
    loss.seen[:] = True
    loss.mean_square[:] = 1.0
    svi = SVI(process, lambda x: forward_chain(process.kernel, x), pyro.optim.ClippedAdam({"lr": 1e-3}), loss=loss)

    def run(x0):
        svi.step(x0)
        outputs = [elbo_replicates(process.kernel, process.log_probs, x0, replicates=2),
                   ancestral_sample(process, 3, generator=0), process.sample(3, seed=0)]
        if process.parameterisation == "x0":
            outputs.append(strided_sample(process, 3, 2, generator=0))
        report = bound_report(process, x0, replicates=2)
        assert report["elbo_bits"] == report["elbo_bits"]  # a number, not NaN
        return outputs
    return run


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def test_no_module_creates_tensors_off_the_models_device(network, case):
    process = make_network_process(network, n=4, T=5, case=case)
    x0 = torch.randint(case[1], (6, 4)).to(torch.float64)
    run = training_step_bound_and_samples(process)
    with torch.device("meta"):  # a tensor made without a device goes here, away from the model's CPU
        outputs = run(x0)
    assert all(out.device.type == "cpu" for out in outputs)
    assert all(p.device.type == "cpu" for p in process.parameters())


@pytest.mark.parametrize("method", ["exact", "replace", "smc"])
@pytest.mark.parametrize("case", KERNEL_CASES[:3], ids=lambda case: f"{case[0]}-{case[1]}")
def test_imputation_creates_no_tensor_off_the_models_device(method, case):
    process = make_network_process("mlp", n=4, T=5, case=case)
    values = torch.tensor([[0., 1., 0., 1.], [1., 0., 1., 1.]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    with torch.device("meta"):
        result = impute(process, values, mask, method=method, num_particles=8, num_samples=2, seed=0)
    assert result.completions.device.type == result.marginals.device.type == "cpu"


def test_the_check_catches_a_time_code_made_on_the_default_device(monkeypatch):
    """The check itself: the MLP's time code made without a device (a GPU bug it once had) fails it."""
    import math

    from bdiff_pyro.networks import mlp

    def embedding_without_device(t, dim, device=None):
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
        angles = torch.as_tensor(t, dtype=torch.float64).unsqueeze(-1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    monkeypatch.setattr(mlp, "sinusoidal_embedding", embedding_without_device)
    run = training_step_bound_and_samples(make_network_process("mlp", n=4, T=5))
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        run(torch.zeros(6, 4, dtype=torch.float64))


# Where a device may be named in the source: the one function resolving the config's device
# and the process group's, checkpoints read onto the CPU (the model moves after), the CPU
# generator when no device is given, host-side integers, and the defaults of arguments.
DEVICE_NAMES_ALLOWED = {
    ("distributed.py", "resolve_device"), ("distributed.py", "collective_device"),
    ("checkpoints.py", "read_checkpoint"), ("checkpoints.py", "load_with_config"), ("checkpoints.py", "load"),
    ("programs/sampling.py", "as_generator"), ("programs/sampling.py", "stride_grid"),
}


def device_names_in_source():
    """(file, innermost function) for every place that puts a tensor on a named device: a
    device or map_location argument or default naming cpu or cuda, torch.device(...), .to(...)
    naming one, or .cuda()."""
    found = set()

    class Visitor(ast.NodeVisitor):
        def __init__(self, where):
            self.where, self.functions = where, ["<module>"]

        def visit_FunctionDef(self, node):
            self.functions.append(node.name)
            self.generic_visit(node)
            self.functions.pop()

        def generic_visit(self, node):
            if names_a_device(node):
                found.add((self.where, self.functions[-1]))
            super().generic_visit(node)

    for path in sorted(PACKAGE.rglob("*.py")):
        Visitor(str(path.relative_to(PACKAGE))).visit(ast.parse(path.read_text()))
    return found


def _device_constant(node):
    return any(isinstance(n, ast.Constant) and n.value in ("cpu", "cuda") or
               isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("cuda:")
               for n in ast.walk(node))


def names_a_device(node):
    if isinstance(node, ast.arguments):
        return any(_device_constant(default) for arg, default in
                   zip(node.args[::-1], node.defaults[::-1]) if arg.arg in ("device", "map_location"))
    if not isinstance(node, ast.Call):
        return False
    if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" and not node.args:
        return True
    if any(k.arg in ("device", "map_location") and _device_constant(k.value) for k in node.keywords):
        return True
    call = ast.unparse(node.func)
    return call in ("torch.device",) or call.endswith(".to") and any(_device_constant(a) for a in node.args)


def test_devices_are_named_only_where_allowed():
    """torch.device(...) is allowed only in the allow-list (it decides devices); everything else
    takes the device of a tensor or of the model."""
    assert device_names_in_source() == DEVICE_NAMES_ALLOWED


def test_the_source_check_finds_a_hard_coded_device(tmp_path):
    tree = ast.parse("x = torch.zeros(3, device='cuda')\ny = z.cuda()\nw = v.to('cpu')")
    assert sum(names_a_device(node) for node in ast.walk(tree)) == 3


def test_device_auto_is_a_valid_key_and_a_wrong_one_is_one_line(tmp_path):
    assert load_config(HEARTBEAT_CONFIG, ["device=auto"]).device == "auto"
    assert_one_line(bdiff("train", HEARTBEAT_CONFIG, "--out", tmp_path / "r", "--set", "device=gpu"), "device")


def test_a_checkpoint_loads_onto_the_device_asked_for(tmp_path, monkeypatch):
    """auto on a machine without a GPU is the CPU; cuda there is one line."""
    code, _, stderr = bdiff("train", HEARTBEAT_CONFIG, "--out", tmp_path / "r", "--quiet",
                            *[a for s in TINY for a in ("--set", s)])
    assert code == 0, stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert all(p.device.type == "cpu" for p in checkpoints.load(tmp_path / "r", device="auto").parameters())
    assert_one_line(bdiff("sample", tmp_path / "r", "-n", "2", "--device", "cuda"), "no CUDA device")


TINY = ["model.T=4", "model.hidden=[8]", "train.steps=4", "train.batch_size=16", "train.eval_every=4",
        "train.checkpoint_every=4", "evaluate.num_samples=10", "evaluate.replicates=2", "train.eval_samples=10",
        "evaluate.diagnose=false"]


@CUDA
def test_training_on_cuda_keeps_every_tensor_there_and_the_checkpoint_loads_on_the_cpu(tmp_path):
    code, _, stderr = bdiff("train", HEARTBEAT_CONFIG, "--out", tmp_path / "r", "--quiet",
                            *[a for s in [*TINY, "device=cuda"] for a in ("--set", s)])
    assert code == 0, stderr
    on_cpu = checkpoints.load(tmp_path / "r", device="cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    on_gpu = checkpoints.load(tmp_path / "r", device="cuda")
    assert on_gpu.kernel.log_posterior.device.type == "cuda"
    assert on_gpu.sample(4, seed=0).device.type == "cuda"
    code, _, stderr = bdiff("train", "--resume", tmp_path / "r", "--quiet", "--set", "train.steps=6")
    assert code == 0, stderr


@CUDA
@pytest.mark.parametrize("network", NETWORKS)
def test_every_network_runs_on_cuda(network):
    process = make_network_process(network, n=4, T=5).to(resolve_device("cuda"))
    x0 = torch.randint(2, (6, 4), device="cuda").to(torch.float64)
    assert all(out.device.type == "cuda" for out in training_step_bound_and_samples(process)(x0))
