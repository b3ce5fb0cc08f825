"""loralib 0.1.2's bugs, fixed. Each test runs against lora_ext and against the real loralib, where it is
expected to fail (strict xfail: if loralib ever passes, the test says so)."""
import copy
import io

import loralib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_ext
from helpers import assert_close_rel, dense_delta64

LIBS = [
    pytest.param(lora_ext, id="lora_ext"),
    pytest.param(loralib, id="loralib", marks=pytest.mark.xfail(strict=True, reason="loralib 0.1.2 bug")),
]


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("lib", LIBS)
def test_train_and_eval_return_the_module(lib):
    for m in (lib.Linear(4, 6, r=2), lib.Embedding(5, 4, r=2), lib.MergedLinear(4, 6, r=2, enable_lora=[True, False]),
              lib.Conv2d(3, 4, 1, r=2)):
        assert m.eval() is m
        assert m.train() is m


@pytest.mark.parametrize("lib", LIBS)
def test_merged_linear_with_no_enabled_group(lib):
    m = lib.MergedLinear(8, 6, r=4, enable_lora=[False, False])
    x = torch.randn(3, 8)
    ref = F.linear(x, m.weight, m.bias)
    assert torch.equal(m(x), ref)
    m.eval()
    assert torch.equal(m(x), ref)


def _conv_delta(m, dims):
    w = m.conv.weight
    return (m.lora_B.double() @ m.lora_A.double()).view(w.shape) * m.scaling


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("cls,dims,kernel", [
    ("Conv1d", 1, 3), ("Conv3d", 3, 3), ("Conv2d", 2, (3, 2)), ("Conv1d", 1, (2,)), ("Conv3d", 3, (1, 2, 3)),
])
def test_conv_kernel_sizes(lib, cls, dims, kernel):
    m = _randomize(getattr(lib, cls)(3, 4, kernel, r=2, lora_alpha=4))
    x = torch.randn(2, 3, *([7] * dims))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    ref = conv(x.double(), m.conv.weight.double() + _conv_delta(m, dims), m.conv.bias.double())
    y = m(x)
    assert_close_rel(y, ref, torch.float32)
    m.eval()
    assert_close_rel(m(x), ref, torch.float32)


@pytest.mark.parametrize("lib", LIBS)
def test_conv_applies_lora_dropout(lib):
    m = _randomize(lib.Conv2d(3, 4, 3, r=2, lora_dropout=0.5, padding=1))
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(1234)
    y = m(x)
    torch.manual_seed(1234)
    xd = F.dropout(x, 0.5, training=True)
    delta = _conv_delta(m, 2)
    ref = F.conv2d(x.double(), m.conv.weight.double(), m.conv.bias.double(), padding=1) \
        + F.conv2d(xd.double(), delta, None, padding=1)
    assert_close_rel(y, ref, torch.float32)


