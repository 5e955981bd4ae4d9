"""Building a model from its configuration, and saving / loading checkpoints atomically.

A checkpoint is a dict holding the resolved configuration next to the weights, so it
reloads without guessing how it was made.
"""

import os
import tempfile
from pathlib import Path

import torch

from .config import config_from_dict
from .errors import UserError
from .kernels import make_beta_tilde, make_kernel
from .reverse import ReverseNet, ReverseProcess

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


def build_kernel(model_config, levels=2):
    """The kernel of a ModelConfig (whose pi_1 is already a number) for data with ``levels``
    states per position."""
    beta_tilde = make_beta_tilde(model_config.schedule, model_config.T, model_config.schedule_power)
    return make_kernel(model_config.kernel, beta_tilde, levels, model_config.pi_1)


def build_process(model_config, n, levels=2):
    """A freshly initialised reverse process for sequences of length n."""
    kernel = build_kernel(model_config, levels)
    net = ReverseNet(n, kernel.num_states, hidden=tuple(model_config.hidden),
                     activation=model_config.activation, time_embedding=model_config.time_embedding,
                     num_features=ReverseProcess.num_features(kernel, model_config.inputs),
                     film=model_config.film)
    return ReverseProcess(kernel, net, model_config.parameterisation, model_config.inputs,
                          model_config.add_own_evidence).float()


def save_atomically(payload, path):
    """torch.save to a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary result file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def checkpoint_path(path):
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint here (expected a run directory or a {CHECKPOINT_NAME} file)")
    return path


def read_checkpoint(path):
    path = checkpoint_path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: any unpickling error
        raise UserError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a bdiff_pyro checkpoint (format {FORMAT})")
    return path, payload


def process_from_checkpoint(path, payload):
    """Rebuild the reverse process a checkpoint describes and load its weights."""
    config = config_from_dict(payload["config"], where=str(path))
    process = build_process(config.model, payload["n"], config.data.levels)
    # kernel tables are rebuilt from the config (early checkpoints also stored them)
    weights = {k: v for k, v in payload["model_state"].items() if not k.startswith("kernel.")}
    try:
        process.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise UserError(f"{path}: weights do not match the model its config describes ({first})") from None
    return config, process


def load_with_config(path):
    """A run directory or checkpoint file -> (its Config, its ReverseProcess in eval mode)."""
    path, payload = read_checkpoint(path)
    config, process = process_from_checkpoint(path, payload)
    return config, process.eval()


def load(path):
    """``bdiff_pyro.load``: a run directory or checkpoint file -> ReverseProcess (eval mode)."""
    return load_with_config(path)[1]
