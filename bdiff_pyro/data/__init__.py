"""Data sets: generated (heartbeat), read from files (text, .npy, .npz), or shipped with a package
(scikit-learn's 8x8 digits).  ``load_dataset`` turns a data config into a ``Dataset``."""

from bdiff_pyro.data.datasets import Dataset, heartbeat, read_npz, read_sequences
from bdiff_pyro.errors import UserError

__all__ = ["Dataset", "load_dataset"]


def load_dataset(data_config):
    """The training and held-out sequences a data config (``bdiff_pyro.config.DataConfig``,
    read by attribute) describes."""
    if data_config.kind == "heartbeat":
        patterns = heartbeat(data_config.n, data_config.period, data_config.levels)
        # The data distribution is uniform over the shifts; held-out scoring uses all of them.
        return Dataset(train=patterns, val=patterns, support=patterns)
    if data_config.kind == "digits":
        from bdiff_pyro.data.digits import digits_splits  # scikit-learn: imported only when used

        splits = digits_splits(binary=data_config.levels == 2, seed=data_config.split_seed)
        return Dataset(train=splits["train"], val=splits["val"])
    if data_config.kind == "npz":
        splits = read_npz(data_config.file, data_config.levels)
        return Dataset(train=splits["train"], val=splits["valid"], test=splits["test"])
    levels, alphabet = data_config.levels, data_config.alphabet
    train = read_sequences(data_config.train, levels, alphabet, data_config.kind)
    val = read_sequences(data_config.val, levels, alphabet, data_config.kind)
    if train.shape[1] != val.shape[1]:
        raise UserError(f"{data_config.val}: sequences of length {val.shape[1]}, "
                        f"but {data_config.train} has length {train.shape[1]}")
    return Dataset(train=train, val=val)
