"""Training: pyro.infer.SVI with the analytic bound as a custom loss, minibatches, held-out
evaluation, checkpoints, resume, and a run directory that records everything.

No formula lives here: the loss is ``bound.negative_elbo_estimate``; the rest is bookkeeping.
"""

import contextlib
import copy
import dataclasses
import json
import math
import shlex
import shutil
import signal
import threading
import time
import typing
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from bdiff_pyro import plots, registry
from bdiff_pyro.checkpoints import BEST_NAME, CHECKPOINT_NAME, FORMAT, read_checkpoint, save_atomically
from bdiff_pyro.config import Config, check_batch_divides, config_text, model_spec, save_config
from bdiff_pyro.data import Dataset, load_dataset
from bdiff_pyro.diffusion.bound import (
    first_stochastic_step,
    negative_elbo_estimate,
    uniform_step_proposal,
    x0_loss_estimate,
)
from bdiff_pyro.distributed import GradientAveraging, World, resolve_device
from bdiff_pyro.errors import TrainingStopped, TrainingWarning, UserError
from bdiff_pyro.evaluation import (
    bound_fell,
    bound_report,
    independent_log_likelihood_bits,
    pattern_histogram,
    reference_bounds,
)
from bdiff_pyro.memory import require_memory, sample_in_batches, training_bytes
from bdiff_pyro.programs.forward import forward_chain
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.util.files import fresh_directory, write_csv
from bdiff_pyro.util.stats import LN2, distinct_held_out, membership_fractions


class AnalyticLoss:
    """-ELBO (nats/seq, averaged over the minibatch) as a custom SVI loss.

    ``SVI(model, guide, optim, loss=AnalyticLoss(T))`` calls it as loss(model, guide, x0); the
    model is the reverse process, whose kernel and network give the closed-form bound.  One
    unbiased sample per sequence: a step t ~ r(t) and x^t ~ q(x^t | x^0).

    With ``importance=True``, r(t) ∝ sqrt(E[L_t^2]) from a running history of each step's
    term (Nichol & Dhariwal 2021), mixed with 10% uniform so that r > 0 everywhere and the
    estimate stays unbiased; uniform until every step has been seen.

    With ``x0_loss_weight`` = lambda > 0, the hybrid loss -ELBO + lambda E_t[-log p(x^0 | x^t)]
    (Austin et al. 2021; ``bound.x0_loss_estimate``, with t ~ U(1..T) and x^t drawn apart from
    the ELBO's).  ``negative_elbo`` keeps the last minibatch's -ELBO part, which is what
    training reports.

    On several processes (``world``), x0 is the global minibatch: every process draws t and
    x^t for all of it and scores its own rows, and the history is updated from the sums over
    the whole minibatch, so that it is the same on every process.

    An ensemble (``model.members`` > 1) is trained as a deep ensemble: the loss is the mean
    over members of each member's own -ELBO (on the same t and x^t), and so is what training
    reports; its selection and evaluations score the mixture, whose -ELBO is at most that mean
    (each step's KL is convex in p).
    """

    def __init__(self, T, importance=False, decay=0.9, world=World(), x0_loss_weight=0.0):
        self.importance, self.decay, self.world = importance, decay, world
        self.x0_loss_weight = x0_loss_weight
        self.negative_elbo = math.nan
        self.mean_square = torch.zeros(T + 1, dtype=torch.float64)
        self.seen = torch.zeros(T + 1, dtype=torch.bool)

    def step_proposal(self, kernel):
        uniform = uniform_step_proposal(kernel)
        if not self.importance or not self.seen[uniform > 0].all():
            return uniform
        weights = self.mean_square.sqrt().to(uniform)
        return 0.9 * weights / weights.sum() + 0.1 * uniform

    def __call__(self, model, guide, x0):
        with model.members_apart():  # an ensemble: each member on its own bound, the same t and x^t
            estimates, t, terms = negative_elbo_estimate(model.kernel, model.log_probs, x0,
                                                         self.step_proposal(model.kernel), self.world.rows(len(x0)))
            if model.num_members > 1:
                estimates, terms = estimates.mean(0), terms.mean(0)
        if self.importance:
            self._remember(t.cpu(), terms.detach().double().cpu())
        negative_elbo = estimates.mean()
        self.negative_elbo = negative_elbo.item()
        if self.x0_loss_weight == 0:
            return negative_elbo
        rows = self.world.rows(len(x0))
        with model.members_apart():
            x0_loss = x0_loss_estimate(model.kernel, model.x0_log_probs, x0, rows).mean()
        return negative_elbo + self.x0_loss_weight * x0_loss

    def _remember(self, t, terms):
        """Exponential moving average of L_t^2 for every step t in the (global) minibatch."""
        sums = torch.zeros_like(self.mean_square).index_add_(0, t, terms * terms)
        counts = torch.zeros_like(self.mean_square).index_add_(0, t, torch.ones_like(terms))
        sums, counts = self.world.sum_(torch.stack([sums, counts]))
        hit = counts > 0
        batch_mean = sums[hit] / counts[hit]
        previous = torch.where(self.seen[hit], self.mean_square[hit], batch_mean)
        self.mean_square[hit] = self.decay * previous + (1 - self.decay) * batch_mean
        self.seen[hit] = True

    def state_dict(self):
        return {"mean_square": self.mean_square.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state):
        self.mean_square, self.seen = state["mean_square"].clone(), state["seen"].clone()


