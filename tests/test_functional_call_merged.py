"""torch.func.functional_call giving a merged layer other factors: the forward serves the factors the call gave,
with or without gradients (a merged forward computed from the weight alone served the merged adapter whatever the
call gave: ignored under no_grad and for frozen factors, used with trainable ones). Against float64 by hand."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

import lora_ext

KINDS = ["linear", "merged_fifo", "embedding", "conv2d"]


def _layer(kind):
    if kind == "linear":
        return lora_ext.Linear(24, 16, r=4, lora_alpha=8)
    if kind == "merged_fifo":
        return lora_ext.MergedLinear(24, 36, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                     fan_in_fan_out=True)
    if kind == "embedding":
        return lora_ext.Embedding(30, 12, r=4, lora_alpha=8)
    return lora_ext.Conv2d(3, 5, kernel_size=3, r=2, lora_alpha=4)


def _input(kind):
    if kind == "embedding":
        return torch.randint(0, 30, (3, 7))
    if kind == "conv2d":
        return torch.randn(2, 3, 8, 8)
    return torch.randn(5, 24)


def _reference(kind, layer, W0, A, B, x):
    """The layer's output with base W0 and factors A, B, float64, by hand."""
    s, W0, A, B, x = layer.scaling, W0.double(), A.double(), B.double(), x
    if kind == "linear":
        return x.double() @ (W0 + s * B @ A).t() + layer.bias.double()
    if kind == "merged_fifo":  # W0 is (in, out); groups 0 and 2 of 3 enabled, rank 2 each
        delta = torch.zeros(36, 24, dtype=torch.float64)
        for j, e in enumerate((0, 2)):
            delta[e * 12:(e + 1) * 12] = B[j * 12:(j + 1) * 12] @ A[j * 2:(j + 1) * 2]
        return x.double() @ (W0 + s * delta.t()) + layer.bias.double()
    if kind == "embedding":
        return F.embedding(x, W0 + s * (B @ A).t())
    return F.conv2d(x.double(), W0 + s * (B @ A).view(W0.shape), layer.bias.double())


def _prepared(kind, requires_grad):
    torch.manual_seed(0)
    layer = _layer(kind)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    layer.lora_A.requires_grad_(requires_grad)
    layer.lora_B.requires_grad_(requires_grad)
    layer.eval()
    assert layer.merged
    return layer, base


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("given", ["lora_B", "both"])
def test_functional_call_serves_the_factors_it_gives(kind, grad, trainable, given):
    layer, base = _prepared(kind, trainable)
    merged = layer.weight.detach().clone()
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    An, Bn = torch.randn_like(A0), torch.randn_like(B0)
    params = {"lora_B": Bn} if given == "lora_B" else {"lora_A": An, "lora_B": Bn}
    x = _input(kind)
    with torch.set_grad_enabled(grad):
        out = functional_call(layer, params, (x,))
    want = _reference(kind, layer, base, An if given == "both" else A0, Bn, x)
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # the layer itself: still merged, its weight untouched, its own forward the weight's alone again
    assert layer.merged and torch.equal(layer.weight.detach(), merged)
    assert layer.lora_B.detach().equal(B0) and layer.lora_A.detach().equal(A0)
    with torch.no_grad():
        own = layer(x)
    assert (own.double() - _reference(kind, layer, base, A0, B0, x)).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_vmap_over_adapters(kind, merged):
    """vmap over three adapters' lora_B (the torch.func ensembling recipe over adapters), no_grad. (Unmerged too:
    the reference's in-place accumulations into unbatched buffers refused a batched lora_B.)"""
    layer, base = _prepared(kind, False)
    if not merged:
        layer.train()
    A0 = layer.lora_A.detach().clone()
    Bs = torch.randn(3, *layer.lora_B.shape)
    x = _input(kind)
    with torch.no_grad():
        out = vmap(lambda B: functional_call(layer, {"lora_B": B}, (x,)))(Bs)
    for i in range(3):
        want = _reference(kind, layer, base, A0, Bs[i], x)
        assert (out[i].double() - want).abs().max() <= 1e-5 * want.abs().max(), f"adapter {i}"


def test_a_parameter_put_in_place_of_a_merged_factor_is_served():
    layer, base = _prepared("linear", True)
    Bn = torch.randn_like(layer.lora_B)
    layer.lora_B = torch.nn.Parameter(Bn.clone())
    x = _input("linear")
    with torch.no_grad():
        out = layer(x)
    want = _reference("linear", layer, base, layer.lora_A.detach(), Bn, x)
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()
    layer.train()  # takes out what was merged (the old factors), not the new ones
    assert (layer.weight.detach().double() - base.double()).abs().max() <= 1e-6 * base.abs().max()
    layer.eval()  # merges the new Parameter: served from the weight alone, and right
    with torch.no_grad():
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert not layer._factors_substituted()


