"""lora.add_weighted_adapter (peft's add_weighted_adapter): "cat", "svd" and "linear" against the real peft on a
Llama (three adapters of different ranks and targets, an embedding among them) and against float64 oracles written
here on every layer kind (Linear with fan_in_fan_out, MergedLinear, Embedding, Conv2d); stand-ins, saving, and
refusals that leave the model as it was."""
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lora_ext as lora
from helpers import dense_delta64, lora_layers_of, peft_with_adapters, rel_err
from tiny_models import VOCAB, llama, snapshot, unchanged

T = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
CONFIGS = {"a": dict(r=4, lora_alpha=8, target_modules=T),
           "b": dict(r=6, lora_alpha=3, target_modules=["q_proj", "o_proj"]),  # other targets, another rank
           "c": dict(r=4, lora_alpha=16, target_modules=T, use_rslora=True)}


def saved_adapters(root, seed):
    """{adapter: path} of peft's adapters a, b, c (CONFIGS) on the same base, random factors from `seed`, saved
    under `root` (tests/test_weighted_pruning.py shares them)."""
    pm = peft_with_adapters(llama(), CONFIGS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(root))
    return {name: str(root / name) for name in CONFIGS}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_adapters(tmp_path_factory.mktemp("weighted"), 1)


def _peft(saved):
    pm = PeftModel.from_pretrained(llama(), saved["a"], adapter_name="a")
    for name in ("b", "c"):
        pm.load_adapter(saved[name], adapter_name=name)
    return pm


def _ours(saved):
    model = llama()
    for name in CONFIGS:
        lora.load_peft_adapter(model, saved[name], name, activate=False)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("combo,adapters,weights,kwargs", [
    ("cat", ["a", "b"], [0.7, -1.3], {}),
    ("svd", ["a", "b"], [1.0, 0.5], dict(svd_rank=10)),  # the exact update's rank (peft's default truncates to 6)
    ("svd", ["a", "b"], [1.0, 0.5], dict(svd_rank=3)),  # truncated
    ("linear", ["a", "c"], [0.5, -1.5], {}),  # (equal ranks)
    ("svd", ["b"], [2.5], {}),  # one adapter: linear (exact) in both
], ids=["cat", "svd-rank10", "svd-rank3", "linear", "one"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_matches_peft(saved, combo, adapters, weights, kwargs, merged):
    x = torch.randint(0, VOCAB, (2, 7))
    pm = _peft(saved)
    pm.add_weighted_adapter(adapters, weights, "w", combination_type=combo, **kwargs)
    pm.set_adapter("w")
    ref = _logits(pm.eval(), x)
    model = _ours(saved)
    lora.set_adapter(model, "b")  # stand-ins of b in the layers b does not target: they do not count as b
    before = _logits(model.eval(), x)
    lora.add_weighted_adapter(model, adapters, weights, "w", combination_type=combo, **kwargs)
    assert torch.equal(_logits(model, x), before)  # not made active
    lora.set_adapter(model, "w")
    if not merged:
        lora.unmerge_adapter(model)
    assert all(m.merged == merged for m in lora_layers_of(model))
    out = _logits(model, x)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(before, ref) > 1e-3


def test_a_saved_weighted_adapter_loads_in_peft(saved, tmp_path):
    x = torch.randint(0, VOCAB, (2, 7))
    model = _ours(saved)
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, -0.5], "w", combination_type="cat")
    lora.set_adapter(model, "w")
    ours = _logits(model.eval(), x)
    lora.save_peft_adapter(model, str(tmp_path / "w"), "w")
    back = PeftModel.from_pretrained(llama(), str(tmp_path / "w")).eval()
    assert rel_err(_logits(back, x), ours) < 1e-5


def test_rslora_adapters_combine_to_their_weighted_sum(saved):
    # peft keeps the first adapter's use_rslora with lora_alpha = r, which scales its cat adapter by sqrt(r): here
    # the new adapter's update is the weighted sum, against float64 from the files' factors
    model = _ours(saved)
    lora.add_weighted_adapter(model, ["c", "a"], [0.25, 2.0], "w", combination_type="cat")
    checked = 0
    for m in lora_layers_of(model):
        real = [n for n in ("c", "a") if m.has_adapter(n) and not m.is_placeholder(n)]
        assert m.has_adapter("w") == bool(real)  # o_proj holds only b (and a stand-in of a): nothing
        if not real:
            continue
        A, B, s = m.get_adapter("w")
        assert s == 1.0
        want = sum(w * m.get_adapter(n)[2] * (m.get_adapter(n)[1].double() @ m.get_adapter(n)[0].double())
                   for n, w in (("c", 0.25), ("a", 2.0)))
        got = B.double() @ A.double()
        assert rel_err(got, want) < 1e-6
        checked += 1
    assert checked
    assert lora_layers_of(model)[0].get_adapter("c")[2] == pytest.approx(16 / math.sqrt(4))  # rslora: alpha/sqrt(r)


