"""Findings of the fifteenth session's hostile helpers, each fixed:

- `Embedding.from_pretrained(W)` and `Embedding(..., _weight=W)` drew the table afresh, in the caller's tensor (as
  loralib does): the layer served random rows and W was overwritten. The table is kept now, as nn.Embedding keeps it.
- Layers with a zero-size dimension and r > 0 (Linear(0, n), Linear(n, 0), MergedLinear(0, n), Embedding(n, 0))
  raised torch's bare reshape error in backward (the Embedding in every forward): reshape(-1, 0) of 0 elements.
"""
import pytest
import torch
import torch.nn as nn

import lora_ext as lora


def test_from_pretrained_keeps_the_table_and_the_callers_tensor():
    W = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    keep = W.clone()
    emb = lora.Embedding.from_pretrained(W, padding_idx=1)
    assert torch.equal(W, keep)  # before: drawn afresh in place
    ids = torch.tensor([[0, 2, 5], [1, 3, 4]])
    assert torch.equal(emb(ids), keep[ids])
    assert emb.padding_idx == 1 and not emb.weight.requires_grad  # freeze=True, as nn.Embedding's
    assert torch.equal(lora.Embedding.from_pretrained(keep.clone(), freeze=False).weight, keep)


def test_a_given_weight_is_kept_and_the_factors_start_as_loralibs():
    keep = torch.randn(7, 3, generator=torch.Generator().manual_seed(6))
    emb = lora.Embedding(7, 3, r=2, lora_alpha=4, _weight=keep.clone())
    assert torch.equal(emb.weight, keep)
    assert torch.equal(emb.lora_A, torch.zeros(2, 7))  # loralib's Embedding: A zeros, B normal (a zero update)
    assert emb.lora_B.abs().sum() > 0
    ids = torch.tensor([3, 0, 6])
    assert torch.equal(emb(ids), keep[ids])
    with torch.no_grad():
        emb.lora_A.normal_()
    expect = (keep.double() + emb.scaling * (emb.lora_B.double() @ emb.lora_A.double()).t())[ids]
    assert torch.allclose(emb(ids).double(), expect, rtol=1e-6, atol=1e-6)


def _trainable(layer):
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    return layer


@pytest.mark.parametrize("make, shape", [
    (lambda: lora.Linear(0, 5, r=2), (3, 0)),
    (lambda: lora.Linear(6, 0, r=2), (3, 6)),
    (lambda: lora.Linear(6, 0, r=2, fan_in_fan_out=True), (3, 6)),
    (lambda: lora.MergedLinear(0, 6, r=2, enable_lora=[True, False]), (2, 0)),
    (lambda: lora.MergedLinear(4, 0, r=2, enable_lora=[True, False]), (2, 4)),
], ids=["in0", "out0", "out0_fifo", "merged_in0", "merged_out0"])
def test_zero_width_linear_layers_train(make, shape):
    torch.manual_seed(0)
    layer = _trainable(make())
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    n_out = layer.out_features
    assert out.shape == (shape[0], n_out)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(n_out)
    assert torch.equal(out.detach(), bias.expand(shape[0], n_out))  # nothing to sum: the bias
    out.sum().backward()  # before: RuntimeError cannot reshape tensor of 0 elements into shape [-1, 0]
    assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    for p in (layer.lora_A, layer.lora_B):
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    if n_out:
        assert torch.equal(layer.bias.grad, torch.full((n_out,), float(shape[0])))


def test_a_zero_width_embedding_looks_up_and_trains():
    emb = _trainable(lora.Embedding(10, 0, r=2))
    ids = torch.tensor([[1, 2], [9, 0]])
    out = emb(ids)  # before: the bare reshape error in every forward
    assert out.shape == (2, 2, 0)
    out.sum().backward()
    assert emb.lora_A.grad.shape == (2, 10) and not emb.lora_A.grad.any()
    assert emb.lora_B.grad.shape == (0, 2)
    assert nn.Embedding(10, 0)(ids).shape == out.shape


# -- model-level changes on several threads -------------------------------------------------------------------------

import copy  # noqa: E402
import threading  # noqa: E402

import safetensors.torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import tiny_models  # noqa: E402
from helpers import rel_err, save_random_peft  # noqa: E402
from lora_ext.serving import peft_io  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile15")
    base = tiny_models.llama(seed=4)
    targets = {"a": ["q_proj", "v_proj"], "b": ["q_proj", "v_proj"], "f": ["q_proj", "gate_proj"],
               "h": ["gate_proj", "up_proj"]}
    paths = {n: save_random_peft(get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=t, init_lora_weights=False)), root / n, seed=20 + i, std=0.3)
        for i, (n, t) in enumerate(targets.items())}
    return base, paths


def _alone(base, path, ids):
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, path, "x")
    with torch.no_grad():
        return model(ids).logits


