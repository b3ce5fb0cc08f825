"""Mixed batches (lora.batch_adapters): each layer kind against a float64 oracle per row, merged and unmerged,
the ops against float64 with untouched rows checked bit for bit, the simulator's kernels through the layers,
and the refusals (before anything is written)."""
import os
import platform
import threading

import pytest
import torch
import torch.nn.functional as F

import lora_ext as lora
from lora_ext import ops
from helpers import TOL, batch_open_on_another_thread, dense_delta64, rel_err

RANKS = {"a": 2, "b": 5, "c": 3}
SCALES = {"a": 0.5, "b": 1.75, "c": -0.8}


def make_layer(kind, dtype=torch.float32, fan=False):
    if kind == "linear":
        layer = lora.Linear(24, 20, r=4, fan_in_fan_out=fan)
    elif kind == "merged":
        layer = lora.MergedLinear(24, 21, r=4, enable_lora=[True, False, True], fan_in_fan_out=fan)
    else:
        layer = lora.Embedding(30, 20, r=4)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    for name, r in RANKS.items():
        a_shape, b_shape = layer.factor_shapes(r)
        layer.add_adapter(name, torch.randn(a_shape) * 0.3, torch.randn(b_shape) * 0.3, SCALES[name])
    return layer.to(dtype)


def make_input(kind, lead, dtype=torch.float32):
    if kind == "embedding":
        return torch.randint(0, 30, lead)
    return torch.randn(*lead, 24).to(dtype)


def oracle(layer, x, names, base_weight):
    """float64, per row: the base weight's output plus the row's adapter's update (written independently of
    lora_ext: dense delta-W from the factors)."""
    w = base_weight.double()
    if isinstance(layer, lora.Embedding):
        base = w[x]
    else:
        wl = w.t() if layer.fan_in_fan_out else w
        base = x.double() @ wl.t() + layer.bias.double()
    outs = []
    for i, name in enumerate(names):
        row = base[i]
        if name is not None:
            A, B, s = layer.get_adapter(name)
            if isinstance(layer, lora.Embedding):
                row = row + s * A.double().t()[x[i]] @ B.double().t()
            else:
                layout = layer.layout()
                delta = dense_delta64(A, B, layout["num_blocks"], layout["block_ids"], row.shape[-1])
                row = row + s * x[i].double() @ delta.t()
        outs.append(row)
    return torch.stack(outs)


def base_of(layer):
    """The base weight (an unmerged copy when the layer is merged)."""
    return layer.state_dict()["weight"]  # state_dict always holds the base


@pytest.mark.parametrize("kind,fan", [("linear", False), ("linear", True), ("merged", False), ("merged", True),
                                      ("embedding", False)])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("lead", [(6,), (6, 3)])
def test_rows_match_their_adapters(kind, fan, merged, lead):
    layer = make_layer(kind, fan=fan)
    layer.set_adapter("b")
    layer.eval()
    if not merged:
        layer.unmerge()
    assert layer.merged == merged
    names = ["a", None, "c", "b", "a", None]
    x = make_input(kind, lead)
    base = base_of(layer)
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    ref = oracle(layer, x, names, base)
    for i in range(len(names)):
        assert rel_err(got[i], ref[i]) < TOL[torch.float32], f"row {i} ({names[i]})"
    if not merged:  # rows of the base are the weight's own output, bit for bit
        plain = layer._weight_forward(x)
        assert torch.equal(got[1], plain[1]) and torch.equal(got[5], plain[5])
    # the layer serves its active adapter again after the block
    with torch.no_grad():
        again = layer(x)
    ref_b = oracle(layer, x, ["b"] * len(names), base)
    assert rel_err(again, ref_b) < TOL[torch.float32]


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding"])
def test_bfloat16_rows(kind):
    layer = make_layer(kind, dtype=torch.bfloat16).eval()
    names = ["c", "a", None, "b"]
    x = make_input(kind, (4, 5), torch.bfloat16)
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    ref = oracle(layer, x, names, base_of(layer))
    for i in range(4):
        assert rel_err(got[i], ref[i]) < TOL[torch.bfloat16], f"row {i}"


