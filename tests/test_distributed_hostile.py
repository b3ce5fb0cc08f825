"""Hostile tests of the distributed / autocast features: FSDP2, tensor parallel, DDP, autocast. Expectations
come from one-process runs or float64 oracles, never from the code under test on the same path."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_ext as lora
from dist import run_ranks


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _full(v):
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def _try(out, key, fn):
    try:
        out[key] = fn()
    except Exception as e:  # noqa: BLE001 - recorded for the assertions in the parent
        out[key] = f"RAISED {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------------------
# FSDP2: small, uneven layers

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        kw = dict(r=2, lora_alpha=4, lossless=True)
        self.a = lora.Linear(4, 5, **kw)             # 3 / 2 rows
        self.one = lora.Linear(5, 1, **kw)           # 1 / 0 rows: rank 1 holds nothing
        self.conv = lora.Conv2d(1, 3, kernel_size=3, padding=1, **kw)
        self.qkv = lora.MergedLinear(4, 6, enable_lora=[True, True, True], **kw)  # 3 / 3 rows: block 1 cut

    def forward(self, x):  # x: (N, 4)
        h = torch.tanh(self.a(x))
        y = self.one(h)
        c = self.conv(x.view(-1, 1, 2, 2))
        return torch.cat([y, c.flatten(1), self.qkv(x)], dim=1)


def small_build():
    torch.manual_seed(0)
    net = Small()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, lora.LoRALayer):
            nn.init.normal_(m.lora_B, std=0.3)
            (ra, ca), (rb, cb) = m.factor_shapes(m.r)
            # same rank, another scaling
            m.add_adapter("b", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 0.37)
    lora.mark_only_lora_as_trainable(net, bias="lora_only")
    return net


def small_x():
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(2))


def small_run(net):
    x = small_x()
    out = {}
    with torch.no_grad():
        out["unmerged"] = net(x)
        net.eval()
        out["merged"] = net(x)
        lora.set_adapter(net, "b")
        out["merged_b"] = net(x)
        net.train()
        out["unmerged_b"] = net(x)
        lora.set_adapter(net, "default")
        out["back"] = net(x)
    out["alphas"] = [(m.r, m.lora_alpha, m.scaling) for m in net.modules() if isinstance(m, lora.LoRALayer)]
    return out


def _shard_small(net, **kw):
    from torch.distributed.fsdp import fully_shard
    for m in (net.a, net.one, net.conv, net.qkv):
        fully_shard(m, **kw)
    fully_shard(net, **kw)
    return net


def fsdp_small_case(rank, world):
    out = {}
    net = _shard_small(small_build())
    _try(out, "run", lambda: small_run(net))
    # lora_state_dict with biases: the README says "gathered: whole tensors"
    _try(out, "sd_types", lambda: {k: type(v).__name__ for k, v in lora.lora_state_dict(net, bias="lora_only").items()})
    _try(out, "sd", lambda: {k: _full(v) for k, v in lora.lora_state_dict(net, bias="lora_only").items()})
    _try(out, "sd_all_types", lambda: {k: type(v).__name__ for k, v in lora.lora_state_dict(net, bias="all").items()})
    # reshard_after_forward=False, then model-level merge (documented to reshard first)
    net2 = _shard_small(small_build(), reshard_after_forward=False)
    x = small_x()

    def unresharded():
        r = {}
        with torch.no_grad():
            net2(x)                      # parameters stay all-gathered
            lora.merge_adapter(net2)
            r["merged"] = net2(x)
            net2(x)
            lora.unmerge_adapter(net2)
            r["unmerged"] = net2(x)
            net2.reshard()
            r["weights"] = {k: _full(v) for k, v in net2.state_dict().items() if "lora_" not in k}
        return r
    _try(out, "noreshard", unresharded)
    # add_adapter of the active name while merged: the new factors merged instead of the old ones
    net3 = _shard_small(small_build())

    def replace_active():
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            net3.eval()
            for m in (net3.a, net3.one, net3.conv, net3.qkv):
                (ra, ca), (rb, cb) = m.factor_shapes(2)
                m.add_adapter("default", torch.randn(ra, ca, generator=g), torch.randn(rb, cb, generator=g), 0.9)
            return net3(x)
    _try(out, "replace_active", replace_active)
    return out


def single_replace_active():
    net = small_build()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        net.eval()
        for m in (net.a, net.one, net.conv, net.qkv):
            (ra, ca), (rb, cb) = m.factor_shapes(2)
            m.add_adapter("default", torch.randn(ra, ca, generator=g), torch.randn(rb, cb, generator=g), 0.9)
        return net(small_x())


@pytest.fixture(scope="module")
def fsdp_small():
    return run_ranks(fsdp_small_case)


def test_fsdp_uneven_and_empty_shards_match_one_process(fsdp_small):
    single = small_run(small_build())
    for r in fsdp_small:
        assert isinstance(r["run"], dict), r["run"]
        for key in ("unmerged", "merged", "merged_b", "unmerged_b", "back"):
            assert _rel(r["run"][key], single[key]) < 1e-5, key


def test_fsdp_switch_keeps_lora_alpha_consistent_with_scaling(fsdp_small):
    """After a switch to an adapter of the same rank and another scaling and back, r / lora_alpha / scaling
    are as in one process (lora_alpha = scaling * r there)."""
    single = small_run(small_build())
    for r in fsdp_small:
        assert r["run"]["alphas"] == single["alphas"]


def test_fsdp_lora_state_dict_with_biases_is_gathered(fsdp_small):
    net = small_build()
    single = lora.lora_state_dict(net, bias="lora_only")
    for r in fsdp_small:
        assert isinstance(r["sd_types"], dict), r["sd_types"]
        assert set(r["sd_types"].values()) == {"Tensor"}, f"lora_state_dict under FSDP2 returned {r['sd_types']}"
        assert set(r["sd_all_types"].values()) == {"Tensor"}, r["sd_all_types"]
        for k, v in single.items():
            assert torch.equal(r["sd"][k], v), k


def test_fsdp_merge_adapter_after_reshard_after_forward_false(fsdp_small):
    net = small_build()
    x = small_x()
    with torch.no_grad():
        base = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
        lora.merge_adapter(net)
        merged = net(x)
        lora.unmerge_adapter(net)
        unmerged = net(x)
    for r in fsdp_small:
        assert isinstance(r["noreshard"], dict), r["noreshard"]
        assert _rel(r["noreshard"]["merged"], merged) < 1e-5
        assert _rel(r["noreshard"]["unmerged"], unmerged) < 1e-5
        for k, v in base.items():
            assert torch.equal(r["noreshard"]["weights"][k], v), k


def test_fsdp_add_adapter_of_the_active_name_while_merged(fsdp_small):
    ref = single_replace_active()
    for r in fsdp_small:
        assert isinstance(r["replace_active"], torch.Tensor), r["replace_active"]
        assert _rel(r["replace_active"], ref) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# FSDP2: a lossless merged switch that overflows its exception list on rank 0 only

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.z = lora.Linear(64, 64, r=2, lora_alpha=2, lossless=True, bias=False)
        self.o = lora.Linear(64, 8, r=2, lora_alpha=2, lossless=True, bias=False)

    def forward(self, x):
        return self.o(self.z(x))


def two_build():
    torch.manual_seed(0)
    net = Two()
    with torch.no_grad():
        net.z.weight[:32].zero_()        # rank 0's shard: zeros
        net.z.lora_B.zero_()             # the live adapter adds nothing (no exceptions when merged)
        nn.init.normal_(net.o.lora_B)
    g = torch.Generator().manual_seed(3)
    for m in (net.z, net.o):
        (ra, ca), (rb, cb) = m.factor_shapes(2)
        m.add_adapter("b", torch.randn(ra, ca, generator=g), torch.randn(rb, cb, generator=g), 1.0)
    return net


def fsdp_overflow_case(rank, world):
    from torch.distributed.fsdp import fully_shard
    net = two_build()
    fully_shard(net.z)
    fully_shard(net.o)
    fully_shard(net)
    out = {}
    net.eval()
    try:
        lora.set_adapter(net, "b")
        out["switch"] = "ok"
    except Exception as e:  # noqa: BLE001
        out["switch"] = f"{type(e).__name__}: {e}"
    out["active"] = [m.active_adapter for m in (net.z, net.o)]
    return out


def test_fsdp_switch_refused_on_one_rank_does_not_leave_ranks_on_different_adapters():
    # one process, the same model: the switch is refused (rank 0's zero rows cannot be recorded)
    single = two_build()
    single.eval()
    with pytest.raises(ValueError):
        lora.set_adapter(single, "b")
    r0, r1 = run_ranks(fsdp_overflow_case, timeout=120)
    assert r0["active"] == r1["active"], (f"ranks diverged: rank 0 {r0['switch']!r} {r0['active']}, "
                                          f"rank 1 {r1['switch']!r} {r1['active']}")


# ---------------------------------------------------------------------------------------------------------------
# tensor parallel

class RowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)                               # replicated, trainable
        self.row = lora.Linear(8, 6, r=2, lora_alpha=4)          # RowwiseLoRA, given the whole input

    def forward(self, x):
        return self.row(torch.tanh(self.pre(x)))


def row_build():
    torch.manual_seed(0)
    net = RowNet()
    nn.init.normal_(net.row.lora_B, std=0.3)
    net.row.weight.requires_grad_(False)
    return net


def row_grads(net):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    loss = net(x).pow(2).sum()
    loss.backward()
    return {"out": net(x).detach(), "pre.weight": _full(net.pre.weight.grad).clone(),
            "lora_A": _full(net.row.lora_A.grad).clone(), "lora_B": _full(net.row.lora_B.grad).clone()}


class ColNet(nn.Module):
    def __init__(self):
        super().__init__()
        kw = dict(r=2, lora_alpha=4, lossless=True)
        self.qkv = lora.MergedLinear(5, 6, enable_lora=[True, True, True], fan_in_fan_out=True, **kw)  # block 1 cut
        self.emb = lora.Embedding(10, 6, max_norm=1.0, **kw)

    def forward(self, x, ids):
        return self.qkv(x), self.emb(ids)


def col_build():
    torch.manual_seed(0)
    net = ColNet()
    g = torch.Generator().manual_seed(1)
    for m in (net.qkv, net.emb):
        nn.init.normal_(m.lora_B, std=0.3)
        nn.init.normal_(m.lora_A, std=0.3)
        (ra, ca), (rb, cb) = m.factor_shapes(m.r)
        m.add_adapter("b", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 0.5)
    with torch.no_grad():
        net.emb.weight.mul_(3.0)  # rows above max_norm: renormalised in the lookup
    lora.mark_only_lora_as_trainable(net)
    return net


def col_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 5, generator=g), torch.randint(0, 10, (4, 3), generator=g)


def col_run(net):
    x, ids = col_inputs()
    out = {}
    with torch.no_grad():
        out["unmerged"] = net(x, ids)
        net.eval()
        out["merged"] = net(x, ids)
        lora.set_adapter(net, "b")
        out["merged_b"] = net(x, ids)
        net.train()
        out["unmerged_b"] = net(x, ids)
    return out


def tp_case(rank, world):
    import sys

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    # stock RowwiseParallel by a user who never imported lora_ext.parallel themselves (`import lora_ext` does)
    out["parallel_imported_first"] = "lora_ext.parallel" in sys.modules
    st0 = row_build()
    _try(out, "stock_row_no_import", lambda: parallelize_module(st0, mesh, {"row": RowwiseParallel()}) and "ok")
    from lora_ext.parallel import ColwiseLoRA, RowwiseLoRA
    net = row_build()
    parallelize_module(net, mesh, {"row": RowwiseLoRA()})
    _try(out, "row", lambda: row_grads(net))
    cn = col_build()
    parallelize_module(cn, mesh, {"qkv": ColwiseLoRA()})
    # an Embedding with max_norm would renormalise each rank's slice by its own norm: refused
    _try(out, "emb_refusal", lambda: parallelize_module(cn.emb, mesh, ColwiseLoRA()))
    _try(out, "col", lambda: col_run(cn))
    out["col_emb_weight"] = _full(cn.emb.weight.detach())
    # stock RowwiseParallel on a lora_ext Linear: refused with a message naming the lora_ext styles?
    st = row_build()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))

    def stock():
        parallelize_module(st, mesh, {"row": RowwiseParallel()})
        return st(x).detach()
    _try(out, "stock_row", stock)
    out["stock_untouched"] = not any(hasattr(p, "placements") for p in st.parameters())
    sc = row_build()
    _try(out, "stock_col", lambda: parallelize_module(sc, mesh, {"row": ColwiseParallel()}) and "ok")
    out["stock_untouched"] &= not any(hasattr(p, "placements") for p in sc.parameters())
    # a merged layer parallelized
    mg = row_build()
    mg.row.eval()
    _try(out, "merged_par", lambda: parallelize_module(mg, mesh, {"row": ColwiseLoRA()}) and "ok")
    # deepcopy of a parallelized layer
    dc = row_build()
    parallelize_module(dc, mesh, {"row": RowwiseLoRA()})

    def deep():
        c = copy.deepcopy(dc)
        with torch.no_grad():
            return c(x)
    _try(out, "deepcopy", deep)
    return out


@pytest.fixture(scope="module")
def tp():
    return run_ranks(tp_case)


def test_rowwise_given_the_whole_input_gives_whole_input_gradients(tp):
    single = row_grads(row_build())
    for r in tp:
        assert isinstance(r["row"], dict), r["row"]
        for k in ("out", "lora_A", "lora_B"):
            assert _rel(r["row"][k], single[k]) < 1e-5, k
        assert _rel(r["row"]["pre.weight"], single["pre.weight"]) < 1e-5, (
            f"gradient upstream of a RowwiseLoRA given the whole input: {_rel(r['row']['pre.weight'], single['pre.weight']):.3g}"
            f" from one process")


def test_colwise_merged_linear_fan_in_fan_out_blocks_cut_by_the_shard(tp):
    single = col_run(col_build())
    for rank, r in enumerate(tp):
        assert isinstance(r["col"], dict), r["col"]
        lo, hi = (0, 3) if rank == 0 else (3, 6)
        for key in ("unmerged", "merged", "merged_b", "unmerged_b"):
            assert _rel(r["col"][key][0], single[key][0][..., lo:hi]) < 1e-5, f"qkv {key}"


def test_colwise_embedding_with_max_norm_is_refused(tp):
    """ColwiseLoRA on an Embedding with max_norm would renormalise each rank's slice by that slice's norm (0.55
    relative error against one process before the fix): refused with a message; the model runs unsharded there."""
    single = col_run(col_build())
    for r in tp:
        assert "max_norm" in str(r["emb_refusal"]) and "Embedding(10, 6)" in str(r["emb_refusal"]), r["emb_refusal"]
        for key in ("unmerged", "merged", "merged_b", "unmerged_b"):
            assert _rel(r["col"][key][1], single[key][1]) < 1e-5, f"emb {key}"


def test_stock_rowwise_parallel_is_refused_or_correct(tp):
    """torch's RowwiseParallel on a lora_ext Linear failed inside torch (AttributeError: 'Identity' object has no
    attribute 'weight', on the layer's lora_dropout child); now refused before anything changes, naming
    RowwiseLoRA (lora_ext.parallel makes torch's distribute_module refuse lora_ext layers)."""
    net = row_build()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = net(x)
    for r in tp:
        got = r["stock_row"]
        if isinstance(got, torch.Tensor):
            assert _rel(got, ref) < 1e-5, "stock RowwiseParallel ran and gave a wrong output silently"
        else:
            assert got.startswith("RAISED ValueError") and "RowwiseLoRA" in got, got
    for r in tp:
        assert "ColwiseLoRA" in r["stock_col"] and r["stock_col"].startswith("RAISED ValueError"), r["stock_col"]
        assert r["stock_untouched"], "a refused stock style must leave the layer's parameters as they were"


def test_stock_rowwise_parallel_refused_without_importing_lora_ext_parallel(tp):
    for r in tp:
        assert r["parallel_imported_first"], "import lora_ext must install the refusal of torch's stock styles"
        assert "RowwiseLoRA" in r["stock_row_no_import"], r["stock_row_no_import"]


def test_a_merged_layer_is_refused_by_the_styles(tp):
    for r in tp:
        assert r["merged_par"].startswith("RAISED ValueError") and "merged" in r["merged_par"], r["merged_par"]


def test_deepcopy_of_a_parallelized_model(tp):
    net = row_build()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = net(x)
    for r in tp:
        got = r["deepcopy"]
        if isinstance(got, torch.Tensor):
            assert _rel(got, ref) < 1e-5
        else:
            assert "Linear" in got, f"deepcopy failed without naming the layer: {got}"


# ---------------------------------------------------------------------------------------------------------------
# DDP through torch.compile

class DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = lora.Linear(6, 5, r=2, lora_alpha=4)
        self.b = lora.Linear(5, 3, r=2, lora_alpha=4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def dnet_build(trainable):
    torch.manual_seed(0)
    net = DNet()
    g = torch.Generator().manual_seed(1)
    for m in (net.a, net.b):
        nn.init.normal_(m.lora_B, std=0.3)
        (ra, ca), (rb, cb) = m.factor_shapes(2)
        m.add_adapter("b", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 0.6)
    if trainable:
        lora.mark_only_lora_as_trainable(net)
    else:  # serving: only the biases train
        for n, p in net.named_parameters():
            p.requires_grad = n.endswith("bias")
    return net


def dnet_x():
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(2))


def ddp_case(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    x = dnet_x()
    tr = torch.compile(DDP(dnet_build(True)), backend="eager")

    def refused():
        lora.set_adapter(tr, "b")
        return "ok"
    _try(out, "trainable", refused)
    out["keys"] = sorted(lora.lora_state_dict(DDP(torch.compile(dnet_build(True), backend="eager"))))
    sv = torch.compile(DDP(dnet_build(False)), backend="eager")

    def serving():
        r = {}
        with torch.no_grad():
            r["a"] = sv(x)
            lora.set_adapter(sv, "b")
            r["b"] = sv(x)
            sv.eval()
            r["b_merged"] = sv(x)
            lora.set_adapter(sv, "default")
            r["back_merged"] = sv(x)
        return r
    _try(out, "serving", serving)
    return out


def test_ddp_through_compile():
    single = dnet_build(False)
    x = dnet_x()
    with torch.no_grad():
        ref = {"a": single(x)}
        lora.set_adapter(single, "b")
        ref["b"] = single(x)
        single.eval()
        ref["b_merged"] = single(x)
        lora.set_adapter(single, "default")
        ref["back_merged"] = single(x)
    keys = sorted(lora.lora_state_dict(dnet_build(True)))
    for r in run_ranks(ddp_case):
        assert r["trainable"].startswith("RAISED ValueError") and "'a'" in r["trainable"] or "a" in r["trainable"], \
            r["trainable"]
        assert "DistributedDataParallel" in r["trainable"], r["trainable"]
        assert r["keys"] == keys
        assert isinstance(r["serving"], dict), r["serving"]
        for k, v in ref.items():
            assert _rel(r["serving"][k], v) < 1e-5, k


# ---------------------------------------------------------------------------------------------------------------
# autocast on the CPU, against float64 oracles

def _linear64(layer, x):
    w = layer.weight.double()
    w = w.t() if layer.fan_in_fan_out else w
    y = x.double() @ w.t() + (0 if layer.bias is None else layer.bias.double())
    A, B = layer.lora_A.double(), layer.lora_B.double()
    if isinstance(layer, lora.MergedLinear):
        nblk = len(layer.enable_lora)
        nb = layer.out_features // nblk
        n = len(layer._block_ids)
        r = A.shape[0] // n
        delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
        for j, e in enumerate(layer._block_ids):
            delta[e * nb:(e + 1) * nb] = B[j * nb:(j + 1) * nb] @ A[j * r:(j + 1) * r]
    else:
        delta = B @ A
    return y + layer.scaling * x.double() @ delta.t()


def _ac_layers():
    torch.manual_seed(0)
    lin = lora.Linear(16, 12, r=4, lora_alpha=8)
    ml = lora.MergedLinear(16, 12, r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=True)
    for m in (lin, ml):
        nn.init.normal_(m.lora_B, std=0.3)
    return lin, ml


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("merged", [False, True])
def test_cpu_autocast_dtype_and_values(dtype, merged):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    for layer in _ac_layers():
        ref = _linear64(layer, x)
        if merged:
            layer.eval()
        plain = F.linear(x, layer.weight.t() if layer.fan_in_fan_out else layer.weight)
        with torch.no_grad(), torch.autocast("cpu", dtype):
            want_dtype = F.linear(x, layer.weight.t() if layer.fan_in_fan_out else layer.weight).dtype
            y = layer(x)
            with torch.autocast("cpu", enabled=False):
                y_off = layer(x)
        assert plain.dtype == torch.float32
        assert y.dtype == want_dtype == dtype, (type(layer).__name__, y.dtype)
        assert _rel(y, ref) < 1e-2, (type(layer).__name__, _rel(y, ref))
        assert y_off.dtype == torch.float32
        assert _rel(y_off, ref) < 1e-5, (type(layer).__name__, merged)


def test_cpu_autocast_compiled_inductor_matches_oracle():
    lin, _ = _ac_layers()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    ref = _linear64(lin, x)
    c = torch.compile(lin)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        y = c(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y, ref) < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# FSDP2: merged before fully_shard; a layer's own eval() with reshard_after_forward=False; loading new factors
# into a merged sharded model

def merged_first_case(rank, world, lossless_flag):
    out = {}
    net = small_build()
    for m in net.modules():
        if isinstance(m, lora.LoRALayer):
            m.lossless = lossless_flag
    x = small_x()

    def go():
        r = {}
        with torch.no_grad():
            net.eval()                   # merged on one process, then sharded
            _shard_small(net)
            r["merged"] = net(x)
            lora.set_adapter(net, "b")
            r["merged_b"] = net(x)
            net.train()
            r["unmerged_b"] = net(x)
            r["weights"] = {k: _full(v) for k, v in net.state_dict().items() if "lora_" not in k}
        return r
    _try(out, "run", go)
    return out


@pytest.mark.parametrize("lossless_flag", [True, False])
def test_fsdp_of_a_model_merged_before_fully_shard(lossless_flag):
    net = small_build()
    x = small_x()
    base = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        net.eval()
        ref = {"merged": net(x)}
        lora.set_adapter(net, "b")
        ref["merged_b"] = net(x)
        net.train()
        ref["unmerged_b"] = net(x)
    for r in run_ranks(merged_first_case, lossless_flag):
        got = r["run"]
        if isinstance(got, str):  # a refusal must name the layer and say what to do
            assert "fully_shard" in got and ("Linear" in got or "Conv" in got), got
            continue
        for k in ("merged", "merged_b", "unmerged_b"):
            assert _rel(got[k], ref[k]) < 1e-5, k
        for k, v in base.items():
            if lossless_flag:
                assert torch.equal(got["weights"][k], v), k
            else:
                assert _rel(got["weights"][k], v) < 1e-6, k


def layer_eval_case(rank, world):
    out = {}
    net = _shard_small(small_build(), reshard_after_forward=False)
    x = small_x()

    def go():
        r = {}
        with torch.no_grad():
            net(x)
            net.eval()                   # the README: call net.reshard() first; not doing so must not corrupt
            r["merged"] = net(x)
            net.train()
            r["unmerged"] = net(x)
            net.reshard()
            r["after_reshard"] = net(x)
            net.reshard()
            r["weights"] = {k: _full(v) for k, v in net.state_dict().items() if "lora_" not in k}
        return r
    _try(out, "run", go)
    return out


def test_fsdp_layer_eval_without_reshard_is_not_silently_wrong():
    net = small_build()
    x = small_x()
    base = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        net.eval()
        merged = net(x)
        net.train()
        unmerged = net(x)
    for r in run_ranks(layer_eval_case):
        got = r["run"]
        if isinstance(got, str):
            assert "reshard" in got, got
            continue
        assert _rel(got["merged"], merged) < 1e-5
        assert _rel(got["unmerged"], unmerged) < 1e-5
        assert _rel(got["after_reshard"], unmerged) < 1e-5
        for k, v in base.items():
            assert torch.equal(got["weights"][k], v), k


def load_into_merged_case(rank, world):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    out = {}
    net = _shard_small(small_build())
    x = small_x()
    g = torch.Generator().manual_seed(9)
    new = {k: torch.randn(v.shape, generator=g) for k, v in lora.lora_state_dict(small_build()).items()}

    def go():
        with torch.no_grad():
            net.eval()
            set_model_state_dict(net, new, options=StateDictOptions(full_state_dict=True, strict=False))
            return {"out": net(x), "flags": [m.merged for m in net.modules() if isinstance(m, lora.LoRALayer)],
                    "sd": lora.lora_state_dict(net)}
    _try(out, "run", go)
    return out


def test_fsdp_loading_new_factors_into_a_merged_model():
    net = small_build()
    g = torch.Generator().manual_seed(9)
    new = {k: torch.randn(v.shape, generator=g) for k, v in lora.lora_state_dict(small_build()).items()}
    with torch.no_grad():
        net.eval()
        net.load_state_dict(new, strict=False)
        ref = net(small_x())
    for r in run_ranks(load_into_merged_case):
        got = r["run"]
        assert isinstance(got, dict), got
        assert got["flags"] == [True] * 4
        for k, v in new.items():
            assert torch.equal(got["sd"][k], v), k
        assert _rel(got["out"], ref) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# tensor parallel: float16 weights (lossless by default) and autocast

class HalfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = lora.Linear(8, 10, r=2, lora_alpha=4)
        self.down = lora.MergedLinear(10, 6, r=2, lora_alpha=4, enable_lora=[True, False, True])

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def half_build(dtype):
    torch.manual_seed(0)
    net = HalfNet()
    g = torch.Generator().manual_seed(1)
    for m in (net.up, net.down):
        nn.init.normal_(m.lora_B, std=0.3)
        (ra, ca), (rb, cb) = m.factor_shapes(2)
        m.add_adapter("b", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 0.5)
    return net.to(dtype)


def half_x():
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(2))


def half_run(net, dtype, autocast):
    x = half_x().to(torch.float32 if autocast else dtype)
    out = {}
    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        with ctx:
            out["unmerged"] = net(x)
        net.eval()
        with ctx:
            out["merged"] = net(x)
        lora.set_adapter(net, "b")
        with ctx:
            out["merged_b"] = net(x)
        net.train()
        lora.set_adapter(net, "default")
    return out


def tp2_case(rank, world, dtype, autocast):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseLoRA, RowwiseLoRA
    out = {}
    net = half_build(dtype)
    parallelize_module(net, init_device_mesh("cpu", (world,)), {"up": ColwiseLoRA(), "down": RowwiseLoRA()})
    _try(out, "run", lambda: half_run(net, dtype, autocast))
    out["weights"] = {n: _full(m.weight.detach()) for n, m in net.named_children()}
    return out


@pytest.mark.parametrize("dtype,autocast", [(torch.float16, False), (torch.float32, True)])
def test_tensor_parallel_half_weights_and_autocast(dtype, autocast):
    net = half_build(dtype)
    base = {n: m.weight.detach().clone() for n, m in net.named_children()}
    ref = half_run(net, dtype, autocast)
    for r in run_ranks(tp2_case, dtype, autocast):
        assert isinstance(r["run"], dict), r["run"]
        for k, v in ref.items():
            assert _rel(r["run"][k], v) < 1e-2, (k, _rel(r["run"][k], v))
            assert r["run"][k].dtype == v.dtype, f"{k}: {r['run'][k].dtype}, one process gives {v.dtype}"
        if dtype != torch.float32:  # float32 merges are lossy by default (README)
            for n, v in base.items():
                assert torch.equal(r["weights"][n], v), f"{n}: merge cycles must give the {dtype} base back bit for bit"


# ---------------------------------------------------------------------------------------------------------------
# tensor parallel: a switch to an adapter of another rank; lora_state_dict with biases

def tp_rank_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseLoRA, RowwiseLoRA
    out = {}
    net = half_build(torch.float32)
    g = torch.Generator().manual_seed(11)
    for m in (net.up, net.down):
        (ra, ca), (rb, cb) = m.factor_shapes(4)
        m.add_adapter("wide", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 0.25)
    parallelize_module(net, init_device_mesh("cpu", (world,)), {"up": ColwiseLoRA(), "down": RowwiseLoRA()})

    def go():
        with torch.no_grad():
            lora.set_adapter(net, "wide")
            return net(half_x())
    _try(out, "wide", go)
    out["sd_types"] = {k: type(v).__name__ for k, v in lora.lora_state_dict(net, bias="lora_only").items()}
    return out


@pytest.fixture(scope="module")
def tp_rank():
    return run_ranks(tp_rank_case)


def test_tensor_parallel_switch_to_another_rank(tp_rank):
    net = half_build(torch.float32)
    g = torch.Generator().manual_seed(11)
    for m in (net.up, net.down):
        (ra, ca), (rb, cb) = m.factor_shapes(4)
        m.add_adapter("wide", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 0.25)
    lora.set_adapter(net, "wide")
    with torch.no_grad():
        ref = net(half_x())
    for r in tp_rank:
        got = r["wide"]
        if isinstance(got, str):  # refused: the advice must fit tensor parallelism, not FSDP2
            assert "lora_ext.parallel" in got and "rank 4" in got, got
        else:
            assert _rel(got, ref) < 1e-5


def test_tensor_parallel_lora_state_dict_with_biases_is_whole(tp_rank):
    for r in tp_rank:
        assert set(r["sd_types"].values()) == {"Tensor"}, r["sd_types"]


def tp_load_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseLoRA, RowwiseLoRA
    out = {}
    net = half_build(torch.float32)
    parallelize_module(net, init_device_mesh("cpu", (world,)), {"up": ColwiseLoRA(), "down": RowwiseLoRA()})
    g = torch.Generator().manual_seed(9)
    new = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora.lora_state_dict(half_build(torch.float32)).items()}

    def go():
        with torch.no_grad():
            net.eval()
            res = {"base": {k: _full(v) for k, v in net.state_dict().items() if "lora_" not in k}}
            try:
                net.load_state_dict(new, strict=False)   # plain tensors into DTensor parameters: torch refuses
                res["plain_load"] = "ok"
            except Exception as e:  # noqa: BLE001
                res["plain_load"] = f"RAISED {type(e).__name__}: {e}"
            res["flags_after_refused"] = [m.merged for m in (net.up, net.down)]
            res["out_after_refused"] = net(half_x())
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            try:
                set_model_state_dict(net, new, options=StateDictOptions(full_state_dict=True, strict=False))
                res["load"] = "ok"
            except Exception as e:  # noqa: BLE001
                res["load"] = f"RAISED {type(e).__name__}: {e}"
            res["flags"] = [m.merged for m in (net.up, net.down)]
            res["out"] = net(half_x())
            res["sd"] = lora.lora_state_dict(net)
            net.train()
            res["base_after"] = {k: _full(v) for k, v in net.state_dict().items() if "lora_" not in k}
            return res
    _try(out, "run", go)
    return out


