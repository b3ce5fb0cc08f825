"""Hostile tests of the DDP forward check (LoRALayer.forward / _check_ddp_forward): a LoRA layer running inside a
DistributedDataParallel forward with gradients enabled refuses when its trainable factors are not among the
Parameters DDP was built with. Real torch.distributed (2 gloo ranks on 127.0.0.1, tests/dist.py).

Legitimate training must go on in step (the ranks equal, and equal to one process on the whole batch, float64);
anything that would let the ranks train apart must be refused loudly. Bugs are strict xfails, each saying what goes
wrong. A handful of spawns: every scenario of a kind runs in one case function that returns a dict."""
import contextlib
import os
import tempfile
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import lora_ext as lora
from lora_ext import ddp_guard
from dist import run_ranks
from helpers import ddp_guard_off, lora_layers_of, seed_adapters
from test_distributed_hostile2 import DNet

WORLD = 2


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded for the assertions in the parent
        return f"RAISED {type(e).__name__}: {e}"


def _refused(result, *words):
    return isinstance(result, str) and result.startswith("RAISED RuntimeError") \
        and "DistributedDataParallel" in result and all(w in result for w in words)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------
# models and training (the same code runs on the ranks, wrapped, and in one process on both ranks' data)

class Kinds(nn.Module):
    """Every layer kind: Embedding, MergedLinear (enable_lora, fan_in_fan_out), Conv1d, Conv2d, a Linear nested in
    a Sequential and called twice in one forward (optionally under torch.utils.checkpoint), a fan_in_fan_out head,
    a spare layer (unused when use_spare is False) and, with r0, a loralib plain layer (r=0, the default r)."""

    def __init__(self, ckpt=None):
        super().__init__()
        kw = dict(r=2, lora_alpha=4)
        self.emb = lora.Embedding(20, 12, **kw)
        self.qkv = lora.MergedLinear(12, 12, enable_lora=[True, False, True], fan_in_fan_out=True, **kw)
        self.conv1 = lora.Conv1d(12, 6, 3, padding=1, **kw)
        self.conv2 = lora.Conv2d(1, 2, 3, padding=1, **kw)
        self.block = nn.Sequential(lora.Linear(12, 12, **kw), nn.Tanh())
        self.head = lora.Linear(12, 3, fan_in_fan_out=True, **kw)
        self.spare = lora.Linear(12, 3, **kw)
        self.plain = None  # build(r0=True): set after the adapters are seeded
        self.ckpt = ckpt  # None: no checkpointing; True / False: use_reentrant
        self.use_spare = True

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))                         # (B, T, 12)
        h = torch.tanh(self.qkv(h))
        c = torch.tanh(self.conv1(h.transpose(1, 2)))         # (B, 6, T)
        c = self.conv2(c.unsqueeze(1))                        # (B, 2, 6, T)
        h = h + c.flatten(1, 2).transpose(1, 2)               # (B, T, 12)
        for _ in range(2):
            h = self.block(h) if self.ckpt is None else checkpoint(self.block, h, use_reentrant=self.ckpt)
        if self.plain is not None:
            h = self.plain(h)
        y = self.head(h)
        return y + self.spare(h) if self.use_spare else y


def build(r0=False, **kw):
    torch.manual_seed(0)
    net = Kinds(**kw).double()
    seed_adapters(net, "b", torch.Generator().manual_seed(1))
    if r0:
        net.plain = lora.Linear(12, 12).double()
    lora.mark_only_lora_as_trainable(net)
    return net


_G = torch.Generator().manual_seed(3)
IDS = torch.randint(0, 20, (3, 2, 4, 5), generator=_G)                  # step, micro-batch, 2 rows per rank
TARGET = torch.randn(3, 2, 4, 5, 3, generator=_G, dtype=torch.float64)


def _inner(m):
    return getattr(m, "module", m)


