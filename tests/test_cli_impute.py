"""bdiff impute end to end on a small untrained checkpoint: every input format, partially, fully
observed and fully missing rows, and bad inputs (exit 2, one line, no traceback)."""

import contextlib
import io

import numpy as np
import pytest
import torch

from bdiff_pyro.checkpoints import CHECKPOINT_NAME, FORMAT, save_atomically
from bdiff_pyro.cli import main
from bdiff_pyro.config import load_config, model_spec
from bdiff_pyro.programs.reverse import ReverseProcess

N = 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint of a randomly initialised heartbeat model, n = 5, T = 4 (no training needed)."""
    config = load_config("experiments/configs/heartbeat.yaml",
                         ["data.n=5", "model.T=4", "model.hidden=[16]", "model.time_embedding=8"])
    torch.manual_seed(0)
    spec = model_spec(config, N)
    process = ReverseProcess.from_spec(spec)
    directory = tmp_path_factory.mktemp("impute")
    save_atomically({"format": FORMAT, "config": config.to_dict(), "spec": spec.to_dict(), "n": N,
                     "model_state": process.state_dict()}, directory / CHECKPOINT_NAME)
    return directory


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["impute", *map(str, args)])
        except SystemExit as exit:  # argparse
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def assert_user_error(result, fragment):
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


ROWS = ["1?0?1", "?????", "10101"]  # partially observed, fully missing, fully observed


@pytest.mark.parametrize("method", ["exact", "replace", "smc"])
def test_text_in_text_out(run_dir, tmp_path, method):
    data = tmp_path / "rows.txt"
    data.write_text("\n".join(ROWS) + "\n")
    out = tmp_path / "filled.txt"
    code, _, err = run(run_dir, data, "--method", method, "--samples", 3, "--particles", 8, "--seed", 0, "--out", out)
    assert code == 0, err
    lines = out.read_text().split()
    assert len(lines) == 3 * len(ROWS)
    for k, line in enumerate(lines):
        given = ROWS[k // 3]
        assert len(line) == N and set(line) <= {"0", "1"}
        assert all(g in ("?", c) for g, c in zip(given, line))  # observed bits kept
    assert lines[6:] == ["10101"] * 3  # a fully observed row passes through
    probs = np.loadtxt(f"{out}.marginals")
    assert probs.shape == (len(ROWS), N) and ((probs >= 0) & (probs <= 1)).all()
    assert (probs[2] == [1, 0, 1, 0, 1]).all() and (probs[0, [0, 2, 4]] == [1, 0, 1]).all()
    evidence = tmp_path / "filled.txt.evidence.csv"
    assert evidence.exists() == (method == "smc")
    if method == "smc":
        table = np.loadtxt(evidence, delimiter=",", skiprows=1)
        assert table.shape == (3, 4) and table[1, 1] == 0.0  # nothing observed: log p = log 1
        assert (table[:, 1] < 1e-12).all() and (table[:, 3] > 0).all()


def test_text_to_stdout_same_seed_same_lines(run_dir, tmp_path):
    data = tmp_path / "rows.txt"
    data.write_text("\n".join(ROWS) + "\n")
    first = run(run_dir, data, "--samples", 2, "--particles", 8, "--seed", 5)
    second = run(run_dir, data, "--samples", 2, "--particles", 8, "--seed", 5)
    assert first[0] == 0 and first[1] == second[1] and len(first[1].split()) == 6


def _check_npz(path, mask, values):
    with np.load(path) as result:
        completions, probs = result["completions"], result["probs"]
        assert completions.shape == (len(mask), 4, N) and probs.shape == (len(mask), N)
        assert (np.where(mask[:, None, :], completions == values[:, None, :], True)).all()
        assert result["log_evidence"].shape == (len(mask),) and "ess" in result.files


def test_npy_with_nan(run_dir, tmp_path):
    array = np.array([[1, np.nan, 0, np.nan, 1], [np.nan] * 5, [1, 0, 1, 0, 1]])
    np.save(tmp_path / "rows.npy", array)
    code, _, err = run(run_dir, tmp_path / "rows.npy", "--samples", 4, "--particles", 8, "--seed", 0,
                       "--out", tmp_path / "out.npz")
    assert code == 0, err
    _check_npz(tmp_path / "out.npz", ~np.isnan(array), np.nan_to_num(array))


def test_npz_with_nan_and_npz_values_and_mask(run_dir, tmp_path):
    array = np.array([[1, np.nan, 0, np.nan, 1], [np.nan] * 5])
    np.savez(tmp_path / "nan.npz", rows=array)
    mask = ~np.isnan(array)
    np.savez(tmp_path / "pair.npz", values=np.nan_to_num(array).astype(np.int64), mask=mask.astype(np.uint8))
    for name in ("nan.npz", "pair.npz"):
        out = tmp_path / f"out-{name}"
        code, _, err = run(run_dir, tmp_path / name, "--samples", 4, "--particles", 8, "--seed", 0, "--out", out)
        assert code == 0, err
        _check_npz(out, mask, np.nan_to_num(array))


def test_bad_inputs_give_one_line(run_dir, tmp_path):
    (tmp_path / "long.txt").write_text("1?0?10\n")
    assert_user_error(run(run_dir, tmp_path / "long.txt"), "length 6, but the model has n = 5")
    (tmp_path / "ragged.txt").write_text("1?0?1\n1?0\n")
    assert_user_error(run(run_dir, tmp_path / "ragged.txt"), "ragged.txt:2")
    (tmp_path / "letters.txt").write_text("1?x?1\n")
    assert_user_error(run(run_dir, tmp_path / "letters.txt"), "unexpected character 'x'")
    np.savez(tmp_path / "shape.npz", values=np.zeros((2, 5)), mask=np.ones((2, 4)))
    assert_user_error(run(run_dir, tmp_path / "shape.npz", "--out", tmp_path / "o.npz"), "mask of shape (2, 4)")
    np.save(tmp_path / "twos.npy", np.full((1, 5), 2.0))
    assert_user_error(run(run_dir, tmp_path / "twos.npy", "--out", tmp_path / "o.npz"), "holds 2.0")
    np.save(tmp_path / "ok.npy", np.zeros((1, 5)))
    assert_user_error(run(run_dir, tmp_path / "ok.npy"), "--out FILE.npz")
    assert_user_error(run(run_dir, tmp_path / "missing.txt"), "no such file")
    (tmp_path / "rows.txt").write_text("1?0?1\n")
    assert_user_error(run(run_dir, tmp_path / "rows.txt", "--particles", 10), "multiple of the 4 groups")
    assert_user_error(run(run_dir, tmp_path / "rows.txt", "--method", "gibbs"), "invalid choice")
    (tmp_path / "exists.txt").write_text("")
    assert_user_error(run(run_dir, tmp_path / "rows.txt", "--out", tmp_path / "exists.txt"), "--force")
