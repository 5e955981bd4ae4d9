"""Training fails safely: divergence, resume, concurrent and failed starts, memory, the final
evaluation, checkpoints that could run code.  Every CLI failure is one line on stderr with no
traceback and leaves no stray run directory."""

import errno
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import StopAfter, assert_one_line, bdiff, make_process, sets

import bdiff_pyro
from bdiff_pyro import checkpoints as checkpoints_module
from bdiff_pyro import diagnostics as diagnostics_module
from bdiff_pyro import memory as memory_module
from bdiff_pyro import train as train_module
from bdiff_pyro.config import load_config
from bdiff_pyro.diffusion.bound import elbo_exact
from bdiff_pyro.evaluation import bound_report
from bdiff_pyro.util.files import write_atomically
from bdiff_pyro.util.stats import LN2

pytestmark = pytest.mark.slow  # end-to-end training runs through the command line

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = ROOT / "experiments/configs/heartbeat.yaml"
TINY = ["model.T=6", "model.hidden=[16]", "train.steps=20", "train.eval_every=10", "train.checkpoint_every=10",
        "evaluate.num_samples=50", "evaluate.replicates=2", "train.eval_samples=20", "evaluate.diagnose=false"]



@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory, so that a stray runs/ shows."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def no_run_dirs(root):
    return not (root / "runs").exists() or not any((root / "runs").iterdir())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code, _, stderr = bdiff("train", HEARTBEAT, "--out", out, "--quiet", *sets(*TINY))
    assert code == 0, stderr
    return out


# ---------------------------------------------------------------------------------------
# Divergence


def test_a_blown_up_update_is_never_checkpointed(in_tmp):
    """lr = 3e38: the first update gives finite weights near 3e38 whose loss is NaN; no
    checkpoint may hold them, and the message says that none was written."""
    config = in_tmp / "T.yaml"
    config.write_text("data: {kind: heartbeat}\nmodel: {T: 6, hidden: [16]}\ntrain: {steps: 40}\n"
                      "evaluate: {diagnose: false}\n")
    for eval_every in (1000, 1):
        out = in_tmp / f"RUN{eval_every}"
        result = bdiff("train", config, "--quiet", "--out", out, *sets(
            "model.activation=relu", "train.lr=3e38", "train.lr_final=3e38", "train.checkpoint_every=1",
            f"train.eval_every={eval_every}"))
        line = assert_one_line(result, "training diverged at step", status=1)
        assert "no checkpoint was written" in line and not out.exists(), line


def test_divergence_keeps_the_last_sound_checkpoint_and_names_its_step(tmp_path, monkeypatch):
    """An update that leaves an infinite weight at a checkpoint step (15) stops the run there;
    the checkpoint on disk is still the one of step 10, with finite weights."""
    real_step = train_module.SVI.step
    calls = {"n": 0}

    def step_then_blow_up(self, *args):
        calls["n"] += 1
        loss = real_step(self, *args)
        if calls["n"] == 15:  # the update of step 15 leaves an infinite weight
            with torch.no_grad():
                self.model.net.out.weight[0, 0] = math.inf
        return loss

    monkeypatch.setattr(train_module.SVI, "step", step_then_blow_up)
    config = load_config(HEARTBEAT, TINY + ["train.checkpoint_every=5", "train.steps=30"])
    with pytest.raises(train_module.TrainingStopped, match="diverged at step 15") as stop:
        train_module.train(config, tmp_path, progress=False, log=lambda *_: None)
    assert "from step 10" in str(stop.value)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["state"]["step"] == 10
    assert all(torch.isfinite(v).all() for v in payload["model_state"].values())


@pytest.mark.parametrize("value", [math.inf, 3e38])
def test_sample_and_evaluate_refuse_a_non_finite_model(tiny_run, tmp_path, value):
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    payload["config"]["model"]["activation"] = "relu"
    signs = torch.Generator().manual_seed(0)  # weights of both signs, as an update of lr = 3e38 leaves them
    payload["model_state"] = {k: value * (2 * torch.randint(0, 2, v.shape, generator=signs) - 1).to(v)
                              if k.startswith("net.") else v for k, v in payload["model_state"].items()}
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert_one_line(bdiff("sample", tmp_path, "-n", 3), "diverged")
    assert_one_line(bdiff("evaluate", tmp_path, ROOT / "experiments/data/heartbeat_text/val.txt"), "diverged")


