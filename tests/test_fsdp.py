"""lora_ext under FSDP2 (fully_shard) on 2 gloo ranks (127.0.0.1, spawned by the test), against one process on
the same data: merges, unmerges and switches write each rank's local shard (never a copy), training steps,
the gathered lora_state_dict, get/set_model_state_dict while merged, and refusals with a message."""
import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

import lora_ext as lora
from dist import run_ranks
from helpers import hf_model, lora_layers_of, seed_adapters

STEPS, BATCH, LR = 3, 8, 0.5


class Net(nn.Module):
    """Every layer kind and both fan_in_fan_out values, each fully_shard'ed (sizes that do not split evenly);
    lossless merges, so that merge cycles give the base back bit for bit."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        kw = dict(r=2, lora_alpha=4, lossless=True)
        self.emb = lora.Embedding(21, 16, **kw)
        self.fifo = lora.Linear(16, 15, fan_in_fan_out=True, **kw)
        self.qkv = lora.MergedLinear(15, 27, enable_lora=[True, False, True], **kw)
        self.qkv_fifo = lora.MergedLinear(27, 24, enable_lora=[True, False, True], fan_in_fan_out=True, **kw)
        self.conv = lora.Conv1d(24, 7, kernel_size=3, padding=1, **kw)
        self.out = lora.Linear(7, 5, **kw)

    def forward(self, ids):
        h = self.qkv_fifo(self.qkv(torch.tanh(self.fifo(self.emb(ids)))))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.tanh(h))


layers = lora_layers_of


def build(seed=0):
    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed + 1)
    seed_adapters(net, "b", g)
    for m in layers(net):  # and one of another rank
        (ra, ca), (rb, cb) = m.factor_shapes(4)
        m.add_adapter("wide", torch.randn(ra, ca, generator=g) * 0.2, torch.randn(rb, cb, generator=g) * 0.2, 1.0)
    lora.mark_only_lora_as_trainable(net)
    return net


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 21, (STEPS, BATCH, 6), generator=g), torch.randn(STEPS, BATCH, 6, 5, generator=g)


def reshard_all(net):
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shard(net):
    for m in layers(net):
        fully_shard(m)
    fully_shard(net)
    return net


def base_of(net):
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in get_model_state_dict(net).items() if "lora_" not in k}


def serve(net, ids, full):
    """Outputs of the serving sequence, on one process or sharded (full: gathers sharded tensors)."""
    out = {}
    with torch.no_grad():
        out["unmerged"] = net(ids)
        net.eval()
        out["merged_flags"] = [m.merged for m in layers(net)]
        out["merged"] = net(ids)
        lora.set_adapter(net, "b")
        out["merged_b"] = net(ids)
        out["state_base"] = {k: full(v) for k, v in get_model_state_dict(net).items() if "lora_" not in k}
        net.train()
        out["unmerged_b"] = net(ids)
        lora.set_adapter(net, "default")
        out["back"] = net(ids)
    return out


def fsdp_cases(rank, world):
    ids, target = data()
    net = shard(build())
    base0 = base_of(net)
    out = serve(net, ids[0], lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v)
    out["base_back"] = all(torch.equal(v, base0[k]) for k, v in base_of(net).items())
    try:
        lora.set_adapter(net, "wide")
        out["refusal"] = None
    except ValueError as e:
        out["refusal"] = str(e)
    out["still_default"] = all(m.active_adapter == "default" for m in layers(net))
    ranks_before = [m.r for m in layers(net)]
    try:
        lora.reserve_rank(net, 8)
        out["reserve_refusal"] = None
    except ValueError as e:
        out["reserve_refusal"] = str(e)
    out["reserve_unchanged"] = [m.r for m in layers(net)] == ranks_before and all(
        m.reserved_rank is None for m in layers(net))
    # training steps
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    per = BATCH // world
    for step in range(STEPS):
        opt.zero_grad()
        x, y = ids[step, rank * per:(rank + 1) * per], target[step, rank * per:(rank + 1) * per]
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    out["trained"] = lora.lora_state_dict(net)
    # a merged state dict round trip: get_model_state_dict holds the base; loading it into a merged model re-merges
    net.eval()
    with torch.no_grad():
        out["trained_merged"] = net(ids[0])
    sd = get_model_state_dict(net)
    set_model_state_dict(net, sd)
    with torch.no_grad():
        out["reloaded_merged"] = net(ids[0])
    out["reloaded_flags"] = [m.merged for m in layers(net)]
    # reshard_after_forward=False: after a forward every parameter stays all-gathered; a layer's own eval(),
    # train() and set_adapter() must write the shards (not the gathered copies the next reshard drops)
    kept = build()
    for m in layers(kept):
        fully_shard(m, reshard_after_forward=False)
    fully_shard(kept, reshard_after_forward=False)
    base1 = base_of(kept)
    with torch.no_grad():
        kept(ids[0])
        kept.eval()
        reshard_all(kept)  # a write into the gathered copies would be gone now
        out["gathered_eval"] = kept(ids[0])
        for m in layers(kept):
            m.set_adapter("b")
        reshard_all(kept)
        out["gathered_switch"] = kept(ids[0])
        kept.train()
        reshard_all(kept)
        out["gathered_train"] = kept(ids[0])
        reshard_all(kept)
    out["gathered_base_back"] = all(torch.equal(v, base1[k]) for k, v in base_of(kept).items())
    return out


@pytest.fixture(scope="module")
def single():
    ids, target = data()
    net = build()
    base0 = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    ref = serve(net, ids[0], lambda v: v)
    ref["base0"] = base0
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(net(ids[step]), target[step]).backward()
        opt.step()
    ref["trained"] = lora.lora_state_dict(net)
    net.eval()
    with torch.no_grad():
        ref["trained_merged"] = net(ids[0])
    return ref


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(fsdp_cases)


def test_fsdp_merges_and_switches_write_the_local_shards(ranks, single):
    for r in ranks:
        assert r["merged_flags"] == [True] * 6
        for key in ("unmerged", "merged", "merged_b", "unmerged_b", "back"):
            assert _rel(r[key], single[key]) < 1e-5, f"{key}: {_rel(r[key], single[key]):.3g} from one process"
        assert r["base_back"], "train() after merges and switches must give the base back bit for bit"
        for k, v in single["base0"].items():
            assert torch.equal(r["state_base"][k], v), f"{k}: the state dict of a merged model must hold the base"
    assert torch.equal(ranks[0]["merged_b"], ranks[1]["merged_b"])


def test_fsdp_layer_level_writes_while_parameters_are_gathered(ranks, single):
    for r in ranks:
        for key, ref in (("gathered_eval", "merged"), ("gathered_switch", "merged_b"), ("gathered_train", "unmerged_b")):
            assert _rel(r[key], single[ref]) < 1e-5, f"{key}: {_rel(r[key], single[ref]):.3g} from one process"
        assert r["gathered_base_back"], "merges into all-gathered parameters must reach the shards and come back out"


def test_fsdp_switch_to_another_rank_is_refused_before_anything_changes(ranks):
    for r in ranks:
        assert r["refusal"] is not None and "fully_shard" in r["refusal"] and "rank 4" in r["refusal"]
        assert "before sharding (lora.reserve_rank(model, r), r at least 4)" in r["refusal"]
        assert r["still_default"]
        assert "reserve_rank: layer" in r["reserve_refusal"] and "DTensors" in r["reserve_refusal"]
        assert r["reserve_unchanged"]


def test_fsdp_training_and_state_dicts_match_one_process(ranks, single):
    r0, r1 = ranks
    assert sorted(r0["trained"]) == sorted(single["trained"])
    for k, v in single["trained"].items():
        assert torch.equal(r0["trained"][k], r1["trained"][k]), k
        assert _rel(r0["trained"][k], v) < 1e-5, k
    for r in ranks:
        assert _rel(r["trained_merged"], single["trained_merged"]) < 1e-5
        assert r["reloaded_flags"] == [True] * 6
        assert _rel(r["reloaded_merged"], r["trained_merged"]) < 1e-6


# -------------------------------------------------------------------------------------------------------------
# transformers GPT-2 and Llama from small configs


def hf_run(model, ids):
    out = {}
    with torch.no_grad():
        out["unmerged"] = model(ids).logits
        model.eval()
        out["merged"] = model(ids).logits
        lora.set_adapter(model, "b")
        out["merged_b"] = model(ids).logits
        model.train()
        lora.set_adapter(model, "default")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    out["trained"] = lora.lora_state_dict(model)
    return out


def hf_case(rank, world, kind):
    model = hf_model(kind)
    blocks = model.transformer.h if kind == "gpt2" else model.model.layers
    base0 = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(5))
    out = hf_run(model, ids)
    base = base_of(model)
    common = [k for k in base0 if k in base]
    out["base_back"] = len(common) == len(base0) and all(torch.equal(base[k], base0[k]) for k in common)
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fsdp_on_transformers_models(kind):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(5))
    single = hf_run(hf_model(kind), ids)
    for r in run_ranks(hf_case, kind):
        for key in ("unmerged", "merged", "merged_b"):
            assert _rel(r[key], single[key]) < 1e-5, f"{kind} {key}: {_rel(r[key], single[key]):.3g}"
        for k, v in single["trained"].items():
            assert _rel(r["trained"][k], v) < 1e-5, f"{kind} {k}"
        assert r["base_back"]


def disagreeing_lora_b(rank, world):
    """Ranks that loaded another lora_B for adapter b (lora_A agreed): the switch wrote lora_A on every rank, then
    refused at lora_B ("nothing was written"), and the layer served (b's lora_A, default's lora_B) as 'default'."""
    torch.manual_seed(0)
    net = nn.Sequential(lora.Linear(8, 6, r=2, lora_alpha=4))
    layer = net[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    b_a, b_b = torch.randn(2, 8) * 0.5, torch.randn(6, 2) * 0.5
    layer.add_adapter("b", b_a, b_b + rank, 1.5)
    w, bias, a, b = (t.detach().double().clone() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    layer.requires_grad_(False)
    fully_shard(layer)
    fully_shard(net)
    out = {}
    for mode in ("train", "eval"):  # unmerged, then merged
        getattr(net, mode)()
        try:
            lora.set_adapter(net, "b")
        except RuntimeError as err:
            out[mode + "_refused"] = "nothing was written" in str(err)
        x = torch.randn(3, 8)
        with torch.no_grad():
            got = net(x).double()
        want = x.double() @ (w + 2.0 * b @ a).T + bias
        out[mode] = (layer.active_adapter, float((got - want).abs().max()))
    return out


def test_fsdp_switch_refused_at_its_second_factor_writes_neither():
    for r in run_ranks(disagreeing_lora_b):
        assert r["train_refused"] and r["eval_refused"], r
        for mode in ("train", "eval"):
            name, err = r[mode]
            assert name == "default" and err < 1e-5, r


# -- save_peft_adapter of a sharded model: the factors gathered (every rank calls), rank 0 writes ---------------------

def _save_net(reserve=False):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 6), nn.Linear(6, 5))
    lora.inject(net, ["0", "1", "2"], r=2, lora_alpha=4)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in lora_layers_of(net):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    seed_adapters(net, "b", g)
    if reserve:  # (the saved factors are the adapter's own rank: taken from the gathered ones)
        for p in net.parameters():
            p.requires_grad_(False)
        lora.reserve_rank(net, 4)
    return net


def _save_cases(rank, world, path, reserve, mixed=False):
    import os
    net = _save_net(reserve)
    if mixed:  # the root only, bfloat16 compute: after a forward it holds its parameters gathered, in bfloat16
        from torch.distributed.fsdp import MixedPrecisionPolicy
        fully_shard(net, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        with torch.no_grad():
            net(torch.tensor([[1, 2, 3]]))
    else:
        for m in lora_layers_of(net):
            fully_shard(m)
        fully_shard(net)
    saved = {}
    for name, adapter in (("active", None), ("b", "b")):
        lora.save_peft_adapter(net, os.path.join(path, name), adapter_name=adapter)
        saved[name] = os.path.isdir(os.path.join(path, name))
    if mixed:
        with torch.no_grad():
            net(torch.tensor([[1, 2, 3]]))
        saved["state"] = lora.lora_state_dict(net)
    return saved


@pytest.mark.parametrize("reserve,mixed", [(False, False), (True, False), (False, True)],
                         ids=["plain", "reserve_rank", "bf16_mixed_precision_gathered"])
def test_save_peft_adapter_of_an_fsdp2_model_gathers_the_factors_and_rank_0_writes(tmp_path, reserve, mixed):
    """The active adapter's factors are DTensors: save raised safetensors' "Attempted to access the data pointer on
    an invalid python storage". Expected: the files one process writes, tensor for tensor."""
    import json
    import os

    from safetensors.torch import load_file
    got = run_ranks(_save_cases, str(tmp_path / "sharded"), reserve, mixed)
    assert {k: got[0][k] for k in ("active", "b")} == {"active": True, "b": True}
    single = _save_net(reserve)
    if mixed:  # (gathered under bfloat16 compute, the factors were saved as bfloat16 copies: 3.5e-3 off)
        want = lora.lora_state_dict(single)
        assert set(got[0]["state"]) == set(want) and all(torch.equal(got[0]["state"][k], want[k]) for k in want)
    for name, adapter in (("active", None), ("b", "b")):
        lora.save_peft_adapter(single, str(tmp_path / "single" / name), adapter_name=adapter)
        want = load_file(str(tmp_path / "single" / name / "adapter_model.safetensors"))
        have = load_file(str(tmp_path / "sharded" / name / "adapter_model.safetensors"))
        assert set(have) == set(want) and all(torch.equal(have[k], want[k]) for k in want), name
        with open(os.path.join(tmp_path, "single", name, "adapter_config.json")) as f, \
                open(os.path.join(tmp_path, "sharded", name, "adapter_config.json")) as g:
            assert json.load(f) == json.load(g)


