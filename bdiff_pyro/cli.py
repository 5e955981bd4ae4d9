"""The ``bdiff`` command: parses, calls the library, prints.

Bad input (a UserError, or arguments argparse rejects) prints one line ``bdiff: error: ...``
and exits with status 2; a warning prints one line ``bdiff: warning: ...``.  Arguments and
configs are checked before torch and Pyro are imported (seconds), so a typo fails at once.
"""

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from bdiff_pyro.config import DEVICES, MAX_SEED  # config.py imports YAML, not torch
from bdiff_pyro.errors import TrainingStopped, UserError
from bdiff_pyro.util.files import write_atomically


def cmd_train(args):
    from bdiff_pyro.config import load_config

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
        config.seed = args.seed  # checked by argparse (type=seed)
    if args.nproc is not None:  # checked here, then launched: this process never imports torch
        from bdiff_pyro.config import check_batch_divides

        if "WORLD_SIZE" in os.environ:
            raise UserError(f"--nproc {args.nproc}: this process already runs under torchrun "
                            f"(WORLD_SIZE = {os.environ['WORLD_SIZE']}); pass one or the other")
        check_batch_divides(config.train.batch_size, args.nproc)
        raise SystemExit(launch_processes(args.nproc, train_arguments(args)))
    from bdiff_pyro.distributed import join, leave, resolve_device, world_from_environment
    from bdiff_pyro.train import prepare_training

    world = world_from_environment()
    setup = prepare_training(config, run_dir if args.resume else None, world)
    join(world, resolve_device(setup.config.device, world.local_rank))
    finished = False
    try:
        train_in_world(args, setup, run_dir if args.resume else None, world)
        finished = True
    finally:
        leave(world, finished)


def train_in_world(args, setup, resume_dir, world):
    """``bdiff train`` in one of ``world``'s processes: rank 0 claims (or reuses) the run
    directory, tells the others where it is, writes it and prints."""
    from bdiff_pyro.train import claim_run_dir, discard_run_dir, run_training

    def claim():
        if resume_dir is not None:
            _check_writable(resume_dir)
            from bdiff_pyro.config import save_config
            save_config(setup.config, resume_dir / "config.yaml")
            run_dir, created = resume_dir, None
        else:
            run_dir, created = claim_run_dir(setup.config, args.config, args.out)
        print(f"run directory: {run_dir}" + (f" ({world.size} processes)" if world.distributed else ""))
        return run_dir, created

    run_dir, created = world.on_main(claim)
    try:
        metrics = run_training(setup, run_dir, progress=not args.quiet, world=world)
    except BaseException as error:
        from bdiff_pyro.checkpoints import CHECKPOINT_NAME
        if created is None or not world.main or (run_dir / CHECKPOINT_NAME).exists():
            raise
        discard_run_dir(run_dir, created)  # a start that failed leaves nothing behind
        if isinstance(error, TrainingStopped):
            raise TrainingStopped(f"{error}; removed {run_dir}", error.exit_code) from None
        raise
    if world.main:
        print_final_report(metrics, setup.config, run_dir)


