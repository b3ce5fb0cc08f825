"""Hostile pass over this session's fixes: the DDP forward guard (lora_ext/ddp_guard.py, LoRALayer.forward,
mark_only_lora_as_trainable under DDP), mixed batches of merged layers (the merge snapshot in the slots, value_epoch,
inference-mode adapters keyed by identity, the grad refusal, closed batches), and check_values always checking.

DDP scenarios run on 2 gloo ranks (tests/dist.py, one spawn for all of them) and are compared with one process
training on both ranks' rows (float64). Mixed batches are compared with test_batched.oracle (float64, independent of
lora_ext). The bugs this pass found (Ctrl-C in a DDP forward, copied DDPs, nested DDP, check_values of one adapter
blocking batches of the others) are fixed; their tests pass."""
import contextlib
import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_ext as lora
from lora_ext import ddp_guard, ops
from lora_ext.serving import batches as serving_batches
from dist import run_ranks
from helpers import ddp_guard_off, TOL, rel_err, seed_adapters
from test_batched import base_of, make_input, make_layer, oracle

F32 = TOL[torch.float32]


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded for the assertions in the parent
        return f"RAISED {type(e).__name__}: {e}"


def rows_err(got, ref):
    return [float(rel_err(got[i], ref[i])) for i in range(got.shape[0])]


# ---------------------------------------------------------------------------------------------------------------
# DDP: the models, the data, one training step (the same code wrapped on the ranks and plain in the parent)

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = lora.Linear(8, 10, r=2, lora_alpha=4)
        self.b = lora.Linear(10, 5, r=2, lora_alpha=4)
        self.boom = None  # an exception the forward raises between the layers

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.boom is not None:
            raise self.boom
        return self.b(h)


class Outer(nn.Module):
    """A LoRA layer, then an inner model held unregistered (a DDP of its own on the ranks)."""

    def __init__(self, inner):
        super().__init__()
        self.lin = lora.Linear(8, 8, r=2, lora_alpha=4)
        nn.init.normal_(self.lin.lora_B, std=0.2)
        self.__dict__["inner"] = inner

    def forward(self, x):
        return self.inner(torch.tanh(self.lin(x)))


def _net(seed=0):
    torch.manual_seed(seed)
    net = Two().double()
    seed_adapters(net, "b", torch.Generator().manual_seed(seed + 1))
    lora.mark_only_lora_as_trainable(net)
    return net


_G = torch.Generator().manual_seed(11)
DX = torch.randn(4, 4, 8, generator=_G, dtype=torch.float64)  # step, 2 rows per rank
DY = torch.randn(4, 4, 5, generator=_G, dtype=torch.float64)


def _inner(m):
    return getattr(m, "module", m)


def _trainable(*modules):
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _step(model, step, ranks, params):
    opt = torch.optim.SGD(params, lr=0.5)
    opt.zero_grad()
    loss = sum(F.mse_loss(model(DX[step, 2 * r:2 * r + 2]), DY[step, 2 * r:2 * r + 2]) for r in ranks) / len(ranks)
    loss.backward()
    opt.step()


def _state(**modules):
    return {f"{k}.{n}": v.detach().clone() for k, m in modules.items()
            for n, v in lora.lora_state_dict(m, bias="all").items()}


def _ddp(net, **kw):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(net, **kw)


def _plain(net, **kw):
    return net


def _stack():
    return len(getattr(ddp_guard._LOCAL, "stack", None) or [])


# ---------------------------------------------------------------------------------------------------------------
# DDP scenarios: each returns (trained values, facts) or what it raised

def sc_interrupted_forward_then_rewrap(wrap, ranks):
    """Ctrl-C (KeyboardInterrupt) inside a DDP forward, then README's flow: switch the inner module, wrap again."""
    net = _net()
    m = wrap(net)
    _step(m, 0, ranks, _trainable(net))
    net.boom = KeyboardInterrupt()
    try:
        m(DX[0, :2])
    except KeyboardInterrupt:
        pass
    net.boom = None
    old = weakref.ref(m)
    lora.set_adapter(net, "b")
    m = wrap(net)
    facts = {"trained": _try(lambda: [_step(m, s, ranks, _trainable(net)) for s in (1, 0)] and None)}
    # the interrupted forward's entry goes when a hooked DDP's forward next enters on this thread (the new DDP's
    # second step), and the old DDP with it
    facts["stack"] = _stack()
    gc.collect()
    facts["old_ddp_alive"] = old() is not None and old() is not net
    return _state(net=net), facts


