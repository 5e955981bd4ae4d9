"""Samplers for any reverse step (docs/math.md §6): ancestral, every step T -> ... -> 0, and
strided, ``steps`` jumps through the predicted x^0.

A reverse step is anything with the attributes of :class:`ReverseStep`: the network-backed
``bdiff_pyro.programs.reverse.ReverseProcess``, the exact ``bdiff_pyro.diffusion.oracle.OracleReverse``
and test doubles all are.  Randomness comes from a ``torch.Generator`` passed in (or a seed
turned into one); the global generator is used only when neither is given, and is never
reseeded.  Draws take the same random numbers as the Pyro sites (``DiscreteKernel.sample_states``,
:func:`draw_bits`), so the Pyro program under ``pyro.set_rng_seed(s)`` and a sampler with seed s
draw the same samples.
"""

import typing

import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from bdiff_pyro.diffusion.kernels import DiscreteKernel, posterior_table
from bdiff_pyro.diffusion.steps import binary_mixture_logits
from bdiff_pyro.errors import UserError

SeedOrGenerator = typing.Union[None, int, torch.Generator]


class ReverseStep(typing.Protocol):
    """The reverse-step interface the samplers read.

    ``log_probs(x_t, t)``: log p(x^{t-1} = k | x^t), shape (..., n, K); t = 1 is the edge step
    p(x^0 | x^1); t an int or one time per sequence.  Two-state kernels also give the same step
    as one logit per position, ``logits(x_t, t)`` = log p(x^{t-1} = 1 | x^t) - log p(x^{t-1} = 0 | x^t),
    which is what is drawn from.  Strided sampling reads the prediction of x^0:
    ``x0_log_probs(x_t, t)`` (..., n, K), and for two-state kernels ``x0_logits(x_t, t)`` (..., n).
    A two-state step may also give ``probs(x_t, t)`` = p(x^{t-1} = 1 | x^t) as its Pyro site
    draws it (``programs.plan.BinaryStepPlan``); the samplers then draw each step from it.
    """

    kernel: DiscreteKernel

    @property
    def n(self) -> int: ...

    @property
    def T(self) -> int: ...

    def log_probs(self, x_t: torch.Tensor, t) -> torch.Tensor: ...

    def logits(self, x_t: torch.Tensor, t) -> torch.Tensor: ...

    def x0_log_probs(self, x_t: torch.Tensor, t) -> torch.Tensor: ...

    def x0_logits(self, x_t: torch.Tensor, t) -> torch.Tensor: ...


def as_generator(seed: SeedOrGenerator, device=None) -> typing.Optional[torch.Generator]:
    """A generator as given, a seed as a fresh generator seeded with it (on ``device``), None
    as None (torch's global generator)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device or "cpu").manual_seed(int(seed))


def stride_grid(T: int, steps: int) -> typing.List[typing.Tuple[int, int]]:
    """[(t, s), ...]: ``steps`` jumps from T to 0 on the evenly spaced grid
    t_j = round(T (1 - j / steps)), j = 0..steps."""
    if not 1 <= steps <= T:
        raise UserError(f"--steps must be between 1 and T = {T} (got {steps})")
    times = torch.linspace(T, 0, steps + 1, device="cpu").round().long().tolist()  # host-side integers
    return list(zip(times[:-1], times[1:]))


def jump_logits(step: ReverseStep, x_t, t: int, s: int):
    """Bits: the logit of x^s = 1 given x^t.  s = t - 1 is the step itself; otherwise the
    through-x^0 jump, q(x^s | x^t, x^0) averaged over the predicted P(x^0 | x^t), or at s = 0
    the prediction itself."""
    if s == t - 1:
        return step.logits(x_t, t)
    logits = step.x0_logits(x_t, t)
    if s > 0:
        kernel = step.kernel
        logits = binary_mixture_logits(posterior_table(kernel.log_span(s, t), kernel.log_Qbar[s]), x_t, logits)
    return logits


def jump_log_probs(step: ReverseStep, x_t, t: int, s: int):
    """log p(x^s = k | x^t), (..., n, K): the K-state form of :func:`jump_logits`."""
    if s == t - 1:
        return step.log_probs(x_t, t)
    log_probs = step.x0_log_probs(x_t, t)
    if s > 0:
        log_probs = step.kernel.q_posterior_log_probs_mixture(x_t, log_probs, t, s)
    return log_probs


def jump_dist(step: ReverseStep, x_t, t: int, s: int):
    """x^s given x^t as the distribution the samplers draw from (Bernoulli on the logit for two
    states, Categorical otherwise), for exact checks of what a sampler does."""
    if step.kernel.num_states == 2:
        return dist.Bernoulli(logits=jump_logits(step, x_t, t, s))
    return dist.Categorical(logits=jump_log_probs(step, x_t, t, s))


def draw_bits(probs, generator=None, out=None):
    """Bits (floats 0./1.) with P(1) = probs: the draws of ``torch.bernoulli(probs, generator=generator)``,
    which a Pyro Bernoulli site makes, at a third of its cost.  On the CPU torch's Bernoulli
    takes one uniform u per element, in order, from the generator (24 random bits in float32,
    53 in float64) and returns u < p; ``torch.rand`` takes the same uniforms (a test checks
    that the two agree draw for draw).  ``out``: a tensor of probs' shape to draw into."""
    if probs.device.type != "cpu":
        return torch.bernoulli(probs, generator=generator, out=out)
    if out is None:
        return torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device).lt_(probs)
    return torch.rand(probs.shape, generator=generator, out=out).lt_(probs)


