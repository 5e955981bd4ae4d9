"""Saving and loading checkpoints atomically.

A checkpoint is a dict holding the model's spec (``programs.spec.ModelSpec``, as a dict) and the
resolved configuration next to the weights, so it reloads without guessing how it was made.
It holds only tensors, numbers, strings and plain containers, and is read with
``torch.load(weights_only=True)``: a checkpoint from someone else cannot run code when it is
loaded.  Format 2 adds nothing but that promise; format-1 checkpoints that keep it load as
well.  A checkpoint written before the spec was saved is rebuilt from the spec its saved
config and ``n`` describe.
"""

import errno
import io
import os
import pickle
import typing
from pathlib import Path

import torch

from bdiff_pyro.config import Config, config_from_dict, model_spec
from bdiff_pyro.distributed import resolve_device
from bdiff_pyro.errors import UserError
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.programs.spec import ModelSpec
from bdiff_pyro.util.files import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"  # the last step, with everything --resume needs
BEST_NAME = "best.pt"  # the weights with the best held-out ELBO: the run's selected model
FORMAT = 2
READABLE_FORMATS = (1, 2)
REQUIRED_KEYS = ("config", "n", "model_state")


def save_atomically(payload, path):
    """torch.save to a temporary file in the same directory, then rename over ``path``
    (``util.files.write_atomically``).

    The payload is serialised in memory first, so that a full disk or a read-only directory
    is an OSError of the write (a UserError naming the file) rather than torch's
    "unexpected pos" from inside its zip writer; ``path`` keeps its previous content.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        write_atomically(path, lambda temporary: temporary.write_bytes(buffer.getbuffer()))
    except OSError as error:
        raise UserError(f"{path}: cannot write checkpoint ({_reason(error)})") from None


def _reason(error):
    """An OSError -> its one-line reason, e.g. 'No space left on device'."""
    return error.strerror or os.strerror(error.errno or errno.EIO)


def checkpoint_path(path, last=False):
    """A run directory or a checkpoint file -> the checkpoint file.

    In a run directory: the selected model (``best.pt``, the weights whose figures the run
    reports) when there is one, else ``checkpoint.pt``; ``last=True`` always reads
    ``checkpoint.pt``, the state ``--resume`` continues from."""
    path = Path(path)
    if path.is_dir():
        selected = path / BEST_NAME
        path = selected if selected.is_file() and not last else path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint here (expected a run directory or a {CHECKPOINT_NAME} file)")
    return path


def read_checkpoint(path, last=False):
    """(checkpoint file, payload dict), loaded without running any code the file carries;
    a run directory is read as :func:`checkpoint_path` says; its tensors on the CPU whatever
    device wrote them (the model moves to its device after)."""
    path = checkpoint_path(path, last)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):  # not a Python object refused by weights_only: a foreign or broken file
            raise UserError(f"{path}: not a readable checkpoint (UnpicklingError)") from None
        raise UserError(f"{path}: checkpoint holds Python objects that could run code when loaded; refusing it "
                        f"(bdiff_pyro checkpoints of format {' and '.join(map(str, READABLE_FORMATS))} "
                        "hold only tensors, numbers, strings and containers)") from None
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    version = payload.get("format") if isinstance(payload, dict) else None
    if version not in READABLE_FORMATS:
        raise UserError(f"{path}: not a bdiff_pyro checkpoint of format "
                        f"{' or '.join(map(str, READABLE_FORMATS))} (format: {version!r})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UserError(f"{path}: checkpoint (format {version}) lacks {', '.join(missing)}")
    return path, payload


def spec_from_payload(path, payload) -> ModelSpec:
    """The checkpoint's model spec; for a checkpoint without one, the spec its saved config
    and ``n`` describe (the data section gives only the number of states per position)."""
    if "spec" not in payload:
        return model_spec(config_from_dict(payload["config"], where=str(path)), payload["n"])
    try:
        return ModelSpec.from_dict(payload["spec"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: checkpoint (format {payload['format']}) has an unreadable spec "
                        f"({type(error).__name__}: {error})") from None


def process_from_payload(path, payload) -> ReverseProcess:
    """Rebuild the reverse process a checkpoint describes and load its weights."""
    process = ReverseProcess.from_spec(spec_from_payload(path, payload))
    # kernel tables are rebuilt from the spec (early checkpoints also stored them)
    weights = {k: v for k, v in payload["model_state"].items() if not k.startswith("kernel.")}
    try:
        process.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise UserError(f"{path}: weights do not match the model the checkpoint describes ({first})") from None
    problem = non_finite_model(process)
    if problem:
        raise UserError(f"{path}: {problem}; the run that wrote it diverged, it cannot be sampled or evaluated")
    return process


def process_from_checkpoint(path, payload) -> typing.Tuple[Config, ReverseProcess]:
    """(the checkpoint's Config, its reverse process with the saved weights)."""
    config = config_from_dict(payload["config"], where=str(path))
    return config, process_from_payload(path, payload)


def non_finite_model(process, probes=64):
    """None for a usable model, else what is wrong: a weight that is inf or NaN, or a
    log-probability that is NaN at x^t = all zeros / all ones, at up to ``probes`` evenly
    spaced steps t (finite but huge weights give inf - inf inside the network)."""
    for name, value in process.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"weight {name} is not finite"
    times = torch.linspace(1, process.T, min(probes, process.T)).round().long().unique().tolist()
    states = torch.stack([torch.zeros(process.n), torch.ones(process.n)]).to(process.kernel.log_pi)
    with torch.no_grad():
        for t in times:
            if torch.isnan(process.log_probs(states, t)).any():
                return f"the model's log-probabilities at step t = {t} are NaN"
    return None


def load_with_config(path, device="cpu"):
    """A run directory or checkpoint file -> (its Config, its ReverseProcess in eval mode on
    ``device``: cpu, cuda or auto, whatever device the checkpoint was written from)."""
    path, payload = read_checkpoint(path)
    config, process = process_from_checkpoint(path, payload)
    return config, process.to(resolve_device(device)).eval()


def load(path, device="cpu") -> ReverseProcess:
    """``bdiff_pyro.load``: a run directory or checkpoint file -> ReverseProcess (eval mode) on
    ``device`` (cpu, cuda or auto)."""
    path, payload = read_checkpoint(path)
    return process_from_payload(path, payload).to(resolve_device(device)).eval()
