"""lora.add_weighted_adapter's pruning combinations (peft's ties, dare_linear, dare_ties, magnitude_prune and their
_svd forms) and svd_clamp: against the real peft on a Llama (the dare masks made the same in both by a stand-in
for torch.bernoulli that draws from a counter), against small cases worked by hand, against float64 oracles
written here, and the refusals (nothing changed)."""
import itertools

import pytest
import torch

import lora_ext as lora
from helpers import lora_layers_of, rel_err
from test_weighted_adapters import _logits, _ours, _peft, assert_refused, saved_adapters
from tiny_models import VOCAB, snapshot


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_adapters(tmp_path_factory.mktemp("pruning"), 11)


@pytest.fixture
def counted_bernoulli(monkeypatch):
    """torch.bernoulli replaced by masks drawn from a fresh generator seeded by a call counter (reset by calling
    the fixture's value): two implementations that draw the same masks in the same order get the same result."""
    count = [0]
    real = torch.bernoulli

    def fake(p, *args, **kwargs):
        assert not args and not kwargs
        g = torch.Generator().manual_seed(1000 + count[0])
        count[0] += 1
        return (torch.rand(p.shape, generator=g, dtype=torch.float64) < p.double()).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake)

    def reset():
        n, count[0] = count[0], 0
        return n
    yield reset
    monkeypatch.setattr(torch, "bernoulli", real)


CASES = [
    ("ties", ["a", "c"], [0.7, -1.2], dict(density=0.5)),
    ("ties", ["a", "c"], [1.0, 0.4], dict(density=0.3, majority_sign_method="frequency")),  # (c first: peft scales
    # its new adapter by sqrt(r), the first adapter's use_rslora; see test_weighted_adapters)
    ("magnitude_prune", ["a", "c"], [0.5, 1.5], dict(density=0.6)),
    ("dare_linear", ["a", "c"], [0.8, 0.6], dict(density=0.7)),
    ("dare_ties", ["a", "c"], [1.3, -0.2], dict(density=0.4)),
    ("ties_svd", ["a", "b"], [1.0, 0.5], dict(density=0.5, svd_rank=6)),
    ("magnitude_prune_svd", ["a", "b", "c"], [0.6, -0.9, 1.1], dict(density=0.8, svd_rank=5)),
    ("dare_linear_svd", ["a", "c"], [1.0, 1.0], dict(density=0.5, svd_rank=4)),
    ("dare_ties_svd", ["b", "a"], [0.9, -0.7], dict(density=0.6, svd_rank=8, majority_sign_method="frequency")),
    ("svd", ["a", "b"], [1.0, -0.5], dict(svd_rank=5, svd_clamp=0.9)),
]