def train_arguments(args):
    """The ``bdiff train`` arguments of ``args`` without --nproc: what each process is given."""
    argv = ["train"] + ([str(args.config)] if args.config else [])
    for flag, value in (("--out", args.out), ("--resume", args.resume), ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    return argv + (["--quiet"] if args.quiet else [])


def launch_processes(nproc, argv):
    """torchrun (torch.distributed.run) with ``nproc`` processes on this machine, each running
    ``python -m bdiff_pyro ARGV``; returns torchrun's exit status (1 when a process failed).
    A Ctrl-C reaches torchrun and its processes too; this process waits for them to stop."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bdiff_pyro", *argv]
    with subprocess.Popen(command) as launcher:
        while True:
            try:
                return launcher.wait()
            except KeyboardInterrupt:
                continue


def _check_writable(run_dir):
    """--resume needs to write into the run directory: say so before training, not after."""
    probe = run_dir / ".write-test"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError(f"--resume {run_dir}: cannot write in the run directory ({error.strerror})") from None


def print_final_report(metrics, config, run_dir):
    """The end of a run: each ELBO says which estimator, which data and how many replicates."""
    def bound(report, data):
        scored = (f"a seeded subsample of {report['subsample']} of its {report['sequences']} sequences"
                  if report.get("subsample") else f"{report['sequences']} sequences")
        return (f"{report['elbo_bits']:.4f} ± {report['se_bits']:.4f} bits/seq on the {data} ({scored}, "
                f"{report['replicates']} replicates stratified over t)")

    print(f"final ELBO (bits/seq, estimate ± standard error): {bound(metrics['held_out'], 'held-out data')}; "
          f"{bound(metrics['train'], 'training data')}")
    if config.evaluate.diagnose:
        print("(the diagnostics' ELBO above estimates the same held-out ELBO from draws of its own, one replicate "
              "per draw, ± its MCSE: the two differ by Monte Carlo error)")
    samples = metrics["samples"]
    print(sample_summary(samples))
    if "pattern_fractions" in samples:
        print("pattern fractions: " + " ".join(f"{f:.3f}" for f in samples["pattern_fractions"]))
    print(f"trained {metrics['steps']} steps in {metrics['wall_time_s']:.1f} s; "
          f"metrics, plots and checkpoint in {run_dir}/")


def sample_summary(samples):
    """One line on where the samples fall; "no held-out patterns" where the held-out set adds
    none to the training set (heartbeat data), instead of a held-out fraction that is always 0."""
    held_out = (f"{samples['held_out']:.2%} held-out sequences" if samples.get("held_out_patterns", 1) > 0
                else "no held-out patterns (the held-out set is the training set)")
    return (f"of {samples['num']} samples: {samples['train']:.2%} training sequences, {held_out}, "
            f"{samples['neither']:.2%} neither")


def cmd_sample(args):
    out = check_output_file(args.out, args.force) if args.out else None
    from bdiff_pyro.checkpoints import load_with_config

    config, process = load_with_config(args.checkpoint, args.device)
    use_threads(config)
    if args.steps is not None:
        process.stride_grid(args.steps)  # refuses a bad --steps before anything is written
    from bdiff_pyro.memory import iter_sample_batches

    batches = iter_sample_batches(process, args.num, seed=args.seed, steps=args.steps)  # bounded memory
    lines = (format_lines(batch, config.data.alphabet) for batch in batches)
    if out is None:
        write_to_stdout(lines)
        return
    line_bytes = process.n + 1
    free = shutil.disk_usage(out.parent).free
    if args.num * line_bytes > free:
        raise UserError(f"{out}: {args.num} samples need {_size(args.num * line_bytes)} "
                        f"({line_bytes} bytes a line) but {out.parent} has {_size(free)} free")
    write_lines(out, lines)


def use_threads(config):
    """torch's CPU threads as the config says (as training does; 0 keeps torch's default)."""
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)


def check_output_file(path, force):
    """The --out file of ``bdiff sample``, checked before anything is computed."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out needs a file name")
    if not out.parent.is_dir():
        raise UserError(f"{out}: directory {out.parent} does not exist")
    if out.exists() and not force:
        raise UserError(f"{out}: file exists; pass --force to overwrite it")
    return out


def format_lines(samples, alphabet):
    from bdiff_pyro.data.datasets import format_sequence

    return "".join(format_sequence(row, alphabet) + "\n" for row in samples.tolist())


def write_to_stdout(chunks):
    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except BrokenPipeError:  # e.g. bdiff sample ... | head: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def write_lines(path, chunks):
    """The text chunks into ``path`` by one atomic write: an error or Ctrl-C leaves no partial file."""

    def write(temporary):
        with open(temporary, "w") as stream:
            for chunk in chunks:
                stream.write(chunk)

    try:
        write_atomically(path, write)
    except OSError as error:
        raise UserError(f"{path}: cannot write ({error.strerror})") from None