def sc_raising_forward_and_hook(wrap, ranks):
    """A forward that raises an Exception, and a user's forward pre-hook (registered after the guard's) that raises:
    the stacks are left clean, the DDP is freed, training goes on."""
    net = _net()
    m = wrap(net)
    _step(m, 0, ranks, _trainable(net))
    net.boom = ValueError("boom")
    facts = {"raised": _try(lambda: m(DX[0, :2]))}
    net.boom = None
    facts["stack_after_raise"] = _stack()
    flag = []

    def pre(mod, args):
        if flag:
            raise RuntimeError("hook boom")

    m.register_forward_pre_hook(pre)
    flag.append(1)
    facts["hook_raised"] = _try(lambda: m(DX[0, :2]))
    flag.clear()
    facts["stack_after_hook"] = _stack()
    _step(m, 1, ranks, _trainable(net))
    old = weakref.ref(m)
    m = None
    gc.collect()
    facts["old_ddp_alive"] = old() is not None and old() is not net
    return _state(net=net), facts


def sc_deepcopy(wrap, ranks):
    """A DDP-wrapped model deep-copied after training began (a teacher / EMA copy): the copy trains."""
    net = _net()
    m = wrap(net)
    _step(m, 0, ranks, _trainable(net))
    c = copy.deepcopy(m)
    facts = {"trained": _try(lambda: _step(c, 1, ranks, _trainable(_inner(c))))}
    return _state(copy=_inner(c)), facts


def sc_pickle(wrap, ranks):
    net = _net()
    m = wrap(net)
    _step(m, 0, ranks, _trainable(net))
    c = pickle.loads(pickle.dumps(m))
    facts = {"trained": _try(lambda: _step(c, 1, ranks, _trainable(_inner(c))))}
    return _state(copy=_inner(c)), facts


def _nested(wrap, ranks):
    inner = _net(3)
    torch.manual_seed(4)
    outer = Outer(wrap(inner)).double()
    lora.mark_only_lora_as_trainable(outer)
    m = wrap(outer)
    _step(m, 0, ranks, _trainable(outer, inner))
    # README's flow for the inner model: a trainable switch, then wrap it again (the outer DDP unchanged)
    lora.set_adapter(inner, "b")
    outer.__dict__["inner"] = wrap(inner)
    facts = {"trained": _try(lambda: _step(m, 1, ranks, _trainable(outer, inner)))}
    return _state(outer=outer, inner=inner), facts


def sc_nested_inner_rewrapped(wrap, ranks):
    """A DDP whose forward calls another DDP (held unregistered), the inner one wrapped again after a switch."""
    return _nested(wrap, ranks)


def sc_nested_inner_rewrapped_unchecked(wrap, ranks):
    """The same with the forward check off in this process: DDP itself trains the nested models in step."""
    with ddp_guard_off():
        return _nested(wrap, ranks)


def sc_nested_outer_switched(wrap, ranks):
    """A trainable switch of the OUTER wrapped module, whose layer runs before the inner DDP: refused."""
    inner = _net(3)
    torch.manual_seed(4)
    outer = Outer(wrap(inner)).double()
    seed_adapters(outer, "b", torch.Generator().manual_seed(9))
    lora.mark_only_lora_as_trainable(outer)
    m = wrap(outer)
    _step(m, 0, ranks, _trainable(outer, inner))
    _step(m, 1, ranks, _trainable(outer, inner))
    lora.set_adapter(outer, "b")
    return None, {"trained": _try(lambda: _step(m, 2, ranks, _trainable(outer, inner)))}