@pytest.mark.parametrize("combo,adapters,weights,kwargs", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_matches_peft(saved, counted_bernoulli, combo, adapters, weights, kwargs, merged):
    x = torch.randint(0, VOCAB, (2, 7))
    pm = _peft(saved)
    counted_bernoulli()
    pm.add_weighted_adapter(adapters, weights, "w", combination_type=combo, **kwargs)
    peft_draws = counted_bernoulli()
    pm.set_adapter("w")
    ref = _logits(pm.eval(), x)
    model = _ours(saved)
    lora.set_adapter(model, "a")
    before = _logits(model.eval(), x)
    lora.add_weighted_adapter(model, adapters, weights, "w", combination_type=combo, **kwargs)
    assert counted_bernoulli() == peft_draws  # the same masks, drawn in the same order
    assert (peft_draws > 0) == combo.startswith("dare")
    lora.set_adapter(model, "w")
    if not merged:
        lora.unmerge_adapter(model)
    assert all(m.merged == merged for m in lora_layers_of(model))
    assert rel_err(_logits(model, x), ref) < 1e-5
    assert rel_err(before, ref) > 1e-3


def test_pruning_changes_the_result(saved):
    # the pruned combinations are not "linear" in disguise: each differs from it, and from each other
    model = _ours(saved)
    lora.add_weighted_adapter(model, ["a", "c"], [1.0, 1.0], "lin", combination_type="linear")
    for combo in ("ties", "magnitude_prune", "dare_linear", "dare_ties"):
        lora.add_weighted_adapter(model, ["a", "c"], [1.0, 1.0], combo, combination_type=combo, density=0.5)
    q = model.model.layers[0].self_attn.q_proj
    updates = {n: q.get_adapter(n)[1].double() @ q.get_adapter(n)[0].double()
               for n in ("lin", "ties", "magnitude_prune", "dare_linear", "dare_ties")}
    for u, v in itertools.combinations(updates, 2):
        assert rel_err(updates[u], updates[v]) > 1e-2, (u, v)


# ---------------------------------------------------------------------------------------------------
# small cases worked by hand (factor level on a Linear(2, 2) of rank 1: lora_A is 1 x 2, lora_B is 2 x 1)


def _layer(factors, scaling=1.0):
    layer = lora.Linear(2, 2, r=1)
    for name, (A, B) in factors.items():
        layer.add_adapter(name, torch.tensor([A], dtype=torch.float32), torch.tensor(B, dtype=torch.float32).view(2, 1),
                          scaling)
    return layer


def test_ties_by_hand():
    # lora_A's of p, q, u: [4, -1], [-2, -3], [1, 0.5]; weights 1 (scaling 1): each side's weight is 1.
    # density 1: no pruning. Column 0: values 4, -2, 1; total 3 -> +; kept 4 and 1; mean 2.5.
    # column 1: -1, -3, 0.5; total -3.5 -> -; kept -1, -3; mean -2.
    # "frequency" column 0: signs +, -, + -> +; column 1: -, -, + -> -: the same here.
    # lora_B's: [1, 2], [1, -5], [1, 1]: row 0 all + -> mean 1; row 1: 2, -5, 1: total -2 -> -, kept -5;
    # "frequency": row 1 signs +, -, + -> +: kept 2 and 1, mean 1.5.
    layer = _layer({"p": ([4.0, -1.0], [1.0, 2.0]), "q": ([-2.0, -3.0], [1.0, -5.0]), "u": ([1.0, 0.5], [1.0, 1.0])})
    lora.add_weighted_adapter(layer, ["p", "q", "u"], [1.0, 1.0, 1.0], "t", combination_type="ties", density=1.0)
    A, B, s = layer.get_adapter("t")
    assert s == 1.0
    assert A.tolist() == [[2.5, -2.0]] and B.flatten().tolist() == [1.0, -5.0]
    lora.add_weighted_adapter(layer, ["p", "q", "u"], [1.0, 1.0, 1.0], "f", combination_type="ties", density=1.0,
                              majority_sign_method="frequency")
    A, B, _ = layer.get_adapter("f")
    assert A.tolist() == [[2.5, -2.0]] and B.flatten().tolist() == [1.0, 1.5]


def test_magnitude_pruning_and_weights_by_hand():
    # density 0.5 of 2 values keeps the larger |value| of each factor, per adapter, before weighting.
    # p: A [4, -1] -> [4, 0], B [1, 2] -> [0, 2]; q: A [-2, -3] -> [0, -3], B [1, -5] -> [0, -5].
    # weights w = 4 and 1 with scaling 1: sides sqrt(4) = 2 and 1 on both factors.
    # magnitude_prune: A = 2 [4, 0] + 1 [0, -3] = [8, -3]; B = 2 [0, 2] + 1 [0, -5] = [0, -1].
    layer = _layer({"p": ([4.0, -1.0], [1.0, 2.0]), "q": ([-2.0, -3.0], [1.0, -5.0])})
    lora.add_weighted_adapter(layer, ["p", "q"], [4.0, 1.0], "m", combination_type="magnitude_prune", density=0.5)
    A, B, _ = layer.get_adapter("m")
    assert A.tolist() == [[8.0, -3.0]] and B.flatten().tolist() == [0.0, -1.0]
    # ties, same pruning: A column 0: 4, 0 -> + (4 kept: 2*4 / 1 = 8), column 1: 0, -3 -> - (-3 kept: -3);
    # B row 0: 0, 0 -> + (nothing agrees: 0), row 1: 2, -5 -> total -3: -, kept -5 -> -5.
    lora.add_weighted_adapter(layer, ["p", "q"], [4.0, 1.0], "t", combination_type="ties", density=0.5)
    A, B, _ = layer.get_adapter("t")
    assert A.tolist() == [[8.0, -3.0]] and B.flatten().tolist() == [0.0, -5.0]
    # a negative weight goes on lora_A's side only: w = -4: A side -2, B side 2
    lora.add_weighted_adapter(layer, ["p", "q"], [-4.0, 1.0], "n", combination_type="magnitude_prune", density=0.5)
    A, B, _ = layer.get_adapter("n")
    assert A.tolist() == [[-8.0, -3.0]] and B.flatten().tolist() == [0.0, -1.0]


def test_dare_keeps_density_of_the_values_rescaled():
    # the real torch.bernoulli: about density of the values kept, each scaled by 1 / density; repeatable by seed
    layer = lora.Linear(400, 300, r=8)
    g = torch.Generator().manual_seed(12)
    a, b = layer.factor_shapes(8)
    for name in ("p", "q"):
        layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), 1.0)
    Ap, Bp, _ = layer.get_adapter("p")
    # weight 0 on q: dare_linear gives exactly p's kept values (q's are multiplied by 0)
    torch.manual_seed(5)
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 0.0], "d", combination_type="dare_linear", density=0.3)
    A, B, _ = layer.get_adapter("d")
    for got, held in ((A, Ap), (B, Bp)):
        kept = got != 0
        assert abs(kept.double().mean().item() - 0.3) < 0.02
        assert torch.allclose(got[kept], held[kept] / 0.3, rtol=1e-6)
    torch.manual_seed(5)
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 0.0], "d2", combination_type="dare_linear", density=0.3)
    assert torch.equal(layer.get_adapter("d2")[0], A) and torch.equal(layer.get_adapter("d2")[1], B)
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 0.0], "d3", combination_type="dare_linear", density=0.3)
    assert not torch.equal(layer.get_adapter("d3")[0], A)  # another draw


