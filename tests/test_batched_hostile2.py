"""Mixed batches (lora.batch_adapters), a third hostile pass: what a merged layer's weight holds against what its
live factors say, layer-level changes inside an open block, writes the version counters do not see, adapters made
under inference_mode, autograd, a generator closed on another thread; and, passing, random interleavings of
switches / merges / reloads / in-place writes between batches, torch.compile across batches, Embedding padding_idx
and max_norm, r=0 layers, repeated table entries, load_state_dict between batches, slot refusals between asyncio
tasks. Expected values come from a float64 oracle (test_batched.oracle) or the single-adapter path."""
import asyncio
import concurrent.futures
import copy
import random

import pytest
import torch

import lora_ext as lora
from lora_ext import batched
from helpers import TOL, rel_err
from test_batched import base_of, make_input, make_layer, oracle

F32 = TOL[torch.float32]


def rows_err(got, ref):
    return [float(rel_err(got[i], ref[i])) for i in range(got.shape[0])]


def single_rows(layer, x, names):
    """Each row served alone the ordinary way, on a copy of the layer (None: the base, with scaling 0)."""
    other = copy.deepcopy(layer)
    outs = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                other.unmerge()
                saved = other.scaling
                other.scaling = 0.0
                outs.append(other(x[i:i + 1]))
                other.scaling = saved
            else:
                other.set_adapter(name)
                outs.append(other(x[i:i + 1]))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------------------------
# found by this pass, fixed (lora_ext/batched.py, serving/batches.py, named_adapters.py)


@pytest.mark.parametrize("kind", ["linear", "merged"])
@pytest.mark.parametrize("change", ["factors", "scaling"])
def test_merged_layer_whose_live_factors_changed_serves_base_and_other_rows(kind, change):
    layer = make_layer(kind)
    base = layer.weight.detach().clone()  # before eval() merges
    layer.eval()
    assert layer.merged
    x = make_input(kind, (3,))
    names = [None, "a", "b"]
    with torch.no_grad():
        if change == "factors":
            layer.lora_B.mul_(2.0)  # in place, version counter bumped; the weight still holds the old update
        else:
            layer.scaling = 3.0
    assert rel_err(base_of(layer), base) < F32  # state_dict still gives the base
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    ref = oracle(layer, x, names, base)  # None: base; "a", "b": base + their own update
    assert max(rows_err(got, ref)) < F32, rows_err(got, ref)


def test_add_adapter_of_the_merged_adapter_inside_the_block():
    layer = make_layer("linear").eval()
    x = make_input("linear", (3,))
    names = [None, "a", "default"]
    before = layer.weight.detach().clone()
    with torch.no_grad(), lora.batch_adapters(layer, names):
        first = layer(x)
        a_shape, b_shape = layer.factor_shapes(4)
        with pytest.raises(RuntimeError, match="add_adapter would replace adapter 'default', which the weight holds merged"):
            layer.add_adapter("default", torch.randn(a_shape), torch.randn(b_shape), 0.3)
        assert torch.equal(layer.weight, before)  # refused before writing
        assert torch.equal(layer(x), first)
        layer.add_adapter("new", torch.randn(a_shape), torch.randn(b_shape), 0.3)  # a new name changes nothing served
    ref = oracle(layer, x, names, base_of(layer))
    assert max(rows_err(first, ref)) < F32, rows_err(first, ref)


@pytest.mark.parametrize("which", ["live", "registry"])
def test_data_write_then_check_values_reaches_the_slots(which):
    layer = make_layer("linear").eval()
    layer.unmerge()
    x = make_input("linear", (3,))
    names = [None, "a", "default"]
    with torch.no_grad(), lora.batch_adapters(layer, names):
        layer(x)
    name = "default" if which == "live" else "a"
    with torch.no_grad():
        layer.get_adapter(name)[1].data.mul_(2.0)  # bypasses the version counter
    layer.check_values(name)  # README: "call layer.check_values(name) after them"
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    ref = oracle(layer, x, names, base_of(layer))
    row = names.index(name)
    assert rel_err(single_rows(layer, x, names)[row], ref[row]) < F32  # the single path serves the new values
    assert max(rows_err(got, ref)) < F32, rows_err(got, ref)


def test_an_inference_mode_adapter_in_two_open_batches_of_one_thread():
    layer = make_layer("linear").eval()
    layer.unmerge()
    with torch.inference_mode():
        A, B, _ = layer.get_adapter("a")
        layer.add_adapter("inf", A.clone() * 2, B.clone(), 0.7)
    assert layer.get_adapter("inf")[0].is_inference()
    x = make_input("linear", (2,))

    async def serve(names):
        with lora.batch_adapters(layer, names):
            await asyncio.sleep(0)  # the other task opens its batch meanwhile
            with torch.no_grad():
                return layer(x)

    async def both():
        return await asyncio.gather(serve(["inf", "b"]), serve(["inf", None]), return_exceptions=True)

    first, second = asyncio.run(both())
    assert not isinstance(second, Exception), repr(second)
    assert rel_err(first, oracle(layer, x, ["inf", "b"], base_of(layer))) < F32
    assert rel_err(second, oracle(layer, x, ["inf", None], base_of(layer))) < F32


