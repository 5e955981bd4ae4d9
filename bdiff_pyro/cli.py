"""The ``bdiff`` command: parses, calls the library, prints.

Bad input (a UserError) prints one line ``bdiff: error: ...`` and exits with status 2.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .errors import UserError


def cmd_train(args):
    from .config import load_config
    from .train import TrainingStopped, claim_run_dir, discard_run_dir, prepare_training, run_training

    if args.resume:
        if args.out:
            raise UserError(f"--out {args.out}: a resumed run stays in its directory (--resume {args.resume}); "
                            "pass only --resume")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        config = load_config(args.config or run_dir / "config.yaml", args.set)
    elif args.config is None:
        raise UserError("train needs a CONFIG file (or --resume RUN_DIR)")
    else:
        config = load_config(args.config, args.set)
    if args.seed is not None:
        config.seed = args.seed
        config.validate("--seed")
    setup = prepare_training(config, run_dir if args.resume else None)
    if args.resume:
        _check_writable(run_dir)
        created = None
        from .config import save_config
        save_config(setup.config, run_dir / "config.yaml")
    else:
        run_dir, created = claim_run_dir(setup.config, args.config, args.out)
    print(f"run directory: {run_dir}")
    try:
        metrics = run_training(setup, run_dir, progress=not args.quiet)
    except BaseException as error:
        from .checkpoints import CHECKPOINT_NAME
        if created is None or (run_dir / CHECKPOINT_NAME).exists():
            raise
        discard_run_dir(run_dir, created)  # a start that failed leaves nothing behind
        if isinstance(error, TrainingStopped):
            raise TrainingStopped(f"{error}; removed {run_dir}", error.exit_code) from None
        raise
    print_final_report(metrics, setup.config, run_dir)


def _check_writable(run_dir):
    """--resume needs to write into the run directory: say so before training, not after."""
    probe = run_dir / ".write-test"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError(f"--resume {run_dir}: cannot write in the run directory ({error.strerror})") from None


def print_final_report(metrics, config, run_dir):
    """The end of a run: each K says which estimator, which data and how many replicates."""
    def bound(report, data):
        scored = (f"a seeded subsample of {report['subsample']} of its {report['sequences']} sequences"
                  if report.get("subsample") else f"{report['sequences']} sequences")
        return (f"{report['elbo_bits']:.4f} ± {report['se_bits']:.4f} bits/seq on the {data} ({scored}, "
                f"{report['replicates']} replicates stratified over t)")

    print(f"final K (ELBO in bits/seq, estimate ± standard error): {bound(metrics['held_out'], 'held-out data')}; "
          f"{bound(metrics['train'], 'training data')}")
    if config.evaluate.diagnose:
        print("(the diagnostics' K above estimates the same held-out K from draws of its own, one replicate "
              "per draw, ± its MCSE: the two differ by Monte Carlo error)")
    samples = metrics["samples"]
    print(f"of {samples['num']} samples: {samples['train']:.2%} training sequences, "
          f"{samples['held_out']:.2%} held-out sequences, {samples['neither']:.2%} neither")
    if "pattern_fractions" in samples:
        print("pattern fractions: " + " ".join(f"{f:.3f}" for f in samples["pattern_fractions"]))
    print(f"trained {metrics['steps']} steps in {metrics['wall_time_s']:.1f} s; "
          f"metrics, plots and checkpoint in {run_dir}/")


def cmd_sample(args):
    from .checkpoints import load_with_config
    from .data import format_sequence
    from .memory import iter_sample_batches

    if args.num < 1:
        raise UserError(f"-n must be at least 1 (got {args.num})")
    config, process = load_with_config(args.checkpoint)
    if args.steps is not None:
        process.stride_grid(args.steps)  # a bad --steps fails before any output
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise UserError(f"{out}: file exists; pass --force to overwrite it")
    # one batch in memory at a time, whatever -n is
    batches = iter_sample_batches(process, args.num, seed=args.seed, steps=args.steps)
    with (open(out, "w") if out is not None else contextlib.nullcontext(sys.stdout)) as stream:
        for samples in batches:
            stream.write("".join(format_sequence(row, config.data.alphabet) + "\n" for row in samples.tolist()))


def cmd_evaluate(args):
    from .checkpoints import load_with_config
    from .data import read_sequences
    from .evaluation import bound_report

    config, process = load_with_config(args.checkpoint)
    x0 = read_sequences(args.data, config.data.levels, config.data.alphabet)
    if x0.shape[1] != process.n:
        raise UserError(f"{args.data}: sequences of length {x0.shape[1]}, but the model has n = {process.n}")
    if args.replicates < 2:
        raise UserError(f"--replicates must be at least 2 for a standard error (got {args.replicates})")
    report = bound_report(process, x0, replicates=args.replicates, seed=args.seed)
    papers_K = report.get("K_undefined") or f"paper's K without pi correction: {report['K_bits']:.4f}"
    print(f"K = {report['elbo_bits']:.4f} ± {report['se_bits']:.4f} bits/seq "
          f"({len(x0)} sequences, {args.replicates} replicates; {papers_K})")
    if args.exact:
        from .bound import LN2
        from .enumerate import exact_log_likelihood

        report["exact_log_likelihood_bits"] = float(exact_log_likelihood(process.double(), x0.double()).mean()) / LN2
        print(f"exact log p(x^0) = {report['exact_log_likelihood_bits']:.4f} bits/seq (enumerated)")
    if args.importance:
        from .bound import LN2
        from .enumerate import importance_log_likelihood

        estimate, se, ess = importance_log_likelihood(process, x0, num_samples=args.importance, return_ess=True)
        report.update(importance_bits=float(estimate.mean()) / LN2,
                      importance_se_bits=float(se.pow(2).sum().sqrt()) / len(x0) / LN2,
                      importance_min_ess=float(ess.min()))
        print(f"importance-sampled log p(x^0) = {report['importance_bits']:.4f} ± {report['importance_se_bits']:.4f} "
              f"bits/seq ({args.importance} trajectories per sequence; smallest ESS {report['importance_min_ess']:.0f})")
    if args.json:
        print(json.dumps(report, allow_nan=False))


def cmd_compare(args):
    from .compare import compare_main

    paths = compare_main(args.config, args.out)
    print(f"tables, CSVs and plots in {paths['out_dir']}/")


def cmd_diagnose(args):
    from .diagnostics import DEFAULT_CHAINS, DEFAULT_DRAWS, diagnose
    from .train import TrainingStopped

    try:
        diagnose(args.run_dir, chains=args.chains or DEFAULT_CHAINS, draws=args.draws or DEFAULT_DRAWS,
                 seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
    except KeyboardInterrupt:
        raise TrainingStopped("interrupted; no diagnostics written", exit_code=130) from None


def cmd_oracle(args):
    from .config import load_config
    from .oracle import oracle_main

    if args.samples < 0:
        raise UserError(f"--samples must be at least 0 (got {args.samples})")
    config = load_config(args.config, args.set)
    report = oracle_main(config, replicates=args.replicates, seed=args.seed,
                         exact=False if args.monte_carlo else "auto", samples=args.samples)
    se = f" ± {report['se_bits']:.4f}" if report.get("se_bits") else " (exact)"
    pi_1 = f", pi_1 = {report['pi_1']:g}" if report["pi_1"] is not None else ""  # two-state kernels only
    print(f"oracle K* = {report['elbo_bits']:.4f}{se} bits/seq for T = {report['T']}, schedule {report['schedule']}"
          f"{pi_1}; data log-likelihood {report['data_log_likelihood_bits']:.4f} bits/seq, "
          f"gap {report['gap_bits']:.4f} bits ({report['support']} support)")
    if "samples" in report:
        drawn = report["samples"]
        shown = " ".join(f"{f:.3f}" for f in drawn["pattern_fractions"][:10])
        more = " ..." if len(drawn["pattern_fractions"]) > 10 else ""
        print(f"of {drawn['num']} oracle samples (seed {drawn['seed']}): {drawn['in_support']:.2%} in the support; "
              f"pattern fractions {shown}{more}")
    if args.json:
        print(json.dumps(report, default=str, allow_nan=False))


def build_parser():
    parser = argparse.ArgumentParser(prog="bdiff", description="Discrete (Bernoulli) diffusion as Pyro programs.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a model from a config file")
    p.add_argument("config", nargs="?", help="YAML config (see experiments/configs/); with --resume, "
                   "default: the run directory's config.yaml")
    p.add_argument("--out", help="run directory to create (default runs/<config>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint "
                   "(its config.yaml holds the earlier --set overrides)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry by dotted key, e.g. --set model.T=50")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("sample", help="draw samples from a trained model")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("-n", "--num", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="write lines of 0/1 here instead of standard output")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--steps", type=int, help="strided sampling with this many network evaluations (x0 models)")
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("evaluate", help="the bound K on a data file, in bits/seq")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("data", metavar="DATA_FILE", help="0/1 text lines or a .npy array")
    p.add_argument("--replicates", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact", action="store_true", help="also the exact log-likelihood (small n only)")
    p.add_argument("--importance", type=int, metavar="S", help="also log p(x^0) by importance sampling, S trajectories")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("diagnose", help="ArviZ diagnostics of a trained run: R-hat, ESS, MCSE, plots")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--chains", type=int, help="independent sampling runs (default 4)")
    p.add_argument("--draws", type=int, help="draws per chain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace diagnostics.nc instead of writing diagnostics-2.nc")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_diagnose)

    p = commands.add_parser("oracle", help="the best possible K for the config's data, T and schedule")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--replicates", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--monte-carlo", action="store_true", help="estimate by Monte Carlo even where exact is possible")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="also draw N samples from the oracle: the best fraction of exact samples at this T")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_oracle)

    p = commands.add_parser("compare", help="analytic K against TraceEnum_ELBO, Trace_ELBO and log p(x^0)")
    p.add_argument("config", help="e.g. experiments/configs/compare.yaml")
    p.add_argument("--out", help="output directory (default runs/compare-<time>)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .train import TrainingStopped

    try:
        args.func(args)
    except UserError as error:
        print(f"bdiff: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        print(f"bdiff: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0