# ---------------------------------------------------------------------------------------
# Resume


def test_resume_refuses_a_changed_optimiser_setting_and_records_nothing(tiny_run):
    before = (tiny_run / "config.yaml").read_text()
    assert_one_line(bdiff("train", HEARTBEAT, "--resume", tiny_run, *sets(*TINY, "train.steps=30", "train.lr=0.5")),
                    "train.lr")
    assert_one_line(bdiff("train", "--resume", tiny_run, *sets("train.steps=30", "train.clip_norm=1")),
                    "train.clip_norm")
    assert_one_line(bdiff("train", "--resume", tiny_run, *sets("train.steps=30", "train.decoupled_weight_decay=0.1")),
                    "train.decoupled_weight_decay")
    assert (tiny_run / "config.yaml").read_text() == before


def test_resume_refuses_out(tiny_run, tmp_path):
    assert_one_line(bdiff("train", "--resume", tiny_run, "--out", tmp_path / "elsewhere"), "--out")
    assert not (tmp_path / "elsewhere").exists()


def test_resume_with_more_steps_ends_at_lr_final(tmp_path):
    """lr 1e-2 -> lr_final 1e-3 over 10 steps, then resumed to 20 steps: the rate decays from
    where it is to lr_final at step 20 (the old decay would end at 1e-4)."""
    out = tmp_path / "run"
    common = [*TINY, "train.lr=1e-2", "train.lr_final=1e-3"]
    assert bdiff("train", HEARTBEAT, "--out", out, "--quiet", *sets(*common, "train.steps=10"))[0] == 0
    code, _, stderr = bdiff("train", "--resume", out, "--quiet", *sets("train.steps=20"))
    assert code == 0, stderr
    rows = (out / "history.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert int(last[header.index("step")]) == 20
    assert float(last[header.index("lr")]) == pytest.approx(1e-3, rel=1e-9)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 20




def test_interrupt_prints_the_exact_resume_command_which_needs_no_config(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_InterruptFlag", StopAfter)
        line = assert_one_line(bdiff("train", HEARTBEAT, "--out", out, "--quiet", *sets(*TINY, "train.steps=30")),
                               "interrupted at step 15", status=130)
    command = line.split("continue with: ")[1]
    assert command == f"bdiff train --resume {out}"
    code, stdout, stderr = bdiff(*command.split()[1:], "--quiet")  # the --set overrides are in config.yaml
    assert code == 0, stderr
    assert f"resuming {out} at step 15" in stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 30


# ---------------------------------------------------------------------------------------
# Claiming the run directory; failed starts


def test_two_runs_with_the_same_out_never_share_it(tmp_path, monkeypatch):
    """A second run started while the first is loading its data: exactly one of them gets the
    directory, and config.yaml and the checkpoint come from the same run."""
    out = tmp_path / "D"
    real_load = train_module.load_dataset
    inner = {}

    def load_and_race(data_config):
        if not inner:
            inner["started"] = True
            inner["result"] = bdiff("train", HEARTBEAT, "--out", out, "--quiet", "--seed", 2, *sets(*TINY))
        return real_load(data_config)

    monkeypatch.setattr(train_module, "load_dataset", load_and_race)
    outer = bdiff("train", HEARTBEAT, "--out", out, "--quiet", "--seed", 1, *sets(*TINY))
    codes = sorted([outer[0], inner["result"][0]])
    assert codes == [0, 2], (outer, inner["result"])
    assert_one_line(outer if outer[0] == 2 else inner["result"], str(out))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["seed"] == checkpoint["config"]["seed"]


def _write_lines(path, rows):
    path.write_text("".join(row + "\n" for row in rows))
    return path


FAILED_STARTS = {
    "missing data file": (["data.kind=text", "data.train=missing.txt", "data.val=missing.txt"], "missing.txt"),
    "CUDA without a GPU": (["device=cuda"], "cuda"),
    "length mismatch": (["data.kind=text", "data.train=train.txt", "data.val=short.txt"], "short.txt"),
    "bad seed": (["seed=-1"], "seed"),
    "T too large for memory": (["model.T=1000000000"], "model.T = 1000000000"),
}


@pytest.mark.parametrize("case", list(FAILED_STARTS))
@pytest.mark.parametrize("out", [True, False], ids=["--out", "runs/"])
def test_a_failed_start_leaves_no_run_directory(in_tmp, case, out):
    if case == "CUDA without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _write_lines(in_tmp / "train.txt", ["0101", "1010"])
    _write_lines(in_tmp / "short.txt", ["010", "101"])
    config = in_tmp / "c.yaml"
    config.write_text(HEARTBEAT.read_text())
    overrides, fragment = FAILED_STARTS[case]
    where = ["--out", in_tmp / "run"] if out else []
    assert_one_line(bdiff("train", config, "--quiet", *where, *sets(*TINY, *overrides)), fragment)
    assert not (in_tmp / "run").exists() and no_run_dirs(in_tmp)


def test_bad_seed_flag_is_one_line(in_tmp):
    assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--seed", 2**32, *sets(*TINY)), "--seed")
    assert no_run_dirs(in_tmp)


def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _on_a_full_disk(real_write_atomically):
    """The atomic write on a disk with no space left: part of the file reaches the temporary
    file, then the write fails."""
    def write_atomically(path, write):
        def fill_then_fail(temporary):
            temporary.write_bytes(b"partial")
            _raise_enospc()

        return real_write_atomically(path, fill_then_fail)

    return write_atomically


def test_out_of_memory_at_the_first_step_leaves_no_run_directory(in_tmp, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train_module.SVI, "step", no_memory)
    assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--out", in_tmp / "run", *sets(*TINY)), "out of memory")
    assert not (in_tmp / "run").exists()


def test_disk_full_at_the_first_checkpoint(in_tmp, monkeypatch):
    monkeypatch.setattr(checkpoints_module, "write_atomically", _on_a_full_disk(write_atomically))
    assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--out", in_tmp / "run", *sets(*TINY)),
             "No space left on device")
    assert not (in_tmp / "run").exists()


def test_disk_full_later_keeps_the_previous_checkpoint(in_tmp, monkeypatch):
    writes, full = {"n": 0}, _on_a_full_disk(write_atomically)

    def fills_up(path, write):
        writes["n"] += 1
        return write_atomically(path, write) if writes["n"] == 1 else full(path, write)

    monkeypatch.setattr(checkpoints_module, "write_atomically", fills_up)
    out = in_tmp / "run"
    assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--out", out, *sets(*TINY)), "No space left on device")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 10
    assert not list(out.glob(".*.tmp"))


def test_out_naming_a_file(in_tmp):
    target = in_tmp / "notes.txt"
    target.write_text("mine\n")
    assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--out", target, *sets(*TINY)), "not a directory")
    assert target.read_text() == "mine\n"


def _read_only(monkeypatch, inside):
    """Writing under ``inside`` fails as on a read-only file system (the tests may run as root)."""
    def guard(real):
        def call(self, *args, **kwargs):
            mode = (args[0] if args else kwargs.get("mode", "r")) if real is Path.open else "w"
            if set(mode) & set("wax+") and Path(self).resolve().is_relative_to(inside.resolve()):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(self, *args, **kwargs)
        return call

    for name in ("mkdir", "touch", "write_text", "open"):
        monkeypatch.setattr(Path, name, guard(getattr(Path, name)))


@pytest.mark.parametrize("out", [True, False], ids=["--out", "runs/"])
def test_read_only_output_location(in_tmp, monkeypatch, out):
    _read_only(monkeypatch, in_tmp)
    where = ["--out", in_tmp / "run"] if out else []
    assert_one_line(bdiff("train", HEARTBEAT, "--quiet", *where, *sets(*TINY)), "Permission denied")


def test_read_only_resume_directory(tiny_run, monkeypatch):
    _read_only(monkeypatch, tiny_run)
    assert_one_line(bdiff("train", HEARTBEAT, "--resume", tiny_run, "--quiet", *sets(*TINY, "train.steps=30")),
             "Permission denied")


# ---------------------------------------------------------------------------------------
# The final evaluation


def test_a_failed_final_evaluation_keeps_the_training(tmp_path, monkeypatch):
    real_report = train_module.bound_report

    def fails_at_the_end(*args, **kwargs):
        replicates = args[2] if len(args) > 2 else kwargs.get("replicates")
        if replicates == 3:  # the final evaluation (3 replicates), not the ones during training (2)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (you tried to allocate 25000000000 bytes)")
        return real_report(*args, **kwargs)

    monkeypatch.setattr(train_module, "bound_report", fails_at_the_end)
    out = tmp_path / "run"
    line = assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--out", out, *sets(*TINY, "evaluate.replicates=3")),
                    "the final evaluation failed", status=1)
    assert f"bdiff diagnose {out}" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 20
    assert len((out / "history.csv").read_text().splitlines()) == 3  # header and steps 10, 20