def sc_module_called_directly(wrap, ranks):
    """After the DDP was hooked, a trainable switch of the inner module: the module called directly (not through
    DDP, no synchronisation involved) trains; the DDP refuses."""
    net = _net()
    m = wrap(net)
    _step(m, 0, ranks, _trainable(net))
    lora.set_adapter(net, "b")
    facts = {"direct": _try(lambda: net(DX[1, :2]).sum().backward()),
             "through_ddp": _try(lambda: m(DX[1, :2])) if m is not net else None}
    return None, facts


def sc_many_ddps(wrap, ranks):
    """DDPs made, trained and dropped in a loop over one module (switching in between): ids get reused, nothing
    stale is kept."""
    net = _net()
    for i in range(4):
        m = wrap(net)
        _step(m, i, ranks, _trainable(net))
        m = None
        gc.collect()
        lora.set_adapter(net, "b" if i % 2 == 0 else "default")
    return _state(net=net), {"hooked": len(ddp_guard._HOOKED), "stack": _stack()}


def sc_mark_under_ddp(wrap, ranks):
    net = _net()
    m = wrap(net)
    facts = {"same": _try(lambda: lora.mark_only_lora_as_trainable(m)),
             "more": _try(lambda: lora.mark_only_lora_as_trainable(m, bias="all")) if m is not net else None,
             "flags": sorted(n for n, p in net.named_parameters() if p.requires_grad)}
    _step(m, 0, ranks, _trainable(net))
    return _state(net=net), facts


DDP_SCENARIOS = {f.__name__[3:]: f for f in (
    sc_interrupted_forward_then_rewrap, sc_raising_forward_and_hook, sc_deepcopy, sc_pickle,
    sc_nested_inner_rewrapped, sc_nested_inner_rewrapped_unchecked, sc_nested_outer_switched,
    sc_module_called_directly, sc_many_ddps, sc_mark_under_ddp)}


def ddp_case(rank, world):
    out = {}
    for name, fn in DDP_SCENARIOS.items():
        out[name] = _try(lambda: fn(_ddp, [rank]))
        ddp_guard._LOCAL.stack = []  # each scenario starts clean whatever the one before left
    return out


@pytest.fixture(scope="module")
def ddp_runs():
    ranks = run_ranks(ddp_case, timeout=300)
    ref = {name: _try(lambda: fn(_plain, [0, 1])) for name, fn in DDP_SCENARIOS.items()}
    return ranks, ref


def _result(ddp_runs, name):
    (r0, r1), ref = ddp_runs
    for rank, got in enumerate((r0[name], r1[name])):
        assert not isinstance(got, str), f"rank {rank}: {got}"
    assert not isinstance(ref[name], str), ref[name]
    return r0[name], r1[name], ref[name]


def _in_step(ddp_runs, name):
    r0, r1, ref = _result(ddp_runs, name)
    for rank, (state, facts) in enumerate((r0, r1)):
        assert facts.get("trained") is None, f"rank {rank}: {facts['trained']}"
        assert state.keys() == ref[0].keys()
        for k in ref[0]:
            err = float(rel_err(state[k], ref[0][k]))
            assert err < 1e-10, (rank, k, err)
    assert all(torch.equal(r0[0][k], r1[0][k]) for k in r0[0]), "the ranks trained apart"
    return r0[1], r1[1]


def test_ctrl_c_in_a_ddp_forward_leaves_no_ddp_behind(ddp_runs):
    for facts in _in_step(ddp_runs, "interrupted_forward_then_rewrap"):
        assert facts["stack"] == 0 and not facts["old_ddp_alive"], facts


def test_an_exception_in_the_forward_or_a_hook_leaves_the_stacks_clean(ddp_runs):
    for facts in _in_step(ddp_runs, "raising_forward_and_hook"):
        assert facts["raised"].startswith("RAISED ValueError: boom"), facts
        assert facts["hook_raised"].startswith("RAISED RuntimeError: hook boom"), facts
        assert facts["stack_after_raise"] == facts["stack_after_hook"] == 0 and not facts["old_ddp_alive"], facts


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_ddp_trains(ddp_runs, how):
    _in_step(ddp_runs, how)


