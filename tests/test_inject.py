"""lora_ext.inject / unload on real transformers models (GPT-2's Conv1D, Llama's nn.Linear) and torch modules."""
import copy

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import lora_ext
from helpers import rel_err
from tiny_models import gpt2, llama, randomize_lora, snapshot, tokens, unchanged

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


@pytest.mark.parametrize("build,targets,n", [(gpt2, GPT2_TARGETS, 8), (llama, LLAMA_TARGETS, 15)])
def test_zero_adapter_gives_the_original_outputs_and_shares_weights(build, targets, n):
    model, x = build(), tokens()
    ref = model(x).logits
    weights = {name: m.weight for name, m in model.named_modules() if hasattr(m, "weight")}
    names = lora_ext.inject(model, targets, r=4, lora_alpha=8)
    assert len(names) == n
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, lora_ext.LoRALayer)
        assert layer.weight is weights[name]  # the same Parameter: no copy of the base weight
    assert rel_err(model(x).logits, ref) < 1e-6
    model.eval()  # merges the (zero) adapters
    assert rel_err(model(x).logits, ref) < 1e-6


def test_conv1d_becomes_fan_in_fan_out_and_fused_qkv_a_merged_linear():
    model, x = gpt2(), torch.randn(3, 64, dtype=torch.float32)
    conv = model.transformer.h[0].attn.c_attn
    lora_ext.inject(model, ["c_proj"], fused={"c_attn": [True, False, True]}, r=2, lora_alpha=3)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, lora_ext.MergedLinear) and layer.fan_in_fan_out
    assert layer.weight is conv.weight and layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (128, 2)
    proj = model.transformer.h[0].attn.c_proj
    assert isinstance(proj, lora_ext.Linear) and proj.fan_in_fan_out
    randomize_lora(model)
    W, b = conv.weight.double(), conv.bias.double()
    A, B = layer.lora_A.double(), layer.lora_B.double()
    delta = torch.zeros(192, 64, dtype=torch.float64)
    delta[:64] = B[:64] @ A[:2]
    delta[128:] = B[64:] @ A[2:]
    ref = x.double() @ (W + 1.5 * delta.t()) + b
    assert rel_err(layer(x), ref) < 1e-5
    layer.eval()
    assert rel_err(layer(x), ref) < 1e-5


