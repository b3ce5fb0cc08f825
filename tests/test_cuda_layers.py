"""lora_ext layers and ops on CUDA tensors (through lora_ext._C), against float64 references.
Runs where there is a GPU (bench/gpu_check.sh); skipped elsewhere."""
import pytest
import torch

import lora_ext
from lora_ext import ops
from conftest import assert_close_rel, dense_delta64

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ops.cuda_kernels_available()),
                                reason="needs a CUDA device and lora_ext built with its CUDA kernels")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYERS = {
    "linear": lambda: lora_ext.Linear(96, 80, r=8, lora_alpha=16),
    "linear_fan": lambda: lora_ext.Linear(96, 80, r=8, fan_in_fan_out=True),
    "merged": lambda: lora_ext.MergedLinear(96, 120, r=4, enable_lora=[True, False, True]),
    "merged_r64": lambda: lora_ext.MergedLinear(96, 192, r=64, enable_lora=[False, True, True]),
    "embedding": lambda: lora_ext.Embedding(77, 40, r=8),
    "conv2d": lambda: lora_ext.Conv2d(6, 8, 3, r=4),
}


def _weight_and_delta(m):
    """The layer's weight and its scaled float64 delta, the delta on the CPU."""
    w, d = _weight_and_delta_on_device(m)
    return w, d.cpu()


def _weight_and_delta_on_device(m):
    if isinstance(m, lora_ext.ConvLoRA):
        w = m.conv.weight
        return w, (m.lora_B.double() @ m.lora_A.double()).view(w.shape) * m.scaling
    if isinstance(m, lora_ext.MergedLinear):
        ids = [i for i, e in enumerate(m.enable_lora) if e]
        d = dense_delta64(m.lora_A, m.lora_B, len(m.enable_lora), ids, m.out_features) * m.scaling
        return m.weight, d.t() if m.fan_in_fan_out else d
    d = (m.lora_B.double() @ m.lora_A.double()) * m.scaling
    transposed = isinstance(m, lora_ext.Embedding) or m.fan_in_fan_out
    return m.weight, d.t() if transposed else d


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_cuda_merge_and_unmerge(kind, dtype):
    m = LAYERS[kind]().cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    w, _ = _weight_and_delta(m)
    with torch.no_grad():
        w.data = w.data.to(dtype)  # low-precision base, fp32 LoRA factors
    base = w.detach().double().cpu()
    _, delta = _weight_and_delta(m)
    version = w._version
    m.eval()
    w, _ = _weight_and_delta(m)
    assert w._version > version
    assert_close_rel(w.cpu(), base + delta, dtype)
    m.train()
    assert_close_rel(w.cpu(), base, dtype, factor=2)


def test_cuda_merge_rejects_bad_input_before_writing():
    w = torch.randn(64, 32, device="cuda")
    w0 = w.clone()
    with pytest.raises(ValueError, match="lora_B"):
        ops.merge_(w, torch.randn(4, 32, device="cuda"), torch.randn(64, 5, device="cuda"), 1.0)
    with pytest.raises(ValueError, match="device"):
        ops.merge_(w, torch.randn(4, 32), torch.randn(64, 4, device="cuda"), 1.0)
    torch.cuda.synchronize()
    assert torch.equal(w, w0)


def test_cuda_merge_on_current_stream():
    w = torch.randn(512, 256, device="cuda")
    A, B = torch.randn(8, 256, device="cuda"), torch.randn(512, 8, device="cuda")
    ref = w.double() + 0.5 * B.double() @ A.double()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.merge_(w, A, B, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    assert_close_rel(w, ref, torch.float32)


@pytest.mark.parametrize("w_dtype,f_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                             (torch.float64, torch.float32)])
def test_cuda_merge_and_delta_take_any_float_factors(w_dtype, f_dtype):
    w = torch.randn(48, 40, device="cuda").to(w_dtype)
    A = torch.randn(6, 40, device="cuda").to(f_dtype)
    B = torch.randn(48, 6, device="cuda").to(f_dtype)
    ref = w.double() + 0.5 * B.double() @ A.double()
    ops.merge_(w, A, B, 0.5)
    assert_close_rel(w, ref, w_dtype, factor=2)
    d = ops.delta_weight(A, B, 0.5, out_features=48, dtype=w_dtype)
    assert_close_rel(d, 0.5 * B.double() @ A.double(), w_dtype, factor=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "linear_fan", "merged", "merged_r64", "embedding", "conv2d"])
@pytest.mark.parametrize("home", ["cuda", "cpu"])
def test_cuda_merged_switch(kind, dtype, home):
    # one swap kernel pass each way (fp32-staged or WMMA by dtype and rank), adapters on the GPU or in host memory
    m = LAYERS[kind]().cuda().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    w, delta1 = _weight_and_delta(m)
    base = w.detach().double().cpu()
    a_shape, b_shape = m.factor_shapes(m.r + 3)
    A2 = (torch.randn(a_shape) * 0.5).to(home, dtype)
    B2 = (torch.randn(b_shape) * 0.5).to(home, dtype)
    m.add_adapter("other", A2, B2, 0.7)
    m.eval()
    m.set_adapter("other")
    w, delta2 = _weight_and_delta(m)
    assert m.lora_A.device.type == "cuda" and m.get_adapter("default")[0].device.type == "cuda"
    assert_close_rel(w.cpu(), base + delta2, dtype, factor=2)
    m.set_adapter("default")
    assert m.get_adapter("other")[0].device.type == home
    assert_close_rel(w.cpu(), base + delta1, dtype, factor=2)
    m.train()
    assert_close_rel(w.cpu(), base, dtype, factor=4)


def test_cuda_switch_refuses_non_finite_values_before_writing():
    m = lora_ext.Linear(64, 48, r=4).cuda()
    with torch.no_grad():
        m.lora_B.normal_()
    A2, B2 = torch.randn(4, 64, device="cuda"), torch.randn(48, 4, device="cuda")
    m.add_adapter("other", A2, B2, 1.0)
    m.eval()
    with torch.no_grad():
        m.get_adapter("other")[1][3, 1] = float("nan")
    w0 = m.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        m.set_adapter("other")
    torch.cuda.synchronize()
    assert torch.equal(m.weight, w0) and m.active_adapter == "default"


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_swap_op_with_factors_of_two_dtypes(w_dtype):
    w = torch.randn(96, 80, device="cuda").to(w_dtype)
    A1, B1 = torch.randn(8, 80, device="cuda"), torch.randn(96, 8, device="cuda")  # fp32
    A2 = torch.randn(24, 80, device="cuda").to(w_dtype)
    B2 = torch.randn(96, 24, device="cuda").to(w_dtype)
    ref = w.double() + 1.5 * B2.double() @ A2.double() - 0.5 * B1.double() @ A1.double()
    ops.swap_(w, A1, B1, 0.5, A2, B2, 1.5)
    assert_close_rel(w, ref, w_dtype, factor=2)
