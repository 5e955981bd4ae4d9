"""Training on several processes: two gloo processes on the CPU take the steps one process takes
with the same global batch and seed, a run on two resumes on two or on one, a process that dies
ends the run with its last checkpoint kept; and the pieces without processes (the slices of a
batch, the draws of the loss, the checks before launching)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, assert_one_line, bdiff, make_process, sets

from bdiff_pyro import distributed
from bdiff_pyro.checkpoints import read_checkpoint
from bdiff_pyro.diffusion.bound import negative_elbo_estimate
from bdiff_pyro.distributed import World, resolve_device, world_from_environment
from bdiff_pyro.errors import UserError

HEARTBEAT = ROOT / "experiments/configs/heartbeat.yaml"
# importance-sampled t (the default config's) and a weight average: both must agree across processes
TINY = ["model.T=6", "model.hidden=[16]", "train.batch_size=32", "train.eval_every=1000",
        "train.checkpoint_every=1000", "evaluate.num_samples=20", "evaluate.replicates=2", "train.eval_samples=20",
        "evaluate.diagnose=false", "train.t_sampling=importance", "train.ema=0.9", "train.lr=0.02",
        "train.lr_final=0.02"]  # a constant rate: 4 steps of an 8-step run are a 4-step run
TOLERANCE = 1e-6  # float32 sums taken in another order; the weights move by more than 1e-2


def environment():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2, timeout=120):
    """``torchrun --standalone --nproc_per_node=NPROC -m bdiff_pyro ARGS``."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "bdiff_pyro", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def weights(run_dir, key="raw_model_state"):
    return read_checkpoint(run_dir, last=True)[1][key]


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------
# Two processes against one


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, 4 and 8 steps; two processes (launched by --nproc), 4 steps."""
    root = tmp_path_factory.mktemp("distributed")
    for steps in (4, 8):
        code, _, stderr = bdiff("train", HEARTBEAT, "--out", root / f"one-{steps}", "--quiet",
                                *sets(*TINY, f"train.steps={steps}"))
        assert code == 0, stderr
    done = subprocess.run([sys.executable, "-m", "bdiff_pyro", "train", HEARTBEAT, "--nproc", "2", "--out",
                           root / "two-4", "--quiet", *sets(*TINY, "train.steps=4")],
                          capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(2 processes)" in done.stdout
    return root


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one_with_the_global_batch(runs):
    one, two = weights(runs / "one-4"), weights(runs / "two-4")
    initial = make_initial_weights()
    assert max_difference(one, initial) > 1e-2  # the steps moved the weights far beyond the tolerance
    assert max_difference(one, two) < TOLERANCE
    assert max_difference(weights(runs / "one-4", "model_state"), weights(runs / "two-4", "model_state")) < TOLERANCE
    saved_one, saved_two = read_checkpoint(runs / "one-4")[1], read_checkpoint(runs / "two-4")[1]
    assert torch.equal(saved_one["rng_state"], saved_two["rng_state"])  # the same draws, whatever the processes
    assert torch.allclose(saved_one["loss_state"]["mean_square"], saved_two["loss_state"]["mean_square"],
                          rtol=1e-5, atol=0)  # of float32 terms


def make_initial_weights():
    """The weights a run of the TINY config starts from (its seed, before any step)."""
    import pyro

    from bdiff_pyro.config import load_config, model_spec
    from bdiff_pyro.programs.reverse import ReverseProcess
    from bdiff_pyro.train import prepare_training

    setup = prepare_training(load_config(HEARTBEAT, [*TINY, "train.steps=4"]))
    pyro.clear_param_store()
    pyro.set_rng_seed(setup.config.seed)
    return ReverseProcess.from_spec(model_spec(setup.config, setup.dataset.n)).state_dict()


@pytest.mark.slow
def test_a_run_on_two_processes_resumes_on_two_and_on_one(runs, tmp_path):
    import shutil

    for nproc in (2, 1):
        run_dir = tmp_path / f"resumed-on-{nproc}"
        shutil.copytree(runs / "two-4", run_dir)
        args = ["train", "--resume", run_dir, "--quiet", *sets("train.steps=8")]
        if nproc == 2:
            code, stdout, stderr = torchrun(*args)
        else:
            code, stdout, stderr = bdiff(*args)
        assert code == 0, stderr
        assert f"resuming {run_dir} at step 4" in stdout
        assert read_checkpoint(run_dir)[1]["state"]["step"] == 8
        assert max_difference(weights(run_dir), weights(runs / "one-8")) < TOLERANCE


@pytest.mark.slow
def test_a_process_that_dies_ends_the_run_and_the_last_checkpoint_is_kept(tmp_path):
    run_dir = tmp_path / "killed"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bdiff_pyro",
         "train", HEARTBEAT, "--out", run_dir, "--quiet",
         *sets(*TINY, "train.steps=100000", "train.checkpoint_every=5")],
        cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoint.pt").exists():
            assert launcher.poll() is None, launcher.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        os.kill(process_of_rank(launcher.pid, 1), signal.SIGKILL)
        code = launcher.wait(timeout=60)  # no hang: torchrun ends rank 0 too
    finally:
        end(launcher)
    assert code != 0
    saved = read_checkpoint(run_dir)[1]
    step = saved["state"]["step"]
    assert step > 0 and step % 5 == 0
    code, stdout, stderr = bdiff("train", "--resume", run_dir, "--quiet", *sets(f"train.steps={step + 2}"))
    assert code == 0, stderr
    assert read_checkpoint(run_dir)[1]["state"]["step"] == step + 2


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torchrun", "rank 1"])
def test_ctrl_c_stops_both_processes_at_the_same_step_with_a_checkpoint(tmp_path, target):
    """Ctrl-C in a terminal reaches torchrun, which passes it on to its processes (each in a
    session of its own); a SIGINT to rank 1 alone reaches rank 0 through the step's agreement."""
    run_dir = tmp_path / "interrupted"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bdiff_pyro",
         "train", HEARTBEAT, "--out", run_dir, "--quiet", *sets(*TINY, "train.steps=100000",
                                                                 "train.checkpoint_every=50")],
        cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoint.pt").exists():  # both processes are in the loop
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(launcher.pid if target == "torchrun" else process_of_rank(launcher.pid, 1), signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        end(launcher)
    assert "interrupted at step" in stderr, stderr
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert read_checkpoint(run_dir)[1]["state"]["step"] == step > 0
    assert f"continue with: bdiff train --resume {run_dir}" in stderr


def end(launcher):
    """After a failed test: torchrun and the processes it started (in sessions of their own) are stopped."""
    if launcher.poll() is None:
        for pid in descendants(launcher.pid) + [launcher.pid]:
            os.kill(pid, signal.SIGKILL)
        launcher.wait()


def descendants(root_pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    parent = int(stream.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, pending = [], list(children.get(root_pid, []))
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def process_of_rank(root_pid, rank):
    """The pid of the descendant of ``root_pid`` whose environment says RANK=rank."""
    for pid in descendants(root_pid):
        with open(f"/proc/{pid}/environ", "rb") as stream:
            if f"RANK={rank}".encode() in stream.read().split(b"\0"):
                return pid
    raise AssertionError(f"no process of rank {rank} under {root_pid}")


# ---------------------------------------------------------------------------------------
# The pieces, without processes


def test_the_slices_of_the_processes_partition_the_batch():
    rows = [World(rank, 4).rows(12) for rank in range(4)]
    assert [list(range(12))[r] for r in rows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert World().rows(12) == slice(0, 12)


def test_each_slice_of_the_loss_is_the_loss_of_those_rows_of_the_whole_batch():
    """The draws are those of the whole batch whatever the slice, so the slices' estimates put
    together are the whole batch's."""
    process = make_process(n=5, T=8)
    x0 = torch.bernoulli(torch.full((12, 5), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    whole, t, terms = negative_elbo_estimate(process.kernel, process.log_probs, x0)
    parts = []
    for rank in range(3):
        torch.manual_seed(3)
        parts.append(negative_elbo_estimate(process.kernel, process.log_probs, x0, rows=World(rank, 3).rows(12)))
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole, rtol=1e-12, atol=0)
    assert torch.equal(torch.cat([p[1] for p in parts]), t)


def test_the_world_comes_from_torchruns_environment():
    assert world_from_environment({}) == World(0, 1, 0)
    assert world_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(UserError, match="RANK"):
        world_from_environment({"RANK": "x", "WORLD_SIZE": "2"})


def test_a_batch_the_processes_cannot_share_equally_is_one_line_before_launching(tmp_path):
    assert_one_line(bdiff("train", HEARTBEAT, "--nproc", "2", "--out", tmp_path / "r", *sets("train.batch_size=127")),
                    "train.batch_size = 127", "2 processes")
    assert not (tmp_path / "r").exists()


def test_a_bad_config_with_nproc_is_one_line_and_starts_no_process(tmp_path, monkeypatch):
    def no_launch(*args):
        raise AssertionError("torchrun started")

    monkeypatch.setattr("bdiff_pyro.cli.launch_processes", no_launch)
    assert_one_line(bdiff("train", HEARTBEAT, "--nproc", "2", "--out", tmp_path / "r", *sets("model.T=abc")),
                    "model.T")


def test_nproc_under_torchrun_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_one_line(bdiff("train", HEARTBEAT, "--nproc", "2", "--out", tmp_path / "r"), "--nproc", "torchrun")


def test_the_processes_get_the_train_arguments_without_nproc():
    from bdiff_pyro.cli import build_parser, train_arguments

    args = build_parser().parse_args(["train", "c.yaml", "--nproc", "2", "--out", "o", "--seed", "3",
                                      "--set", "a=1", "--set", "b=2", "--quiet"])
    assert train_arguments(args) == ["train", "c.yaml", "--out", "o", "--seed", "3", "--set", "a=1", "--set", "b=2",
                                     "--quiet"]


def test_auto_is_cuda_exactly_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_process_of_its_own_needs_no_process_group():
    world = World()
    assert not world.distributed and world.main
    assert world.agree(1.5, False) == (1.5, False)
    assert world.on_main(lambda: 7) == 7
    distributed.join(world, torch.device("cpu"))  # nothing to connect
    assert not torch.distributed.is_initialized()
