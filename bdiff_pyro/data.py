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

from .errors import UserError


def heartbeat(n, period):
    """The ``period`` shifts of a 1 every ``period`` positions: row s has ones at s, s+p, ..."""
    positions = torch.arange(n)
    return torch.stack([(positions % period == shift).float() for shift in range(period)])


def read_text(path):
    """One sequence per line of '0'/'1' characters (the reference repo's train.txt format)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise UserError(f"{path}: cannot read data file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file of 0/1 lines") from None
    rows, width = [], None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        bad = next((c for c in line if c not in "01"), None)
        if bad is not None:
            raise UserError(f"{path}:{number}: unexpected character {bad!r} (lines must hold only 0 and 1)")
        if width is None:
            width = len(line)
        elif len(line) != width:
            raise UserError(f"{path}:{number}: sequence of length {len(line)}, but the first has length {width}")
        rows.append([int(c) for c in line])
    if not rows:
        raise UserError(f"{path}: no sequences (the file is empty)")
    return torch.tensor(rows, dtype=torch.float32)


def read_npy(path):
    """A 2-D .npy array of 0/1 values, one sequence per row."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read .npy array ({error})") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{path}: expected a non-empty 2-D array (got shape {array.shape})")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise UserError(f"{path}: row {row}, column {col} holds {array[row, col]!r} (values must be 0 or 1)")
    return torch.as_tensor(array.astype(np.float32))


def read_sequences(path):
    """Read a data file by its suffix: .npy arrays, anything else as 0/1 text lines."""
    return read_npy(path) if str(path).endswith(".npy") else read_text(path)


@dataclass
class Dataset:
    train: torch.Tensor
    val: torch.Tensor
    support: Optional[torch.Tensor] = None  # known finite support (heartbeat), equally likely

    @property
    def n(self):
        return self.train.shape[1]


def load_dataset(data_config):
    """The training and held-out sequences a DataConfig describes."""
    if data_config.kind == "heartbeat":
        patterns = heartbeat(data_config.n, data_config.period)
        # The data distribution is uniform over the shifts; held-out scoring uses all of them.
        return Dataset(train=patterns, val=patterns, support=patterns)
    train, val = read_sequences(data_config.train), read_sequences(data_config.val)
    if train.shape[1] != val.shape[1]:
        raise UserError(f"{data_config.val}: sequences of length {val.shape[1]}, "
                        f"but {data_config.train} has length {train.shape[1]}")
    return Dataset(train=train, val=val)