# -- a conv weight sharded along dim 1: refused before any layer is written -------------------------------------------

class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = lora.Linear(8, 6 * 4, r=2, lora_alpha=4)
        self.conv = lora.Conv2d(6, 4, kernel_size=2, r=2, lora_alpha=4)  # (dims that split evenly: FSDP's rule)

    def forward(self, x):
        return self.conv(self.lin(x).reshape(-1, 6, 2, 2))


def _conv_net():
    torch.manual_seed(0)
    net = _ConvNet().double()
    with torch.no_grad():
        for m in (net.lin, net.conv):
            m.lora_B.normal_(0, 0.5)
    return net


_XC = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _dim1_cases(rank, world, variant="dim1"):
    import warnings

    from torch.distributed.tensor import Shard
    net = _conv_net()
    fully_shard(net.lin)
    dim = 2 if variant == "dim2" else 1
    fully_shard(net.conv, shard_placement_fn=lambda p: Shard(dim) if p.dim() == 4 else Shard(0),
                reshard_after_forward=variant != "gathered")
    fully_shard(net)
    if variant == "gathered":  # (the conv's parameters all-gathered plain tensors now: judged as sharded)
        with torch.no_grad():
            net(_XC)
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.eval()
    out["warned"] = [str(w.message) for w in caught]
    out["flags"] = (net.lin.merged, net.conv.merged, net.training, net.lin.training, net.conv.training)
    with torch.no_grad():
        out["eval"] = net(_XC)
    try:
        lora.merge_adapter(net)
        out["merge_adapter"] = None
    except ValueError as e:
        out["merge_adapter"] = str(e)
    out["after"] = (net.lin.merged, net.conv.merged)
    torch.manual_seed(0)  # a grouped conv whose update's rows (out/groups * kernel height) do not split by channel
    grouped = nn.Sequential(lora.Linear(4, 4, r=2), lora.Conv2d(4, 4, 3, groups=2, r=2)).double()
    fully_shard(grouped[0])
    fully_shard(grouped[1])
    fully_shard(grouped)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grouped.eval()
    out["grouped"] = ([str(w.message) for w in caught], grouped[1].merged, grouped[1].training)
    return out


