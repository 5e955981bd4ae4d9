"""data.kind npz: one .npz with train / valid / test arrays; every bad input is one line naming
the file and the array, exit 2; the UCI configs load."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bdiff

from bdiff_pyro.config import load_config
from bdiff_pyro.data import load_dataset
from bdiff_pyro.data.datasets import read_npz
from bdiff_pyro.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_arrays(dtype=np.uint8):
    rng = np.random.default_rng(0)
    return {key: (rng.random((rows, 5)) < 0.4).astype(dtype) for key, rows in
            (("train", 12), ("valid", 4), ("test", 6))}


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, bool])
def test_read_npz_returns_every_split_as_float_codes(tmp_path, dtype):
    arrays = good_arrays(dtype)
    splits = read_npz(write_npz(tmp_path / "d.npz", **arrays))
    assert set(splits) == {"train", "valid", "test"}
    for key, array in arrays.items():
        assert splits[key].dtype == torch.float32
        assert splits[key].tolist() == array.astype(float).tolist()


def test_npz_config_reads_train_valid_and_test_relative_to_the_config(tmp_path):
    arrays = good_arrays()
    (tmp_path / "data").mkdir()
    write_npz(tmp_path / "data" / "d.npz", **arrays)
    (tmp_path / "c.yaml").write_text("data:\n  kind: npz\n  file: data/d.npz\n")
    dataset = load_dataset(load_config(tmp_path / "c.yaml").data)
    assert dataset.train.tolist() == arrays["train"].astype(float).tolist()
    assert dataset.val.tolist() == arrays["valid"].astype(float).tolist()
    assert dataset.test.tolist() == arrays["test"].astype(float).tolist()


def test_npz_config_needs_a_file(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  kind: npz\n")
    with pytest.raises(UserError, match="c.yaml: data.file is required when data.kind is 'npz'"):
        load_config(tmp_path / "c.yaml")


def bad_inputs():
    good = good_arrays()
    missing = {k: v for k, v in good.items() if k != "valid"}
    return [
        ("missing", missing, "no array 'valid'"),
        ("float", {**good, "test": good["test"].astype(np.float32)}, "array 'test': dtype float32"),
        ("values", {**good, "train": good["train"] * 2}, "array 'train': row"),
        ("flat", {**good, "valid": np.zeros(5, np.uint8)}, "array 'valid': expected a non-empty 2-D array"),
        ("empty", {**good, "valid": np.zeros((0, 5), np.uint8)}, "array 'valid': expected a non-empty 2-D array"),
        ("widths", {**good, "test": np.zeros((3, 4), np.uint8)},
         "arrays of different widths (train 5, valid 5, test 4)"),
    ]


@pytest.mark.parametrize("name,arrays,fragment", bad_inputs(), ids=[case[0] for case in bad_inputs()])
def test_bad_npz_is_one_line_naming_the_file(tmp_path, name, arrays, fragment):
    path = write_npz(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(UserError) as error:
        read_npz(path)
    assert str(path) in str(error.value) and fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("content,fragment", [(b"not an archive", "not a readable .npz archive"),
                                              (None, "cannot read data file")])
def test_unreadable_npz_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "d.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=fragment):
        read_npz(path)


def test_a_single_npy_array_is_not_an_npz(tmp_path):
    path = tmp_path / "d.npz"
    with open(path, "wb") as stream:
        np.save(stream, np.zeros((2, 3), np.uint8))
    with pytest.raises(UserError, match="a single array, not an .npz archive"):
        read_npz(path)


def test_training_on_a_bad_npz_exits_2_with_one_line(tmp_path):
    write_npz(tmp_path / "d.npz", **{k: v for k, v in good_arrays().items() if k != "test"})
    (tmp_path / "c.yaml").write_text("data:\n  kind: npz\n  file: d.npz\n")
    code, _, err = bdiff("train", tmp_path / "c.yaml", "--out", tmp_path / "run", "--quiet")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "d.npz: no array 'test'" in lines[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("name", ["uci_dna", "uci_mushrooms"])
def test_uci_configs_in_both_places_are_the_same_and_load(name):
    shipped = ROOT / "experiments" / "uci" / f"{name}.yaml"
    named = ROOT / "experiments" / "configs" / f"{name}.yaml"
    assert load_config(shipped).to_dict() == load_config(named).to_dict()
    config = load_config(named)
    dataset = load_dataset(config.data)
    assert config.data.kind == "npz" and dataset.n == {"uci_dna": 180, "uci_mushrooms": 112}[name]
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == {
        "uci_dna": (1400, 600, 1186), "uci_mushrooms": (2000, 500, 5624)}[name]
