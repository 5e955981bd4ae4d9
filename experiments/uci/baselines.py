"""Published-comparator baselines on the UCI binary sets (dna, mushrooms): test NLL in nats.

    OMP_NUM_THREADS=1 python experiments/uci/baselines.py --out runs/uci-baselines
    python experiments/uci/baselines.py --quick --max-rows 200 --out runs/uci-quick   # seconds

Fits, on each data set's train split with every choice made on its valid split:
independent bits (train + valid, Laplace's rule: a check that the units match the published
ones), a mixture of Bernoullis (components and prior chosen on valid), FVSBN (weight decay
chosen on valid) and MADE with one mask and with an ensemble of orderings (hidden size chosen
on valid, early stopping on valid).  Writes results.json and results.md to --out: test NLL in
nats per example with its standard error (std of the per-row NLL / sqrt(rows)), the published
figure (MADE paper, Table 2) beside it, the difference and the wall time of fitting and of
evaluating.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bdiff_pyro.baselines.autoregressive import FVSBN, MADE, MADE_WEIGHT_DECAYS, negative_log_likelihood_summary
from bdiff_pyro.baselines.mixture import ALPHA_GRID, COMPONENT_GRID, IndependentBernoulli, select_mixture
from bdiff_pyro.errors import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
DATASETS = ("dna", "mushrooms")
SPLITS = ("train", "valid", "test")
NUM_BITS = {"dna": 180, "mushrooms": 112}

# Test NLL, nats per example (Germain et al. 2015, MADE, Table 2; independent bits: our own
# exact figure for train + valid with Laplace's rule, to the published two decimals).
PUBLISHED = json.loads((Path(__file__).resolve().parent / "published.json").read_text())["nats_per_example"]
UNIT_CHECK_TOLERANCE = 0.005  # the published figures have two decimals


def load_uci(path, name):
    """The train/valid/test uint8 0/1 arrays of one npz file, checked."""
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    with np.load(path) as archive:
        missing = [split for split in SPLITS if split not in archive.files]
        if missing:
            raise UserError(f"{path}: no array named {', '.join(missing)} (has {', '.join(archive.files)})")
        data = {split: np.asarray(archive[split]) for split in SPLITS}
    for split, x in data.items():
        if x.ndim != 2 or x.shape[1] != NUM_BITS[name]:
            raise UserError(f"{path}: {split} has shape {x.shape}, expected (rows, {NUM_BITS[name]})")
        if not np.isin(x, (0, 1)).all():
            raise UserError(f"{path}: {split} has entries other than 0 and 1")
    return data


def machine_description():
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def settings(args):
    """The grids and training lengths: the full run, or a tiny one (--quick) for smoke tests."""
    if args.quick:
        return {"mixture": {"components": (1, 3), "alphas": (1.0,), "restarts": 1, "max_iter": 30},
                "fvsbn": {"weight_decays": (0.1, 0.01), "max_iter": 50},
                "made": {"hidden_grid": None, "weight_decays": (0.01,), "max_epochs": 3, "patience": 2, "masks": 2}}
    return {"mixture": {"components": COMPONENT_GRID, "alphas": ALPHA_GRID, "restarts": args.restarts,
                        "max_iter": 500},
            "fvsbn": {"weight_decays": (0.1, 0.03, 0.01, 0.006, 0.003, 0.0015, 0.001, 0.0003), "max_iter": 2000},
            "made": {"hidden_grid": args.made_hidden, "weight_decays": MADE_WEIGHT_DECAYS,
                     "max_epochs": args.max_epochs, "patience": args.patience, "masks": args.masks}}


def evaluate(name, model, test, fit_seconds, selected, valid_nll, dataset):
    """One table row: test NLL with its standard error, the published figure and the difference."""
    started = time.perf_counter()
    log_probs = torch.as_tensor(np.asarray(model.log_prob(test)), dtype=torch.float64)
    eval_seconds = time.perf_counter() - started
    if not bool(torch.isfinite(log_probs).all()):
        raise FloatingPointError(f"{dataset} {name}: non-finite test log-likelihood")
    nll, se = negative_log_likelihood_summary(log_probs)
    published = PUBLISHED[name][dataset]
    return {"dataset": dataset, "model": name, "test_nll": nll, "test_se": se, "valid_nll": valid_nll,
            "published": published, "difference": nll - published, "fit_seconds": fit_seconds,
            "eval_seconds": eval_seconds, "selected": selected}


def run_dataset(dataset, data, config, seed, log):
    train, valid, test = data["train"], data["valid"], data["test"]
    rows = []

    def timed(fit):
        started = time.perf_counter()
        model = fit()
        return model, time.perf_counter() - started

    model, seconds = timed(lambda: IndependentBernoulli.fit(np.vstack([train, valid]), pseudo_count=1.0))
    rows.append(evaluate("independent bits", model, test, seconds, "train + valid, add-one", None, dataset))
    log(f"{dataset}: independent bits {rows[-1]['test_nll']:.3f} nats")

    mix = config["mixture"]
    (model, _validation_table), seconds = timed(lambda: select_mixture(
        train, valid, components=mix["components"], alphas=mix["alphas"], restarts=mix["restarts"],
        max_iter=mix["max_iter"], seed=seed, log=log))
    rows.append(evaluate("mixture of Bernoullis", model, test, seconds,
                         f"components={model.num_components}, alpha={model.alpha:g}",
                         -float(model.log_prob(valid).mean()), dataset))
    log(f"{dataset}: mixture of Bernoullis {rows[-1]['test_nll']:.3f} nats ({rows[-1]['selected']})")

    model, seconds = timed(lambda: FVSBN.fit(train, valid, **config["fvsbn"], log=log))
    rows.append(evaluate("FVSBN", model, test, seconds, f"lambda={model.weight_decay:g}",
                         -float(model.log_prob(valid).mean()), dataset))
    log(f"{dataset}: FVSBN {rows[-1]['test_nll']:.3f} nats ({rows[-1]['selected']})")

    made = config["made"]
    hidden_grid = made["hidden_grid"] or [[train.shape[1]]]  # hidden layers must be at least as wide as the input
    for name, masks in (("MADE (one mask)", 1), ("MADE (mask ensemble)", made["masks"])):
        model, seconds = timed(lambda masks=masks: MADE.fit(
            train, valid, hidden_grid=hidden_grid, weight_decays=made["weight_decays"], num_orderings=masks,
            max_epochs=made["max_epochs"], patience=made["patience"], skip_connections=True, seed=seed, log=log))
        chosen = next(row for row in model.selection if row["hidden"] == list(model.hidden))
        rows.append(evaluate(name, model, test, seconds,
                             f"{masks} ordering(s), hidden={list(model.hidden)}, lambda={model.weight_decay:g}, "
                             f"epochs={model.epochs}",
                             chosen["valid_nll"], dataset))
        log(f"{dataset}: {name} {rows[-1]['test_nll']:.3f} nats ({rows[-1]['selected']})")
    return rows


def markdown_table(rows):
    lines = ["| data | model | test NLL (nats) | s.e. | published | difference | fit (s) | eval (s) "
             "| chosen on valid |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['test_nll']:.2f} | {r['test_se']:.2f} | "
                     f"{r['published']:.2f} | {r['difference']:+.2f} | {r['fit_seconds']:.1f} | "
                     f"{r['eval_seconds']:.2f} | {r['selected']} |")
    return "\n".join(lines)


def unit_check(rows, full_data):
    """Independent bits must reproduce the published-unit figure exactly (on the full splits)."""
    messages = []
    for r in rows:
        if r["model"] == "independent bits" and full_data:
            ok = abs(r["difference"]) <= UNIT_CHECK_TOLERANCE
            messages.append(f"unit check {r['dataset']}: independent bits {r['test_nll']:.4f} vs "
                            f"{r['published']:.2f}: {'ok' if ok else 'MISMATCH'}")
            if not ok:
                raise AssertionError(messages[-1])
    return messages


def parse_hidden(text):
    """'500' or '300,500' -> [[500]] or [[300], [500]] (one hidden layer per entry)."""
    try:
        return [[int(h)] for h in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--made-hidden: expected comma-separated integers, got {text!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for results.json and results.md "
                        "(must not hold earlier results)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where dna.npz and mushrooms.npz are")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--restarts", type=int, default=2, help="EM starts per (components, alpha)")
    parser.add_argument("--made-hidden", type=parse_hidden, default=[[500]],
                        help="MADE hidden sizes to choose from on valid, e.g. 300,500 (default 500)")
    parser.add_argument("--masks", type=int, default=16, help="orderings in the MADE ensemble")
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--patience", type=int, default=30, help="epochs without validation improvement")
    parser.add_argument("--quick", action="store_true", help="tiny grids and 3 epochs: a smoke test")
    parser.add_argument("--max-rows", type=int, default=None, help="use only the first rows of each split")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        if (out / "results.json").exists() or (out / "results.md").exists():
            raise UserError(f"--out {out}: already holds results; choose a new directory")
        if args.masks < 2:
            raise UserError(f"--masks {args.masks}: an ensemble needs at least 2 orderings")
        data = {name: load_uci(args.data_dir / f"{name}.npz", name) for name in args.datasets}
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.max_rows is not None:
        data = {name: {split: x[:args.max_rows] for split, x in d.items()} for name, d in data.items()}

    machine = machine_description()
    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(
        ["baselines.py", *argv])
    machine_line = (f"machine: {machine['platform']}, {machine['cpu_count']} CPUs, python {machine['python']}, "
                    f"torch {machine['torch']}, {machine['torch_threads']} torch thread(s), "
                    f"OMP_NUM_THREADS={machine['OMP_NUM_THREADS']}")
    header = [machine_line, f"command: {command}"]
    for line in header:
        print(line, flush=True)

    def log(message):
        print(message, flush=True)

    config = settings(args)
    rows, started = [], time.perf_counter()
    for name in args.datasets:
        rows += run_dataset(name, data[name], config, args.seed, log)
    checks = unit_check(rows, full_data=args.max_rows is None)
    table = markdown_table(rows)
    print(table)
    for message in checks:
        print(message)
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"machine": machine, "command": command, "quick": args.quick, "max_rows": args.max_rows,
         "seconds": total, "rows": rows, "unit_checks": checks}, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(
        ["# UCI baselines: test NLL, nats per example", "", *[f"- {line}" for line in header],
         f"- total wall time: {total:.0f} s", "", table, "", *[f"- {m}" for m in checks]]) + "\n")
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