def test_a_meta_copy_of_a_merged_layer_warns_and_serves_state_dicts():
    """torch.func's ensembling recipe makes its skeleton with copy.deepcopy(model).to("meta"): a merged layer is
    unmerged there (nothing to merge into), which a merged model's named_parameters() would double; it says so."""
    import copy
    layer, base = _prepared("linear", False)
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    with pytest.warns(UserWarning, match=r"Linear\(24, 16\): moved to the meta device while merged"):
        skeleton = copy.deepcopy(layer).to("meta")
    assert not skeleton.merged and layer.merged
    x = _input("linear")
    with torch.no_grad():
        out = functional_call(skeleton, layer.state_dict(), (x,))
    want = _reference("linear", layer, base, A0, B0, x)
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("settle", ["set_adapter(active)", "mark_only_lora_as_trainable"])
def test_a_parameter_put_in_place_stays_served_when_the_pairs_settle(settle):
    """A serving switch lends the live Parameters; making the factors trainable and settling (set_adapter of the
    active adapter, or mark_only_lora_as_trainable) gives each adapter its own pair with the live values. A
    Parameter put in place of lora_B since the merge is not what was merged: its pair is still served on the fly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(lora_ext.Linear(24, 16, r=4, lora_alpha=8))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    A1, B1 = torch.randn(4, 24), torch.randn(16, 4)
    layer.add_adapter("b", A1.clone(), B1.clone(), layer.scaling)
    layer.requires_grad_(False)
    model.eval()
    layer.set_adapter("b")  # a serving switch
    B2 = torch.randn(16, 4)
    layer.lora_B = torch.nn.Parameter(B2.clone())
    x = _input("linear")
    want = _reference("linear", layer, base, A1, B2, x)
    layer.requires_grad_(True)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    if settle == "set_adapter(active)":
        layer.set_adapter("b")
    else:
        lora_ext.mark_only_lora_as_trainable(model)
    assert torch.equal(layer.lora_B.detach(), B2)
    with torch.no_grad():
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_put_in_place_stays_served_through_a_dtype_change(kind):
    """A dtype change of a merged layer unmerges, converts and merges the snapshot again: the Parameter put in place
    of lora_B since the merge is still not what is merged, and is still served on the fly (it was taken for the
    merged one: the forward served the old merge, 4.7 off on a 24 x 16 Linear)."""
    layer, base = _prepared(kind, False)
    A0 = layer.lora_A.detach().clone()
    Bn = torch.randn_like(layer.lora_B)
    layer.lora_B = torch.nn.Parameter(Bn.clone(), requires_grad=False)
    layer.double()
    assert layer.merged
    x = _input(kind)
    x = x if kind == "embedding" else x.double()
    want = _reference(kind, layer, base, A0, Bn, x)
    with torch.no_grad():
        assert (layer(x) - want).abs().max() <= 1e-5 * want.abs().max()


class _Doubled(torch.nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_parametrization_registered_on_a_merged_factor_is_served(grad):
    """register_parametrization on lora_B after the merge: the forward serves what it computes (under no_grad it
    served the merged B: 4.07 off), as a Parameter put in place would be."""
    from torch.nn.utils import parametrize
    layer, base = _prepared("linear", grad)
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    parametrize.register_parametrization(layer, "lora_B", _Doubled())
    x = _input("linear")
    with torch.set_grad_enabled(grad):
        out = layer(x)
    want = _reference("linear", layer, base, A0, 2 * B0, x)
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("how", ["weight_norm", "prune"])
def test_a_factor_a_forward_pre_hook_computes_is_served_unmerged(how):
    """prune and the hook-based weight_norm make lora_A a plain attribute their pre-hook computes at each forward: a
    merge read the last forward's value (an optimizer step since was not in it: 479 off with weight_norm, 312 with
    pruning), so eval() leaves such a layer unmerged, with a warning naming the tool, and merge() refuses."""
    torch.manual_seed(0)
    layer = lora_ext.Linear(24, 16, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    if how == "weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(layer, "lora_A")
        sources = [layer.lora_A_g, layer.lora_A_v]
    else:
        from torch.nn.utils import prune
        prune.l1_unstructured(layer, "lora_A", amount=0.25)
        sources = [layer.lora_A_orig]
    x = _input("linear")
    layer(x)  # the pre-hook computes lora_A
    with torch.no_grad():
        for p in sources:
            p.add_(torch.randn_like(p))  # an optimizer step on what computes it
    with pytest.warns(UserWarning, match=r"lora_A is computed by torch\.nn\.utils\.(weight_norm|prune)"):
        layer.eval()
    assert not layer.merged and torch.equal(layer.weight.detach(), base)
    with pytest.raises(ValueError, match="forward pre-hook"):
        layer.merge()
    with torch.no_grad():
        out = layer(x)  # the hook computes lora_A from the stepped sources, the forward adds it on the fly
        want = _reference("linear", layer, base, layer.lora_A.detach(), layer.lora_B.detach(), x)
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


def _merged_before_fully_shard(rank, world):
    """(calls of the live-factor path, the output's largest error against float64) for a model merged, then
    sharded with FSDP2."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(lora_ext.Linear(16, 16, r=4), lora_ext.Linear(16, 8, r=4))
    for layer in model:
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(3, 16)
    want = x.double()
    for layer in model:
        W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
        want = want @ (W + layer.scaling * B @ A).t() + layer.bias.double()
    model.eval()
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    calls = []
    live_path = lora_ext.layers.LoRALayer._merged_training_factors
    lora_ext.layers.LoRALayer._merged_training_factors = lambda self: calls.append(1) or live_path(self)
    with torch.no_grad():
        out = model(x)
    return len(calls), (out.double() - want).abs().max().item(), all(layer.merged for layer in model)


def test_a_model_merged_before_fully_shard_serves_from_the_weight():
    """FSDP2 puts its own Parameters in place of the merged factors (shards, and unsharded ones at each forward):
    they are what is merged, not factors given, so the forward computes from the weight alone (it took the
    live-factor path at every forward: right values, extra work)."""
    from dist import run_ranks
    for calls, err, merged in run_ranks(_merged_before_fully_shard):
        assert merged and calls == 0
        assert err < 1e-4
