"""Captured CUDA graphs and adapter switches: a serving switch between adapters of the same shapes writes
into the storage a captured forward reads (factors, scale and, when merged, the weight), so a replay after
`set_adapter` serves the new adapter without a new capture."""
import copy
import pickle

import pytest
import torch

import lora_ext
from helpers import dense_delta64, rel_err


def _layer(kind, device="cuda"):
    if kind == "linear":
        layer, x = lora_ext.Linear(256, 192, r=8, lora_alpha=16), torch.randn(4, 256)
    elif kind == "merged":
        layer = lora_ext.MergedLinear(256, 192, r=4, lora_alpha=8, enable_lora=[True, False, True])
        x = torch.randn(4, 256)
    else:
        layer, x = lora_ext.Embedding(100, 64, r=4, lora_alpha=8), torch.randint(0, 100, (4, 7))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return layer.to(device).requires_grad_(False), x.to(device)


@pytest.mark.gpu
@pytest.mark.hardware
@pytest.mark.parametrize("kind", ["linear", "merged", "embedding"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_replay_after_a_same_shape_switch_serves_the_new_adapter(kind, merged):
    layer, x = _layer(kind)
    A, B, _ = layer.get_adapter("default")
    layer.add_adapter("other", torch.randn_like(A), torch.randn_like(B), 3.0)  # another scaling too
    layer.train(not merged)
    expected = {}
    for name in ("other", "default"):
        layer.set_adapter(name)
        expected[name] = layer(x).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, as torch's documentation asks
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for name in ("other", "default", "other"):
        layer.set_adapter(name)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out, expected[name], rtol=1e-5, atol=1e-5), f"replay after switching to {name!r}"


@pytest.mark.gpu
@pytest.mark.hardware
def test_new_memory_first_seen_in_a_capture_is_refused():
    # a merged layer compares new memory under its weight Parameter with its merge (tests/test_new_memory.py), which
    # syncs: inside a capture it refuses, naming the layer, instead of breaking the capture; once looked at outside,
    # the capture works and replays the merged values
    layer, x = _layer("linear")
    layer.eval()
    want = layer(x).clone()
    layer.weight.data = layer.weight.data.clone()  # the merged values, in new memory not looked at yet
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"Linear\(256, 192\).*being captured"):
        with torch.cuda.graph(graph, stream=s):
            layer(x)
    torch.cuda.synchronize()
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5) and layer.merged  # looked at: the merge kept
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding"])
def test_forward_kernels_read_the_layers_scale_tensor(kind, sim_as_cuda):
    """Through the simulator: the unmerged forward's kernels read the scale from the layer's scale tensor
    (what a graph replay reads), and a switch updates that tensor in place."""
    layer, x = _layer(kind, "cpu")
    base = layer.weight_2d().detach().double().clone()
    A, B, s = layer.get_adapter("default")

    def expected(A, B, s):
        if kind == "merged":
            delta = s * dense_delta64(A, B, 3, [0, 2], 192)
        else:
            delta = s * B.double() @ A.double()
        w = base + (delta.t() if kind == "embedding" else delta)
        if kind == "embedding":
            return w[x]
        return x.double() @ w.t() + layer.bias.double()

    t = layer._scaling_t
    assert t.dtype == torch.float32 and t.item() == torch.tensor(s, dtype=torch.float32).item()
    y = layer(x)
    assert rel_err(y, expected(A, B, s)) < 1e-5
    t.fill_(2 * s)  # the kernels read the tensor, not the float
    assert rel_err(layer(x), expected(A, B, 2 * s)) < 1e-5
    t.fill_(s)
    A2, B2 = torch.randn_like(A), torch.randn_like(B)
    layer.add_adapter("other", A2, B2, 3.0)
    ptr = t.data_ptr()
    layer.set_adapter("other")
    assert layer._scaling_t.data_ptr() == ptr and layer._scaling_t.item() == 3.0
    assert rel_err(layer(x), expected(A2, B2, 3.0)) < 1e-5


def test_scale_tensor_stays_float32_and_follows_the_factors():
    layer = lora_ext.Linear(16, 8, r=4, lora_alpha=6)
    layer.to(torch.bfloat16)
    assert layer._scaling_t.dtype == torch.float32 and layer._scaling_t.item() == 1.5
    layer.scaling = 0.25
    assert layer._scaling_t.item() == 0.25
    copied = copy.deepcopy(layer)
    assert copied._scaling_t.item() == 0.25 and copied._scaling_t.data_ptr() != layer._scaling_t.data_ptr()
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.scaling == 0.25 and restored._scaling_t.item() == 0.25
    assert "_scaling_t" not in layer.state_dict() and "scaling" not in dict(layer.named_buffers())