# ---------------------------------------------------------------------------------------------------
# every layer kind, against float64


def _update64(layer, A, B):
    """The update B A of factors (A, B) in float64, as this test reads the layer kinds."""
    if isinstance(layer, lora.MergedLinear):
        lay = layer.layout()
        return dense_delta64(A, B, lay["num_blocks"], lay["block_ids"], layer.out_features)
    return B.double() @ A.double()


def _layers():
    g = torch.Generator().manual_seed(3)
    built = [lora.Linear(12, 10, r=2, fan_in_fan_out=True), lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True]),
             lora.Embedding(11, 6, r=2), lora.Conv2d(3, 4, 3, r=2)]
    for layer in built:
        for name, r, s in (("p", 3, 0.5), ("q", 2, 2.0)):
            a, b = layer.factor_shapes(r)
            layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), s)
    return built


@pytest.mark.parametrize("index", range(4), ids=["linear-fan-in-fan-out", "merged-linear", "embedding", "conv2d"])
def test_every_layer_kind_against_float64(index):
    layer = _layers()[index]
    weights = {"p": -0.75, "q": 1.5}
    exact = sum(w * layer.get_adapter(n)[2] * _update64(layer, *layer.get_adapter(n)[:2]) for n, w in weights.items())
    lora.add_weighted_adapter(layer, list(weights), list(weights.values()), "cat", combination_type="cat")
    A, B, s = layer.get_adapter("cat")
    assert s == 1.0 and layer.rank_of(A) == 5
    assert rel_err(_update64(layer, A, B), exact) < 1e-6
    # svd at the full rank (3 + 2): exact; at rank 1: off by exactly the discarded singular values
    lora.add_weighted_adapter(layer, list(weights), list(weights.values()), "svd5", combination_type="svd", svd_rank=5)
    assert rel_err(_update64(layer, *layer.get_adapter("svd5")[:2]), exact) < 1e-5
    lora.add_weighted_adapter(layer, list(weights), list(weights.values()), "svd1", combination_type="svd", svd_rank=1)
    A1, B1, _ = layer.get_adapter("svd1")
    assert layer.rank_of(A1) == 1
    blocks = len(layer.block_ids) if isinstance(layer, lora.MergedLinear) else 1
    rows = exact.shape[0] // blocks
    keep = layer.factor_shapes(1)[0][0] // blocks  # a convolution's rank rows: rank * kernel size
    discarded = sum(float((torch.linalg.svdvals(exact[j * rows:(j + 1) * rows])[keep:] ** 2).sum())
                    for j in range(blocks))
    err = float((_update64(layer, A1, B1) - exact).norm() ** 2)
    assert err == pytest.approx(discarded, rel=1e-4)
    # the layer serves the new adapter's update
    layer.set_adapter("cat")
    assert layer.active_adapter == "cat"


# ---------------------------------------------------------------------------------------------------
# refusals: the model as it was


@pytest.mark.parametrize("call,error,match", [
    (dict(adapters=["a", "zz"]), KeyError, "no lora_ext layer holds an adapter 'zz'"),
    (dict(adapter_name="b"), ValueError, "already holds an adapter 'b'"),
    (dict(weights=[1.0]), ValueError, "weights must be a list of 2 numbers"),
    (dict(weights=[1.0, float("nan")]), ValueError, "weight of adapter 'b' must be a finite number"),
    (dict(weights=[1.0, True]), ValueError, "weight of adapter 'b' must be a finite number"),
    (dict(combination_type="ties"), ValueError, r"'ties' prunes; density .* must be a number in \(0, 1\], got None"),
    (dict(combination_type="bogus"), ValueError, "combination_type must be one of cat, svd, ties_svd"),
    (dict(combination_type="linear"), ValueError, r"'linear' combines the factors.*layer '.*q_proj' holds ranks \[4, 6\]"),
    (dict(svd_rank=0), ValueError, "svd_rank must be a positive int"),
    (dict(adapters=["a", "a"], weights=[1.0, 1.0]), ValueError, "distinct adapter names"),
    (dict(adapters=[], weights=[]), TypeError, "non-empty list"),
    (dict(adapters="ab"), TypeError, "non-empty list"),
], ids=["unknown", "exists", "weights-length", "nan", "bool", "ties", "bogus", "linear-ranks", "svd-rank", "duplicate", "empty",
        "string"])
