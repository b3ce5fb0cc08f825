"""The custom ops under torch.library.opcheck, and lora_ext layers under torch.compile(fullgraph=True), on the
CPU (the reference backend) and on CUDA (the kernels; marked `gpu`, through the `cuda` fixture, so that
--sim-as-cuda rehearses them on the CPU with lora_ext._sim as the kernels)."""
import pytest
import torch
import torch.nn as nn

import lora_ext
from helpers import assert_close_rel


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return torch.device("cpu") if request.param == "cpu" else request.getfixturevalue("cuda").device


def _merge_samples(device):
    for transposed in (False, True):
        for num_blocks, ids in ((1, [0]), (3, [0, 2])):
            k, nb, r = 10, 4, 3
            shape = (k, num_blocks * nb) if transposed else (num_blocks * nb, k)
            yield (torch.randn(shape, device=device), torch.randn(len(ids) * r, k, device=device),
                   torch.randn(len(ids) * nb, r, device=device), 0.5, num_blocks, ids, transposed)


def test_opcheck_merge(device):
    for args in _merge_samples(device):
        torch.library.opcheck(torch.ops.lora_ext.merge_.default, args)


def test_opcheck_delta_weight(device):
    for w, A, B, s, g, ids, t in _merge_samples(device):
        A.requires_grad_()
        B.requires_grad_()
        torch.library.opcheck(torch.ops.lora_ext.delta_weight.default, (A, B, s, g, ids, t, torch.float32))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear(device, bias):
    for w, A, B, s, g, ids, t in _merge_samples(device):
        k = A.shape[1]
        x = torch.randn(2, 3, k, device=device, requires_grad=True)
        b = torch.randn(w.shape[1] if t else w.shape[0], device=device) if bias else None
        A.requires_grad_()
        B.requires_grad_()
        torch.library.opcheck(torch.ops.lora_ext.linear.default, (x, x, w, b, A, B, s, g, ids, t, None))
        # the scale as a tensor only (what compiled layers pass)
        st = torch.tensor([s], device=device)
        torch.library.opcheck(torch.ops.lora_ext.linear.default, (x, x, w, b, A, B, None, g, ids, t, st))


def test_opcheck_embedding(device):
    w = torch.randn(12, 6, device=device)
    A = torch.randn(3, 12, device=device, requires_grad=True)
    B = torch.randn(6, 3, device=device, requires_grad=True)
    ids = torch.randint(0, 12, (4, 5), device=device)
    for pad in (None, 2):
        torch.library.opcheck(torch.ops.lora_ext.embedding.default, (ids, w, A, B, 0.5, pad, False, False, None))
        st = torch.tensor([0.5], device=device)
        torch.library.opcheck(torch.ops.lora_ext.embedding.default, (ids, w, A, B, None, pad, False, False, st))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = lora_ext.Embedding(50, 16, r=4)
        self.qkv = lora_ext.MergedLinear(16, 48, r=2, enable_lora=[True, False, True])
        self.proj = lora_ext.Linear(48, 16, r=4, fan_in_fan_out=True)
        self.conv = lora_ext.Conv1d(16, 16, 3, r=2, padding=1)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.proj(torch.relu(self.qkv(h)))
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("merged", [False, True])
def test_model_compiles_fullgraph(device, merged):
    torch._dynamo.reset()
    model = Model().to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    if merged:
        model.eval()
    ids = torch.randint(0, 50, (2, 7), device=device)
    want = model(ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(ids)
    assert_close_rel(got, want, torch.float32)
    if not merged:
        got.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model(ids).square().sum().backward()
        assert grads and all(torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-5)
                             for n, p in model.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding", "conv2d"])
def test_fullgraph_compile_survives_switches_between_scalings(kind):
    """A switch to an adapter with another scaling must not break the graph (the traced forward reads the scaling
    from the layer's scale tensor; tests/test_compiled_scaling.py counts the traces)."""
    torch._dynamo.reset()  # each case starts from dynamo's recompile budget, not the previous cases' leftovers
    if kind == "linear":
        layer, x = lora_ext.Linear(16, 8, r=4, lora_alpha=8), torch.randn(3, 16)
    elif kind == "merged":
        layer, x = lora_ext.MergedLinear(16, 12, r=2, enable_lora=[True, False, True]), torch.randn(3, 16)
    elif kind == "embedding":
        layer, x = lora_ext.Embedding(20, 8, r=4), torch.randint(0, 20, (2, 5))
    else:
        layer, x = lora_ext.Conv2d(3, 4, 3, r=2), torch.randn(2, 3, 6, 6)
    layer.requires_grad_(False)
    A, B, _ = layer.get_adapter("default")
    for i, s in enumerate([1.0, 2.5, 3.5, 0.7]):
        layer.add_adapter(f"a{i}", torch.randn_like(A), torch.randn_like(B), s)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for i in range(4):
        layer.set_adapter(f"a{i}")
        assert_close_rel(compiled(x), layer(x), torch.float32)


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_a_switch_between_a_compiled_forward_and_its_backward_keeps_each_forwards_adapter(backend):
    """Two forwards under two adapters (other scalings), one backward over both: each forward's gradients are its own
    adapter's, as in eager (the compiled graph must not save state a switch writes in place)."""
    torch._dynamo.reset()
    layer, x = lora_ext.Linear(16, 8, r=4, lora_alpha=8), torch.randn(3, 16)
    A, B, _ = layer.get_adapter("default")
    with torch.no_grad():
        B.normal_()
    layer.add_adapter("other", torch.randn_like(A), torch.randn_like(B), 3.0)
    grads = {}
    for run in ("eager", "compiled"):
        for name in ("default", "other"):  # fresh trainable pairs: each adapter its own Parameters
            layer.set_adapter(name)
            layer.lora_A.grad = layer.lora_B.grad = None
        f = layer if run == "eager" else torch.compile(layer, backend=backend)
        layer.set_adapter("default")
        y0 = f(x)
        pair0 = (layer.lora_A, layer.lora_B)
        layer.set_adapter("other")
        y1 = f(x)
        pair1 = (layer.lora_A, layer.lora_B)
        (y0.square().sum() + y1.sum()).backward()
        grads[run] = [p.grad.clone() for p in (*pair0, *pair1)]
        for p in (*pair0, *pair1):
            p.grad = None
    for e, c in zip(grads["eager"], grads["compiled"]):
        assert torch.allclose(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
def test_merge_ops_compile_fullgraph(op):
    # the ops' inference-tensor check (is_inference_mode_enabled, which dynamo refuses) broke the graph: fullgraph
    # raised Unsupported
    torch.manual_seed(0)
    w, a, b = torch.randn(12, 10), torch.randn(3, 10), torch.randn(12, 3)
    fn = getattr(lora_ext.ops, op)

    def step(weight):
        fn(weight, a, b, 0.5)
        return weight * 1

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(w.clone())
    want = w.double() + (0.5 if op == "merge_" else -0.5) * b.double() @ a.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
