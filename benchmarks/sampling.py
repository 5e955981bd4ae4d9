"""Sampling benchmark: ``m.sample`` against the floor and the reference repository's loop, the
speed of every network, and (given a trained run) the strided sampler's validity.

    python benchmarks/sampling.py [RUN_DIR] [--num 10000] [--repeats 3] [--threads 1 2] [--out DIR]

Speed (untrained weights: the speed does not depend on them), for the default, paper and
T = 1000 configs at each thread count, median samples/s of ``--repeats`` interleaved runs of
``--num`` samples each:

- ``m.sample``: the full T-step sampler of ``bdiff_pyro``;
- floor: a bare loop with the same network weights and the same Bernoulli draws, and nothing
  else: x -> the MLP's linear layers and activations -> sigmoid -> ``torch.bernoulli``, T times
  (no time embedding, evidence, tables or Pyro);
- floor (rand < p): the same loop drawing each bit as ``m.sample`` does (``draw_bits``: the
  same draws as ``torch.bernoulli``, made more cheaply);
- reference (paper config): a loop shaped like the reference repository's, a sigmoid MLP
  n-50-50 with one 50-n sigmoid head per t and ``torch.bernoulli`` per step, same n and T.

Networks: ``m.sample`` of each registered network at the default config's T (n = 20; conv2d on
an 8 x 8 digits-shaped model, n = 64), untrained, ``--network-num`` samples, 1 thread, median
of ``--network-repeats`` runs.

RUN_DIR (benchmarks/run.py passes the heartbeat_t1000 run, through-x^0): the trained model's
throughput, and for each number of evaluations of the strided sampler the fraction of
``--num`` samples that are exact heartbeats and the shift histogram.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import default_out, start
from torch.nn import functional as F

from bdiff_pyro.config import load_config, model_spec
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.programs.sampling import draw_bits

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("heartbeat.yaml", "heartbeat_paper.yaml", "heartbeat_t1000.yaml")
REFERENCE_CONFIG = "heartbeat_paper.yaml"
NETWORKS = ("mlp", "resmlp", "conv1d", "conv2d", "transformer")
STEPS = (5, 10, 20, 30, 50, 100, 200, 1000)
ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "silu": F.silu}


def untrained(config_name, overrides=(), n=None):
    """The model a config describes, freshly initialised (seed 0), and its spec."""
    config = load_config(ROOT / "experiments" / "configs" / config_name, overrides)
    spec = model_spec(config, n or config.data.n)
    torch.manual_seed(0)
    return ReverseProcess.from_spec(spec), spec


def seconds(fn):
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


class Floor:
    """x^T ~ Bernoulli(1/2), then T times: the MLP's linear layers with its activation, a
    sigmoid and a Bernoulli draw of every bit (``draw`` with the generator): the network and
    the random numbers, nothing else."""

    def __init__(self, model, activation, draw):
        net = model.net
        self.layers = [(layer.weight.detach(), layer.bias.detach()) for layer in [net.state_in, *net.hidden]]
        self.out = (net.out.weight.detach(), net.out.bias.detach())
        self.act, self.draw, self.n, self.T = ACTIVATIONS[activation], draw, model.n, model.T

    def __call__(self, num, seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x = self.draw(torch.full((num, self.n), 0.5), generator)
            for _ in range(self.T):
                h = x
                for weight, bias in self.layers:
                    h = self.act(F.linear(h, weight, bias))
                x = self.draw(torch.sigmoid(F.linear(h, *self.out)), generator)
        return x


class ReferenceLoop:
    """The reference repository's sampling loop, in shape: a sigmoid MLP n-50-50 shared by all
    steps, one 50-n linear head per t with a sigmoid, ``torch.bernoulli`` per step."""

    def __init__(self, n, T):
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(n, 50), torch.nn.Sigmoid(), torch.nn.Linear(50, 50),
                                         torch.nn.Sigmoid())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(50, n) for _ in range(T))
        self.n = n

    def __call__(self, num, seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x = torch.bernoulli(torch.full((num, self.n), 0.5), generator=generator)
            for head in reversed(self.heads):
                x = torch.bernoulli(torch.sigmoid(head(self.trunk(x))), generator=generator)
        return x


def bernoulli(probs, generator):
    return torch.bernoulli(probs, generator=generator)


def speed_table(configs, threads, num, repeats):
    """One row per (threads, config): median samples/s of m.sample, the floors and, for the
    paper config, the reference loop, timed in turn within each repeat."""
    rows = []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        for name in configs:
            model, spec = untrained(name)
            loops = {"sample": lambda s, model=model: model.sample(num, seed=s),
                     "floor": lambda s, f=Floor(model, spec.activation, bernoulli): f(num, s),
                     "floor_rand": lambda s, f=Floor(model, spec.activation, draw_bits): f(num, s)}
            if name == REFERENCE_CONFIG:
                reference = ReferenceLoop(model.n, model.T)
                loops["reference"] = lambda s: reference(num, s)
            times = {key: [] for key in loops}
            for repeat in range(repeats):
                for key, loop in loops.items():
                    times[key].append(seconds(lambda: loop(repeat)))
            rates = {key: num / statistics.median(values) for key, values in times.items()}
            row = {"config": name, "threads": thread_count, "T": model.T, "num": num, "repeats": repeats,
                   "samples_per_second": rates, "seconds": times,
                   "floor_ratio": rates["floor"] / rates["sample"],
                   "floor_rand_ratio": rates["floor_rand"] / rates["sample"]}
            if "reference" in rates:
                row["reference_ratio"] = rates["reference"] / rates["sample"]
            rows.append(row)
            print(json.dumps({key: row[key] for key in row if key != "seconds"}), flush=True)
    return rows


def network_table(num, repeats):
    """m.sample of every network at the default config's T, untrained, 1 thread: median of
    ``repeats`` runs."""
    torch.set_num_threads(1)
    rows = []
    for name in NETWORKS:
        n = 64 if name == "conv2d" else None  # an 8 x 8 image, as the digits
        model, _ = untrained(CONFIGS[0], [f"model.network={name}"], n=n)
        times = [seconds(lambda s=s: model.sample(num, seed=s)) for s in range(repeats)]
        rows.append({"network": name, "n": model.n, "T": model.T, "num": num, "repeats": repeats,
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "samples_per_second": num / statistics.median(times)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def trained_run(run_dir, num):
    """The trained run's full sampler throughput and the strided sampler's validity."""
    from bdiff_pyro.checkpoints import load_with_config
    from bdiff_pyro.data import load_dataset
    from bdiff_pyro.evaluation import pattern_histogram
    from bdiff_pyro.util.stats import membership_fractions

    torch.set_num_threads(1)
    config, model = load_with_config(run_dir)
    dataset = load_dataset(config.data)
    full = [seconds(lambda s=s: model.sample(num, seed=s)) for s in range(3)]
    throughput = {"T": model.T, "num": num, "median_seconds": statistics.median(full),
                  "samples_per_second": num / statistics.median(full)}
    strided = []
    for steps in [s for s in STEPS if s <= model.T]:
        start_time = time.perf_counter()
        samples = model.sample(num, seed=0, steps=steps)
        elapsed = time.perf_counter() - start_time
        strided.append({"evaluations": steps,
                        "exact_fraction": membership_fractions(samples, dataset.train, dataset.val)["train"],
                        "shift_fractions": pattern_histogram(samples, dataset.support), "seconds": elapsed,
                        "samples_per_second": num / elapsed})
        print(f"{steps:5d} evaluations: {strided[-1]['exact_fraction']:.2%} exact, {elapsed:.2f} s", flush=True)
    return throughput, strided


def markdown(machine, command, speed, networks, run_dir, throughput, strided):
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}. "
             f"Command: `{command}`.", "",
             "Samples/s (median of interleaved repeats; untrained weights). Floor: the same network weights "
             "and Bernoulli draws, nothing else (torch.bernoulli; and drawing as m.sample does, rand < p). "
             "Ratio: the floor's rate over m.sample's (time of m.sample / time of the floor).", "",
             "| config | T | threads | m.sample | floor | ratio | floor (rand < p) | ratio | reference loop | "
             "reference / m.sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in speed:
        rates = row["samples_per_second"]
        reference = (f"{rates['reference']:.0f} | {row['reference_ratio']:.2f}" if "reference" in rates
                     else "- | -")
        lines.append(f"| {row['config']} | {row['T']} | {row['threads']} | {rates['sample']:.0f} | "
                     f"{rates['floor']:.0f} | {row['floor_ratio']:.2f} | {rates['floor_rand']:.0f} | "
                     f"{row['floor_rand_ratio']:.2f} | {reference} |")
    if networks:
        lines += ["", f"m.sample by network at the default config's T = {networks[0]['T']} (untrained, "
                  f"{networks[0]['num']} samples, 1 thread, median of {networks[0]['repeats']}):", "",
                  "| network | n | parameters | samples/s |", "|---|---|---|---|"]
        lines += [f"| {r['network']} | {r['n']} | {r['parameters']} | {r['samples_per_second']:.0f} |"
                  for r in networks]
    if run_dir is not None:
        lines += ["", f"Trained run `{run_dir}`: full sampler {throughput['samples_per_second']:.0f} samples/s "
                  f"at T = {throughput['T']} (median of 3 x {throughput['num']}, 1 thread).", "",
                  "| network evaluations | exact heartbeats | shifts | samples/s |", "|---|---|---|---|"]
        for row in strided:
            shifts = " ".join(f"{f:.3f}" for f in row["shift_fractions"])
            lines.append(f"| {row['evaluations']} | {row['exact_fraction']:.2%} | {shifts} "
                         f"| {row['samples_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_strided(strided, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogx([r["evaluations"] for r in strided], [100 * r["exact_fraction"] for r in strided], marker="o")
    ax.axhline(99, color="grey", ls="--", lw=1, label="99%")
    ax.set_xlabel("network evaluations (strided sampler)")
    ax.set_ylabel("exact heartbeats (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a trained heartbeat run (through-x^0)")
    parser.add_argument("--num", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="names under experiments/configs/")
    parser.add_argument("--network-num", type=int, default=1000, help="samples per network (0: no network table)")
    parser.add_argument("--network-repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=default_out("sampling"))
    args = parser.parse_args(argv)
    machine, command = start(parser, args)
    speed = speed_table(args.configs, args.threads, args.num, args.repeats)
    networks = network_table(args.network_num, args.network_repeats) if args.network_num else []
    throughput, strided = trained_run(args.run_dir, args.num) if args.run_dir is not None else (None, [])
    args.out.mkdir(parents=True)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine, "command": command, "speed": speed, "networks": networks,
         "run": None if args.run_dir is None else str(args.run_dir), "throughput": throughput,
         "strided": strided}, indent=2))
    text = markdown(machine, command, speed, networks, args.run_dir, throughput, strided)
    (args.out / "results.md").write_text(text)
    if strided:
        plot_strided(strided, args.out / "strided.png")
    print(text)


if __name__ == "__main__":
    main()