def test_flattened_tokens_with_a_row_index():
    layer = make_layer("linear").eval()
    layer.unmerge()
    x = make_input("linear", (7,))
    rows = torch.tensor([1, 0, -1, 2, 1, 1, -1])
    table = ["b", "a", "c"]
    with torch.no_grad(), lora.batch_adapters(layer, table, rows=rows):
        got = layer(x)
    names = [table[i] if i >= 0 else None for i in rows.tolist()]
    ref = oracle(layer, x, names, base_of(layer))
    assert rel_err(got, ref) < TOL[torch.float32]
    # one entry per token of a (batch, tokens) input flattened by the layer's caller
    x3 = make_input("linear", (1, 7))
    with torch.no_grad(), lora.batch_adapters(layer, table, rows=rows):
        got3 = layer(x3)
    assert rel_err(got3[0], oracle(layer, x3[0], names, base_of(layer))) < TOL[torch.float32]


def test_autocast_rows_follow_autocast():
    layer = make_layer("linear").eval()
    layer.unmerge()
    names = ["a", "b", None]
    x = make_input("linear", (3, 4))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), lora.batch_adapters(layer, names):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    ref = oracle(layer, x, names, base_of(layer))
    assert rel_err(got, ref) < 2 * TOL[torch.bfloat16]


def test_sequential_model_and_threads():
    net = torch.nn.Sequential(make_layer("linear"), torch.nn.ReLU(), torch.nn.Linear(20, 24), make_layer("linear"))
    net.eval()
    batches = [["a", "b", None, "c"], ["c", "c", "a", "b"], [None, None, "b", "a"], ["b", "a", "c", None]]
    x = torch.randn(4, 24)
    expected = []
    with torch.no_grad():
        for names in batches:
            rows = []
            for i, name in enumerate(names):
                if name is None:
                    lora.unmerge_adapter(net)
                    saved = [m.scaling for m in (net[0], net[3])]
                    for m in (net[0], net[3]):
                        m.scaling = 0.0
                    rows.append(net(x[i:i + 1]))
                    for m, s in zip((net[0], net[3]), saved):
                        m.scaling = s
                else:
                    lora.set_adapter(net, name)
                    rows.append(net(x[i:i + 1]))
            expected.append(torch.cat(rows))
        lora.set_adapter(net, "default")
        for names, ref in zip(batches, expected):
            with lora.batch_adapters(net, names):
                assert rel_err(net(x), ref) < TOL[torch.float32]
        # four threads, each its own batch, concurrently: each gets exactly its own results
        alone = []
        for names in batches:
            with lora.batch_adapters(net, names):
                alone.append(net(x))
    errors = []

    def serve(names, want):
        try:
            for _ in range(15):
                with torch.no_grad(), lora.batch_adapters(net, names):
                    got = net(x)
                if not torch.equal(got, want):
                    errors.append(f"{names}: got another batch's output")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(n, w)) for n, w in zip(batches, alone)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    # a thread without a batch serves the active adapter while another thread has one open
    with torch.no_grad():
        plain = net(x)
        seen = []
        with lora.batch_adapters(net, batches[0]):
            t = threading.Thread(target=lambda: seen.append(net(x)))
            t.start()
            t.join(30)
    assert torch.equal(seen[0], plain)


# ---------------------------------------------------------------------------------------------------
# the ops


def ops_case(dtype, kind="linear", tokens=1, groups=6, slots=5, rank=4, k=19, d=13):
    m = groups * tokens
    out = torch.randn(m, d).to(dtype)
    x = torch.randint(0, k, (m,)) if kind == "embedding" else torch.randn(m, k).to(dtype)
    a = (torch.randn(slots, k, rank) * 0.5).to(dtype)
    b = (torch.randn(slots, rank, d) * 0.5).to(dtype)
    scales = torch.randn(slots)
    index = torch.randint(-1, slots, (groups,), dtype=torch.int32)
    index[0] = -1
    index[1] = slots - 1
    return out, x, a, b, scales, index