def test_a_save_writes_the_values_it_read_whatever_a_switch_does_next(files, monkeypatch):
    """The file is written after the model's lock is let go; it held the live factors themselves on the CPU, so a
    switch on another thread in between wrote the next adapter into the file (about 1 save in 5 under a switching
    thread)."""
    base, paths = files
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, paths["a"], "a")
    lora.load_peft_adapter(model, paths["b"], "b", activate=False)
    model.eval()
    real = safetensors.torch.save  # (what save_peft_adapter serializes with, after the lock is let go)

    def switch_then_save(tensors, *args, **kwargs):
        t = threading.Thread(target=lora.set_adapter, args=(model, "b"))
        t.start()
        t.join()
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save", switch_then_save)
    out = paths["a"] + "_saved"
    lora.save_peft_adapter(model, out)
    monkeypatch.setattr(safetensors.torch, "save", real)
    assert lora.active_adapter(model) == "b"
    saved = safetensors.torch.load_file(out + "/adapter_model.safetensors")
    given = safetensors.torch.load_file(paths["a"] + "/adapter_model.safetensors")
    assert set(saved) == set(given)
    assert all(torch.equal(saved[k], given[k]) for k in given)  # before: b's factors under a's keys


def test_two_loads_injecting_the_same_module_on_two_threads_both_land(files, monkeypatch):
    """Each load plans which modules are new before it writes: the second one's plan, made while the first was
    planning, replaced the first's new layer (its factors gone) with no error."""
    base, paths = files
    ids = tiny_models.tokens()
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, paths["a"], "a")
    real, started = peft_io._to_layer_layout, []

    def layout(*args, **kwargs):  # the first load's planning: the second load starts on another thread now
        if not started:
            started.append(threading.Thread(target=lora.load_peft_adapter, args=(model, paths["h"], "h"),
                                            kwargs={"activate": False}))
            started[0].start()
            started[0].join(timeout=2)  # (before the fix it ran through in this window)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_io, "_to_layer_layout", layout)
    lora.load_peft_adapter(model, paths["f"], "f", activate=False)
    started[0].join(timeout=120)
    assert not started[0].is_alive()
    monkeypatch.setattr(peft_io, "_to_layer_layout", real)
    assert sorted(lora.adapter_names(model)) == ["a", "f", "h"]
    for name in ("f", "h"):
        lora.set_adapter(model, name)
        with torch.no_grad():
            out = model(ids).logits
        assert rel_err(out, _alone(base, paths[name], ids)) < 1e-5, name


def test_a_delete_during_a_hotswap_is_not_undone(files, monkeypatch):
    base, paths = files
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, paths["a"], "a")
    lora.load_peft_adapter(model, paths["b"], "hs", activate=False)
    real, threads = peft_io._check_hotswap, []

    def checked(*args, **kwargs):
        result = real(*args, **kwargs)
        threads.append(threading.Thread(target=lora.delete_adapter, args=(model, "hs")))
        threads[0].start()
        threads[0].join(timeout=2)  # (before the fix the delete ran here, then the swap put the adapter back)
        return result

    monkeypatch.setattr(peft_io, "_check_hotswap", checked)
    lora.hotswap_adapter(model, paths["a"], "hs")
    threads[0].join(timeout=120)
    assert not threads[0].is_alive()
    assert lora.adapter_names(model) == ["a"]  # the delete came second: deleted


def test_a_load_through_a_compile_wrapper_goes_into_the_model(files):
    """torch.compile's wrapper names the modules "_orig_mod.…": the load was refused as selecting none of the file's
    modules (blaming target_modules); it goes into the model inside now, as save_peft_adapter reads through it."""
    base, paths = files
    ids = tiny_models.tokens()
    model = copy.deepcopy(base)
    compiled = torch.compile(model)
    lora.load_peft_adapter(compiled, paths["a"], "a")
    # the wrapper given to the load got the model's lock (and its hooks: its forwards wait for switches' writes)
    assert compiled.__dict__.get("_lora_ext_model_lock") is lora.serving.adapters.model_lock(model)
    lora.hotswap_adapter(compiled, paths["b"], "a")  # (through the same wrapper)
    assert lora.adapter_names(model) == ["a"]
    with torch.no_grad():
        out = model(ids).logits
    assert rel_err(out, _alone(base, paths["b"], ids)) < 1e-5


def test_a_compiled_wrapper_and_its_model_share_one_lock(files):
    """A wrapper's forwards (a torch.compile wrapper's hooks run eagerly, around the compiled forward) and changes
    through the model are ordered: a switch of the model waits for a forward through the wrapper (before: each object
    had a lock of its own, and the switch went through in the middle of that forward)."""
    base, paths = files
    ids = tiny_models.tokens()
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, paths["a"], "a")
    lora.load_peft_adapter(model, paths["b"], "b", activate=False)
    compiled = torch.compile(model, backend="eager")
    lora.set_adapter(compiled, "a")  # (the wrapper given to lora_ext: it gets the lock's hooks)
    assert lora.serving.adapters.model_lock(compiled) is lora.serving.adapters.model_lock(model)
    inside, go, outs = threading.Event(), threading.Event(), []

    def pause(module, args):  # after the lock's own pre-hook: the forward holds its read here
        inside.set()
        assert go.wait(60)

    handle = compiled.register_forward_pre_hook(pause)
    forward = threading.Thread(target=lambda: outs.append(compiled(ids).logits.detach()))
    forward.start()
    assert inside.wait(60)
    handle.remove()
    switch = threading.Thread(target=lora.set_adapter, args=(model, "b"))
    switch.start()
    switch.join(timeout=1.0)
    waited = switch.is_alive()
    go.set()
    forward.join(timeout=60)
    switch.join(timeout=60)
    assert waited  # before: the switch ran inside the wrapper's forward
    assert rel_err(outs[0], _alone(base, paths["a"], ids)) < 1e-5
    assert lora.active_adapter(model) == "b"
