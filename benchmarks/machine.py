"""What every benchmark prints first: the machine, the command, the library versions."""

import os
import platform
import shlex
import sys

import torch


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            cpu = next(line.split(":", 1)[1].strip() for line in stream if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def command_line():
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def default_out(name):
    """benchmarks/out/<name>-<time>: a fresh directory name for one benchmark's results."""
    from datetime import datetime
    from pathlib import Path
    return Path(__file__).resolve().parent / "out" / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def start(parser, args):
    """Refuse to overwrite earlier results, then print the machine and the command."""
    if args.out.exists():
        parser.error(f"{args.out} exists; refusing to overwrite earlier results")
    machine, command = machine_description(), command_line()
    print(f"machine: {machine}\ncommand: {command}", flush=True)
    return machine, command