def _loss(model, step, micro, ranks):
    """One micro-batch's loss: a rank's own rows (DDP averages the ranks' gradients), or the mean over the ranks."""
    return sum(F.mse_loss(model(IDS[step, micro, 2 * r:2 * r + 2]), TARGET[step, micro, 2 * r:2 * r + 2])
               for r in ranks) / len(ranks)


def _train(model, ranks, steps=2, micros=1, first=0):
    opt = torch.optim.SGD([p for p in _inner(model).parameters() if p.requires_grad], lr=0.5)
    for step in range(first, first + steps):
        opt.zero_grad()
        for micro in range(micros):  # gradient accumulation: every micro-batch but the last under no_sync
            last = micro == micros - 1
            with (contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
                _loss(model, step, micro, ranks).backward()
        opt.step()


def _state(model):
    """Every trained value: the live factors and biases, and the inactive adapters' factors."""
    inner = _inner(model)
    out = {k: v.detach().clone() for k, v in lora.lora_state_dict(inner, bias="all").items()}
    for name, m in inner.named_modules():
        if isinstance(m, lora.LoRALayer) and m.has_lora:
            for a in m.adapter_names:
                if a != m.active_adapter:
                    A, B, _ = m.get_adapter(a)
                    out[f"{name}.<{a}>.A"], out[f"{name}.<{a}>.B"] = A.detach().clone(), B.detach().clone()
    return out


def _ddp(net, **kw):
    return DistributedDataParallel(net, **kw)


def _plain(net, **kw):
    return net


# ---------------------------------------------------------------------------------------------------------------
# legitimate training: every scenario returns the trained values (or what it raised)

def sc_plain(wrap, ranks):
    m = wrap(build())
    _train(m, ranks)
    return _state(m)


def sc_static_graph(wrap, ranks):
    m = wrap(build(), static_graph=True)
    _train(m, ranks)
    return _state(m)


def sc_find_unused(wrap, ranks):
    net = build()
    net.use_spare = False
    m = wrap(net, find_unused_parameters=True)
    _train(m, ranks)
    return _state(m)


def sc_no_sync(wrap, ranks):
    m = wrap(build())
    _train(m, ranks, micros=2)
    return _state(m)


def sc_checkpoint_non_reentrant(wrap, ranks):
    m = wrap(build(ckpt=False))
    _train(m, ranks)
    return _state(m)


def sc_checkpoint_reentrant(wrap, ranks):
    # reentrant checkpointing of a layer used twice: DDP itself needs static_graph for it
    m = wrap(build(ckpt=True), static_graph=True)
    _train(m, ranks)
    return _state(m)


def sc_rewrap(wrap, ranks):
    """README's flow: switch the inner module, wrap it again (the old DDP still alive), a new optimizer."""
    first = wrap(build())
    _train(first, ranks, steps=1)
    lora.set_adapter(_inner(first), "b")
    second = wrap(_inner(first))
    _train(second, ranks, steps=1, first=1)
    lora.set_adapter(_inner(second), "default")
    third = wrap(_inner(second))
    _train(third, ranks, steps=1, first=2)
    return _state(third)


def sc_second_ddp(wrap, ranks):
    net = build()
    one, two = wrap(net), wrap(net)  # two DDPs over the same module: either trains it
    _train(two, ranks, steps=1)
    _train(one, ranks, steps=1, first=1)
    return _state(one)


def _bias_mode(bias, wrap, ranks):
    net = build()
    lora.mark_only_lora_as_trainable(net, bias=bias)
    m = wrap(net)
    _train(m, ranks)
    return _state(m)


def sc_bias_all(wrap, ranks):
    return _bias_mode("all", wrap, ranks)


def sc_bias_lora_only(wrap, ranks):
    return _bias_mode("lora_only", wrap, ranks)


def sc_frozen_layer_serving_switch(wrap, ranks):
    """One layer's factors frozen before the wrap, then switched (a serving switch: copied into the live storage)."""
    net = build()
    net.block[0].lora_A.requires_grad_(False)
    net.block[0].lora_B.requires_grad_(False)
    m = wrap(net)
    _train(m, ranks, steps=1)
    _inner(m).block[0].set_adapter("b")
    _train(m, ranks, steps=1, first=1)
    return _state(m)


def sc_ignored(wrap, ranks):
    """head's factors ignored by DDP (_set_params_and_buffers_to_ignore_for_model): they pass; their gradients are
    the rank's own, so one step and the parent compares every other value."""
    net = build()
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ["head.lora_A", "head.lora_B"])
    m = wrap(net)
    _train(m, ranks, steps=1)
    return {k: v for k, v in _state(m).items() if not k.startswith("head.")}