def _size(num_bytes):
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def cmd_evaluate(args):
    data = Path(args.data)
    if not data.is_file():
        raise UserError(f"{data}: cannot read data file ({'a directory' if data.is_dir() else 'no such file'})")
    from bdiff_pyro.checkpoints import load_with_config
    from bdiff_pyro.data.datasets import read_npz, read_sequences
    from bdiff_pyro.evaluation import bound_report

    config, process = load_with_config(args.checkpoint, args.device)
    use_threads(config)
    if data.suffix == ".npz":
        x0 = read_npz(data, config.data.levels)[args.split]
    else:
        x0 = read_sequences(args.data, config.data.levels, config.data.alphabet)
    x0 = x0.to(process.kernel.log_pi.device)
    if x0.shape[1] != process.n:
        raise UserError(f"{args.data}: sequences of length {x0.shape[1]}, but the model has n = {process.n}")
    report = bound_report(process, x0, replicates=args.replicates, seed=args.seed)
    papers_K = report.get("K_undefined") or f"paper's K without pi correction: {report['K_bits']:.4f}"
    print(f"ELBO = {report['elbo_bits']:.4f} ± {report['se_bits']:.4f} bits/seq "
          f"({len(x0)} sequences, {args.replicates} replicates; {papers_K})")
    if args.exact:
        from bdiff_pyro.programs.enumeration import exact_log_likelihood
        from bdiff_pyro.util.stats import LN2

        report["exact_log_likelihood_bits"] = float(exact_log_likelihood(process.double(), x0.double()).mean()) / LN2
        print(f"exact log p(x^0) = {report['exact_log_likelihood_bits']:.4f} bits/seq (enumerated)")
    if args.importance is not None:
        from bdiff_pyro.programs.enumeration import importance_log_likelihood
        from bdiff_pyro.util.stats import LN2

        estimate, se, ess = importance_log_likelihood(process, x0, num_samples=args.importance, return_ess=True)
        report.update(importance_bits=float(estimate.mean()) / LN2,
                      importance_se_bits=float(se.pow(2).sum().sqrt()) / len(x0) / LN2,
                      importance_min_ess=float(ess.min()))
        print(f"importance-sampled log p(x^0) = {report['importance_bits']:.4f} ± {report['importance_se_bits']:.4f} "
              f"bits/seq ({args.importance} trajectories per sequence; "
              f"smallest ESS {report['importance_min_ess']:.0f})")
    if args.samples is not None:
        from bdiff_pyro.evaluation import importance_weighted_report
        from bdiff_pyro.util.stats import LN2

        report["importance_weighted"] = iw = importance_weighted_report(process, x0, args.samples, seed=args.seed)
        print(f"importance-weighted bound (S = {args.samples} forward-chain trajectories per sequence) = "
              f"{iw['nats']:.4f} ± {iw['se_nats']:.4f} nats/seq ({iw['bits']:.4f} ± {iw['se_bits']:.4f} bits/seq; "
              f"ELBO {report['elbo_bits'] * LN2:.4f} nats/seq); ESS mean {iw['ess_mean']:.1f}, "
              f"smallest {iw['ess_min']:.1f} of {args.samples}")
    if args.json:
        print(json.dumps(report, allow_nan=False))


def cmd_impute(args):
    data = Path(args.data)
    if not data.is_file():
        raise UserError(f"{data}: cannot read data file ({'a directory' if data.is_dir() else 'no such file'})")
    out = check_output_file(args.out, args.force) if args.out else None
    from bdiff_pyro.checkpoints import load_with_config
    from bdiff_pyro.data import partial

    config, process = load_with_config(args.checkpoint, args.device)
    use_threads(config)
    values, mask, kind = partial.read_partial(data, config.data.levels, config.data.alphabet)
    values, mask = values.to(process.kernel.log_pi.device), mask.to(process.kernel.log_pi.device)
    if values.shape[1] != process.n:
        raise UserError(f"{data}: sequences of length {values.shape[1]}, but the model has n = {process.n}")
    as_arrays = kind == "array" or (out is not None and out.suffix == ".npz")
    if as_arrays and (out is None or out.suffix != ".npz"):
        raise UserError(f"{data}: array input gives array output; pass --out FILE.npz")
    from bdiff_pyro.programs.conditioning import impute

    result = impute(process, values, mask, method=args.method, num_samples=args.samples,
                    num_particles=args.particles, seed=args.seed)
    if as_arrays:
        import numpy as np

        arrays = partial.imputation_arrays(result)

        def save(temporary):
            with open(temporary, "wb") as stream:  # a file object: np.savez would append ".npz" to a name
                np.savez(stream, **arrays)

        try:
            write_atomically(out, save)
        except OSError as error:
            raise UserError(f"{out}: cannot write ({error.strerror})") from None
        print(f"completions, marginals{' and evidence' if result.ess is not None else ''} in {out}")
        return
    lines = partial.completion_lines(result.completions, config.data.alphabet)
    if out is None:
        write_to_stdout([lines])
        return
    write_lines(out, [lines])
    written = [f"completions in {out}", f"marginals in {out}.marginals"]
    write_lines(Path(f"{out}.marginals"), [partial.marginal_lines(result.marginals)])
    if result.ess is not None:
        write_lines(Path(f"{out}.evidence.csv"),
                    [partial.evidence_csv(result.log_evidence, result.log_evidence_se, result.ess)])
        written.append(f"log p(x_observed) per row in {out}.evidence.csv")
    print("; ".join(written))


def cmd_compare(args):
    from bdiff_pyro.crosscheck import compare_main

    paths = compare_main(args.config, args.out)
    print(f"tables, CSVs and plots in {paths['out_dir']}/")


