"""unload and hooks registered on lora_ext layers (inject refuses a hooked module and says to register its hooks on
the layer): unload moves them to the plain module it puts back, whose forwards, state dicts and loads run them as the
layer did, and whose handles still remove them; refused, before anything changes, where the module put back has
hooks of the same kind. Expected values from plain torch (float64), not from lora_ext."""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import lora_ext
from tiny_models import snapshot, unchanged


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _randomized(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    return model


def _ref(layer, x, merge, pre=lambda t: t):
    """float64: the plain Linear the layer unloads to, with its adapter merged (merge) or not, after `pre`."""
    W = layer.weight.detach().double()
    if merge:
        W = W + layer.scaling * (layer.lora_B.detach().double() @ layer.lora_A.detach().double())
    return F.linear(pre(x.double()), W, layer.bias.detach().double())


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("with_kwargs", [False, True])
def test_forward_pre_hook_moves_to_the_plain_module_and_its_handle_still_removes_it(merge, with_kwargs):
    model = _randomized(lora_ext.inject(m := _net(), ["0"], r=2) and m)
    layer = model[0]
    if with_kwargs:
        handle = layer.register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] * 2,), kwargs), with_kwargs=True)
    else:
        handle = layer.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    x = torch.randn(3, 8)
    expected = _ref(layer, x, merge, pre=lambda t: t * 2)
    plain_expected = _ref(layer, x, merge)
    assert lora_ext.unload(model, merge=merge) == ["0"]
    plain = model[0]
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not layer._forward_pre_hooks  # (not run by the layer any more either)
    handle.remove()
    assert not plain._forward_pre_hooks and not plain._forward_pre_hooks_with_kwargs
    torch.testing.assert_close(plain(x).double(), plain_expected, rtol=1e-5, atol=1e-5)


def test_forward_hooks_always_called_and_backward_hooks_move():
    model = lora_ext.inject(m := _net(), ["0", "2"], r=2) and m
    layer = model[0]
    seen = []
    layer.register_forward_hook(lambda mod, args, out: out + 1)
    layer.register_forward_hook(lambda mod, args, kwargs, out: seen.append(("kw", type(mod))), with_kwargs=True,
                                always_call=True)
    layer.register_full_backward_hook(lambda mod, gin, gout: seen.append(("bwd", type(mod))))
    model[2].register_full_backward_pre_hook(lambda mod, gout: seen.append(("bwdpre", type(mod))))
    x = torch.randn(3, 8, requires_grad=True)
    W, b = layer.weight.detach().double(), layer.bias.detach().double()
    lora_ext.unload(model)
    plain = model[0]
    assert plain._is_full_backward_hook is True and set(plain._forward_hooks_always_called) == set(
        plain._forward_hooks_with_kwargs)
    torch.testing.assert_close(plain(x).double(), F.linear(x.double(), W, b) + 1, rtol=1e-5, atol=1e-5)
    seen.clear()
    model(x).sum().backward()
    assert ("kw", nn.Linear) in seen and ("bwd", nn.Linear) in seen and ("bwdpre", nn.Linear) in seen


def test_state_dict_and_load_hooks_move_and_are_called_with_the_plain_module():
    model = lora_ext.inject(m := _net(), ["0"], r=2) and m
    layer = model[0]
    called = []

    def renamed(module, state_dict, prefix, *rest):  # a checkpoint format: "w" for "weight"
        called.append(module)
        if prefix + "w" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")

    def post(module, incompatible):
        called.append(("post", module))

    layer.register_load_state_dict_pre_hook(renamed)
    layer.register_load_state_dict_post_hook(post)
    layer.register_state_dict_post_hook(lambda module, sd, prefix, meta: sd.__setitem__(prefix + "tag", torch.ones(1)))
    lora_ext.unload(model, merge=False)
    plain = model[0]
    assert "0.tag" in model.state_dict()
    assert all(h.__module__ != "lora_ext.layers" for h in plain._load_state_dict_post_hooks.values())
    new = torch.randn(8, 8)
    sd = {k: v for k, v in model.state_dict().items() if k != "0.tag"}
    sd["0.w"] = sd.pop("0.weight")
    sd["0.w"] = new
    called.clear()
    model.load_state_dict(sd)
    assert torch.equal(plain.weight.detach(), new)
    assert called[0] is plain and called[-1] == ("post", plain)  # the plain module, not the layer taken out


def test_hooks_of_torch_and_lora_ext_stay_with_the_layer():
    model = lora_ext.inject(m := _net(), ["0"], r=2) and m
    layer = model[0]
    lora_ext.set_adapter(layer, "default")  # the layer as a model: the lock's hooks on it
    assert layer._forward_pre_hooks and layer._load_state_dict_post_hooks
    mine = layer.register_forward_pre_hook(lambda mod, args: None)
    lora_ext.unload(model)
    plain = model[0]
    assert list(plain._forward_pre_hooks) == [mine.id] and not plain._forward_hooks
    assert not plain._load_state_dict_post_hooks
    assert "_lora_ext_model_lock" not in plain.__dict__
    plain(torch.randn(2, 8))  # (a lock hook moved without its lock would fail here)


