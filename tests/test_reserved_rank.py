"""lora.reserve_rank (every adapter of a layer held at one rank, padded with zeros) and lora.hotswap_adapter (peft's:
an adapter's weights replaced in place): switches between adapters of other ranks and other target modules keep
the live storage a captured CUDA graph reads, against float64 oracles written here on every layer kind and against
the real peft (its prepare_model_for_compiled_hotswap and hotswap_adapter) on a Llama; refusals leave the model as
it was."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter as peft_hotswap
from peft.utils.hotswap import prepare_model_for_compiled_hotswap

import lora_ext as lora
from lora_ext.serving import lora_layers
from helpers import batch_open_on_another_thread, dense_delta64, peft_with_adapters, rel_err
from test_weighted_adapters import _logits, saved_adapters
from tiny_models import VOCAB, llama, snapshot, unchanged

KINDS = ["linear", "linear_fan", "merged", "embedding", "conv1d", "conv2d"]


def _layer(kind, r):
    if kind in ("linear", "linear_fan"):
        layer = lora.Linear(24, 20, r=r, lora_alpha=2 * r, fan_in_fan_out=kind == "linear_fan")
        x = torch.randn(5, 24)
    elif kind == "merged":
        layer = lora.MergedLinear(24, 30, r=r, lora_alpha=2 * r, enable_lora=[True, False, True])
        x = torch.randn(5, 24)
    elif kind == "embedding":
        layer, x = lora.Embedding(40, 12, r=r, lora_alpha=2 * r), torch.randint(0, 40, (3, 7))
    elif kind == "conv1d":
        layer, x = lora.Conv1d(3, 4, kernel_size=3, r=r, lora_alpha=2 * r), torch.randn(2, 3, 11)
    else:
        layer, x = lora.Conv2d(3, 4, kernel_size=3, r=r, lora_alpha=2 * r), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer.requires_grad_(False), x


def _factors(layer, r, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = layer.factor_shapes(r)
    return torch.randn(a, generator=g) * 0.3, torch.randn(b, generator=g) * 0.3


def _oracle(kind, layer, base, bias, A, B, s, x):
    """The layer's output with base weight `base` and adapter (A, B, s), in float64, from the factors alone."""
    if kind == "merged":
        delta = dense_delta64(A, B, 3, [0, 2], 30)
    else:
        delta = B.double() @ A.double()
    if kind == "embedding":
        return (base.double() + s * delta.t())[x]
    if kind.startswith("conv"):
        w = base.double() + s * delta.view(base.shape)
        conv = F.conv1d if kind == "conv1d" else F.conv2d
        return conv(x.double(), w, bias.double())
    w = base.double().t() if kind == "linear_fan" else base.double()
    return x.double() @ (w + s * delta).t() + bias.double()


def _base(kind, layer):
    w = layer.conv.weight if kind.startswith("conv") else layer.weight
    bias = layer.conv.bias if kind.startswith("conv") else getattr(layer, "bias", None)
    return w.detach().clone(), (None if bias is None else bias.detach().clone())