def cmd_diagnose(args):
    from bdiff_pyro.diagnostics import diagnose

    try:
        diagnose(args.run_dir, chains=args.chains, draws=args.draws, seed=args.seed, overwrite=args.overwrite,
                 progress=not args.quiet)
    except KeyboardInterrupt:
        raise TrainingStopped("interrupted; no diagnostics written", exit_code=130) from None


def cmd_oracle(args):
    from bdiff_pyro.config import load_config

    config = load_config(args.config, args.set)
    from bdiff_pyro.evaluation import oracle_for_config

    use_threads(config)
    report = oracle_for_config(config, replicates=args.replicates, seed=args.seed,
                         exact=False if args.monte_carlo else "auto", samples=args.samples,
                         progress=not args.quiet)
    se = f" ± {report['se_bits']:.4f}" if report.get("se_bits") else " (exact)"
    pi_1 = f", pi_1 = {report['pi_1']:g}" if report["pi_1"] is not None else ""  # two-state kernels only
    print(f"oracle ELBO = {report['elbo_bits']:.4f}{se} bits/seq for T = {report['T']}, schedule {report['schedule']}"
          f"{pi_1}; data log-likelihood {report['data_log_likelihood_bits']:.4f} bits/seq, "
          f"gap {report['gap_bits']:.4f} bits ({report['support']} support)")
    if "samples" in report:
        drawn = report["samples"]
        shown = " ".join(f"{f:.3f}" for f in drawn["pattern_fractions"][:10])
        more = " ..." if len(drawn["pattern_fractions"]) > 10 else ""
        print(f"of {drawn['num']} oracle samples (seed {drawn['seed']}): {drawn['in_support']:.2%} in the support; "
              f"pattern fractions {shown}{more}")
    if args.gap is not None:
        from bdiff_pyro.checkpoints import load
        from bdiff_pyro.evaluation import oracle_gap_report

        try:
            gap = oracle_gap_report(config, load(args.gap), draws=args.gap_draws,
                                    seed=config.seed if args.seed is None else args.seed, progress=not args.quiet)
        except UserError as error:
            raise UserError(f"--gap {args.gap}: {error}") from None
        steps = ", ".join(f"{part['first']}-{part['last']} {part['gap_bits']:.4f}" for part in gap["by_steps"])
        print(f"{args.gap} falls short of the oracle by {gap['gap_bits']:.4f} ± {gap['se_bits']:.4f} bits/seq "
              f"(sum over t of the KL from the oracle's step, {gap['draws']} draws per t), so its ELBO is "
              f"{report['elbo_bits'] - gap['gap_bits']:.4f}; by steps: {steps}")
        report["gap_to_run"] = gap
    if args.json:
        print(json.dumps(report, default=str, allow_nan=False))


class _Parser(argparse.ArgumentParser):
    """argparse with the package's one-line errors (argparse prints the usage first)."""

    def error(self, message):
        self.exit(2, f"bdiff: error: {self.prog}: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless there is none."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def at_least(minimum):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def seed(text):
    """An argparse type: a seed in 0..MAX_SEED."""
    value = at_least(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED} (got {value})")
    return value


def add_device_flag(parser):
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where to compute (auto: cuda when available); a seed draws different numbers on "
                        "cuda than on cpu")