def test_refusals_leave_the_model_as_it_was(saved, call, error, match):
    assert_refused(saved, call, error, match)


def assert_refused(saved, call, error, match):
    """add_weighted_adapter of a and b as "w", changed by `call`, raises `error` matching `match` and leaves the
    model as it was (tests/test_weighted_pruning.py shares it)."""
    model = _ours(saved)
    snap = snapshot(model)
    names = lora.adapter_names(model)
    kwargs = {**dict(adapters=["a", "b"], weights=[1.0, 2.0], adapter_name="w", combination_type="svd"), **call}
    with pytest.raises(error, match=match):
        lora.add_weighted_adapter(model, **kwargs)
    assert unchanged(model, snap) and lora.adapter_names(model) == names
    assert not any(m.has_adapter("w") for m in lora_layers_of(model))


def test_a_failure_while_adding_takes_every_layer_back(saved, monkeypatch):
    model = _ours(saved)
    layers = lora_layers_of(model)
    calls = []
    real = lora.LoRALayer.add_adapter

    def failing(self, name, A, B, s):
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C between two layers
        return real(self, name, A, B, s)

    monkeypatch.setattr(lora.LoRALayer, "add_adapter", failing)
    with pytest.raises(KeyboardInterrupt):
        lora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "w", combination_type="cat")
    assert len(calls) == 3
    assert not any(m.has_adapter("w") for m in layers)


def test_an_adapter_with_a_module_saved_whole_is_refused(tmp_path):
    pm = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        adapter_name="s")
    pm.add_adapter("t", LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    model = llama()
    for name in ("s", "t"):
        lora.load_peft_adapter(model, str(tmp_path / name), name, activate=False)
    with pytest.raises(ValueError, match="adapter 's' saves module 'lm_head' whole"):
        lora.add_weighted_adapter(model, ["s", "t"], [1.0, 1.0], "w")


def test_svd_without_a_rank_keeps_the_exact_update(saved):
    # peft truncates to the largest r of the configs (rank_pattern can make that smaller than the layers' update:
    # a hostile pass found the layers' largest rank truncating where peft was exact); here the default never truncates
    model = _ours(saved)
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "svd")
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "cat", combination_type="cat")
    for m in lora_layers_of(model):
        if m.has_adapter("cat"):
            A, B, _ = m.get_adapter("svd")
            Ac, Bc, _ = m.get_adapter("cat")
            assert m.rank_of(A) == m.rank_of(Ac)  # 4 + 6 where both are, else the one's rank
            assert rel_err(B.double() @ A.double(), Bc.double() @ Ac.double()) < 1e-5


def test_a_stand_in_given_values_counts_as_the_adapter(saved):
    # a stand-in of b (zeros: set_adapter to b in a layer b does not target) that load_state_dict gave values is
    # served and saved as b's: a combination must take it too (it was skipped: 1.23 off b as served)
    model = _ours(saved)
    lora.set_adapter(model, "b")
    v = model.model.layers[0].self_attn.v_proj  # b targets q_proj and o_proj only
    assert v.is_placeholder("b") and v.is_stand_in("b")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        v.lora_A.copy_(torch.randn(v.lora_A.shape, generator=g))
        v.lora_B.copy_(torch.randn(v.lora_B.shape, generator=g))
    assert v.is_placeholder("b") and not v.is_stand_in("b")
    x = torch.randint(0, VOCAB, (2, 5))
    served = _logits(model, x)
    lora.add_weighted_adapter(model, ["b"], [1.0], "w")
    lora.set_adapter(model, "w")
    assert rel_err(_logits(model, x), served) < 1e-5


def test_a_subclass_of_merged_linear_combines_block_by_block():
    class Fused(lora.MergedLinear):
        pass
    layer = Fused(8, 12, r=2, enable_lora=[True, False, True])
    g = torch.Generator().manual_seed(5)
    for name, r, s in (("p", 3, 0.5), ("q", 2, 2.0)):
        a, b = layer.factor_shapes(r)
        layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), s)
    exact = sum(w * layer.get_adapter(n)[2] * _update64(layer, *layer.get_adapter(n)[:2]) for n, w in (("p", 1.0), ("q", -1.0)))
    for combo in ("cat", "svd"):
        lora.add_weighted_adapter(layer, ["p", "q"], [1.0, -1.0], combo, combination_type=combo)
        assert rel_err(_update64(layer, *layer.get_adapter(combo)[:2]), exact) < 1e-5, combo