def test_tensor_parallel_load_state_dict_into_a_merged_model():
    net = half_build(torch.float32)
    base = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    g = torch.Generator().manual_seed(9)
    new = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora.lora_state_dict(half_build(torch.float32)).items()}
    with torch.no_grad():
        net.eval()
        ref_before = net(half_x())
        net.load_state_dict(new, strict=False)
        ref = net(half_x())
    for r in run_ranks(tp_load_case):
        got = r["run"]
        assert isinstance(got, dict), got
        if got["plain_load"] != "ok":  # torch's refusal: the model must be left merged, as it was
            assert got["flags_after_refused"] == [True, True], "a refused load left the layers unmerged"
            assert _rel(got["out_after_refused"], ref_before) < 1e-5, "a refused load changed the output"
        for k, v in base.items():
            assert _rel(got["base"][k], v) < 1e-6, f"state_dict of a merged TP model: {k}"
            assert _rel(got["base_after"][k], v) < 1e-6, f"base after load + train(): {k}"
        if got["load"] != "ok":
            assert "Linear" in got["load"], got["load"]
            assert got["flags"] == [True, True], "a refused load must leave the layers merged as they were"
            continue
        assert got["flags"] == [True, True]
        for k, v in new.items():
            assert torch.equal(got["sd"][k], v), k
        assert _rel(got["out"], ref) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# tensor parallel: a column-parallel Embedding with padding_idx, gradients