def test_grad_mode_with_trainable_factors_is_refused():
    layer = make_layer("linear").eval()
    layer.unmerge()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    assert layer.lora_A.requires_grad
    x = make_input("linear", (3,))
    names = ["default", "default", "default"]
    head = torch.nn.Linear(20, 1)
    head(layer(x)).sum().backward()  # the single path: a gradient reaches lora_A; the batch's would not
    assert layer.lora_A.grad.abs().sum() > 0
    with lora.batch_adapters(layer, names):
        with pytest.raises(RuntimeError, match="parameters that require grad"):
            layer(x)


def test_a_generator_closed_on_another_thread_leaves_no_batch_behind():
    layer = make_layer("linear").eval()
    layer.unmerge()
    x = make_input("linear", (2,))

    def gen():
        with lora.batch_adapters(layer, ["a", "b"]):
            while True:
                with torch.no_grad():
                    yield layer(x)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        g = gen()
        pool.submit(next, g).result()
        g.close()  # closed on this thread, not the pool's
        assert not layer.__dict__["_lora_ext_slot_pool"].busy()

        def plain():
            with torch.no_grad():
                return layer(x)

        out = pool.submit(plain).result()  # the closed block's entries count for nothing there
    assert rel_err(out, oracle(layer, x, ["default", "default"], base_of(layer))) < F32


# ---------------------------------------------------------------------------------------------------------------
# verified to work


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding"])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_interleavings_between_batches(kind, seed):
    """set_adapter / merge / unmerge / add_adapter (new values, new rank) / in-place writes of registry factors /
    delete + add under the same name / scaling changes while unmerged, a batch after each, 3 slots (paging)."""
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    layer = make_layer(kind).eval()
    if seed % 2:  # serving switches: copies into the live factors' storage
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    lora.configure_slots(layer, slots=3, max_rank=5)
    every = ["default", "a", "b", "c"]
    for step in range(14):
        op, name = rnd.choice(["set", "merge", "unmerge", "add", "inplace", "del_add", "scaling"]), rnd.choice(every)
        if op == "set":
            layer.set_adapter(name)
        elif op == "merge":
            layer.merge()
        elif op == "unmerge":
            layer.unmerge()
        elif op == "add":
            a_shape, b_shape = layer.factor_shapes(rnd.choice([1, 2, 5]))
            layer.add_adapter(name, torch.randn(a_shape) * 0.3, torch.randn(b_shape) * 0.3, rnd.uniform(-2, 2))
        elif op == "inplace" and name != layer.active_adapter:
            with torch.no_grad():
                layer.get_adapter(name)[rnd.choice([0, 1])].mul_(-1.5)
        elif op == "del_add" and name != layer.active_adapter:
            A, B, s = layer.get_adapter(name)
            A, B = A.clone(), B.clone()
            layer.delete_adapter(name)
            layer.add_adapter(name, A * 2, B, s)
        elif op == "scaling" and not layer.merged:
            layer.scaling = rnd.uniform(-2, 2)
        pick = rnd.sample(every, 2)
        names = [rnd.choice(pick + [None]) for _ in range(4)]
        x = make_input(kind, (4, 2))
        with torch.no_grad(), lora.batch_adapters(layer, names):
            got = layer(x)
        errs = rows_err(got, oracle(layer, x, names, base_of(layer)))
        assert max(errs) < F32, (step, op, name, names, errs)


def test_switch_to_an_adapter_of_the_batch_inside_the_block_and_to_another_refused():
    layer = make_layer("linear").eval()
    x = make_input("linear", (3,))
    names = [None, "a", "default"]
    with torch.no_grad(), lora.batch_adapters(layer, names):
        layer(x)
        layer.set_adapter("a")  # merged swap to an adapter the batch holds: rows relative to it
        got = layer(x)
        layer.unmerge()
        got2 = layer(x)
        layer.set_adapter("c")  # (unmerged: a switch of the live factors)
        with pytest.raises(ValueError, match="merging adapter 'c' while a mixed batch .* without a slot for it"):
            layer.merge()  # (refused before it writes; the forward refused after the write before)
        assert not layer.merged
    ref = oracle(layer, x, names, base_of(layer))
    assert max(rows_err(got, ref)) < F32 and max(rows_err(got2, ref)) < F32