def test_a_large_weight_on_float16_factors_does_not_overflow_one_side():
    # w s went all on lora_A: at w = 3e4 a float16 lora_A overflowed, refused as "non-finite" for a finite update
    layer = lora.Linear(16, 12, r=2).half()
    g = torch.Generator().manual_seed(6)
    a, b = layer.factor_shapes(2)
    layer.add_adapter("p", (torch.randn(a, generator=g) * 0.1).half(), (torch.randn(b, generator=g) * 0.1).half(), 1.0)
    lora.add_weighted_adapter(layer, ["p"], [3e4], "big", combination_type="cat")
    A, B, _ = layer.get_adapter("p")
    want = 3e4 * (B.double() @ A.double())
    Ab, Bb, _ = layer.get_adapter("big")
    assert torch.isfinite(Ab).all() and torch.isfinite(Bb).all()
    assert rel_err(Bb.double() @ Ab.double(), want) < 2e-3  # float16 factors, each rounded once


def test_numpy_and_tensor_weights_are_numbers():
    import numpy as np
    layer = _layers()[0]
    lora.add_weighted_adapter(layer, ["p", "q"], [np.float32(0.5), torch.tensor(2.0)], "w", combination_type="cat")
    exact = sum(w * layer.get_adapter(n)[2] * _update64(layer, *layer.get_adapter(n)[:2]) for n, w in (("p", 0.5), ("q", 2.0)))
    assert rel_err(_update64(layer, *layer.get_adapter("w")[:2]), exact) < 1e-6


def test_svd_rank_past_the_shape_is_capped():
    layer = _layers()[3]  # Conv2d(3, 4, 3): at most rank 3 (9 rank rows: a 12 x 9 update in loralib's layout)
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, 1.0], "w", svd_rank=99)
    assert layer.rank_of(layer.get_adapter("w")[0]) == 3
    exact = sum(layer.get_adapter(n)[2] * _update64(layer, *layer.get_adapter(n)[:2]) for n in ("p", "q"))
    assert rel_err(_update64(layer, *layer.get_adapter("w")[:2]), exact) < 1e-5


@pytest.mark.parametrize("make", [lambda: lora.Conv1d(5, 7, 3, r=2), lambda: lora.Conv2d(5, 7, (3, 1), r=2)],
                         ids=["conv1d", "conv2d-3x1"])
@pytest.mark.parametrize("svd_rank", [None, 99])
def test_svd_keeps_the_exact_update_where_the_rank_rows_do_not_divide_the_shape(make, svd_rank):
    """A 21 x 5 update (Conv1d(5, 7, 3): 3 rank rows per rank) of rank 5 needs rank 2; the cap rounded down to 1
    and lost 32% of the update, svd_rank or not."""
    layer = make()
    g = torch.Generator().manual_seed(4)
    for name, r, s in (("p", 2, 2.0), ("q", 3, 1.0)):
        a, b = layer.factor_shapes(r)
        layer.add_adapter(name, torch.randn(a, generator=g), torch.randn(b, generator=g), s)
    exact = sum(w * layer.get_adapter(n)[2] * _update64(layer, *layer.get_adapter(n)[:2])
                for n, w in (("p", 1.0), ("q", -0.6)))
    assert torch.linalg.matrix_rank(exact).item() == 5
    lora.add_weighted_adapter(layer, ["p", "q"], [1.0, -0.6], "w", combination_type="svd", svd_rank=svd_rank)
    A, B, _ = layer.get_adapter("w")
    assert layer.rank_of(A) == 2
    assert rel_err(_update64(layer, A, B), exact) < 1e-5


def test_the_first_adapters_dropout_is_taken_past_an_embedding(tmp_path):
    """peft's new adapter copies the first adapter's config, lora_dropout included; read from the model's first
    layer, an Embedding (which applies none: 0.0), it was 0.0 for every layer."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 8)
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, ids):
            return self.lin(self.emb(ids))

    for name in ("a", "b"):
        peft_model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "lin"], lora_dropout=0.25))
        peft_model.save_pretrained(tmp_path / name)
    model = Net()
    for name in ("a", "b"):
        lora.load_peft_adapter(model, str(tmp_path / name / "default" if (tmp_path / name / "default").is_dir()
                                          else tmp_path / name), name, activate=False)
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "w", combination_type="cat")
    assert model.lin.adapter_dropout("w") == 0.25
    lora.save_peft_adapter(model, str(tmp_path / "w"), "w")
    config = PeftModel.from_pretrained(Net(), str(tmp_path / "w")).peft_config["default"]
    assert config.lora_dropout == 0.25
