"""Autoregressive baselines for binary data (torch, float64): FVSBN and MADE.

Both factorise p(x) = prod_k p(x_{o_k} | x_{o_1}, ..., x_{o_{k-1}}) over an ordering o of the
bits, each conditional a Bernoulli with logit l_d(x) that depends only on the bits before d:

    log p(x) = sum_d [x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d)] = sum_d [x_d l_d - softplus(l_d)]

- ``FVSBN``: fully visible sigmoid belief network, natural order, l_d = b_d + sum_{j<d} W_dj x_j:
  one logistic regression per bit.  Fitted by full-batch L-BFGS on the mean negative
  log-likelihood plus (lambda / 2) ||W||^2 (biases not penalised); lambda chosen on validation.
- ``MADE``: Germain et al. 2015, the masked network being ``pyro.nn.AutoRegressiveNN``.  One
  member is one ordering; an ensemble is several orderings sharing one set of weights
  (``AutoRegressiveNN``'s hidden connectivity is fixed by the ordering, so orderings are what
  vary), trained with a random member per minibatch and evaluated by averaging probabilities,
  log p(x) = logsumexp_k log p_k(x) - log K.  Early stopping on validation; the hidden size is
  chosen on validation.

All log-likelihoods are log p(x) per row in nats, float64.
"""

import copy
import itertools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from pyro.nn import AutoRegressiveNN

FVSBN_WEIGHT_DECAYS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)
MADE_WEIGHT_DECAYS = (0.03, 0.01, 0.003, 0.001, 0.0001)