class WeightAverage:
    """An exponential moving average of the weights (Polyak averaging), the usual way to take
    SGD noise out of a diffusion model's final weights:  w_avg <- d_k w_avg + (1 - d_k) w at
    update k = 0, 1, ..., with d_k = min(decay, (1 + k) / (10 + k)) so that a short run is not
    dominated by its initial weights (the warm-up of TensorFlow's ExponentialMovingAverage).

    The run's checkpoint, evaluations and samples use the average; training continues from
    the raw weights, which the checkpoint also keeps for resuming.
    """

    def __init__(self, module, decay):
        self.decay = decay
        self.average = {name: p.detach().clone() for name, p in module.named_parameters()}

    def update(self, module, k):
        """Update k (0-based; the training step before this one, so a resumed run continues
        the same sequence of decays)."""
        decay = min(self.decay, (1 + k) / (10 + k))
        with torch.no_grad():
            for name, p in module.named_parameters():
                self.average[name].lerp_(p.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self, module):
        """Inside the block the module holds the averaged weights; the raw ones come back after."""
        raw = {name: p.detach().clone() for name, p in module.named_parameters()}
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(raw[name])


class ClippedAdamW(ClippedAdam):
    """Pyro's ClippedAdam with decoupled weight decay (AdamW, Loshchilov & Hutter 2019): at
    every step, before ClippedAdam's update,

        w <- (1 - lr_k * decoupled_weight_decay) w,      lr_k = lr * lrd^k  (this step's rate),

    so every weight shrinks at the same rate whatever its gradient scale, unlike ClippedAdam's
    ``weight_decay``, which Adam divides by the gradient's running RMS.  With lrd = 1 and no
    clipping it is torch.optim.AdamW."""

    def __init__(self, params, decoupled_weight_decay=0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.defaults["decoupled_weight_decay"] = decoupled_weight_decay
        for group in self.param_groups:
            group["decoupled_weight_decay"] = decoupled_weight_decay

    def step(self, closure=None):
        with torch.no_grad():
            for group in self.param_groups:
                rate = group["lr"] * group["lrd"]  # the rate of this step: ClippedAdam decays lr before using it
                shrink = 1.0 - rate * group["decoupled_weight_decay"]
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(shrink)
        return super().step(closure)


def make_optimiser(train):
    """The Pyro optimiser a config's ``train`` section describes: ClippedAdam whose learning
    rate decays exponentially from lr to lr_final over the run, lrd = (lr_final / lr)^(1/steps),
    and ClippedAdamW when train.decoupled_weight_decay > 0."""
    args = {"lr": train.lr, "clip_norm": train.clip_norm, "weight_decay": train.weight_decay,
            "lrd": (train.lr_final / train.lr) ** (1.0 / train.steps)}
    if train.decoupled_weight_decay > 0:
        return pyro.optim.PyroOptim(ClippedAdamW, {**args, "decoupled_weight_decay": train.decoupled_weight_decay})
    return pyro.optim.ClippedAdam(args)


@dataclass
class TrainingState:
    step: int = 0
    wall_time: float = 0.0
    history: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)  # (step, samples) frames of the GIF
    start_bound: dict = None  # the held-out bound of the initial weights, as the evaluations estimate it
    best_step: int = None  # the evaluation with the highest held-out ELBO so far: the weights in best.pt
    best_val_elbo_bits: float = None