def test_an_inner_ddp_wrapped_again_inside_an_outer_ddp_trains(ddp_runs):
    _in_step(ddp_runs, "nested_inner_rewrapped")


def test_nested_ddps_train_in_step_without_the_check(ddp_runs):
    _in_step(ddp_runs, "nested_inner_rewrapped_unchecked")  # the control of the xfail above


def test_a_switch_of_the_outer_module_of_nested_ddps_is_refused(ddp_runs):
    r0, r1, _ = _result(ddp_runs, "nested_outer_switched")
    for _, facts in (r0, r1):
        said = facts["trained"]
        assert isinstance(said, str) and said.startswith("RAISED RuntimeError") and "Linear(8, 8)" in said, said


def test_the_module_called_directly_after_an_inner_switch_is_not_refused(ddp_runs):
    r0, r1, _ = _result(ddp_runs, "module_called_directly")
    for _, facts in (r0, r1):
        assert facts["direct"] is None, facts["direct"]
        assert isinstance(facts["through_ddp"], str) and "does not synchronise" in facts["through_ddp"]


def test_ddps_made_and_dropped_in_a_loop(ddp_runs):
    for facts in _in_step(ddp_runs, "many_ddps"):
        assert facts["hooked"] <= 1 and facts["stack"] == 0, facts


def test_mark_only_lora_as_trainable_under_ddp(ddp_runs):
    for facts in _in_step(ddp_runs, "mark_under_ddp"):
        assert facts["same"] is None
        assert facts["more"].startswith("RAISED ValueError") and "wrap it again" in facts["more"]
        assert facts["flags"] == ["a.lora_A", "a.lora_B", "b.lora_A", "b.lora_B"]


def test_running_outside_ddp_is_cheap(monkeypatch):
    """Cheap: no stack walk outside DDP (its time: bench/host_time.py)."""
    frames = []
    monkeypatch.setattr(ddp_guard, "_inside", lambda ddp: frames.append(ddp) or False)
    for _ in range(3):
        assert ddp_guard.running() is None
    assert frames == []


# ---------------------------------------------------------------------------------------------------------------
# mixed batches: an open batch on another thread, value_epoch


@contextlib.contextmanager
def served_elsewhere(layer, names, x):
    """A batch of `names` open on another thread for the duration; yields a dict that gets its output (computed
    when the block exits, i.e. from the slots loaded when the batch opened)."""
    opened, release, out = threading.Event(), threading.Event(), {}

    def serve():
        try:
            with lora.batch_adapters(layer, names):
                opened.set()
                release.wait(20)
                with torch.no_grad():
                    out["got"] = layer(x)
        except Exception as e:  # noqa: BLE001
            out["error"] = e
            opened.set()

    t = threading.Thread(target=serve)
    t.start()
    assert opened.wait(20)
    try:
        yield out
    finally:
        release.set()
        t.join(20)
    assert "error" not in out, out.get("error")


def _batch(layer, names, x):
    with torch.no_grad(), lora.batch_adapters(layer, names):
        return layer(x)


def _served_layer(monkeypatch, merged):
    """A Linear layer with adapters (merged in eval() or not), an input, and batches that wait 0.2 s, not 30."""
    monkeypatch.setattr(serving_batches, "WAIT_SECONDS", 0.2)
    layer = make_layer("linear").eval()
    if not merged:
        layer.unmerge()
    return layer, make_input("linear", (2,))


@pytest.mark.parametrize("merged", [False, True])
def test_check_values_of_one_adapter_does_not_block_batches_of_the_others(monkeypatch, merged):
    layer, x = _served_layer(monkeypatch, merged)
    with served_elsewhere(layer, ["a", "b"], x):
        with torch.no_grad():
            layer.get_adapter("a")[1].data.mul_(2.0)
        layer.check_values("a")
        names = ["b", None]
        got = _batch(layer, names, x)
    assert max(rows_err(got, oracle(layer, x, names, base_of(layer)))) < F32