def test_conv_layer_hooks_move_to_its_conv_or_are_refused_where_the_conv_has_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    lora_ext.inject(model, ["0"], r=2)
    layer = model[0]
    handle = layer.register_forward_hook(lambda mod, args, out: out * 3)
    x = torch.randn(2, 3, 6, 6)
    conv = layer.conv
    own = conv.register_forward_hook(lambda mod, args, out: out)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '0' and the Conv2d put back in its place both have forward hooks"):
        lora_ext.unload(model)
    assert model[0] is layer and unchanged(model, before)
    own.remove()
    expected = F.conv2d(x.double(), conv.weight.detach().double(), conv.bias.detach().double()) * 3
    lora_ext.unload(model, merge=False)
    assert model[0] is conv
    torch.testing.assert_close(conv(x).double(), expected, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert not conv._forward_hooks


def test_an_instance_forward_is_refused_before_anything_changes():
    model = lora_ext.inject(m := _net(), ["0", "2"], r=2) and m
    layer = model[0]
    layer.forward = functools.partial(type(layer).forward, layer)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '0' has a forward set on the instance"):
        lora_ext.unload(model)
    assert isinstance(model[0], lora_ext.LoRALayer) and isinstance(model[2], lora_ext.LoRALayer)
    assert unchanged(model, before)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.proj(x))


def _saved_model(tmp_path):
    peft_model = get_peft_model(_Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                   modules_to_save=["head"]))
    path = str(tmp_path / "a")
    peft_model.save_pretrained(path)
    model = _Net()
    lora_ext.load_peft_adapter(model, path)
    assert isinstance(model.head, lora_ext.ModulesToSave)
    return model


def test_a_saved_modules_wrapper_hooks_move_to_the_copy_put_back(tmp_path):
    model = _saved_model(tmp_path)
    wrapper = model.head
    handle = wrapper.register_forward_hook(lambda mod, args, out: out - 5)
    copy = wrapper.modules_to_save["default"]
    x = torch.randn(2, 8)
    h = model.proj(x).detach().double()
    expected = F.linear(h, copy.weight.detach().double(), copy.bias.detach().double()) - 5
    lora_ext.unload(model)
    assert model.head is copy
    torch.testing.assert_close(copy(h.float()).double(), expected, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert not copy._forward_hooks


def test_a_saved_modules_wrapper_hook_over_a_hooked_copy_is_refused(tmp_path):
    model = _saved_model(tmp_path)
    wrapper = model.head
    wrapper.register_forward_pre_hook(lambda mod, args: None)
    wrapper.modules_to_save["default"].register_forward_pre_hook(lambda mod, args: None)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'head' and the Linear put back in its place both have forward "
                                         r"pre-hooks"):
        lora_ext.unload(model)
    assert model.head is wrapper and isinstance(model.proj, lora_ext.LoRALayer) and unchanged(model, before)


@pytest.mark.parametrize("merged", [False, True])
def test_hooks_on_a_conv_layers_own_conv_are_refused_at_the_forward(merged):
    """A ConvLoRA ran its conv's hooks merged (it calls the conv) and not unmerged (it convolves with the adapter in
    the weight): a feature hook on every nn.Conv2d saw nothing unmerged, and an output-changing one moved the output
    by 2.5 between the modes. Refused in both, naming the layer; the hook on the layer itself runs in both."""
    torch.manual_seed(0)
    layer = lora_ext.Conv2d(2, 4, 3, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train(not merged)
    x = torch.randn(1, 2, 6, 6)
    handle = layer.conv.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(ValueError, match=r"its conv has forward or backward hooks of its own"):
        layer(x)
    handle.remove()
    layer.register_forward_hook(lambda mod, args, out: out * 2)
    W = layer.conv.weight.detach().double()
    if not merged:
        W = W + layer.scaling * (layer.lora_B.detach().double() @ layer.lora_A.detach().double()).view(W.shape)
    expected = F.conv2d(x.double(), W, layer.conv.bias.detach().double()) * 2
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", [False, True])
def test_a_layer_under_two_names_is_replaced_at_both(merge):
    """named_modules lists a shared module once: unload put the plain module at one name and left the layer, merged,
    at the other (1138 off through a hook moved to one of them). Expected: the one plain module at both names."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = None

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    m = Twice()
    lora_ext.inject(m, ["a"], r=2)
    m.b = m.a
    layer = m.a
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.register_forward_hook(lambda mod, args, out: out * 10)
    x = torch.randn(2, 4)
    W = layer.weight.detach().double()
    if merge:
        W = W + layer.scaling * (layer.lora_B.detach().double() @ layer.lora_A.detach().double())
    b = layer.bias.detach().double()
    expected = F.linear(F.linear(x.double(), W, b) * 10, W, b) * 10
    assert sorted(lora_ext.unload(m, merge=merge)) == ["a", "b"]
    assert type(m.a) is nn.Linear and m.b is m.a
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-4)
