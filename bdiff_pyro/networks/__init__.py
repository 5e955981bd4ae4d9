"""Networks for the reverse step: per-position features of x^t and the time t -> logits.

Every network is a class registered by name in ``bdiff_pyro.registry.NETWORKS`` and built as
``cls(n, num_states, num_features=..., **its own options)``: ``mlp`` (over the flattened
sequence), ``resmlp`` (residual blocks with layer normalisation and dropout, for tabular bits),
``conv1d`` (over positions), ``conv2d`` (over the pixels of an image) and ``transformer``
(attention over positions).  ``members`` > 1 builds an ``Ensemble`` of that many.
"""

import inspect
from typing import Any, Mapping

from bdiff_pyro import registry
from bdiff_pyro.errors import UserError
from bdiff_pyro.networks.ensemble import Ensemble


def build_network(name: str, n: int, num_states: int, num_features: int, options: Mapping[str, Any]):
    """A fresh network ``name`` from the registry for sequences of length n (an ``Ensemble``
    of ``options["members"]`` independently initialised ones if that is above 1).

    ``options`` may hold the options of every network (e.g. a model config's keys); the
    network receives those its constructor names, lists as tuples.  An option the network
    refuses (e.g. an image shape that does not hold n pixels) is a one-line UserError.
    """
    cls = registry.resolve(registry.NETWORKS, name)
    accepted = inspect.signature(cls).parameters
    own = {key: tuple(value) if isinstance(value, list) else value
           for key, value in options.items() if key in accepted and key not in ("n", "num_states", "num_features")}
    try:
        nets = [cls(n, num_states, num_features=num_features, **own) for _ in range(options.get("members", 1))]
    except ValueError as error:
        raise UserError(f"model.network {name}: {error}") from None
    return nets[0] if len(nets) == 1 else Ensemble(nets)
