"""A hostile look at the session's ties, adapters-switch and refusal changes: each test failed before its fix."""
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from dist import run_ranks


class TiedPair(nn.Module):
    """Two lora_ext Linears computing with one weight Parameter (`l2.weight = l1.weight`), each with its adapter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the base weights too: every rank builds the same model
        g = torch.Generator().manual_seed(0)
        self.l1 = lora.Linear(8, 8, r=2)
        self.l2 = lora.Linear(8, 8, r=2)
        self.l2.weight = self.l1.weight
        with torch.no_grad():
            for layer in (self.l1, self.l2):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        self.double()

    def forward(self, x):
        return self.l2(self.l1(x))


def _x():
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _eval_outputs(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.eval()
    with torch.no_grad():
        return net(_x()), [net.l1.merged, net.l2.merged]


def test_tie_seen_after_parameters_replaced_in_place():
    """What FSDP2 (unsafe_setattr_param) does to a tied weight: one new Parameter set into both modules'
    _parameters, bypassing register_parameter. eval() merged l1's adapter into the shared weight (l2 then computed
    with l1's update in its base, 0.8 off), with only l2 warning that it stayed unmerged."""
    net = TiedPair()
    with torch.no_grad():
        ref = net(_x())
    p = nn.Parameter(net.l1.weight.detach().clone())
    net.l1._parameters["weight"] = p
    net.l2._parameters["weight"] = p
    y, merged = _eval_outputs(net)
    assert merged == [False, False]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def _fsdp_tied(rank, world):
    from torch.distributed.fsdp import fully_shard
    net = TiedPair()
    with torch.no_grad():
        ref = net(_x())
    fully_shard(net)
    y, merged = _eval_outputs(net)
    return ref, y, merged


def test_fsdp2_tied_lora_layers_not_merged():
    for ref, y, merged in run_ranks(_fsdp_tied):
        assert merged == [False, False]
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


class TiedConvs(nn.Module):
    def __init__(self, how):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = lora.Conv2d(3, 3, 3, r=2, padding=1)
        self.c2 = lora.Conv2d(3, 3, 3, r=2, padding=1)
        if how == "weight":
            self.c2.conv.weight = self.c1.conv.weight  # torch's register_parameter, on the inner conv
        else:
            self.c2.conv = self.c1.conv
        with torch.no_grad():
            for layer in (self.c1, self.c2):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        self.double()

    def forward(self, x):
        return self.c2(self.c1(x))


@pytest.mark.parametrize("how", ["weight", "conv"])
def test_tied_conv_layers_not_merged(how):
    """Two lora_ext Conv2d tied through their inner conv's weight (or the same conv): eval() merged the first one
    into the shared weight (4.3 off, silently) and c1.merge() was accepted."""
    net = TiedConvs(how)
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.eval()
    assert [net.c1.merged, net.c2.merged] == [False, False]
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-12, atol=1e-12)
    net.train()
    with pytest.raises(ValueError, match="its weight is shared with Conv2d"):
        net.c1.merge()


def _tied_linears():
    m = nn.Sequential(lora.Linear(8, 8, r=2), lora.Linear(8, 8, r=2))
    m[1].weight = m[0].weight
    return m


def test_tie_seen_after_an_assign_load_of_a_saved_tied_model(tmp_path):
    """torch.save keeps the tied weight's one storage; load_state_dict(assign=True) (a model built on meta) wraps
    each key in a Parameter of its own over it. eval() merged both adapters into the one storage (2.4 off, no
    warning)."""
    torch.manual_seed(0)
    m = _tied_linears().double()
    for layer in m:
        nn.init.normal_(layer.lora_B)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    with torch.device("meta"):
        m2 = _tied_linears().double()
    m2.load_state_dict(torch.load(tmp_path / "sd.pt"), assign=True)
    x = _x()
    with torch.no_grad():
        ref = m2(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2.eval()
    assert [m2[0].merged, m2[1].merged] == [False, False]
    with torch.no_grad():
        torch.testing.assert_close(m2(x), ref, rtol=1e-12, atol=1e-12)


def test_weights_in_one_flat_buffer_without_overlap_still_merge():
    """Views of one flat buffer (FSDP1's use_orig_params, flat-parameter arenas) that do not overlap are not tied."""
    torch.manual_seed(0)
    m = nn.Sequential(lora.Linear(8, 8, r=2), lora.Linear(8, 8, r=2)).double()
    flat = torch.cat([layer.weight.detach().reshape(-1) for layer in m])
    for i, layer in enumerate(m):
        nn.init.normal_(layer.lora_B)
        layer.weight = nn.Parameter(flat[i * 64:(i + 1) * 64].view(8, 8), requires_grad=False)
    x = _x()
    with torch.no_grad():
        ref = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.eval()
    assert [m[0].merged, m[1].merged] == [True, True]
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


def test_tied_conv_after_a_pickle_round_trip():
    """A ConvLoRA unpickled (torch.save of the model) and then tied through its conv's weight."""
    import io
    buf = io.BytesIO()
    torch.save(nn.Sequential(lora.Conv2d(3, 3, 3, r=2), lora.Conv2d(3, 3, 3, r=2)), buf)
    buf.seek(0)
    m = torch.load(buf, weights_only=False)
    m[1].conv.weight = m[0].conv.weight
    with pytest.raises(ValueError, match="its weight is shared with Conv2d"):
        m[0].merge()