def claim_run_dir(config, config_path, out=None, root="runs"):
    """Create the run directory and, in it, config.yaml with exclusive creation: of two runs
    started with the same ``--out``, exactly one gets it, the other stops before writing.
    Returns (run directory, whether this call created the directory itself)."""
    if out is not None and Path(out).is_dir():
        created = False
        run_dir = fresh_directory(Path(config_path).stem, out, root)
    else:
        created = True
        run_dir = fresh_directory(Path(config_path).stem, out, root)
    try:
        with open(run_dir / "config.yaml", "x") as stream:
            stream.write(config_text(config))
    except FileExistsError:
        raise UserError(f"{run_dir}: another run has just claimed this directory; refusing to share it") from None
    except OSError as error:
        discard_run_dir(run_dir, created)
        raise UserError(f"{run_dir}: cannot write config.yaml ({error.strerror})") from None
    return run_dir, created


def discard_run_dir(run_dir, created):
    """Undo a run that failed before its first checkpoint: remove what it wrote (everything in
    the directory it claimed empty) and the directory itself if it created it."""
    run_dir = Path(run_dir)
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in run_dir.iterdir():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def resolve_config(config: Config, dataset: Dataset) -> Config:
    """A new Config with what the data decides filled in: pi_1 = 'data' becomes the training
    mean.  ``config`` itself is left as it was."""
    pi_1 = config.model.pi_1
    if pi_1 == "data" and config.model.kernel in registry.KERNELS_WITH_PI_1:
        pi_1 = float(dataset.train.mean())
        if not 0.0 < pi_1 < 1.0:
            raise UserError(f"model.pi_1 = data needs training data with both 0s and 1s (mean is {pi_1})")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pi_1=pi_1))


# What a resumed run cannot change: the model and data (the weights are theirs), the
# optimiser's settings (they live in its saved state, and lr / lr_final also fix the learning-
# rate schedule), the weight average, the held-out evaluation (the selection compares its
# estimates) and the seed (the random stream continues from the checkpoint).  ``train.steps``
# may grow or shrink: the learning rate then decays from its current value to lr_final at the
# new last step.
FIXED_ON_RESUME = ("train.lr", "train.lr_final", "train.clip_norm", "train.weight_decay",
                   "train.decoupled_weight_decay", "train.ema", "train.x0_loss_weight", "train.eval_sequences",
                   "train.eval_replicates", "seed")


def _check_resumable(config, saved, where):
    """A resumed run must use the model, data, optimiser settings and seed its checkpoint was
    trained with; anything else would be recorded in config.yaml without being used."""
    current = config.to_dict()
    keys = [f"{section}.{key}" for section in ("data", "model") for key in saved[section]] + list(FIXED_ON_RESUME)
    for dotted in keys:
        was, now = _lookup(saved, dotted), _lookup(current, dotted)
        if was is not _MISSING and was != now:
            raise UserError(f"{where}: checkpoint was trained with {dotted}={was!r}, but the config says {now!r}; "
                            f"a resumed run keeps {dotted} (start a new run to change it)")


_MISSING = object()


def _lookup(tree, dotted):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _reschedule(optim_state, lr_final, steps_left):
    """The saved optimiser state with its learning-rate decay set so that the current rate
    reaches lr_final after ``steps_left`` more steps: lrd = (lr_final / lr_now)^(1/steps_left)."""
    for state in optim_state.values():
        for group in state["param_groups"]:
            group["lrd"] = (lr_final / group["lr"]) ** (1.0 / steps_left)
    return optim_state


