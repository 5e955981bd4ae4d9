"""One atomic write, one fresh output directory, one exclusive claim, one CSV writer."""

import csv
import os

import pytest

from bdiff_pyro.errors import UserError
from bdiff_pyro.util.files import claim_file, fresh_directory, write_atomically, write_csv


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_permissions_of_the_umask(tmp_path, umask):
    path = tmp_path / "out.txt"
    old = os.umask(umask)
    try:
        write_atomically(path, lambda temporary: temporary.write_text("hello\n"))
    finally:
        os.umask(old)
    assert path.read_text() == "hello\n"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["out.txt"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")

    def fail_halfway(temporary):
        temporary.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(path, fail_halfway)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.txt"]


def test_fresh_directory_never_reuses_a_directory_that_holds_anything(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fresh_directory("x", empty) == empty
    (empty / "result.csv").write_text("1\n")
    with pytest.raises(UserError, match="refusing to overwrite"):
        fresh_directory("x", empty)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--out .*file: exists and is not a directory"):
        fresh_directory("x", tmp_path / "file")
    first = fresh_directory("study", root=tmp_path / "runs")
    second = fresh_directory("study", root=tmp_path / "runs")
    assert first != second and first.is_dir() and second.is_dir() and first.name.startswith("study-")


def test_claim_file_gives_a_name_once(tmp_path):
    assert claim_file(tmp_path / "a.nc") and not claim_file(tmp_path / "a.nc")
    assert (tmp_path / "a.nc").read_bytes() == b""


def test_write_csv_columns_and_exclusive(tmp_path):
    rows = [{"a": 1, "b": 2.5, "c": "x"}, {"a": 3, "b": None, "c": "y"}]
    write_csv(tmp_path / "all.csv", rows)
    with open(tmp_path / "all.csv", newline="") as stream:
        assert list(csv.reader(stream)) == [["a", "b", "c"], ["1", "2.5", "x"], ["3", "", "y"]]
    write_csv(tmp_path / "some.csv", rows, fields=("c", "a"))
    assert (tmp_path / "some.csv").read_text().splitlines() == ["c,a", "x,1", "y,3"]
    with pytest.raises(FileExistsError):
        write_csv(tmp_path / "some.csv", rows, exclusive=True)
    write_csv(tmp_path / "none.csv", [])
    assert not (tmp_path / "none.csv").exists()