def sc_eval_merged(wrap, ranks):
    """A validation forward in eval() (merged) with gradients enabled, then training on. The forward trains the
    factors through the merge (tests/test_train_through_merge.py): its loss requires grad; no backward follows."""
    m = wrap(build())
    _train(m, ranks, steps=1)
    m.eval()
    assert all(layer.merged for layer in lora_layers_of(_inner(m)))
    val = _loss(m, 1, 1, ranks)
    assert torch.isfinite(val) and val.requires_grad
    m.train()
    _train(m, ranks, steps=1, first=1)
    return _state(m)


def sc_switch_back_and_forth(wrap, ranks):
    """set_adapter(ddp.module, 'b') then back to 'default', an adapter deleted and another added, before any
    forward: the layers hold the Parameters DDP was built with again."""
    m = wrap(build())
    inner = _inner(m)
    for name in ("b", "default", "b", "default"):
        lora.set_adapter(inner, name)
    lora.delete_adapter(inner, "b")
    seed_adapters(inner, "c", torch.Generator().manual_seed(5))  # (also re-draws the live lora_B: same everywhere)
    _train(m, ranks)
    return _state(m)


class WithExternal(nn.Module):
    """The wrapped module's forward calls a LoRA layer that is not its submodule (not under DDP)."""

    def __init__(self, trainable):
        super().__init__()
        self.net = build()
        torch.manual_seed(7)
        ext = lora.Linear(3, 3, r=2, lora_alpha=4).double()
        nn.init.normal_(ext.lora_B, std=0.3)
        ext.lora_A.requires_grad_(trainable)
        ext.lora_B.requires_grad_(trainable)
        ext.weight.requires_grad_(False)
        self.__dict__["ext"] = ext  # unregistered

    def forward(self, ids):
        return self.ext(self.net(ids))


def sc_external_frozen(wrap, ranks):
    m = wrap(WithExternal(trainable=False))
    _train(m, ranks)
    return _state(m)


def sc_r0(wrap, ranks):
    """A loralib plain layer (r=0: lora.Linear(12, 12)) in the model."""
    m = wrap(build(r0=True))
    _train(m, ranks)
    return _state(m)


class Pre(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # float32: DDP's delayed all-reduce buffer is float32
        self.pre = nn.Parameter(torch.ones(6))  # the first thing used: its gradient comes last
        self.lin1 = lora.Linear(6, 5, r=2, lora_alpha=4)
        self.lin2 = lora.Linear(5, 3, r=2, lora_alpha=4)
        nn.init.normal_(self.lin1.lora_B, std=0.3)
        nn.init.normal_(self.lin2.lora_B, std=0.3)
        lora.mark_only_lora_as_trainable(self)
        self.pre.requires_grad_(True)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x * self.pre)))


_PX = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(6))  # step, rank, rows, features
_PY = torch.randn(2, 2, 4, 3, generator=torch.Generator().manual_seed(7))


def _delay_train(wrap, ranks):
    """DDP's delay_all_reduce_named_params (the LoRA factors all-reduced in one hook when `pre`'s gradient is
    ready, outside DDP's reducer)."""
    net = Pre()
    m = wrap(net, delay_all_reduce_named_params=[(n, p) for n, p in net.named_parameters() if "lora" in n],
             param_to_hook_all_reduce=net.pre)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        opt.zero_grad()
        (sum(F.mse_loss(m(_PX[step, r]), _PY[step, r]) for r in ranks) / len(ranks)).backward()
        if m is not net:
            torch.distributed.barrier()  # the hook's all-reduce is asynchronous: gloo's barrier waits for it
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def sc_delay_all_reduce(wrap, ranks):
    return _delay_train(wrap, ranks)