class _InterruptFlag:
    """Ctrl-C sets a flag the loop checks between steps, so a checkpoint is never half-written
    and the weights are never half-updated.  A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainingSetup:
    """Everything a run needs that can fail on bad input, checked before anything is written."""
    config: object  # the resolved Config
    dataset: Dataset
    resume_from: typing.Optional[Path] = None  # the checkpoint file of a resumed run
    payload: typing.Optional[dict] = None  # its contents


def prepare_training(config, resume_dir=None, world=World()):
    """Load the data, resolve the config, check the device, the memory the run needs and (on
    several processes) the batch size, and (resuming) read the checkpoint and check that it
    matches: a bad input stops here, before a run directory exists."""
    check_batch_divides(config.train.batch_size, world.size)
    dataset = load_dataset(config.data)
    config = resolve_config(config, dataset)
    resolve_device(config.device, world.local_rank)
    levels = config.data.levels + (config.model.kernel == "absorbing")  # the mask state
    require_memory(training_bytes(config.model, dataset.n, levels, config.train.batch_size,
                                  max(config.evaluate.num_samples, config.train.eval_samples)),
                   f"training with model.T = {config.model.T}, model.hidden = {config.model.hidden} and "
                   f"train.batch_size = {config.train.batch_size} on sequences of length n = {dataset.n}")
    setup = TrainingSetup(config, dataset)
    if resume_dir is not None:
        setup.resume_from, setup.payload = read_checkpoint(resume_dir, last=True)
        _check_resumable(config, setup.payload["config"], setup.resume_from)
    return setup


def train(config, run_dir, resume=False, progress=True, log=print):
    """Train (or resume) the run in ``run_dir``; returns its final metrics dict."""
    setup = prepare_training(config, Path(run_dir) if resume else None)
    save_config(setup.config, Path(run_dir) / "config.yaml")
    return run_training(setup, run_dir, progress=progress, log=log)


def run_training(setup, run_dir, progress=True, log=print, world=World()):
    """The training loop of a prepared run whose directory holds its config.yaml.

    A checkpoint is written only from finite weights whose loss, estimated on a minibatch, is
    finite: a run that diverges keeps the last sound checkpoint and says which step it holds.

    On several processes (``world``, joined by ``distributed.join``), each scores its slice of
    every minibatch and the gradients are averaged; rank 0 alone evaluates, writes the run
    directory and returns the final metrics (the others return None after the last step).
    """
    run_dir = Path(run_dir)
    config, dataset, payload = setup.config, setup.dataset, setup.payload
    device = resolve_device(config.device, world.local_rank)
    progress = progress and world.main
    if not world.main:
        log = _silent
    if config.threads:
        torch.set_num_threads(config.threads)
    pyro.clear_param_store()  # PyroModule parameters are registered in the global store
    pyro.set_rng_seed(config.seed)  # before the network is initialised
    spec = model_spec(config, dataset.n)
    process = ReverseProcess.from_spec(spec).to(device)
    optim = make_optimiser(config.train)
    if world.distributed:
        optim = GradientAveraging(optim, world)
    state = TrainingState()
    average = WeightAverage(process, config.train.ema) if config.train.ema > 0 else None
    last_saved = None  # the step the checkpoint on disk holds
    if payload is not None:
        weights = lambda key: {k: v for k, v in payload[key].items() if not k.startswith("kernel.")}  # noqa: E731
        process.load_state_dict(weights("model_state"))
        if average is not None:  # the checkpoint's model is the average; training resumes from the raw weights
            average = WeightAverage(process, config.train.ema)
            process.load_state_dict(weights("raw_model_state"))
        state = TrainingState(**payload["state"])
        optim_state = payload["optim_state"]
        if payload["config"]["train"]["steps"] != config.train.steps and state.step < config.train.steps:
            optim_state = _reschedule(optim_state, config.train.lr_final, config.train.steps - state.step)
        optim.set_state(optim_state)
        torch.set_rng_state(payload["rng_state"])
        if device.type == "cuda" and "cuda_rng_state" in payload:  # minibatches and noise drawn on the GPU
            torch.cuda.set_rng_state(payload["cuda_rng_state"], device)
        last_saved = state.step
        log(f"resuming {run_dir} at step {state.step}")

    train_x = dataset.train.to(device)
    loss = AnalyticLoss(process.T, importance=config.train.t_sampling == "importance", world=world,
                        x0_loss_weight=config.train.x0_loss_weight)
    if payload is not None and "loss_state" in payload:
        loss.load_state_dict(payload["loss_state"])
    svi = SVI(process, partial(forward_chain, process.kernel), optim, loss=loss)
    checkpoint = run_dir / CHECKPOINT_NAME

    def averaged():
        return average.applied(process) if average is not None else contextlib.nullcontext()

    def diverged(what):
        kept = (f"the last checkpoint with finite weights and loss is {checkpoint}, from step {last_saved}"
                if last_saved is not None else "no checkpoint was written")
        return TrainingStopped(f"training diverged at step {state.step} ({what}); {kept}; "
                               "lower train.lr or train.clip_norm", exit_code=1)

    def check_sound(batch):
        """Before the weights are evaluated or saved: finite, with a finite loss."""
        problem = unsound_weights(process, batch)
        if problem is None and average is not None:
            with averaged():
                problem = unsound_weights(process, batch, "averaged ")
        if problem is not None:
            raise diverged(problem)

    def save(path=checkpoint):
        nonlocal last_saved
        payload = {"format": FORMAT, "spec": spec.to_dict(), "config": config.to_dict(), "n": dataset.n,
                   "optim_state": optim.get_state(),
                   "state": vars(state), "rng_state": torch.get_rng_state(), "loss_state": loss.state_dict()}
        if device.type == "cuda":
            payload["cuda_rng_state"] = torch.cuda.get_rng_state(device)
        if average is not None:
            payload["raw_model_state"] = _copy(process.state_dict())
        with averaged():
            payload["model_state"] = _copy(process.state_dict())
        save_atomically(payload, path)
        if path == checkpoint:
            last_saved = state.step

    if state.step == 0:
        def start_bound():
            with averaged():
                state.start_bound = _held_out_bound(process, dataset, config, state)
        world.on_main(start_bound)
    started = time.perf_counter() - state.wall_time
    losses = []
    bar = tqdm(total=config.train.steps, initial=state.step, disable=not progress, desc="train", unit="step")

    def record(evaluating, saving):
        """Rank 0, while the other processes wait: this step's evaluation and checkpoints."""
        nonlocal losses
        improved = False
        if evaluating:
            with averaged():
                row = _evaluate_during_training(process, dataset, config, state, losses, optim)
            if not math.isfinite(row["val_elbo_bits"]):
                raise diverged(f"held-out ELBO is {row['val_elbo_bits']}")
            row["elapsed_s"] = time.perf_counter() - started
            state.history.append(row)
            losses = []
            improved = state.best_step is None or row["val_elbo_bits"] > state.best_val_elbo_bits
            if improved:
                state.best_step, state.best_val_elbo_bits = state.step, row["val_elbo_bits"]
            bar.set_postfix_str(f"-ELBO bits/seq: train {row['loss_bits']:.3f}, val {-row['val_elbo_bits']:.3f}")
        if saving:
            state.wall_time = time.perf_counter() - started
            save()
        if improved:  # after the checkpoint: a full disk here still leaves one
            save(run_dir / BEST_NAME)

    with _InterruptFlag() as interrupt, bar:
        while state.step < config.train.steps:
            batch = train_x[torch.randint(len(train_x), (config.train.batch_size,), device=device)]
            try:
                value = svi.step(batch)  # this process's rows of the batch; gradients averaged over processes
            except (RuntimeError, MemoryError) as error:
                if not _out_of_memory(error):
                    raise
                raise UserError(f"out of memory at training step {state.step + 1}; lower train.batch_size, "
                                "model.hidden or model.T") from None
            # every process stops at the same step
            (value, negative_elbo), interrupted = world.agree((value, loss.negative_elbo), interrupt.raised)
            state.step += 1
            if not math.isfinite(value):
                raise diverged(f"loss {value}")
            problem = non_finite_weight(process)
            if problem is not None:
                raise diverged(problem)
            if average is not None:
                average.update(process, state.step - 1)
            losses.append(negative_elbo / LN2)
            bar.update(1)
            last = state.step == config.train.steps
            evaluating = state.step % config.train.eval_every == 0 or last
            saving = state.step % config.train.checkpoint_every == 0 or last or interrupted
            if evaluating or saving:
                check_sound(batch)
                world.on_main(partial(record, evaluating, saving))
            if interrupted:
                raise TrainingStopped(
                    f"interrupted at step {state.step}; checkpoint saved to {checkpoint}; "
                    f"continue with: {resume_command(run_dir)}", exit_code=130)
    if not world.main:
        return None
    state.wall_time = time.perf_counter() - started
    if state.start_bound is not None and state.history:
        end = state.history[-1]
        fell = bound_fell(state.start_bound, {"elbo_bits": end["val_elbo_bits"], "se_bits": end["val_se_bits"]})
        if fell:
            warnings.warn(f"{fell}; the model may have collapsed (train.lr = {config.train.lr:g} too large?)",
                          TrainingWarning, stacklevel=2)
    if state.best_step is not None and state.best_step != state.step:  # finish with the selected weights
        best = torch.load(run_dir / BEST_NAME, map_location=device, weights_only=True)["model_state"]
        process.load_state_dict({k: v for k, v in best.items() if not k.startswith("kernel.")})
        average, averaged = None, contextlib.nullcontext
    return finish_training(process, averaged, dataset, config, state, run_dir, progress, log)


