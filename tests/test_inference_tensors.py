"""Layers whose tensors are inference tensors (built, loaded or converted under torch.inference_mode(), as serving
code does), merged, unmerged and switched outside inference mode: torch lets an inference tensor be written only
inside inference mode, and outside it raises after its kernel wrote a view of one. Before the fix a merge, unmerge
or switch outside inference mode wrote the weight, raised, and left the layer's `merged` flag and active adapter
over a weight that said otherwise (eval() twice: the adapter in the weight twice, served three times). Every
expected value is a float64 computation from the tensors as they were before the write."""
import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import layer_forward64, randomize_, same_bits

# (layer, input): each kind's weight layout (plain, transposed, grouped, conv through its 2-D view, a channels_last
# conv written through a contiguous copy)
KINDS = {
    "linear": (lambda: lora.Linear(12, 10, r=3, lora_alpha=6), lambda g: torch.randn(4, 12, generator=g)),
    "fan_in_fan_out": (lambda: lora.Linear(12, 10, r=3, lora_alpha=6, fan_in_fan_out=True),
                       lambda g: torch.randn(4, 12, generator=g)),
    "merged_linear": (lambda: lora.MergedLinear(12, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                      lambda g: torch.randn(4, 12, generator=g)),
    "embedding": (lambda: lora.Embedding(20, 8, r=3, lora_alpha=6), lambda g: torch.randint(0, 20, (5,), generator=g)),
    "conv2d": (lambda: lora.Conv2d(3, 6, 3, r=2, lora_alpha=4), lambda g: torch.randn(2, 3, 7, 7, generator=g)),
    "conv2d_channels_last": (lambda: lora.Conv2d(3, 6, 3, r=2, lora_alpha=4).to(memory_format=torch.channels_last),
                             lambda g: torch.randn(2, 3, 7, 7, generator=g)),
}


def _built_in_inference_mode(kind, dtype, lossless, seed):
    torch.manual_seed(seed)
    with torch.inference_mode():
        layer = KINDS[kind][0]()
        layer.lossless = lossless
        randomize_(layer.to(dtype), 0.5)
    assert layer._weight_param().is_inference() and layer.lora_A.is_inference()
    return layer


def _params64(layer):
    return {k: v.detach().double() for k, v in layer.named_parameters()}


def _expected(layer, p, x):
    """The layer's output in float64 from the parameters `p` (the base weight and the factors)."""
    return layer_forward64(layer, p, x if not x.is_floating_point() else x.double(), layer.scaling)


def _close(out, ref, dtype):
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 0.15)}[dtype]  # (bf16: outputs of ~10)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def _forward(layer, x, dtype):
    with torch.no_grad():
        return layer(x.to(dtype) if x.is_floating_point() else x)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype,lossless", [(torch.float32, None), (torch.float32, True), (torch.bfloat16, None)],
                         ids=["fp32", "fp32-lossless", "bf16"])
def test_eval_and_train_outside_inference_mode(kind, dtype, lossless):
    layer = _built_in_inference_mode(kind, dtype, lossless, seed=1)
    base = layer._weight_param().detach().clone()
    p = _params64(layer)
    x = KINDS[kind][1](torch.Generator().manual_seed(2))
    ref = _expected(layer, p, x)
    assert not torch.is_inference_mode_enabled()
    for _ in range(2):  # a second eval() merges nothing more
        layer.eval()
        assert layer.merged
        _close(_forward(layer, x, dtype), ref, dtype)
        with torch.inference_mode():
            _close(_forward(layer, x, dtype), ref, dtype)
    # what the weight holds is the merge: the base plus the update, once
    merged = layer._weight_param().detach().double()
    update = (merged - base.double()).abs().max()
    assert 0.1 < update < 10  # (randomize_'s factors: an update of order 1)
    layer.train()
    assert not layer.merged
    w = layer._weight_param().detach()
    if lossless or dtype != torch.float32:  # a lossless merge gives the base back bit for bit
        assert same_bits(w, base)
    else:  # one rounding per write
        torch.testing.assert_close(w, base, rtol=0, atol=2e-6)
    _close(_forward(layer, x, dtype), ref, dtype)  # served on the fly again


@pytest.mark.parametrize("kind", ["linear", "merged_linear", "embedding", "conv2d_channels_last"])
@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_switches_in_and_out_of_inference_mode(kind, inside):
    layer = _built_in_inference_mode(kind, torch.float32, None, seed=3)
    base = layer._weight_param().detach().clone()
    with torch.inference_mode():
        other = {k: torch.randn_like(getattr(layer, k)) * 0.5 for k in ("lora_A", "lora_B")}
        layer.add_adapter("b", other["lora_A"], other["lora_B"], 0.75)
    pa = _params64(layer)
    pb = {**pa, **{k: v.double() for k, v in other.items()}}
    x = KINDS[kind][1](torch.Generator().manual_seed(4))
    ref_a = _expected(layer, pa, x)
    layer.eval()
    ref_b = layer_forward64(layer, pb, x if not x.is_floating_point() else x.double(), 0.75)
    for name, ref, scaling in (("b", ref_b, 0.75), ("default", ref_a, pa and layer.scaling), ("b", ref_b, 0.75)):
        if inside:
            with torch.inference_mode():
                layer.set_adapter(name)
        else:
            layer.set_adapter(name)
        assert layer.active_adapter == name and layer.merged and layer.scaling == scaling
        _close(_forward(layer, x, torch.float32), ref, torch.float32)
    layer.train()
    torch.testing.assert_close(layer._weight_param().detach(), base, rtol=0, atol=4e-6)
    _close(_forward(layer, x, torch.float32), ref_b, torch.float32)


def test_a_merged_model_converted_in_inference_mode_unmerges_outside_it():
    torch.manual_seed(5)
    layer = randomize_(lora.Linear(12, 10, r=3, lora_alpha=6), 0.5)
    base = layer.weight.detach().double().clone()
    p = {**_params64(layer), "weight": base}
    x = torch.randn(4, 12)
    ref = _expected(layer, p, x)
    layer.eval()
    with torch.inference_mode():
        layer.to(torch.float64)
    assert layer.merged and layer.weight.is_inference()
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), base, rtol=0, atol=2e-6)  # (the float32 merge's rounding)
    torch.testing.assert_close(_forward(layer, x, torch.float64), ref, rtol=1e-5, atol=1e-5)


def test_unload_with_merge_outside_inference_mode():
    torch.manual_seed(6)
    with torch.inference_mode():
        model = nn.Sequential(lora.Linear(12, 10, r=3, lora_alpha=6), nn.ReLU(),
                              lora.Linear(10, 7, r=2, lora_alpha=4))
        randomize_(model, 0.5)
    p = [_params64(model[i]) for i in (0, 2)]
    x = torch.randn(4, 12)
    h = torch.relu(_expected(model[0], p[0], x))
    ref = _expected(model[2], p[1], h)
    lora.unload(model, merge=True)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)