def test_regex_and_exclude_follow_peft_rules():
    model = llama()
    names = lora_ext.inject(model, r"model\.layers\.\d+\.self_attn\.(q|v)_proj", exclude_modules=["layers.1.self_attn.v_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_all_linear_chooses_what_peft_chooses(build):
    # peft's "all-linear": every Linear / Conv1D but the output head; inject used to refuse it as matching nothing
    from peft import LoraConfig, get_peft_model
    ours = build()
    names = lora_ext.inject(ours, "ALL-linear", r=2)
    peft_model = get_peft_model(build(), LoraConfig(r=2, target_modules="all-linear"))
    want = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert sorted(names) == want and want
    assert "lm_head" not in names
    # the modules already adapted are not chosen again
    with pytest.raises(ValueError, match="matches no module"):
        lora_ext.inject(ours, "all-linear")


class _Experts(nn.Module):
    """Names peft's layer filter reads differently: a number under a pattern, a deeper expert index, a module in no
    numbered layer, and numbers under two patterns."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4), "experts": nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(3))}) for _ in range(3))
        self.layer = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(2))
        self.fc = nn.Linear(4, 4)


@pytest.mark.parametrize("targets,layers,pattern", [
    (["fc"], [1], None), (["fc"], 0, None), (["fc"], [0, 2], "blocks"), (["fc"], [1], ["experts"]),
    (["fc"], [1], ["layer", "blocks"]), (["fc"], [], None), (["fc", "blocks.2.fc"], [1], None),
])
def test_layers_to_transform_chooses_what_peft_chooses(targets, layers, pattern):
    from peft import LoraConfig, get_peft_model
    ours = _Experts()
    names = lora_ext.inject(ours, targets, r=2, layers_to_transform=layers, layers_pattern=pattern)
    peft_model = get_peft_model(_Experts(), LoraConfig(r=2, target_modules=targets, layers_to_transform=layers,
                                                       layers_pattern=pattern))
    want = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert sorted(names) == want and want


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers_to_transform="1"), "layers_to_transform must be"), (dict(layers_to_transform=[True]), "must be"),
    (dict(layers_to_transform=[0], layers_pattern="(x"), "layers_pattern"),
    (dict(layers_to_transform=[0], layers_pattern=3), "layers_pattern must be"),
    (dict(target_modules=["experts.1.fc"], layers_to_transform=[9]), "matches no module"),
    (dict(layers_pattern="blocks"), "without layers_to_transform"),
    (dict(target_modules=r".*fc", layers_to_transform=[1]), "not the regular expression"),
])
def test_bad_layers_to_transform_is_refused_before_any_change(kwargs, match):
    model = _Experts()
    kwargs.setdefault("target_modules", ["fc"])
    with pytest.raises(ValueError, match=match):
        lora_ext.inject(model, r=2, **kwargs)
    assert not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())


def test_rank_alpha_patterns_and_rslora():
    model = llama()
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                    alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2}, use_rslora=True)
    layers = model.model.layers
    assert layers[0].self_attn.v_proj.lora_A.shape[0] == 2
    assert layers[0].self_attn.v_proj.scaling == pytest.approx(8 / 2 ** 0.5)
    assert layers[1].self_attn.q_proj.scaling == pytest.approx(2 / 4 ** 0.5)


def test_embedding_and_conv_modules():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6))
    cnn = nn.Sequential(conv, nn.ReLU())
    lora_ext.inject(model, ["0", "1"], r=2)
    lora_ext.inject(cnn, ["0"], r=2)
    assert isinstance(model[0], lora_ext.Embedding) and isinstance(model[1], lora_ext.Linear)
    assert isinstance(cnn[0], lora_ext.Conv2d) and cnn[0].conv is conv
    randomize_lora(cnn)
    x = torch.randn(2, 3, 7, 7)
    delta = (cnn[0].lora_B.double() @ cnn[0].lora_A.double()).view(conv.weight.shape) * cnn[0].scaling
    ref = torch.nn.functional.conv2d(x.double(), conv.weight.double() + delta, conv.bias.double(), padding=1)
    assert rel_err(cnn[0](x), ref) < 1e-5


@pytest.mark.parametrize("merge", [False, True])
def test_unload_puts_plain_modules_back(merge):
    model, x = gpt2(), tokens()
    ref = model(x).logits
    lora_ext.inject(model, GPT2_TARGETS, r=4)
    randomize_lora(model)
    with_lora = model(x).logits
    names = lora_ext.unload(model, merge=merge)
    assert len(names) == 8
    assert not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in names)
    assert rel_err(model(x).logits, with_lora if merge else ref) < 1e-5
    if not merge:
        assert torch.equal(model(x).logits, ref)


def test_bad_input_is_refused_before_any_change():
    model = gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="target_modules"):
        lora_ext.inject(model, ["no_such_module"])
    with pytest.raises(ValueError, match="ln_1"):  # a LayerNorm: not a supported module type
        lora_ext.inject(model, ["c_attn", "ln_1"])
    with pytest.raises(ValueError, match="r must be"):
        lora_ext.inject(model, ["c_attn"], r=0)
    with pytest.raises(ValueError, match="target_modules"):
        lora_ext.inject(model, "c_attn[")
    assert not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())
    assert unchanged(model, snap)



@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=["h.0"]), "'transformer.h.0' is a GPT2Block, not a Linear/Conv1D/Embedding/Conv layer"),
    (dict(target_modules=r"transformer\.h\.\d"), "is a GPT2Block, not a Linear/Conv1D/Embedding/Conv layer"),
    (dict(target_modules=["c_attn"], exclude_modules="(["), "exclude_modules: invalid regular expression"),
    (dict(target_modules="c_attn["), "target_modules: invalid regular expression"),
    (dict(target_modules=["c_attn"], rank_pattern={"c_(": 2}), "rank_pattern key 'c_(': invalid regular expression"),
    (dict(target_modules=["c_attn"], rank_pattern={"c_attn": 0}), "rank_pattern: 'c_attn' must map to a positive"),
    (dict(target_modules=["c_attn"], alpha_pattern={"c_attn": float("nan")}), "alpha_pattern: 'c_attn' must map"),
    (dict(target_modules=["c_attn"], exclude_modules=5), "exclude_modules: expected a regular expression"),
    (dict(target_modules=["c_attn", None]), "target_modules: expected a regular expression"),
])
def test_non_leaf_targets_and_bad_options_are_refused_naming_them(kwargs, match):
    model = gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        lora_ext.inject(model, **kwargs)
    assert match in str(info.value)
    assert not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())
    assert unchanged(model, snap)

def test_tied_embedding_is_never_merged():
    model, x = gpt2(), tokens()
    lora_ext.inject(model, ["c_attn", "wte"], r=2)
    randomize_lora(model)
    lm_head = model.lm_head.weight.detach().clone()
    truth = copy.deepcopy(model).double()(x).logits  # the unmerged model in float64
    expected = model(x).logits
    model.eval()
    assert not model.transformer.wte.merged and model.transformer.h[0].attn.c_attn.merged
    assert torch.equal(model.lm_head.weight, lm_head)
    # float32 through this model is ill-conditioned: the unmerged float32 forward itself is 1.1e-5 from float64 at
    # this seed (5e-7 at others); an adapter merged into the tied lm_head too would be off by O(1)
    assert rel_err(expected, truth) < 5e-5
    assert rel_err(model(x).logits, truth) < 5e-5
    with pytest.raises(ValueError, match="tied"):
        lora_ext.merge_adapter(model)
    with pytest.raises(ValueError, match="tied"):
        lora_ext.unload(model, merge=True)
    assert isinstance(model.transformer.h[0].attn.c_attn, lora_ext.LoRALayer)  # nothing was unloaded


class _ScaledEmbedding(nn.Embedding):  # a scale in its code, no embed_scale (tests/test_scaled_embedding.py: those)
    def forward(self, ids):
        return super().forward(ids) * 8.0


class _Quiet(nn.Linear):  # a subclass without a forward of its own stands for nn.Linear
    pass


def test_inject_refuses_a_subclass_with_a_forward_of_its_own_before_any_change():
    torch.manual_seed(0)
    model = nn.Sequential(_Quiet(6, 10), nn.Linear(10, 4))
    model.emb = _ScaledEmbedding(10, 6)
    with pytest.raises(ValueError, match=r"'emb' is a _ScaledEmbedding, a subclass of Embedding with a forward"):
        lora_ext.inject(model, r=2, target_modules=["0", "emb", "1"])
    assert type(model[0]) is _Quiet and type(model.emb) is _ScaledEmbedding  # nothing replaced
    assert lora_ext.inject(model, r=2, target_modules=["0", "1"]) == ["0", "1"]


def test_inject_refuses_multihead_attentions_out_proj():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.att(x, x, x)[0])

    model = Attention()
    with pytest.raises(ValueError, match=r"'att.out_proj': its parent 'att' \(MultiheadAttention\) reads its weight without calling it"):
        lora_ext.inject(model, r=2, target_modules=["out_proj", "proj"])
    assert type(model.proj) is nn.Linear
    assert lora_ext.inject(model, r=2, target_modules=["proj"]) == ["proj"]


@pytest.mark.parametrize("hook", ["forward_pre", "forward", "load_pre", "state_dict"])
def test_a_module_with_hooks_of_its_own_is_refused_before_anything_changes(hook):
    """A lora_ext layer in its place would not run them: with a zero adapter, an input-scaling pre-hook lost moved the
    output by 1.09 and a checkpoint-format load hook stopped loading (peft keeps the module, hooks included)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    q = model.q_proj
    register = {"forward_pre": lambda: q.register_forward_pre_hook(lambda m, args: (args[0] * 2,)),
                "forward": lambda: q.register_forward_hook(lambda m, args, out: out * 2),
                "load_pre": lambda: q.register_load_state_dict_pre_hook(lambda *a: None),
                "state_dict": lambda: q.register_state_dict_post_hook(lambda *a: None)}
    handle = register[hook]()
    x = torch.randn(3, 4)
    before = model(x)
    with pytest.raises(ValueError, match="module 'q_proj' has hooks of its own"):
        lora_ext.inject(model, target_modules=["q_proj"], r=2)
    assert model.q_proj is q and torch.equal(model(x), before)
    handle.remove()
    lora_ext.inject(model, target_modules=["q_proj"], r=2)
    assert isinstance(model.q_proj, lora_ext.Linear)


def test_an_accelerate_hook_or_instance_forward_is_refused_and_a_removed_one_is_not():
    """accelerate's add_hook_to_module sets a forward on the instance (not one of torch's hook dicts): it was lost
    without a word (an input-scaling hook: 1.09 off with a zero adapter)."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Double(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return (args[0] * 2,), kwargs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    first, q = model[0], model[1]
    add_hook_to_module(q, Double())
    with pytest.raises(ValueError, match=r"module '1' has hooks of its own \(a forward set on the instance by "
                                         r"accelerate's add_hook_to_module\)"):
        lora_ext.inject(model, target_modules=["0", "1"], r=2)
    assert model[0] is first and model[1] is q
    remove_hook_from_module(q)  # (sets the class's forward back on the instance: not a hook)
    q.forward = lambda x: x * 3
    with pytest.raises(ValueError, match=r"module '1' has hooks of its own \(a forward set on the instance\)"):
        lora_ext.inject(model, target_modules=["0", "1"], r=2)
    del q.forward
    assert lora_ext.inject(model, target_modules=["0", "1"], r=2) == ["0", "1"]


@pytest.mark.parametrize("which", ["custom", "weight_norm", "bias"])
def test_a_parametrized_module_is_refused_before_anything_changes(which):
    """A weight computed by a parametrization: inject raised torch's TypeError (cannot assign 'torch.FloatTensor' as
    parameter 'weight') after replacing the modules before it."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    first = model[0]
    if which == "weight_norm":
        nn.utils.parametrizations.weight_norm(model[1])
    else:
        parametrize.register_parametrization(model[1], which if which == "bias" else "weight", Double())
    keys = sorted(model.state_dict())
    with pytest.raises(ValueError, match=r"module '1' has parametrizations \((weight|bias):"):
        lora_ext.inject(model, target_modules=["0", "1"], r=2)
    assert model[0] is first and sorted(model.state_dict()) == keys


def test_a_layer_reached_through_a_second_name_of_its_parent_is_not_tied_to_itself():
    """m.alias = m.layers[0] before inject: the layer recorded its own second path as a module sharing its weight,
    so eval() never merged and merge_adapter / unload(merge=True) refused naming 'alias.q' (the layer itself). A
    second module holding the weight (m.b, given m.a's weight) is still a tie; a second name of the module itself
    (m.c = m.a) is replaced too (it used to stay the plain Linear: the forward through it served the base)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block()])
            self.alias = self.layers[0]
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.c = self.a

    torch.manual_seed(0)
    m = M()
    lora_ext.inject(m, ["q", "a"], r=2)
    layer = m.layers[0].q
    assert m.alias.q is layer and layer.merge_weights and not layer.__dict__.get("_tied_with")
    assert m.a._tied_with == ["b"] and not m.a.merge_weights and m.c is m.a
    with torch.no_grad():
        layer.lora_B.normal_()
    W = layer.weight.detach().double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).detach()
    layer.eval()
    assert layer.merged
    assert torch.allclose(layer.weight.detach().double(), W, atol=1e-6)