def _update64(layer, name):
    A, B, s = layer.get_adapter(name)
    return s * (B.double() @ A.double())


def _ties64(tensors, weights, density, frequency=False):
    """TIES in float64, elementwise loops: each tensor's largest int(density n) |values| kept, signs elected over the
    kept (unweighted) values, weighted values of the elected sign averaged."""
    kept = []
    for t in tensors:
        flat = t.flatten().tolist()
        k = int(density * len(flat))
        order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:k]
        kept.append([flat[i] if i in set(order) else 0.0 for i in range(len(flat))])
    out = []
    for i in range(len(kept[0])):
        vals = [kv[i] for kv in kept]
        vote = sum((v > 0) - (v < 0) for v in vals) if frequency else sum(vals)
        sign = 1.0 if vote >= 0 else -1.0
        agree = [(w * v) for v, w in zip(vals, weights) if v != 0 and (v > 0) == (sign > 0)]
        out.append(sum(agree) / max(len(agree), 1))
    return torch.tensor(out, dtype=torch.float64).view(tensors[0].shape)


@pytest.mark.parametrize("kind", ["linear-fan-in-fan-out", "merged-linear", "embedding", "conv2d"])
def test_ties_svd_on_every_layer_kind_against_float64(kind):
    # the updates s_i B_i A_i pruned and combined per block (a MergedLinear's enabled blocks each on its own) and
    # refactored at full rank: the result is the TIES combination itself
    g = torch.Generator().manual_seed(13)
    layer = {"linear-fan-in-fan-out": lambda: lora.Linear(6, 5, r=2, fan_in_fan_out=True),
             "merged-linear": lambda: lora.MergedLinear(4, 6, r=2, enable_lora=[True, False, True]),
             "embedding": lambda: lora.Embedding(7, 3, r=2),
             "conv2d": lambda: lora.Conv2d(2, 3, 2, r=1)}[kind]()
    for name, s in (("p", 0.5), ("q", 2.0), ("u", 1.0)):
        a, b = layer.factor_shapes(1)
        layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), s)
    weights = [0.7, -1.1, 0.4]
    lora.add_weighted_adapter(layer, ["p", "q", "u"], weights, "t", combination_type="ties_svd", density=0.5,
                              svd_rank=99)
    if isinstance(layer, lora.MergedLinear):
        # blocks of out_features // 3 rows; the disabled middle block is no block: zero in every update
        rows = layer.out_features // 3
        blocks = [slice(0, rows), slice(2 * rows, 3 * rows)]
        from helpers import dense_delta64
        lay = layer.layout()
        full = [dense_delta64(*layer.get_adapter(n)[:2], lay["num_blocks"], lay["block_ids"], layer.out_features)
                * layer.get_adapter(n)[2] for n in ("p", "q", "u")]
        want = torch.zeros_like(full[0])
        for blk in blocks:
            want[blk] = _ties64([f[blk] for f in full], weights, 0.5)
        A, B, _ = layer.get_adapter("t")
        got = dense_delta64(A, B, lay["num_blocks"], lay["block_ids"], layer.out_features)
    else:
        want = _ties64([_update64(layer, n) for n in ("p", "q", "u")], weights, 0.5)
        got = _update64(layer, "t")
    assert want.abs().max() > 0
    assert rel_err(got, want) < 1e-5