@pytest.mark.parametrize("lib", LIBS)
def test_layers_pickle_and_deepcopy(lib):
    model = nn.Sequential(lib.Linear(4, 4, r=2), lib.Embedding(5, 4, r=2), lib.Conv2d(2, 2, 1, r=1),
                          lib.MergedLinear(4, 6, r=2, enable_lora=[True, False, True]))
    _randomize(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(model)
    x = torch.randn(3, 4)
    for other in (loaded, clone):
        assert torch.equal(other[0](x), model[0](x))
        assert torch.equal(other[3](x), model[3](x))


def _linear_model(lib):
    torch.manual_seed(7)
    return _randomize(nn.Sequential(lib.Linear(8, 8, r=2, lora_alpha=4),
                                    lib.MergedLinear(8, 6, r=2, enable_lora=[True, False, True])))


# loralib gets these three right; the others double-merge or lose the adapter.
_LORALIB_RIGHT = {("eval", "merged"), ("train", "fresh"), ("train", "unmerged")}


def _checkpoint_cases():
    xfail = pytest.mark.xfail(strict=True, reason="loralib 0.1.2 bug")
    for saved in ("eval", "train"):
        for target in ("fresh", "merged", "unmerged"):
            yield pytest.param(saved, target, lora_ext, id=f"{saved}-{target}-lora_ext")
            marks = () if (saved, target) in _LORALIB_RIGHT else (xfail,)
            yield pytest.param(saved, target, loralib, id=f"{saved}-{target}-loralib", marks=marks)


@pytest.mark.parametrize("saved_in,target,lib", list(_checkpoint_cases()))
def test_checkpoints_are_right_in_every_mode(lib, target, saved_in):
    src = _linear_model(lib)
    x = torch.randn(4, 8)
    src.train()
    expected = src(x)
    src.train(saved_in == "train")
    state = copy.deepcopy(src.state_dict())
    dst = nn.Sequential(lib.Linear(8, 8, r=2, lora_alpha=4),
                        lib.MergedLinear(8, 6, r=2, enable_lora=[True, False, True]))
    _randomize(dst)
    if target == "merged":
        dst.eval()
    elif target == "unmerged":
        dst.eval()
        dst.train()
    dst.load_state_dict(state)
    dst.eval()
    assert_close_rel(dst(x), expected, torch.float32)
    dst.train()
    assert_close_rel(dst(x), expected, torch.float32)


@pytest.mark.parametrize("lib", LIBS)
def test_changing_factors_while_merged_restores_true_base(lib):
    m = _randomize(lib.Linear(8, 6, r=2))
    base = m.weight.detach().clone()
    m.eval()
    with torch.no_grad():
        m.lora_A.add_(torch.randn_like(m.lora_A))
        m.lora_B.mul_(3.0)
    m.train()
    assert_close_rel(m.weight, base, torch.float32)


@pytest.mark.parametrize("lib", LIBS)
def test_merge_between_forward_and_backward_raises(lib):
    m = _randomize(lib.Linear(8, 6, r=2))
    x = torch.randn(3, 8, requires_grad=True)
    y = m(x)
    m.eval()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_with_fp32_lora(lib, dtype):
    m = _randomize(lib.MergedLinear(16, 12, r=4, enable_lora=[True, False, True]))
    with torch.no_grad():
        m.weight.data = m.weight.data.to(dtype)
        m.bias.data = m.bias.data.to(dtype)
    assert m.lora_A.dtype == torch.float32
    x = torch.randn(5, 16).to(dtype)
    delta = dense_delta64(m.lora_A, m.lora_B, 3, [0, 2], 12) * m.scaling
    ref = x.double() @ (m.weight.double() + delta).t() + m.bias.double()
    assert_close_rel(m(x), ref, dtype)
    m.eval()
    assert m.weight.dtype == dtype
    assert_close_rel(m(x), ref, dtype)


class _WithHead(nn.Module):
    def __init__(self, lib):
        super().__init__()
        self.body = lib.Linear(4, 4, r=2)
        self.conv = lib.Conv2d(2, 2, 1, r=1)
        self.lora_head = nn.Linear(4, 2)


@pytest.mark.parametrize("lib", LIBS)
def test_mark_only_lora_as_trainable_selects_lora_layers(lib):
    model = _WithHead(lib)
    for p in model.parameters():
        p.requires_grad = False
    lib.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"body.lora_A", "body.lora_B", "conv.lora_A", "conv.lora_B"}


@pytest.mark.parametrize("lib", LIBS)
def test_mark_only_lora_as_trainable_unknown_mode_freezes_nothing(lib):
    model = _WithHead(lib)
    with pytest.raises(ValueError, match="bias"):
        lib.mark_only_lora_as_trainable(model, bias="some")
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n or "head" in n)
    assert model.lora_head.weight.requires_grad


@pytest.mark.parametrize("lib", LIBS)
def test_embedding_max_norm_leaves_lora_A_alone(lib):
    e = lib.Embedding(10, 4, r=2, max_norm=1.0)
    with torch.no_grad():
        e.lora_A.copy_(torch.randn_like(e.lora_A) * 10)
    a0 = e.lora_A.detach().clone()
    e(torch.tensor([1, 2, 3]))
    assert torch.equal(e.lora_A, a0)


@pytest.mark.parametrize("lib", LIBS)
def test_merged_linear_mask_follows_to_and_is_not_saved(lib):
    m = lib.MergedLinear(8, 6, r=2, enable_lora=[True, False])
    assert "lora_ind" not in m.state_dict()
    m.to("meta")
    assert m.lora_ind.device.type == "meta"
