"""Replacing an adapter's values keeps the adapter's own Parameters, as peft's load writes into them: a reload of a
trained adapter (load_peft_adapter into its name, layer.add_adapter) goes on training through the optimizer built
before it, active or inactive; a reload that is refused leaves the same Parameters with their old values; a rank
change of the active, trainable adapter gives new Parameters with a warning."""
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_ext as lora
import tiny_models
from helpers import same_bits, save_random_peft

TARGETS = ["q_proj", "v_proj"]


def saved_adapter(path, seed, r=4, std=0.3):
    pm = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS))
    return save_random_peft(pm, path, seed, std=std)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora.LoRALayer)]


def file_factors(path, name):
    """(A, B) of module `name` in the peft file at `path`, read with safetensors (peft's layout is loralib's)."""
    tensors = load_file(f"{path}/adapter_model.safetensors")
    return tuple(tensors[f"base_model.model.{name}.lora_{k}.weight"] for k in "AB")


def sgd_step(model, params):
    opt = torch.optim.SGD(params, lr=1.0)
    ids = tiny_models.tokens()
    model(ids).logits.square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_a_reload_of_the_active_trained_adapter_trains_on(tmp_path):
    first, second = saved_adapter(tmp_path / "a", 1), saved_adapter(tmp_path / "b", 2)
    model = tiny_models.llama().train()
    lora.load_peft_adapter(model, first, is_trainable=True)
    live = [(m.lora_A, m.lora_B) for _, m in lora_layers(model)]
    params = [p for pair in live for p in pair]
    lora.load_peft_adapter(model, second, is_trainable=True)  # into "default", the active adapter
    for (name, m), (A, B) in zip(lora_layers(model), live):
        assert m.lora_A is A and m.lora_B is B, name
        fA, fB = file_factors(second, name)
        assert same_bits(A.detach(), fA) and same_bits(B.detach(), fB), name
    sgd_step(model, params)  # the optimizer built before the reload trains what the model computes with
    for (name, m), (A, B) in zip(lora_layers(model), live):
        assert not torch.equal(m.lora_B.detach(), file_factors(second, name)[1]), name


def test_a_reload_of_an_inactive_trained_adapter_trains_on_after_the_switch(tmp_path):
    first, second = saved_adapter(tmp_path / "a", 1), saved_adapter(tmp_path / "b", 2)
    model = tiny_models.llama().train()
    lora.load_peft_adapter(model, first, adapter_name="x", is_trainable=True)
    lora.load_peft_adapter(model, first, adapter_name="y", is_trainable=True)
    lora.set_adapter(model, "x")
    own = {name: (m.lora_A, m.lora_B) for name, m in lora_layers(model)}
    lora.set_adapter(model, "y")  # x's own Parameters wait, inactive
    lora.load_peft_adapter(model, second, adapter_name="x", is_trainable=True)
    lora.set_adapter(model, "x")
    for name, m in lora_layers(model):
        assert m.lora_A is own[name][0] and m.lora_B is own[name][1], name
        fA, fB = file_factors(second, name)
        assert same_bits(m.lora_A.detach(), fA) and same_bits(m.lora_B.detach(), fB), name
    sgd_step(model, [p for pair in own.values() for p in pair])
    for name, m in lora_layers(model):
        assert not torch.equal(m.lora_B.detach(), file_factors(second, name)[1]), name


def test_a_refused_reload_leaves_the_same_parameters_and_values(tmp_path):
    first = saved_adapter(tmp_path / "a", 1, std=0.01)
    second = saved_adapter(tmp_path / "b", 2, std=0.01)
    tensors = load_file(f"{second}/adapter_model.safetensors")
    keys = [f"base_model.model.model.layers.{i}.self_attn.{t}.lora_B.weight" for i in range(2) for t in TARGETS]
    tensors[keys[-1]] = tensors[keys[-1]] * 1000  # |s B A| far above |W|: the last layer's lossless switch refuses
    save_file(tensors, f"{second}/adapter_model.safetensors", metadata={"format": "pt"})
    model = tiny_models.llama().half()
    lora.load_peft_adapter(model, first, is_trainable=True)
    model.eval()  # merged (lossless, float16), the factors still trainable
    layers = lora_layers(model)
    assert [f"base_model.model.{name}.lora_B.weight" for name, _ in layers] == keys
    assert all(m.merged for _, m in layers)
    live = [(m.lora_A, m.lora_B, m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.weight.detach().clone())
            for _, m in layers]
    with pytest.raises(lora.lossless.ExceptionOverflow, match="lossless"):
        lora.load_peft_adapter(model, second, is_trainable=True)  # the others written, then put back
    for (name, m), (A, B, a, b, w) in zip(layers, live):
        assert m.lora_A is A and m.lora_B is B, name
        assert same_bits(A.detach(), a) and same_bits(B.detach(), b), name
        assert same_bits(m.weight.detach(), w), name


