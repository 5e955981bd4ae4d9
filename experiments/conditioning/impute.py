"""Imputation with a trained model: heartbeat consistency, digits infilling against the mixture of
Bernoullis, and the speed of smc.  See experiments/conditioning/README.md.

    python experiments/conditioning/impute.py heartbeat RUN_DIR [--rows R] [--particles P]
    python experiments/conditioning/impute.py speed RUN_DIR [--particles P]
    python experiments/conditioning/impute.py digits RUN_DIR [--images M] [--particles P] [--out DIR]
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import chisquare

from bdiff_pyro.checkpoints import load
from bdiff_pyro.data.datasets import heartbeat
from bdiff_pyro.programs.conditioning import impute


def heartbeat_observations(n, period, rows, zeros, with_one, seed):
    """Rows observing one 1 at a random position (if ``with_one``) and ``zeros`` zeros at random
    positions of the same heartbeat (so the observations are always possible)."""
    rng = np.random.default_rng(seed)
    patterns = heartbeat(n, period).numpy()
    values, mask = np.zeros((rows, n)), np.zeros((rows, n), dtype=bool)
    for r in range(rows):
        truth = patterns[rng.integers(period)]
        ones, off = np.flatnonzero(truth == 1), np.flatnonzero(truth == 0)
        chosen = list(rng.choice(off, zeros, replace=False)) + ([rng.choice(ones)] if with_one else [])
        mask[r, chosen] = True
        values[r] = truth
    return torch.tensor(values), torch.tensor(mask), patterns


def consistent_shifts(patterns, values, mask):
    """(rows, period) bool: the heartbeats that agree with each row's observed bits."""
    return ((patterns[None] == values.numpy()[:, None]) | ~mask.numpy()[:, None]).all(-1)


def heartbeat_study(args):
    process = load(args.run)
    n, period = process.n, 5
    print(f"heartbeat, n = {n}, T = {process.T}: {args.rows} rows, {args.particles} particles, seed {args.seed}")
    for with_one in (True, False):
        values, mask, patterns = heartbeat_observations(n, period, args.rows, args.zeros, with_one, args.seed)
        allowed = consistent_shifts(patterns, values, mask)
        for method in ("smc", "replace"):
            started = time.perf_counter()
            result = impute(process, values, mask, method=method, num_samples=1, num_particles=args.particles,
                            seed=args.seed)
            seconds = time.perf_counter() - started
            drawn = result.completions[:, 0].numpy()
            match = (drawn[:, None, :] == patterns[None]).all(-1)  # (rows, period)
            good = (match & allowed).any(-1).mean()
            observed_bits = f"{'one 1 and' if with_one else 'only'} {args.zeros} zeros"
            line = f"  {observed_bits}, {method:7s}: {good:.1%} consistent heartbeats"
            if not with_one:  # are the consistent shifts equally likely?  one draw per row, rows share nothing
                observed, expected = np.zeros(period), np.zeros(period)
                for r in range(args.rows):
                    hit = np.flatnonzero(match[r] & allowed[r])
                    if len(hit):
                        observed[hit[0]] += 1
                    expected[allowed[r]] += 1.0 / allowed[r].sum()
                expected *= observed.sum() / expected.sum()
                keep = expected > 0
                line += f"; chi-square p = {chisquare(observed[keep], expected[keep]).pvalue:.3f} over the shifts"
            print(line + f" ({seconds:.1f} s)")


def speed_study(args):
    process = load(args.run)
    row = heartbeat(process.n, 5)[:1].double()
    mask = torch.zeros_like(row, dtype=torch.bool)
    mask[0, :: 3] = True
    impute(process, row, mask, num_particles=args.particles, seed=0)  # warm-up
    times = []
    for seed in range(5):
        started = time.perf_counter()
        impute(process, row, mask, num_particles=args.particles, seed=seed)
        times.append(time.perf_counter() - started)
    print(f"smc, {args.particles} particles, one {process.n}-bit row, T = {process.T}: median {np.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}; {torch.get_num_threads()} torch threads)")


def digits_study(args):
    from bdiff_pyro.baselines.mixture import fit_mixture, logsumexp
    from bdiff_pyro.data.digits import digits_splits
    from bdiff_pyro.plots import save_image_grid

    process = load(args.run)
    splits = digits_splits(binary=True, seed=0)
    test = splits["test"][:args.images].double()
    mixture = max((fit_mixture(splits["train"], args.components, alpha=1.0, seed=s) for s in range(3)),
                  key=lambda m: m.history[-1])
    rng = np.random.default_rng(args.seed)
    masks = {"bottom half": np.tile(np.arange(64) < 32, (len(test), 1)),
             "50% random": rng.random((len(test), 64)) < 0.5}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full = impute(process, test, torch.ones_like(test, dtype=torch.bool), num_particles=args.particles, seed=args.seed)
    print(f"digits: {len(test)} test images, {args.particles} particles; mixture of {args.components} Bernoullis")
    print(f"  log p(x) from smc: {float(full.log_evidence.mean()) / math.log(2):.2f} bits/image "
          f"(mixture {float(mixture.log_prob(test.numpy()).mean()) / math.log(2):.2f})")
    for name, mask in masks.items():
        mask_t = torch.as_tensor(mask)
        result = impute(process, test, mask_t, num_samples=3, num_particles=args.particles, seed=args.seed)
        diffusion_bits = -(full.log_evidence - result.log_evidence) / math.log(2)
        x = test.numpy()
        log_joint = mixture.log_prob(x)
        observed_terms = (mask * x) @ np.log(mixture.probs).T + (mask * (1 - x)) @ np.log1p(-mixture.probs).T
        log_observed = logsumexp(mixture.log_weights[None] + observed_terms, axis=1)
        mixture_bits = -(log_joint - log_observed) / math.log(2)
        missing = (~mask).sum(1).mean()
        print(f"  {name}: -log2 p(missing | observed) = diffusion {float(diffusion_bits.mean()):.2f} "
              f"± {float(diffusion_bits.std() / math.sqrt(len(test))):.2f}, mixture {mixture_bits.mean():.2f} "
              f"± {mixture_bits.std() / math.sqrt(len(test)):.2f} bits/image ({missing:.0f} missing pixels); "
              f"smallest ESS {float(result.ess.min()):.0f}")
        shown = min(8, len(test))
        observed_img = np.where(mask[:shown], x[:shown], 0.5)
        rows = [observed_img] + [result.completions[:shown, s].numpy() for s in range(3)] + [x[:shown]]
        path = out / f"digits_{name.split()[0].replace('%', '')}.png"
        save_image_grid(np.concatenate(rows), path, columns=shown,
                        title=f"{name}: observed (grey = missing), 3 completions, truth")
        print(f"  picture: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("heartbeat", "speed", "digits"))
    parser.add_argument("run", help="a trained run directory or checkpoint")
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--zeros", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--components", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/conditioning")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    {"heartbeat": heartbeat_study, "speed": speed_study, "digits": digits_study}[args.study](args)


if __name__ == "__main__":
    main()
