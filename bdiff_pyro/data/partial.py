"""Partially observed sequences: the inputs of ``bdiff impute``, validated on load.

Three formats, each giving (values, mask) with mask True where a position is observed:

- text lines of the data alphabet with ``?`` for a missing position (``0?1??0``);
- a 2-D ``.npy`` array (or the single array of an ``.npz``) of state codes with NaN for missing;
- an ``.npz`` holding ``values`` and ``mask`` (1 or True where observed) of the same shape.
"""

from pathlib import Path

import numpy as np
import torch

from bdiff_pyro.data.datasets import NPY_MAGIC
from bdiff_pyro.errors import UserError

MISSING = "?"


def read_partial(path, levels=2, alphabet=None):
    """(values (B, n) float32 with 0 at missing positions, mask (B, n) bool, format "text" or "array")."""
    path = Path(path)
    try:
        head = path.read_bytes()[:len(NPY_MAGIC)]
    except OSError as error:
        raise UserError(f"{path}: cannot read data file ({error.strerror})") from None
    if head == NPY_MAGIC:
        values, mask = _from_nan(path, _load_array(path, np.load), levels)
    elif head.startswith(b"PK"):  # a zip archive: .npz
        values, mask = _read_npz(path, levels)
    else:
        return (*_read_text(path, alphabet or "0123456789"[:levels]), "text")
    return torch.as_tensor(values, dtype=torch.float32), torch.as_tensor(mask), "array"


def _read_text(path, alphabet):
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file of {alphabet}/{MISSING} lines") from None
    rows, width = [], None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        bad = next((c for c in line if c not in alphabet and c != MISSING), None)
        if bad is not None:
            raise UserError(f"{path}:{number}: unexpected character {bad!r} (lines hold only {' '.join(alphabet)} "
                            f"and {MISSING} for a missing position)")
        if width is None:
            width = len(line)
        elif len(line) != width:
            raise UserError(f"{path}:{number}: sequence of length {len(line)}, but the first has length {width}")
        rows.append(line)
    if not rows:
        raise UserError(f"{path}: no sequences (the file is empty)")
    mask = torch.tensor([[c != MISSING for c in row] for row in rows])
    values = torch.tensor([[float(alphabet.index(c)) if c != MISSING else 0.0 for c in row] for row in rows])
    return values, mask


def _load_array(path, loader):
    try:
        return loader(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read array ({error})") from None


def _read_npz(path, levels):
    archive = _load_array(path, np.load)
    names = sorted(archive.files)
    if names == ["mask", "values"]:
        values, mask = archive["values"], archive["mask"]
        if mask.shape != values.shape:
            raise UserError(f"{path}: mask of shape {mask.shape} but values of shape {values.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise UserError(f"{path}: mask must hold 0/1 or True/False (1 where a position is observed)")
        mask = mask.astype(bool)
        values = np.where(mask, values.astype(np.float64), np.nan)
        return _from_nan(path, values, levels)
    if len(names) == 1:
        return _from_nan(path, archive[names[0]], levels)
    raise UserError(f"{path}: expected arrays 'values' and 'mask', or one array with NaN for missing "
                    f"(found {', '.join(names) or 'none'})")


def _from_nan(path, array, levels):
    """A 2-D array with NaN at missing positions -> (values with 0 there, observed mask)."""
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{path}: expected a non-empty 2-D array (got shape {array.shape})")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise UserError(f"{path}: expected numbers (got dtype {array.dtype})")
    array = array.astype(np.float64)
    mask = ~np.isnan(array)
    bad = mask & ~np.isin(array, np.arange(levels))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        allowed = "0 or 1" if levels == 2 else f"integers 0..{levels - 1}"
        raise UserError(f"{path}: row {row}, column {col} holds {array[row, col].item()!r} "
                        f"(values must be {allowed}, or NaN for missing)")
    return np.where(mask, array, 0.0), mask


def completion_lines(completions, alphabet):
    """(B, S, n) completions -> text, S lines per row, rows in order."""
    alphabet = alphabet or "0123456789"
    return "".join("".join(alphabet[int(c)] for c in line) + "\n"
                   for row in completions.tolist() for line in row)


def marginal_lines(marginals):
    """(B, n, K) marginals -> one line per row: P(x_i = 1) per position for bits, else the K
    probabilities of each position joined by '/'."""
    marginals = np.asarray(marginals)
    if marginals.shape[-1] == 2:
        return "".join(" ".join(f"{p:.4f}" for p in row[:, 1]) + "\n" for row in marginals)
    return "".join(" ".join("/".join(f"{p:.4f}" for p in position) for position in row) + "\n"
                   for row in marginals)


def evidence_csv(log_evidence, se, ess):
    """The smc evidence per row: row, log p(x_observed) in nats, its standard error, the ESS."""
    rows = zip(np.asarray(log_evidence).tolist(), np.asarray(se).tolist(), np.asarray(ess).tolist())
    return "row,log_evidence_nats,se_nats,ess\n" + "".join(
        f"{i},{lz:.6f},{s:.6f},{e:.1f}\n" for i, (lz, s, e) in enumerate(rows))


def imputation_arrays(result):
    """The arrays of an ``Imputation`` for an .npz: completions (B, S, n), marginals (B, n, K),
    probs (B, n) for bits, and log_evidence, log_evidence_se, ess where the method gives them."""
    arrays = {"completions": result.completions.numpy(), "marginals": result.marginals.numpy()}
    if result.marginals.shape[-1] == 2:
        arrays["probs"] = result.probs.numpy()
    for name in ("log_evidence", "log_evidence_se", "ess"):
        if getattr(result, name) is not None:
            arrays[name] = getattr(result, name).numpy()
    return arrays
