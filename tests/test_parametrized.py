"""Layers under torch.nn.utils.parametrize (weight_norm on the base weight, a parametrization of lora_A).

A parametrized weight is computed at each access, so a merge has nowhere to write: merge() refuses with a
ValueError naming the layer, and eval() leaves that layer unmerged with a warning and goes on with the others
(model.eval() used to stop at it with a KeyError, the layers before it merged and in eval mode, the ones after
it not). copy.deepcopy of a parametrized layer works (torch's parametrize gives the class a __deepcopy__ copying
__dict__ whole unless the class has one: it raised "cannot pickle '_thread.RLock'")."""
import copy
import warnings

import pytest
import torch
from torch.nn.utils import parametrizations, parametrize

import lora_ext as lora
from helpers import TOL, layer_forward64, randomize_, rel_err


def _forward64(layer, x):
    """The float64 formula with the weight as the parametrization computes it now."""
    p = {n: t.detach().double() for n, t in layer.named_parameters() if "parametrizations" not in n}
    p["weight"] = layer.weight.detach().double()
    return layer_forward64(layer, p, x.double(), layer.scaling)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = randomize_(lora.Linear(8, 8, r=2, lora_alpha=3))
        self.b = randomize_(lora.Linear(8, 8, r=2, lora_alpha=3))
        self.c = randomize_(lora.Linear(8, 6, r=2, lora_alpha=3))
        parametrizations.weight_norm(self.b, "weight")

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_eval_leaves_a_parametrized_weight_unmerged_and_merges_the_rest():
    net = Net()
    x = torch.randn(4, 8)
    p_a, p_c = ({n: t.detach().double() for n, t in m.named_parameters()} for m in (net.a, net.c))
    h = torch.tanh(_forward64(net.b, torch.tanh(layer_forward64(net.a, p_a, x.double(), net.a.scaling))))
    ref = layer_forward64(net.c, p_c, h, net.c.scaling)  # float64, from the values before eval()
    original = net.b.parametrizations.weight.original1.detach().clone()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        net.eval()
    messages = [str(w.message) for w in seen]
    assert len(messages) == 1 and "ParametrizedLinear" in messages[0] and "unmerged" in messages[0]
    assert (net.a.merged, net.b.merged, net.c.merged) == (True, False, True)
    assert not any(m.training for m in net.modules())
    assert torch.equal(net.b.parametrizations.weight.original1, original)  # nothing written
    with torch.no_grad():
        assert rel_err(net(x), ref) < TOL[torch.float32] * 10  # a and c merged, b on the fly
    net.train()
    assert not any(m.merged for m in (net.a, net.b, net.c))
    with torch.no_grad():
        assert rel_err(net(x), ref) < TOL[torch.float32] * 10


def test_merge_refuses_before_writing():
    net = Net()
    originals = lambda: [t for n, t in net.b.named_parameters() if n.startswith("parametrizations.weight.original")]
    original = [t.detach().clone() for t in originals()]
    assert len(original) == 2  # weight_norm's g and v
    with pytest.raises(ValueError, match=r"ParametrizedLinear\(8, 8\): its weight is not a registered parameter"):
        net.b.merge()
    assert not net.b.merged
    assert all(torch.equal(a, b) for a, b in zip(originals(), original))
    with pytest.raises(ValueError, match="not a registered parameter"):
        lora.merge_adapter(net)
    assert not any(m.merged for m in (net.a, net.b, net.c))


@pytest.mark.parametrize("where", ["weight", "lora_A"])
def test_deepcopy_of_a_parametrized_layer(where):
    layer = randomize_(lora.Linear(8, 6, r=2, lora_alpha=3))
    if where == "weight":
        parametrizations.weight_norm(layer, "weight")
    else:
        class Doubled(torch.nn.Module):
            def forward(self, t):
                return 2 * t
        parametrize.register_parametrization(layer, "lora_A", Doubled())
    x = torch.randn(3, 8)
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert type(twin) is type(layer) and twin._lock is not layer._lock
    assert torch.equal(twin(x), y)
    twin.lora_B.data.add_(1.0)  # the copy's own tensors
    assert torch.equal(layer(x), y) and not torch.allclose(twin(x), y)
    twin.eval()  # (a parametrized weight stays unmerged; a parametrized lora_A merges its computed value)
    p = {n: t.detach().double() for n, t in twin.named_parameters() if "parametrizations" not in n}
    # the base: a merged layer's state_dict holds it (its weight holds W + s B A)
    p["weight"] = twin.state_dict()["weight"].double() if twin.merged else twin.weight.detach().double()
    p["lora_A"] = twin.lora_A.detach().double()
    assert twin.merged == (where == "lora_A")
    with torch.no_grad():
        assert rel_err(twin(x), layer_forward64(twin, p, x.double(), twin.scaling)) < TOL[torch.float32] * 10