def draw_step(step: ReverseStep, x_t, t: int, generator=None):
    """x^{t-1} drawn from ``step.probs(x^t, t)``, block by block of ``step.rows_per_block``
    sequences if the step computes its probabilities so (the same numbers; the uniforms are
    taken in the same order as for the whole batch at once)."""
    rows = getattr(step, "rows_per_block", None)
    if rows is None or x_t.dim() != 2 or len(x_t) <= rows:
        return draw_bits(step.probs(x_t, t), generator)
    out = torch.empty_like(x_t)
    for block, out_block in zip(x_t.split(rows), out.split(rows)):
        draw_bits(step.probs(block, t), generator, out=out_block)
    return out


def draw_jump(step: ReverseStep, x_t, t: int, s: int, generator=None):
    """One draw of x^s given x^t from :func:`jump_dist`, with ``generator``; a one-step jump
    of a step with ``probs`` draws from those."""
    if step.kernel.num_states == 2:
        if s == t - 1 and hasattr(step, "probs"):
            return draw_step(step, x_t, t, generator)
        # torch's Bernoulli(logits).sample(): bernoulli(sigmoid(logits)), as the Pyro site draws it
        return draw_bits(torch.sigmoid(jump_logits(step, x_t, t, s)), generator)
    return step.kernel.sample_states(jump_log_probs(step, x_t, t, s), generator)


def _device(step):
    return step.kernel.log_pi.device


def _run(step: ReverseStep, num: int, jumps, generator: SeedOrGenerator, progress):
    """x^T ~ pi, then one draw per jump (t, s); ``progress``: a label for a bar over the jumps."""
    generator = as_generator(generator, _device(step))
    with torch.no_grad():
        x = step.kernel.sample_states(step.kernel.prior_log_probs((num, step.n)), generator)
        for t, s in tqdm(jumps, disable=not progress, desc=progress or None, unit="step"):
            x = draw_jump(step, x, t, s, generator)
    return x


def ancestral_sample(step: ReverseStep, num: int, generator: SeedOrGenerator = None, progress=False):
    """(num, n) samples of x^0: x^T ~ pi, then x^{t-1} ~ p(x^{t-1} | x^t) for t = T..1.

    ``generator``: a torch.Generator, a seed, or None for torch's global generator."""
    return _run(step, num, [(t, t - 1) for t in range(step.T, 0, -1)], generator, progress)


def strided_sample(step: ReverseStep, num: int, steps: int, generator: SeedOrGenerator = None, progress=False):
    """(num, n) samples of x^0 in ``steps`` jumps on :func:`stride_grid`, one evaluation of the
    step each.  Each jump t -> s draws x^s from q(x^s | x^t, x^0) averaged over the predicted
    P(x^0 | x^t), and a last jump t -> 0 from t > 1 draws x^0 from the prediction itself.  A jump
    of one step is the step itself (at t = 1 the kernel's edge step, whose prediction of x^0 no
    term of the bound trains), so ``steps = T`` is :func:`ancestral_sample`, draw for draw."""
    return _run(step, num, stride_grid(step.T, steps), generator, progress)