def test_add_adapter_of_the_active_trainable_adapter():
    layer = lora.Linear(8, 6, r=2, lora_alpha=4)
    A, B = layer.lora_A, layer.lora_B
    new_A, new_B = torch.randn(2, 8), torch.randn(6, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.add_adapter("default", new_A, new_B, 0.5)  # same rank: in place, no warning
    assert layer.lora_A is A and layer.lora_B is B
    assert same_bits(A.detach(), new_A) and same_bits(B.detach(), new_B) and layer.scaling == 0.5
    with pytest.warns(UserWarning, match=r"new lora_A/lora_B Parameter objects \(its rank changed from 2 to 3\)"):
        layer.add_adapter("default", torch.randn(3, 8), torch.randn(6, 3), 0.5)
    assert layer.lora_A is not A and layer.lora_A.shape == (3, 8) and layer.lora_A.requires_grad
    frozen = lora.Linear(8, 6, r=2, lora_alpha=4)
    frozen.lora_A.requires_grad_(False)
    frozen.lora_B.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # serving factors: nothing trains them, no warning
        frozen.add_adapter("default", torch.randn(3, 8), torch.randn(6, 3), 0.5)
    assert frozen.r == 3


def _inactive_trained(dtype=torch.float32):
    """A Linear whose adapter "b" trained (its own Parameters) and waits inactive, and b's values then."""
    layer = lora.Linear(8, 6, r=2, lora_alpha=4).to(dtype)
    A, B = torch.randn(2, 8, dtype=dtype), torch.randn(6, 2, dtype=dtype)
    layer.add_adapter("b", A, B, 1.0)
    layer.set_adapter("b")  # trainable: b's own Parameters are live
    return layer, A, B


def test_an_inactive_reload_writes_its_scaling_where_a_held_program_reads_it():
    layer, A0, B0 = _inactive_trained()
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit.trace's own warnings)
        program = torch.jit.trace(layer, x, check_trace=False)  # holds b's pair and its scale tensor
    layer.set_adapter("default")
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    layer.add_adapter("b", A, B, 3.0)
    x64 = x.double()
    want = x64 @ layer.weight.detach().double().t() + layer.bias.detach().double() \
        + 3.0 * (x64 @ A.double().t()) @ B.double().t()
    assert torch.allclose(program(x).double(), want, atol=1e-5, rtol=1e-5)  # b whole: its new values and scaling


def test_an_inactive_reload_in_another_dtype_keeps_its_values_and_warns():
    layer, _, _ = _inactive_trained(torch.float16)
    layer.set_adapter("default")
    layer.float()  # the live factors float32; b's own float16 Parameters wait where they are
    own = layer.get_adapter("b")[0]
    A = torch.randn(2, 8) / 3
    A[0, 0] = 1e5  # over float16's range: written into b's float16 Parameters it would be inf
    B = torch.randn(6, 2) * 1e-3
    with pytest.warns(UserWarning, match=r"adapter 'b' factors of another dtype than its own Parameters"):
        layer.add_adapter("b", A, B, 1.0)
    assert layer.get_adapter("b")[0] is not own
    layer.set_adapter("b")
    assert same_bits(layer.lora_A.detach(), A) and same_bits(layer.lora_B.detach(), B)


def test_an_inactive_rank_change_warns():
    layer, _, _ = _inactive_trained()
    layer.set_adapter("default")
    with pytest.warns(UserWarning, match=r"adapter 'b' factors of another rank than its own Parameters"):
        layer.add_adapter("b", torch.randn(3, 8), torch.randn(6, 3), 1.0)
    layer.set_adapter("b")
    assert layer.r == 3


def test_a_reserved_layer_keeps_an_inactive_adapters_own_rank():
    """(A name clash in the first form of the in-place write stored a bool as the adapter's own rank.)"""
    layer = lora.Linear(8, 6, r=4, lora_alpha=4)
    layer._reserve(4)
    A, B = torch.randn(3, 8), torch.randn(6, 3)
    A[2], B[:, 2] = 0.0, 0.0  # its third rank holds zeros: only the recorded own rank says it is rank 3
    layer.add_adapter("b", A, B, 1.0)
    own_A, own_B = layer.own_factors("b")
    assert own_A.shape == (3, 8) and own_B.shape == (6, 3)
    assert same_bits(own_A, A) and same_bits(own_B, B)