def pad_build():
    torch.manual_seed(0)
    emb = lora.Embedding(10, 6, r=2, lora_alpha=4, padding_idx=0)
    nn.init.normal_(emb.lora_A, std=0.3)
    nn.init.normal_(emb.lora_B, std=0.3)
    lora.mark_only_lora_as_trainable(emb)
    return emb


def pad_ids():
    return torch.tensor([[0, 3, 0, 7], [1, 0, 9, 3]])


def pad_grads(emb, lo=0, hi=6):
    w = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))[..., lo:hi]
    y = emb(pad_ids())
    (y * w).sum().backward()
    return {"out": y.detach(), "lora_A": _full(emb.lora_A.grad).clone(), "lora_B": _full(emb.lora_B.grad).clone()}


def tp_pad_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseLoRA
    emb = pad_build()
    parallelize_module(emb, init_device_mesh("cpu", (world,)), ColwiseLoRA())
    out = {}
    lo, hi = (0, 3) if rank == 0 else (3, 6)
    _try(out, "g", lambda: pad_grads(emb, lo, hi))
    return out


def test_colwise_embedding_with_padding_idx_gradients():
    single = pad_grads(pad_build())
    for rank, r in enumerate(run_ranks(tp_pad_case)):
        lo, hi = (0, 3) if rank == 0 else (3, 6)
        assert isinstance(r["g"], dict), r["g"]
        assert _rel(r["g"]["out"], single["out"][..., lo:hi]) < 1e-5
        assert _rel(r["g"]["lora_A"], single["lora_A"]) < 1e-5, "lora_A gradient (the padding row?)"
        assert _rel(r["g"]["lora_B"], single["lora_B"]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# one process: merge_adapter refused part way (a lossless merge overflowing its exception list in the 2nd layer)

class OZ(nn.Module):
    def __init__(self, o, z):
        super().__init__()
        self.o, self.z = o, z

    def forward(self, x):
        return self.o(self.z(x))


def test_merge_adapter_refused_in_a_later_layer_leaves_no_layer_merged():
    net = two_build()
    with torch.no_grad():
        net.z.weight.zero_()
    model = OZ(net.o, net.z)  # the layer that cannot be recorded comes second
    lora.set_adapter(model, "b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w_before = model.o.weight.detach().clone()
    with pytest.raises(ValueError):
        lora.merge_adapter(model)
    flags = [m.merged for m in (model.o, model.z)]
    assert flags in ([False, False], [True, True]), f"merge_adapter refused part way left merged flags {flags}"
    assert torch.equal(model.o.weight, w_before), "the first layer's weight was changed by a refused merge_adapter"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