@pytest.mark.parametrize("where", ["train", "diagnose"])
def test_ctrl_c_during_diagnostics(tiny_run, tmp_path, monkeypatch, where):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnostics_module, "diagnose", interrupted)
    if where == "diagnose":
        assert_one_line(bdiff("diagnose", tiny_run, "--quiet"), "interrupted", status=130)
        return
    out = tmp_path / "run"
    line = assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--out", out, *sets(*TINY, "evaluate.diagnose=true")),
                           "interrupted during the final evaluation", status=130)
    assert f"bdiff diagnose {out}" in line and (out / "checkpoint.pt").is_file() and (out / "metrics.json").is_file()


def test_a_large_data_set_is_scored_on_a_seeded_subsample():
    """n = 3, T = 3, 600 sequences: the subsample estimate of 50 of them lies within 4 standard
    errors of the exact average (every expectation enumerated, float64), its standard error is
    larger than that of the full evaluation, and the same seed gives the same report."""
    process = make_process(n=3, T=3)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.bernoulli(torch.full((600, 3), 0.3, dtype=torch.float64), generator=generator)
    with torch.no_grad():
        exact = float(elbo_exact(process.kernel, process.log_probs, x0).mean()) / LN2
    full = bound_report(process, x0, replicates=4, seed=0)
    report = bound_report(process, x0, replicates=4, seed=0, max_sequences=50)
    assert (report["subsample"], report["sequences"]) == (50, 600)
    assert abs(report["elbo_bits"] - exact) < 4 * report["se_bits"]
    assert report["se_bits"] > full["se_bits"]
    assert report == bound_report(process, x0, replicates=4, seed=0, max_sequences=50)


