"""Small findings of the twenty-ninth session's hostile rounds."""
import pytest
import torch

import lora_ext as lora


def test_a_stored_adapter_that_overflows_only_when_cast_says_so():
    """Finite float32 factors past float16's range, behind float16 live factors (layer.half()), were refused as
    holding non-finite values."""
    layer = lora.Linear(4, 4, r=2)
    layer.add_adapter("big", torch.full((2, 4), 1e5), torch.full((4, 2), 1e-4), 1.0)
    layer.half()
    with pytest.raises(ValueError, match=r"stored in torch.float32; cast to the live factors' torch.float16, past its "
                                         r"range\): lora_A holds non-finite"):
        layer.set_adapter("big")
    assert layer.active_adapter == "default"


@pytest.mark.parametrize("kernels", [False, True], ids=["cpu", "simulator"])
def test_a_scale_past_float32_is_refused_before_writing(kernels):
    """A scale finite as a Python float but past float32's range became inf in the kernels: merge_ and swap_ wrote
    a NaN weight, linear NaN outputs, returning normally (swap_ on the CPU too)."""
    import contextlib

    from lora_ext import ops
    sim = pytest.importorskip("lora_ext._sim") if kernels else None
    W, x = torch.randn(8, 16), torch.randn(3, 16)
    A, B = torch.randn(2, 16) * 1e-25, torch.randn(8, 2) * 1e-25
    with torch.no_grad(), (ops.use_kernels(sim, "cpu") if kernels else contextlib.nullcontext()):
        for call in (lambda w: ops.merge_(w, A, B, 1e39), lambda w: ops.unmerge_(w, A, B, -1e39),
                     lambda w: ops.swap_(w, A, B, 1e39, A, B, 0.5), lambda w: ops.swap_(w, A, B, 0.5, A, B, 1e39),
                     lambda w: ops.linear(x, x, w, None, A, B, 1e39)):
            w = W.clone()
            with pytest.raises(ValueError, match="within float32's range"):
                call(w)
            assert torch.equal(w, W)
    layer = lora.Linear(16, 8, r=2)
    with pytest.raises(ValueError, match="within float32's range"):
        layer.add_adapter("big", A, B, 1e39)


@pytest.mark.parametrize("shape", [(4, 0), (0, 4)])
@pytest.mark.parametrize("kernels", [False, True], ids=["cpu", "simulator"])
def test_a_zero_size_16_bit_layer_merges_losslessly(shape, kernels):
    """eval() of a zero-size float16 layer (lossless by default) raised a bare reshape error."""
    import contextlib

    from lora_ext import ops
    sim = pytest.importorskip("lora_ext._sim") if kernels else None
    layer = lora.Linear(*shape, r=2, lora_alpha=2).half()
    with (ops.use_kernels(sim, "cpu") if kernels else contextlib.nullcontext()):
        layer.eval()
        assert layer.merged
        layer.train()
        assert not layer.merged and layer.weight.shape == (shape[1], shape[0])


@pytest.mark.parametrize("frozen_A", [False, True], ids=["both", "lora_fa"])
@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_training_through_a_merge_is_served_after_train_and_eval_again(fullgraph, frozen_A):
    """eval(), compiled steps with a no_grad forward after each, train(), eval(), a compiled step: the step's graph,
    cached for an earlier snapshot, no longer marked the layer trained, so no_grad forwards (compiled or eager)
    served the merge from before the steps (0.9 off) and eval() did not merge them."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = lora.Linear(16, 8, r=4, lora_alpha=8)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    lora.mark_only_lora_as_trainable(layer)
    if frozen_A:  # (LoRA-FA: only B trains; the graph's mark went on A alone)
        layer.lora_A.requires_grad_(False)
    W0, b0 = layer.weight.detach().double().clone(), layer.bias.detach().double().clone()
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=fullgraph)
    opt = torch.optim.SGD([layer.lora_B] if frozen_A else [layer.lora_A, layer.lora_B], lr=0.05)

    def step():
        opt.zero_grad()
        compiled(x).square().mean().backward()
        opt.step()

    # (fullgraph: one merge; after a second, the live factors' versions are read, which dynamo cannot trace)
    ops = (layer.eval, step) if fullgraph else (layer.eval, step, layer.eval, step, layer.train, layer.eval, step,
                                                layer.eval, step)
    for op in ops:
        op()
        want = x.double() @ (W0 + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()).t()
        with torch.no_grad():
            for out in (compiled(x), layer(x)):
                assert ((out.double() - want - b0).abs().max() / want.abs().max()).item() < 1e-5
    torch._dynamo.reset()


def test_layers_freed_between_compiled_training_steps_do_not_break_compiling_the_next():
    """The mark op's key was made while tracing: dynamo guarded the global registry, and a layer freed while the
    next compiled (a sweep building a model per run) failed the guards with a KeyError. (A fresh interpreter: the
    registry's first keys.)"""
    import subprocess
    import sys
    code = """
import torch, lora_ext as lora
x = torch.randn(5, 16)
def run():
    layer = lora.Linear(16, 8, r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B)
    layer.eval()
    torch.compile(layer, backend="aot_eager")(x).square().mean().backward()
    return layer
for _ in range(4):
    layer = run()  # (the layer before dies here, after the next compiled)
    assert layer._trained()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_merged_layer_trains_through_its_merge_under_fullgraph(how):
    """A copy of a merged layer had no mark key (its state drops the original's): its first compiled training
    forward made one through a disabled helper, which fullgraph=True refused (an EMA copy, a torch.load)."""
    import copy
    import pickle
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = lora.Linear(16, 8, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert twin.__dict__.get("_mark_key") not in (None, layer.__dict__.get("_mark_key"))
    x = torch.randn(5, 16)
    torch.compile(twin, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert twin._trained() and not layer._trained()
    torch._dynamo.reset()
