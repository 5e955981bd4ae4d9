"""Every bad input to the bdiff command gives one line on stderr, exit status 2, no traceback and
no stray file; what the command accepts with a warning says so; what a new user meets first
(help, startup time, progress, messages, plots) is right."""

import contextlib
import io
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_one_line, bdiff

from bdiff_pyro import cli, memory
from bdiff_pyro.config import ConfigWarning, load_config
from bdiff_pyro.data.datasets import heartbeat, read_npy, read_sequences, read_text
from bdiff_pyro.errors import UserError
from bdiff_pyro.util import files

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments/configs/heartbeat.yaml"
TINY = ["--set", "model.T=6", "--set", "model.hidden=[16]", "--set", "train.steps=40",
        "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20", "--set", "evaluate.num_samples=200",
        "--set", "evaluate.replicates=2", "--set", "train.eval_samples=100", "--set", "evaluate.diagnose=false"]


def files_in(directory):
    return sorted(p.name for p in Path(directory).iterdir())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = bdiff("train", CONFIG, "--out", out, "--quiet", *TINY)
    assert result.returncode == 0, result.stderr
    return out, result


# ---------------------------------------------------------------------------------------
# Float keys, seeds, counts


@pytest.mark.parametrize("key", ["train.lr", "train.lr_final", "train.clip_norm", "train.ema",
                                 "model.schedule_power", "model.pi_1"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_every_float_key_must_be_finite(key, value):
    # evaluate.replicates=1 is also wrong: the float must be refused first, by its own name
    result = bdiff("train", CONFIG, "--set", f"{key}={value}", "--set", "evaluate.replicates=1")
    assert_one_line(result, f"--set {key}={value}: {key} must be a finite number")


def test_a_non_finite_float_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: .inf\nevaluate:\n  replicates: 1\n")
    assert_one_line(bdiff("train", path), f"{path}: train.lr must be a finite number (got inf)")


def test_bound_fell_only_beyond_the_monte_carlo_error():
    from bdiff_pyro.evaluation import bound_fell

    start = {"elbo_bits": -20.0, "se_bits": 0.5}
    assert bound_fell(start, {"elbo_bits": -22.0, "se_bits": 0.5}) is None  # 2 bits < 4 * sqrt(0.5) = 2.83
    assert bound_fell(start, {"elbo_bits": -15.0, "se_bits": 0.5}) is None  # a rise
    assert "from -20.000 to -23.000" in bound_fell(start, {"elbo_bits": -23.0, "se_bits": 0.5})
    assert bound_fell({"elbo_bits": -2.0, "se_bits": 0.0}, {"elbo_bits": -2.9, "se_bits": 0.0}) is None  # < 1 bit
    assert bound_fell({"elbo_bits": -2.0, "se_bits": 0.0}, {"elbo_bits": -3.1, "se_bits": 0.0}) is not None


@pytest.mark.slow
def test_a_huge_learning_rate_trains_to_a_collapse_and_says_so(tmp_path):
    result = bdiff("train", CONFIG, "--out", tmp_path / "run", "--quiet", *TINY,
                   "--set", "train.lr=1e6", "--set", "train.lr_final=1e6")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("bdiff: warning: the held-out bound fell during training"), lines
    assert "train.lr = 1e+06" in lines[0]
    # even the best-validated weights of a collapsing run are worse than independent bits
    assert lines[1].startswith("bdiff: warning: the model (step ") and "worse than independent bits" in lines[1]


@pytest.mark.parametrize("args, fragments", [
    (["train", CONFIG, "--seed", "-1"], ["argument --seed: must be at least 0 (got -1)"]),
    (["train", CONFIG, "--seed", str(2 ** 70)], ["argument --seed: must be in 0..4294967295"]),
    (["sample", "RUN", "-n", "3", "--seed", str(2 ** 70)], ["argument --seed: must be in 0..4294967295"]),
    (["sample", "RUN", "-n", "0"], ["argument -n/--num: must be at least 1"]),
    (["sample", "RUN", "-n", "3", "--steps", "0"], ["argument --steps: must be at least 1"]),
    (["evaluate", "RUN", "DATA", "--importance", "-5"], ["argument --importance: must be at least 1 (got -5)"]),
    (["evaluate", "RUN", "DATA", "--importance", "0"], ["argument --importance: must be at least 1 (got 0)"]),
    (["evaluate", "RUN", "DATA", "--replicates", "1"], ["argument --replicates: must be at least 2"]),
    (["evaluate", "RUN", "DATA", "--seed", "-3"], ["argument --seed: must be at least 0"]),
    (["diagnose", "RUN", "--chains", "0"], ["argument --chains: must be at least 2 (got 0)"]),
    (["diagnose", "RUN", "--draws", "0"], ["argument --draws: must be at least 10 (got 0)"]),
    (["oracle", CONFIG, "--replicates", "0"], ["argument --replicates: must be at least 2"]),
    (["oracle", CONFIG, "--samples", "-1"], ["argument --samples: must be at least 0"]),
    (["oracle", CONFIG, "--seed", "abc"], ["argument --seed: expected an integer, got 'abc'"]),
])
def test_bad_arguments_give_one_line(args, fragments, tiny_run):
    out, _ = tiny_run
    args = [out if a == "RUN" else ROOT / "experiments/data/heartbeat_text/val.txt" if a == "DATA" else a
            for a in args]
    assert_one_line(bdiff(*args), *fragments)


def test_a_seed_out_of_range_in_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    for seed in (-1, 2 ** 32):
        path.write_text(f"seed: {seed}\n")
        assert_one_line(bdiff("train", path), f"{path}: seed must be in 0..4294967295 (got {seed})")
    assert_one_line(bdiff("oracle", CONFIG, "--set", "seed=-1"), "--set seed=-1: seed must be in 0..")


def test_the_diagnose_defaults_are_the_library_defaults():
    from bdiff_pyro.diagnostics import DEFAULT_CHAINS, DEFAULT_DRAWS

    args = cli.build_parser().parse_args(["diagnose", "RUN"])
    assert (args.chains, args.draws) == (DEFAULT_CHAINS, DEFAULT_DRAWS)


# ---------------------------------------------------------------------------------------
# sample --out, and -n of any size


def test_sample_out_into_a_missing_directory(tiny_run, tmp_path):
    out, _ = tiny_run
    assert_one_line(bdiff("sample", out, "-n", 3, "--out", tmp_path / "missing" / "s.txt"),
                      "s.txt: directory", "missing does not exist")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_sample_out_onto_a_directory(tiny_run, tmp_path, force):
    out, _ = tiny_run
    (tmp_path / "d").mkdir()
    assert_one_line(bdiff("sample", out, "-n", 3, "--out", tmp_path / "d", *force), "is a directory")
    assert files_in(tmp_path) == ["d"] and files_in(tmp_path / "d") == []


def test_sample_out_onto_a_read_only_location(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    assert_one_line(bdiff("sample", out, "-n", 3, "--out", tmp_path / "s.txt"), "s.txt: cannot write (",
                      "Permission denied")
    assert files_in(tmp_path) == []


def test_sample_out_that_fails_while_writing_leaves_no_file(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    real = cli.format_lines
    calls = {"n": 0}

    def disk_full_on_the_second_batch(samples, alphabet):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(samples, alphabet)

    monkeypatch.setattr(memory, "rows_per_chunk", lambda *args, **kwargs: 4)
    monkeypatch.setattr(cli, "format_lines", disk_full_on_the_second_batch)
    assert_one_line(bdiff("sample", out, "-n", 10, "--out", tmp_path / "s.txt"), "No space left on device")
    assert files_in(tmp_path) == []


def test_sample_refuses_an_output_the_disk_cannot_hold(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10 ** 9})())
    result = bdiff("sample", out, "-n", 10 ** 9, "--out", tmp_path / "s.txt")
    # 10^9 lines of 20 bits and a newline
    assert_one_line(result, "1000000000 samples need 21.0 GB (21 bytes a line)", "1.0 GB free")
    assert files_in(tmp_path) == []


def test_sample_draws_and_writes_in_bounded_batches(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    model = __import__("bdiff_pyro").load(out)
    with torch.random.fork_rng():  # the reference: one seeded stream, batches of 3 rows
        torch.manual_seed(5)
        expected = torch.cat([model.sample(k) for k in (3, 3, 3, 1)])
    sizes = []
    real_sample = type(model).sample

    def recording(self, num, *args, **kwargs):
        sizes.append(num)
        return real_sample(self, num, *args, **kwargs)

    monkeypatch.setattr(type(model), "sample", recording)
    monkeypatch.setattr(memory, "rows_per_chunk", lambda *args, **kwargs: 3)
    result = bdiff("sample", out, "-n", 10, "--seed", 5)
    assert result.returncode == 0, result.stderr
    assert sizes == [3, 3, 3, 1]
    rows = [[int(c) for c in line] for line in result.stdout.split()]
    assert torch.equal(torch.tensor(rows, dtype=expected.dtype), expected)
    assert bdiff("sample", out, "-n", 10, "--seed", 5, "--out", tmp_path / "s.txt").returncode == 0
    assert (tmp_path / "s.txt").read_text() == result.stdout


def test_one_batch_is_the_models_own_sample(tiny_run):
    out, _ = tiny_run
    model = __import__("bdiff_pyro").load(out)
    result = bdiff("sample", out, "-n", 7, "--seed", 2)
    expected = "".join("".join(str(int(v)) for v in row) + "\n" for row in model.sample(7, seed=2).tolist())
    assert result.stdout == expected


# ---------------------------------------------------------------------------------------
# Configs: duplicate keys, keys that do nothing, --set blame


def test_a_duplicate_key_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  T: 10\n  hidden: [8]\n  T: 20\n")
    assert_one_line(bdiff("train", path), f"{path}:4: invalid YAML (duplicate key 'T' (first given on line 2))")
    path.write_text("train:\n  lr: 1e-3\nmodel:\n  T: 3\ntrain:\n  steps: 5\n")
    assert_one_line(bdiff("train", path), f"{path}:5: invalid YAML (duplicate key 'train'")


def write_text_config(tmp_path, data_lines):
    (tmp_path / "a.txt").write_text("0101\n1010\n")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  kind: text\n  train: a.txt\n  val: a.txt\n" + data_lines)
    return path


def test_heartbeat_keys_for_text_data_are_a_warning_and_not_recorded(tmp_path):
    path = write_text_config(tmp_path, "  n: 64\n  period: 3\n")
    with pytest.warns(ConfigWarning, match=r"data.n, data.period ignored: not used when data.kind is text"):
        config = load_config(path)
    from bdiff_pyro.config import save_config

    save_config(config, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert "n" not in saved["data"] and "period" not in saved["data"] and saved["data"]["kind"] == "text"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(tmp_path / "resolved.yaml")  # the resolved config reloads without a warning
        load_config(write_text_config(tmp_path, ""))


def test_the_warning_is_one_line_on_the_command_line(tmp_path):
    path = write_text_config(tmp_path, "  n: 64\n")
    result = bdiff("oracle", path, "--set", "model.T=3", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"bdiff: warning: {path}: data.n ignored: not used when data.kind is text"]


def test_a_set_error_is_blamed_on_the_set_not_the_file():
    assert_one_line(bdiff("train", CONFIG, "--set", "model.T=abc"), "--set model.T=abc: model.T must be int")
    result = bdiff("train", CONFIG, "--set", "model.hidden=[8, x]")
    assert_one_line(result, "--set model.hidden=[8, x]: model.hidden[1]")
    assert_one_line(bdiff("train", CONFIG, "--set", "data.period=50"), "--set data.period=50: data.period must be <= ")
    assert_one_line(bdiff("train", CONFIG, "--set", "model={T: 1}"), "--set model={T: 1}: model.T must be >= 2")


def test_a_mistake_in_the_file_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  T: 1\n")
    assert_one_line(bdiff("train", path, "--set", "train.steps=5"), f"{path}: model.T must be >= 2")


# ---------------------------------------------------------------------------------------
# Data files


def test_npy_kind_reads_npy_whatever_the_suffix(tmp_path):
    np.save(tmp_path / "a.npy", np.array([[0, 1, 1], [1, 0, 0]], dtype=np.int64))
    (tmp_path / "a.dat").write_bytes((tmp_path / "a.npy").read_bytes())
    assert read_sequences(tmp_path / "a.dat", kind="npy").tolist() == [[0, 1, 1], [1, 0, 0]]
    (tmp_path / "t.txt").write_text("011\n100\n")
    with pytest.raises(UserError, match=r"t\.txt: not a \.npy array \(no NumPy header; for text lines of 0/1: "
                                        r"data\.kind: text\)"):
        read_sequences(tmp_path / "t.txt", kind="npy")
    with pytest.raises(UserError, match=r"a\.npy: a \.npy array, not text lines \(for a data set: data\.kind: npy\)"):
        read_sequences(tmp_path / "a.npy", kind="text")


def test_data_kind_npy_with_a_text_file_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("0101\n1010\n")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  kind: npy\n  train: a.txt\n  val: a.txt\nmodel:\n  T: 3\n")
    assert_one_line(bdiff("oracle", path, "--quiet"), "a.txt: not a .npy array")


def test_a_text_file_named_npy(tmp_path):
    (tmp_path / "x.npy").write_text("0101\n1010\n")
    with pytest.raises(UserError) as error:
        read_npy(tmp_path / "x.npy")
    assert "pickle" not in str(error.value) and "not a .npy array" in str(error.value)


def test_messages_show_plain_numbers_not_numpy_reprs(tmp_path):
    np.save(tmp_path / "f.npy", np.array([[0.0, 0.5], [1.0, 0.0]]))
    with pytest.raises(UserError) as error:
        read_npy(tmp_path / "f.npy")
    assert "row 0, column 1 holds 0.5 (values must be 0 or 1)" in str(error.value) and "np." not in str(error.value)


def test_a_byte_order_mark_is_skipped(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeff0101\n1010\n".encode("utf-8"))
    assert read_text(tmp_path / "bom.txt").tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    (tmp_path / "c.yaml").write_bytes("\ufeffmodel:\n  T: 7\n".encode("utf-8"))
    assert load_config(tmp_path / "c.yaml").model.T == 7


# ---------------------------------------------------------------------------------------
# Threads and startup


@pytest.mark.slow
def test_training_uses_one_thread_by_default(tmp_path):
    from bdiff_pyro.train import train

    config = load_config(CONFIG, [o for o in TINY if "=" in o] + ["train.steps=2", "train.eval_every=2"])
    assert config.threads == 1
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(config, tmp_path, progress=False, log=lambda *_: None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_sample_uses_the_configs_threads(tiny_run):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert bdiff("sample", tiny_run[0], "-n", 2).returncode == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args", [
    ["train", "CONFIG", "--set", "model.T=abc"],
    ["train", "CONFIG", "--seed", "-1"],
    ["oracle", "CONFIG", "--set", "train.lr=.nan"],
    ["sample", "RUN", "-n", "3", "--out", "/nonexistent-directory/s.txt"],
    ["evaluate", "RUN", "/nonexistent-directory/data.txt"],
    ["diagnose", "RUN", "--chains", "1"],
])
def test_bad_input_is_refused_before_torch_is_imported(args, tmp_path):
    args = [str(CONFIG) if a == "CONFIG" else str(tmp_path) if a == "RUN" else a for a in args]
    script = ("import sys\nfrom bdiff_pyro.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
              "print(code, 'torch' in sys.modules, 'pyro' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.stdout.split() == ["2", "False", "False"], (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "bdiff: error: " in result.stderr


# ---------------------------------------------------------------------------------------
# What a run prints


@pytest.mark.slow
def test_the_progress_bar_shows_both_as_minus_elbo(tmp_path):
    from bdiff_pyro.train import train

    config = load_config(CONFIG, [o for o in TINY if "=" in o] + ["train.steps=20"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(config, tmp_path, progress=True, log=lambda *_: None)
    training = [line for line in err.getvalue().replace("\r", "\n").splitlines() if line.startswith("train")]
    final = training[-1]  # the training bar's last state (the final evaluation's bars follow it)
    history = list(csv_rows(tmp_path / "history.csv"))[-1]
    assert f"-ELBO bits/seq: train {float(history['loss_bits']):.3f}, val {-float(history['val_elbo_bits']):.3f}" \
        in final, final
    assert float(history["loss_bits"]) > 0 and -float(history["val_elbo_bits"]) > 0  # the same sign


def csv_rows(path):
    import csv

    with open(path) as stream:
        yield from csv.DictReader(stream)


def test_heartbeat_summary_says_there_are_no_held_out_patterns(tiny_run):
    _, result = tiny_run
    line = next(text for text in result.stdout.splitlines() if text.startswith("of 200 samples"))
    assert "no held-out patterns" in line and "held-out sequences" not in line
    text = cli.sample_summary({"num": 10, "train": 0.5, "held_out": 0.25, "neither": 0.25, "held_out_patterns": 3})
    assert "25.00% held-out sequences" in text


def test_distinct_held_out_counts_the_held_out_sequences_not_in_training():
    from bdiff_pyro.util.stats import distinct_held_out

    patterns = heartbeat(20, 5)
    assert distinct_held_out(patterns, patterns) == 0
    assert distinct_held_out(patterns[:3], patterns) == 2
    assert distinct_held_out(patterns[:3], torch.cat([patterns[3:], patterns[3:]])) == 2


def test_an_ess_above_the_draws_is_explained():
    from bdiff_pyro.diagnostics import ess_phrase

    assert ess_phrase(950.4, 1000) == "ESS 950 of 1000 draws"
    assert "negatively correlated" in ess_phrase(1050, 1000)


def test_oracle_progress_bars_and_quiet():
    loud = bdiff("oracle", CONFIG, "--set", "model.T=10", "--samples", 50)
    assert loud.returncode == 0 and "oracle samples" in loud.stderr, loud.stderr
    loud = bdiff("oracle", CONFIG, "--set", "model.T=10", "--monte-carlo", "--replicates", 2)
    assert loud.returncode == 0 and "oracle bound" in loud.stderr, loud.stderr
    quiet = bdiff("oracle", CONFIG, "--set", "model.T=10", "--samples", 50, "--monte-carlo", "--replicates", 2,
                  "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


# ---------------------------------------------------------------------------------------
# Plots: every label inside the picture, nothing over the data


def _capture_figures(monkeypatch, module):
    figures = []
    import matplotlib.pyplot as plt

    def keep(fig, path):  # what _save does, without the file
        fig.tight_layout()
        fig.canvas.draw()
        figures.append(fig)

    monkeypatch.setattr(module, "_save", keep)
    return figures, plt


def _inside(fig, artist):
    box = artist.get_window_extent(fig.canvas.get_renderer())
    width, height = fig.canvas.get_width_height()
    return box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1


HISTORY = [{"step": s, "loss_bits": 10.0 / s, "val_elbo_bits": -10.0 / s, "val_se_bits": 0.1, "frac_train": 0.9,
            "frac_held_out": 0.0, "frac_neither": 0.1} for s in (1, 2, 3)]


def test_bound_curve_draws_the_known_references(monkeypatch, tmp_path):
    from bdiff_pyro import plots

    figures, plt = _capture_figures(monkeypatch, plots)
    plots.bound_curve(HISTORY, tmp_path / "b.png", {"truth (data log-likelihood)": -math.log2(5), "oracle ELBO": -2.4})
    ax = figures[0].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "truth (data log-likelihood): -2.322" in labels and "oracle ELBO: -2.400" in labels
    lines = {tuple(line.get_ydata()) for line in ax.get_lines()}
    assert (-math.log2(5), -math.log2(5)) in lines
    plt.close("all")


def test_reference_bounds_of_heartbeat():
    from bdiff_pyro.data import load_dataset
    from bdiff_pyro.diffusion.kernels import BernoulliKernel
    from bdiff_pyro.diffusion.oracle import oracle_bound
    from bdiff_pyro.diffusion.schedules import make_beta_tilde
    from bdiff_pyro.evaluation import reference_bounds

    config = load_config(CONFIG, ["model.T=5"])
    dataset = load_dataset(config.data)
    kernel = BernoulliKernel(make_beta_tilde("cosine", 5), pi_1=0.5)
    references = reference_bounds(kernel, dataset)
    assert references["truth (data log-likelihood)"] == pytest.approx(-math.log2(5), abs=1e-12)
    # the oracle's exact ELBO lies within the Monte Carlo estimate's error
    mean, se = oracle_bound(kernel.double(), dataset.support, replicates=400, seed=1)
    assert abs(references["oracle ELBO"] - mean) < 4 * se
    assert list(reference_bounds(kernel, dataset, max_cost=1)) == ["truth (data log-likelihood)"]
    # an absorbing kernel's exact oracle is too large for one step: no oracle line, no error
    from bdiff_pyro.diffusion.kernels import make_kernel

    absorbing = make_kernel("absorbing", make_beta_tilde("cosine", 5), 2, 0.5)
    assert list(reference_bounds(absorbing, dataset)) == ["truth (data log-likelihood)"]


def test_proportions_legend_beside_the_axes_and_no_held_out_line(monkeypatch, tmp_path):
    from bdiff_pyro import plots

    figures, plt = _capture_figures(monkeypatch, plots)
    plots.membership_curve(HISTORY, tmp_path / "p.png", held_out=False)
    fig = figures[0]
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 > ax.get_window_extent(renderer).x1 and _inside(fig, ax.get_legend())
    assert len([line for line in ax.get_lines() if len(line.get_xdata())]) == 2
    assert any("no held-out patterns" in text.get_text() for text in ax.get_legend().get_texts())
    plt.close("all")


def test_samples_have_a_key(monkeypatch, tmp_path):
    from bdiff_pyro import plots

    figures, plt = _capture_figures(monkeypatch, plots)
    plots.sample_grid(heartbeat(20, 5), tmp_path / "s.png")
    fig = figures[0]
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "value (black = 1)"
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["0", "1"]
    plt.close("all")


def test_gif_titles_are_inside_the_frame(monkeypatch, tmp_path):
    from bdiff_pyro import plots

    frames = [(step, heartbeat(20, 5).repeat(6, 1)[:32]) for step in (10, 1000000)]
    seen = []
    real_save = plots.animation.FuncAnimation.save

    def save(self, path, writer=None):
        real_save(self, path, writer=writer)
        fig = self._fig
        seen.append(all(_inside(fig, ax.title) for ax in fig.axes))

    monkeypatch.setattr(plots.animation.FuncAnimation, "save", save)
    plots.sample_evolution_gif(frames, tmp_path / "e.gif")
    assert seen == [True]


def test_compare_legend_fits_a_one_panel_grid(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    from bdiff_pyro import crosscheck

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig: kept.append(fig))
    rows = [dict(network="random", schedule="cosine", n=3, T=T, K_analytic=-2.0, elbo_traceenum=-2.0,
                 trace_elbo=-2.1, trace_elbo_se=0.05, log_p_exact=-1.7, log_p_importance=-1.7,
                 log_p_importance_se=0.03) for T in (3, 5)]
    config = crosscheck.CompareConfig.from_dict({"grid": {"schedules": ["cosine"], "n": [3], "T": [3, 5]},
                                                 "data": {"period": 3}})
    crosscheck.plot_bounds(rows, config, tmp_path / "c.png")
    fig = kept[0]
    fig.canvas.draw()
    legend = fig.legends[0]
    assert _inside(fig, legend)
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).y1 < fig.axes[0].xaxis.label.get_window_extent(renderer).y0


@pytest.mark.slow
def test_convergence_titles_fit_and_ties_are_broken(tiny_run, tmp_path, monkeypatch):
    from bdiff_pyro import diagnostics

    result = diagnostics.diagnose(tiny_run[0], chains=2, draws=10, progress=False, log=lambda *_: None,
                                  plots=False, overwrite=True)
    tree = diagnostics.open_diagnostics(result["files"]["datatree"])
    kept = []
    monkeypatch.setattr(diagnostics, "_save", lambda fig, path: kept.append(fig))
    diagnostics.plot_convergence(tree, tmp_path / "c.png")
    fig = kept[0]
    fig.canvas.draw()
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    assert titles and all(_inside(fig, title) for title in titles)
    ranked = [t.get_text() for t in titles if "rank ECDF" in t.get_text()]
    assert any("ties broken at random" in t for t in ranked) and not any(
        "ties" in t for t in ranked if t.startswith("K "))


# ---------------------------------------------------------------------------------------
# Help


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"bdiff {name} {action.option_strings[0]} has no help"
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, []) and action.dest != "help":
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_readme_usage_lists_the_options():
    readme = (ROOT / "README.md").read_text()
    usage = readme.split("## The command line", 1)[1].split("```", 2)[1]
    for option in ("--steps", "--exact", "--importance", "--json", "--quiet"):
        assert option in usage, option
