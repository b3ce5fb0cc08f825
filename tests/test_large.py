"""Sizes at the kernels' index and grid limits: a weight of 2^31 elements (64-bit offsets), a Llama-70B MLP
projection at r = 64, and the merge grid's row limit and one past it. The GPU cases need several GiB and the
real hardware; the refusal past the grid limit is a host check, run here through the simulator."""
import pytest
import torch

import lora_ext
from lora_ext import ops
from helpers import requires_sim


def _rows_close(w_new, w_old, delta_rows, rows, dtype):
    """Sampled rows of a merged weight against float64: w_new[i] ~ w_old[i] + delta_rows[i]."""
    for i, ref_delta in zip(rows, delta_rows):
        want = w_old[i].double() + ref_delta
        got = w_new[i].double()
        err = ((got - want).norm() / want.norm()).item()
        bound = 1e-5 if dtype == torch.float32 else 1e-2
        assert err < bound, f"row {i}: relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.hardware
def test_merge_into_a_transposed_bf16_weight_of_2_31_elements():
    k, n, r, s = 32768, 65536, 16, 0.5  # fan_in_fan_out storage: W is (in, out) = 2^31 elements, 4 GiB
    w = torch.empty(k, n, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02)
    A = torch.randn(r, k, device="cuda") * 0.01
    B = torch.randn(n, r, device="cuda") * 0.01
    rows = [0, k // 2 - 1, k - 1]  # the last row holds element 2^31 - 1
    old = {i: w[i].clone() for i in rows}
    ops.merge_(w, A, B, s, transposed=True)
    torch.cuda.synchronize()
    deltas = [s * (B.double() @ A[:, i].double()) for i in rows]
    _rows_close(w, old, deltas, rows, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.hardware
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
def test_llama70b_mlp_projection_at_rank_64(factor_dtype):
    out_f, in_f, r = 28672, 8192, 64
    layer = lora_ext.Linear(in_f, out_f, r=r, lora_alpha=2 * r, bias=False).cuda()
    layer.weight.data = layer.weight.data.bfloat16()
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        layer.lora_A.data = (torch.randn(r, in_f, device="cuda") * 0.01).to(factor_dtype)
        layer.lora_B.data = (torch.randn(out_f, r, device="cuda") * 0.01).to(factor_dtype)
    x = torch.randn(16, in_f, device="cuda", dtype=torch.bfloat16)
    A, B = layer.lora_A.double(), layer.lora_B.double()
    ref = x.double() @ (layer.weight.double() + layer.scaling * B @ A).t()
    y = layer(x)  # unmerged forward
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    rows = [0, out_f // 2, out_f - 1]
    old = {i: layer.weight[i].clone() for i in rows}
    layer.eval()  # merge
    torch.cuda.synchronize()
    _rows_close(layer.weight, old, [layer.scaling * (B[i] @ A) for i in rows], rows, torch.bfloat16)
    layer.train()  # unmerge
    for i in rows:
        assert ((layer.weight[i].double() - old[i].double()).norm() / old[i].double().norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.hardware
def test_merge_at_the_grid_row_limit():
    rows_max = 65535 * 64  # merge tiles are 64 rows; grid.y is at most 65535
    w = torch.randn(rows_max, 8, device="cuda")
    A, B = torch.randn(2, 8, device="cuda"), torch.randn(rows_max, 2, device="cuda")
    sample = [0, rows_max // 2, rows_max - 1]
    old = {i: w[i].clone() for i in sample}
    ops.merge_(w, A, B, 1.0)
    torch.cuda.synchronize()
    _rows_close(w, old, [B[i].double() @ A.double() for i in sample], sample, torch.float32)


@requires_sim
def test_one_row_tile_past_the_grid_limit_is_refused_before_writing(sim_as_cuda):
    rows = 65536 * 64
    w = torch.zeros(rows, 2)
    A, B = torch.randn(1, 2), torch.randn(rows, 1)
    with pytest.raises(ValueError, match="too many"):
        ops.merge_(w, A, B, 1.0)
    assert not w.any()