def sc_delay_all_reduce_unchecked(wrap, ranks):
    """The same with the forward check switched off in this process: DDP's delayed all-reduce keeps the ranks in
    step by itself (the control for the xfail below)."""
    with ddp_guard_off():
        return _delay_train(wrap, ranks)


LEGIT = {f.__name__[3:]: f for f in (
    sc_plain, sc_static_graph, sc_find_unused, sc_no_sync, sc_checkpoint_non_reentrant, sc_checkpoint_reentrant,
    sc_rewrap, sc_second_ddp, sc_bias_all, sc_bias_lora_only, sc_frozen_layer_serving_switch, sc_ignored,
    sc_eval_merged, sc_switch_back_and_forth, sc_external_frozen, sc_r0, sc_delay_all_reduce,
    sc_delay_all_reduce_unchecked)}
BUGS = ("r0", "delay_all_reduce")  # their own tests below


def legit_case(rank, world):
    return {name: _try(lambda: fn(_ddp, [rank])) for name, fn in LEGIT.items()}


@pytest.fixture(scope="module")
def legit():
    ranks = run_ranks(legit_case, timeout=300)
    ref = {name: fn(_plain, list(range(WORLD))) for name, fn in LEGIT.items()}
    return ranks, ref


def _check_in_step(legit, name, tol=1e-10):
    (r0, r1), ref = legit
    want = ref[name]
    for rank, got in enumerate((r0[name], r1[name])):
        assert not isinstance(got, str), f"rank {rank}: {got}"
        assert got.keys() == want.keys()
        for k in want:
            assert _rel(got[k], want[k]) < tol, (rank, k, _rel(got[k], want[k]))
    assert all(torch.equal(r0[name][k], r1[name][k]) for k in want), "the ranks trained apart"


@pytest.mark.parametrize("name", [n for n in LEGIT if n not in BUGS])
def test_legitimate_ddp_training_goes_on_in_step(legit, name):
    _check_in_step(legit, name, tol=1e-5 if name.startswith("delay") else 1e-10)


def test_r0_layer_in_a_ddp_model_trains(legit):
    _check_in_step(legit, "r0")


