"""Forty-fourth session: what the hostile rounds of this session gave, each with a test that fails on the commit
before its fix."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora


def _merged_linear(dtype, seed=0):
    """A merged Linear with a nonzero adapter (lossless by default in half precision); its base weight, copied
    before the merge."""
    g = torch.Generator().manual_seed(seed)
    layer = lora.Linear(16, 12, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, generator=g))
        layer.lora_A.copy_(torch.randn(4, 16, generator=g))
        layer.lora_B.copy_(torch.randn(12, 4, generator=g))
    layer = layer.to(dtype)
    base = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged and not torch.equal(layer.weight, base)
    return layer, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_users_state_dict_post_hook_sees_the_base(dtype):
    """N1: the base went into a merged layer's state only after torch's state_dict had run the layer's post-hooks:
    a hook registered with register_state_dict_post_hook saw the merged weight (1.92 off the base in float32), while
    state_dict() returned the base. It now goes in ahead of them, inside a parent's state_dict too."""
    layer, base = _merged_linear(dtype)
    seen = []
    layer.register_state_dict_post_hook(lambda m, sd, prefix, meta: seen.append(sd[prefix + "weight"].clone()))
    model = nn.Sequential(layer)
    for state, prefix in ((layer.state_dict(), ""), (model.state_dict(), "0.")):
        got = seen.pop()
        assert torch.equal(got, state[prefix + "weight"]), "the hook saw another weight than state_dict() gives"
        if dtype == torch.float32:  # a lossy unmerge: within one rounding of the base
            assert (got.double() - base.double()).abs().max().item() < 1e-5
        else:
            assert torch.equal(got, base), "lossless: the base bit for bit"
    assert layer.merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_hook_that_casts_its_copy_leaves_the_lossless_record(dtype):
    """N1: a post-hook converting the saved copy (sd[k] = sd[k].float()) made the layer unmerge from that float32
    copy: it dropped its lossless record for good, with a warning blaming a conversion through .data, and train()
    then left the weight 0.0078 off its base (bfloat16), where the README promises it bit for bit."""
    layer, base = _merged_linear(dtype, seed=1)
    handle = layer.register_state_dict_post_hook(
        lambda m, sd, prefix, meta: sd.__setitem__(prefix + "weight", sd[prefix + "weight"].float()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = layer.state_dict()
    handle.remove()
    assert state["weight"].dtype == torch.float32 and torch.equal(state["weight"], base.float())
    assert torch.equal(layer.state_dict()["weight"], base)
    layer.train()
    assert not layer.merged and torch.equal(layer.weight, base), "the merge taken out losslessly"


def test_a_hook_that_renames_the_weight_key():
    """N1: a post-hook moving `weight` to a peft-style key (`base_layer.weight`) was refused with a KeyError saying
    the weight had been parametrized after the merge."""
    layer, base = _merged_linear(torch.bfloat16, seed=2)

    def rename(module, sd, prefix, meta):
        sd[prefix + "base_layer.weight"] = sd.pop(prefix + "weight")

    layer.register_state_dict_post_hook(rename)
    state = layer.state_dict()
    assert "weight" not in state and torch.equal(state["base_layer.weight"], base)


def test_the_base_goes_in_first_when_the_hooks_were_rearranged():
    """A layer whose post-hooks no longer start with lora_ext's (its hooks cleared, as a layer pickled before the hook
    existed has none) gets it back in front of the user's at the next state_dict()."""
    layer, base = _merged_linear(torch.bfloat16, seed=3)
    layer._state_dict_hooks.clear()
    seen = []
    handle = layer.register_state_dict_post_hook(lambda m, sd, prefix, meta: seen.append(sd["weight"].clone()))
    state = layer.state_dict()
    assert torch.equal(seen[-1], base) and torch.equal(state["weight"], base)
    assert state._metadata[""][lora.layers.ADAPTER_METADATA] == "default"
    handle.remove()  # (the user's handle still removes its hook)
    layer.state_dict()
    assert len(seen) == 1
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.state_dict()["weight"], base)


def test_a_shared_store_names_the_copy_that_switched():
    """N1: after `c = copy.copy(layer); c.set_adapter("b")` (the README: switch in one of the two only), a switch of
    the original to "b" said "it holds ['default', 'default']"; it now says the store is shared with a copy that
    switched."""
    layer = lora.Linear(8, 6, r=2)
    layer.add_adapter("b", torch.randn(2, 8), torch.randn(6, 2), 1.0)
    c = copy.copy(layer)
    c.set_adapter("b")
    with pytest.raises(KeyError, match=r"shares its store of adapters with a copy of it \(copy.copy\)"):
        layer.set_adapter("b")
    plain = lora.Linear(8, 6, r=2)
    plain.add_adapter("b", torch.randn(2, 8), torch.randn(6, 2), 1.0)
    with pytest.raises(KeyError, match=r"'c' is not in this layer \(it holds \['default', 'b'\]\)"):
        plain.set_adapter("c")


# -------------------------------------------------------------------------------------------------------------
# A1: the model lock where reads are not plain threads


def _served_model(seed=0):
    """Two unmerged Linear layers holding "default" and "b"; x; the float64 outputs of each adapter (from the
    factors given, W + s * B @ A)."""
    g = torch.Generator().manual_seed(seed)
    model, weights = nn.Sequential(), {"default": [], "b": []}
    for i in range(2):
        layer = lora.Linear(8, 8, r=2, lora_alpha=2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(8, 8, generator=g))
            layer.lora_A.copy_(torch.randn(2, 8, generator=g))
            layer.lora_B.copy_(torch.randn(8, 2, generator=g))
        a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
        layer.add_adapter("b", a, b, 1.5)
        w = layer.weight.double()
        weights["default"].append(w + layer.lora_B.double() @ layer.lora_A.double())
        weights["b"].append(w + 1.5 * b.double() @ a.double())
        model.append(layer)
    x = torch.randn(3, 8, generator=g)
    refs = {}
    for name, ws in weights.items():
        h = x.double()
        for w in ws:
            h = h @ w.T
        refs[name] = h
    return model, x, refs


def _serves(out, refs):
    errs = {name: (out.double() - ref).abs().max().item() for name, ref in refs.items()}
    name = min(errs, key=errs.get)
    assert errs[name] < 1e-4, errs
    return name


def _switch_on_thread(model, name):
    import threading
    t = threading.Thread(target=lora.set_adapter, args=(model, name), daemon=True)
    t.start()
    return t


def _holds_left(model):
    from lora_ext.serving.adapters import model_lock
    lock = model_lock(model)
    return dict(lock._reads), dict(lock._holds), dict(lock._readings)


def _raises_traced(code, local, landed, op):
    """op() raises `landed`, with `local` tracing the frames of `code` (where it raises it)."""
    import sys
    sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
    try:
        with pytest.raises(landed):
            op()
    finally:
        sys.settrace(None)


def test_two_holds_of_one_thread_ending_out_of_order():
    """A1: hold() ended by putting the thread's counts back as they were at its start. Two streaming generators on
    one thread, each inside a hold, the first closed first: its end took the second's read too, a switch on another
    thread ran inside the second's open hold (its next forward served "b"), and the second's end then put a read
    back for good, so every later switch waited. Each hold now takes off only what it counted."""
    model, x, refs = _served_model()

    def stream():
        with lora.hold(model):
            while True:
                yield _serves(model(x), refs)

    g1, g2 = stream(), stream()
    assert next(g1) == next(g2) == "default"
    g1.close()
    switch = _switch_on_thread(model, "b")
    switch.join(1.0)
    assert switch.is_alive(), "the switch ran inside the second stream's open hold"
    assert next(g2) == "default"
    g2.close()
    switch.join(30)
    assert not switch.is_alive() and _holds_left(model) == ({}, {}, {})
    assert _serves(model(x), refs) == "b"
    back = _switch_on_thread(model, "default")
    back.join(30)
    assert not back.is_alive(), "a read was left behind: the switch waits for good"


def test_asyncio_tasks_holding_one_model():
    """A1: the same with asyncio tasks on one event loop (the README's threads and asyncio tasks serving different
    batches): the first task's hold ended, and the second's forwards inside its own hold served "default", then
    "b"."""
    import asyncio
    model, x, refs = _served_model(seed=1)
    served, switch = {1: [], 2: []}, []

    async def task(n, first_steps, later_steps):
        with lora.hold(model):
            for _ in range(first_steps):
                served[n].append(_serves(model(x), refs))
                await asyncio.sleep(0)
            if n == 2:  # task 1's hold has ended: a switch queued from another thread must wait for this one
                switch.append(_switch_on_thread(model, "b"))
                await asyncio.sleep(0.5)
            for _ in range(later_steps):
                served[n].append(_serves(model(x), refs))
                await asyncio.sleep(0)

    async def main():
        await asyncio.gather(task(1, 2, 0), task(2, 3, 3))

    asyncio.run(main())
    assert served[1] == ["default"] * 2 and served[2] == ["default"] * 6
    switch[0].join(30)
    assert not switch[0].is_alive() and _holds_left(model) == ({}, {}, {})
    assert _serves(model(x), refs) == "b"


@pytest.mark.parametrize("where", ["changing", "_write"])
def test_an_exception_as_the_lock_is_taken_gives_it_back(where):
    """A1: an exception landing just after changing() (or _write()) made this thread the changer (writer), once the
    mutex was let go and before the try whose finally gives it back (a signal handler's, a Ctrl-C), left the lock
    held for good: every later switch on another thread waited (and every forward, for _write), even after the
    exception was dropped."""
    import gc
    import threading

    from lora_ext.serving.adapters import ModelLock, model_lock
    model, x, refs = _served_model(seed=2)
    lock = model_lock(model)
    code = getattr(ModelLock, where).__wrapped__.__code__
    taken = "self._changer, self._change_depth, depth = me, 1, 1" if where == "changing" else \
        "self._writer, self._write_depth, depth = me, 1, 1"
    import inspect
    lines, start = inspect.getsourcelines(getattr(ModelLock, where).__wrapped__)
    line = start + next(i for i, text in enumerate(lines) if taken in text)
    state = {"armed": False, "landed": False}

    class Landed(Exception):
        pass

    def local(frame, event, arg):
        # (at the first instruction after the mutex was let go, where a signal handler's exception lands: the
        # with statement's exit, after RLock.__exit__ returned; line events never stop there)
        frame.f_trace_opcodes = True
        if event == "line" and frame.f_lineno == line:
            state["armed"] = True
        elif event in ("opcode", "line") and state["armed"] and not state["landed"] and not lock._mutex._is_owned():
            # (Python 3.12 sends no opcode events here: the first line after it, the yield)
            state["landed"] = True
            raise Landed()
        return local

    _raises_traced(code, local, Landed, lambda: lora.set_adapter(model, "b"))
    gc.collect()
    assert state["landed"]
    assert lock._changer is None and lock._writer is None
    forward = threading.Thread(target=model, args=(x,), daemon=True)
    forward.start()
    forward.join(30)
    switch = _switch_on_thread(model, "b")
    switch.join(30)
    assert not forward.is_alive() and not switch.is_alive()
    assert _serves(model(x), refs) == "b"


def test_a_call_whose_hooks_were_cut_short_gives_back_no_hold():
    """A1's sweep, after the holds' fix: a forward whose forward hook an exception cut short left its entry in the
    hook reads, and a switch dropped its read as left behind; a later forward inside a hold whose own pre-hook never
    ran (a user's pre-hook ahead of lora_ext's raised) matched that entry by its frame's address, reused, and gave
    back the hold's read: a switch ran inside the open hold. Entries are frames now, and a dropped read takes its
    thread's entries with it."""

    from lora_ext.serving import adapters
    model, x, refs = _served_model(seed=3)
    adapters.model_lock(model)
    code = adapters._read_after.__code__

    class Landed(Exception):
        pass

    for attempt in range(20):
        state = {"landed": False}

        def local(frame, event, arg):
            if event == "line" and not state["landed"]:
                state["landed"] = True
                raise Landed()
            return local

        _raises_traced(code, local, Landed, lambda: model(x))
        to_b = _switch_on_thread(model, "b" if attempt % 2 == 0 else "default")
        to_b.join(30)  # (it drops the read the cut call left, after a poll)
        assert not to_b.is_alive()

        def refuse(module, args):
            raise KeyError("a user's pre-hook refuses")

        handle = model.register_forward_pre_hook(refuse, prepend=True)
        with lora.hold(model):
            with pytest.raises(KeyError):
                model(x)
            handle.remove()
            before = _serves(model(x), refs)
            switch = _switch_on_thread(model, "default" if before == "b" else "b")
            switch.join(0.3)
            assert switch.is_alive(), f"attempt {attempt}: the switch ran inside the open hold"
            assert _serves(model(x), refs) == before
        switch.join(30)
        assert not switch.is_alive()


# -------------------------------------------------------------------------------------------------------------
# F2: FSDP2 configurations


def _merges_after_a_post_forward(rank, world):
    import warnings

    from torch.distributed.fsdp import FSDPModule, fully_shard
    from test_fsdp import build, data, layers
    ids, _ = data()
    net = build()
    base = {i: m.weight.detach().clone() for i, m in enumerate(layers(net))}
    for m in layers(net):
        fully_shard(m, reshard_after_forward=2)
    fully_shard(net, reshard_after_forward=2)
    with torch.no_grad():
        net(ids[0])
        layer = layers(net)[1]
        placements = str(layer.weight.placements)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer.eval()
        merged = layer.merged
        net(ids[0])
        layer.train()
        layer.merge()
        out = net(ids[0])
        layer.train()
    for module in net.modules():  # (full_tensor() of the post-forward 2-D copy is not the weight)
        if isinstance(module, FSDPModule):
            module.reshard()
    back = max((m.weight.full_tensor() - base[i]).abs().max().item() for i, m in enumerate(layers(net)))
    return {"placements": placements, "merged": merged, "out": out, "back": back}


def test_a_layer_merges_in_fsdp2s_post_forward_state():
    """F2: with fully_shard(..., reshard_after_forward=2) on 4 ranks (a 1-D mesh), a forward leaves each parameter as
    FSDP2's post-forward 2-D DTensor; a layer's eval() then warned that HSDP's 2-D mesh is not supported and stayed
    unmerged, and merge() refused, where after a reshard() the same layer merged. Judged by the sharded parameter
    the merge writes through, it merges, serves what one process serves, and gives the base back."""
    from dist import run_ranks

    from test_fsdp import build, data, layers
    results = run_ranks(_merges_after_a_post_forward, world=4, timeout=240)
    ids, _ = data()
    net = build()
    layers(net)[1].merge()
    with torch.no_grad():
        want = net(ids[0])
    for r in results:
        assert "Replicate" in r["placements"], r["placements"]  # (the post-forward state was reached)
        assert r["merged"] and r["back"] < 1e-6  # (float32, lossy: the base back within a rounding)
        assert (r["out"] - want).abs().max().item() < 1e-5


def test_forwards_stopped_by_keyboard_interrupt_keep_nothing_alive():
    """R3 on the frames kept by the hook reads: torch runs the always-called forward hooks on an Exception only, so a
    forward a KeyboardInterrupt stopped left its entry, whose frame kept its callers' frames and tensors alive (50
    stopped forwards: 200 MB, until a switch on another thread), and its read. The next forward drops the entries of
    calls no longer on the stack, with their reads."""
    import gc
    import threading
    import weakref

    from lora_ext.serving.adapters import model_lock
    model, x, refs = _served_model(seed=4)
    lock, me, alive = model_lock(model), threading.get_ident(), []
    stop = [True]

    def interrupt(module, args):
        if stop[0]:
            raise KeyboardInterrupt

    model[1].register_forward_pre_hook(interrupt)

    def caller():
        cache = torch.zeros(1000)  # a caller's local (generate()'s cache), reachable from the call's frame
        alive.append(weakref.ref(cache))
        with pytest.raises(KeyboardInterrupt):
            model(x)

    for _ in range(20):
        caller()
    gc.collect()
    assert sum(r() is not None for r in alive) <= 1 and len(lock._hook_reads.get(me, [])) <= 1
    assert lock._reads.get(me, 0) <= 1
    stop[0] = False
    with lora.hold(model):
        assert _serves(model(x), refs) == "default"
        assert lock._reads.get(me) == 1 and not lock._hook_reads.get(me)  # (the hold's read alone)
        switch = _switch_on_thread(model, "b")
        switch.join(0.3)
        assert switch.is_alive()
    switch.join(30)
    gc.collect()
    assert not switch.is_alive() and sum(r() is not None for r in alive) == 0
    assert _holds_left(model) == ({}, {}, {})


def test_exporting_is_true_under_torch_export_only():
    """rehearse_torch211.sh: torch 2.11's dynamo folds torch.compiler.is_exporting() to True in every trace, a
    torch.compile's too, so a compiled merged layer traced the forward an exported program serves (from the weight
    alone) and training through the merge gave its factors no gradient (lora_A.grad None; 2.14 fixed it in dynamo).
    lora_ext reads the flag torch.export sets."""
    from lora_ext import ops
    seen = []

    def f(x):
        seen.append(ops.exporting())
        return x + 1

    class M(nn.Module):
        def forward(self, x):
            seen.append(ops.exporting())
            return x + 1

    x = torch.ones(2)
    torch.compile(f, backend="eager", fullgraph=True)(x)
    assert seen == [False]
    torch.export.export(M(), (x,))
    assert seen[-1] is True and not ops.exporting()
    layer = lora.Linear(6, 4, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    torch.compile(layer, backend="eager")(torch.randn(3, 6)).square().sum().backward()
    assert layer.merged and layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
