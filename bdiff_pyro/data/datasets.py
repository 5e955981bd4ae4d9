"""Data sets: the heartbeat generator and files of sequences, validated on load.

A data set is a training and a held-out tensor of shape (num_sequences, n) holding state
codes (0/1 for bits) as floats.  Heartbeat data also knows its support (the ``period``
shifts, equally likely), which the oracle reverse and the benchmarks use.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bdiff_pyro.errors import UserError

NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file


def heartbeat(n, period, levels=2):
    """The ``period`` shifts of a pulse every ``period`` positions.

    Row s has the top level (levels - 1) at s, s+p, ..., decaying by one level per position
    after each pulse: value_i = max(0, levels - 1 - ((i - s) mod p)).  For bits: ones at
    s, s+p, ... and zeros elsewhere.
    """
    positions = torch.arange(n)
    return torch.stack([(levels - 1 - (positions - shift) % period).clamp_min(0).float() for shift in range(period)])


def read_text(path, alphabet=None):
    """One sequence per line of symbols; the code of a symbol is its index in ``alphabet``
    (default "01": the reference repo's train.txt format)."""
    alphabet = alphabet or "01"
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read data file ({error.strerror})") from None
    if raw.startswith(NPY_MAGIC):
        raise UserError(f"{path}: a .npy array, not text lines (for a data set: data.kind: npy)")
    try:
        lines = raw.decode("utf-8-sig").splitlines()  # a byte-order mark is not a symbol
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file of 0/1 lines") from None
    rows, width = [], None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        bad = next((c for c in line if c not in alphabet), None)
        if bad is not None:
            allowed = "0 and 1" if alphabet == "01" else f"symbols of {alphabet!r}"
            raise UserError(f"{path}:{number}: unexpected character {bad!r} (lines must hold only {allowed})")
        if width is None:
            width = len(line)
        elif len(line) != width:
            raise UserError(f"{path}:{number}: sequence of length {len(line)}, but the first has length {width}")
        rows.append([alphabet.index(c) for c in line])
    if not rows:
        raise UserError(f"{path}: no sequences (the file is empty)")
    return torch.tensor(rows, dtype=torch.float32)


def read_npy(path, levels=2):
    """A 2-D .npy array of integer codes 0..levels-1 (0/1 for bits), one sequence per row."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            is_npy = stream.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError as error:
        raise UserError(f"{path}: cannot read data file ({error.strerror})") from None
    if not is_npy:  # e.g. text lines in a file named .npy: numpy's own message is about pickles
        raise UserError(f"{path}: not a .npy array (no NumPy header; for text lines of 0/1: data.kind: text)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read .npy array ({error})") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{path}: expected a non-empty 2-D array (got shape {array.shape})")
    bad = ~np.isin(array, np.arange(levels))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        allowed = "0 or 1" if levels == 2 else f"integers 0..{levels - 1}"
        raise UserError(f"{path}: row {row}, column {col} holds {array[row, col].item()!r} (values must be {allowed})")
    return torch.as_tensor(array.astype(np.float32))


#: the arrays a data.kind npz file must hold: fitting, selection, and the final figure only
NPZ_SPLITS = ("train", "valid", "test")


def read_npz(path, levels=2):
    """The ``train`` / ``valid`` / ``test`` arrays of one .npz file, {split: (rows, n) float
    tensor}: each 2-D, non-empty, of integer (or bool) codes 0..levels-1, all of one width."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as error:
        raise UserError(f"{path}: cannot read data file ({error.strerror or error})") from None
    except (ValueError, EOFError) as error:
        raise UserError(f"{path}: not a readable .npz archive ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: a single array, not an .npz archive with arrays {', '.join(NPZ_SPLITS)}")
    splits = {}
    with archive:
        for key in NPZ_SPLITS:
            if key not in archive.files:
                raise UserError(f"{path}: no array {key!r} (the archive holds {', '.join(archive.files) or 'nothing'}; "
                                f"data.kind npz needs {', '.join(NPZ_SPLITS)})")
            try:
                array = archive[key]
            except ValueError as error:  # an object array: would need pickle
                raise UserError(f"{path}: array {key!r} cannot be read without pickle ({error})") from None
            splits[key] = _check_codes(array, f"{path}: array {key!r}", levels)
    widths = {key: array.shape[1] for key, array in splits.items()}
    if len(set(widths.values())) > 1:
        raise UserError(f"{path}: arrays of different widths ({', '.join(f'{k} {w}' for k, w in widths.items())})")
    return {key: torch.as_tensor(array.astype(np.float32)) for key, array in splits.items()}


def _check_codes(array, what, levels):
    """``array`` if it is a non-empty 2-D bool or integer array of codes 0..levels-1, else a UserError."""
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{what}: expected a non-empty 2-D array (got shape {array.shape})")
    if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{what}: dtype {array.dtype}, expected integers or bool (codes 0..{levels - 1})")
    bad = ~np.isin(array, np.arange(levels))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise UserError(f"{what}: row {row}, column {col} holds {array[row, col].item()!r} "
                        f"(values must be integers 0..{levels - 1})")
    return array


def read_sequences(path, levels=2, alphabet=None, kind=None):
    """Read a data file as ``kind`` ("npy" or "text"); without a kind, by its suffix: .npy
    arrays, anything else as text lines."""
    if kind is None:
        kind = "npy" if str(path).endswith(".npy") else "text"
    if kind == "npy":
        return read_npy(path, levels)
    return read_text(path, alphabet or "0123456789"[:levels] if levels <= 10 else alphabet)


def format_sequence(codes, alphabet=None):
    """Codes -> a line of symbols (the inverse of read_text); codes past the alphabet, such as
    an absorbing kernel's mask state, print as '?'."""
    alphabet = alphabet or "0123456789"
    return "".join(alphabet[c] if c < len(alphabet) else "?" for c in (int(v) for v in codes))


@dataclass
class Dataset:
    train: torch.Tensor
    val: torch.Tensor
    support: Optional[torch.Tensor] = None  # known finite support (heartbeat), equally likely
    test: Optional[torch.Tensor] = None  # scored once, for the final figure only (npz data)

    @property
    def n(self):
        return self.train.shape[1]
