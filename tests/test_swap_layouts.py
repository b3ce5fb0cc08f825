"""ops.swap_ through the merge kernels (the SIMT simulator, lora_ext._sim, standing in for CUDA) for every layout and
pair of ranks, against a float64 reference: W + s2 B2 A2 - s1 B1 A1. The staging walks are compiled per layout; the
first version picked the layout from a stride, and a transposed R of rank 1 has column stride 1 like an untransposed
one: a swap from a rank-1 adapter in a transposed layout (an Embedding, a fan_in_fan_out Linear) read the second
pair's B at the first pair's stride (12 off for ops.swap_, 27 for an Embedding's switch, on values of about 19)."""
import pytest
import torch

import lora_ext as lora
from lora_ext import ops
from helpers import load_sim, requires_sim

_sim = load_sim()

RANKS = [(1, 4), (4, 1), (1, 1), (2, 31), (31, 2), (1, 32), (16, 17)]


def _tol(dtype, ref):
    eps = {torch.float32: 2 ** -20, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    return eps * (1 + ref.abs().max().item())


@requires_sim
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("ranks", RANKS, ids=str)
@pytest.mark.parametrize("k", [1, 24])
@pytest.mark.parametrize("dtype,factors", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)], ids=str)
def test_swap_every_layout_and_rank_pair(transposed, ranks, k, dtype, factors):
    g = torch.Generator().manual_seed(sum(ranks) * 31 + k)
    r1, r2, n = *ranks, 40
    A1, B1 = torch.randn(r1, k, generator=g).to(factors), torch.randn(n, r1, generator=g).to(factors)
    A2, B2 = torch.randn(r2, k, generator=g).to(factors), torch.randn(n, r2, generator=g).to(factors)
    w = torch.randn((k, n) if transposed else (n, k), generator=g).to(dtype)
    d = 1.5 * B2.double() @ A2.double() - 0.5 * B1.double() @ A1.double()
    ref = w.double() + (d.T if transposed else d)
    with ops.use_kernels(_sim, "cpu"):
        ops.swap_(w, A1, B1, 0.5, A2, B2, 1.5, transposed=transposed)
    assert (w.double() - ref).abs().max().item() <= _tol(dtype, ref)


@requires_sim
@pytest.mark.parametrize("lossless", [False, None])
def test_an_embedding_switched_from_a_rank_1_adapter(lossless):
    torch.manual_seed(0)
    with ops.use_kernels(_sim, "cpu"):
        emb = lora.Embedding(40, 24, r=1, lora_alpha=1, lossless=lossless)
        with torch.no_grad():
            for p in emb.parameters():
                p.normal_()
        emb.add_adapter("b", torch.randn(4, 40), torch.randn(24, 4), 2.0)
        base = emb.weight.detach().double().clone()
        emb.eval()
        emb.set_adapter("b")
        ids = torch.arange(40)
        with torch.no_grad():
            y = emb(ids).double()
    A, B, s = emb.get_adapter("b")[:3]
    ref = torch.nn.functional.embedding(ids, base + (s * B.double() @ A.double()).T)
    assert emb.active_adapter == "b" and emb.merged
    assert (y - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())