def _silent(*args, **kwargs):
    """The log of processes other than rank 0."""


def resume_command(run_dir):
    """The command that continues the run in ``run_dir`` (its config.yaml holds every --set)."""
    return f"bdiff train --resume {shlex.quote(str(run_dir))}"


def finish_training(process, averaged, dataset, config, state, run_dir, progress, log):
    """The final evaluation and diagnostics of a run whose checkpoint is written: a failure or
    a Ctrl-C here stops with a message saying how to evaluate the checkpoint, never with the
    training lost."""
    how = (f"bdiff evaluate {shlex.quote(str(run_dir))} {shlex.quote(config.data.val)}" if config.data.val
           else f"bdiff diagnose {shlex.quote(str(run_dir))}")
    selected = run_dir / (BEST_NAME if state.best_step is not None else CHECKPOINT_NAME)
    kept = (f"the selected model (step {state.best_step or state.step}) is in {selected}; "
            f"evaluate it with: {how}")
    try:
        with averaged():
            metrics = finish_run(process, dataset, config, state, run_dir, progress=progress)
        worse = worse_than_independent(metrics)
        if worse:
            warnings.warn(worse, TrainingWarning, stacklevel=3)
        if config.evaluate.diagnose:
            from bdiff_pyro.diagnostics import diagnose
            diagnose(run_dir, seed=config.seed, progress=progress, log=log)
    except KeyboardInterrupt:
        raise TrainingStopped(f"interrupted during the final evaluation; {kept}", exit_code=130) from None
    except (UserError, OSError, RuntimeError, MemoryError) as error:
        reason = (str(error).splitlines() or [""])[0]
        raise TrainingStopped(f"training finished but the final evaluation failed ({type(error).__name__}: "
                              f"{reason}); {kept}", exit_code=1) from error
    return metrics


