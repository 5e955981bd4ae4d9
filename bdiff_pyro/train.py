"""Training: pyro.infer.SVI with the analytic bound as a custom loss, minibatches, held-out
evaluation, checkpoints, resume, and a run directory that records everything.

No formula lives here: the loss is ``bound.negative_elbo_estimate``; the rest is bookkeeping.
"""

import contextlib
import copy
import csv
import json
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from . import plots
from .bound import LN2, negative_elbo_estimate, uniform_step_proposal
from .checkpoints import CHECKPOINT_NAME, FORMAT, build_process, read_checkpoint, save_atomically
from .config import save_config
from .data import load_dataset
from .errors import TrainingStopped, TrainingWarning, UserError
from .evaluation import (bound_fell, bound_report, held_out_patterns, membership, pattern_histogram,
                         reference_bounds)
from .forward import forward_chain


class AnalyticLoss:
    """-ELBO (nats/seq, averaged over the minibatch) as a custom SVI loss.

    ``SVI(model, guide, optim, loss=AnalyticLoss(T))`` calls it as loss(model, guide, x0); the
    model is the reverse process, whose kernel and network give the closed-form bound.  One
    unbiased sample per sequence: a step t ~ r(t) and x^t ~ q(x^t | x^0).

    With ``importance=True``, r(t) ∝ sqrt(E[L_t^2]) from a running history of each step's
    term (Nichol & Dhariwal 2021), mixed with 10% uniform so that r > 0 everywhere and the
    estimate stays unbiased; uniform until every step has been seen.
    """

    def __init__(self, T, importance=False, decay=0.9):
        self.importance, self.decay = importance, decay
        self.mean_square = torch.zeros(T + 1, dtype=torch.float64)
        self.seen = torch.zeros(T + 1, dtype=torch.bool)

    def step_proposal(self, kernel):
        uniform = uniform_step_proposal(kernel)
        if not self.importance or not self.seen[uniform > 0].all():
            return uniform
        weights = self.mean_square.sqrt().to(uniform)
        return 0.9 * weights / weights.sum() + 0.1 * uniform

    def __call__(self, model, guide, x0):
        estimates, t, terms = negative_elbo_estimate(model.kernel, model.log_probs, x0,
                                                     self.step_proposal(model.kernel))
        if self.importance:
            self._remember(t.cpu(), terms.detach().double().cpu())
        return estimates.mean()

    def _remember(self, t, terms):
        """Exponential moving average of L_t^2 for every step t in the minibatch."""
        sums = torch.zeros_like(self.mean_square).index_add_(0, t, terms * terms)
        counts = torch.zeros_like(self.mean_square).index_add_(0, t, torch.ones_like(terms))
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


@dataclass
class TrainingState:
    step: int = 0
    wall_time: float = 0.0
    history: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)  # (step, samples) frames of the GIF
    start_bound: dict = None  # the held-out bound of the initial weights, as the evaluations estimate it


