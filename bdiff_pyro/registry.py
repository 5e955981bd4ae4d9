"""The one list of every name a config can give: kernels, schedules, networks, activations,
and the parameterisations and input codes of the reverse step.

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

#: kernels whose stationary distribution is set by ``pi_1`` (``model.pi_1``; the others ignore it)
KERNELS_WITH_PI_1 = ("bernoulli",)

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
    "resmlp": "bdiff_pyro.networks.resmlp:ResMLP",
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

#: how the network parameterises the reverse step (``bdiff_pyro.programs.reverse``): the logits
#: of p(x^{t-1} | x^t) themselves, or of P(x^0 | x^t) mixed through q(x^{t-1} | x^t, x^0)
PARAMETERISATIONS = ("direct", "x0")

#: how the network reads x^t (``bdiff_pyro.programs.reverse``): its one-hot code, or the evidence
#: each position gives about its clean value, as probabilities or as log-likelihood ratios
INPUTS = ("state", "evidence", "log_evidence")

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
