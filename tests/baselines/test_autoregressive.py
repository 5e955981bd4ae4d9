"""FVSBN and MADE: exact normalisation over every state, brute-force conditionals, the
autoregressive property, sampling frequencies, and recovery of a known FVSBN."""

import itertools
import math

import numpy as np
import pytest
import torch

from bdiff_pyro.baselines.autoregressive import FVSBN, MADE, random_orderings


def all_states(n):
    """Every binary row of length n, (2^n, n) float64."""
    return torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=torch.float64)


def random_fvsbn(n, scale=2.0, seed=0):
    torch.manual_seed(seed)
    model = FVSBN(n)
    with torch.no_grad():
        model.weight.normal_(0, scale)  # the upper triangle too: the model must ignore it
        model.bias.normal_(0, scale)
    return model


def random_made(n, num_orderings, hidden=(12,), seed=0, skip_connections=False):
    torch.manual_seed(seed)
    orderings = None if num_orderings == 1 else random_orderings(num_orderings, n, generator=seed)
    model = MADE(n, hidden, orderings, skip_connections)
    with torch.no_grad():  # far from the near-uniform initialisation
        for p in model.parameters():
            p.mul_(4.0)
    return model


def brute_force_fvsbn_log_prob(weight, bias, row):
    """log prod_d sigmoid(+-(b_d + sum_{j<d} W_dj x_j)), written out with Python floats."""
    total = 0.0
    for d, bit in enumerate(row):
        logit = bias[d] + sum(weight[d][j] * row[j] for j in range(d))
        p_one = 1.0 / (1.0 + math.exp(-logit))
        total += math.log(p_one if bit == 1 else 1.0 - p_one)
    return total


MODELS = {
    "fvsbn": lambda n: random_fvsbn(n),
    "made": lambda n: random_made(n, 1),
    "made-skip": lambda n: random_made(n, 1, skip_connections=True),
    "made-ensemble": lambda n: random_made(n, 4),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [4, 5])
def test_probabilities_sum_to_one_over_every_state(name, n):
    model = MODELS[name](n)
    log_probs = model.log_prob(all_states(n))
    assert log_probs.dtype == torch.float64
    assert abs(float(torch.exp(log_probs).sum()) - 1.0) < 1e-12
    assert float(log_probs.max() - log_probs.min()) > 1.0  # not a near-uniform model


