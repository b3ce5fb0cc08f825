"""accelerate's offloading (cpu_offload, disk_offload, dispatch_model with modules on "cpu" or "disk") moves a module's
tensors to the meta device and keeps their values in its hook, which puts them back for every forward.

- Offloaded after a merge, the hook's copy of the weight is the base (accelerate takes model.state_dict(), which gives a
  merged layer's base): the layer forgets its merge, with a warning, and adds the adapter on the fly. It used to keep
  saying merged and serve the base.
- A switch on an offloaded layer would write into tensors on the meta device, which the hook replaces with its copies
  at the next forward: it is refused, naming the layer and accelerate. It used to say the new adapter was active while
  the model served the old one.
- Injecting into, or loading an adapter into, an offloaded module is refused naming accelerate (the hook would be lost).
- After accelerate.hooks.remove_hook_from_submodules the layers merge and switch as usual.
"""
import copy

import pytest
import torch
import torch.nn as nn

from accelerate import cpu_offload, disk_offload  # (requirements-dev.txt pins it: no skip)
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules
from peft import LoraConfig, PeftModel, get_peft_model

import lora_ext as lora
import tiny_models
from helpers import layer_forward64, rel_err, same_bits, save_random_peft

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two peft adapter directories of a tiny llama (random nonzero factors), and the base model."""
    root = tmp_path_factory.mktemp("offload_adapters")
    base = tiny_models.llama(seed=3)
    paths = {}
    for i, (name, r) in enumerate((("a", 4), ("b", 2))):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                            init_lora_weights=False))
        paths[name] = save_random_peft(pm, root / name, seed=11 + i, std=0.3)
    return base, paths


def _peft_logits(base, path, ids):
    """The reference: real peft serving the adapter."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        return model(ids).logits.double()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def _loaded(base, paths):
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, paths["a"], "a")
    lora.load_peft_adapter(model, paths["b"], "b", activate=False)
    return model


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_offloaded_after_a_merge_serves_the_adapter(adapters, tmp_path, how):
    base, paths = adapters
    ids = tiny_models.tokens()
    ref_a, ref_base = _peft_logits(base, paths["a"], ids), _logits(base, ids)
    assert rel_err(ref_a, ref_base) > 1e-2  # the adapter changes the logits
    model = _loaded(base, paths).eval()
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged
    with pytest.warns(UserWarning, match=r"Linear\(64, 64\): accelerate offloaded it while adapter 'a' was merged; its "
                                         r"offloaded copy of the weight is the base") as caught:
        if how == "cpu_offload":
            cpu_offload(model, execution_device="cpu")
        else:
            disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    assert all(w.filename == __file__ for w in caught if "accelerate offloaded it" in str(w.message))
    layers = [m for _, m in lora.serving.adapters.lora_layers(model)]
    assert len(layers) == 4 and not any(m.merged for m in layers)  # q and v of both blocks
    assert q.weight.is_meta
    out = _logits(model, ids)
    assert rel_err(out, ref_a) < 1e-5, rel_err(out, ref_base)  # before: the base (rel_err to ref_base ~1e-7)
    assert lora.active_adapter(model) == "a"


def _conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(lora.Conv2d(3, 5, 3, r=2, lora_alpha=4, padding=1))
    with torch.no_grad():
        net[0].lora_B.normal_()
    return net


def test_a_conv_offloaded_apart_from_its_conv_says_what_to_offload_with():
    """A ConvLoRA reads its conv's weight without calling the conv, whose hook then never runs."""
    net = _conv_net()
    with pytest.warns(UserWarning, match=r"Conv2d\(3, 5, kernel_size=\(3, 3\)\): accelerate offloads it apart from its "
                                         r"conv.*offload with preload_module_classes=\['Conv2d'\]"):
        cpu_offload(net, execution_device="cpu")


def test_a_merged_conv_offloaded_serves_its_adapter():
    net = _conv_net()
    conv = net[0]
    p = {k: v.detach().double().clone() for k, v in conv.named_parameters()}
    x = torch.randn(2, 3, 6, 6)
    ref = layer_forward64(conv, p, x.double(), conv.scaling)
    net.eval()
    assert conv.merged
    with pytest.warns(UserWarning, match=r"Conv2d\(3, 5, kernel_size=\(3, 3\)\): accelerate offloaded it while "
                                         r"adapter 'default' was merged"):
        cpu_offload(net, execution_device="cpu", preload_module_classes=["Conv2d"])  # the conv with it
    assert not conv.merged
    with torch.no_grad():
        out = net(x).double()
    assert rel_err(out, ref) < 1e-5