def _ptrs(layer):
    return (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_switches_across_ranks_keep_the_storage_and_every_update(kind, merged):
    layer, x = _layer(kind, 4)
    base, bias = _base(kind, layer)
    A0, B0, s0 = layer.get_adapter("default")
    adapters = {"default": (A0.detach().clone(), B0.detach().clone(), s0)}
    for name, r, s in (("two", 2, 0.7), ("six", 6, -1.3)):
        A, B = _factors(layer, r, seed=r)
        layer.add_adapter(name, A, B, s)
        adapters[name] = (A, B, s)
    layer.reserve_rank(6)
    assert layer.reserved_rank == 6 and layer.r == 6
    for name in adapters:  # every adapter held at rank 6, its own values in its first ranks, zeros after
        A, B, _ = layer.get_adapter(name)
        assert layer.rank_of(A) == 6 and layer.factor_shapes(6) == (tuple(A.shape), tuple(B.shape))
        r = layer.rank_of(adapters[name][0])
        if kind == "merged":
            assert torch.equal(A.view(2, 6, -1)[:, :r], adapters[name][0].view(2, r, -1))
            assert not A.view(2, 6, -1)[:, r:].any()
        else:
            assert torch.equal(A[:adapters[name][0].shape[0]], adapters[name][0])
            assert not A[adapters[name][0].shape[0]:].any()
        assert torch.equal(B[:, :adapters[name][1].shape[1]], adapters[name][1])
        assert not B[:, adapters[name][1].shape[1]:].any()
    layer.train(not merged)
    ptrs, weight_ptr = _ptrs(layer), layer.weight_2d().data_ptr()
    for name in ("six", "two", "default", "six", "default"):
        layer.set_adapter(name)
        assert layer.merged == merged
        out = layer(x)
        assert rel_err(out, _oracle(kind, layer, base, bias, *adapters[name], x)) < 1e-5, name
        assert _ptrs(layer) == ptrs and layer.weight_2d().data_ptr() == weight_ptr, f"new storage at {name!r}"
    if merged:  # the base back after the last unmerge
        layer.train()
        w = layer.conv.weight if kind.startswith("conv") else layer.weight
        assert rel_err(w, base.double()) < 1e-5  # (float32: each merge and unmerge rounds)


@pytest.mark.parametrize("kind", KINDS)
def test_later_adapters_and_stand_ins_take_the_reserved_rank(kind):
    layer, x = _layer(kind, 2)
    layer.reserve_rank(5)
    ptrs = _ptrs(layer)
    base, bias = _base(kind, layer)
    A, B = _factors(layer, 3, seed=3)
    layer.add_adapter("three", A, B, 0.5)
    layer.add_placeholder("zeros")
    for name in ("three", "zeros"):
        held = layer.get_adapter(name)[0]
        assert layer.rank_of(held) == 5, name
    layer.set_adapter("three")
    assert rel_err(layer(x), _oracle(kind, layer, base, bias, A, B, 0.5, x)) < 1e-5
    layer.set_adapter("zeros")
    zero = _oracle(kind, layer, base, bias, *_factors(layer, 1, seed=1), 0.0, x)
    assert rel_err(layer(x), zero) < 1e-6
    assert _ptrs(layer) == ptrs
    # the active adapter replaced in place by one of a lower rank
    A2, B2 = _factors(layer, 1, seed=11)
    layer.add_adapter("zeros", A2, B2, 3.0)
    assert _ptrs(layer) == ptrs
    assert rel_err(layer(x), _oracle(kind, layer, base, bias, A2, B2, 3.0, x)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_own_factors_give_back_the_adapter_as_it_was_given(kind):
    """Its own trailing ranks zero in both factors included (a rank it has, though it adds nothing), whether added
    before or after the reserve; values written into the padding since widen it."""
    layer, _ = _layer(kind, 2)
    A0, B0 = _factors(layer, 3, seed=30)
    with torch.no_grad():
        B0[:, B0.shape[1] // 3 * 2:] = 0  # the last rank: zero in B ...
        A0[A0.shape[0] // 3 * 2:] = 0 if kind != "merged" else 0  # ... and in A
        if kind == "merged":
            A0.view(2, 3, -1)[:, 2] = 0
    layer.add_adapter("before", A0, B0, 1.0)
    layer.reserve_rank(7)
    A, B = _factors(layer, 3, seed=3)
    with torch.no_grad():  # one zero rank in A only, one in B only, the last zero in both
        A[:A.shape[0] // 3] = 0 if kind != "merged" else A[:A.shape[0] // 3]
        B[:, -1] = 0
    layer.add_adapter("three", A, B, 1.0)
    for name, (a, b) in (("three", (A, B)), ("before", (A0, B0))):
        held = layer.get_adapter(name)[:2]
        assert layer.rank_of(held[0]) == 7
        got = layer.own_factors(name)
        assert torch.equal(got[0], a) and torch.equal(got[1], b), name
    with torch.no_grad():  # written into the padding: the own rank grows to hold it
        if layer.active_adapter != "three":
            layer.set_adapter("three")
        layer.lora_B[:, -1] = 1.0
    assert layer.rank_of(layer.own_factors("three")[0]) == 7


def test_a_rank_over_the_reserved_one_is_refused_naming_it():
    layer, x = _layer("linear", 4)
    layer.reserve_rank(4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    A, B = _factors(layer, 5, seed=5)
    for name in ("default", "other"):
        with pytest.raises(ValueError, match=r"rank 5 is over the rank 4 that reserve_rank fixed for Linear\(24, 20\)"):
            layer.add_adapter(name, A, B, 1.0)
    assert layer.adapter_names == ["default"]
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_reserve_refusals_change_nothing():
    layer, _ = _layer("linear", 4)
    layer.add_adapter("eight", *_factors(layer, 8, seed=8), 1.0)
    ptrs = _ptrs(layer)
    for bad in (0, -2, True, 6.0, "8", None):
        with pytest.raises(ValueError, match="expected a positive int"):
            layer.reserve_rank(bad)
    with pytest.raises(ValueError, match=r"rank 6 is below the rank 8 of adapter 'eight' in Linear"):
        layer.reserve_rank(6)
    assert layer.reserved_rank is None and _ptrs(layer) == ptrs and layer.rank_of(layer.get_adapter("eight")[0]) == 8
    layer.reserve_rank(8)
    ptrs = _ptrs(layer)
    with pytest.raises(ValueError, match="below the rank 8 .* reserved before"):
        layer.reserve_rank(7)
    layer.reserve_rank(8)  # again: nothing to do, the storage stays
    assert _ptrs(layer) == ptrs
    layer.add_adapter("one", *_factors(layer, 1, seed=1), 1.0)
    with batch_open_on_another_thread(layer, ["one", "eight"]):  # its slots hold the factors of their ranks
        with pytest.raises(RuntimeError, match=r"reserve_rank while a mixed batch \(lora.batch_adapters\) serves"):
            layer.reserve_rank(9)
    assert {layer.rank_of(layer.get_adapter(n)[0]) for n in layer.adapter_names} == {8} and layer.reserved_rank == 8
    assert _ptrs(layer) == ptrs
    empty = lora.Linear(4, 4, r=0)
    with pytest.raises(ValueError, match="built with r=0"):
        empty.reserve_rank(4)


def test_trainable_factors_are_refused_and_own_pairs_survive_a_reserve():
    """A reserve changes the factors' shapes, so trainable ones are refused (an optimizer built over them would hold
    the old shapes: a raw size error at its next step); frozen, reserved, trained again: each adapter's own Parameter
    objects come back padded, and an optimizer built after trains them."""
    layer, x = _layer("linear", 2)
    layer.requires_grad_(False)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    layer.add_adapter("b", *_factors(layer, 3, seed=3), 1.0)
    layer.set_adapter("b")  # trainable: b's own pair is registered, default's kept aside
    own_b = (layer.lora_A, layer.lora_B)
    layer.set_adapter("default")
    own_default = (layer.lora_A, layer.lora_B)
    with pytest.raises(ValueError, match=r"Linear\(24, 20\): its factors require grad, and reserve_rank gives them another "
                                         r"shape .* freeze them \(requires_grad_\(False\)\), reserve"):
        layer.reserve_rank(4)
    assert layer.reserved_rank is None and layer.lora_A.shape == (2, 24) and own_b[0].shape == (3, 24)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    # b's own pair, set aside by the switch, still requires grad (an optimizer may hold it): refused too
    with pytest.raises(ValueError, match=r"adapter 'b', set aside by a switch, holds factors that require grad"):
        layer.reserve_rank(4)
    assert layer.reserved_rank is None and own_b[0].shape == (3, 24)
    for t in layer.get_adapter("b")[:2]:
        t.requires_grad_(False)
    layer.reserve_rank(4)
    assert (layer.lora_A, layer.lora_B) == own_default and layer.lora_A.shape == (4, 24)
    layer.set_adapter("b")  # a serving switch: b's values into the live pair, its own pair kept aside
    lora.mark_only_lora_as_trainable(layer)  # b gets its own pair back
    assert layer.lora_A is own_b[0] and layer.lora_B is own_b[1] and layer.lora_A.shape == (4, 24)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    assert layer.lora_B.grad.shape == (20, 4) and layer.lora_A.grad[3:].abs().sum() == 0


@pytest.mark.parametrize("rank", [np.int64(6), torch.tensor(6), 6])
def test_any_integer_rank_is_taken(rank):
    layer, _ = _layer("linear", 2)
    layer.reserve_rank(rank)
    assert layer.reserved_rank == 6 and type(layer.reserved_rank) is int
    model = llama()
    lora.inject(model, ["q_proj"], r=2)
    for _, m in lora_layers(model):
        m.requires_grad_(False)
    lora.reserve_rank(model, rank)
    assert lora.reserved_rank(model) == 6
    for bad in (torch.tensor(6.0), np.float64(6), torch.tensor([6, 6])):
        with pytest.raises(ValueError, match="expected a positive int"):
            layer.reserve_rank(bad)


# -- models: against peft -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """peft's adapters a (r=4: q, v, down, embed_tokens), b (r=6: q, o) and c (r=4, rslora) on one Llama."""
    return saved_adapters(tmp_path_factory.mktemp("reserve"), 7)


def _ours(saved, names=("a", "b", "c")):
    model = llama()
    for name in names:
        lora.load_peft_adapter(model, saved[name], name, activate=False)
    return model


def _peft(saved, names=("a", "b", "c")):
    pm = PeftModel.from_pretrained(llama(), saved[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(saved[name], adapter_name=name)
    return pm


def _all_ptrs(model):
    return {n: _ptrs(m) for n, m in lora_layers(model)}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_model_switches_between_adapters_of_other_ranks_and_targets_keep_every_layers_storage(saved, merged):
    ours, pm = _ours(saved), _peft(saved)
    x = torch.randint(0, VOCAB, (2, 9))
    # without a reserve, a's layer where only b is rank 6 (o_proj) changes storage on a switch (the trap)
    lora.set_adapter(ours, "a")
    before = _all_ptrs(ours)
    lora.set_adapter(ours, "b")
    assert _all_ptrs(ours) != before
    lora.reserve_rank(ours, 6)
    assert lora.reserved_rank(ours) == 6
    assert {m.r for _, m in lora_layers(ours)} == {6}
    if merged:
        lora.merge_adapter(ours)
    ptrs = _all_ptrs(ours)
    weights = {n: m.weight_2d().data_ptr() for n, m in lora_layers(ours)}
    for name in ("a", "c", "b", "a", "b", "c"):
        lora.set_adapter(ours, name)
        pm.set_adapter(name)
        assert rel_err(_logits(ours, x), _logits(pm, x)) < 1e-5, name
        assert _all_ptrs(ours) == ptrs, f"a layer got new storage switching to {name!r}"
        assert {n: m.weight_2d().data_ptr() for n, m in lora_layers(ours)} == weights


def test_loads_after_a_reserve_are_padded_and_a_higher_rank_is_refused(saved, tmp_path):
    ours = _ours(saved, ("a",))
    lora.reserve_rank(ours, 6)
    names = lora.load_peft_adapter(ours, saved["b"], "b")  # o_proj: layers injected now take the rank too
    assert any(n.endswith("o_proj") for n in names)
    assert {m.r for _, m in lora_layers(ours)} == {6}
    assert {m.reserved_rank for _, m in lora_layers(ours)} == {6}
    pm = _peft(saved, ("a", "b"))
    x = torch.randint(0, VOCAB, (2, 9))
    ptrs = _all_ptrs(ours)
    for name in ("a", "b", "a"):
        lora.set_adapter(ours, name)
        pm.set_adapter(name)
        assert rel_err(_logits(ours, x), _logits(pm, x)) < 1e-5
        assert _all_ptrs(ours) == ptrs
    # rank 8 into existing layers and into a layer a load would inject: refused before anything changes
    snap = snapshot(ours)
    for targets, pattern in ((["gate_proj", "q_proj"], r"module '.*q_proj': rank 8 is over the rank 6 that "
                                                         r"reserve_rank fixed for Linear\(64, 64\)"),
                             (["gate_proj"], r"module '.*gate_proj' has rank 8, over the rank 6 that reserve_rank")):
        big = peft_with_adapters(llama(), {"big": dict(r=8, lora_alpha=8, target_modules=targets)})
        big.save_pretrained(str(tmp_path / str(len(targets))))
        with pytest.raises(ValueError, match=pattern):
            lora.load_peft_adapter(ours, str(tmp_path / str(len(targets)) / "big"), "big")
        assert unchanged(ours, snap) and _all_ptrs(ours) == ptrs and "big" not in lora.adapter_names(ours)


def _combine_alike(plain, reserved, names, weights, combo, kwargs):
    """The same combination "w" made in both models (one seed for dare's draws) and served: equal logits."""
    x = torch.randint(0, VOCAB, (2, 9))
    for model in (plain, reserved):
        torch.manual_seed(5)
        lora.add_weighted_adapter(model, names, weights, "w", combination_type=combo, **kwargs)
        lora.set_adapter(model, "w")
    assert rel_err(_logits(reserved, x), _logits(plain, x)) < 1e-6


@pytest.mark.parametrize("combo,kwargs", [("cat", {}), ("svd", {}), ("svd", dict(svd_rank=3)), ("linear", {}),
                                          ("ties", dict(density=0.5)), ("magnitude_prune", dict(density=0.3)),
                                          ("dare_ties", dict(density=0.5)), ("ties_svd", dict(density=0.6))])
def test_combinations_in_a_reserved_model_are_the_unreserved_ones(saved, combo, kwargs):
    """add_weighted_adapter combines the adapters at their own ranks (a pruning's quantile counts the values: the
    padding's zeros would shift it), then pads the result."""
    plain, reserved = _ours(saved), _ours(saved)
    lora.reserve_rank(reserved, 12)
    _combine_alike(plain, reserved, ["a", "c"], [0.6, -0.9], combo, kwargs)
    assert {m.rank_of(m.get_adapter("w")[0]) for _, m in lora_layers(reserved)} == {12}
    with pytest.raises(ValueError, match=r"held at the rank 12 reserve_rank fixed; the ranks are the adapters' own\) "
                                         r"holds ranks \[4, 6\]"):
        lora.add_weighted_adapter(reserved, ["a", "b"], [0.5, 0.5], "ab", combination_type="ties", density=0.5)
    snap = snapshot(reserved)
    for combo, hint in (("cat", "an svd combination with svd_rank=12 fits it"), ("svd", "svd_rank=12 keeps it within")):
        with pytest.raises(ValueError, match=rf"the new adapter 'abc' at '.*' has rank 14, over the rank 12 that "
                                             rf"reserve_rank fixed for the model's layers: {hint}"):
            lora.add_weighted_adapter(reserved, ["a", "b", "c"], [0.5, 0.5, 1.0], "abc", combination_type=combo)
    assert unchanged(reserved, snap) and "abc" not in lora.adapter_names(reserved)


@pytest.fixture(scope="module")
def dead_last_rank(tmp_path_factory):
    """Two peft adapters (r=4 on q, v, down) whose last rank is zero in both factors in every module."""
    root = tmp_path_factory.mktemp("dead")
    pm = peft_with_adapters(llama(), {n: dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
                                      for n in ("p", "q")})
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                if "lora_A" in n:
                    p[-1] = 0
                else:
                    p[:, -1] = 0
    pm.save_pretrained(str(root))
    return {n: str(root / n) for n in ("p", "q")}


@pytest.mark.parametrize("combo,kwargs", [("ties", dict(density=0.5)), ("magnitude_prune", dict(density=0.3)),
                                          ("dare_linear", dict(density=0.5)), ("linear", {}), ("cat", {})])
def test_combinations_keep_an_adapters_own_zero_ranks(dead_last_rank, combo, kwargs, tmp_path):
    """An adapter's own last rank, zero in both factors, is a rank it has: a combination in a reserved model counts
    its values as the unreserved one does, and a save keeps the rank the file had."""
    plain, reserved = llama(), llama()
    for model in (plain, reserved):
        for name in ("p", "q"):
            lora.load_peft_adapter(model, dead_last_rank[name], name, activate=False)
    lora.reserve_rank(reserved, 8)
    _combine_alike(plain, reserved, ["p", "q"], [0.8, -0.5], combo, kwargs)
    lora.save_peft_adapter(reserved, str(tmp_path / "p"), adapter_name="p")
    from peft import PeftConfig
    assert PeftConfig.from_pretrained(str(tmp_path / "p")).r == 4


def test_a_reserve_without_memory_changes_nothing(saved, monkeypatch):
    ours = _ours(saved)
    snap, ptrs = snapshot(ours), _all_ptrs(ours)
    found = lora_layers(ours)
    ranks = [m.r for _, m in found]
    victim = found[len(found) // 2][1]
    real = type(victim).pad_factors

    def pad(self, A, B, rank):
        if self is victim:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(self, A, B, rank)
    monkeypatch.setattr(type(victim), "pad_factors", pad)
    with pytest.raises(RuntimeError, match=rf"^reserve_rank: layer '{found[len(found) // 2][0]}': Linear\(.* has "
                                           r"no memory for its adapters at rank 8 .*nothing changed"):
        lora.reserve_rank(ours, 8)
    assert unchanged(ours, snap) and _all_ptrs(ours) == ptrs
    assert [m.r for _, m in lora_layers(ours)] == ranks and all(m.reserved_rank is None for _, m in found)
    monkeypatch.undo()
    lora.reserve_rank(ours, 6)  # and a lower one goes through
    assert {m.r for _, m in lora_layers(ours)} == {6}


def test_inject_into_a_reserved_model_reserves_its_layers():
    model = llama()
    lora.inject(model, ["q_proj"], r=4)
    model.requires_grad_(False)
    lora.reserve_rank(model, 8)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"r: module '.*v_proj' would get rank 16, over the rank 8 that reserve_rank"):
        lora.inject(model, ["v_proj"], r=16)
    assert unchanged(model, snap)
    names = lora.inject(model, ["v_proj"], r=2, lora_alpha=4)
    new = [m for n, m in lora_layers(model) if n in names]
    assert new and all(m.reserved_rank == 8 and m.r == 8 and m.scaling == 2.0 for m in new)
    assert all(not m.lora_A[2:].any() and not m.lora_B[:, 2:].any() for m in new)


def test_a_save_after_a_reserve_writes_the_adapters_own_rank_and_loads_in_peft_alike(saved, tmp_path):
    ours = _ours(saved)
    lora.reserve_rank(ours, 8)
    lora.set_adapter(ours, "c")  # rslora: the saved alpha keeps the scaling at the padded rank
    lora.save_peft_adapter(ours, str(tmp_path / "c8"))
    pm = PeftModel.from_pretrained(llama(), str(tmp_path / "c8"))
    x = torch.randint(0, VOCAB, (2, 9))
    assert pm.peft_config["default"].r == 4  # the adapter's own rank: the padding is not saved
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for n, p in pm.named_parameters() if "lora_" in n)
    assert rel_err(_logits(pm, x), _logits(ours, x)) < 1e-5
    assert rel_err(_logits(pm, x), _logits(_peft(saved, ("c",)), x)) < 1e-5


def test_model_reserve_refusals_name_the_layer_and_change_nothing(saved):
    ours = _ours(saved)
    snap, ptrs = snapshot(ours), _all_ptrs(ours)
    with pytest.raises(ValueError, match=r"reserve_rank: layer '.*(q_proj|o_proj)': rank 4 is below the rank 6"):
        lora.reserve_rank(ours, 4)
    for bad in (0, 2.5, False):
        with pytest.raises(ValueError, match="positive int"):
            lora.reserve_rank(ours, bad)
    assert unchanged(ours, snap) and _all_ptrs(ours) == ptrs
    assert all(m.reserved_rank is None for _, m in lora_layers(ours))
    with pytest.raises(ValueError, match="no lora_ext layer"):
        lora.reserve_rank(llama(), 8)
    trainable = _ours(saved)
    lora.mark_only_lora_as_trainable(trainable)
    shapes = {k: v.shape for k, v in lora.lora_state_dict(trainable).items()}
    with pytest.raises(ValueError, match=r"reserve_rank: layer '[^']*': \w+\(.*\): its factors require grad, and reserve_rank gives "
                                         r"them another shape"):
        lora.reserve_rank(trainable, 8)
    assert shapes == {k: v.shape for k, v in lora.lora_state_dict(trainable).items()}
    lora.reserve_rank(ours, 8)
    with pytest.raises(ValueError, match=r"rank 7 is below the rank 8 of adapter .* \(held at the rank 8 reserved "
                                         r"before: a reserve only grows\)"):
        lora.reserve_rank(ours, 7)


def test_the_slots_refusal_says_the_rank_is_the_reserved_one(saved):
    ours = _ours(saved)
    lora.reserve_rank(ours, 8)
    lora.configure_slots(ours, slots=4, max_rank=6)
    with pytest.raises(ValueError, match=r"adapter 'a' has rank 8 at layer '.*' \(the rank reserve_rank holds every "
                                         r"adapter of it at\), more than the model's slots hold \(6\): "
                                         r"lora.configure_slots\(model, slots=4, max_rank=8\)"):
        with lora.batch_adapters(ours, ["a", "b"]):
            pass


def test_a_compiled_layer_is_not_recompiled_by_switches_across_ranks():
    """torch.compile guards on the factors' shapes: without a reserve a switch to another rank traces again; with one,
    every switch (scalings equal) runs the graph traced first."""
    traced = []

    def backend(gm, inputs):
        traced.append(gm)
        return gm.forward

    for reserve in (False, True):
        torch._dynamo.reset()
        traced.clear()
        layer, x = _layer("linear", 2)
        for name, r in (("four", 4), ("eight", 8)):
            layer.add_adapter(name, *_factors(layer, r, seed=r), layer.scaling)
        if reserve:
            layer.reserve_rank(8)
        compiled = torch.compile(layer, backend=backend, fullgraph=True)
        for name in ("default", "four", "eight", "default", "eight"):
            layer.set_adapter(name)
            with torch.no_grad():
                want = layer(x)
            assert torch.allclose(compiled(x), want, atol=1e-6)
        assert (len(traced) == 1) == reserve, f"reserve={reserve}: {len(traced)} traces"


# -- hotswap_adapter ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swaps(tmp_path_factory):
    """Adapters of one Llama for hotswaps: old (r=4: q, v, down), sub (r=8: q, down; another alpha), same (r=4:
    q, v, down), wide (r=4: q, v, down, gate: a module old does not target), saved (r=4: q, v, down and lm_head
    saved whole)."""
    root = tmp_path_factory.mktemp("swaps")
    specs = {"old": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             "sub": dict(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
             "same": dict(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"]),
             "wide": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"]),
             "saved": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           modules_to_save=["lm_head"])}
    paths = {}
    for i, (name, kwargs) in enumerate(specs.items()):
        pm = peft_with_adapters(llama(), {"default": kwargs})
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(str(root / name))
        paths[name] = str(root / name)
    return paths


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_hotswap_matches_peft_in_place(swaps, merged):
    """old -> sub (another rank, a subset of the modules: v_proj serves zeros, as peft's) -> same, after a reserve
    (peft's prepare_model_for_compiled_hotswap pads alike); the storage of every layer and weight stays."""
    x = torch.randint(0, VOCAB, (2, 9))
    pm = PeftModel.from_pretrained(llama(), swaps["old"])
    prepare_model_for_compiled_hotswap(pm, target_rank=8)
    ours = llama()
    lora.load_peft_adapter(ours, swaps["old"])
    lora.reserve_rank(ours, 8)
    if merged:
        lora.merge_adapter(ours)
    assert rel_err(_logits(ours, x), _logits(pm, x)) < 1e-5
    ptrs = _all_ptrs(ours)
    weights = {n: m.weight_2d().data_ptr() for n, m in lora_layers(ours)}
    for name in ("sub", "same"):
        covered = lora.hotswap_adapter(ours, swaps[name])
        peft_hotswap(pm, swaps[name], adapter_name="default")
        assert rel_err(_logits(ours, x), _logits(pm, x)) < 1e-5, name
        assert _all_ptrs(ours) == ptrs and {n: m.weight_2d().data_ptr() for n, m in lora_layers(ours)} == weights
        assert lora.active_adapter(ours) == "default"
        assert all(m.merged == merged for _, m in lora_layers(ours))
        v = [m for n, m in lora_layers(ours) if n.endswith("v_proj")]
        assert all(m.is_placeholder("default") == (name == "sub") for m in v)
        assert {n.rsplit(".", 1)[1] for n in covered} == ({"q_proj", "down_proj"} if name == "sub"
                                                          else {"q_proj", "v_proj", "down_proj"})
    # and a save of the swapped adapter is the file's adapter (padded)
    lora.hotswap_adapter(ours, swaps["sub"])
    assert rel_err(_logits(ours, x), _logits(PeftModel.from_pretrained(llama(), swaps["sub"]), x)) < 1e-5


def test_hotswap_of_an_inactive_adapter_replaces_what_a_switch_serves(swaps):
    x = torch.randint(0, VOCAB, (2, 9))
    ours = llama()
    lora.load_peft_adapter(ours, swaps["old"], "x")
    lora.load_peft_adapter(ours, swaps["same"], "y")  # active
    ptrs = _all_ptrs(ours)
    lora.hotswap_adapter(ours, swaps["same"], "x")  # same ranks: no reserve needed
    assert lora.active_adapter(ours) == "y"
    lora.set_adapter(ours, "x")
    assert _all_ptrs(ours) == ptrs
    assert rel_err(_logits(ours, x), _logits(PeftModel.from_pretrained(llama(), swaps["same"]), x)) < 1e-5


def test_hotswap_refusals_change_nothing(swaps):
    ours = llama()
    lora.load_peft_adapter(ours, swaps["old"])
    snap, ptrs = snapshot(ours), _all_ptrs(ours)

    def refused(exc, pattern, *args, **kwargs):
        with pytest.raises(exc, match=pattern):
            lora.hotswap_adapter(ours, *args, **kwargs)
        assert unchanged(ours, snap) and _all_ptrs(ours) == ptrs

    refused(KeyError, "holds no such adapter", swaps["same"], "nope")
    refused(ValueError, r"hotswap_adapter: .*module '.*gate_proj' is not a lora_ext layer yet", swaps["wide"])
    refused(ValueError, r"holds it at rank 4, the file's is rank 8: the layer would get new storage.*reserve_rank",
            swaps["sub"])
    refused(ValueError, "names modules_to_save", swaps["saved"])
    lora.mark_only_lora_as_trainable(ours)
    refused(ValueError, r"layer '.*' trains it \(its factors require grad\)", swaps["same"])
    for _, m in lora_layers(ours):
        m.requires_grad_(False)
    lora.hotswap_adapter(ours, swaps["same"])  # and now it goes through
    assert _all_ptrs(ours) == ptrs and not unchanged(ours, snap)


def test_hotswap_refuses_an_adapter_whose_modules_are_saved_whole(swaps):
    ours = llama()
    lora.load_peft_adapter(ours, swaps["saved"])
    snap = snapshot(ours)
    with pytest.raises(ValueError, match=r"holds it in module\(s\) 'lm_head' saved whole"):
        lora.hotswap_adapter(ours, swaps["same"])
    assert unchanged(ours, snap)


@pytest.mark.gpu
@pytest.mark.hardware
def test_a_captured_graph_serves_every_adapter_after_a_reserve(saved):
    """A CUDA graph of a Llama's forward captured once serves adapters of other ranks and targets after switches
    and a hotswap, merged and unmerged."""
    ours = _ours(saved).cuda()
    lora.reserve_rank(ours, 6)
    x = torch.randint(0, VOCAB, (2, 9), device="cuda")
    want = {}
    for name in ("a", "b", "c"):
        lora.set_adapter(ours, name)
        want[name] = _logits(ours, x).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _logits(ours, x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _logits(ours, x)
    for name in ("b", "a", "c", "b"):
        lora.set_adapter(ours, name)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, want[name]) < 1e-4, name


@pytest.fixture(scope="module")
def more_swaps(tmp_path_factory):
    """qo, qo2 (r=4: q, o; other values), o (r=4: o), vo (r=4: v, o)."""
    root = tmp_path_factory.mktemp("more_swaps")
    specs = {"qo": ["q_proj", "o_proj"], "qo2": ["q_proj", "o_proj"], "o": ["o_proj"], "vo": ["v_proj", "o_proj"]}
    for i, (name, targets) in enumerate(specs.items()):
        pm = peft_with_adapters(llama(), {"default": dict(r=4, lora_alpha=8, target_modules=targets)})
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(str(root / name))
    return {name: str(root / name) for name in specs}


def test_hotswap_zeroes_a_stand_in_given_values(swaps, more_swaps, tmp_path):
    """A stand-in written since (an optimizer, load_state_dict) is served and saved as the layer's own adapter: a
    hotswap to a file that does not target the layer gives it zeros there too, as peft's zeroes what the file
    lacks."""
    from safetensors.torch import load_file
    x = torch.randint(0, VOCAB, (2, 9))
    ours = llama()
    lora.load_peft_adapter(ours, swaps["old"], "a")
    lora.load_peft_adapter(ours, more_swaps["qo"], "b", activate=False)
    lora.reserve_rank(ours, 8)
    lora.set_adapter(ours, "b")  # down_proj and v_proj serve b as stand-ins of zeros
    down = dict(lora_layers(ours))["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        down.lora_A.normal_(0, 0.3)
        down.lora_B.normal_(0, 0.3)
    ptrs = _all_ptrs(ours)
    lora.hotswap_adapter(ours, more_swaps["qo2"], "b")
    assert not down.lora_A.any() and not down.lora_B.any() and _all_ptrs(ours) == ptrs
    assert rel_err(_logits(ours, x), _logits(PeftModel.from_pretrained(llama(), more_swaps["qo2"]), x)) < 1e-5
    lora.save_peft_adapter(ours, str(tmp_path / "b"))
    assert not any("down_proj" in k for k in load_file(str(tmp_path / "b" / "adapter_model.safetensors")))


def test_hotswap_refuses_trainable_factors_where_the_adapter_is_a_stand_in(swaps, more_swaps):
    ours = llama()
    lora.load_peft_adapter(ours, swaps["old"], "x")
    lora.load_peft_adapter(ours, more_swaps["o"], "y", activate=False)  # o_proj: x's stand-ins
    lora.reserve_rank(ours, 4)
    for n, m in lora_layers(ours):
        if n.endswith("o_proj"):  # (as a load with is_trainable=True makes them)
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    snap, ptrs = snapshot(ours), _all_ptrs(ours)
    with pytest.raises(ValueError, match=r"layer '.*o_proj' trains it \(its factors require grad\)"):
        lora.hotswap_adapter(ours, more_swaps["vo"], "x")
    assert unchanged(ours, snap) and _all_ptrs(ours) == ptrs


def test_hotswap_inside_disable_adapter_is_refused_by_its_own_name(swaps):
    ours = llama()
    lora.load_peft_adapter(ours, swaps["old"])
    snap = snapshot(ours)
    with lora.disable_adapter(ours):
        with pytest.raises(ValueError, match=r"^hotswap_adapter: the model's adapters are disabled \(inside "
                                             r"lora.disable_adapter\); the swap would land unseen until the block "
                                             r"ends: do it after the block"):
            lora.hotswap_adapter(ours, swaps["same"])
    assert unchanged(ours, snap)


def test_a_fused_layers_save_comes_back_at_its_own_rank(tmp_path):
    """A MergedLinear (GPT-2's c_attn, blocks q and v) saves as peft's rank n*r pair with each block's B in its own
    columns; loading that file into a MergedLinear gives the per-block rank r back (it took rank n*r per block, so
    each load and save doubled the file's rank, and a hotswap of the layer's own save was refused)."""
    import json

    from tiny_models import gpt2
    model = gpt2()
    lora.inject(model, [], fused={"c_attn": [True, False, True]}, r=2, lora_alpha=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    model.requires_grad_(False)
    x = torch.randint(0, VOCAB, (2, 7))
    want = _logits(model, x)
    lora.save_peft_adapter(model, str(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    ptrs = _all_ptrs(model)
    lora.hotswap_adapter(model, str(tmp_path / "a"))
    assert _all_ptrs(model) == ptrs and rel_err(_logits(model, x), want) < 1e-6
    assert {m.rank_of(m.lora_A) for _, m in lora_layers(model)} == {2}
    lora.load_peft_adapter(model, str(tmp_path / "a"), "again", activate=True)
    assert {m.rank_of(m.lora_A) for _, m in lora_layers(model)} == {2}
    lora.save_peft_adapter(model, str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 4
    assert rel_err(_logits(PeftModel.from_pretrained(gpt2(), str(tmp_path / "b")), x), want) < 1e-5


def test_hotswap_refuses_an_inactive_adapter_that_trains(swaps, more_swaps):
    """An inactive adapter trained before holds its own Parameters, which its optimizer holds: a hotswap (a serving
    operation) refuses it as it refuses the active case; load_peft_adapter writes into those Parameters."""
    ours = llama()
    lora.load_peft_adapter(ours, swaps["old"], "a")
    lora.load_peft_adapter(ours, swaps["same"], "t", is_trainable=True)  # active, trainable: its own Parameters
    lora.set_adapter(ours, "a")  # t's own pairs kept aside, still requiring grad
    snap = snapshot(ours)
    with pytest.raises(ValueError, match=r"adapter 't': layer '.*' trains it \(its factors require grad\), and a "
                                         r"hotswap swaps serving adapters"):
        lora.hotswap_adapter(ours, swaps["old"], "t")
    assert unchanged(ours, snap)