def test_the_bound_of_many_rows_fits_in_bounded_memory():
    """R x T x N x n = 16 x 100 x 2000 x 200 floats would be 2.6 GB if the rows were all made
    at once; chunked, the evaluation grows the peak memory by far less."""
    script = """
import resource, torch
from bdiff_pyro.config import Config, ModelConfig, model_spec
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.evaluation import bound_report
torch.set_num_threads(1)
config = Config(model=ModelConfig(T=100, hidden=[4], time_embedding=4))
process = ReverseProcess.from_spec(model_spec(config, 200)).eval()
x0 = torch.bernoulli(torch.full((2000, 200), 0.5))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bound_report(process, x0, replicates=16, max_sequences=None)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 600 * 2**20


def test_the_final_evaluation_shows_progress(capsys):
    process = make_process(n=3, T=3)
    bound_report(process, torch.zeros(4, 3, dtype=torch.float64), replicates=2, progress="ELBO on held-out data")
    assert "ELBO on held-out data" in capsys.readouterr().err


def test_the_two_k_values_at_the_end_are_labelled(tmp_path):
    code, stdout, stderr = bdiff("train", HEARTBEAT, "--quiet", "--out", tmp_path / "run",
                                 *sets(*TINY, "evaluate.diagnose=true"))
    assert code == 0, stderr
    assert "on the held-out data (5 sequences, 2 replicates stratified over t)" in stdout
    assert "on the training data (5 sequences, 2 replicates stratified over t)" in stdout
    assert "each draw one replicate stratified over t on 5 of the 5 held-out sequences" in stdout
    assert "the diagnostics' ELBO above estimates the same held-out ELBO" in stdout


# ---------------------------------------------------------------------------------------
# Sizes


def test_data_too_wide_for_memory_is_refused_before_anything_is_allocated(in_tmp, monkeypatch):
    monkeypatch.setattr(memory_module, "available_memory_bytes", lambda: 8 * 2**30)
    wide = in_tmp / "wide.npy"
    np.save(wide, np.zeros((2, 10**6), dtype=np.int8))
    line = assert_one_line(bdiff("train", HEARTBEAT, "--quiet", "--out", in_tmp / "run", *sets(
        *TINY, "model.hidden=[256]", "data.kind=npy", f"data.train={wide}", f"data.val={wide}")),
        "n = 1000000")
    assert "more than the 8 GB available" in line and not (in_tmp / "run").exists()


def test_sample_draws_in_batches_of_bounded_size(tiny_run, monkeypatch):
    """-n 50 with room for 8 sequences at a time: 50 lines, no call asks for more than 8, and
    the first 8 are the draws of one seeded call."""
    monkeypatch.setattr(memory_module, "rows_per_chunk", lambda *args, **kwargs: 8)
    sizes = []
    real_sample = checkpoints_module.ReverseProcess.sample

    def spy(self, num, **kwargs):
        sizes.append(num)
        return real_sample(self, num, **kwargs)

    monkeypatch.setattr(checkpoints_module.ReverseProcess, "sample", spy)
    code, stdout, stderr = bdiff("sample", tiny_run, "-n", 50, "--seed", 3)
    assert code == 0, stderr
    lines = stdout.split()
    assert len(lines) == 50 and max(sizes) == 8
    first = real_sample(checkpoints_module.load(tiny_run), 8, seed=3)
    assert lines[:8] == ["".join(str(int(v)) for v in row) for row in first.tolist()]


# ---------------------------------------------------------------------------------------
# Checkpoints


class _Planted:
    """Unpickling this calls Path.touch: code that a checkpoint makes run when it is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_callable_is_refused_unrun(tiny_run, tmp_path):
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "ran"
    payload["extra"] = _Planted(marker)
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert_one_line(bdiff("sample", tmp_path, "-n", 2), "could run code")
    assert not marker.exists()


