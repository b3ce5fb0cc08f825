"""load_state_dict with a tensor that does not fit a lora_ext layer (a factor of another rank, a conv weight of
another shape). torch copies every tensor that fits and raises at the end; for a LoRA layer that was a new base
under the old adapter (3.2-5.3 off the layer's output before the refused load) and, for a layer that had trained
through its merge, the trained factors merged on the way. The layer is now loaded whole or not at all: every bit of
its weight, its factors, its flags and its output are as before, and the load still raises torch's size mismatch.
Expected values are the layer's own tensors and outputs before the load."""
import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import randomize_, same_bits

KINDS = {
    "linear": (lambda: lora.Linear(8, 6, r=2, lora_alpha=4), lambda: torch.randn(3, 8)),
    "fan_in_fan_out": (lambda: lora.Linear(8, 6, r=2, lora_alpha=4, fan_in_fan_out=True), lambda: torch.randn(3, 8)),
    "merged_linear": (lambda: lora.MergedLinear(8, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                      lambda: torch.randn(3, 8)),
    "embedding": (lambda: lora.Embedding(10, 6, r=2, lora_alpha=4), lambda: torch.randint(0, 10, (2, 5))),
    "conv2d": (lambda: lora.Conv2d(3, 4, 3, r=2, lora_alpha=4), lambda: torch.randn(2, 3, 6, 6)),
}


def _misfit(sd, key, layer_tensor):
    bigger = list(layer_tensor.shape)
    bigger[0] += 1
    sd[key] = torch.randn(bigger, dtype=layer_tensor.dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("which", ["lora_A", "base"])
def test_a_misfit_tensor_leaves_the_whole_layer_as_it_was(kind, dtype, merged, which):
    torch.manual_seed(0)
    make, inputs = KINDS[kind]
    layer = randomize_(make().to(dtype))
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    for k, v in sd.items():  # the file's values all differ from the layer's
        if v.is_floating_point():
            sd[k] = v + 1.0
    weight_key = "conv.weight" if kind == "conv2d" else "weight"
    _misfit(sd, "lora_A" if which == "lora_A" else weight_key,
            layer.lora_A if which == "lora_A" else layer._weight_param())
    layer.train(not merged)
    assert layer.merged == merged
    x = inputs()
    x = x.to(dtype) if x.is_floating_point() else x
    with torch.no_grad():
        before = layer(x)
    weight, A, B = (t.detach().clone() for t in (layer._weight_param(), layer.lora_A, layer.lora_B))
    bias = next((t.detach().clone() for n, t in layer.named_parameters() if n.endswith("bias")), None)
    with pytest.raises(RuntimeError, match="size mismatch") as info:
        layer.load_state_dict(sd)
    assert "none of its keys was loaded" in str(info.value)
    assert layer.merged == merged and layer.active_adapter == "default"
    assert same_bits(layer._weight_param().detach(), weight)
    assert same_bits(layer.lora_A.detach(), A) and same_bits(layer.lora_B.detach(), B)
    if bias is not None:
        assert same_bits(next(t for n, t in layer.named_parameters() if n.endswith("bias")).detach(), bias)
    with torch.no_grad():
        assert same_bits(layer(x), before)
    layer.train()  # and the base comes back as it was before the load
    assert not layer.merged


def test_the_other_modules_of_the_model_load_as_torch_loads_them():
    """torch's own rule for the rest of the model: a module whose tensors fit is loaded, and the load raises."""
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 8, r=2), nn.Linear(8, 8), lora.Linear(8, 8, r=2))
    randomize_(model)
    sd = {k: v.detach().clone() + 1.0 for k, v in model.state_dict().items()}
    sd["2.lora_A"] = torch.randn(3, 8)
    kept = model[2].weight.detach().clone()
    with pytest.raises(RuntimeError, match="size mismatch for 2.lora_A"):
        model.load_state_dict(sd)
    assert torch.equal(model[0].weight, sd["0.weight"]) and torch.equal(model[1].weight, sd["1.weight"])
    assert torch.equal(model[2].weight, kept)


def test_a_layer_that_trained_through_its_merge_keeps_its_merge():
    """A refused load used to merge the trained factors into the weight on its way (0.73 moved in bfloat16)."""
    torch.manual_seed(0)
    layer = lora.Embedding(10, 6, r=2, lora_alpha=2).bfloat16()
    randomize_(layer)
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    sd["lora_A"] = torch.randn(3, 10, dtype=torch.bfloat16)
    layer.eval()
    ids = torch.arange(10).view(2, 5)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.05)
    y = layer(ids)
    (y.float() * torch.randn(y.shape)).sum().backward()
    opt.step()
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        served = layer(ids)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(sd)
    assert same_bits(layer.weight.detach(), weight)
    with torch.no_grad():
        assert same_bits(layer(ids), served)


