"""The CPU (reference) forward of an unmerged float16/bfloat16 layer with float32 factors (the layers' default, and
what load_peft_adapter keeps, as peft does): the low-rank term is computed in float32 and rounded once, as the CUDA
kernels' FMA paths and the mixed batches compute it. It was computed in the activations' dtype, x A^T rounded to 16
bits: with large factors whose update is small (an add_weighted_adapter 'cat' of adapters that nearly cancel) the
output was 8-9 ulps off a float64 reference, 20 times peft's error. Expected values: plain torch in float64."""
import pytest
import torch

import lora_ext as lora

HALF = [torch.float16, torch.bfloat16]


def _cancelling(r, k, d, g):
    """Factors of magnitude 1 whose product nearly cancels: [X; X] and [Y, -0.999 Y]."""
    A = torch.randn(r // 2, k, generator=g).repeat(2, 1)
    Y = torch.randn(d, r // 2, generator=g)
    return A, torch.cat([Y, -0.999 * Y], 1)


def _ulps(y, ref, dtype):
    return ((y.double() - ref).abs().max() / (torch.finfo(dtype).eps * ref.abs().max())).item()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear(dtype, fan_in_fan_out):
    g = torch.Generator().manual_seed(1)
    layer = lora.Linear(32, 24, r=64, lora_alpha=32, fan_in_fan_out=fan_in_fan_out, merge_weights=False)
    A, B = _cancelling(64, 32, 24, g)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(24, generator=g) * 0.1)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.weight.data = layer.weight.data.to(dtype)
    layer.bias.data = layer.bias.data.to(dtype)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(5, 32, generator=g).to(dtype)
    w = layer.weight.double().T if fan_in_fan_out else layer.weight.double()
    ref = x.double() @ w.T + layer.bias.double() + 0.5 * (x.double() @ A.double().T) @ B.double().T
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    assert _ulps(y, ref, dtype) < 2.0


@pytest.mark.parametrize("dtype", HALF)
def test_merged_linear(dtype):
    g = torch.Generator().manual_seed(2)
    layer = lora.MergedLinear(32, 48, r=32, lora_alpha=16, enable_lora=[True, False, True], merge_weights=False)
    A0, B0 = _cancelling(32, 32, 16, g)
    A1, B1 = _cancelling(32, 32, 16, g)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
        layer.lora_A.copy_(torch.cat([A0, A1]))
        layer.lora_B.copy_(torch.cat([B0, B1]))
    layer.weight.data = layer.weight.data.to(dtype)
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(3, 32, generator=g).to(dtype)
    ref = x.double() @ layer.weight.double().T + layer.bias.double()
    for e, (A, B) in zip((0, 2), ((A0, B0), (A1, B1))):
        ref[:, e * 16:(e + 1) * 16] += 0.5 * (x.double() @ A.double().T) @ B.double().T
    with torch.no_grad():
        y = layer(x)
    assert _ulps(y, ref, dtype) < 2.0


@pytest.mark.parametrize("dtype", HALF)
def test_embedding(dtype):
    g = torch.Generator().manual_seed(3)
    layer = lora.Embedding(20, 16, r=64, lora_alpha=32, merge_weights=False)
    At, B = _cancelling(64, 20, 16, g)  # A is (r, num_embeddings)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
        layer.lora_A.copy_(At)
        layer.lora_B.copy_(B)
    layer.weight.data = layer.weight.data.to(dtype)
    ids = torch.randint(0, 20, (2, 7), generator=g)
    ref = layer.weight.double()[ids] + 0.5 * (At.double().T[ids] @ B.double().T)
    with torch.no_grad():
        y = layer(ids)
    assert y.dtype == dtype
    assert _ulps(y, ref, dtype) < 2.0