@pytest.mark.parametrize("variant", ["dim1", "dim2", "gathered"])
def test_eval_of_a_conv_sharded_along_dim_1_warns_and_leaves_it_unmerged_before_writing(variant):
    """It merged the layers before the conv, flipped their training flags, then raised inside the conv's merge
    ("a 4-D weight sharded along dim 1 is not supported"), the conv left training. Expected: eval() warns naming
    the conv and serves it unmerged, every module in eval mode; merge_adapter refuses with nothing merged."""
    got = run_ranks(_dim1_cases, variant)
    with torch.no_grad():
        want = _conv_net()(_XC)
    said = "Shard(dim=2)" if variant == "dim2" else "4-D weight sharded along dim 1"
    for r in got:
        assert any(said in w for w in r["warned"]), r["warned"]
        assert r["flags"][1:] == (False, False, False, False)  # the conv unmerged; every module evaluating
        assert (r["eval"] - want).abs().max().item() < 1e-12
        assert said in r["merge_adapter"] and r["after"][1] is False
        warned, merged, training = r["grouped"]
        assert any("do not fall whole into channels" in w for w in warned) and (merged, training) == (False, False)


def _save_fail_cases(rank, world, path, how="root"):
    from torch.distributed.tensor import Shard
    net = _save_net()
    if how == "hsdp_layer":  # one layer on a (1, 2) HSDP mesh, the root on (2,): the same two ranks gathered over
        from torch.distributed.device_mesh import init_device_mesh
        fully_shard(lora_layers_of(net)[0], mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("rep", "shard")))
    elif how != "root":  # (a DeviceMesh object per fully_shard call, the same ranks: one group)
        found = lora_layers_of(net)
        for m in found:  # mixed: the last layer sharded along dim 1 (two placements, one group still)
            fully_shard(m, shard_placement_fn=(lambda p: Shard(1) if p.dim() == 2 else Shard(0))
                        if how == "mixed" and m is found[-1] else None)
    fully_shard(net)
    try:
        lora.save_peft_adapter(net, path)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("how", ["root", "per_layer", "mixed", "hsdp_layer"])
