"""Real binary data: scikit-learn's 8x8 handwritten digits, binarised, with a fixed split.

``sklearn.datasets.load_digits`` ships with scikit-learn (no download): 1797 images of
8 x 8 = 64 pixels, each a grey level 0..16.  Binarisation rule: a pixel is 1 when its grey
level is >= 8 (``BINARY_THRESHOLD``) and 0 otherwise, so n = 64 bits per image, rows in
reading order (row-major, as ``images.reshape(-1, 64)``).

The split is fixed: a ``numpy.random.default_rng(seed)`` permutation of the 1797 images
(seed 0 unless told), the first 70% for training, the next 15% for validation and the rest
for test (1258 / 270 / 269 images; counts are rounded).  Training uses train and val
(``digits_dataset``); reported numbers are on test (``digits_splits(...)["test"]``).

``quantise`` maps grey levels to 4 levels 0..3 (floor(v * 4 / 17)) for categorical kernels.
"""

import functools

import numpy as np
import torch

from bdiff_pyro.data.datasets import Dataset

BINARY_THRESHOLD = 8  # pixel >= 8 (of 0..16) -> 1
NUM_LEVELS = 4  # quantise: grey 0..16 -> level floor(v * 4 / 17) in 0..3
FRACTIONS = (0.70, 0.15)  # train, val; test is the rest
SIDE = 8  # images are SIDE x SIDE
N = SIDE * SIDE


def grey_levels():
    """All 1797 images as a (1797, 64) int array of grey levels 0..16 (sklearn's order)."""
    return _load_digits()[0].copy()


@functools.lru_cache(maxsize=1)
def _load_digits():
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    return digits.data.astype(np.int64), digits.target.astype(np.int64)


def binarise(grey, threshold=BINARY_THRESHOLD):
    """Grey levels -> bits: 1 where grey >= threshold, else 0 (same shape, int64)."""
    return (np.asarray(grey) >= threshold).astype(np.int64)


def quantise(grey, levels=NUM_LEVELS):
    """Grey levels 0..16 -> levels 0..levels-1 by floor(v * levels / 17) (equal-width bins)."""
    grey = np.asarray(grey)
    return (grey * levels) // 17


def split_indices(num, seed=0, fractions=FRACTIONS):
    """A seeded permutation of range(num) cut into (train, val, test) index arrays."""
    order = np.random.default_rng(seed).permutation(num)
    num_train = int(round(fractions[0] * num))
    num_val = int(round(fractions[1] * num))
    return order[:num_train], order[num_train:num_train + num_val], order[num_train + num_val:]


def digits_splits(binary=True, seed=0, levels=NUM_LEVELS):
    """{"train", "val", "test"} -> float32 tensors (num, 64): bits (binary=True) or the
    ``levels``-level quantisation (binary=False)."""
    grey = grey_levels()
    codes = binarise(grey) if binary else quantise(grey, levels)
    train, val, test = split_indices(len(codes), seed)
    return {name: torch.as_tensor(codes[index], dtype=torch.float32)
            for name, index in (("train", train), ("val", val), ("test", test))}


def digits_labels(seed=0):
    """The digit classes (0..9) of the same split, for inspection: {"train", "val", "test"}."""
    target = _load_digits()[1]
    train, val, test = split_indices(len(target), seed)
    return {"train": target[train], "val": target[val], "test": target[test]}


def digits_dataset(split_seed=0):
    """The binarised digits as a bdiff_pyro Dataset (train and val; test is held back)."""
    splits = digits_splits(binary=True, seed=split_seed)
    return Dataset(train=splits["train"], val=splits["val"])