def worse_than_independent(metrics):
    """One line when the chosen model's held-out ELBO is below the log-likelihood that
    independent bits (fitted on the training data, add-one) give the same held-out data, else None."""
    elbo, baseline = metrics["held_out"]["elbo_bits"], metrics["held_out_independent_bits"]
    if elbo >= baseline:
        return None
    return (f"the model (step {metrics['selected_step']}) generalises worse than independent bits: held-out ELBO "
            f"{elbo:.3f} ± {metrics['held_out']['se_bits']:.3f} bits/seq, independent bits fitted on the training "
            f"data {baseline:.3f}; try more data, a smaller model or more regularisation")


def non_finite_weight(process):
    """None if every weight is finite, else which is not."""
    for name, value in process.named_parameters():
        if not torch.isfinite(value).all():
            return f"weight {name} is not finite after this update"
    return None


def unsound_weights(process, batch, which=""):
    """None when every weight is finite and the loss estimate at these weights on ``batch`` is
    finite, else what is wrong.  Finite but huge weights (an lr of 1e38) pass the first test
    and fail the second; the estimate draws from a forked RNG, so the training stream is the
    same with or without this check."""
    problem = non_finite_weight(process)
    if problem is not None:
        return which + problem
    with torch.random.fork_rng(), torch.no_grad():
        estimates, _, _ = negative_elbo_estimate(process.kernel, process.log_probs, batch)
    if not torch.isfinite(estimates).all():
        return f"the loss at the {which}weights after this update is not finite"
    return None


def _out_of_memory(error):
    message = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in message or "out of memory" in message.lower()


def _copy(state_dict):
    return {k: v.detach().clone() for k, v in state_dict.items()}


def _current_lr(optim):
    lrs = [group["lr"] for opt in optim.optim_objs.values() for group in opt.param_groups]
    return lrs[0] if lrs else float("nan")


