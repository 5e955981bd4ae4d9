"""The binarised digits data set and the exact-likelihood baselines it is compared with."""

import math

import numpy as np
import pytest
import torch

from bdiff_pyro.baselines.mixture import (
    BernoulliMixture,
    IndependentBernoulli,
    all_sequences,
    bits_per_sequence,
    fit_mixture,
    select_mixture,
)
from bdiff_pyro.data.datasets import Dataset
from bdiff_pyro.data.digits import (
    binarise,
    digits_dataset,
    digits_splits,
    grey_levels,
    quantise,
    split_indices,
)
from bdiff_pyro.plots import image_grid


@pytest.fixture(scope="module")
def splits():
    return digits_splits()


def _keys(x):
    return [row.tobytes() for row in np.asarray(x, dtype=np.uint8)]


# -- data -------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covers_every_image():
    train, val, test = split_indices(1797, seed=0)
    again = split_indices(1797, seed=0)
    for a, b in zip((train, val, test), again):
        np.testing.assert_array_equal(a, b)
    assert (len(train), len(val), len(test)) == (1258, 270, 269)
    everything = np.concatenate([train, val, test])
    assert len(set(everything.tolist())) == 1797 and sorted(everything.tolist()) == list(range(1797))
    other = split_indices(1797, seed=1)
    assert not np.array_equal(train, other[0])


def test_splits_are_binary_float32_tensors_of_64_pixels(splits):
    grey = grey_levels()
    assert grey.shape == (1797, 64) and grey.min() == 0 and grey.max() == 16
    train, val, test = split_indices(1797, seed=0)
    for name, index in (("train", train), ("val", val), ("test", test)):
        x = splits[name]
        assert x.dtype == torch.float32 and x.shape == (len(index), 64)
        assert set(torch.unique(x).tolist()) == {0.0, 1.0}
        np.testing.assert_array_equal(x.numpy(), (grey[index] >= 8).astype(np.float32))
    again = digits_splits()
    assert all(torch.equal(splits[k], again[k]) for k in splits)


def test_binarisation_rule_is_grey_level_at_least_eight():
    np.testing.assert_array_equal(binarise(np.arange(17)), [0] * 8 + [1] * 9)
    np.testing.assert_array_equal(binarise(np.arange(17), threshold=3), [0] * 3 + [1] * 14)
    np.testing.assert_array_equal(binarise(np.array([[7, 8], [16, 0]])), [[0, 1], [1, 0]])  # shape kept


def test_quantisation_has_four_equal_width_levels():
    levels = quantise(np.arange(17))
    np.testing.assert_array_equal(levels, [0] * 5 + [1] * 4 + [2] * 4 + [3] * 4)
    np.testing.assert_array_equal(levels, np.floor(np.arange(17) * 4 / 17))
    quantised = digits_splits(binary=False)
    assert set(torch.unique(quantised["train"]).tolist()) == {0.0, 1.0, 2.0, 3.0}


def test_digits_dataset_is_the_train_and_validation_split(splits):
    dataset = digits_dataset()
    assert isinstance(dataset, Dataset) and dataset.n == 64 and dataset.support is None
    assert torch.equal(dataset.train, splits["train"]) and torch.equal(dataset.val, splits["val"])


def test_image_grid_tiles_images_in_reading_order():
    images = np.arange(3 * 64).reshape(3, 64) % 2
    grid = image_grid(images, columns=2, pad=1)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1)
    np.testing.assert_array_equal(grid[1:9, 10:18], images[1].reshape(8, 8))
    assert (grid[10:18, 10:18] == -1).all()  # the empty fourth tile


# -- baselines --------------------------------------------------------------------------


def _brute_force_log_prob(x, weights, probs):
    """log sum_k w_k prod_d p_kd^x_d (1 - p_kd)^(1 - x_d), one product at a time."""
    out = []
    for row in x:
        total = 0.0
        for w, p in zip(weights, probs):
            term = w
            for bit, q in zip(row, p):
                term *= q if bit else 1.0 - q
            total += term
        out.append(math.log(total))
    return np.array(out)