def test_a_save_rank_0_cannot_write_raises_on_every_rank(tmp_path, how):
    """Rank 0 writes; a write that failed there (a path under a regular file) left the other ranks returning as if
    the adapter were saved (per layer: each fully_shard's own mesh object was taken for another group; mixed: a
    layer sharded along dim 1 beside others along dim 0 was taken for another group; hsdp_layer: a (1, 2) mesh
    beside a (2,) one, the same two ranks)."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    got = run_ranks(_save_fail_cases, str(blocker / "sub"), how)
    assert got[0] is not None and "NotADirectoryError" in got[0]
    assert got[1] is not None and "rank 0, which writes the adapter, could not write" in got[1]
    assert "NotADirectoryError" in got[1]


def _submesh_save_cases(rank, world, path, savers):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))["shard"]
    net = _save_net()
    fully_shard(net, mesh=mesh)
    return lora.save_peft_adapter(net, path) if rank in savers else None


def test_one_replica_of_a_sub_mesh_saves_and_its_first_rank_writes(tmp_path):
    """data parallel x FSDP2 (a 2 x 2 mesh), replica 1 (ranks 2, 3) saving: global rank 0 was taken for the writer,
    so nothing was written while both returned as saved; then the agreement on the world group hung until the
    process group's timeout. The mesh's first rank writes, the agreement runs on the mesh's group."""
    from safetensors.torch import load_file
    got = run_ranks(_submesh_save_cases, str(tmp_path / "r1"), (2, 3), world=4, timeout=120)
    assert got[2] == got[3] == ["0", "1", "2"] and got[0] is got[1] is None
    single = _save_net()
    lora.save_peft_adapter(single, str(tmp_path / "single"))
    want = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    have = load_file(str(tmp_path / "r1" / "adapter_model.safetensors"))
    assert set(have) == set(want) and all(torch.equal(have[k], want[k]) for k in want)


