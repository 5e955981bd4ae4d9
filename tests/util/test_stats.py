"""The shared statistics against sums written out in float64 Python arithmetic."""

import math

import numpy as np
import pytest
import torch

from bdiff_pyro.util.stats import (
    distinct_held_out,
    effective_sample_size,
    log_mean_exp_with_se,
    mean_and_standard_error,
    membership_fractions,
    pattern_codes,
    row_membership,
)


def _reference_mean_and_se(rows, weights):
    """sum_j w_j m_j and sqrt(sum_j w_j^2 s_j^2 / R), with Python floats."""
    reps = len(rows[0])
    means = [sum(row) / reps for row in rows]
    variances = [sum((v - m) ** 2 for v in row) / (reps - 1) for row, m in zip(rows, means)]
    mean = sum(w * m for w, m in zip(weights, means))
    se = math.sqrt(sum(w * w * s for w, s in zip(weights, variances)) / reps)
    return mean, se


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_and_standard_error_is_the_weighted_formula(weighted):
    rows = [[1.0, 2.0, 4.0], [-3.0, 0.5, 0.25], [10.0, 10.0, 13.0], [0.0, -1.0, 7.0]]
    weights = [0.1, 0.2, 0.3, 0.4] if weighted else [0.25] * 4
    mean, se = mean_and_standard_error(torch.tensor(rows, dtype=torch.float64),
                                       torch.tensor(weights, dtype=torch.float64) if weighted else None)
    expected_mean, expected_se = _reference_mean_and_se(rows, weights)
    assert mean == pytest.approx(expected_mean, rel=1e-14)
    assert se == pytest.approx(expected_se, rel=1e-14)


def test_mean_and_standard_error_needs_two_replicates():
    with pytest.raises(ValueError, match="at least two replicates"):
        mean_and_standard_error(torch.zeros(3, 1))


def test_log_mean_exp_with_se_against_the_direct_formula_and_far_from_zero():
    log_w = torch.tensor([[-1.0, 0.5, 2.0, -3.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    estimate, se = log_mean_exp_with_se(log_w)
    for row, value, error in zip(log_w.tolist(), estimate.tolist(), se.tolist()):
        w = [math.exp(v) for v in row]
        mean = sum(w) / len(w)
        sd = math.sqrt(sum((x - mean) ** 2 for x in w) / (len(w) - 1))
        assert value == pytest.approx(math.log(mean), rel=1e-14, abs=1e-15)
        assert error == pytest.approx(sd / (math.sqrt(len(w)) * mean), rel=1e-13, abs=1e-15)
    # exp(1000) overflows; the estimate shifts by the constant and its relative error does not change
    shifted, shifted_se = log_mean_exp_with_se(log_w + 1000.0)
    assert torch.allclose(shifted - 1000.0, estimate, rtol=0, atol=1e-12)
    assert torch.allclose(shifted_se, se, rtol=1e-12, atol=1e-15)


def test_effective_sample_size_is_kish_formula():
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, math.log(0.5), -50.0]], dtype=torch.float64)
    ess = effective_sample_size(log_w).tolist()
    assert ess[0] == pytest.approx(4.0, rel=1e-14)
    w = [3.0, 1.0, 0.5, math.exp(-50.0)]
    assert ess[1] == pytest.approx(sum(w) ** 2 / sum(x * x for x in w), rel=1e-14)


TRAIN = np.array([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
VAL = np.array([[0, 1, 1], [0, 0, 0], [2, 0, 1]])  # the first row is also a training row
SAMPLES = np.array([[1, 1, 1], [0, 0, 0], [2, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 0]])


def test_row_membership_by_hand():
    is_train, is_held_out = row_membership(SAMPLES, TRAIN, VAL)
    assert is_train.tolist() == [True, False, False, False, True, False]
    assert is_held_out.tolist() == [False, True, True, False, False, True]
    assert distinct_held_out(TRAIN, VAL) == 2
    assert membership_fractions(SAMPLES, TRAIN, VAL) == {"train": 2 / 6, "held_out": 3 / 6, "neither": 1 / 6}


def test_membership_reads_tensors_of_any_dtype_as_it_reads_arrays():
    as_tensors = [torch.tensor(a, dtype=torch.float32) for a in (SAMPLES, TRAIN, VAL)]
    assert membership_fractions(*as_tensors) == membership_fractions(SAMPLES, TRAIN, VAL)
    assert distinct_held_out(as_tensors[1], as_tensors[2].long()) == 2


def test_pattern_codes_by_hand():
    patterns = np.array([[0, 0, 0], [1, 1, 1]])
    assert pattern_codes(SAMPLES, patterns).tolist() == [1, 0, 2, 2, 2, 0]