def build_parser():
    parser = _Parser(prog="bdiff", description="Discrete (Bernoulli) diffusion as Pyro programs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        return commands.add_parser(name, help=help, description=help, formatter_class=_Formatter)

    p = command("train", "train a model from a config file")
    p.add_argument("config", nargs="?", help="YAML config (see experiments/configs/); with --resume, "
                   "default: the run directory's config.yaml")
    p.add_argument("--out", help="run directory to create (default runs/<config>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint "
                   "(its config.yaml holds the earlier --set overrides)")
    p.add_argument("--seed", type=seed, help="override the config's seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry by dotted key, e.g. --set model.T=50")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=at_least(1), metavar="N",
                   help="train on N processes of this machine, started by torchrun (train.batch_size is the "
                   "global batch and must be a multiple of N; default: this process alone)")
    p.set_defaults(func=cmd_train)

    p = command("sample", "draw samples from a trained model (lines of 0/1)")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("-n", "--num", type=at_least(1), required=True, help="number of samples")
    p.add_argument("--seed", type=seed, help="random seed (default: unseeded, different every time)")
    p.add_argument("--out", help="write the samples to this file instead of standard output")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--steps", type=at_least(1),
                   help="strided sampling with this many network evaluations (x0 models; default: all T steps)")
    add_device_flag(p)
    p.set_defaults(func=cmd_sample)

    p = command("evaluate", "the ELBO on a data file, in bits/seq")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("data", metavar="DATA_FILE", help="0/1 text lines, a .npy array, or an .npz (see --split)")
    p.add_argument("--replicates", type=at_least(2), default=8,
                   help="independent estimates of the bound per sequence, for its standard error")
    p.add_argument("--seed", type=seed, default=0, help="random seed of the estimates")
    p.add_argument("--exact", action="store_true", help="also the exact log-likelihood (small n only)")
    p.add_argument("--importance", type=at_least(1), metavar="S",
                   help="also log p(x^0) by importance sampling, S trajectories per sequence")
    p.add_argument("--samples", type=at_least(1), metavar="S",
                   help="also the importance-weighted bound log mean_s p(x^{0:T}_s) / q(x^{1:T}_s | x^0) over S "
                   "forward-chain trajectories per sequence (S = 1: the ELBO), in nats and bits")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test",
                   help="the array of an .npz DATA_FILE to score")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    add_device_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("diagnose", "ArviZ diagnostics of a trained run: R-hat, ESS, MCSE, plots")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--chains", type=at_least(2), default=4,
                   help="independent sampling runs (R-hat compares them)")
    p.add_argument("--draws", type=at_least(10), default=250, help="draws per chain")
    p.add_argument("--seed", type=seed, default=0, help="random seed of the chains")
    p.add_argument("--overwrite", action="store_true",
                   help="replace diagnostics.nc instead of writing diagnostics-2.nc")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_diagnose)

    p = command("oracle", "the best possible ELBO for the config's data, T and schedule")
    p.add_argument("config", help="YAML config (see experiments/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry by dotted key, e.g. --set model.T=50")
    p.add_argument("--replicates", type=at_least(2),
                   help="Monte Carlo replicates per pattern (default: the config's evaluate.replicates)")
    p.add_argument("--seed", type=seed, help="random seed of the Monte Carlo estimate and the samples "
                                             "(default: the config's seed)")
    p.add_argument("--monte-carlo", action="store_true", help="estimate by Monte Carlo even where exact is possible")
    p.add_argument("--samples", type=at_least(0), default=0, metavar="N",
                   help="also draw N samples from the oracle: the best fraction of exact samples at this T")
    p.add_argument("--gap", metavar="RUN_DIR", help="also how far a run trained on this config falls short of the "
                                                    "oracle at each step (its ELBO, with little noise)")
    p.add_argument("--gap-draws", type=at_least(2), default=500, metavar="N",
                   help="x^0 and x^t drawn per step for --gap (default: 500)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_oracle)

    p = command("impute", "complete partially observed sequences: the model's conditional given the observed bits")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("data", metavar="DATA_FILE", help="text lines with ? for missing, .npy/.npz with NaN for missing, "
                   "or .npz with arrays values and mask (1 = observed)")
    p.add_argument("--method", choices=("exact", "replace", "smc"), default="smc",
                   help="exact: enumeration (small n); replace: a heuristic; smc: twisted sequential Monte Carlo")
    p.add_argument("--particles", type=at_least(4), default=256, help="smc particles per row (a multiple of 4)")
    p.add_argument("--samples", type=at_least(1), default=1, help="completions per row")
    p.add_argument("--seed", type=seed, help="random seed (default: unseeded, different every time)")
    p.add_argument("--out", help="write completions here (FILE.npz for arrays) and the marginals beside it; "
                   "default: completions to standard output")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_device_flag(p)
    p.set_defaults(func=cmd_impute)

    p = command("compare", "analytic ELBO against TraceEnum_ELBO, Trace_ELBO and log p(x^0)")
    p.add_argument("config", help="e.g. experiments/crosscheck/compare.yaml")
    p.add_argument("--out", help="output directory (default runs/compare-<time>)")
    p.set_defaults(func=cmd_compare)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"bdiff: warning: {message}", file=sys.stderr if file is None else file)


def _prefix():
    """``bdiff``, or ``bdiff[rank R]`` in the processes other than rank 0 of a run on several."""
    rank = os.environ.get("RANK", "0")
    return "bdiff" if rank == "0" else f"bdiff[rank {rank}]"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args.func(args)
    except UserError as error:
        print(f"{_prefix()}: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:  # every process of a run stops at the same step: rank 0 says why
        if _prefix() == "bdiff":
            print(f"bdiff: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0