def _hsdp_save_cases(rank, world, tmp, mode):
    import os

    from torch.distributed.device_mesh import init_device_mesh
    net = _save_net()
    fully_shard(net, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard")))  # HSDP
    if mode == "replica1":  # replica 1 (ranks 2, 3) saves alone
        return lora.save_peft_adapter(net, os.path.join(tmp, "r1")) if rank >= 2 else None
    if mode == "each":  # each replica to its own path
        return lora.save_peft_adapter(net, os.path.join(tmp, f"r{rank // 2}"))
    if rank == 0:  # "fail0": rank 0 cannot write
        open(os.path.join(tmp, "blocker"), "w").close()
    torch.distributed.barrier()
    try:
        return lora.save_peft_adapter(net, os.path.join(tmp, "blocker", "sub"))
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("mode", ["replica1", "each", "fail0"])
def test_hsdp_replicas_save_where_their_first_rank_writes(tmp_path, mode):
    """On HSDP's 2-D mesh the writer was rank 0 of the whole mesh: replica 1 saving wrote nothing and returned as
    saved, and a failed write on rank 0 left its replica's other rank returning as saved."""
    from safetensors.torch import load_file
    got = run_ranks(_hsdp_save_cases, str(tmp_path), mode, world=4, timeout=120)
    if mode == "fail0":
        assert "NotADirectoryError" in got[0] and "could not write" in got[1], got
        return
    lora.save_peft_adapter(_save_net(), str(tmp_path / "single"))
    want = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    for d in (["r1"] if mode == "replica1" else ["r0", "r1"]):
        have = load_file(str(tmp_path / d / "adapter_model.safetensors"))
        assert set(have) == set(want) and all(torch.equal(have[k], want[k]) for k in want), d