def test_a_plain_conv_checkpoint_that_misfits_is_refused_whole():
    """A plain nn.Conv2d's keys (weight, bias), renamed to the layer's conv.* before the check."""
    torch.manual_seed(0)
    layer = randomize_(lora.Conv2d(3, 4, 3, r=2, lora_alpha=4))
    plain = nn.Conv2d(3, 5, 3)
    weight = layer.conv.weight.detach().clone()
    with pytest.raises(RuntimeError, match="size mismatch for conv.weight"):
        layer.load_state_dict(plain.state_dict(), strict=False)
    assert same_bits(layer.conv.weight.detach(), weight)


class _Ident(nn.Module):
    def forward(self, w):
        return w


def _layer():
    torch.manual_seed(0)
    return randomize_(lora.Linear(8, 6, r=2, lora_alpha=4))


def _shifted(layer):
    """The layer's state_dict, every value one more: a file whose values all differ from the layer's."""
    return {k: v + 1 for k, v in layer.state_dict().items()}


def _refused(layer, sd, match="none of its keys was loaded", **kwargs):
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=match) as info:
        layer.load_state_dict(sd, **kwargs)
    after = layer.state_dict()
    assert all(same_bits(before[k], after[k]) for k in before)
    return str(info.value)


def test_a_parametrized_weight_is_not_loaded_under_a_misfit():
    """The weight's tensor is then parametrizations.weight.original, in a child module."""
    from torch.nn.utils import parametrize
    layer = _layer()
    parametrize.register_parametrization(layer, "weight", _Ident())
    sd = _shifted(layer)
    sd["lora_A"] = torch.randn(3, 8)
    _refused(layer, sd)
    sd = _shifted(layer)
    sd["parametrizations.weight.original"] = torch.randn(7, 8)
    assert "size mismatch for parametrizations.weight.original" in _refused(layer, sd)


def test_the_layers_own_pre_hooks_come_before_the_check():
    """A hook renaming an old key to lora_A is judged on what it leaves; a hook that transposes a key makes it fit."""
    layer = _layer()
    sd = _shifted(layer)
    sd["old_A"] = torch.randn(3, 8)
    del sd["lora_A"]

    def rename(state_dict, prefix, *args):
        state_dict[prefix + "lora_A"] = state_dict.pop(prefix + "old_A")
    layer._register_load_state_dict_pre_hook(rename)
    _refused(layer, sd)

    layer = _layer()
    sd = _shifted(layer)
    sd["lora_A"] = sd["lora_A"].t().contiguous()  # (8, 2): a checkpoint that stores it transposed

    def transpose(state_dict, prefix, *args):
        state_dict[prefix + "lora_A"] = state_dict[prefix + "lora_A"].t()
    layer._register_load_state_dict_pre_hook(transpose)
    layer.load_state_dict(sd)
    assert torch.equal(layer.lora_A, sd["lora_A"].t()) and torch.equal(layer.weight, sd["weight"])


def test_a_value_that_is_not_a_tensor_or_a_meta_tensor_refuses_the_layer():
    for merged in (False, True):
        layer = _layer().train(not merged)
        sd = _shifted(layer)
        sd["lora_A"] = [[0.0] * 8] * 2
        assert "expected torch.Tensor" in _refused(layer, sd)
        sd["lora_A"] = layer.lora_A.detach() + 1
        sd["lora_B"] = torch.empty(6, 2, device="meta")
        assert "meta tensor" in _refused(layer, sd)


def test_a_refused_layer_reports_its_missing_and_unexpected_keys():
    layer = _layer()
    sd = _shifted(layer)
    sd["lora_A"] = torch.randn(3, 8)
    del sd["bias"]
    sd["stray"] = torch.zeros(1)
    text = _refused(layer, sd)
    assert 'Missing key(s) in state_dict: "bias"' in text and 'Unexpected key(s) in state_dict: "stray"' in text