def _merged_linear(seed):
    torch.manual_seed(seed)
    layer = lora.Linear(16, 8, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    p = {k: v.detach().double().clone() for k, v in layer.named_parameters()}
    x = torch.randn(3, 16)
    return layer.eval(), p, x, layer_forward64(layer, p, x.double(), layer.scaling)


def test_a_hook_built_from_the_module_own_tensors_gives_its_copy_the_base():
    """AlignDevicesHook(offload=True) given no map copies the module's own tensors (the merged weight): the merge is
    taken out of that copy, so the layer can train and switch once the hook is removed."""
    layer, p, x, ref = _merged_linear(1)
    assert layer.merged
    with pytest.warns(UserWarning, match=r"Linear\(16, 8\): accelerate offloaded it while adapter 'default' was "
                                         r"merged; the adapter was taken out of the hook's copy of the weight"):
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", offload=True))
    assert not layer.merged and layer.weight.is_meta
    with torch.no_grad():
        out = layer(x).double()
    assert rel_err(out, ref) < 1e-5
    layer.train()  # (before: a raw "all tensors must be on one device" error, the layer left in eval mode)
    assert layer.training
    remove_hook_from_submodules(layer)
    assert rel_err(layer.weight.double(), p["weight"]) < 1e-6  # the base


def test_a_plain_map_made_of_state_dict_holds_the_base():
    layer, p, x, ref = _merged_linear(2)
    with pytest.warns(UserWarning, match=r"its offloaded copy of the weight is the base"):
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", offload=True,
                                                   weights_map=dict(layer.state_dict())))
    assert not layer.merged
    with torch.no_grad():
        out = layer(x).double()
    assert rel_err(out, ref) < 1e-5  # before: the base, still saying merged


def test_a_switch_on_an_offloaded_model_is_refused_and_changes_nothing(adapters):
    base, paths = adapters
    ids = tiny_models.tokens()
    ref_a = _peft_logits(base, paths["a"], ids)
    model = _loaded(base, paths)  # training mode: unmerged
    cpu_offload(model, execution_device="cpu")
    layer = model.model.layers[1].self_attn.v_proj
    stored_b = [t.clone() for t in layer.get_adapter("b")[:2]]
    with pytest.raises(ValueError, match=r"set_adapter\('b'\) at 'model\.layers\.0\.self_attn\.q_proj': "
                                         r"Linear\(64, 64\)'s lora_A and lora_B are on the meta device, so a switch "
                                         r"would write nothing: accelerate offloads them"):
        lora.set_adapter(model, "b")
    assert lora.active_adapter(model) == "a"  # before: 'b', with a's outputs
    assert all(m.active_adapter == "a" for _, m in lora.serving.adapters.lora_layers(model))
    assert all(same_bits(t, s) for t, s in zip(layer.get_adapter("b")[:2], stored_b))
    assert rel_err(_logits(model, ids), ref_a) < 1e-5
    with pytest.raises(ValueError, match=r"set_adapter\('b'\): Linear\(64, 32\)'s lora_A and lora_B are on the "
                                         r"meta device.*accelerate offloads them"):
        model.model.layers[0].self_attn.v_proj.set_adapter("b")  # a layer's own switch
    with pytest.raises(ValueError, match="on the meta device.*accelerate offloads them"):
        lora.reserve_rank(model, 8)
    # eval() cannot merge there: it says why, and the model still serves a
    with pytest.warns(UserWarning, match=r"eval\(\) leaves adapter 'a' unmerged: Linear\(64, 64\): its weight or "
                                         r"factors are on the meta device: accelerate offloads them"):
        model.eval()
    assert rel_err(_logits(model, ids), ref_a) < 1e-5


def test_after_the_hooks_are_removed_merges_and_switches_work(adapters):
    base, paths = adapters
    ids = tiny_models.tokens()
    ref_a, ref_b = _peft_logits(base, paths["a"], ids), _peft_logits(base, paths["b"], ids)
    model = _loaded(base, paths).eval()
    with pytest.warns(UserWarning, match="accelerate offloaded it"):
        cpu_offload(model, execution_device="cpu")
    remove_hook_from_submodules(model)
    assert not model.model.layers[0].self_attn.q_proj.weight.is_meta
    model.train().eval()  # merges again
    assert model.model.layers[0].self_attn.q_proj.merged
    assert rel_err(_logits(model, ids), ref_a) < 1e-5
    lora.set_adapter(model, "b")
    assert rel_err(_logits(model, ids), ref_b) < 1e-5
    lora.unload(model, merge=False)
    for name, p in base.named_parameters():
        # (float32 merges round: the updates here are ~10x the weights)
        assert rel_err(model.get_parameter(name).double(), p.double()) < 1e-5, name