def _held_out_bound(process, dataset, config, state):
    """The held-out bound as the evaluations during training estimate it.

    Every evaluation draws the same x^t (one seed for the run: common random numbers), so the
    difference between two steps' estimates holds the change of the weights and not the noise
    of fresh draws; with a few short sequences (heartbeat) that noise is larger than what late
    training changes, and the selection would pick a step by chance."""
    process.eval()
    report = bound_report(process, dataset.val[: config.train.eval_sequences], config.train.eval_replicates,
                          seed=config.seed)
    process.train()
    return report


def _evaluate_during_training(process, dataset, config, state, losses, optim):
    report = _held_out_bound(process, dataset, config, state)
    process.eval()
    samples = sample_in_batches(process, config.train.eval_samples, seed=config.seed).cpu()  # for host-side counts
    process.train()
    fractions = membership_fractions(samples, dataset.train, dataset.val)
    state.snapshots.append((state.step, samples[:32].to(torch.uint8).cpu()))
    return {"step": state.step, "loss_bits": sum(losses) / max(len(losses), 1),
            "val_elbo_bits": report["elbo_bits"], "val_se_bits": report["se_bits"],
            "frac_train": fractions["train"], "frac_held_out": fractions["held_out"],
            "frac_neither": fractions["neither"], "lr": _current_lr(optim)}


def finish_run(process, dataset, config, state, run_dir, progress=False):
    """Final metrics, history and plots of a run (history.csv first: it needs no evaluation)."""
    write_csv(run_dir / "history.csv", state.history)
    process.eval()
    evaluate = config.evaluate
    max_sequences = final_sequences(evaluate.max_rows, evaluate.replicates, process.kernel)
    train_bound = bound_report(process, dataset.train, evaluate.replicates, seed=config.seed, distinct=True,
                               max_sequences=max_sequences, progress=progress and "ELBO on training data")
    val_bound = bound_report(process, dataset.val, evaluate.replicates, seed=config.seed + 1, distinct=True,
                             max_sequences=max_sequences, progress=progress and "ELBO on held-out data")
    started = time.perf_counter()
    samples = sample_in_batches(process, evaluate.num_samples, seed=config.seed).cpu()  # for counts and plots
    sampling_seconds = time.perf_counter() - started
    metrics = {
        "train": train_bound, "held_out": val_bound,
        "held_out_independent_bits": independent_log_likelihood_bits(dataset.train, dataset.val, config.data.levels),
        "selected_step": state.best_step,
        "samples": {"num": config.evaluate.num_samples, **membership_fractions(samples, dataset.train, dataset.val),
                    "held_out_patterns": distinct_held_out(dataset.train, dataset.val),
                    "per_second": config.evaluate.num_samples / sampling_seconds},
        "wall_time_s": state.wall_time, "steps": state.step, "T": process.T, "n": dataset.n,
        "num_parameters": sum(p.numel() for p in process.parameters()),
    }
    if dataset.test is not None:  # the final figure: the only use of the test split
        metrics["test"] = bound_report(process, dataset.test, evaluate.replicates, seed=config.seed + 2, distinct=True,
                                       max_sequences=max_sequences, progress=progress and "K on test data")
    if dataset.support is not None:
        metrics["samples"]["pattern_fractions"] = pattern_histogram(samples, dataset.support)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    references = {**reference_bounds(copy.deepcopy(process.kernel).cpu(), dataset),
                  "independent bits (held-out)": metrics["held_out_independent_bits"]}
    plots.bound_curve(state.history, run_dir / "bound_curve.png", references, selected_step=state.best_step)
    compared = ("test data", dataset.test) if dataset.test is not None else ("held-out data", dataset.val)
    plots.marginals_and_correlations(samples.cpu(), compared[1].cpu(), run_dir / "marginals.png", compared[0])
    plots.membership_curve(state.history, run_dir / "proportions.png",
                           held_out=metrics["samples"]["held_out_patterns"] > 0)
    plots.sample_grid(samples[:64].cpu(), run_dir / "samples.png", levels=config.data.levels)
    plots.sample_evolution_gif(state.snapshots, run_dir / "sample_evolution.gif", levels=config.data.levels)
    return metrics


def final_sequences(max_rows, replicates, kernel):
    """How many sequences the final ELBO scores at most: max(2, max_rows / (replicates x steps)),
    steps the stochastic steps of the bound (None: all)."""
    if max_rows is None:
        return None
    steps = kernel.T + 1 - first_stochastic_step(kernel)
    return max(2, max_rows // (replicates * steps))
