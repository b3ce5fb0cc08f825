"""Convolutions in mixed batches (lora.batch_adapters): a ConvLoRA layer (Conv1d, Conv2d, Conv3d; stride, padding
modes, dilation, groups) serves each row with its own adapter, merged and unmerged, against a float64 oracle written
here from the test's own factors (loralib's delta: (B A) viewed as the weight, times the scaling); rows of the base
bit for bit; lora_ext.ops.batched_conv_ with poisoned rows and forced chunks; a real transformers ViT (its patch
embedding is a Conv2d) against peft's adapter_names; beams; torch.compile; refusals."""
import math

import pytest
import torch
import torch.nn.functional as F

import lora_ext as lora
from lora_ext import ops, reference
from helpers import peft_with_adapters, rel_err
from test_batched_gpu import captured

# name: (layer class, conv keyword arguments, spatial shape of the input)
CASES = {
    "conv1d-circular-groups": (lora.Conv1d, dict(kernel_size=3, padding=1, padding_mode="circular", groups=2), (9,)),
    "conv2d-stride": (lora.Conv2d, dict(kernel_size=3, stride=2, padding=1), (7, 6)),
    "conv2d-rect-dilated-reflect": (lora.Conv2d, dict(kernel_size=(3, 2), dilation=(2, 1), padding=2,
                                                      padding_mode="reflect"), (9, 6)),
    "conv3d-same": (lora.Conv3d, dict(kernel_size=3, padding="same"), (4, 5, 3)),
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
NAMES = ["a", "b", None, "b", "default", "a"]


def oracle(conv, base, x, factors):
    """The conv of x with weight base + s * (B A).view(base.shape) (factors (A, B, s), or None: the base), in
    float64; torch's padding modes pad first."""
    w = base.double()
    if factors is not None:
        A, B, s = factors
        w = w + (B.double() @ A.double()).view(w.shape) * s
    x = x.double()
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    fn = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    bias = None if conv.bias is None else conv.bias.double()
    return fn(x, w, bias, conv.stride, padding, conv.dilation, conv.groups)


def conv_layer(case, dtype, seed=0):
    """The layer of `case` holding adapters default (rank 2), a (rank 2) and b (rank 3) of random values, and
    {name: (A, B, scaling)} as given to it, with its base weight."""
    cls, kwargs, spatial = CASES[case]
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    layer = cls(4, 6, kwargs.pop("kernel_size"), r=2, lora_alpha=4, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    k0 = layer.conv.kernel_size[0]
    given = {}
    for name, r, s in (("default", 2, 2.0), ("a", 2, 0.7), ("b", 3, 1.3)):
        A = (torch.randn(r * k0, layer.lora_A.shape[1], generator=g) * 0.3).to(dtype)
        B = (torch.randn(layer.lora_B.shape[0], r * k0, generator=g) * 0.3).to(dtype)
        layer.add_adapter(name, A, B, s)
        given[name] = (A.clone(), B.clone(), s)
    layer.set_adapter("a")
    return layer, given, layer.conv.weight.detach().clone(), spatial


def check_rows(out, layer, base, x, given, names, dtype, what):
    for i, name in enumerate(names):
        ref = oracle(layer.conv, base, x[i:i + 1], given.get(name))
        # relative to the output's size and the merged adapter's (a merged bf16 weight rounds W + delta)
        size = max(ref.norm(), oracle(layer.conv, base, x[i:i + 1], given["a"]).norm())
        err = ((out[i:i + 1].double() - ref).norm() / size).item()
        assert err < TOL[dtype], f"{what}: row {i} ({name!r}) relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_row_gets_its_adapter(case, merged, dtype):
    layer, given, base, spatial = conv_layer(case, dtype)
    model = torch.nn.Sequential(layer).eval()
    if not merged:
        layer.unmerge()
    assert layer.merged == merged
    x = torch.randn(len(NAMES), 4, *spatial).to(dtype)
    weight = layer.conv.weight.detach().clone()
    with torch.no_grad():
        plain = model(x)  # outside a batch: the base (unmerged, with a's rows below), or a merged
        with lora.batch_adapters(model, NAMES):
            out = model(x)
    check_rows(out, layer, base, x, given, NAMES, dtype, case)
    if merged:  # the merged adapter's rows are the merged forward, bit for bit
        assert all(torch.equal(out[i], plain[i]) for i, n in enumerate(NAMES) if n == "a")
    else:  # rows of the base are the conv's own forward, bit for bit (bias and all)
        with torch.no_grad():
            assert torch.equal(out[2], layer.conv(x)[2])
    assert torch.equal(layer.conv.weight, weight), "the weight changed"


def test_a_batch_of_beams_and_of_one_adapter():
    layer, given, base, spatial = conv_layer("conv2d-stride", torch.float64)
    model = torch.nn.Sequential(layer).eval()
    x = torch.randn(6, 4, *spatial, dtype=torch.float64)
    with torch.no_grad(), lora.batch_adapters(model, ["b", None], expand=3):
        out = model(x)  # each row 3 times in a run, as generate() with num_beams=3
    check_rows(out, layer, base, x, given, ["b"] * 3 + [None] * 3, torch.float64, "expand=3")
    with torch.no_grad(), lora.batch_adapters(model, ["default"] * 2):
        out = model(x[:2])
    check_rows(out, layer, base, x[:2], given, ["default"] * 2, torch.float64, "one adapter")


def test_torch_compile_serves_the_rows_as_eager():
    layer, given, base, spatial = conv_layer("conv1d-circular-groups", torch.float32)
    model = torch.nn.Sequential(layer).eval()
    layer.unmerge()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(len(NAMES), 4, *spatial)
    with torch.no_grad():
        for names in (NAMES, list(reversed(NAMES))):
            with lora.batch_adapters(model, names):
                out = compiled(x)
            check_rows(out, layer, base, x, given, names, torch.float32, f"compiled {names}")


def test_an_unbatched_input_is_refused_naming_the_layer():
    layer, _, base, _ = conv_layer("conv1d-circular-groups", torch.float32)
    model = torch.nn.Sequential(layer).eval()
    weight = layer.conv.weight.detach().clone()
    with torch.no_grad(), lora.batch_adapters(model, ["a", "b", None, "a"]):
        # (4, 9): a Conv1d reads it as one unbatched input of 4 channels, not as 4 rows
        with pytest.raises(ValueError, match=r"layer '0' \(Conv1d\) got an unbatched input of shape \(4, 9\)"):
            model(torch.randn(4, 9))
        with pytest.raises(ValueError, match=r"4 rows were given for an input of shape \(3, 4, 9\)"):
            model(torch.randn(3, 4, 9))
        with pytest.raises(ValueError, match=r"4 rows were given, but layer '0' \(Conv1d\) got an input of shape "
                                             r"\(3, 4, 9\)"):
            layer(torch.randn(3, 4, 9))  # (the layer itself: the model's row check is not on it)
    assert torch.equal(layer.conv.weight, weight) and layer.merged and layer.active_adapter == "a"


# ---------------------------------------------------------------------------------------------------
# lora_ext.ops.batched_conv_ itself


def _slots(conv, S, dtype, g):
    """S slots' delta weights (S, d, k) in ConvLoRA's layout, of `dtype`, and their scales."""
    k = conv.in_channels * math.prod(conv.kernel_size[1:])
    d = conv.weight.numel() // k
    return torch.randn(S, d, k, generator=g).to(dtype), torch.rand(S, generator=g) + 0.5


PATHS = {  # how lora_ext.reference.batched_conv computes: name -> (host index, grouped, chunk weights)
    "host": (True, None, None),
    "device-row-by-row": (False, False, None),
    "device-grouped": (False, True, None),
    "device-grouped-chunk1": (False, True, 1),
    "device-row-by-row-chunk2": (False, False, 2),
}


@pytest.mark.parametrize("all_live", [False, True], ids=["with-plain-rows", "all-live"])
@pytest.mark.parametrize("path", list(PATHS))
def test_op_rows_against_float64_and_plain_rows_bit_for_bit(path, all_live, monkeypatch):
    host, grouped, chunk = PATHS[path]
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(4, 6, (3, 2), padding=1, groups=2, padding_mode="circular").double()
    deltas, scales = _slots(conv, 3, torch.float64, g)
    x = torch.randn(5, 4, 6, 5, generator=g, dtype=torch.float64)
    index = torch.tensor([2, -1, 0, -1, 2] if not all_live else [2, 1, 0, -1, 2], dtype=torch.int32)
    sub = torch.tensor([1, -1, -1, -1, 0] if not all_live else [1, -1, -1, 0, 0], dtype=torch.int32)
    if not host:  # (the path of a CUDA index, on the CPU: as under torch.compile)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        run = reference._add_updates
        monkeypatch.setattr(reference, "_add_updates", lambda *args: run(*args[:6], grouped=grouped))
    if chunk is not None:  # (rows of `chunk` weights at a time)
        monkeypatch.setattr(reference, "CONV_CHUNK_ELEMENTS", conv.weight.numel() * chunk)
    with torch.no_grad():
        out = ops.batched_conv(conv, x, deltas, scales, index, sub)
        plain = conv(x)
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode="circular")
    for n, (i, j) in enumerate(zip(index.tolist(), sub.tolist())):
        if (i, j) == (-1, -1):
            assert torch.equal(out[n], plain[n]), f"row {n} is not the plain convolution's"
            continue
        w = conv.weight.detach().clone()
        if i >= 0:
            w = w + deltas[i].reshape(w.shape) * float(scales[i])
        if j >= 0:
            w = w - deltas[j].reshape(w.shape) * float(scales[j])
        ref = F.conv2d(padded[n:n + 1], w, conv.bias.detach(), conv.stride, 0, conv.dilation, conv.groups)[0]
        assert rel_err(out[n], ref) < 1e-13, f"row {n}"
    assert out.shape == plain.shape and out.dtype == plain.dtype


def test_op_refusals():
    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv1d(4, 6, 3)
    deltas, scales = _slots(conv, 2, torch.float32, g)
    x = torch.randn(3, 4, 9)
    index = torch.tensor([0, 1, -1], dtype=torch.int32)
    bad = [
        (dict(index=index.long()), "index must be a 1-D int32 tensor of 3 entries"),
        (dict(index=index[:2]), "index must be a 1-D int32 tensor of 3 entries"),
        (dict(sub=index[:2]), "sub must be a 1-D int32 tensor of 3 entries"),
        (dict(index=torch.tensor([0, 2, -1], dtype=torch.int32)), r"index entries must be slots in \[0, 2\) or -1"),
        (dict(sub=torch.tensor([0, -2, -1], dtype=torch.int32)), r"sub entries must be slots in \[0, 2\) or -1"),
        (dict(x=x[0]), "x must be a batched 3-D tensor"),
        (dict(x=x[:, :3]), "x must be a batched 3-D tensor \\(rows, 4 channels"),
        (dict(deltas=deltas[:, :2]), "d \\* k = 72"),
        (dict(deltas=deltas.int()), "deltas must be float16, bfloat16, float32 or float64"),
        (dict(deltas=deltas.transpose(1, 2).contiguous().transpose(1, 2)), "deltas must be contiguous"),
        (dict(scales=scales.double()), "scales must be a float32 tensor"),
        (dict(conv=torch.nn.ConvTranspose1d(4, 6, 3)), "must be an nn.Conv1d, Conv2d or Conv3d"),
        (dict(x=x.clone().requires_grad_()), "serves inference"),
    ]
    for change, message in bad:
        args = {**dict(conv=conv, x=x, deltas=deltas, scales=scales, index=index, sub=None), **change}
        with pytest.raises((ValueError, RuntimeError), match=message):
            ops.batched_conv(args["conv"], args["x"], args["deltas"], args["scales"], args["index"], args["sub"])


# ---------------------------------------------------------------------------------------------------
# a real transformers ViT (patch embedding: a Conv2d) against peft's adapter_names


def _vit(seed=0):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=16,
                    patch_size=4, num_channels=3)
    return ViTModel(cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_vit_patch_embedding_against_peft_adapter_names(tmp_path, merged):
    configs = dict(a=dict(r=4, lora_alpha=8, target_modules=["projection", "q_proj"]),
                   b=dict(r=2, lora_alpha=6, target_modules=["projection", "v_proj"]),
                   c=dict(r=3, lora_alpha=3, target_modules=["q_proj"]))
    peft_model = peft_with_adapters(_vit(), configs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # peft starts B at zero
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.eval().save_pretrained(str(tmp_path))
    model = _vit()
    for name in configs:
        lora.load_peft_adapter(model, str(tmp_path / name), name, activate=False)
    assert isinstance(model.embeddings.patch_embeddings.projection, lora.ConvLoRA)
    lora.set_adapter(model, "b")
    model.eval()
    if not merged:
        lora.unmerge_adapter(model)
    assert model.embeddings.patch_embeddings.projection.merged == merged
    names = ["a", None, "b", "c", "a", "b"]
    x = torch.randn(len(names), 3, 16, 16)
    with torch.no_grad():
        ref = peft_model(x, adapter_names=[n or "__base__" for n in names]).last_hidden_state
        with lora.batch_adapters(model, names):
            out = model(x).last_hidden_state
    for i, name in enumerate(names):
        assert rel_err(out[i], ref[i]) < 1e-5, f"row {i} ({name!r})"
    # peft's rows differ by adapter (the comparison is not of equal rows)
    assert rel_err(ref[0], peft_model(x[:1], adapter_names=["__base__"]).last_hidden_state[0]) > 1e-3


# ---------------------------------------------------------------------------------------------------
# on the GPU (the first also in the CPU rehearsal, --sim-as-cuda)


def _on(cuda, case, dtype):
    """conv_layer's layer moved to the device and `dtype` (its inactive adapters where .to() leaves them), unmerged."""
    layer, given, base, spatial = conv_layer(case, torch.float32)
    layer = layer.to(cuda.device, dtype).eval()
    layer.unmerge()
    given = {n: (A.to(dtype), B.to(dtype), s) for n, (A, B, s) in given.items()}
    return layer, given, base.to(dtype), spatial


@pytest.mark.gpu
def test_conv_adapters_paged_in_from_host_memory(cuda):
    layer, given, base, spatial = _on(cuda, "conv2d-rect-dilated-reflect", torch.bfloat16)
    model = torch.nn.Sequential(layer)
    lora.configure_slots(model, slots=2, max_rank=3)
    x = torch.randn(4, 4, *spatial).to(cuda.device, torch.bfloat16)
    with torch.no_grad():
        for names in (["a", "b", None, "a"], ["default", None, "default", "b"], ["b", "a", "a", None]):
            with lora.batch_adapters(model, names):
                out = model(x)
            cuda.synchronize()
            check_rows(out.cpu(), layer, base.cpu(), x.cpu(), given, names, torch.bfloat16,
                       f"paged {names}")


@pytest.mark.gpu
@pytest.mark.hardware("CUDA graph capture and replay")
def test_a_graph_captured_in_a_conv_batch_replays_the_next_batch(cuda):
    layer, given, base, spatial = _on(cuda, "conv3d-same", torch.bfloat16)
    model = torch.nn.Sequential(layer)
    lora.configure_slots(model, slots=3, max_rank=3)
    x = torch.randn(4, 4, *spatial).to(cuda.device, torch.bfloat16)
    first = ["a", "b", None, "default"]
    with torch.no_grad():
        with lora.batch_adapters(model, first):
            graph, out = captured(lambda: model(x))
            graph.replay()
            torch.cuda.synchronize()
            check_rows(out.cpu(), layer, base.cpu(), x.cpu(), given, first, torch.bfloat16, "captured")
        for names in (["b", None, "a", "a"], [None, "default", "b", "b"]):  # replayed without capturing again
            with lora.batch_adapters(model, names):
                graph.replay()
                torch.cuda.synchronize()
                check_rows(out.cpu(), layer, base.cpu(), x.cpu(), given, names, torch.bfloat16, f"replay {names}")


def test_an_adapter_replaced_between_batches_is_served_anew():
    # the slot is written again (and its delta weight with it): the second batch serves b's new values
    layer, given, base, spatial = conv_layer("conv2d-rect-dilated-reflect", torch.float64)
    model = torch.nn.Sequential(layer).eval()
    layer.unmerge()  # (a merged adapter would take a slot)
    lora.configure_slots(model, slots=2, max_rank=3)
    x = torch.randn(3, 4, *spatial, dtype=torch.float64)
    names = ["b", None, "default"]
    with torch.no_grad():
        with lora.batch_adapters(model, names):
            model(x)
        A, B, _ = given["b"]
        given["b"] = (A.flip(0), -2 * B, 0.4)
        layer.add_adapter("b", *given["b"])
        with lora.batch_adapters(model, names):
            out = model(x)
        check_rows(out, layer, base, x, given, names, torch.float64, "after b was replaced")
        for names in (["a", "b", "a"], ["default", None, "a"]):  # two slots: "default", then b, paged out
            with lora.batch_adapters(model, names):
                out = model(x)
            check_rows(out, layer, base, x, given, names, torch.float64, f"paged {names}")
        assert sorted(lora.slot_config(model)["adapters"]) == ["a", "default"]