def test_delay_all_reduce_named_lora_factors_train(legit):
    _check_in_step(legit, "delay_all_reduce", tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# what would let the ranks train apart: refused, on every rank, before anything is computed

Small = DNet  # two Linear layers, 8 -> 10 -> 5


def small(freeze_factors=False):
    torch.manual_seed(0)
    net = Small().double()
    seed_adapters(net, "b", torch.Generator().manual_seed(1))
    lora.mark_only_lora_as_trainable(net, bias="lora_only")
    if freeze_factors:
        for m in lora_layers_of(net):
            m.lora_A.requires_grad_(False)
            m.lora_B.requires_grad_(False)
    return net


_X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
_Y = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _small_steps(ddp, rank, steps=2):
    opt = torch.optim.SGD([p for p in ddp.module.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        opt.zero_grad()
        x = _X[rank] * (1 + step)  # each rank its own data
        F.mse_loss(ddp(x), _Y[rank]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in lora.lora_state_dict(ddp.module, bias="all").items()}


def _refusal_then_grads(ddp, rank):
    """(what the forward said, the Parameters that got a gradient)."""
    said = _try(lambda: F.mse_loss(ddp(_X[rank]), _Y[rank]).backward())
    return said, sorted(n for n, p in ddp.module.named_parameters() if p.grad is not None)


def _grads_against_unwrapped(ddp, rank, build):
    """(what the forward said, the largest relative gap between a gradient DDP gave and the mean of both ranks'
    gradients of the unwrapped model `build()` makes, Parameters without a gradient in either)."""
    said = _try(lambda: F.mse_loss(ddp(_X[rank]), _Y[rank]).backward())
    got = {n: p.grad for n, p in ddp.module.named_parameters() if p.grad is not None}
    want = {}
    for r in range(2):
        net = build()
        F.mse_loss(net(_X[r]), _Y[r]).backward()
        for n, p in net.named_parameters():
            if p.grad is not None:
                want[n] = want.get(n, 0) + p.grad / 2
    gap = max((_rel(got[n], want[n]) for n in want if n in got), default=float("inf"))
    return said, gap, sorted(set(want) ^ set(got))


def drift_case(rank, world):
    out = {}
    # a trainable switch of one layer directly
    ddp = _ddp(small())
    ddp.module.a.set_adapter("b")
    out["layer_set_adapter"] = _refusal_then_grads(ddp, rank)
    # load_peft_adapter into the wrapped module, as a new active adapter and into the active name
    with tempfile.TemporaryDirectory() as d:
        lora.save_peft_adapter(small(), os.path.join(d, "p"), adapter_name="b")
        ddp = _ddp(small())
        lora.load_peft_adapter(ddp.module, os.path.join(d, "p"), adapter_name="p")
        out["peft_new"] = _refusal_then_grads(ddp, rank)
        # into the active name, of the same ranks: written into the live Parameters (as peft's load writes them),
        # which DDP holds, so training goes on with the loaded values and synchronised gradients

        def reloaded():
            net = small()
            lora.load_peft_adapter(net, os.path.join(d, "p"), adapter_name="default")
            return net

        ddp = _ddp(small())
        lora.load_peft_adapter(ddp.module, os.path.join(d, "p"), adapter_name="default")
        out["peft_default"] = _grads_against_unwrapped(ddp, rank, reloaded)

    # add_adapter over the active adapter, same ranks: in place too
    def added():
        net = small()
        net.b.add_adapter("default", *net.b.get_adapter("b"))
        return net

    ddp = _ddp(small())
    ddp.module.b.add_adapter("default", *ddp.module.b.get_adapter("b"))
    out["add_active"] = _grads_against_unwrapped(ddp, rank, added)
    # load_state_dict(assign=True): new Parameter objects
    ddp = _ddp(small())
    ddp.module.load_state_dict(small().state_dict(), assign=True)
    out["assign"] = _refusal_then_grads(ddp, rank)
    # delete and re-add: switch to a re-added adapter
    ddp = _ddp(small())
    lora.set_adapter(ddp.module, "b")
    lora.set_adapter(ddp.module, "default")
    lora.delete_adapter(ddp.module, "b")
    for m in lora_layers_of(ddp.module):
        (ra, ca), (rb, cb) = m.factor_shapes(m.r)
        g = torch.Generator().manual_seed(8)
        m.add_adapter("b", torch.randn(ra, ca, generator=g), torch.randn(rb, cb, generator=g), 0.5)
    lora.set_adapter(ddp.module, "b")
    out["re_added"] = _refusal_then_grads(ddp, rank)
    # an unregistered trainable layer called inside the wrapped forward: its gradients would never be synchronised
    ext = WithExternal(trainable=True)
    ddp = _ddp(ext)
    out["external_trainable"] = _try(lambda: _loss(ddp, 0, 0, [rank]).backward())
    # factors frozen when DDP was built (only the biases trained), made trainable afterwards: DDP's reducer holds the
    # Parameters that required grad at its construction, so their gradients are not synchronised
    for how in ("requires_grad_", "mark_only_lora_as_trainable"):
        ddp = _ddp(small(freeze_factors=True))
        if how == "requires_grad_":
            for m in lora_layers_of(ddp.module):
                m.lora_A.requires_grad_(True)
                m.lora_B.requires_grad_(True)
            out[f"unfrozen_{how}"] = _try(lambda: _small_steps(ddp, rank))
        else:  # refused by mark_only_lora_as_trainable itself, before any flag changes
            out[f"unfrozen_{how}"] = _try(lambda: (lora.mark_only_lora_as_trainable(ddp, bias="lora_only"),
                                                   _small_steps(ddp, rank))[1])
            out["frozen_after_refused_mark"] = [n for n, p in ddp.module.named_parameters() if p.requires_grad]
    # a merged validation forward (eval(), gradients enabled) after an inner trainable switch: no gradient can reach
    # the factors (the weight is frozen and holds them)
    ddp = _ddp(small())
    ddp.eval()
    lora.set_adapter(ddp.module, "b")
    out["eval_merged_switched"] = _try(lambda: ddp(_X[rank]))  # (gradients on: it would train through the merge)
    with torch.no_grad():
        out["eval_merged_switched_no_grad"] = _try(lambda: ddp(_X[rank]))
        out["eval_merged_switched_want"] = ddp.module(_X[rank])
    return out


@pytest.fixture(scope="module")
def drift():
    return run_ranks(drift_case, timeout=300)


@pytest.mark.parametrize("name, words", [
    ("layer_set_adapter", ["Linear(8, 10)", "'b'"]),
    ("peft_new", ["'p'"]),
    ("assign", ["'default'"]),
    ("re_added", ["'b'"]),
])
def test_new_trainable_parameters_after_the_wrap_are_refused_before_any_gradient(drift, name, words):
    for said, grads in (r[name] for r in drift):
        assert _refused(said, *words), said
        assert grads == [], grads


@pytest.mark.parametrize("name", ["peft_default", "add_active"])
def test_new_values_for_the_active_adapter_train_on_in_the_ddp_parameters(drift, name):
    for said, gap, unmatched in (r[name] for r in drift):
        assert said is None, said
        assert unmatched == [], unmatched
        assert gap < 1e-12, gap


def test_an_unregistered_trainable_layer_called_in_the_ddp_forward_is_refused(drift):
    for r in drift:
        assert _refused(r["external_trainable"], "Linear(3, 3)"), r["external_trainable"]


@pytest.mark.parametrize("how", ["requires_grad_", "mark_only_lora_as_trainable"])
def test_factors_unfrozen_after_the_wrap_are_refused_or_trained_in_step(drift, how):
    r0, r1 = (r[f"unfrozen_{how}"] for r in drift)
    if how == "mark_only_lora_as_trainable":  # refused by the call itself, before any flag changed
        for said in (r0, r1):
            assert said.startswith("RAISED ValueError: mark_only_lora_as_trainable") and "DistributedDataParallel" \
                in said, said
        assert all(r["frozen_after_refused_mark"] == ["a.bias", "b.bias"] for r in drift), \
            [r["frozen_after_refused_mark"] for r in drift]
        return
    if isinstance(r0, str) or isinstance(r1, str):
        assert _refused(r0) and _refused(r1), (r0, r1)
        return
    apart = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert apart == [], f"no error, and the ranks trained apart: {apart}"


def test_a_merged_forward_after_an_inner_switch_serves_without_gradients(drift):
    """A merged forward with gradients on trains the factors through the merge (test_train_through_merge): after an
    inner trainable switch DDP does not synchronise them, so it is refused as an unmerged one is; without gradients
    it serves the new adapter."""
    for r in drift:
        assert _refused(r["eval_merged_switched"], "Linear(8, 10)", "'b'"), r["eval_merged_switched"]
        got = r["eval_merged_switched_no_grad"]
        assert not isinstance(got, str), got
        assert _rel(got, r["eval_merged_switched_want"]) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# threads: DistributedDataParallel._active_ddp_module is one class attribute for the whole process

class Gate(nn.Module):
    """Holds the forward (inside DDP's forward, before any LoRA layer) until released."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.release.wait(60)
        return x


def _gated(switch=False):
    torch.manual_seed(0)
    net = nn.Sequential(Gate(), lora.Linear(8, 5, r=2, lora_alpha=4)).double()
    seed_adapters(net, "b", torch.Generator().manual_seed(1))
    lora.mark_only_lora_as_trainable(net)
    ddp = _ddp(net)
    if switch:
        net[1].set_adapter("b")  # trainable switch after the wrap: this DDP's forward must refuse
    return ddp, net[0]


def _in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.update(result=_try(fn)))
    t.start()
    return t, box


def thread_case(rank, world):
    out = {}
    x = _X[rank]
    torch.manual_seed(1)
    other = lora.Linear(8, 5, r=2, lora_alpha=4).double()  # never wrapped; trainable factors

    def plain():
        other(x).sum().backward()
        return "ok"

    out["plain_alone"] = _try(plain)
    # 1. a plain forward on the main thread while another thread is inside a DDP forward
    ddp, gate = _gated()
    t, box = _in_thread(lambda: tuple(ddp(x).shape))
    assert gate.entered.wait(60)
    out["plain_during_ddp"] = _try(plain)
    gate.release.set()
    t.join(60)
    out["ddp_thread"] = box.get("result")
    # 2. two DDP forwards on two threads, the first to enter returning first; the second DDP's layer was switched
    # (trainable) after its wrap, so its forward must refuse
    # (each DDP has run one forward before: the guard hooks a DDP the first time it sees it, and the first forwards
    # of two DDPs interleaved on two threads can pass unchecked, lora_ext/ddp_guard.py)
    ddp_a, gate_a = _gated()
    ddp_b, gate_b = _gated(switch=True)
    gate_a.release.set()
    gate_b.release.set()
    out["a_alone"] = _try(lambda: tuple(ddp_a(x).shape))
    out["b_alone"] = _try(lambda: tuple(ddp_b(x).shape))  # refused when run alone
    gate_a.release.clear()
    gate_b.release.clear()
    gate_a.entered.clear()
    gate_b.entered.clear()
    ta, box_a = _in_thread(lambda: tuple(ddp_a(x).shape))
    assert gate_a.entered.wait(60)
    tb, box_b = _in_thread(lambda: tuple(ddp_b(x).shape))
    assert gate_b.entered.wait(60)
    gate_a.release.set()
    ta.join(60)
    gate_b.release.set()
    tb.join(60)
    out["a"], out["b"] = box_a.get("result"), box_b.get("result")
    out["plain_after"] = _try(plain)
    DistributedDataParallel._active_ddp_module = None  # this process only: whatever was left there
    return out


@pytest.fixture(scope="module")
def threads():
    return run_ranks(thread_case, timeout=300)


def test_a_plain_forward_on_another_thread_during_a_ddp_forward_is_not_refused(threads):
    for r in threads:
        assert r["plain_alone"] == "ok"
        assert r["ddp_thread"] == (3, 5), r["ddp_thread"]
        assert r["plain_during_ddp"] == "ok", r["plain_during_ddp"]


def test_interleaved_ddp_forwards_on_two_threads_are_each_checked(threads):
    for r in threads:
        assert _refused(r["b_alone"], "'b'"), r["b_alone"]
        assert r["a"] == (3, 5), r["a"]
        assert _refused(r["b"], "'b'"), r["b"]
        assert r["a_alone"] == (3, 5), r["a_alone"]
        assert r["plain_after"] == "ok", r["plain_after"]


# ---------------------------------------------------------------------------------------------------------------
# outside DDP a forward never walks the stack (its host time is measured in bench/host_time.py, not here)

def test_a_forward_outside_ddp_never_walks_the_stack(monkeypatch):
    layer = lora.Linear(16, 16, r=4, lora_alpha=8)
    x = torch.randn(4, 16)
    walks, checks = [], []
    monkeypatch.setattr(ddp_guard, "_inside", lambda ddp: walks.append(ddp) or False)
    monkeypatch.setattr(ddp_guard, "check", lambda *a: checks.append(a))
    for _ in range(3):
        layer(x)
        layer.forward(x)
    assert ddp_guard.running() is None
    assert walks == [] and checks == []