def test_factor_level_ties_against_float64():
    g = torch.Generator().manual_seed(14)
    layer = lora.Linear(9, 7, r=3)
    held = {}
    for name, s in (("p", 0.5), ("q", 2.0)):
        a, b = layer.factor_shapes(3)
        held[name] = (torch.randn(a, generator=g), torch.randn(b, generator=g), s)
        layer.add_adapter(name, *held[name])
    w = [1.5, -0.6]
    lora.add_weighted_adapter(layer, ["p", "q"], w, "t", combination_type="ties", density=0.4,
                              majority_sign_method="frequency")
    side_a = [(abs(wi * held[n][2]) ** 0.5) * (1 if wi * held[n][2] >= 0 else -1) for n, wi in zip("pq", w)]
    side_b = [abs(wi * held[n][2]) ** 0.5 for n, wi in zip("pq", w)]
    want_A = _ties64([held[n][0].double() for n in "pq"], side_a, 0.4, frequency=True)
    want_B = _ties64([held[n][1].double() for n in "pq"], side_b, 0.4, frequency=True)
    A, B, _ = layer.get_adapter("t")
    assert rel_err(A, want_A) < 1e-6 and rel_err(B, want_B) < 1e-6


def test_svd_clamp_bounds_the_factors():
    g = torch.Generator().manual_seed(15)
    layer = lora.Linear(30, 20, r=4)
    for name in ("p", "q"):
        a, b = layer.factor_shapes(4)
        layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), 1.0)
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 1.0], "free", svd_rank=4)
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 1.0], "clamped", svd_rank=4, svd_clamp=0.8)
    A, B, _ = layer.get_adapter("free")
    values = torch.cat([A.flatten(), B.flatten()]).double()
    high = torch.quantile(values, 0.8).item()  # (torch's own, against the sort-based one inside)
    Ac, Bc, _ = layer.get_adapter("clamped")
    assert torch.allclose(Ac.double(), A.double().clamp(-high, high), atol=1e-6)
    assert torch.allclose(Bc.double(), B.double().clamp(-high, high), atol=1e-6)
    assert not torch.equal(Ac, A)