def test_inject_or_load_into_an_offloaded_model_is_refused(adapters):
    base, paths = adapters
    model = copy.deepcopy(base)
    cpu_offload(model, execution_device="cpu")
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' is offloaded by accelerate"):
        lora.load_peft_adapter(model, paths["a"], "a")
    with pytest.raises(ValueError, match=r"target_modules: module 'model\.layers\.0\.self_attn\.q_proj' is offloaded "
                                         r"by accelerate"):
        lora.inject(model, TARGETS, r=2)
    assert {name: type(m) for name, m in model.named_modules()} == before
    ids = tiny_models.tokens()
    assert rel_err(_logits(model, ids), _logits(base, ids)) < 1e-6


def test_an_inactive_load_into_an_offloaded_model_with_a_device_goes_in_and_its_switch_is_refused(adapters):
    base, paths = adapters
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, paths["a"], "a")
    cpu_offload(model, execution_device="cpu")
    lora.load_peft_adapter(model, paths["b"], "b", activate=False, device="cpu")  # host memory: values held
    with pytest.raises(ValueError, match="accelerate offloads them"):
        lora.set_adapter(model, "b")
    with pytest.raises(ValueError, match="factors are on the meta device: accelerate offloads them"):
        lora.load_peft_adapter(model, paths["b"], "c", activate=False)  # stored where the live factors are: meta
    assert lora.adapter_names(model) == ["a", "b"]


def test_unload_save_and_mixed_batches_of_an_offloaded_model_are_refused(adapters, tmp_path):
    base, paths = adapters
    ids = tiny_models.tokens()
    ref_a = _peft_logits(base, paths["a"], ids)
    model = _loaded(base, paths)
    cpu_offload(model, execution_device="cpu")
    for merge in (False, True):  # before (merge=False): plain modules on meta, the values gone with the hooks
        with pytest.raises(ValueError, match=r"unload: layer 'model\.layers\.0\.self_attn\.q_proj' is offloaded by "
                                             r"accelerate"):
            lora.unload(model, merge=merge)
    with pytest.raises(ValueError, match=r"save: layer 'model\.layers\.0\.self_attn\.q_proj': adapter 'a''s factors "
                                         r"are on the meta device: accelerate offloads them"):
        lora.save_peft_adapter(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(ValueError, match=r"batch_adapters: layer 'model\.layers\.0\.self_attn\.q_proj''s factors are "
                                         r"on the meta device: accelerate offloads them"):
        with lora.batch_adapters(model, ["a", "b"]):
            pass
    assert rel_err(_logits(model, ids), ref_a) < 1e-5


def test_offloading_buffers_too_takes_unmerged_layers():
    """accelerate's offload_buffers=True moves every non-persistent buffer name torch records: the merged snapshot's
    names stay out of that set while they hold nothing (before: AttributeError inside accelerate)."""
    layer, p, x, ref = _merged_linear(3)
    layer.train()  # unmerged: no snapshot
    net = nn.Sequential(layer)
    cpu_offload(net, execution_device="cpu", offload_buffers=True)
    with torch.no_grad():
        out = net(x).double()
    assert rel_err(out, ref) < 1e-5
    assert "_merged_A" not in layer.state_dict() and "_merged_A" not in dict(layer.named_buffers())


def test_the_merged_snapshot_is_never_saved():
    layer, *_ = _merged_linear(4)
    assert layer.merged and layer._merged_A is not None
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    layer.train()
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    layer.load_state_dict(layer.state_dict())  # strict: nothing missing or unexpected either way


def test_a_switch_under_a_hook_on_an_enclosing_block_names_it():
    """preload_module_classes offloads a whole block from one hook on it: the layer's own message cannot see that
    hook, and says where to look."""
    torch.manual_seed(5)
    block = nn.Sequential(nn.Sequential(lora.Linear(8, 8, r=2, lora_alpha=2)))
    layer = block[0][0]
    layer.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    cpu_offload(block, execution_device="cpu", preload_module_classes=["Sequential"])
    with pytest.raises(ValueError, match=r"on the meta device.*or an accelerate hook on a module above offloads them"):
        layer.set_adapter("b")
    assert layer.active_adapter == "default"
