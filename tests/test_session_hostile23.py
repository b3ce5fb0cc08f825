"""Bugs found by the thirtieth session's hostile testers, each shown failing on the code before its fix."""
import pytest
import torch
import torch.nn.functional as F

import lora_ext as lora

CONVS = {1: lora.Conv1d, 2: lora.Conv2d, 3: lora.Conv3d}


def _conv64(layer, x):
    """The layer's unmerged forward in float64 by plain torch: conv(x, W + scaling * (B A).view(W.shape)) + bias."""
    w = layer.conv.weight.double()
    w = w + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).view(w.shape)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    bias = layer.conv.bias
    return conv(x.double(), w, None if bias is None else bias.double())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_an_unmerged_float16_conv_adds_an_update_past_float16_to_its_weight_once(dims):
    # W = -60000 and an update of +120000 (past float16's 65504) with W + update = 60000: the forward rounded the
    # update to float16 first (inf) and gave inf; now W + update is added in float32 and rounded once, as a merge
    layer = CONVS[dims](2, 2, 1, r=1, lora_alpha=1)
    layer.conv.half()
    with torch.no_grad():
        layer.conv.weight.fill_(-60000.0)
        layer.conv.bias.zero_()
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(400.0)
    x = torch.full((1, 2) + (3,) * dims, 1e-3, dtype=torch.float16)
    layer.train()
    with torch.no_grad():
        y = layer(x)
    ref = _conv64(layer, x)
    assert torch.isfinite(y).all(), y
    assert ((y.double() - ref).abs() / ref.abs()).max() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_an_unmerged_16_bit_conv_rounds_its_weight_once(dtype):
    # W = 1, update 2**-e (1 + 2**-12) with e one past the dtype's last bit at 1: rounded alone the update is
    # 2**-e, and 1 + 2**-e is a tie that rounds to 1; rounded once, the sum is 1 + 2**-(e-1), the float64 answer
    e = 11 if dtype == torch.float16 else 8
    layer = lora.Conv2d(1, 1, 1, r=1, lora_alpha=1, bias=False)
    layer.conv.to(dtype)  # float32 factors on a 16-bit weight (the layers' default)
    with torch.no_grad():
        layer.conv.weight.fill_(1.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(2.0 ** -e * (1 + 2.0 ** -12))
    assert layer.lora_B.item() == 2.0 ** -e * (1 + 2.0 ** -12)
    x = torch.ones(1, 1, 1, 1, dtype=dtype)
    with torch.no_grad():
        y = layer.train()(x)
    want = torch.tensor(1 + 2.0 ** -(e - 1), dtype=dtype)
    assert _conv64(layer, x).to(dtype).item() == want.item()
    assert y.item() == want.item(), (y.item(), want.item())


@pytest.mark.parametrize("name,dims", [("Conv1d", 1), ("Conv3d", 3)])
def test_conv1d_conv3d_factor_shapes_differ_from_loralib_as_documented(name, dims):
    # README, "What is different from loralib": A is (r*k, in*k^(d-1)); loralib's (r*k, in*k) does not load
    loralib = pytest.importorskip("loralib")
    ours, theirs = getattr(lora, name)(4, 6, 3, r=2), getattr(loralib, name)(4, 6, 3, r=2)
    assert tuple(ours.lora_A.shape) == (6, 4 * 3 ** (dims - 1)) and tuple(ours.lora_B.shape) == (18, 6)
    assert tuple(theirs.lora_A.shape) == (6, 12)
    assert (ours.lora_B @ ours.lora_A).numel() == ours.conv.weight.numel()
    with pytest.raises(RuntimeError, match="size mismatch for lora_A"):
        ours.load_state_dict(theirs.state_dict())


def _fp16_empty_shard_case(rank, world, kind):
    torch.manual_seed(0)
    out_features = 8 if kind == "fsdp" else 3  # fsdp: lora_A (2, 8) on 4 ranks; tp: 3 rows of W on 4 ranks
    net = torch.nn.Sequential(lora.Linear(8, out_features, r=2, lora_alpha=4))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    net.half()
    m = net[0]
    w64 = m.weight.double() + m.scaling * m.lora_B.double() @ m.lora_A.double()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).half()
    ref = x.double() @ w64.t() + m.bias.double()
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(net[0])
        fully_shard(net)
        rows = slice(None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from lora_ext.parallel import ColwiseLoRA
        parallelize_module(net, init_device_mesh("cpu", (world,)), {"0": ColwiseLoRA()})
        rows = slice(rank, rank + 1)  # torch's uneven split of 3 rows: one each on ranks 0-2, none on rank 3
    empty = (m.lora_A if kind == "fsdp" else m.weight).to_local().numel() == 0
    net.eval()
    with torch.no_grad():
        y = net(x)
    y = y.to_local() if hasattr(y, "to_local") else y
    err = ((y.double() - ref[:, rows]).abs().max() / ref.abs().max()).item() if y.numel() else 0.0
    return empty, m.merged, err


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_float16_merges_with_an_empty_shard_on_some_rank(kind):
    """float16 merges check the weight's range first (max |W| and |A|, |B| over the mesh): DTensor's amax raised on a
    rank whose shard is empty (FSDP2's rank-2 lora_A on 4 ranks; 3 rows of W on 4 tensor-parallel ranks), naming no
    layer, while the other ranks waited in the collective until the process group's timeout."""
    from dist import run_ranks
    got = run_ranks(_fp16_empty_shard_case, kind, world=4, timeout=180)
    assert any(empty for empty, _, _ in got), got
    for rank, (_, merged, err) in enumerate(got):
        assert merged and err < 2e-3, (rank, merged, err)
