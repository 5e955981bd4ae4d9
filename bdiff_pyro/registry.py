"""The one list of every name a config can give: kernels, schedules, networks, activations.

Each table maps a name to ``"module:attribute"``, imported only when the name is used, so that a
config is validated (``bdiff_pyro.config``) before torch is imported.  A new kernel is one class
plus one line here; a user's own class can be registered at run time with ``register``::

    from bdiff_pyro import registry
    registry.register(registry.KERNELS, "lazy", MyLazyKernel)
"""

import importlib

from bdiff_pyro.errors import UserError

#: name -> kernel class; built by ``cls.build(beta_tilde, num_states, pi_1)``
KERNELS = {
    "bernoulli": "bdiff_pyro.diffusion.kernels:BernoulliKernel",
    "uniform": "bdiff_pyro.diffusion.kernels:UniformKernel",
    "absorbing": "bdiff_pyro.diffusion.kernels:AbsorbingKernel",
    "gaussian": "bdiff_pyro.diffusion.kernels:DiscretisedGaussianKernel",
}

#: name -> function T (, power) -> beta~_0..beta~_T
SCHEDULES = {
    "paper": "bdiff_pyro.diffusion.schedules:beta_tilde_paper",
    "cosine": "bdiff_pyro.diffusion.schedules:beta_tilde_cosine",
    "power": "bdiff_pyro.diffusion.schedules:beta_tilde_power",
}
#: schedules whose function takes the ``schedule_power`` argument
SCHEDULES_WITH_POWER = ("power",)

#: name -> network class (per-position features of x^t and the time t -> logits)
NETWORKS = {
    "mlp": "bdiff_pyro.networks.mlp:MLP",
    "conv1d": "bdiff_pyro.networks.conv1d:Conv1dNet",
    "conv2d": "bdiff_pyro.networks.conv2d:Conv2dNet",
    "transformer": "bdiff_pyro.networks.transformer:TransformerNet",
}

#: name -> torch.nn activation class
ACTIVATIONS = {
    "sigmoid": "torch.nn:Sigmoid",
    "tanh": "torch.nn:Tanh",
    "relu": "torch.nn:ReLU",
    "silu": "torch.nn:SiLU",
}

_KINDS = {id(KERNELS): "kernel", id(SCHEDULES): "schedule", id(NETWORKS): "network", id(ACTIVATIONS): "activation"}


def register(table, name, target):
    """Add ``name`` to a table: ``target`` is the object itself or a ``"module:attribute"`` string."""
    table[name] = target


def resolve(table, name, kind=None):
    """The object a table names (importing its module); a one-line UserError for an unknown name."""
    if name not in table:
        kind = kind or _KINDS.get(id(table), "name")
        raise UserError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    target = table[name]
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
