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


def test_a_serving_switch_after_a_forward_in_inference_mode():
    # factors put in place accelerate-style, frozen: the first forward, under inference_mode, made the scale tensor.
    # It was an inference tensor, and a switch outside raised after copying adapter b into the live factors: the
    # layer said 'default' and served b (1.9 off), and default's values were lost
    torch.manual_seed(7)
    layer = randomize_(lora.Linear(6, 5, r=2, lora_alpha=4), 0.5)
    layer._parameters["lora_A"] = nn.Parameter(torch.randn(2, 6) * 0.5)
    layer._parameters["lora_B"] = nn.Parameter(torch.randn(5, 2) * 0.5)
    layer.requires_grad_(False)
    x = torch.randn(3, 6)
    with torch.inference_mode():
        layer(x)
    assert not layer.__dict__["_scaling_t"].is_inference()
    b = (torch.randn(2, 6) * 0.5, torch.randn(5, 2) * 0.5)
    layer.add_adapter("b", *b, 0.25)
    p = _params64(layer)
    ref_default = _expected(layer, p, x)
    layer.set_adapter("b")
    assert layer.active_adapter == "b" and layer.scaling == 0.25
    ref_b = layer_forward64(layer, {**p, "lora_A": b[0].double(), "lora_B": b[1].double()}, x.double(), 0.25)
    _close(_forward(layer, x, torch.float32), ref_b, torch.float32)
    layer.set_adapter("default")
    _close(_forward(layer, x, torch.float32), ref_default, torch.float32)


def test_reloading_an_inactive_adapter_whose_own_pair_is_inference_tensors():
    # built under inference_mode (factors: inference Parameters that require grad), switched away from 'default',
    # which keeps its own pair; reloading it outside wrote lora_A, raised, and kept the old lora_B and scaling
    # (served 6.3 off the reload afterwards)
    layer = _built_in_inference_mode("linear", torch.float32, None, seed=8)
    with torch.inference_mode():
        layer.add_adapter("b", torch.randn(3, 12) * 0.5, torch.randn(10, 3) * 0.5, 0.25)
    base = _params64(layer)["weight"]
    layer.set_adapter("b")
    new = (torch.randn(3, 12), torch.randn(10, 3))
    layer.add_adapter("default", *new, 0.75)
    A, B, s = layer.get_adapter("default")
    assert torch.equal(A.detach(), new[0]) and torch.equal(B.detach(), new[1]) and s == 0.75
    layer.set_adapter("default")
    x = torch.randn(4, 12)
    p = {**_params64(layer), "weight": base, "lora_A": new[0].double(), "lora_B": new[1].double()}
    _close(_forward(layer, x, torch.float32), layer_forward64(layer, p, x.double(), 0.75), torch.float32)


@pytest.mark.parametrize("merge_weights", [False, True], ids=["unmerged", "merged"])
def test_mixed_batches_see_a_reload_of_inference_factors(merge_weights):
    # slots key inference tensors by object and storage (no version counter): lora_ext's own in-place reload of the
    # live factors was not seen, and the batch kept serving the old values (4.5 off)
    torch.manual_seed(9)
    with torch.inference_mode():
        layer = randomize_(lora.Linear(6, 5, r=2, lora_alpha=4, merge_weights=merge_weights), 0.5)
        layer.requires_grad_(False)
        layer.add_adapter("b", torch.randn(2, 6) * 0.5, torch.randn(5, 2) * 0.5, 0.25)
    model = nn.Sequential(layer).eval()
    base = layer.weight.detach().double() - (
        layer.scaling * layer.lora_B.double() @ layer.lora_A.double() if layer.merged else 0)
    x = torch.randn(2, 6)

    def check():
        with torch.no_grad(), lora.batch_adapters(model, ["default", "b"]):
            out = model(x).double()
        for i, name in enumerate(["default", "b"]):
            A, B, s = layer.get_adapter(name)
            ref = x[i].double() @ (base + s * B.double() @ A.double()).T + layer.bias.double()
            torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)

    check()
    layer.add_adapter("default", torch.randn(2, 6), torch.randn(5, 2), 2.0)  # (the same scaling)
    check()
    layer.set_adapter("b")
    check()
    with torch.inference_mode():
        layer.add_adapter("b", torch.randn(2, 6), torch.randn(5, 2), 0.25)
    check()


