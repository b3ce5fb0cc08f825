"""An error after a write succeeded, before the layer's bookkeeping said so (out of memory allocating a merge's sample
or a switch's scale tensor, a device error copying the live factors): the op itself put nothing back, the error did
not say the weight was written, and the layer went on with flags over a weight that said otherwise. Found by a fault
injection sweep: eval() left merged=False over a merged weight (the next forward added the adapter twice, 6.5 off),
train() left merged=True over the base, a switch served adapter b under the name 'default' (16.4 off) and lost
default's values. Now such a layer is broken: it refuses forwards, merges, switches and state_dict, naming the error,
until load_state_dict brings its weight again. Expected values are float64 computations from the layer's tensors
before the operation."""
import pytest
import torch

import lora_ext as lora
from lora_ext import layers, named_adapters

IN, OUT, R = 16, 12, 4


def _layer(dtype, trainable=False, merge_weights=True):
    torch.manual_seed(0)
    layer = lora.Linear(IN, OUT, r=R, lora_alpha=8, merge_weights=merge_weights).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    layer.add_adapter("b", torch.randn(R, IN) * 0.5, torch.randn(OUT, R) * 0.5, 1.5)
    layer.requires_grad_(trainable)
    return layer


def _clean_state(layer):
    """The layer's state (base weight, bias, active adapter's factors) as state_dict gives it now."""
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _failing_once(real, exc, at=1):
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise exc
        return real(*args, **kwargs)
    return failing


def _fail_once(monkeypatch, owner, name, exc, at=1):
    """owner.name raises `exc` at its `at`-th call (until monkeypatch.undo())."""
    monkeypatch.setattr(owner, name, _failing_once(getattr(owner, name), exc, at))


def _expect_broken(layer, x, what, factors=False):
    """Refusals of a broken layer (factors: its live factors unknown too, after a failed switch: switches refused
    as well; a layer whose weight alone is unknown switches unmerged, writing nothing)."""
    calls = [lambda: layer(x), layer.merge, layer.state_dict] + ([lambda: layer.set_adapter("b")] if factors else [])
    for call in calls + ([layer.eval] if layer.merge_weights else []):  # (eval() without merges writes nothing)
        with pytest.raises(RuntimeError, match=rf"Linear\({IN}, {OUT}\): {what}"):
            call()
    assert not layer.merged


def _recovers(layer, state, x, dtype):
    """load_state_dict with a clean state: the layer serves it again (float64 reference), and merges it."""
    layer.load_state_dict(state)
    w, bias, a, b = (state[k].double() for k in ("weight", "bias", "lora_A", "lora_B"))
    want = x.double() @ (w + layer.scaling * b @ a).T + bias
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x.to(dtype)).double(), want, **tol)
        layer.eval()
        assert layer.merged == layer.merge_weights
        torch.testing.assert_close(layer(x.to(dtype)).double(), want, **tol)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("step", ["_note_written", "_set_merged"])
