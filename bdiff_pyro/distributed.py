"""Where a run computes: its device, and, trained on several processes, its place among them.

Several processes are started by ``torchrun`` (``torch.distributed.run``), which sets RANK,
WORLD_SIZE and LOCAL_RANK in each one's environment; they talk through ``torch.distributed``
(gloo on the CPU, NCCL on CUDA).  Every process draws the same global minibatch and the same
noise from the same seeded generator and scores its own equal slice of the rows; the
gradients are averaged across processes before each optimiser step.  The mean of the slice
means is the mean over the global batch, so each update is the one a single process makes
from the global batch, up to float rounding (docs/usage.md, "More data, more processes").
"""

import os
from dataclasses import dataclass

import pyro
import torch
import torch.distributed as dist
from pyro.optim import PyroOptim

from bdiff_pyro.errors import TrainingStopped, UserError


def resolve_device(name, local_rank=0) -> torch.device:
    """The torch device a config's ``device`` names: auto is cuda when torch sees a GPU, else
    cpu; cuda is the GPU numbered ``local_rank`` (one per process on a machine)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device: cuda requested but no CUDA device is available (device: auto falls back to cpu)")
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run: rank 0 of 1 when run alone."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run directory and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, batch_size) -> slice:
        """This process's rows of a global minibatch: [rank b, (rank + 1) b), b = batch_size / size."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum_(self, tensor):
        """In place: the tensor summed over every process (the same result on each)."""
        if self.distributed:
            total = tensor.to(self.collective_device)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            tensor.copy_(total)
        return tensor

    def average_(self, tensors):
        """In place: every tensor replaced by its mean over the processes, in one all-reduce of
        their concatenation (same order on every process)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.view_as(tensor))

    def agree(self, losses, stop):
        """(each of ``losses`` averaged over the processes, whether any process asks to stop): one
        small all-reduce per step, so that every process stops at the same step.  ``losses`` is a
        float or a tuple of floats, and comes back in the same form."""
        values = (losses,) if isinstance(losses, float) else tuple(losses)
        if self.distributed:
            both = torch.tensor([*values, float(stop)], dtype=torch.float64, device=self.collective_device)
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            values, stop = tuple(float(v) / self.size for v in both[:-1]), bool(both[-1] > 0)
        return (values[0] if isinstance(losses, float) else values), stop

    @property
    def collective_device(self):
        """Where tensors for a collective live: CUDA for NCCL, the CPU for gloo."""
        if self.distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def on_main(self, action):
        """``action()`` on rank 0 while the other processes wait; its result on every process.
        An exception on rank 0 is raised there and stops the others quietly (rank 0 reports it)."""
        if not self.distributed:
            return action()
        outcome = [None]
        if self.main:
            try:
                outcome[0] = ("done", action())
            except BaseException:
                dist.broadcast_object_list([("failed", None)], src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        status, result = outcome[0]
        if status == "failed":
            raise StoppedByMain()
        return result


class StoppedByMain(TrainingStopped):
    """On ranks > 0: rank 0 failed and reported why; this process ends without a message."""

    def __init__(self):
        super().__init__("", exit_code=1)


def world_from_environment(environ=None) -> World:
    """The World torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), or a
    process of its own when they are absent."""
    environ = os.environ if environ is None else environ
    try:
        return World(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)),
                     int(environ.get("LOCAL_RANK", 0)))
    except ValueError as error:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them): {error}") from None


def join(world, device):
    """Connect the processes of ``world`` (torchrun's MASTER_ADDR and MASTER_PORT): NCCL when
    the run computes on CUDA, gloo on the CPU.  Nothing to do for a process of its own."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                            world_size=world.size)


def leave(world, finished=False):
    """Disconnect the processes of ``world``.  After a run that ``finished`` on every process,
    they first wait for one another, so that none tears its connections down while another
    still uses them (a process that exits early can abort its peer inside gloo)."""
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class GradientAveraging(PyroOptim):
    """A PyroOptim whose gradients are averaged over the processes before the wrapped optimiser
    steps, in the spirit of ``pyro.optim.HorovodOptimizer``, with torch.distributed.

    Averaging comes before the optimiser, so ClippedAdam clamps (element by element) the
    averaged gradient, as one process with the global batch does.  The state is the wrapped
    optimiser's (get_state / set_state), so checkpoints do not depend on the process count.
    """

    def __init__(self, pyro_optim: PyroOptim, world: World):
        super().__init__(pyro_optim.pt_optim_constructor, pyro_optim.pt_optim_args, pyro_optim.pt_clip_args)
        self.world = world

    def __call__(self, params, *args, **kwargs):
        params = sorted(params, key=pyro.get_param_store().param_name)  # the same order on every process
        self.world.average_([p.grad for p in params if p.grad is not None])
        super().__call__(params, *args, **kwargs)
