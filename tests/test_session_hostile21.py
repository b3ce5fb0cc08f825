"""Found by hostile reads of the twenty-third session's changes (the serving switch's copies, the layer's dtype
and the adapters known finite). Oracles are the tensors the test made, compared bit for bit."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import lora_ext as lora
from helpers import bits


def _frozen(seed=0):
    torch.manual_seed(seed)
    layer = lora.Linear(6, 5, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.add_adapter("b", torch.randn(2, 6), torch.randn(5, 2), 0.5)
    return layer


class _Doubled(nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_refused_switch_leaves_the_active_adapters_own_pair_alone():
    # default trained (its own Parameter pair), then served from b's pair: a switch refused for a parametrized
    # lora_A wrote the parametrization's output (doubled) into default's own pair before refusing
    layer = _frozen()
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    layer.set_adapter("b")
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    layer.set_adapter("default")
    own = layer.__dict__["_active_own"]
    assert own is not None
    before = [t.detach().clone() for t in own]
    parametrize.register_parametrization(layer, "lora_A", _Doubled())
    with pytest.raises(ValueError, match=r"^set_adapter\('b'\): ParametrizedLinear\(6, 5\) has a parametrization"):
        layer.set_adapter("b")
    assert layer.active_adapter == "default"
    assert all(torch.equal(bits(t.detach()), bits(b)) for t, b in zip(layer.__dict__["_active_own"], before))


def test_a_switch_of_an_offloaded_layer_after_an_earlier_switch_names_the_layer():
    # after one switch the old adapter's home is the host: copying the meta factors there raised torch's
    # "Cannot copy out of meta tensor" before the layer's refusal
    from accelerate import cpu_offload
    layer = _frozen()
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.set_adapter("b")
    layer.set_adapter("default")
    cpu_offload(nn.Sequential(layer), execution_device=torch.device("cpu"))
    assert layer.lora_A.is_meta
    with pytest.raises(ValueError, match=r"^set_adapter\('b'\): Linear\(6, 5\)'s lora_A and lora_B are on the meta"):
        layer.set_adapter("b")
    assert layer.active_adapter == "default"


@pytest.mark.parametrize("model_level", [False, True], ids=["layer", "model"])
@pytest.mark.parametrize("cast", ["half", "float"])
def test_an_adapter_out_of_range_after_a_dtype_change_is_refused(cast, model_level):
    # checked finite as the live factors held it (float32, float64), then the layer was cast: the switch served inf
    if cast == "half":
        layer, A = lora.Linear(6, 5, r=2), torch.full((2, 6), 1e5)  # finite in float32, inf in float16
    else:
        layer, A = lora.Linear(6, 5, r=2).double(), torch.full((2, 6), 1e39, dtype=torch.float64)
    layer.requires_grad_(False)
    layer.add_adapter("b", A, torch.full((5, 2), 1e-3, dtype=A.dtype), 1.0)  # accepted: finite as held now
    getattr(layer, cast)()
    with pytest.raises(ValueError, match="lora_A holds non-finite values"):
        if model_level:
            lora.set_adapter(nn.Sequential(layer), "b")
        else:
            layer.set_adapter("b")
    assert layer.active_adapter == "default"
    assert bool(layer.lora_A.isfinite().all())