def new_run_dir(config_path, out=None, root="runs"):
    """A fresh run directory: ``out`` if given (must not hold a run yet), otherwise
    runs/<config name>-<timestamp>[-k].  Never reuses an existing run's directory."""
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out}: directory exists and is not empty; refusing to overwrite an earlier run")
        out.mkdir(parents=True, exist_ok=True)
        return out
    stem = f"{Path(config_path).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1, 1000):
        candidate = Path(root) / (stem if k == 1 else f"{stem}-{k}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"{root}: cannot find a free run directory name for {stem}")


def resolve_config(config, dataset):
    """Fill in what the data decides: pi_1 = 'data' becomes the training mean."""
    if config.model.pi_1 == "data" and config.model.kernel == "bernoulli":
        mean = float(dataset.train.mean())
        if not 0.0 < mean < 1.0:
            raise UserError(f"model.pi_1 = data needs training data with both 0s and 1s (mean is {mean})")
        config.model.pi_1 = mean
    return config


def _check_resumable(config, saved, where):
    """The model and data of a resumed run must be those its checkpoint was trained with."""
    current = config.to_dict()
    for section in ("data", "model"):
        for key, value in saved[section].items():
            if current[section][key] != value:
                raise UserError(f"{where}: checkpoint was trained with {section}.{key}={value!r}, "
                                f"but the config says {current[section][key]!r}")


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


def train(config, run_dir, resume=False, progress=True, log=print):
    """Train (or resume) the run in ``run_dir``; returns its final metrics dict."""
    run_dir = Path(run_dir)
    dataset = load_dataset(config.data)
    config = resolve_config(config, dataset)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but no CUDA device is available")

    if config.threads:
        torch.set_num_threads(config.threads)
    pyro.clear_param_store()  # PyroModule parameters are registered in the global store
    pyro.set_rng_seed(config.seed)  # before the network is initialised
    process = build_process(config.model, dataset.n, config.data.levels).to(device)
    optim = pyro.optim.ClippedAdam({
        "lr": config.train.lr,
        "clip_norm": config.train.clip_norm,
        "lrd": (config.train.lr_final / config.train.lr) ** (1.0 / config.train.steps),
    })
    state = TrainingState()
    average = WeightAverage(process, config.train.ema) if config.train.ema > 0 else None
    if resume:
        where, payload = read_checkpoint(run_dir)
        _check_resumable(config, payload["config"], where)
        weights = lambda key: {k: v for k, v in payload[key].items() if not k.startswith("kernel.")}  # noqa: E731
        process.load_state_dict(weights("model_state"))
        if average is not None:  # the checkpoint's model is the average; training resumes from the raw weights
            average = WeightAverage(process, config.train.ema)
            process.load_state_dict(weights("raw_model_state"))
        optim.set_state(payload["optim_state"])
        state = TrainingState(**payload["state"])
        torch.set_rng_state(payload["rng_state"])
        log(f"resuming {run_dir} at step {state.step}")
    save_config(config, run_dir / "config.yaml")

    train_x, val_x = dataset.train.to(device), dataset.val.to(device)
    loss = AnalyticLoss(process.T, importance=config.train.t_sampling == "importance")
    if resume and "loss_state" in payload:
        loss.load_state_dict(payload["loss_state"])
    svi = SVI(process, partial(forward_chain, process.kernel), optim, loss=loss)

    def averaged():
        return average.applied(process) if average is not None else contextlib.nullcontext()

    def save():
        payload = {"format": FORMAT, "config": config.to_dict(), "n": dataset.n, "optim_state": optim.get_state(),
                   "state": vars(state), "rng_state": torch.get_rng_state(), "loss_state": loss.state_dict()}
        if average is not None:
            payload["raw_model_state"] = _copy(process.state_dict())
        with averaged():
            payload["model_state"] = _copy(process.state_dict())
        save_atomically(payload, run_dir / CHECKPOINT_NAME)

    if state.step == 0:
        with averaged():
            state.start_bound = _held_out_bound(process, dataset, config, state)
    started = time.perf_counter() - state.wall_time
    losses = []
    bar = tqdm(total=config.train.steps, initial=state.step, disable=not progress, desc="train", unit="step")
    with _InterruptFlag() as interrupt, bar:
        while state.step < config.train.steps:
            batch = train_x[torch.randint(len(train_x), (config.train.batch_size,), device=device)]
            value = svi.step(batch)
            if not math.isfinite(value):
                raise TrainingStopped(
                    f"training diverged at step {state.step + 1} (loss {value}); the last good checkpoint "
                    f"is {run_dir / CHECKPOINT_NAME} (if one was written); lower train.lr or train.clip_norm",
                    exit_code=1)
            if average is not None:
                average.update(process, state.step)
            state.step += 1
            losses.append(value / LN2)
            bar.update(1)
            if state.step % config.train.eval_every == 0 or state.step == config.train.steps:
                with averaged():
                    row = _evaluate_during_training(process, dataset, config, state, losses, optim)
                row["elapsed_s"] = time.perf_counter() - started
                state.history.append(row)
                losses = []
                bar.set_postfix_str(f"-ELBO bits/seq: train {row['loss_bits']:.3f}, val {-row['val_elbo_bits']:.3f}")
            if state.step % config.train.checkpoint_every == 0 or state.step == config.train.steps:
                state.wall_time = time.perf_counter() - started
                save()
            if interrupt.raised:
                state.wall_time = time.perf_counter() - started
                save()
                raise TrainingStopped(
                    f"interrupted at step {state.step}; checkpoint saved to {run_dir / CHECKPOINT_NAME}; "
                    f"continue with: bdiff train CONFIG --resume {run_dir}", exit_code=130)
    state.wall_time = time.perf_counter() - started
    if state.start_bound is not None and state.history:
        end = state.history[-1]
        fell = bound_fell(state.start_bound, {"elbo_bits": end["val_elbo_bits"], "se_bits": end["val_se_bits"]})
        if fell:
            warnings.warn(f"{fell}; the model may have collapsed (train.lr = {config.train.lr:g} too large?)",
                          TrainingWarning, stacklevel=2)
    with averaged():
        metrics = finish_run(process, dataset, config, state, run_dir)
    if config.evaluate.diagnose:
        from .diagnostics import diagnose
        diagnose(run_dir, seed=config.seed, progress=progress, log=log)
    return metrics


def _copy(state_dict):
    return {k: v.detach().clone() for k, v in state_dict.items()}


def _current_lr(optim):
    lrs = [group["lr"] for opt in optim.optim_objs.values() for group in opt.param_groups]
    return lrs[0] if lrs else float("nan")


def _held_out_bound(process, dataset, config, state):
    """The held-out bound as the evaluations during training estimate it."""
    process.eval()
    report = bound_report(process, dataset.val[: config.train.eval_sequences], replicates=2, seed=state.step)
    process.train()
    return report


def _evaluate_during_training(process, dataset, config, state, losses, optim):
    report = _held_out_bound(process, dataset, config, state)
    process.eval()
    samples = process.sample(config.train.eval_samples, seed=config.seed)
    process.train()
    fractions = membership(samples, dataset.train, dataset.val)
    state.snapshots.append((state.step, samples[:32].to(torch.uint8).cpu()))
    return {"step": state.step, "loss_bits": sum(losses) / max(len(losses), 1),
            "val_elbo_bits": report["elbo_bits"], "val_se_bits": report["se_bits"],
            "frac_train": fractions["train"], "frac_held_out": fractions["held_out"],
            "frac_neither": fractions["neither"], "lr": _current_lr(optim)}


def finish_run(process, dataset, config, state, run_dir):
    """Final metrics, history and plots of a run."""
    process.eval()
    train_bound = bound_report(process, dataset.train, config.evaluate.replicates, seed=config.seed, distinct=True)
    val_bound = bound_report(process, dataset.val, config.evaluate.replicates, seed=config.seed + 1, distinct=True)
    started = time.perf_counter()
    samples = process.sample(config.evaluate.num_samples, seed=config.seed)
    sampling_seconds = time.perf_counter() - started
    metrics = {
        "train": train_bound, "held_out": val_bound,
        "samples": {"num": config.evaluate.num_samples, **membership(samples, dataset.train, dataset.val),
                    "held_out_patterns": held_out_patterns(dataset.train, dataset.val),
                    "per_second": config.evaluate.num_samples / sampling_seconds},
        "wall_time_s": state.wall_time, "steps": state.step, "T": process.T, "n": dataset.n,
        "num_parameters": sum(p.numel() for p in process.parameters()),
    }
    if dataset.support is not None:
        metrics["samples"]["pattern_fractions"] = pattern_histogram(samples, dataset.support)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_history(state.history, run_dir / "history.csv")
    references = reference_bounds(copy.deepcopy(process.kernel).cpu(), dataset)
    plots.bound_curve(state.history, run_dir / "bound_curve.png", references)
    plots.membership_curve(state.history, run_dir / "proportions.png",
                           held_out=metrics["samples"]["held_out_patterns"] > 0)
    plots.sample_grid(samples[:64].cpu(), run_dir / "samples.png", levels=config.data.levels)
    plots.sample_evolution_gif(state.snapshots, run_dir / "sample_evolution.gif", levels=config.data.levels)
    return metrics


def _write_history(history, path):
    if not history:
        return
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