def test_trainable_tokens_merged_by_unload_on_an_inference_model(tmp_path):
    # unload(merge=True) wrote the rows into the inference embedding, raised, and left its wrapper in place; a
    # retry with merge=False then put back an embedding holding the adapter's rows as the base's
    from peft import LoraConfig, PeftModel, get_peft_model
    from helpers import save_random_peft
    from tiny_models import llama
    path = save_random_peft(get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                               trainable_token_indices=[3, 7, 11])),
                            tmp_path / "a", 1, 0.5, ("trainable_tokens_delta", "lora_"))
    ids = torch.tensor([[1, 3, 7, 11, 2, 3]])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(llama(), path).merge_and_unload()(ids).logits
    with torch.inference_mode():
        model = llama()
        lora.load_peft_adapter(model, path)
    lora.unload(model, merge=True)
    assert type(model.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-4)
    changed = (model.model.embed_tokens.weight != llama().model.embed_tokens.weight).any(1).nonzero().flatten()
    assert changed.tolist() == [3, 7, 11]


def test_reloading_the_active_adapter_of_a_merged_inference_model():
    # the switch from the active adapter to its reload ordered the two pairs through their version counters, which
    # inference tensors lack: refused (before writing) inside inference mode and out
    layer = _built_in_inference_mode("linear", torch.float32, None, seed=10)
    layer.requires_grad_(False)
    base = _params64(layer)["weight"]
    layer.eval()
    x = torch.randn(4, 12)
    for inside in (False, True):
        new = (torch.randn(3, 12), torch.randn(10, 3))
        with torch.inference_mode(inside):
            layer.add_adapter("default", *new, layer.scaling)
        assert layer.merged
        p = {**_params64(layer), "weight": base, "lora_A": new[0].double(), "lora_B": new[1].double()}
        _close(_forward(layer, x, torch.float32), layer_forward64(layer, p, x.double(), layer.scaling), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("model_level", [False, True])
def test_a_switch_after_training_through_the_merge_then_converted_in_inference_mode(dtype, model_level):
    """A layer that trained through its merge (a backward while merged) notes its live factors' version counters
    after each switch; converted for serving under inference_mode, they had none: the switch wrote the weight and the
    factors, then raised torch's error with the layer still named 'default' over b (13.7 off), unbroken."""
    torch.manual_seed(0)
    model = nn.Sequential(*(lora.Linear(16, 16, r=4, lora_alpha=8) for _ in range(2)))
    ads = []
    with torch.no_grad():
        for layer in model:
            randomize_(layer, 0.5)
            layer.add_adapter("b", torch.randn(4, 16) * 0.5, torch.randn(16, 4) * 0.5, 1.5)
            layer.weight.requires_grad_(False)
    model.eval()
    x = torch.randn(5, 16)
    model(x).sum().backward()  # trains through the merge
    with torch.inference_mode():
        model.to(dtype)
    assert model[0].lora_A.is_inference()
    for layer in model:
        ads.append({n: tuple(t.detach().double().clone() if torch.is_tensor(t) else t for t in layer.get_adapter(n))
                    for n in ("default", "b")})
    bases = [layer.state_dict()["weight"].double() for layer in model]
    if model_level:
        lora.set_adapter(model, "b")
    else:
        for layer in model:
            layer.set_adapter("b")
    assert [layer.active_adapter for layer in model] == ["b", "b"]
    h = x.double()
    for layer, base, a in zip(model, bases, ads):
        A, B, s = a["b"]
        h = h @ (base + s * B @ A).T + layer.bias.detach().double()
    model.train()
    model.eval()
    with torch.no_grad():
        y = model(x.to(dtype)).double()
    tol = 0.02 * h.abs().max().item() if dtype == torch.bfloat16 else 1e-9  # (two bf16 layers: a few ulps of 18)
    assert (y - h).abs().max().item() < tol
    for layer, a in zip(model, ads):  # default kept its own values
        assert torch.equal(layer.get_adapter("default")[0].double(), a["default"][0])
