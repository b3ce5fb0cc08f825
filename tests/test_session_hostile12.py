"""A hostile pass of 2026-12-02 (tenth session): each test failed before its fix.

- A non-finite value (inf, -inf, NaN) written into a merged weight with a lossless record (float16/bfloat16 by
  default, float32 with lossless=True) on an element whose record holds a code, not its bits (a diverged optimizer
  step, a masked fill): unmerge, state_dict and a switch gave NaN or the largest finite value there (the code's
  one step from inf's ordinal), where a lossy unmerge, loralib and a float32 weight give the value written.
  Restores now give a non-finite merged value back as it is, on every backend.
"""
import math

import pytest
import torch

from lora_ext import lossless, ops
from helpers import bits, load_sim
from test_session_hostile11 import LOSSLESS_KINDS, _lossless_layer


@pytest.fixture(params=["cpu_pass", "pure_torch", "kernels"])
def restore_path(request, monkeypatch):
    """Where a CPU weight's lossless pass runs: the C++ CPU pass (lora_ext._cpu), the pure-torch reference
    (lossless._pass_reference), or the CUDA kernels' code (the simulator standing in for _C)."""
    if request.param == "pure_torch":
        monkeypatch.setattr(lossless, "_cpu", None)
    if request.param != "kernels":
        yield request.param
        return
    sim = load_sim()
    if sim is None:
        pytest.skip("lora_ext._sim is not built")
    with ops.use_kernels(sim, "cpu"):
        yield request.param


@pytest.mark.parametrize("via", ["train", "state_dict", "switch"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", sorted(LOSSLESS_KINDS))
def test_a_non_finite_write_while_merged_is_kept(kind, dtype, value, via, restore_path):
    layer, w = _lossless_layer(kind, dtype)
    layer.lossless = True  # (the default for 16-bit weights; float32 asks for it)
    layer.requires_grad_(False)
    layer.add_adapter("b", torch.randn_like(layer.lora_A) * 0.3, torch.randn_like(layer.lora_B) * 0.3, 0.5)
    base = w.detach().clone()
    layer.eval()
    assert layer.merged and layer._merged_record.exceptions > 0  # (listed elements beside the coded ones)
    written = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    with torch.no_grad():
        w[written] = value
    key = "conv.weight" if hasattr(layer, "conv") else "weight"
    if via == "state_dict":
        got = layer.state_dict()[key]
    else:
        if via == "switch":
            layer.set_adapter("b")
            served = w.detach()[written]
            assert bool((served.isnan() if math.isnan(value) else served == value).all())
        layer.train()
        got = w.detach()
    # the written elements: the value written (a lossy unmerge's inf - d, NaN - d)
    if math.isnan(value):
        assert bool(got[written].isnan().all())
    else:
        assert bool((got[written] == value).all())
    # the others: the base, bit for bit
    assert torch.equal(bits(got[~written]), bits(base[~written]))
