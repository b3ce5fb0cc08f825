"""Found by hostile reads of the twenty-third session's changes (the serving switch's copies, the layer's dtype
and the adapters known finite). Oracles are the tensors the test made, compared bit for bit."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import lora_ext as lora
from helpers import bits, layer_forward64, rel_err, two_adapter_linear


def _frozen(seed=0):
    return two_adapter_linear(6, 5, 4, 0.5, seed)


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


# -- `weight.data = W` on another thread landing inside a merged layer's write (deterministic: the assignment is
# made from inside the write, where another thread's can land)


def _merged_pair(seed=0):
    layer = _frozen(seed)
    base = layer.weight.detach().clone()
    layer.eval()
    return layer, base


def _served64(layer, base, x):
    """x's output with `base` as the weight and the active adapter added, in float64 (helpers' oracle)."""
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    p["weight"] = base.double()
    return layer_forward64(layer, p, x.double(), layer.scaling)


@pytest.mark.parametrize("where", ["_weight_room", "_put_snapshot"])
def test_new_memory_landing_inside_a_merged_switch_is_judged_after_it(where):
    # before the swap is written (_weight_room) it served base + b - default, merged; after it, before the note
    # (_put_snapshot), the base alone, merged: train() then took b out of a base that never held it
    layer, base = _merged_pair()
    real = getattr(layer, where)

    def assign_then(*args, **kwargs):
        layer.weight.data = base.clone()  # "the other thread"
        return real(*args, **kwargs)

    setattr(layer, where, assign_then)
    try:
        layer.set_adapter("b")
    finally:
        delattr(layer, where)
    x = torch.randn(3, 6)
    with pytest.warns(UserWarning, match="taken as the base"):
        with torch.no_grad():
            out = layer(x)
    assert layer.active_adapter == "b" and not layer.merged
    assert rel_err(out, _served64(layer, base, x)) < 1e-6
    layer.train()
    assert torch.equal(bits(layer.weight.detach()), bits(base))


def test_new_memory_landing_inside_an_unmerge_is_left_alone():
    layer, base = _merged_pair()
    new_base = base + 0.01 * torch.randn(base.shape)
    real = layer._unmerge_from

    def assign_then(weight):
        layer.weight.data = new_base.clone()  # "the other thread", after the unmerge pinned the old memory
        return real(weight)

    layer._unmerge_from = assign_then
    try:
        layer.train()
    finally:
        del layer._unmerge_from
    assert not layer.merged
    assert torch.equal(bits(layer.weight.detach()), bits(new_base))  # nothing taken out of it
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = layer(x)
    assert rel_err(out, _served64(layer, new_base, x)) < 1e-6