def test_new_checkpoints_carry_format_2_and_format_1_still_loads(tiny_run, tmp_path):
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    assert payload["format"] == 2
    payload["format"] = 1
    torch.save(payload, tmp_path / "checkpoint.pt")
    code, stdout, stderr = bdiff("sample", tmp_path, "-n", 2, "--seed", 0)
    assert code == 0 and len(stdout.split()) == 2, stderr


def test_missing_weights_and_unknown_format_are_one_line(tiny_run, tmp_path):
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in payload.items() if k != "model_state"}, tmp_path / "checkpoint.pt")
    assert_one_line(bdiff("sample", tmp_path, "-n", 2), "lacks model_state")
    assert_one_line(bdiff("evaluate", tmp_path, ROOT / "experiments/data/heartbeat_text/val.txt"), "lacks model_state")
    torch.save({**payload, "format": 7}, tmp_path / "checkpoint.pt")
    assert_one_line(bdiff("sample", tmp_path, "-n", 2), "format: 7")


def test_checkpoints_save_the_spec_and_one_written_without_it_still_loads(tiny_run, tmp_path):
    """A checkpoint of the layout before the spec was saved (its config and n only) rebuilds the
    same model: the same samples for the same seed."""
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    assert payload["spec"]["n"] == payload["n"] and payload["spec"]["T"] == 6
    torch.save({key: value for key, value in payload.items() if key != "spec"}, tmp_path / "checkpoint.pt")
    old, new = bdiff_pyro.load(tmp_path), bdiff_pyro.load(tiny_run / "checkpoint.pt")
    assert torch.equal(old.sample(50, seed=1), new.sample(50, seed=1))


def test_loading_reads_the_spec_not_the_data_section(tiny_run, tmp_path):
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    payload["config"]["data"] = {"kind": "no such kind"}
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert bdiff_pyro.load(tmp_path).sample(3, seed=0).shape == (3, payload["n"])


def test_resolve_config_returns_a_new_config_and_leaves_its_argument():
    from bdiff_pyro.config import config_from_dict, model_spec
    from bdiff_pyro.data import load_dataset
    from bdiff_pyro.train import resolve_config

    config = config_from_dict({"data": {"kind": "heartbeat", "n": 10, "period": 5}, "model": {"pi_1": "data"}})
    before = config.to_dict()
    resolved = resolve_config(config, load_dataset(config.data))
    assert config.to_dict() == before and config.model.pi_1 == "data"
    assert resolved.model.pi_1 == pytest.approx(0.2)  # one pulse every 5 positions
    assert model_spec(resolved, 10).pi_1 == pytest.approx(0.2)
    with pytest.raises(ValueError, match="resolved"):
        model_spec(config, 10)
