"""Real binary data: the diffusion model against exact-likelihood baselines on 8x8 digits.

    python experiments/digits/digits.py [--config experiments/configs/digits.yaml] [--out DIR]
                                        [--threads 1] [--restarts 5] [--replicates 16] [--run RUN_DIR]

Data: scikit-learn's 8x8 digits binarised at grey level 8 (n = 64), the fixed 70/15/15
split of bdiff_pyro.data.digits (seed data.split_seed of the config, 0 by default).  On the same
split it measures, in bits per test image (-log2 p(x), lower is better):

- independent Bernoulli pixels (Laplace smoothing): exact;
- a mixture of Bernoullis fitted by EM, its number of components and smoothing chosen on the
  validation split, the best of --restarts starts for each: exact;
- the diffusion model trained from --config through bdiff_pyro.train.train: the negative
  ELBO (an upper bound on -log2 p(x)) from bound_report on the test split, with its Monte
  Carlo standard error (--replicates estimates per image).

Every number also has the standard error over test images, and the diffusion model is
compared with the mixture image by image (the paired difference and its standard error).
``--run`` evaluates an already trained run directory instead of training.

Writes results.json, results.md and image grids (samples_diffusion.png, samples_mixture.png,
test_images.png) to --out (default benchmarks/out/digits-<time>/), never overwriting one.
"""

import argparse
import importlib.util
import json
import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import bdiff_pyro
from bdiff_pyro.baselines.mixture import COMPONENT_GRID, IndependentBernoulli, bits_per_sequence, select_mixture
from bdiff_pyro.config import load_config
from bdiff_pyro.data.digits import digits_splits
from bdiff_pyro.diffusion.bound import elbo_replicates
from bdiff_pyro.evaluation import bound_report
from bdiff_pyro.plots import save_image_grid
from bdiff_pyro.train import train
from bdiff_pyro.util.stats import LN2, mean_and_standard_error, membership_fractions

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "experiments/configs/digits.yaml"


