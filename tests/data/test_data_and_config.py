"""Data files and config files: what loads, and the one-line errors for what does not."""

import numpy as np
import pytest
import torch

from bdiff_pyro.config import load_config
from bdiff_pyro.data.datasets import heartbeat, read_npy, read_text
from bdiff_pyro.errors import UserError


def test_heartbeat_patterns():
    patterns = heartbeat(20, 5)
    assert patterns.shape == (5, 20)
    for shift in range(5):
        assert patterns[shift].nonzero().flatten().tolist() == list(range(shift, 20, 5))
    assert len({tuple(row.tolist()) for row in patterns}) == 5  # no duplicated row (the seed's slip)


def test_read_text_round_trip(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("0101\n1100\n\n")
    assert torch.equal(read_text(path), torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]]).float())


@pytest.mark.parametrize("content,message", [
    ("0101\n01x1\n", "train.txt:2: unexpected character 'x'"),
    ("0101\n011\n", "train.txt:2: sequence of length 3, but the first has length 4"),
    ("", "train.txt: no sequences"),
    ("\n\n", "train.txt: no sequences"),
])
def test_malformed_text_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_text(path)


def test_npy(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.array([[0, 1], [1, 1]], dtype=np.int64))
    assert read_npy(good).tolist() == [[0.0, 1.0], [1.0, 1.0]]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[0, 2]]))
    with pytest.raises(UserError, match="bad.npy: row 0, column 1"):
        read_npy(bad)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.array([0, 1]))
    with pytest.raises(UserError, match="2-D"):
        read_npy(flat)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("model:\n  T: 1\n", "model.T must be >= 2"),
    ("model:\n  schedule: linear\n", "model.schedule must be one of"),
    ("model:\n  colour: red\n", "unknown config key 'model.colour'"),
    ("modle:\n  T: 5\n", "unknown config key 'modle'"),
    ("train:\n  lr: 0\n", "train.lr must be > 0"),
    ("train:\n  lr: -1e-3\n", "train.lr must be > 0"),
    ("model:\n  pi_1: 1.5\n", "model.pi_1 must lie strictly between 0 and 1"),
    ("model:\n  T: ten\n", "model.T must be int"),
    ("model:\n  T: [1\n", "c.yaml:3: invalid YAML"),
    ("data:\n  kind: text\n", "data.train is required"),
    ("threads: -1\n", "threads must be >= 0"),
    ("train:\n  ema: 1.0\n", "train.ema must be in"),
    ("model:\n  inputs: onehot\n", "model.inputs must be one of"),
    ("model:\n  film: maybe\n", "model.film must be bool"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text))


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, "model:\n  T: 10\ntrain:\n  lr: 1e-3\n")
    config = load_config(path, ["model.T=50", "model.hidden=[8, 8]"])
    assert config.model.T == 50 and config.model.hidden == [8, 8] and config.train.lr == 1e-3
    with pytest.raises(UserError, match="model.T must be >= 2"):
        load_config(path, ["model.T=1"])
    with pytest.raises(UserError, match="unknown config key 'model.TT'"):
        load_config(path, ["model.TT=3"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(path, ["model.T"])


def test_data_paths_are_relative_to_the_config(tmp_path):
    (tmp_path / "d").mkdir()
    path = write(tmp_path, "data:\n  kind: text\n  train: d/a.txt\n  val: d/b.txt\n")
    config = load_config(path)
    assert config.data.train == str((tmp_path / "d" / "a.txt").resolve())