def test_a_tied_weight_is_loaded_through_the_other_modules_key():
    """Documented: torch loads the tied head's key into the shared weight; the layer's own keys are refused."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = lora.Embedding(10, 6, r=2, lora_alpha=4)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight
    torch.manual_seed(0)
    m = randomize_(M())
    sd = {k: v.detach().clone() + 1 for k, v in m.state_dict().items()}
    sd["emb.lora_A"] = torch.randn(3, 10)
    A = m.emb.lora_A.detach().clone()
    with pytest.raises(RuntimeError, match="none of its keys was loaded"):
        m.load_state_dict(sd)
    assert torch.equal(m.emb.weight, sd["head.weight"]) and torch.equal(m.emb.lora_A, A)


def test_concurrent_loads_keep_the_layers_pre_hooks():
    """Two loads while a forward holds the layer: each runs the hook once, and the hook stays registered (the
    first version set the hooks aside outside the lock: the second load ran none and left none, and a later load
    skipped it silently, 2.9 off)."""
    import threading
    import time

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.3)
            return x
    calls = []

    def transposed_checkpoint(module, state_dict, prefix, *args):
        calls.append(1)
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()
    layer = lora.Linear(4, 4, r=2)
    layer.lora_dropout = Slow()
    layer.register_load_state_dict_pre_hook(transposed_checkpoint)
    ckpt = {k: v.clone() for k, v in layer.state_dict().items()}
    ckpt["weight"] = torch.randn(4, 4)
    forward = threading.Thread(target=lambda: layer(torch.randn(2, 4)))
    forward.start()
    time.sleep(0.05)
    loads = [threading.Thread(target=lambda: layer.load_state_dict(dict(ckpt))) for _ in range(2)]
    for t in loads:
        t.start()
        time.sleep(0.02)
    for t in (forward, *loads):
        t.join()
    assert len(calls) == 2 and len(layer._load_state_dict_pre_hooks) == 1
    layer.load_state_dict(dict(ckpt))
    assert len(calls) == 3 and torch.equal(layer.weight, ckpt["weight"].t())


def test_a_conv_childs_own_pre_hook_reshapes_its_key_before_torch_judges_it():
    def unflatten(module, sd, prefix, *args):
        if sd.get(prefix + "weight") is not None and sd[prefix + "weight"].dim() == 2:
            sd[prefix + "weight"] = sd[prefix + "weight"].view_as(module.weight)
    torch.manual_seed(0)
    layer = lora.Conv2d(2, 4, 3, r=2)
    layer.conv.register_load_state_dict_pre_hook(unflatten)
    sd = dict(layer.state_dict())
    flat = torch.randn(4, 18)
    sd["conv.weight"] = flat
    layer.load_state_dict(sd)
    assert torch.equal(layer.conv.weight, flat.view(4, 2, 3, 3))


def test_a_refused_layer_without_bias_reports_a_bias_key_as_unexpected():
    layer = lora.Linear(4, 3, r=2, bias=False)
    sd = dict(layer.state_dict())
    sd["bias"] = torch.zeros(3)
    sd["lora_A"] = torch.zeros(5, 4)
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "bias"'):
        layer.load_state_dict(sd)


def test_a_pre_hook_may_wait_for_a_forward_on_another_thread():
    """The hooks run outside the layer lock, as torch runs them (under it, a hook that drains in-flight forwards hung)."""
    import threading
    layer = lora.Linear(8, 8, r=2)
    x = torch.randn(2, 8)
    done = threading.Event()

    def drain(module, state_dict, prefix, *args):
        t = threading.Thread(target=lambda: (module(x), done.set()), daemon=True)
        t.start()
        t.join(timeout=10)
    layer.register_load_state_dict_pre_hook(drain)
    layer.load_state_dict(layer.state_dict())
    assert done.is_set()


def test_hooks_registered_during_loads_on_another_thread_are_removed_by_their_handles():
    """The hooks dict is never swapped (a version that set it aside during a load left the handles of hooks registered
    meanwhile pointing at a dropped dict: removed hooks kept running)."""
    import threading
    layer = lora.Linear(256, 256, r=8)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    stop = threading.Event()

    def loader():
        while not stop.is_set():
            layer.load_state_dict(sd)
    t = threading.Thread(target=loader)
    t.start()
    calls, handles = [], []
    try:
        for i in range(100):
            handles.append(layer.register_load_state_dict_pre_hook(lambda *a, i=i: calls.append(i)))
    finally:
        stop.set()
        t.join()
    for h in handles:
        h.remove()
    assert len(layer._load_state_dict_pre_hooks) == 0
    n = len(calls)
    layer.load_state_dict(sd)
    assert len(calls) == n


def test_a_conv_layers_own_hook_may_produce_a_plain_convs_keys():
    """The plain nn.Conv2d keys (weight, bias) are mapped to conv.* after the layer's pre-hooks."""
    torch.manual_seed(0)
    layer = lora.Conv2d(2, 4, 3, r=2)
    plain = nn.Conv2d(2, 4, 3)

    def legacy(module, state_dict, prefix, *args):
        if prefix + "w" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")
    layer.register_load_state_dict_pre_hook(legacy)
    sd = {"w": plain.weight.detach().clone(), "bias": plain.bias.detach().clone()}
    result = layer.load_state_dict(sd, strict=False)
    assert torch.equal(layer.conv.weight, plain.weight) and torch.equal(layer.conv.bias, plain.bias)
    assert "conv.weight" not in result.missing_keys
