"""The model spec: a round trip through a checkpoint's plain values, and the one constructor."""

import dataclasses
import io

import pytest
import torch

from bdiff_pyro import registry
from bdiff_pyro.programs.reverse import ReverseProcess
from bdiff_pyro.programs.spec import ModelSpec

SPEC = ModelSpec(kernel="absorbing", schedule="power", schedule_power=1.5, T=7, n=5, num_states=3, pi_1=None,
                 parameterisation="x0", inputs="evidence", add_own_evidence=False, network="mlp", hidden=(6, 4),
                 activation="tanh", time_embedding=4, film=True)


@pytest.mark.parametrize("spec", [SPEC, dataclasses.replace(SPEC, kernel="bernoulli", num_states=2, pi_1=0.25)],
                         ids=["absorbing", "bernoulli"])
def test_spec_round_trip_through_a_weights_only_checkpoint(spec):
    buffer = io.BytesIO()
    torch.save({"spec": spec.to_dict()}, buffer)
    buffer.seek(0)
    values = torch.load(buffer, weights_only=True)["spec"]
    assert values["hidden"] == list(spec.hidden)  # a plain list, not a tuple
    assert ModelSpec.from_dict(values) == spec


def test_from_spec_builds_what_the_spec_says():
    process = ReverseProcess.from_spec(SPEC)
    assert (process.n, process.T) == (5, 7)
    assert isinstance(process.kernel, registry.resolve(registry.KERNELS, "absorbing"))
    assert process.kernel.num_states == 4  # three data states and the mask
    assert float(process.kernel.beta_tilde[1]) == pytest.approx((1 / 7) ** 1.5, rel=1e-6)  # float32
    assert (process.parameterisation, process.inputs, process.add_own_evidence) == ("x0", "evidence", False)
    assert isinstance(process.net, registry.resolve(registry.NETWORKS, "mlp"))
    assert [layer.out_features for layer in [process.net.state_in, *process.net.hidden]] == [6, 4]
    assert isinstance(process.net.act, torch.nn.Tanh) and process.net.film is not None
    assert process.net.state_in.weight.dtype == torch.float32


def test_from_spec_uses_pi_1():
    spec = dataclasses.replace(SPEC, kernel="bernoulli", num_states=2, pi_1=0.25)
    assert ReverseProcess.from_spec(spec).kernel.pi.tolist() == pytest.approx([0.75, 0.25], rel=1e-6)
