"""Writing results without ever leaving a partial file or overwriting an earlier run: one atomic
write, one fresh output directory, one exclusive claim of a file name, one CSV writer."""

import csv
import os
import tempfile
from datetime import datetime
from pathlib import Path

from bdiff_pyro.errors import UserError


def write_atomically(path, write):
    """Call ``write(temporary)`` to fill a temporary file beside ``path``, flush it to disk, then
    rename it over ``path``: an error or Ctrl-C leaves ``path`` as it was and no temporary file.

    The file gets the permissions of an ordinary new file (0666 less the user's umask; mkstemp
    alone would give 0600).  OSError propagates: the caller names what it was writing.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _umask():
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def fresh_directory(stem, out=None, root="runs", flag="--out"):
    """A new, empty output directory: ``out`` if given (absent or empty; a directory holding
    anything is refused, so an earlier run is never overwritten), otherwise
    <root>/<stem>-<timestamp>[-k], created exclusively so two concurrent calls get two."""
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"{flag} {out}: exists and is not a directory")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out}: directory exists and is not empty; refusing to overwrite an earlier run")
        _make_directory(out, exist_ok=True, flag=flag)
        return out
    stamped = f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1, 1000):
        candidate = Path(root) / (stamped if k == 1 else f"{stamped}-{k}")
        if _make_directory(candidate, exist_ok=False, flag="the run directory"):
            return candidate
    raise UserError(f"{root}: cannot find a free run directory name for {stamped}")


def _make_directory(path, exist_ok, flag):
    """mkdir -p; False if ``path`` exists and not ``exist_ok``; a UserError if it cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
        return True
    except FileExistsError:
        if path.is_dir():
            return False
        raise UserError(f"{flag} {path}: exists and is not a directory") from None
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot create directory ({error.strerror})") from None


def claim_file(path):
    """Create ``path`` empty if no file has that name; False if one has (a concurrent writer
    that claims the same name gets False)."""
    try:
        Path(path).open("x").close()
        return True
    except FileExistsError:
        return False


def write_csv(path, rows, fields=None, exclusive=False):
    """Rows (dicts) as a CSV file with a header; ``fields`` the columns (default: the first
    row's keys; other keys are left out); ``exclusive``: refuse an existing file (FileExistsError).
    Nothing is written for no rows and no fields."""
    rows = list(rows)
    if fields is None:
        if not rows:
            return
        fields = list(rows[0])
    with open(path, "x" if exclusive else "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
