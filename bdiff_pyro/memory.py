"""Memory: estimates made before anything large is allocated, so that a size the machine
cannot hold is a one-line error naming the setting instead of an allocator traceback or
the kernel's OOM killer, and the chunk sizes that keep evaluation and sampling within a
fixed working set whatever the number of rows asked for.

The estimates are upper bounds measured on CPU float32 training (float64 kernel tables);
they are meant to tell 1 GB from 100 GB, not to the megabyte.
"""

import os

import torch

from bdiff_pyro.errors import UserError
from bdiff_pyro.programs.sampling import as_generator

WORKING_SET_BYTES = 256 * 2**20  # one chunk of evaluation or sampling rows
MAX_ROWS_PER_CHUNK = 65536  # beyond this a chunk is no faster on a CPU


def available_memory_bytes():
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def kernel_table_bytes(T, num_states):
    """The kernel's float64 tables and their temporaries while they are built:
    8 (T + 1)(2 K^3 + 24) bytes (measured: 264 bytes per step for K = 2, 943 for K = 4)."""
    return 8 * (T + 1) * (2 * num_states ** 3 + 24)


def network_parameters(n, num_states, hidden, time_embedding, film=False):
    """Parameters of ``reverse.MLP`` with at most K features per position in and
    K - 1 logits per position out (a bound for every input code)."""
    widths = list(hidden)
    count = n * num_states * widths[0] + widths[0] + time_embedding * widths[0]
    count += sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    count += widths[-1] * n * (num_states - 1) + n * (num_states - 1)
    if film:
        count += sum(time_embedding * 2 * w + 2 * w for w in widths)
    return count


def row_bytes(n, num_states, hidden):
    """Working memory of one (t, x^0) row of the bound or one sequence of the sampler:
    4 (16 n K + 4 sum(hidden)) bytes (one-hot codes, evidence, posteriors and KL terms of
    every position, and the activations of every layer)."""
    return 4 * (16 * n * num_states + 4 * sum(hidden))


def rows_per_chunk(n, num_states, hidden, budget=WORKING_SET_BYTES):
    """How many rows fit in ``budget`` bytes (at least 1, at most MAX_ROWS_PER_CHUNK)."""
    return max(1, min(MAX_ROWS_PER_CHUNK, budget // row_bytes(n, num_states, hidden)))


def training_bytes(model_config, n, num_states, batch_size, num_samples):
    """Peak memory of a training run: the kernel tables; ten float32 copies of the weights
    (weights, gradients, two Adam moments, the weight average and the raw weights, and the
    checkpoint's copies while it is serialised); a minibatch with its autograd graph (four
    times its rows); one chunk of evaluation rows; the ``num_samples`` samples kept at the
    end (float32, twice for their membership codes)."""
    weights = network_parameters(n, num_states, model_config.hidden, model_config.time_embedding,
                                 model_config.film)
    rows = row_bytes(n, num_states, model_config.hidden)
    return (kernel_table_bytes(model_config.T, num_states) + 10 * 4 * weights
            + 4 * batch_size * rows + WORKING_SET_BYTES + 2 * 4 * num_samples * n)


def require_memory(needed, what, available=None):
    """Raise a UserError naming ``what`` when ``needed`` bytes exceed the available memory."""
    available = available_memory_bytes() if available is None else available
    if available is not None and needed > available:
        raise UserError(f"{what} needs about {_gigabytes(needed)} of memory, more than the "
                        f"{_gigabytes(available)} available")


def _gigabytes(size):
    return f"{size / 2**30:.3g} GB"


def sample_in_batches(process, num, seed=None, steps=None, batch=None):
    """``process.sample(num, seed, steps)`` drawn ``batch`` sequences at a time (by default as
    many as fit in WORKING_SET_BYTES) and concatenated; the same draws as one call when
    ``num <= batch``."""
    return torch.cat(list(iter_sample_batches(process, num, seed, steps, batch)))


def iter_sample_batches(process, num, seed=None, steps=None, batch=None):
    """The batches of ``sample_in_batches`` one at a time, so that a caller writing them out
    holds one batch in memory whatever ``num`` is.  One generator, seeded with ``seed``, runs
    through all the batches (no seed: torch's global generator)."""
    if batch is None:
        batch = rows_per_chunk(process.n, process.kernel.num_states, network_widths(process))
    generator = as_generator(seed, process.kernel.log_pi.device)
    for start in range(0, num, batch):
        yield process.sample(min(batch, num - start), steps=steps, generator=generator)


def network_widths(process):
    """The numbers each layer of the network holds per row (its ``activation_widths``)."""
    return list(process.net.activation_widths)
