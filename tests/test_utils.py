"""mark_only_lora_as_trainable, lora_state_dict and layer argument checks."""
import loralib
import pytest
import torch
import torch.nn as nn

import lora_ext


class Net(nn.Module):
    def __init__(self, lib):
        super().__init__()
        self.emb = lib.Embedding(10, 8, r=2)
        self.qkv = lib.MergedLinear(8, 24, r=2, enable_lora=[True, False, True])
        self.conv = lib.Conv2d(2, 2, 1, r=1)
        self.plain = nn.Linear(8, 8)
        self.lora_head = nn.Linear(8, 3)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_modes(bias):
    sd = lora_ext.lora_state_dict(Net(lora_ext), bias=bias)
    lora_keys = {f"{m}.lora_{x}" for m in ("emb", "qkv", "conv") for x in "AB"}
    expected = {
        "none": lora_keys,
        "all": lora_keys | {"qkv.bias", "conv.conv.bias", "plain.bias", "lora_head.bias"},
        "lora_only": lora_keys | {"qkv.bias", "conv.conv.bias"},
    }[bias]
    assert set(sd) == expected


def test_lora_state_dict_matches_loralib_where_loralib_is_right():
    ours, theirs = Net(lora_ext), Net(loralib)
    for bias in ("none", "all"):
        # loralib also picks lora_head.* by its 'lora_' substring rule; that is its bug, not ours
        want = {k for k in loralib.lora_state_dict(theirs, bias=bias) if not k.startswith("lora_head.")}
        got = {k for k in lora_ext.lora_state_dict(ours, bias=bias) if not k.startswith("lora_head.")}
        assert got == want


def test_lora_state_dict_loads_into_fresh_model():
    src = Net(lora_ext)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p))
    dst = Net(lora_ext)
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        for n, p in dst.named_parameters():
            if "lora_" in n and "head" not in n:
                p.zero_()
    dst.load_state_dict(lora_ext.lora_state_dict(src), strict=False)
    x = torch.randint(0, 10, (4,))
    assert torch.equal(dst.emb(x), src.emb(x))


def test_lora_state_dict_in_merged_model_loads_into_merged_model():
    src, dst = Net(lora_ext), Net(lora_ext)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p))
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        dst.qkv.lora_B.zero_()
    x = torch.randn(3, 8)
    want = src.qkv(x)
    dst.eval()
    dst.load_state_dict(lora_ext.lora_state_dict(src), strict=False)  # swaps the merged adapter
    torch.testing.assert_close(dst.qkv(x), want, rtol=1e-5, atol=1e-5)
    dst.train()
    torch.testing.assert_close(dst.qkv(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias,trainable", [
    ("none", set()),
    ("all", {"qkv.bias", "conv.conv.bias", "plain.bias", "lora_head.bias"}),
    ("lora_only", {"qkv.bias", "conv.conv.bias"}),
])
def test_mark_only_lora_as_trainable_bias_modes(bias, trainable):
    model = Net(lora_ext)
    lora_ext.mark_only_lora_as_trainable(model, bias=bias)
    lora = {f"{m}.lora_{x}" for m in ("emb", "qkv", "conv") for x in "AB"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora | trainable


@pytest.mark.parametrize("make,needle", [
    (lambda: lora_ext.Linear(4, 4, r=-1), "r must be"),
    (lambda: lora_ext.Linear(4, 4, r=2.5), "r must be"),
    (lambda: lora_ext.MergedLinear(4, 10, r=2, enable_lora=[True, False, True]), "enable_lora"),
    (lambda: lora_ext.Linear(4, 4, r=2, lora_dropout=1.5), "lora_dropout"),
    (lambda: lora_ext.Conv2d(2, 2, (1, 2, 3), r=1), "kernel_size"),
])
def test_layer_arguments_are_checked(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_lora_state_dict_rejects_unknown_bias_mode():
    with pytest.raises(ValueError, match="bias must be one of"):
        lora_ext.lora_state_dict(Net(lora_ext), bias="everything")