@pytest.mark.parametrize("merged", [False, True])
def test_check_values_while_another_thread_serves_the_adapter_never_rewrites_its_slot(monkeypatch, merged):
    layer, x = _served_layer(monkeypatch, merged)
    names = ["a", "b"]
    before = oracle(layer, x, names, base_of(layer))
    with served_elsewhere(layer, names, x) as out:
        with torch.no_grad():
            layer.get_adapter("a")[1].data.mul_(2.0)
        layer.check_values("a")
        with pytest.raises(ValueError, match="adapter 'a' changed since another open batch"):
            _batch(layer, ["a", None], x)
    assert max(rows_err(out["got"], before)) < F32  # the served rows kept the values of their slots
    got = _batch(layer, names, x)  # once closed: the new values
    assert max(rows_err(got, oracle(layer, x, names, base_of(layer)))) < F32


def test_two_threads_serve_one_merged_layer_and_a_third_replaces_the_merged_adapter():
    layer = make_layer("linear").eval()
    x = make_input("linear", (2,))
    a_shape, b_shape = layer.factor_shapes(4)
    with served_elsewhere(layer, ["a", None], x) as one, served_elsewhere(layer, ["b", "default"], x) as two:
        with pytest.raises(RuntimeError, match="add_adapter would replace adapter 'default'"):
            layer.add_adapter("default", torch.randn(a_shape), torch.randn(b_shape), 0.3)
        layer.add_adapter("c", torch.randn(a_shape), torch.randn(b_shape), 0.3)  # another name: fine
    base = base_of(layer)
    assert max(rows_err(one["got"], oracle(layer, x, ["a", None], base))) < F32
    assert max(rows_err(two["got"], oracle(layer, x, ["b", "default"], base))) < F32


# ---------------------------------------------------------------------------------------------------------------
# mixed batches: merged snapshots (verified)


@pytest.mark.parametrize("lossless", [True, None])
def test_lossless_bfloat16_merge_with_live_factors_written_after_it(lossless):
    layer = lora.Linear(24, 20, r=4, lossless=lossless)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer.add_adapter("a", torch.randn(4, 24) * 0.3, torch.randn(20, 4) * 0.3, 0.5)
    layer = layer.bfloat16()
    base = base_of(layer).clone()
    A0, B0 = (t.detach().double().clone() for t in layer.get_adapter("default")[:2])
    s0 = layer.scaling
    layer.eval()
    assert layer.merged and layer._merged_record is not None
    with torch.no_grad():
        layer.lora_B.mul_(2.0)  # the weight still holds the old update
    x = make_input("linear", (3,), torch.bfloat16)
    names = [None, "a", "default"]
    got = _batch(layer, names, x)
    ref = oracle(layer, x, [None, "a", None], base)
    ref[2] += s0 * x[2].double() @ (B0 @ A0).t()  # the default row: what the weight holds
    assert max(rows_err(got, ref)) < TOL[torch.bfloat16], rows_err(got, ref)
    layer.unmerge()
    assert torch.equal(layer.weight, base)  # lossless: the base back bit for bit


def test_embedding_merged_with_live_factors_written_after_it():
    layer = make_layer("embedding")
    base = base_of(layer).clone()
    layer.eval()
    assert layer.merged
    with torch.no_grad():
        layer.lora_B.mul_(2.0)
        layer.lora_A.add_(0.5)
    x = make_input("embedding", (3, 4))
    names = [None, "a", "b"]
    got = _batch(layer, names, x)
    assert max(rows_err(got, oracle(layer, x, names, base))) < F32


@pytest.mark.parametrize("fan", [False, True])
def test_merged_linear_with_a_disabled_group_and_a_live_change(fan):
    layer = lora.MergedLinear(24, 21, r=4, enable_lora=[False, True, False], fan_in_fan_out=fan)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    for n, r in (("a", 2), ("b", 3)):
        a_shape, b_shape = layer.factor_shapes(r)
        layer.add_adapter(n, torch.randn(a_shape) * 0.3, torch.randn(b_shape) * 0.3, 0.6)
    base = base_of(layer).clone()
    layer.eval()
    with torch.no_grad():
        layer.lora_A.mul_(-3.0)
    layer.scaling = 2.5
    x = make_input("linear", (3, 2))
    names = ["a", None, "b"]
    got = _batch(layer, names, x)
    assert max(rows_err(got, oracle(layer, x, names, base))) < F32