def test_fvsbn_log_prob_is_the_product_of_its_logistic_conditionals():
    n = 5
    model = random_fvsbn(n, seed=3)
    weight, bias = model.weight.tolist(), model.bias.tolist()
    states = all_states(n)
    expected = [brute_force_fvsbn_log_prob(weight, bias, [int(b) for b in row]) for row in states.tolist()]
    assert torch.allclose(model.log_prob(states), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("skip_connections", [False, True])
def test_made_output_for_a_bit_ignores_that_bit_and_every_later_one(skip_connections):
    n = 7
    model = random_made(n, 3, seed=5, skip_connections=skip_connections)
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(2, (32, n), generator=generator).double()
    for k, ordering in enumerate(model.orderings()):
        assert sorted(ordering.tolist()) == list(range(n))
        assert ordering.tolist() != list(range(n))  # a random ordering, not the natural one
        logits = model.logits(x, k)
        for position, d in enumerate(ordering.tolist()):
            later = ordering[position:]  # bit d itself and the bits after it in this ordering
            changed = x.clone()
            changed[:, later] = torch.randint(2, (32, len(later)), generator=generator).double()
            assert torch.equal(model.logits(changed, k)[:, d], logits[:, d])
            if position > 0:  # and the bits before it do matter (the mask is not all zeros)
                earlier = ordering[:position]
                flipped = x.clone()
                flipped[:, earlier] = 1 - flipped[:, earlier]
                assert not torch.equal(model.logits(flipped, k)[:, d], logits[:, d])


def test_made_ensemble_is_the_mean_of_its_members_probabilities():
    n = 4
    model = random_made(n, 3, seed=2)
    states = all_states(n)
    members = []
    for k, ordering in enumerate(model.orderings()):
        probs = torch.sigmoid(model.logits(states, k)).detach()
        members.append(torch.where(states == 1, probs, 1 - probs).prod(-1))
        assert abs(float(members[-1].sum()) - 1.0) < 1e-12
    expected = torch.stack(members).mean(0)
    assert torch.allclose(torch.exp(model.log_prob(states)), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_sample_frequencies_match_the_probabilities(name):
    n, num = 4, 40000
    model = MODELS[name](n)
    samples = model.sample(num, generator=7)
    assert samples.shape == (num, n) and set(samples.unique().tolist()) <= {0.0, 1.0}
    index = (samples * 2 ** torch.arange(n - 1, -1, -1, dtype=torch.float64)).sum(-1).long()  # all_states order
    counts = torch.bincount(index, minlength=2 ** n).double()
    probs = torch.exp(model.log_prob(all_states(n)))
    standard_errors = torch.sqrt(num * probs * (1 - probs))
    assert bool((torch.abs(counts - num * probs) <= 4 * standard_errors + 1e-9).all())
    assert torch.equal(model.sample(50, generator=3), model.sample(50, generator=3))


def test_fitted_fvsbn_comes_near_the_true_model():
    """Data from a known 6-bit FVSBN: the fitted model's exact cross-entropy to the truth is
    within 0.01 nats of the truth's entropy (KL < 0.01; about 21 parameters / (2 * 20000)
    is expected), and it beats the independent-bits model by far."""
    n = 6
    truth = random_fvsbn(n, scale=1.5, seed=11)
    weight, bias = truth.weight.tolist(), truth.bias.tolist()
    states = all_states(n)
    true_log_probs = torch.tensor([brute_force_fvsbn_log_prob(weight, bias, [int(b) for b in row])
                                   for row in states.tolist()], dtype=torch.float64)
    true_probs = torch.exp(true_log_probs)
    entropy = -float((true_probs * true_log_probs).sum())
    train, valid = truth.sample(20000, generator=1), truth.sample(5000, generator=2)
    fitted = FVSBN.fit(train, valid, weight_decays=(0.1, 0.01, 0.001, 0.0001))
    cross_entropy = -float((true_probs * fitted.log_prob(states)).sum())
    assert 0 <= cross_entropy - entropy < 0.01
    marginals = (true_probs[:, None] * states).sum(0)
    independent = -float((true_probs * (states * torch.log(marginals) + (1 - states) * torch.log1p(-marginals))
                          .sum(-1)).sum())
    assert independent - entropy > 0.2
    assert fitted.weight_decay in (0.01, 0.001, 0.0001) and len(fitted.selection) == 4


def test_made_fit_learns_a_dependency_the_independent_model_cannot():
    """x_0, x_2 fair coins and x_1 = x_0: 2 log 2 nats per row is the truth; independent bits give 3 log 2."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(2, (400, 1), generator=generator).double()
    train = torch.cat([first, first, torch.randint(2, (400, 1), generator=generator).double()], dim=1)
    first = torch.randint(2, (200, 1), generator=generator).double()
    valid = torch.cat([first, first, torch.randint(2, (200, 1), generator=generator).double()], dim=1)
    model = MADE.fit(train, valid, hidden_grid=((8,),), weight_decays=(0.0,), learning_rate=0.03, max_epochs=60,
                     patience=10)
    truth = 2 * math.log(2)
    assert -float(model.log_prob(valid).mean()) < truth + 0.05


def test_bad_input_is_refused():
    model = random_fvsbn(3)
    with pytest.raises(ValueError, match="0/1"):
        model.log_prob(np.array([[0, 2, 1]]))
    with pytest.raises(ValueError, match="2-D"):
        model.log_prob(np.array([0, 1, 1]))