def test_one_adapter_svd_with_a_rank_truncates():
    # peft combines one adapter linearly whatever it was asked (svd_rank dropped); here the truncation is made
    g = torch.Generator().manual_seed(16)
    layer = lora.Linear(12, 10, r=4)
    a, b = layer.factor_shapes(4)
    layer.add_adapter("p", torch.randn(a, generator=g), torch.randn(b, generator=g), 0.5)
    lora.add_weighted_adapter(layer, ["p"], [2.0], "one", svd_rank=2)
    exact = 2.0 * _update64(layer, "p")
    A, B, _ = layer.get_adapter("one")
    assert layer.rank_of(A) == 2
    sv = torch.linalg.svdvals(exact)
    assert float((B.double() @ A.double() - exact).norm() ** 2) == pytest.approx(float((sv[2:] ** 2).sum()), rel=1e-4)
    lora.add_weighted_adapter(layer, ["p"], [2.0], "copy")  # no rank: a scaled copy (exact)
    assert rel_err(_update64(layer, "copy"), exact) < 1e-6


# ---------------------------------------------------------------------------------------------------
# refusals: the model as it was


@pytest.mark.parametrize("call,error,match", [
    (dict(combination_type="dare_linear"), ValueError, r"'dare_linear' prunes; density .* got None"),
    (dict(combination_type="ties", density=0), ValueError, r"density .* in \(0, 1\], got 0"),
    (dict(combination_type="ties", density=1.5), ValueError, r"density .* in \(0, 1\], got 1.5"),
    (dict(combination_type="ties", density=True), ValueError, r"density .* got True"),
    (dict(combination_type="svd", density=0.5), ValueError, "combination_type 'svd' does not prune"),
    (dict(combination_type="dare_linear", density=0.5, majority_sign_method="frequency"), ValueError,
     "majority_sign_method='frequency' is for the combinations that elect signs"),
    (dict(combination_type="ties", density=0.5, majority_sign_method="sum"), ValueError,
     "majority_sign_method must be 'total' or 'frequency'"),
    (dict(combination_type="cat", svd_clamp=0.9), ValueError, "svd_clamp is for the svd combinations"),
    (dict(combination_type="ties", density=0.5, svd_rank=4), ValueError, "svd_rank is for the svd combinations"),
    (dict(svd_clamp=0), ValueError, r"svd_clamp is a quantile .* in \(0, 1\], got 0"),
    (dict(svd_clamp=0.1), ValueError, "svd_clamp=0.1 bounds the factors of layer '.*' by .* not positive"),
    (dict(svd_driver="gesvdj"), ValueError, "svd_driver='gesvdj' picks a cuSOLVER method; the factors of layer '.*' are "
                                            "on cpu"),
    (dict(svd_driver="lapack"), ValueError, "svd_driver must be None or one of gesvd"),
    (dict(svd_full_matrices=None), ValueError, "svd_full_matrices must be True or False"),
    (dict(combination_type="ties", density=0.5), ValueError,
     r"'ties' combines the factors, which needs equal ranks; layer '.*q_proj' holds ranks \[4, 6\]"),
    (dict(adapters=["a"], weights=[1.0], combination_type="dare_ties", density=0.5), ValueError,
     "'dare_ties' combines two adapters or more"),
], ids=["no-density", "density-0", "density-1.5", "density-bool", "density-svd", "sign-dare-linear", "sign-bogus",
        "clamp-cat", "rank-ties", "clamp-0", "clamp-low", "driver-cpu", "driver-bogus", "full-matrices", "ties-ranks",
        "one-adapter"])
def test_refusals_leave_the_model_as_it_was(saved, call, error, match):
    assert_refused(saved, call, error, match)


# ---------------------------------------------------------------------------------------------------
# found by the hostile pass


