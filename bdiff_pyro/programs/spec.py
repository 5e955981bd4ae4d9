"""A model's identity: everything that fixes the reverse process's shape and meaning, and
nothing about its data or training.  A checkpoint saves it; ``ReverseProcess.from_spec`` builds
from it (the one way to build a model)."""

import dataclasses
import typing


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What ``ReverseProcess.from_spec`` needs.

    ``num_states`` is the number of states a data position takes (the kernel may add a mask
    state); ``pi_1`` the stationary P(bit = 1) of kernels that take one
    (``registry.KERNELS_WITH_PI_1``), None for the others.  Names are looked up in
    ``bdiff_pyro.registry``.
    """

    kernel: str
    schedule: str
    schedule_power: float
    T: int
    n: int
    num_states: int
    pi_1: typing.Optional[float]
    parameterisation: str
    inputs: str
    add_own_evidence: bool
    network: str
    hidden: typing.Tuple[int, ...]
    activation: str
    time_embedding: int
    film: bool
    #: options of the network beyond those above (e.g. dropout), passed by name to its constructor
    network_options: dict = dataclasses.field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        """Plain values only (``hidden`` as a list), so that a checkpoint holding it is read
        with ``torch.load(weights_only=True)``."""
        values = dataclasses.asdict(self)
        values["hidden"] = list(self.hidden)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        """The inverse of :meth:`to_dict`; a KeyError or TypeError names a missing or unknown key."""
        values = dict(values)
        values["hidden"] = tuple(values["hidden"])
        values.setdefault("network_options", {})  # specs saved before networks had options
        return cls(**values)
