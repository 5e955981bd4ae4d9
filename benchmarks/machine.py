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