def test_ema_copy_of_a_model_with_weight_norm():
    """An EMA copy (deepcopy of the whole model, as training recipes keep one) of a model whose lora layer has
    weight_norm: the copy serves what the model does and trains apart from it."""
    net = Net()
    ema = copy.deepcopy(net)
    x = torch.randn(4, 8)
    assert torch.equal(ema(x), net(x))
    with torch.no_grad():
        for p, q in zip(ema.parameters(), net.parameters()):
            p.mul_(0.5).add_(q, alpha=0.5)
    assert rel_err(ema(x), net(x)) < TOL[torch.float32]
    ema.b.lora_A.data.zero_()
    assert not torch.allclose(ema(x), net(x))


def test_refusals_leave_spectral_norm_alone():
    """A refused merge of an Embedding whose weight spectral_norm computes runs no power iteration: its buffers
    are bit for bit what they were (the message used to read the weight, which steps spectral_norm in training)."""
    emb = randomize_(lora.Embedding(12, 6, r=2, lora_alpha=3))
    parametrizations.spectral_norm(emb, "weight")
    buffers = {n: b.clone() for n, b in emb.named_buffers()}
    assert any("_u" in n for n in buffers)
    with pytest.raises(ValueError, match=r"Embedding\(12, 6\): its weight is not a registered parameter"):
        emb.merge()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        emb.eval()
    assert not emb.merged
    assert all(torch.equal(b, buffers[n]) for n, b in emb.named_buffers())


@pytest.mark.parametrize("merge", [False, True])
def test_unload_refuses_a_parametrized_layer_before_changing_anything(merge):
    net = Net()
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = net(x)
    with pytest.raises(ValueError, match="'b'"):
        lora.unload(net, merge=merge)
    assert all(isinstance(m, lora.Linear) for m in (net.a, net.b, net.c))
    assert not any(m.merged for m in (net.a, net.b, net.c))
    with torch.no_grad():
        assert torch.equal(net(x), before)


def test_mixed_batch_over_a_parametrized_layer():
    """batch_adapters serves a model with a weight_norm'd layer (it used to raise a raw KeyError): each row its
    adapter's output, against float64."""
    layer = randomize_(lora.Linear(8, 6, r=2, lora_alpha=3))
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    layer.add_adapter("b", torch.randn(2, 8), torch.randn(6, 2), 0.5)
    parametrizations.weight_norm(layer, "weight")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        layer.eval()
    x = torch.randn(3, 8)
    with torch.no_grad(), lora.batch_adapters(layer, ["b", None, "default"]):
        y = layer(x)
    w = layer.weight.detach().double()
    for row, name in enumerate(["b", None, "default"]):
        p = {"weight": w, "bias": layer.bias.detach().double()}
        if name is None:
            ref = torch.nn.functional.linear(x[row].double(), w, p["bias"])
        else:
            A, B, s = layer.get_adapter(name)
            p.update(lora_A=A.double(), lora_B=B.double())
            ref = layer_forward64(layer, p, x[row].double(), s)
        assert rel_err(y[row], ref) < TOL[torch.float32] * 10, name


def test_deepcopy_honours_a_subclass_getstate():
    class Cached(lora.Linear):
        def __getstate__(self):
            state = super().__getstate__()
            state.pop("cache", None)
            return state

    layer = Cached(8, 6, r=2)
    layer.cache = object()
    twin = copy.deepcopy(layer)
    assert not hasattr(twin, "cache") and hasattr(layer, "cache")


def test_a_tie_partner_parametrized_later_does_not_break_merges():
    """l2.weight = l1.weight, then weight_norm on l1 (its weight now computed from Parameters of its own): l2 is
    no longer tied and merges; the registry's look at l1 used to raise KeyError (seen when ids were reused)."""
    l1 = randomize_(lora.Linear(8, 6, r=2, lora_alpha=3))
    l2 = randomize_(lora.Linear(8, 6, r=2, lora_alpha=3))
    l2.weight = l1.weight
    with pytest.raises(ValueError, match="shared with"):
        l2.merge()
    parametrizations.weight_norm(l1, "weight")
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = l2(x)
    l2.merge()
    assert l2.merged
    with torch.no_grad():
        assert rel_err(l2(x), before) < TOL[torch.float32] * 10


class _Identity(torch.nn.Module):
    def forward(self, w):
        return w


def test_state_dict_of_a_layer_parametrized_after_its_merge():
    """A layer merged, then parametrized: its checkpoint would hold the merged weight as the base (the adapter
    twice once loaded), so state_dict refuses naming the layer, where it raised KeyError('weight'). Once the
    parametrization is removed, the checkpoint holds the base from before the merge."""
    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2).double()
    randomize_(layer)
    base = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged
    parametrize.register_parametrization(layer, "weight", _Identity())
    with pytest.raises(KeyError, match=r"Linear\(8, 6\): merged, then its weight was parametrized"):
        layer.state_dict()
    parametrize.remove_parametrizations(layer, "weight")
    saved = layer.state_dict()["weight"]
    assert rel_err(saved, base) < 1e-14
    layer.train()
    assert not layer.merged
    assert rel_err(layer.weight.detach(), base) < 1e-14