# ---------------------------------------------------------------------------------------------------------------
# inference-mode adapters: identity, storage reuse (verified)


def test_inference_mode_adapter_replaced_then_storage_reused_is_loaded_again():
    layer = make_layer("linear").eval()
    layer.unmerge()
    x = make_input("linear", (2,))
    names = ["inf", None]
    A, B, _ = layer.get_adapter("a")
    for i in range(6):
        with torch.inference_mode():
            layer.add_adapter("inf", A * (2 + i), B.clone(), 0.7)
        got = _batch(layer, names, x)
        assert max(rows_err(got, oracle(layer, x, names, base_of(layer)))) < F32, i
    # the same storage under a new tensor (what an allocator handing the freed address back amounts to), with other
    # values written under inference_mode: another tensor object, so the slot is loaded again
    old = layer.get_adapter("inf")[0]
    ptr = old.data_ptr()
    with torch.inference_mode():
        view = old.view_as(old)
        view.mul_(-1.5)
        layer._adapters["inf"] = (view, layer._adapters["inf"][1], 0.7)
    del old
    gc.collect()
    assert layer.get_adapter("inf")[0].data_ptr() == ptr
    got = _batch(layer, names, x)
    assert max(rows_err(got, oracle(layer, x, names, base_of(layer)))) < F32


# ---------------------------------------------------------------------------------------------------------------
# the grad refusal: no false positives (verified)


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding"])
@pytest.mark.parametrize("merged", [False, True])
def test_everything_frozen_serves_with_gradients_enabled(kind, merged):
    layer = make_layer(kind).eval()
    if not merged:
        layer.unmerge()
    for p in layer.parameters():
        p.requires_grad_(False)
    assert torch.is_grad_enabled()
    x = make_input(kind, (3, 2))
    names = ["a", None, "default"]
    with lora.batch_adapters(layer, names):
        got = layer(x)
    assert not got.requires_grad
    assert max(rows_err(got, oracle(layer, x, names, base_of(layer)))) < F32


def test_grad_refusal_for_an_input_that_requires_grad():
    layer = make_layer("linear").eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    x = make_input("linear", (3,)).requires_grad_()
    with lora.batch_adapters(layer, ["a", None, "b"]):
        with pytest.raises(RuntimeError, match="an input that requires grad"):
            layer(x)
        with torch.no_grad():
            layer(x)  # no_grad serves


# ---------------------------------------------------------------------------------------------------------------
# check_values: no full check on every switch, merge or batch (verified)


def test_no_value_check_on_warm_switches_merges_and_batches(monkeypatch):
    calls = []
    real = ops.check_finite

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "check_finite", counting)
    torch.manual_seed(0)
    net = nn.Sequential(make_layer("linear"), nn.ReLU(), lora.Linear(20, 7, r=4))
    for n in ("a", "b", "c"):
        net[2].add_adapter(n, torch.randn(4, 20) * 0.1, torch.randn(7, 4) * 0.1, 0.3)
    x = make_input("linear", (3,))

    def cycle():
        for n in ("a", "b", "c", "default"):
            lora.set_adapter(net, n)
        net.eval()
        net.train()
        for n in ("a", "default"):
            net[0].set_adapter(n)
        lora.merge_adapter(net)
        for n in ("b", "default"):
            lora.set_adapter(net, n)
        lora.unmerge_adapter(net)
        net.eval()
        with torch.no_grad(), lora.batch_adapters(net, ["a", None, "b"]):
            net(x)
        net.train()

    cycle()
    calls.clear()
    for _ in range(2):
        cycle()
    assert calls == []
    net[2].check_values("a")  # the public call always checks
    assert len(calls) == 1, calls
