"""Forty-fourth session: what the hostile rounds of this session gave, each with a test that fails on the commit
before its fix."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora


def _merged_linear(dtype, seed=0):
    """A merged Linear with a nonzero adapter (lossless by default in half precision); its base weight, copied
    before the merge."""
    g = torch.Generator().manual_seed(seed)
    layer = lora.Linear(16, 12, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, generator=g))
        layer.lora_A.copy_(torch.randn(4, 16, generator=g))
        layer.lora_B.copy_(torch.randn(12, 4, generator=g))
    layer = layer.to(dtype)
    base = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged and not torch.equal(layer.weight, base)
    return layer, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_users_state_dict_post_hook_sees_the_base(dtype):
    """N1: the base went into a merged layer's state only after torch's state_dict had run the layer's post-hooks:
    a hook registered with register_state_dict_post_hook saw the merged weight (1.92 off the base in float32), while
    state_dict() returned the base. It now goes in ahead of them, inside a parent's state_dict too."""
    layer, base = _merged_linear(dtype)
    seen = []
    layer.register_state_dict_post_hook(lambda m, sd, prefix, meta: seen.append(sd[prefix + "weight"].clone()))
    model = nn.Sequential(layer)
    for state, prefix in ((layer.state_dict(), ""), (model.state_dict(), "0.")):
        got = seen.pop()
        assert torch.equal(got, state[prefix + "weight"]), "the hook saw another weight than state_dict() gives"
        if dtype == torch.float32:  # a lossy unmerge: within one rounding of the base
            assert (got.double() - base.double()).abs().max().item() < 1e-5
        else:
            assert torch.equal(got, base), "lossless: the base bit for bit"
    assert layer.merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_hook_that_casts_its_copy_leaves_the_lossless_record(dtype):
    """N1: a post-hook converting the saved copy (sd[k] = sd[k].float()) made the layer unmerge from that float32
    copy: it dropped its lossless record for good, with a warning blaming a conversion through .data, and train()
    then left the weight 0.0078 off its base (bfloat16), where the README promises it bit for bit."""
    layer, base = _merged_linear(dtype, seed=1)
    handle = layer.register_state_dict_post_hook(
        lambda m, sd, prefix, meta: sd.__setitem__(prefix + "weight", sd[prefix + "weight"].float()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = layer.state_dict()
    handle.remove()
    assert state["weight"].dtype == torch.float32 and torch.equal(state["weight"], base.float())
    assert torch.equal(layer.state_dict()["weight"], base)
    layer.train()
    assert not layer.merged and torch.equal(layer.weight, base), "the merge taken out losslessly"


def test_a_hook_that_renames_the_weight_key():
    """N1: a post-hook moving `weight` to a peft-style key (`base_layer.weight`) was refused with a KeyError saying
    the weight had been parametrized after the merge."""
    layer, base = _merged_linear(torch.bfloat16, seed=2)

    def rename(module, sd, prefix, meta):
        sd[prefix + "base_layer.weight"] = sd.pop(prefix + "weight")

    layer.register_state_dict_post_hook(rename)
    state = layer.state_dict()
    assert "weight" not in state and torch.equal(state["base_layer.weight"], base)


def test_the_base_goes_in_first_when_the_hooks_were_rearranged():
    """A layer whose post-hooks no longer start with lora_ext's (its hooks cleared, as a layer pickled before the hook
    existed has none) gets it back in front of the user's at the next state_dict()."""
    layer, base = _merged_linear(torch.bfloat16, seed=3)
    layer._state_dict_hooks.clear()
    seen = []
    handle = layer.register_state_dict_post_hook(lambda m, sd, prefix, meta: seen.append(sd["weight"].clone()))
    state = layer.state_dict()
    assert torch.equal(seen[-1], base) and torch.equal(state["weight"], base)
    assert state._metadata[""][lora.layers.ADAPTER_METADATA] == "default"
    handle.remove()  # (the user's handle still removes its hook)
    layer.state_dict()
    assert len(seen) == 1
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.state_dict()["weight"], base)


def test_a_shared_store_names_the_copy_that_switched():
    """N1: after `c = copy.copy(layer); c.set_adapter("b")` (the README: switch in one of the two only), a switch of
    the original to "b" said "it holds ['default', 'default']"; it now says the store is shared with a copy that
    switched."""
    layer = lora.Linear(8, 6, r=2)
    layer.add_adapter("b", torch.randn(2, 8), torch.randn(6, 2), 1.0)
    c = copy.copy(layer)
    c.set_adapter("b")
    with pytest.raises(KeyError, match=r"shares its store of adapters with a copy of it \(copy.copy\)"):
        layer.set_adapter("b")
    plain = lora.Linear(8, 6, r=2)
    plain.add_adapter("b", torch.randn(2, 8), torch.randn(6, 2), 1.0)
    with pytest.raises(KeyError, match=r"'c' is not in this layer \(it holds \['default', 'b'\]\)"):
        plain.set_adapter("c")