def ops_oracle(kind, out, x, a, b, scales, index, tokens):
    ref = out.double().clone()
    for m in range(out.shape[0]):
        i = int(index[m // tokens])
        if i < 0:
            continue
        t = a[i, x[m]].double() if kind == "embedding" else x[m].double() @ a[i].double()
        ref[m] += scales[i].double() * t @ b[i].double()
    return ref


def check_ops(kind, dtype, tokens, run):
    out, x, a, b, scales, index = ops_case(dtype, kind, tokens)
    before = out.clone()
    run(out, x, a, b, scales, index, tokens)
    ref = ops_oracle(kind, before, x, a, b, scales, index, tokens)
    live = (index >= 0).repeat_interleave(tokens)
    assert torch.equal(out[~live], before[~live]), "rows without a slot were written"
    assert rel_err(out[live], ref[live]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_ops_against_float64(dtype, kind, tokens):
    op = ops.batched_linear_ if kind == "linear" else ops.batched_embedding_
    with torch.no_grad():
        check_ops(kind, dtype, tokens, op)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_reference_backend_against_float64(kind):
    from lora_ext import reference
    with torch.no_grad():
        check_ops(kind, torch.float32, 2, getattr(reference, f"batched_{kind}_"))


def test_ops_refusals():
    out, x, a, b, scales, index = ops_case(torch.float32)
    with pytest.raises(ValueError, match="index"):
        ops.batched_linear_(out, x, a, b, scales, index.long())
    with pytest.raises(ValueError, match="scales"):
        ops.batched_linear_(out, x, a, b, scales.double(), index)
    with pytest.raises(ValueError, match="b_slots"):
        ops.batched_linear_(out, x, a, b[:, :2], scales, index)
    with pytest.raises(ValueError, match="tokens_per_index"):
        ops.batched_linear_(out, x, a, b, scales, index, 0)
    with pytest.raises(ValueError, match="x must have out's dtype"):
        ops.batched_linear_(out, x.double(), a, b, scales, index)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no_grad"):
        ops.batched_linear_(out, x, a, b, scales, index)


# ---------------------------------------------------------------------------------------------------
# the kernels (the simulator standing in for lora_ext._C) through the layers


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding"])
@pytest.mark.parametrize("lead", [(5,), (2, 20)])
def test_layers_through_the_kernels(sim_as_cuda, kind, lead):
    layer = make_layer(kind).eval()
    names = ["a", None, "b", "c", "a"][:lead[0]]
    x = make_input(kind, lead)
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    ref = oracle(layer, x, names, base_of(layer))
    assert rel_err(got, ref) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_on_cuda(cuda, dtype):
    layer = make_layer("merged", dtype=dtype).to(cuda.device).eval()
    names = ["a", None, "b", "c", "a", "b"]
    x = make_input("merged", (6, 4), dtype).to(cuda.device)
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = layer(x)
    cuda.synchronize()
    ref = oracle(layer.cpu(), x.cpu(), names, base_of(layer).cpu())
    for i in range(6):
        assert rel_err(got[i], ref[i]) < TOL[dtype], f"row {i}"


# ---------------------------------------------------------------------------------------------------
# refusals, before anything is written


def snapshot(layer):
    return layer.weight.detach().clone(), lora.slot_config(layer)


def assert_unchanged(layer, snap):
    assert torch.equal(layer.weight, snap[0])
    assert lora.slot_config(layer) == snap[1]


def test_refusals_name_the_row():
    layer = make_layer("linear").eval()
    x = make_input("linear", (3,))
    with torch.no_grad():
        with lora.batch_adapters(layer, ["a", "b", "c"]):
            layer(x)
        snap = snapshot(layer)
        with pytest.raises(ValueError, match=r"row 2: adapter 'nope' is not loaded"):
            with lora.batch_adapters(layer, ["a", "b", "nope"]):
                pass
        assert_unchanged(layer, snap)
        with pytest.raises(ValueError, match=r"4 rows were given for an input of shape \(3, 24\)"):
            with lora.batch_adapters(layer, ["a", "b", "c", "a"]):
                layer(x)
        with pytest.raises(ValueError, match=r"rows entry 1 is 7"):
            with lora.batch_adapters(layer, ["a"], rows=[0, 7, -1]):
                pass
        with pytest.raises(TypeError, match="entry 1"):
            with lora.batch_adapters(layer, ["a", 3]):
                pass
        with pytest.raises(ValueError, match="already open"):
            with lora.batch_adapters(layer, ["a", "b", "c"]), lora.batch_adapters(layer, ["a", "b", "c"]):
                pass
        assert_unchanged(layer, snap)


def test_rank_and_slot_limits():
    layer = make_layer("linear").eval()
    lora.configure_slots(layer, slots=2, max_rank=3)
    x = make_input("linear", (3,))
    snap = snapshot(layer)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"row 1: adapter 'b' has rank 5 .* \(3\)"):
            with lora.batch_adapters(layer, ["a", "b", None]):
                pass
        assert_unchanged(layer, snap)
        lora.configure_slots(layer, slots=2, max_rank=5)
        # the merged adapter ("default") needs a slot too: 3 adapters for 2 slots
        with pytest.raises(ValueError, match=r"needs 3 distinct adapters .* 2 slots"):
            with lora.batch_adapters(layer, ["a", "c", None]):
                pass
        with lora.batch_adapters(layer, ["a", "default", None]):
            with pytest.raises(ValueError, match="already open"):
                with lora.batch_adapters(layer, ["c", "c", "c"]):
                    pass
            got = layer(x)
    ref = oracle(layer, x, ["a", "default", None], base_of(layer))
    assert rel_err(got, ref) < TOL[torch.float32]


def test_slots_are_paged_least_recently_used():
    layer = make_layer("linear").eval()
    layer.unmerge()
    lora.configure_slots(layer, slots=2)
    x = make_input("linear", (2,))
    with torch.no_grad():
        for names, holds in ((["a", "b"], ["a", "b"]), (["c", "a"], ["a", "c"]), (["b", "b"], ["b", "c"]),
                             (["a", None], ["b", "a"])):
            with lora.batch_adapters(layer, names):
                got = layer(x)
            assert sorted(n for n in lora.slot_config(layer)["adapters"] if n) == sorted(holds), names
            assert rel_err(got, oracle(layer, x, names, base_of(layer))) < TOL[torch.float32]


def test_a_changed_adapter_is_served_with_its_new_values():
    layer = make_layer("linear").eval()
    x = make_input("linear", (2,))
    with torch.no_grad():
        with lora.batch_adapters(layer, ["a", "default"]):
            layer(x)
        a_shape, b_shape = layer.factor_shapes(2)
        layer.add_adapter("a", torch.randn(a_shape), torch.randn(b_shape), 0.25)
        layer.unmerge()
        layer.lora_B.mul_(3.0)  # the active adapter's live factors, in place
        with lora.batch_adapters(layer, ["a", "default"]):
            got = layer(x)
    assert rel_err(got, oracle(layer, x, ["a", "default"], base_of(layer))) < TOL[torch.float32]


def test_training_and_grad_refused():
    layer = make_layer("linear")
    x = make_input("linear", (2,))
    with torch.no_grad(), lora.batch_adapters(layer, ["a", "b"]):
        with pytest.raises(ValueError, match="training mode"):
            layer(x)
    layer.eval()
    with lora.batch_adapters(layer, ["a", "b"]):
        with pytest.raises(RuntimeError, match="an input that requires grad.*no_grad"):
            layer(x.requires_grad_(True))
        with pytest.raises(RuntimeError, match="parameters that require grad.*no_grad"):
            layer(x.detach())  # the factors require grad


def test_torch_compile_of_a_batched_layer():
    layer = make_layer("linear").eval()
    layer.unmerge()
    names = ["a", "c", None, "b"]
    x = make_input("linear", (4,))
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad(), lora.batch_adapters(layer, names):
        got = compiled(x)
    assert rel_err(got, oracle(layer, x, names, base_of(layer))) < TOL[torch.float32]
    with torch.no_grad():
        plain = compiled(x)  # outside the block: the active adapter, not the batch (no stale graph)
    assert rel_err(plain, oracle(layer, x, ["default"] * 4, base_of(layer))) < TOL[torch.float32]


def test_compiled_before_a_batch_opens_is_traced_again_inside_one():
    # traced with no batch open anywhere (the forward then never reads the context variable: fullgraph holds on
    # every torch), then used inside a block: the batch is served (the graph is guarded on batched.ANY_OPEN), and
    # after the block the active adapter again
    from lora_ext import batched
    layer = make_layer("linear").eval()
    layer.unmerge()
    names = ["b", None, "a", "c"]
    x = make_input("linear", (4,))
    assert batched.ANY_OPEN is False
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        before = compiled(x)
    assert rel_err(before, oracle(layer, x, ["default"] * 4, base_of(layer))) < TOL[torch.float32]
    plain = torch.compile(layer, backend="eager")
    with torch.no_grad(), lora.batch_adapters(layer, names):
        assert batched.ANY_OPEN is True
        got = plain(x)
    assert rel_err(got, oracle(layer, x, names, base_of(layer))) < TOL[torch.float32]
    assert batched.ANY_OPEN is False
    with torch.no_grad():
        after = compiled(x)
    assert torch.equal(after, before)


def test_open_batch_count_balances_on_errors_and_refusals():
    from lora_ext import batched
    layer = make_layer("linear").eval()
    with pytest.raises(ValueError):
        with torch.no_grad(), lora.batch_adapters(layer, ["nope"]):  # refused before anything opens
            pass
    assert batched.ANY_OPEN is False and batched._open_count == 0
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), lora.batch_adapters(layer, ["a"]):
            with lora.batch_adapters(torch.nn.Sequential(make_layer("linear").eval()), ["b"]):
                assert batched._open_count == 2
                raise RuntimeError("boom")
    assert batched.ANY_OPEN is False and batched._open_count == 0
    seen = []
    x = make_input("linear", (1,))
    with batch_open_on_another_thread(layer, ["a"]), torch.no_grad():
        seen.append(layer(x))  # this thread has no batch: the active adapter, although ANY_OPEN is True
        assert batched.ANY_OPEN is True
    assert batched.ANY_OPEN is False
    assert rel_err(seen[0], oracle(layer, x, ["default"], base_of(layer))) < TOL[torch.float32]


def test_linear_oracle_is_independent():
    # the oracle's base path agrees with F.linear on the base weight (guards the oracle itself)
    layer = make_layer("linear", fan=True).eval()
    x = make_input("linear", (3,))
    base = base_of(layer)
    ref = oracle(layer, x, [None] * 3, base)
    assert rel_err(F.linear(x, base.t(), layer.bias), ref) < 1e-6


def test_cpu_tensors_take_the_cpp_loops():
    # the float64-checked CPU results above come from lora_ext._cpu's loops, not the reference, where built
    from lora_ext import _cpu
    out, x, a, b, scales, index = ops_case(torch.bfloat16)
    assert ops._cpu_batched(out, x, "linear") is _cpu.batched_linear_
    assert ops._cpu_batched(out.double(), x, "linear") is None  # float64: the reference
    with pytest.raises(IndexError, match=r"index\[0\] = 9 is not a slot"):
        index[0] = 9
        ops.batched_linear_(out, x, a, b, scales, index)


# the C++ CPU loops' paths: rows grouped by slot into tiles of up to 8 rows (sub-tiles 4/2/1), the shrink in
# chunks of 4/2/1 vectors of ranks and a scalar tail, the expand in blocks of 256 columns with vector and scalar
# tails, zero-padded ranks trimmed, threads split by cost; both tile families (16 lanes where AVX-512 runs, 8
# elsewhere: `lanes`) on whatever machine runs the tests


def _cpp_loops():
    """lora_ext._cpu, the C++ loops (the test is skipped where it is not built)."""
    try:
        from lora_ext import _cpu
    except ImportError:
        pytest.skip("lora_ext._cpu is not built")
    return _cpu


@pytest.fixture(params=[8, 16], ids=lambda n: f"lanes{n}")
def lanes(request):
    """The C++ loops' tiles of 8 or 16 lanes (each runs on any x86-64 machine; the load picks one)."""
    _cpu = _cpp_loops()
    before = _cpu.batched_lanes(request.param)
    try:
        yield request.param
    finally:
        _cpu.batched_lanes(before)


GROUPED = [  # (groups, tokens, slots, rank, k, d); chunks of ranks for 16 lanes, then for 8
    (40, 1, 3, 16, 33, 1030),   # many rows per slot (tiles of 8 + 4/2/1); d: 4 blocks of 256 + 6 scalar columns
    (64, 1, 8, 64, 70, 300),    # rank 64: one 64-wide chunk in two 4-row halves of an 8-row tile (8 lanes: two
                                # 32-wide chunks in 2-row quarters); d: one block, vector and scalar column tails
    (5, 9, 4, 24, 70, 77),      # tokens >= 8 per group; rank 24: a 16-chunk and a scalar tail (16 + 8)
    (3, 17, 2, 136, 65, 129),   # tokens >= 8, rank 136 = 2 x 64 + 8 (4 x 32 + 8)
    (12, 2, 4, 40, 50, 45),     # rank 40 = 32 + 8 (32 + 8)
    (33, 1, 33, 8, 64, 16),     # one row per slot, rank 8 (scalar shrink; one 8-wide chunk)
    (7, 3, 3, 13, 40, 29),      # rank 13: scalar (8 + a scalar tail); d 29: 16 + 8 + 5 (24 + 5)
    (2, 128, 3, 16, 96, 264),   # prefill-like: 128 tokens per group
]


def grouped_case(dtype, kind, groups, tokens, slots, rank, k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    m = groups * tokens
    out = torch.randn(m, d, generator=gen).to(dtype)
    x = torch.randint(0, k, (m,), generator=gen) if kind == "embedding" else torch.randn(m, k, generator=gen).to(dtype)
    a = (torch.randn(slots, k, rank, generator=gen) * 0.5).to(dtype)
    b = (torch.randn(slots, rank, d, generator=gen) * 0.5).to(dtype)
    if rank > 3:  # slot 0 holds a lower-rank adapter, zero-padded
        a[0, :, rank - 3:] = 0
        b[0, rank - 3:] = 0
    scales = torch.randn(slots, generator=gen)
    index = torch.randint(-1, slots, (groups,), generator=gen, dtype=torch.int32)
    index[0] = -1
    index[-1] = 0
    if groups > 2:
        index[1] = slots - 1
    return out, x, a, b, scales, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("shape", GROUPED, ids=lambda s: "x".join(map(str, s)))
def test_ops_grouped_rows_against_float64(dtype, kind, shape, lanes):
    out, x, a, b, scales, index = grouped_case(dtype, kind, *shape, seed=sum(shape))
    tokens = shape[1]
    before = out.clone()
    op = ops.batched_linear_ if kind == "linear" else ops.batched_embedding_
    with torch.no_grad():
        op(out, x, a, b, scales, index, tokens)
    ref = ops_oracle(kind, before, x, a, b, scales, index, tokens)
    live = (index >= 0).repeat_interleave(tokens)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out[~live].view(bits), before[~live].view(bits)), "rows without a slot were written"
    assert rel_err(out[live], ref[live]) < TOL[dtype]
    if dtype == torch.float32:  # the update itself, not only the sum
        assert rel_err(out[live].double() - before[live].double(), ref[live] - before[live].double()) < TOL[dtype]


def test_lanes_choose_the_tiles_that_run():
    # the two tile families sum a row's products in other orders (a rank-16 row: 16 lanes, 8 interleaved sums of
    # one vector; 8 lanes, 2 of two), so float32 results differ in some bits: the switch the tests above use is live
    _cpu = _cpp_loops()
    out, x, a, b, scales, index = grouped_case(torch.float32, "linear", 9, 1, 9, 16, 512, 64, seed=3)
    before = _cpu.batched_lanes()
    assert before == 16 or before == 8
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):  # 16 where the AVX-512 clones run
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
        assert before == (16 if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags else 8)
    results = {}
    try:
        for n in (8, 16):
            _cpu.batched_lanes(n)
            assert _cpu.batched_lanes() == n
            results[n] = out.clone()
            ops.batched_linear_(results[n], x, a, b, scales, index)
    finally:
        _cpu.batched_lanes(before)
    assert _cpu.batched_lanes() == before
    assert not torch.equal(results[8], results[16])
    with pytest.raises(ValueError, match="lanes must be 0, 8 or 16, got 4"):
        _cpu.batched_lanes(4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_loops_do_not_depend_on_the_thread_count(dtype, lanes):
    # each element's sums are formed in one order whatever the split between threads
    cpu = ops._cpu_batched(torch.empty(1, 1, dtype=dtype), None, "linear")
    if cpu is None:
        pytest.skip("lora_ext._cpu is not built")
    out, x, a, b, scales, index = grouped_case(dtype, "linear", 24, 3, 5, 32, 300, 520, seed=7)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            o = out.clone()
            cpu(o, x, a, b, scales, index, 3)
            results.append(o)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