def test_a_zero_update_with_svd_clamp_is_an_adapter_of_zeros(saved):
    # b's weight 0: the layers only b targets (o_proj) have a zero update, whose SVD's unit vectors made the clamp's
    # quantile 0 (refused); peft gives zeros there, and so does this
    x = torch.randint(0, VOCAB, (2, 7))
    pm = _peft(saved)
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.0], "w", combination_type="svd", svd_rank=4, svd_clamp=0.99)
    pm.set_adapter("w")
    model = _ours(saved)
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, 0.0], "w", svd_rank=4, svd_clamp=0.99)
    o = model.model.layers[0].self_attn.o_proj
    A, B, _ = o.get_adapter("w")
    assert not A.any() and not B.any()
    lora.set_adapter(model, "w")
    assert rel_err(_logits(model, x), _logits(pm, x)) < 1e-5


def test_factor_level_pruning_of_a_convolution_is_refused():
    # loralib's layout holds a peft conv adapter's lora_B as B (x) I_k: pruning there is not peft's (0.2 off)
    layer = lora.Conv2d(3, 4, 3, r=2)
    g = torch.Generator().manual_seed(17)
    for name in ("p", "q"):
        a, b = layer.factor_shapes(2)
        layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), 1.0)
    for combo in ("ties", "magnitude_prune", "dare_linear", "dare_ties"):
        with pytest.raises(ValueError, match=f"{combo}' prunes the factors, but layer .* is a convolution.*"
                                             f"{combo}_svd"):
            lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 1.0], combo, combination_type=combo, density=0.5)
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 1.0], "t", combination_type="ties_svd", density=0.5)
    assert layer.has_adapter("t") and not layer.has_adapter("ties")


@pytest.mark.parametrize("damage,match", [
    ("nan", r"layer 'model.layers.0.self_attn.q_proj', adapter 'a'.*non-finite"),
    ("overflow", "weighted update of layer .* is not finite"),
], ids=["nan-factor", "overflowing-weight"])
def test_bad_values_are_named_before_the_svd(saved, damage, match):
    model = _ours(saved)
    q = model.model.layers[0].self_attn.q_proj
    weights = [1.0, 1.0]
    if damage == "nan":  # (a live factor: add_adapter refuses non-finite values)
        lora.set_adapter(model, "a")
        with torch.no_grad():
            q.lora_A[0, 0] = float("nan")
    else:
        weights = [1e38, 1e38]
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora.add_weighted_adapter(model, ["a", "b"], weights, "w", svd_rank=4, svd_clamp=0.9)
    now = model.state_dict()
    assert set(now) == set(snap) and all(torch.equal(now[k].nan_to_num(), snap[k].nan_to_num()) for k in snap)
    assert not any(m.has_adapter("w") for m in lora_layers_of(model))


def test_numpy_and_tensor_arguments_and_peft_defaults_are_taken(saved):
    import numpy as np
    model = _ours(saved)
    lora.add_weighted_adapter(model, ["a", "b"], np.array([1.0, 0.5]), "w1", svd_rank=np.int64(4))
    lora.add_weighted_adapter(model, ["a", "c"], [1.0, 0.5], "w2", combination_type="dare_linear",
                              density=torch.tensor(0.5), majority_sign_method="total")  # (peft's default: no-op)
    q = model.model.layers[0].self_attn.q_proj
    assert q.rank_of(q.get_adapter("w1")[0]) == 4 and q.has_adapter("w2")


def test_a_float32_density_keeps_as_many_values_as_peft():
    # peft computes int(density * n) in the density's own type: float32 0.29 * 100 is 29 there, 28 in float64
    import numpy as np
    layer = lora.Linear(10, 10, r=10)
    g = torch.Generator().manual_seed(18)
    for name in ("p", "q"):
        a, b = layer.factor_shapes(10)
        layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), 1.0)
    for density, kept in ((np.float32(0.29), 29), (0.29, 28)):
        lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 0.0], f"m{kept}", combination_type="magnitude_prune",
                                  density=density)
        assert int((layer.get_adapter(f"m{kept}")[0] != 0).sum()) == kept