def _benchmark_machine():
    """benchmarks/machine.py (what every measurement prints first), imported by its path."""
    spec = importlib.util.spec_from_file_location("machine", ROOT / "benchmarks" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repository_relative(path) -> str:
    """The path relative to the repository when it lies inside it (results.json is committed:
    an absolute path would name one machine's folders), else the path as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _per_image(bits):
    bits = np.asarray(bits, dtype=np.float64)
    return float(bits.mean()), float(bits.std(ddof=1) / math.sqrt(len(bits)))


def baselines(splits, restarts, components=COMPONENT_GRID, log=print):
    started = time.perf_counter()
    independent = IndependentBernoulli.fit(splits["train"])
    independent_bits = -independent.log_prob(splits["test"]) / LN2
    log("mixture of Bernoullis: model selection on the validation split")
    mixture, grid = select_mixture(splits["train"], splits["val"], components=components,
                                   restarts=restarts, log=log)
    mixture_bits = -mixture.log_prob(splits["test"]) / LN2
    seconds = time.perf_counter() - started
    val_bits, _ = bits_per_sequence(mixture.log_prob(splits["val"]))
    return mixture, {
        "independent": {"test_bits": _per_image(independent_bits)[0], "test_se_images": _per_image(independent_bits)[1],
                        "val_bits": bits_per_sequence(independent.log_prob(splits["val"]))[0]},
        "mixture": {"test_bits": _per_image(mixture_bits)[0], "test_se_images": _per_image(mixture_bits)[1],
                    "val_bits": val_bits, "num_components": mixture.num_components, "alpha": mixture.alpha,
                    "gamma": mixture.gamma, "restarts": restarts, "grid": grid},
        "seconds": seconds,
    }, mixture_bits


def diffusion(config, config_path, run_dir, splits, replicates, existing_run=None, log=print):
    if existing_run is None:
        run_dir.mkdir(parents=True)
        metrics = train(config, run_dir, progress=True, log=log)
    else:
        run_dir = Path(existing_run)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    model = bdiff_pyro.load(run_dir)
    test = splits["test"]
    started = time.perf_counter()
    report = bound_report(model, test, replicates=replicates, seed=12345)
    # The same draws image by image (bound_report's seed and order), for the paired comparison.
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        estimates = elbo_replicates(model.kernel, model.log_probs, test.to(model.kernel.log_pi.device), replicates)
    assert abs(mean_and_standard_error(estimates)[0] / LN2 - report["elbo_bits"]) < 1e-6
    per_image_bits = -estimates.mean(1).double().cpu().numpy() / LN2
    eval_seconds = time.perf_counter() - started
    samples = model.sample(1000, seed=0)
    return model, {
        "run_dir": repository_relative(run_dir), "config": repository_relative(config_path),
        "T": model.T, "steps": metrics["steps"],
        "train_seconds": metrics["wall_time_s"], "num_parameters": metrics["num_parameters"],
        "test_bits": -report["elbo_bits"], "test_se_mc": report["se_bits"],
        "test_se_images": _per_image(per_image_bits)[1], "replicates": replicates,
        "val_bits": -metrics["held_out"]["elbo_bits"], "train_bits": -metrics["train"]["elbo_bits"],
        "test_eval_seconds": eval_seconds,
        "samples": membership_fractions(samples, splits["train"], torch.cat([splits["val"], splits["test"]])),
    }, per_image_bits


def markdown(results, machine, command):
    base, diff, paired = results["baselines"], results["diffusion"], results["paired"]
    ind, mix = base["independent"], base["mixture"]
    sizes = results["split"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads). Command: `{command}`.", "",
        f"Binarised 8x8 digits (grey >= 8), n = 64, split {sizes['train']} / {sizes['val']} / {sizes['test']} "
        f"(train / val / test, seed {results['split_seed']}).  Bits per test image, lower is better; "
        "± is the standard error over test images (and, for the diffusion bound, its Monte Carlo "
        "standard error).", "",
        "| model | test bits/image | val bits/image | fit / train time (s) |",
        "|---|---|---|---|",
        f"| independent Bernoulli (Laplace) | {ind['test_bits']:.2f} ± {ind['test_se_images']:.2f} | "
        f"{ind['val_bits']:.2f} | (with the mixture) |",
        f"| mixture of Bernoullis (EM, {mix['num_components']} components, alpha = {mix['alpha']:g}) | "
        f"{mix['test_bits']:.2f} ± {mix['test_se_images']:.2f} | {mix['val_bits']:.2f} | {base['seconds']:.0f} |",
        f"| diffusion, T = {diff['T']}, {diff['steps']} steps (-ELBO, an upper bound) | "
        f"{diff['test_bits']:.2f} ± {diff['test_se_images']:.2f} (MC ± {diff['test_se_mc']:.3f}) | "
        f"{diff['val_bits']:.2f} | {diff['train_seconds']:.0f} |",
        "",
        f"Diffusion minus mixture, image by image: {paired['mean_bits']:+.2f} ± {paired['se_bits']:.2f} bits/image "
        f"(diffusion better on {paired['fraction_better']:.0%} of test images).  Of 1000 diffusion samples, "
        f"{diff['samples']['train']:.1%} are training images and {diff['samples']['held_out']:.1%} val/test images.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out" / f"digits-{datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core CPU one thread trains ~10x faster)")
    parser.add_argument("--restarts", type=int, default=5, help="EM restarts per mixture size")
    parser.add_argument("--components", type=int, nargs="+", default=list(COMPONENT_GRID),
                        help="mixture sizes to choose from on the validation split")
    parser.add_argument("--replicates", type=int, default=16, help="bound estimates per test image")
    parser.add_argument("--run", type=Path, default=None, help="evaluate this trained run instead of training")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; refusing to overwrite earlier results")
    config = load_config(args.config)
    if config.data.kind != "digits" or config.data.levels != 2:
        parser.error(f"{args.config}: needs data.kind: digits with levels: 2 "
                     f"(got {config.data.kind!r}, levels {config.data.levels})")
    torch.set_num_threads(args.threads)
    machine_module = _benchmark_machine()
    machine, command = machine_module.machine_description(), machine_module.command_line()
    print(f"machine: {machine}\ncommand: {command}")
    args.out.mkdir(parents=True)
    splits = digits_splits(binary=True, seed=config.data.split_seed)

    mixture, base, mixture_bits = baselines(splits, args.restarts, tuple(args.components))
    model, diff, diffusion_bits = diffusion(config, args.config, args.out / "diffusion", splits, args.replicates,
                                            args.run)
    difference = diffusion_bits - mixture_bits
    results = {
        "machine": machine, "command": command,
        "split": {name: len(x) for name, x in splits.items()}, "split_seed": config.data.split_seed,
        "binarisation": "pixel >= 8 (of 0..16) -> 1",
        "baselines": base, "diffusion": diff,
        "paired": {"mean_bits": float(difference.mean()), "se_bits": _per_image(difference)[1],
                   "fraction_better": float((difference < 0).mean())},
    }
    save_image_grid(model.sample(64, seed=0).cpu().numpy(), args.out / "samples_diffusion.png",
                    title=f"diffusion samples (T = {model.T})")
    save_image_grid(mixture.sample(64, seed=0), args.out / "samples_mixture.png",
                    title=f"mixture of Bernoullis samples ({mixture.num_components} components)")
    save_image_grid(splits["test"][:64].numpy(), args.out / "test_images.png", title="test images")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, machine, command)
    (args.out / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