def _tiny_data(num=60, n=5, seed=0, clusters=3):
    """Draws from a random mixture of ``clusters`` product-Bernoulli distributions."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.05, 0.95, size=(clusters, n))
    return (rng.random((num, n)) < centres[rng.integers(clusters, size=num)]).astype(np.float64)


@pytest.mark.parametrize("alpha, gamma", [(0.0, 0.0), (0.5, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("num_components", [2, 4])
def test_em_objective_never_decreases(num_components, alpha, gamma):
    x = _tiny_data(num=80, n=6, seed=num_components)
    model = fit_mixture(x, num_components, alpha=alpha, gamma=gamma, max_iter=200, tol=0.0, seed=3)
    history = np.array(model.history)
    assert len(history) > 5
    assert (np.diff(history) >= -1e-9).all(), np.diff(history).min()
    assert history[-1] == pytest.approx(model.log_posterior(x), abs=1e-9) or not model.converged


def test_em_log_likelihood_never_decreases_on_digits(splits):
    # Flat prior (alpha = gamma = 0): the objective is the log-likelihood itself.
    model = fit_mixture(splits["train"][:400], 10, alpha=0.0, gamma=0.0, max_iter=60, tol=0.0, seed=0)
    assert (np.diff(model.history) >= -1e-9).all()


def test_mixture_log_prob_equals_brute_force():
    rng = np.random.default_rng(1)
    num_components, n = 3, 4
    weights = rng.dirichlet(np.ones(num_components))
    probs = rng.uniform(0.05, 0.95, size=(num_components, n))
    model = BernoulliMixture(np.log(weights), probs)
    x = all_sequences(n)
    np.testing.assert_allclose(model.log_prob(x), _brute_force_log_prob(x, weights, probs), rtol=0, atol=1e-12)
    fitted = fit_mixture(_tiny_data(), 3, alpha=0.5, seed=0)
    data = _tiny_data(num=10, seed=5)
    np.testing.assert_allclose(fitted.log_prob(data),
                               _brute_force_log_prob(data, np.exp(fitted.log_weights), fitted.probs), atol=1e-12)


@pytest.mark.parametrize("num_components, alpha", [(1, 1.0), (3, 0.5), (6, 0.0)])
def test_mixture_probabilities_sum_to_one(num_components, alpha):
    n = 6
    model = fit_mixture(_tiny_data(n=n, seed=2), num_components, alpha=alpha, seed=1)
    total = np.exp(model.log_prob(all_sequences(n))).sum()
    assert total == pytest.approx(1.0, abs=1e-12)
    assert np.exp(model.log_weights).sum() == pytest.approx(1.0, abs=1e-12)
    assert ((model.probs > 0) & (model.probs < 1)).all()


def test_one_component_mixture_is_the_independent_baseline(splits):
    train, test = splits["train"], splits["test"]
    independent = IndependentBernoulli.fit(train)
    mixture = fit_mixture(train, 1, alpha=1.0, gamma=1.0)
    np.testing.assert_allclose(mixture.probs[0], independent.probs, atol=1e-12)
    np.testing.assert_allclose(mixture.log_prob(test), independent.log_prob(test), atol=1e-9)
    x = train.numpy().astype(np.float64)
    np.testing.assert_allclose(independent.probs, (x.sum(0) + 1) / (len(x) + 2))  # Laplace's rule
    assert np.isfinite(independent.log_prob(test)).all()


def test_independent_baseline_sums_to_one_and_reports_bits():
    x = _tiny_data(n=5, clusters=1)
    model = IndependentBernoulli.fit(x)
    assert np.exp(model.log_prob(all_sequences(5))).sum() == pytest.approx(1.0, abs=1e-12)
    bits, se = bits_per_sequence(np.log(np.full(4, 0.25)))
    assert bits == pytest.approx(2.0) and se == pytest.approx(0.0)


def test_model_selection_prefers_more_components_on_clustered_data():
    rng = np.random.default_rng(0)
    centres = (rng.random((4, 12)) < 0.5).astype(float)

    def draw(num):  # a random centre with 5% of its bits flipped
        return np.abs(centres[rng.integers(4, size=num)] - (rng.random((num, 12)) < 0.05))

    model, rows = select_mixture(draw(400), draw(200), components=(1, 4), alphas=(0.5,), restarts=2)
    assert model.num_components == 4 and len(rows) == 2
    assert rows[1]["val_bits"] < rows[0]["val_bits"]