def as_bits(x):
    """A (N, n) float64 0/1 tensor from a numpy array or a tensor; anything else is an error."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows of bits (got shape {tuple(x.shape)})")
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError("expected 0/1 entries only")
    return x


def as_generator(generator_or_seed):
    """A torch.Generator: the one given, or a new one seeded with the given integer."""
    if isinstance(generator_or_seed, torch.Generator):
        return generator_or_seed
    generator = torch.Generator()
    generator.manual_seed(int(generator_or_seed))
    return generator


def bernoulli_log_prob(x, logits):
    """sum_d [x_d l_d - softplus(l_d)] = sum_d log Bernoulli(x_d | sigmoid(l_d)), per row."""
    return (x * logits - F.softplus(logits)).sum(-1)


def negative_log_likelihood_summary(log_probs):
    """Mean of -log p(x) over rows (nats) and its standard error std / sqrt(rows)."""
    nll = -torch.as_tensor(log_probs, dtype=torch.float64)
    return float(nll.mean()), float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")


def strictly_lower_triangle(n):
    """M_dj = 1 if j < d else 0: bit d may only see the bits before it."""
    return torch.tril(torch.ones(n, n, dtype=torch.float64), diagonal=-1)


class FVSBN(torch.nn.Module):
    """l_d = b_d + sum_{j<d} W_dj x_j (natural order)."""

    def __init__(self, num_bits):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_bits, num_bits, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(num_bits, dtype=torch.float64))
        self.register_buffer("below_diagonal", strictly_lower_triangle(num_bits))
        self.weight_decay = None  # set by fit
        self.selection = []  # validation table of fit

    @property
    def num_bits(self):
        return len(self.bias)

    def visible_weight(self):
        """W with its diagonal and upper triangle zeroed."""
        return self.weight * self.below_diagonal

    def logits(self, x):
        """l = b + x W^T, (N, n)."""
        return self.bias + x @ self.visible_weight().T

    def log_prob(self, x):
        """log p(x) per row, nats, (N,)."""
        x = as_bits(x)
        with torch.no_grad():
            return bernoulli_log_prob(x, self.logits(x))

    def sample(self, num, generator=0):
        """Ancestral sampling, bit 0 first."""
        generator = as_generator(generator)
        x = torch.zeros(num, self.num_bits, dtype=torch.float64)
        with torch.no_grad():
            weight = self.visible_weight()
            for d in range(self.num_bits):
                logit = self.bias[d] + x @ weight[d]
                x[:, d] = (torch.rand(num, generator=generator, dtype=torch.float64) < torch.sigmoid(logit)).double()
        return x

    def penalised_loss(self, x, weight_decay):
        """mean_i -log p(x_i) + (lambda / 2) ||W||^2 (the visible part of W)."""
        return -bernoulli_log_prob(x, self.logits(x)).mean() + 0.5 * weight_decay * self.visible_weight().pow(2).sum()

    def minimise(self, x, weight_decay, max_iter=2000):
        """Full-batch L-BFGS on the convex penalised loss; returns the final gradient's max |entry|."""
        optimiser = torch.optim.LBFGS(self.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                      tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = self.penalised_loss(x, weight_decay)
            loss.backward()
            return loss

        optimiser.step(closure)
        closure()
        return max(float(p.grad.abs().max()) for p in self.parameters())

    @classmethod
    def fit(cls, train, valid, weight_decays=FVSBN_WEIGHT_DECAYS, max_iter=2000, log=None):
        """Fit on train for every lambda (largest first, each warm-started from the previous)
        and keep the one with the best mean validation log-likelihood."""
        train, valid = as_bits(train), as_bits(valid)
        model, best, best_valid = cls(train.shape[1]), None, -math.inf
        with torch.no_grad():  # start from the independent fit with Laplace's rule
            mean = (train.sum(0) + 1) / (len(train) + 2)
            model.bias.copy_(torch.log(mean) - torch.log1p(-mean))
        rows = []
        for weight_decay in sorted(weight_decays, reverse=True):
            started = time.perf_counter()
            gradient = model.minimise(train, weight_decay, max_iter)
            valid_ll = float(model.log_prob(valid).mean())
            row = {"weight_decay": weight_decay, "train_nll": -float(model.log_prob(train).mean()),
                   "valid_nll": -valid_ll, "max_gradient": gradient, "seconds": time.perf_counter() - started}
            rows.append(row)
            if log is not None:
                log(f"  FVSBN lambda={weight_decay:g}: train {row['train_nll']:.3f}  valid {row['valid_nll']:.3f} nats "
                    f"(|grad| {gradient:.1e}, {row['seconds']:.1f} s)")
            if valid_ll > best_valid:
                best, best_valid = copy.deepcopy(model), valid_ll
                best.weight_decay = weight_decay
        best.selection = rows
        return best


def random_orderings(num_orderings, num_bits, generator=0):
    """``num_orderings`` random permutations of range(num_bits) (LongTensors)."""
    generator = as_generator(generator)
    return [torch.randperm(num_bits, generator=generator) for _ in range(num_orderings)]


def natural_ordering(num_bits):
    return [torch.arange(num_bits)]


class MADE(torch.nn.Module):
    """An ensemble of ``pyro.nn.AutoRegressiveNN`` members (one per ordering) with shared weights.

    Member k's output d is the logit of p(x_d = 1 | the bits before d in ordering k);
    log p(x) = logsumexp_k log p_k(x) - log K (K = 1: one mask).
    """

    def __init__(self, num_bits, hidden=(500,), orderings=None, skip_connections=False):
        super().__init__()
        orderings = natural_ordering(num_bits) if orderings is None else orderings
        members = [AutoRegressiveNN(num_bits, list(hidden), param_dims=[1], permutation=torch.as_tensor(o),
                                    skip_connections=skip_connections, nonlinearity=torch.nn.ReLU())
                   for o in orderings]
        members = [member.double() for member in members]  # before tying, so every member holds the same tensors
        for member in members[1:]:  # one set of weights; only the masks differ
            for layer, first in zip(member.layers, members[0].layers):
                layer.weight, layer.bias = first.weight, first.bias
            if skip_connections:
                member.skip_layer.weight = members[0].skip_layer.weight
        self.members = torch.nn.ModuleList(members)
        self.hidden = tuple(hidden)
        self.selection = []  # validation table of fit
        self.epochs = None
        self.weight_decay = None

    @property
    def num_members(self):
        return len(self.members)

    @property
    def num_bits(self):
        return self.members[0].input_dim

    def orderings(self):
        return [member.permutation for member in self.members]

    def logits(self, x, member=0):
        """Member ``member``'s logits, (N, n)."""
        return self.members[member](x)

    def member_log_probs(self, x):
        """log p_k(x), (N, K)."""
        return torch.stack([bernoulli_log_prob(x, self.logits(x, k)) for k in range(self.num_members)], dim=-1)

    def ensemble_log_prob(self, x):
        """logsumexp_k log p_k(x) - log K, differentiable."""
        return torch.logsumexp(self.member_log_probs(x), dim=-1) - math.log(self.num_members)

    def log_prob(self, x):
        """log p(x) per row, nats, (N,)."""
        x = as_bits(x)
        with torch.no_grad():
            return self.ensemble_log_prob(x)

    def sample(self, num, generator=0):
        """Pick a member uniformly for each row, then sample it in its ordering."""
        generator = as_generator(generator)
        member_of_row = torch.randint(self.num_members, (num,), generator=generator)
        x = torch.zeros(num, self.num_bits, dtype=torch.float64)
        with torch.no_grad():
            for k in range(self.num_members):
                rows = member_of_row == k
                xk = torch.zeros(int(rows.sum()), self.num_bits, dtype=torch.float64)
                for d in self.members[k].permutation.tolist():
                    logit = self.logits(xk, k)[:, d]
                    uniform = torch.rand(len(xk), generator=generator, dtype=torch.float64)
                    xk[:, d] = (uniform < torch.sigmoid(logit)).double()
                x[rows] = xk
        return x

    def squared_weights(self):
        """||W||^2 over the connections the masks keep (biases not included)."""
        layers = list(self.members[0].layers)
        if self.members[0].skip_layer is not None:
            layers.append(self.members[0].skip_layer)
        return sum((layer.weight * layer.mask).pow(2).sum() for layer in layers)

    def start_from_marginals(self, train):
        """Output biases at the logits of the training marginals (Laplace's rule), so that
        training starts from the independent-bits model instead of from 125 nats of coin flips."""
        mean = (train.sum(0) + 1) / (len(train) + 2)
        with torch.no_grad():
            self.members[0].layers[-1].bias.copy_(torch.log(mean) - torch.log1p(-mean))

    def train_early_stopping(self, train, valid, learning_rate=3e-3, weight_decay=0.0, batch_size=100,
                             max_epochs=300, patience=30, generator=0, log=None):
        """Adam on minibatches of mean -log p_k(x) + (lambda / 2) ||W||^2 with a random member k
        per minibatch; after each epoch the ensemble's validation log-likelihood; stop after
        ``patience`` epochs without improvement and restore the best weights.  Returns the best
        mean validation log-likelihood."""
        generator = as_generator(generator)
        optimiser = torch.optim.Adam(self.parameters(), lr=learning_rate)
        best_state, best_valid, best_epoch = copy.deepcopy(self.state_dict()), -math.inf, 0
        for epoch in range(1, max_epochs + 1):
            for batch in torch.randperm(len(train), generator=generator).split(batch_size):
                member = int(torch.randint(self.num_members, (), generator=generator))
                x = train[batch]
                nll = -bernoulli_log_prob(x, self.logits(x, member)).mean()
                loss = nll + 0.5 * weight_decay * self.squared_weights()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            valid_ll = float(self.log_prob(valid).mean())
            if not math.isfinite(valid_ll):
                raise FloatingPointError(f"MADE: validation log-likelihood {valid_ll} at epoch {epoch}")
            if valid_ll > best_valid:
                best_state, best_valid, best_epoch = copy.deepcopy(self.state_dict()), valid_ll, epoch
            elif epoch - best_epoch >= patience:
                break
            if log is not None and epoch % 25 == 0:
                log(f"    epoch {epoch}: valid {-valid_ll:.3f} nats (best {-best_valid:.3f} at {best_epoch})")
        self.load_state_dict(best_state)
        self.epochs = best_epoch
        return best_valid

    @classmethod
    def fit(cls, train, valid, hidden_grid=((500,),), weight_decays=MADE_WEIGHT_DECAYS, num_orderings=1,
            learning_rate=3e-3, batch_size=100, max_epochs=300, patience=30, skip_connections=True, seed=0, log=None):
        """One mask (natural order) if ``num_orderings`` is 1, else that many random orderings;
        every (hidden size, lambda) trained with early stopping, the best on validation kept."""
        train, valid = as_bits(train), as_bits(valid)
        num_bits = train.shape[1]
        orderings = (natural_ordering(num_bits) if num_orderings == 1
                     else random_orderings(num_orderings, num_bits, generator=seed))
        best, best_valid, rows = None, -math.inf, []
        for hidden, weight_decay in itertools.product(hidden_grid, weight_decays):
            started = time.perf_counter()
            torch.manual_seed(seed)  # the weights' initialisation
            model = cls(num_bits, hidden, orderings, skip_connections)
            model.start_from_marginals(train)
            valid_ll = model.train_early_stopping(train, valid, learning_rate, weight_decay, batch_size, max_epochs,
                                                  patience, generator=seed, log=log)
            model.weight_decay = weight_decay
            row = {"hidden": list(hidden), "weight_decay": weight_decay, "epochs": model.epochs,
                   "train_nll": -float(model.log_prob(train).mean()), "valid_nll": -valid_ll,
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            if log is not None:
                log(f"  MADE K={len(orderings)} hidden={list(hidden)} lambda={weight_decay:g}: train "
                    f"{row['train_nll']:.3f}  valid {row['valid_nll']:.3f} nats (best epoch {model.epochs}, "
                    f"{row['seconds']:.1f} s)")
            if valid_ll > best_valid:
                best, best_valid = model, valid_ll
        best.selection = rows
        return best
