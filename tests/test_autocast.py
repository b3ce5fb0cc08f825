"""lora_ext layers under torch.autocast, against loralib under the same autocast: the output dtype, values within
the autocast dtype's tolerance, and gradients, for every layer kind, merged and unmerged, fp32 or half inputs,
eager and compiled; the registered autocast rule of the custom op; gradient checkpointing."""
import copy

import loralib
import pytest
import torch
import torch.utils.checkpoint as checkpoint

import lora_ext
from lora_ext import ops

KINDS = ["linear", "linear_fifo", "merged", "merged_fifo", "embedding", "conv1d", "conv2d", "conv3d"]


def _pair(kind, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(r=4, lora_alpha=8)
    cls = {"linear": "Linear", "linear_fifo": "Linear", "merged": "MergedLinear", "merged_fifo": "MergedLinear",
           "embedding": "Embedding", "conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d"}[kind]
    if kind.startswith(("linear", "merged")):
        args, x = (32, 24), torch.randn(5, 32)
        if kind.startswith("merged"):
            kwargs["enable_lora"] = [True, False, True]
        if kind.endswith("fifo"):
            kwargs["fan_in_fan_out"] = True
    elif kind == "embedding":
        args, x = (40, 16), torch.randint(0, 40, (3, 7))
    elif kind == "conv1d":  # kernel size 1: loralib's Conv1d/Conv3d have wrong factor shapes for larger ones
        args, x = (3, 8, 1), torch.randn(2, 3, 9)
    elif kind == "conv2d":
        args, x = (3, 8, 3), torch.randn(2, 3, 9, 9)
    else:
        args, x = (2, 4, 1), torch.randn(2, 2, 5, 5, 5)
    ours = getattr(lora_ext, cls)(*args, **kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    theirs = getattr(loralib, cls)(*args, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, x


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _lora_grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def _run(module, x, device_type, dtype=torch.bfloat16):
    with torch.autocast(device_type, dtype):
        out = module(x)
    return out


@pytest.mark.parametrize("half_input", [False, True], ids=["fp32_input", "bf16_input"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_autocast_matches_loralib(kind, merged, half_input):
    ours, theirs, x = _pair(kind)
    if half_input and x.is_floating_point():
        x = x.bfloat16()
    if merged:
        ours.eval()
        theirs.eval()
    want = _run(theirs, x, "cpu")
    got = _run(ours, x, "cpu")
    assert got.dtype == want.dtype, f"{kind}: {got.dtype} where loralib gives {want.dtype}"
    assert _rel(got, want) < 2e-2, f"relative error {_rel(got, want):.3g} against loralib under the same autocast"
    if merged:
        return
    got.float().square().mean().backward()
    want.float().square().mean().backward()
    g_ours, g_theirs = _lora_grads(ours), _lora_grads(theirs)
    assert set(g_ours) == set(g_theirs)
    for n in g_ours:
        assert g_ours[n].dtype == torch.float32, f"{n}: the gradient of an fp32 parameter must be fp32"
        assert _rel(g_ours[n], g_theirs[n]) < 5e-2, f"{n}: gradient off by {_rel(g_ours[n], g_theirs[n]):.3g}"


@pytest.mark.parametrize("kind", ["linear", "merged_fifo"])
def test_cpu_autocast_compiled_matches_eager(kind):
    ours, _, x = _pair(kind)
    want = _run(ours, x, "cpu")
    compiled = torch.compile(copy.deepcopy(ours), backend="aot_eager", fullgraph=True)
    got = _run(compiled, x, "cpu")
    assert got.dtype == torch.bfloat16 == want.dtype
    assert _rel(got, want) < 1e-2
    got.float().sum().backward()


def test_the_custom_op_has_an_autocast_rule():
    """torch.ops.lora_ext.linear itself, called under autocast (as torch.compile and autograd reach it)."""
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    A, B = torch.randn(2, 16), torch.randn(8, 2)
    with torch.autocast("cpu", torch.bfloat16):
        out = torch.ops.lora_ext.linear.default(x, x, w, None, A, B, 0.5, 1, [0], False)
    assert out.dtype == torch.bfloat16
    want = x.double() @ w.double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert _rel(out, want) < 2e-2
    with torch.autocast("cpu", torch.float16):
        assert torch.ops.lora_ext.linear.default(x, x, w, None, A, B, 0.5, 1, [0], False).dtype == torch.float16
    assert ops.linear(x, x, w, None, A, B, 0.5).dtype == torch.float32  # outside autocast: as given


# Reentrant checkpointing needs an input that requires grad: an embedding's ids cannot (nn.Embedding alike).
@pytest.mark.parametrize("kind, use_reentrant", [(k, r) for k in ["linear", "merged", "conv2d", "embedding"]
                                                 for r in (False, True) if not (k == "embedding" and r)])
def test_gradient_checkpointing_gives_the_same_gradients(kind, use_reentrant):
    ours, _, x = _pair(kind, seed=3)
    if kind.startswith(("linear", "merged")):
        ours.lora_dropout = torch.nn.Identity()
    plain = copy.deepcopy(ours)
    ours(x).square().mean().backward()
    want = _lora_grads(ours)
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    out = checkpoint.checkpoint(plain, x, use_reentrant=use_reentrant)
    out.square().mean().backward()
    got = _lora_grads(plain)
    assert set(got) == set(want) and got
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-8), n


def test_transformers_gradient_checkpointing_through_injected_layers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    lora_ext.inject(model, ["c_proj", "c_fc"], r=4, lora_alpha=8, fused={"c_attn": [True, False, True]})
    for m in model.modules():
        if isinstance(m, lora_ext.LoRALayer):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    lora_ext.mark_only_lora_as_trainable(model)
    ids = torch.randint(0, 50, (2, 16))
    model.train()
    twin = copy.deepcopy(model)
    model(ids, labels=ids).loss.backward()
    want = _lora_grads(model)
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    twin(ids, labels=ids).loss.backward()
    got = _lora_grads(twin)
    assert set(got) == set(want) and len(got) == 16  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x 2
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.gpu
@pytest.mark.hardware
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_autocast_matches_loralib(kind):
    ours, theirs, x = _pair(kind)
    ours, theirs, x = ours.cuda(), theirs.cuda(), x.cuda()
    want = _run(theirs, x, "cuda")
    got = _run(ours, x, "cuda")
    assert got.dtype == want.dtype
    assert _rel(got, want) < 2e-2
    got.float().square().mean().backward()
    assert all(torch.isfinite(g).all() for g in _lora_grads(ours).values())


def test_a_merged_bfloat16_layer_trains_under_float16_autocast():
    """Training through a merge stacks the live factors with the merged ones: torch.cat under autocast to another
    16-bit dtype raised torch's 'Unexpected floating ScalarType in at::autocast::prioritize'. nn.Linear runs there."""
    torch.manual_seed(0)
    for layer, inp in ((lora_ext.Linear(8, 6, r=2), torch.randn(3, 8).bfloat16()),
                       (lora_ext.Embedding(10, 8, r=2), torch.randint(0, 10, (3, 4)))):
        with torch.no_grad():
            layer.lora_B.normal_()
        layer = layer.bfloat16()
        with torch.autocast("cpu", dtype=torch.float16):
            unmerged = layer(inp).double()
        layer.eval()
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(inp)
        y.float().sum().backward()
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        assert (y.double() - unmerged).abs().max().item() <= 0.02 * (1 + unmerged.abs().max().item())


@pytest.mark.parametrize("factors", [torch.float64, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "linear_fifo", "merged", "merged_fifo"])
def test_a_float64_layer_computes_in_float64_under_autocast(kind, dtype, factors):
    """torch's autocast casts no float64 tensor (F.linear stays float64): lora_ext cast every floating operand, so an
    unmerged float64 layer gave its output in 16 bits (1e-2 off where merged was 1e-15); with float32 factors, those
    were rounded to 16 bits and the op computed in float64 (7e-2 off). Expected: float64 from the same operands,
    computed by plain torch, as outside autocast."""
    ours, _, x = _pair(kind)
    ours = ours.double()
    ours.lora_A.data, ours.lora_B.data = ours.lora_A.data.to(factors), ours.lora_B.data.to(factors)
    x = x.double().requires_grad_()
    A, B, W = (t.detach().double() for t in (ours.lora_A, ours.lora_B, ours.weight))
    W = W.t() if ours.fan_in_fan_out else W
    delta = torch.zeros_like(W)
    if kind.startswith("merged"):  # enable_lora [True, False, True]: B's rows in two groups, A's in two
        rows, r = W.shape[0] // 3, ours.r
        for g, out in enumerate((0, 2)):
            delta[out * rows:(out + 1) * rows] = B[g * rows:(g + 1) * rows] @ A[g * r:(g + 1) * r]
    else:
        delta = B @ A
    ref = x.detach() @ (W + ours.scaling * delta).t() + ours.bias.detach()
    for merged in (False, True):
        ours.train(not merged)
        with torch.autocast("cpu", dtype):
            got = ours(x)
        assert got.dtype == torch.float64, f"merged={merged}: {got.dtype}"
        assert (got.detach() - ref).abs().max().item() < 1e-12, f"merged={merged}"
    ours.train()
    with torch.autocast("cpu", dtype):
        ours(x).square().sum().backward()
    assert ours.lora_A.grad.dtype == factors and x.grad.dtype == torch.float64