def test_a_merge_whose_bookkeeping_fails_leaves_the_layer_refusing(monkeypatch, dtype, step):
    layer = _layer(dtype)
    state = _clean_state(layer)
    x = torch.randn(3, IN)
    _fail_once(monkeypatch, layers.LoRALayer, step, RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="out of memory") as err:
        layer.eval()
    monkeypatch.undo()
    assert any("a merge wrote its weight, then failed" in n for n in err.value.__notes__)
    _expect_broken(layer, x.to(dtype), "a merge wrote its weight, then failed before its bookkeeping said so")
    _recovers(layer, state, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_an_unmerge_whose_bookkeeping_fails_leaves_the_layer_refusing(monkeypatch, dtype):
    layer = _layer(dtype)
    state = _clean_state(layer)
    x = torch.randn(3, IN)
    layer.eval()
    _fail_once(monkeypatch, layers.LoRALayer, "_set_merged", RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        layer.train()
    monkeypatch.undo()
    _expect_broken(layer, x.to(dtype), "an unmerge wrote its weight")
    _recovers(layer, state, x, dtype)


def test_a_dtype_change_whose_merge_bookkeeping_fails_leaves_the_layer_refusing(monkeypatch):
    layer = _layer(torch.float32)
    x = torch.randn(3, IN)
    layer.eval()
    # the second _set_merged: after the merge into the bfloat16 weight (the first forgets the float32 merge)
    _fail_once(monkeypatch, layers.LoRALayer, "_set_merged", RuntimeError("injected"), at=2)
    with pytest.raises(RuntimeError, match="injected"):
        layer.to(torch.bfloat16)
    monkeypatch.undo()
    _expect_broken(layer, x.bfloat16(), "a move or dtype change wrote its weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("trainable", [False, True], ids=["serving", "trainable"])
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_a_switch_that_fails_after_it_began_writing_leaves_the_layer_refusing(monkeypatch, dtype, trainable, merged):
    # serving factors: a device error right after the new values were copied into the live factors; trainable ones:
    # out of memory making the new Parameters' scale tensor (a trainable switch registers the adapter's own pair)
    layer = _layer(dtype, trainable=trainable, merge_weights=merged)
    x = torch.randn(3, IN)
    layer.eval()
    state = _clean_state(layer)
    if trainable:
        _fail_once(monkeypatch, named_adapters.torch, "full", RuntimeError("CUDA out of memory"))
    else:
        _fail_switch_copy(monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory|illegal memory access"):
        layer.set_adapter("b")
    monkeypatch.undo()
    _expect_broken(layer, x.to(dtype), r"switching to \(or reloading\) adapter 'b' failed part way", factors=True)
    _recovers(layer, state, x, dtype)


def test_a_model_switch_whose_layer_fails_part_way_refuses_rather_than_serve_the_other_adapter(monkeypatch):
    torch.manual_seed(1)
    model = torch.nn.Sequential(*(lora.Linear(IN, IN, r=R, lora_alpha=8) for _ in range(3)))
    for m in model:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        m.add_adapter("b", torch.randn(R, IN) * 0.3, torch.randn(IN, R) * 0.3, 1.5)
        m.requires_grad_(False)
    model.eval()
    x = torch.randn(2, IN)
    _fail_switch_copy(monkeypatch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        lora.set_adapter(model, "b")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"switching to \(or reloading\) adapter 'b' failed part way"):
        model(x)


def _fail_switch_copy(monkeypatch):
    _fail_once(monkeypatch, named_adapters.NamedAdapters, "_inference_values_written",
               RuntimeError("CUDA error: an illegal memory access"))


def test_a_failed_switch_stays_broken_until_the_factors_are_loaded_too(monkeypatch):
    # loading the weight alone made the layer sound again, serving b's factors at default's scaling as 'default'
    layer = _layer(torch.float32)
    layer.eval()
    state = _clean_state(layer)
    x = torch.randn(3, IN)
    _fail_switch_copy(monkeypatch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        layer.set_adapter("b")
    monkeypatch.undo()
    layer.load_state_dict({k: state[k] for k in ("weight", "bias")}, strict=False)
    _expect_broken(layer, x, r"switching to \(or reloading\) adapter 'b' failed part way", factors=True)
    _recovers(layer, state, x, torch.float32)


@pytest.mark.parametrize("merge_weights", [True, False], ids=["merged", "unmerged"])
def test_a_failed_trainable_switch_leaves_the_other_adapter_its_values(monkeypatch, merge_weights):
    # b's own Parameter pair was live when the switch failed: the load that recovers the layer wrote default's values
    # into b's Parameters, and set_adapter('b') served default's factors at b's scaling (7.65 off b)
    layer = _layer(torch.float32, trainable=True, merge_weights=merge_weights)
    b = tuple(t.detach().clone() for t in layer.get_adapter("b")[:2])
    layer.set_adapter("b")
    layer.set_adapter("default")  # (b has its own Parameter pair now)
    layer.eval()
    state = _clean_state(layer)
    x = torch.randn(3, IN)
    # (b's pair has its scale tensor already: the failure is its fill, a device error)
    _fail_once(monkeypatch, named_adapters.NamedAdapters, "_sync_scale_tensor",
               RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        layer.set_adapter("b")
    monkeypatch.undo()
    assert layer._broken is not None
    _recovers(layer, state, x, torch.float32)
    layer.set_adapter("b")
    want = x.double() @ (state["weight"].double() + 1.5 * b[1].double() @ b[0].double()).T + state["bias"].double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_a_broken_layer_of_inference_tensors_recovers_by_a_load_in_inference_mode(monkeypatch):
    # the load recorded the weight's version counter, which inference tensors lack: no load could recover it
    with torch.inference_mode():
        layer = _layer(torch.float32)
    state = {k: v.clone() for k, v in _clean_state(layer).items()}
    x = torch.randn(3, IN)
    _fail_once(monkeypatch, layers.LoRALayer, "_set_merged", RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        layer.eval()
    monkeypatch.undo()
    _expect_broken(layer, x, "a merge wrote its weight")
    with torch.inference_mode():
        layer.load_state_dict(state)
        w, bias, a, b = (state[k].double() for k in ("weight", "bias", "lora_A", "lora_B"))
        torch.testing.assert_close(layer(x).double(), x.double() @ (w + layer.scaling * b @ a).T + bias,
                                   rtol=1e-5, atol=1e-5)


def test_a_switch_of_a_layer_whose_lora_b_alone_is_an_inference_tensor():
    layer = _layer(torch.float32)
    with torch.inference_mode():
        layer.lora_B = torch.nn.Parameter(torch.randn(OUT, R) * 0.5, requires_grad=False)
    layer.eval()
    state = _clean_state(layer)
    a, b, s = (t.double() if isinstance(t, torch.Tensor) else t for t in layer.get_adapter("b"))
    layer.set_adapter("b")
    x = torch.randn(3, IN)
    want = x.double() @ (state["weight"].double() + s * b @ a).T + state["bias"].double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