def test_torch_compile_across_batches_of_other_names_and_lengths():
    layer = make_layer("linear").eval()
    net = torch.nn.Sequential(layer, torch.nn.ReLU())
    compiled = torch.compile(net, backend="eager")
    for names in (["a", None, "c"], ["b", "b", "default"], ["c", "a", None, "b", "a"]):
        x = make_input("linear", (len(names),))
        with torch.no_grad(), lora.batch_adapters(net, names):
            got = compiled(x)
        assert rel_err(got, torch.relu(oracle(layer, x, names, base_of(layer)))) < F32, names
    x = make_input("linear", (3,))
    with torch.no_grad():
        plain = compiled(x)
    assert rel_err(plain, torch.relu(oracle(layer, x, ["default"] * 3, base_of(layer)))) < F32


@pytest.mark.parametrize("kw", [dict(padding_idx=0), dict(max_norm=1.0)], ids=["padding_idx", "max_norm"])
def test_embedding_padding_idx_and_max_norm_match_each_row_alone(kw):
    emb = lora.Embedding(30, 20, r=4, **kw)
    with torch.no_grad():
        emb.lora_A.normal_()
        emb.lora_B.normal_()
    a_shape, b_shape = emb.factor_shapes(3)
    emb.add_adapter("a", torch.randn(a_shape), torch.randn(b_shape), 0.7)
    emb.eval()
    x = torch.tensor([[0, 3, 0], [5, 0, 7], [0, 0, 1]])
    names = ["a", None, "default"]
    want = single_rows(emb, x, names)
    with torch.no_grad(), lora.batch_adapters(emb, names):
        got = emb(x)
    assert max(rows_err(got, want)) < F32


def test_a_model_with_an_r0_layer_and_repeated_table_entries():
    l0, l1 = lora.Linear(24, 24, r=0), make_layer("linear")
    net = torch.nn.Sequential(l0, l1).eval()
    x = make_input("linear", (5,))
    with torch.no_grad():
        h = l0(x)
        with lora.batch_adapters(net, ["a", None, "a", "b"], rows=[0, 1, 2, 3, -1]):
            got = net(x)
    assert rel_err(got, oracle(l1, h, ["a", None, "a", "b", None], base_of(l1))) < F32


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_between_batches_is_served_anew(assign):
    layer = make_layer("merged").eval()
    x = make_input("merged", (3,))
    names = [None, "a", "default"]
    with torch.no_grad(), lora.batch_adapters(layer, names):
        layer(x)
    state = {k: v.clone() * (1.5 if "lora" in k else 1.0) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=assign)
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    assert torch.equal(layer.get_adapter("default")[1], state["lora_B"])
    assert max(rows_err(got, oracle(layer, x, names, base_of(layer)))) < F32


def test_too_few_slots_between_asyncio_tasks_is_refused_and_released():
    layer = make_layer("linear").eval()
    layer.unmerge()
    lora.configure_slots(layer, slots=2, max_rank=5)
    x = make_input("linear", (2,))

    async def serve(names, delay):
        with lora.batch_adapters(layer, names):
            await asyncio.sleep(delay)
            with torch.no_grad():
                return layer(x)

    async def both():
        return await asyncio.gather(serve(["a", "b"], 0.01), serve(["c", None], 0), return_exceptions=True)

    first, second = asyncio.run(both())
    assert isinstance(second, ValueError) and "2 slots" in str(second)
    assert rel_err(first, oracle(layer, x, ["a", "b"], base_of(layer))) < F32
    assert not layer.__dict__["_lora_ext_slot_pool"].busy() and batched.ACTIVE.get() is None
    with torch.no_grad(), lora.batch_adapters(layer, ["c", None]):  # c pages in over the LRU slot
        got = layer(x)
    assert rel_err(got, oracle(layer, x, ["c", None], base_of(layer))) < F32


def test_bfloat16_weight_with_float32_factors_merged():
    layer = lora.Linear(24, 20, r=4)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer.weight.data = layer.weight.data.bfloat16()
    layer.bias.data = layer.bias.data.bfloat16()
    a_shape, b_shape = layer.factor_shapes(3)
    layer.add_adapter("a", torch.randn(a_shape) * 0.3, torch.randn(b_shape) * 0.3, 0.5)
    layer.eval()
    assert layer.merged and layer.lora_A.dtype == torch.float32
    x = make_input("linear", (4, 3), torch.bfloat16)
    names = ["a", None, "default", "a"]
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert max(rows_err(got, oracle(layer, x, names, base_of(layer)))) < TOL[torch.bfloat16]


def test_check_values_checks_again_after_a_data_write():
    """check_values is the remedy the README gives for writes through .data: it must look at the values again, not
    answer from the stamps (which such writes leave as they were)."""
    layer = make_layer("linear")
    layer.check_values("a")  # known finite from here on
    layer.get_adapter("a")[0].data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'a'"):
        layer.check_values("a")
    with pytest.raises(ValueError):
        layer.set_adapter("a")  # and the switch refuses it from then on
