"""Forty-fifth session: what this session's hostile rounds and its own reading gave, each with a test that fails on
the commit before its fix."""
import contextlib
import threading
import time

import pytest
import torch

import lora_ext as lora
from lora_ext.serving.adapters import lora_layers, model_lock


def _two_adapter_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(lora.Linear(8, 8, r=2), lora.Linear(8, 8, r=2))
    for layer in model:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
        layer.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    model.requires_grad_(False).eval()
    return model, torch.randn(3, 8)


def test_a_read_left_behind_is_dropped_while_readers_poll():
    """hostile27's load flake, pinned: a read left behind (an exception landed in release_read) is dropped only by a
    look for reads left behind, which only the waiting writer made, while every waiter's poll took the next look's
    turn. Readers queued behind the writer poll every 0.05 s, the writer every 0.1 s: once a reader took a turn, the
    readers took every later one, and the change waited for good (20 s, at the dump: one read left, the writer
    queued, two readers waiting). Any waiter's look now drops reads left behind while a writer waits."""
    model, x = _two_adapter_model()
    with torch.no_grad():
        model(x)
    lock = model_lock(model)
    idle = threading.Event()
    left = threading.Thread(target=lambda: idle.wait(30), daemon=True)  # a thread outside any forward
    left.start()
    stop = []

    def forward_loop():
        while not stop:
            with torch.no_grad():
                model(x)
    done = []
    try:
        with lock._mutex:
            lock._reads[left.ident] = 1  # what a landing in its release_read left
            lock._look_at = time.monotonic() + 0.02  # the next look's turn goes to a reader's poll
        forwards = [threading.Thread(target=forward_loop, daemon=True) for _ in range(4)]
        for t in forwards:
            t.start()
        switch = threading.Thread(target=lambda: done.append(lora.set_adapter(model, "b")), daemon=True)
        switch.start()
        switch.join(10)
        assert done, "the switch waits for ever behind a read left behind"
    finally:
        stop.append(True)
        idle.set()
    assert model[0].active_adapter == "b"


@pytest.mark.parametrize("how", ["from_pretrained", "nn_weight_kwarg", "lora_weight_kwarg", "new_parameter"])
def test_a_new_parameter_over_a_merged_weight_takes_the_adapter_out(how):
    """G3: a tie made after a merge through another Parameter over the merged weight's bytes
    (nn.Embedding.from_pretrained(layer.weight), `_weight=`, nn.Parameter(layer.weight)) left the layer merged: the
    new module served the merged table as its own (up to 11.8 off the base), with no warning, until the layer's next
    train(). As with the same Parameter, the merged layer now takes its adapter out first, with a warning."""
    g = torch.Generator().manual_seed(1)
    emb = lora.Embedding(10, 4, r=2, lora_alpha=4)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(10, 4, generator=g))
        emb.lora_A.copy_(torch.randn(2, 10, generator=g))
        emb.lora_B.copy_(torch.randn(4, 2, generator=g))
    base = emb.weight.detach().double().clone()
    emb.eval()
    assert emb.merged
    ids = torch.tensor([0, 3, 7, 9])
    with pytest.warns(UserWarning, match="taken out of it"):
        if how == "from_pretrained":
            other = torch.nn.Embedding.from_pretrained(emb.weight)
        elif how == "nn_weight_kwarg":
            other = torch.nn.Embedding(10, 4, _weight=emb.weight)
        elif how == "lora_weight_kwarg":
            other = lora.Embedding(10, 4, r=2, _weight=emb.weight)  # (B zero: serves its base)
        else:
            other = torch.nn.Embedding(10, 4)
            other.weight = torch.nn.Parameter(emb.weight)
    assert not emb.merged
    with torch.no_grad():
        got = other(ids).double()
        served = emb(ids).double()
    assert (got - base[ids]).abs().max() < 1e-5, "the new module computes with the merged weight"  # (float32 unmerge)
    ref = base[ids] + 2.0 * (emb.lora_A.detach().double().T[ids] @ emb.lora_B.detach().double().T)
    assert (served - ref).abs().max() < 1e-5, "the layer no longer serves its adapter"


def test_a_build_on_meta_then_to_empty_and_reset_parameters_keeps_the_buffers():
    """G3: built on meta, then to_empty() and reset_parameters() (torch's recipe for deferred init), an Embedding's
    embed_scale buffer held garbage (the output 3.9e24 off) and a MergedLinear's lora_ind random bytes (zero_pad
    refused with a confusing count): non-persistent buffers, which no state dict load restores. reset_parameters()
    now puts them back; zero_pad no longer reads the buffer; an embed_scale made on meta, whose value is lost, is
    refused at construction."""
    g = torch.Generator().manual_seed(2)
    with torch.device("meta"):
        emb = lora.Embedding(10, 4, r=2, lora_alpha=4, embed_scale=torch.tensor(8.0, device="cpu"))
        merged = lora.MergedLinear(4, 6, r=2, enable_lora=[False, True, False])
    for layer in (emb, merged):
        layer.to_empty(device="cpu")
        for buffer in layer.buffers():
            buffer.fill_(77) if buffer.is_floating_point() else buffer.fill_(True)  # poisoned, as to_empty may leave
    assert merged.zero_pad(torch.tensor([[1.0], [2.0]])).flatten().tolist() == [0.0, 0.0, 1.0, 2.0, 0.0, 0.0]
    for layer in (emb, merged):
        layer.reset_parameters()
    assert emb.embed_scale.item() == 8.0
    assert merged.lora_ind.tolist() == [False, False, True, True, False, False]
    with torch.no_grad():
        emb.weight.copy_(torch.randn(10, 4, generator=g))
        emb.lora_B.copy_(torch.randn(4, 2, generator=g))
        emb.lora_A.copy_(torch.randn(2, 10, generator=g))
    ids = torch.tensor([1, 5, 9])
    W = emb.weight.detach().double() + 2.0 * (emb.lora_B.detach().double() @ emb.lora_A.detach().double()).T
    with torch.no_grad():
        assert (emb(ids).double() - 8.0 * W[ids]).abs().max() < 1e-4
    with torch.device("meta"), pytest.raises(ValueError, match="embed_scale is a meta tensor"):
        lora.Embedding(10, 4, r=2, embed_scale=torch.tensor(8.0))


def test_a_switch_to_an_adapter_a_meta_skeleton_never_got_names_it():
    """G1: a whole model loaded onto meta (torch.load(map_location='meta')) and filled with load_state_dict(
    assign=True) serves its active adapter; a switch to another adapter, whose factors no state dict holds, raised
    torch's "Cannot copy out of meta tensor; no data!", naming neither the adapter nor the layer."""
    import io
    model, x = _two_adapter_model()
    lora.set_adapter(model, "default")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    skeleton = torch.load(buffer, weights_only=False, map_location="meta")
    skeleton.load_state_dict(model.state_dict(), assign=True)
    with torch.no_grad():
        want = model(x)
        assert (skeleton(x) - want).abs().max() < 1e-5  # (the state dict holds the base: float32 rounding)
    with pytest.raises(ValueError, match=r"adapter 'b'.*lora_A and lora_B are on the meta device"):
        lora.set_adapter(skeleton, "b")
    with torch.no_grad():
        assert (skeleton(x) - want).abs().max() < 1e-5 and skeleton[0].active_adapter == "default"


def test_jit_trace_of_a_trainable_layer_with_its_default_check():
    """G1: torch.jit.trace(layer, x) of a layer in training mode (check_trace on, its default) raised "Graphs differed
    across invocations": the first forward with gradients copied the bias (a note for save_peft_adapter), recorded in
    the first trace only. loralib's layer traces. Now the copy is never recorded; the trace serves the layer."""
    torch.manual_seed(3)
    layer = lora.Linear(6, 5, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    traced = torch.jit.trace(layer, x)
    with torch.no_grad():
        assert (traced(x) - layer(x)).abs().max() < 1e-6
    ref = x.double() @ (layer.weight.double() + 0.5 * layer.lora_B.double() @ layer.lora_A.double()).T
    assert (traced(x).double() - ref - layer.bias.double()).abs().max() < 1e-5


def test_holds_beside_a_hold_a_queued_switch_waits_for_pass_it_at_once():
    """G2: a streaming request's hold open, a switch queued behind it (a hot-swap), each new hold on another thread (a
    short mixed batch) waited HOLD_QUEUE_SECONDS behind the switch: 99 batches in 5.4 s where 1,422 ran without the
    switch. A hold taken before the switch queued is waited for anyway: new holds now pass beside it at once. Holds
    taken after the switch queued do not let others pass: once the older hold ends, the switch goes in."""
    model, x = _two_adapter_model()
    lock = model_lock(model)
    opened, release, stop = threading.Event(), threading.Event(), []
    done, count = [], [0]

    def stream():
        with lora.hold(model):
            opened.set()
            release.wait(30)

    def batches():
        while not stop:
            with lora.hold(model), torch.no_grad():
                model(x)
            count[0] += 1
    a = threading.Thread(target=stream, daemon=True)
    a.start()
    assert opened.wait(10)
    switch = threading.Thread(target=lambda: done.append(lora.set_adapter(model, "b")), daemon=True)
    switch.start()
    deadline = time.monotonic() + 10
    while not lock._queue and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock._queue, "the switch never queued"
    b = threading.Thread(target=batches, daemon=True)
    try:
        b.start()
        time.sleep(2.0)
        assert not done, "the switch ran inside the open hold"
        assert count[0] >= 20, f"{count[0]} holds in 2 s beside the open hold: each waited behind the switch"
        release.set()
        a.join(10)
        switch.join(10)
        assert done, "the switch waits for ever behind holds taken after it queued"
    finally:
        stop.append(True)
        release.set()
        b.join(10)
    assert model[0].active_adapter == "b"


# -------------------------------------------------------------------------------------------------------------
# F2 (last session, left open): a refusal that one rank alone makes


def _one_rank_refuses(rank, world, how, merged):
    import time

    from torch.distributed.fsdp import fully_shard
    from test_fsdp import build, layers
    net = build()
    g = torch.Generator().manual_seed(77)
    for i, m in enumerate(layers(net)):
        (ra, ca), (rb, cb) = m.factor_shapes(m.r)
        a, b = torch.randn(ra, ca, generator=g) * 0.2, torch.randn(rb, cb, generator=g) * 0.2
        if how.startswith("missing") and rank == 1:
            continue  # adapter "c" on rank 0 only
        m.add_adapter("c", a, b, 0.9)
        if how == "nan" and rank == 1 and i == 2:
            with torch.no_grad():  # a NaN in rank 1's copy only, written after the add
                m.get_adapter("c")[1][0, 0] = float("nan")
    for m in layers(net):
        fully_shard(m)
    fully_shard(net)
    if merged:
        net.eval()
    before = [(m.active_adapter, m.merged) for m in layers(net)]
    weights = [m.weight.full_tensor().clone() for m in layers(net)]
    start, err = time.monotonic(), None
    try:
        if how == "add_active_nan":
            m = layers(net)[2]
            (ra, ca), (rb, cb) = m.factor_shapes(m.r)
            m.add_adapter("default", torch.full((ra, ca), 0.1),
                          torch.full((rb, cb), float("nan") if rank == 1 else 0.1), 2.0)
        elif how == "missing_layer":  # (R6: one layer's own set_adapter raised on rank 1 before any agreement; rank
            layers(net)[2].set_adapter("c")  # 0 waited until the process group's timeout, which then broke it)
        else:
            lora.set_adapter(net, "c")
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    secs = time.monotonic() - start
    after = [(m.active_adapter, m.merged) for m in layers(net)]
    same = all(torch.equal(m.weight.full_tensor(), w) for m, w in zip(layers(net), weights))
    lora.set_adapter(net, "b")  # both ranks go on in step
    return {"err": err, "secs": secs, "unchanged": after == before and same,
            "then": sorted({m.active_adapter for m in layers(net)})}


@pytest.mark.parametrize("how,merged", [("missing", True), ("missing", False), ("nan", True), ("nan", False),
                                        ("add_active_nan", True), ("missing_layer", True), ("missing_layer", False)])
def test_a_refusal_on_one_rank_is_a_refusal_on_every_rank(how, merged):
    """F2: a switch refused by a check that one rank alone failed (an adapter only rank 0 holds, a NaN in rank 1's copy
    of it, a NaN in the active adapter one rank replaces) raised on that rank while the other went on into the
    switch's first agreement and waited there (25 s, until the refusing rank left; for good while it lives, or a gloo
    abort when it ran on). The refusing rank now meets that agreement, marked refused: every rank refuses, nothing is
    written. (An agreement at the start of every switch, last session's fix, broke ranks calling merges and switches
    in another order; this one adds no collective where no rank refuses.)"""
    from dist import run_ranks
    results = run_ranks(_one_rank_refuses, how, merged, timeout=120)
    refusing = 1
    for rank, r in enumerate(results):
        assert r["err"] is not None, f"rank {rank} did not refuse"
        assert r["secs"] < 15, f"rank {rank} waited {r['secs']:.1f} s"
        assert r["unchanged"] and r["then"] == ["b"], r
    assert "refused on another rank" in results[1 - refusing]["err"], results[1 - refusing]["err"]
    want = "KeyError" if how.startswith("missing") else "ValueError"
    assert results[refusing]["err"].startswith(want), results[refusing]["err"]


def _one_rank_refuses_tp(rank, world, merged):
    import time

    import test_distributed_hostile2 as h2
    from helpers import lora_layers_of
    net = h2.build()
    if rank == 1:
        with torch.no_grad():  # a NaN in rank 1's copy of adapter "b" only
            lora_layers_of(net)[3].get_adapter("b")[1][0, 0] = float("nan")
    net = h2.shard("tp", net, world)
    if merged:
        net.eval()
    before = h2.outputs(net)
    start, err = time.monotonic(), None
    try:
        lora.set_adapter(net, "b")
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    secs = time.monotonic() - start
    after = h2.outputs(net)
    same = all(torch.equal(a, b) for a, b in zip(before, after))
    lora.set_adapter(net, "c")  # both ranks go on in step
    return {"err": err, "secs": secs, "unchanged": same,
            "then": sorted({m.active_adapter for m in lora_layers_of(net)})}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_refusal_on_one_rank_under_tensor_parallel(merged):
    """As above, with lora_ext.parallel's styles: rank 1's copy of the adapter holds a NaN; both ranks refuse at
    once, serving what they served."""
    from dist import run_ranks
    results = run_ranks(_one_rank_refuses_tp, merged, timeout=120)
    for rank, r in enumerate(results):
        assert r["err"] is not None and r["secs"] < 15, (rank, r)
        assert r["unchanged"] and r["then"] == ["c"], r
    assert "refused on another rank" in results[0]["err"], results[0]["err"]
    assert results[1]["err"].startswith("ValueError"), results[1]["err"]


class _Slow(torch.nn.Module):
    def forward(self, x):
        time.sleep(0.5)
        return x


@contextlib.contextmanager
def _another_thread_compiling(seconds=3.0):
    """A torch.compile of an unrelated function on another thread, whose backend takes `seconds` (a large model's
    compile): torch.compiler.is_compiling() is True on every thread meanwhile (one process-wide flag)."""
    if not hasattr(torch.compiler, "_compile_session_context"):  # (torch 2.11's compile sets no process-wide flag,
        # and compiling on one thread while another runs functional_call crashed it: nothing to show there)
        pytest.skip("this torch's compile sets no process-wide is_compiling flag")

    def slow_backend(gm, example_inputs):
        time.sleep(seconds)
        return gm.forward
    torch._dynamo.reset()
    thread = threading.Thread(target=lambda: torch.compile(lambda t: t * 2 + 1, backend=slow_backend)(torch.randn(4)),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not torch.compiler.is_compiling() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert torch.compiler.is_compiling(), "the other thread's compile never began"
    try:
        yield
    finally:
        thread.join(30)


def test_an_eager_forward_while_another_thread_compiles_keeps_the_lock():
    """R4: torch.compiler.is_compiling() is one process-wide flag, True on every thread while any thread compiles; the
    model lock's hooks took it for their own trace and took no read, so an eager forward on one thread while another
    compiled something else ran with a switch inside it: layer 0 on 'default', layer 1 on 'b' (9.08 off 'default'
    throughout). lora_ext now asks whether this thread traces (lora_ext.tracing)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(lora.Linear(8, 8, r=2), _Slow(), lora.Linear(8, 8, r=2))
    refs = {}
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
        layer.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    model.requires_grad_(False)
    x = torch.randn(3, 8)
    for name in ("default", "b"):  # (before eval(): the base weights)
        h = x.double()
        for layer in (model[0], model[2]):
            A, B, s = (layer.lora_A, layer.lora_B, layer.scaling) if name == "default" else layer.get_adapter(name)
            W = layer.weight.double() + s * B.double() @ A.double()
            h = h @ W.T + layer.bias.double()
        refs[name] = h
    model.eval()
    out = []
    with _another_thread_compiling():
        forward = threading.Thread(target=lambda: out.append(model(x).double()), daemon=True)
        forward.start()
        time.sleep(0.1)
        switch = threading.Thread(target=lambda: lora.set_adapter(model, "b"), daemon=True)
        switch.start()
        forward.join(10)
        switch.join(10)
    assert (out[0] - refs["default"]).abs().max() < 1e-4, "a switch ran inside the forward"  # (outputs up to 211)
    with torch.no_grad():
        assert (model(x).double() - refs["b"]).abs().max() < 1e-4


def test_functional_call_of_a_merged_model_while_another_thread_compiles():
    """R4: a merged layer's functional_call took the compiled branch (the adapter dropped: 0.443 off) while another
    thread compiled."""
    model, x = _two_adapter_model()
    with torch.no_grad():
        want = model(x)
        state = dict(model.state_dict())
        with _another_thread_compiling(2.0):
            got = torch.func.functional_call(model, state, (x,))
    assert (got - want).abs().max() < 1e-5


def _merges_one_rank_refuses(rank, world):
    import time

    from torch.distributed.fsdp import fully_shard
    from test_fsdp import build, layers
    out = {}

    def fresh(refusing):
        net = build()
        for m in layers(net):
            fully_shard(m)
        fully_shard(net)
        if refusing and rank == 1:
            layers(net)[0].max_norm = 1e9  # (an Embedding that renormalises: its merge is refused, on rank 1 only)
        return net

    def attempt(label, fn):
        start = time.monotonic()
        try:
            fn()
            out[label] = ("ok", time.monotonic() - start)
        except Exception as e:
            out[label] = (f"{type(e).__name__}: {e}", time.monotonic() - start)
    net = fresh(True)
    attempt("layer_merge", lambda: layers(net)[0].merge())
    attempt("merge_adapter", lambda: lora.merge_adapter(net))
    out["after_refusals"] = [m.merged for m in layers(net)]
    attempt("eval", lambda: net.eval())
    out["after_eval"] = [m.merged for m in layers(net)]
    attempt("switch", lambda: lora.set_adapter(net, "b"))
    out["after_switch"] = sorted({m.active_adapter for m in layers(net)})
    net = fresh(False)  # merge_adapter on one rank, set_adapter on the other
    attempt("order", (lambda: lora.merge_adapter(net)) if rank == 0 else (lambda: lora.set_adapter(net, "b")))
    attempt("then", lambda: lora.set_adapter(net, "b"))
    out["then_flags"] = [(m.active_adapter, m.merged) for m in layers(net)]
    return out


def test_a_merge_one_rank_refuses_is_refused_on_every_rank():
    """R5: under FSDP2 a merge one rank alone refuses (its Embedding has max_norm) raised there before the merge's first
    agreement, and the other rank waited in it: layer.merge() until a later write met it (the ranks one collective
    apart: the next switch timed out), merge_adapter until the timeout (its value checks gathered before any
    agreement, so merge_adapter beside another rank's set_adapter hung too). Both now meet the agreement: the other
    ranks refuse at once; eval(), which warns and goes on, skips that layer on every rank."""
    from dist import run_ranks
    results = run_ranks(_merges_one_rank_refuses, timeout=120)
    for rank, r in enumerate(results):
        for label in ("layer_merge", "merge_adapter", "eval", "switch", "order", "then"):
            assert r[label][1] < 15, (rank, label, r[label])
        assert r["after_refusals"] == [False] * len(r["after_refusals"]), (rank, r)
        assert r["after_eval"][0] is False and all(r["after_eval"][1:]), (rank, r["after_eval"])
        assert r["switch"][0] == "ok" and r["after_switch"] == ["b"], (rank, r)
        assert r["order"][0].startswith("RuntimeError") and "disagree" in r["order"][0], (rank, r["order"])
        assert r["then"][0] == "ok" and all(a == "b" for a, _ in r["then_flags"]), (rank, r)
    assert "max_norm" in results[1]["layer_merge"][0] and "max_norm" in results[1]["merge_adapter"][0]
    for label in ("layer_merge", "merge_adapter"):
        assert "refused on another rank" in results[0][label][0], results[0][label]


# ---- forty-sixth session ----

def test_two_saves_into_one_directory_at_once_leave_one_whole_pair(tmp_path, monkeypatch):
    # G4: two saves into one directory interleaved their renames: the first save's weights were renamed, then the
    # whole second save ran, then the first's config: its config (lora_alpha 8) beside the second's weights (64),
    # both saves without an error (peft loads such a pair: 0.53 off either adapter's logits)
    import json
    import os

    import torch.nn as nn
    from safetensors import safe_open

    from lora_ext.serving import files

    def model(alpha, seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(8, 8))
        lora.inject(m, ["0"], r=2, lora_alpha=alpha)
        with torch.no_grad():
            m[0].lora_B.normal_()
        return m

    x_model, y_model = model(8.0, 1), model(64.0, 2)
    out = str(tmp_path / "adapter")
    between, y_done = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if threading.current_thread().name == "x" and str(dst).endswith(".safetensors"):
            between.set()  # x renamed its weights, not its config yet: y saves now
            y_done.wait(2.0)  # (with the lock y cannot finish before x: waited out)

    monkeypatch.setattr(files.os, "replace", replace)
    errors = []

    def save(m, after=None):
        try:
            if after is not None:
                assert after.wait(10)
            lora.save_peft_adapter(m, out)
        except BaseException as e:
            errors.append(e)
        finally:
            y_done.set() if after is not None else None

    x = threading.Thread(target=save, args=(x_model,), name="x")
    y = threading.Thread(target=save, args=(y_model, between), name="y")
    x.start()
    y.start()
    x.join(30)
    y.join(30)
    assert not errors and not x.is_alive() and not y.is_alive()
    config_alpha = json.load(open(os.path.join(out, "adapter_config.json")))["lora_alpha"]
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        saved_alpha = json.loads(f.metadata()["lora_ext_config"])["lora_alpha"]
        b = f.get_tensor(next(k for k in f.keys() if "lora_B" in k))
    assert config_alpha == saved_alpha == 64.0  # y's pair, whole (y renamed last)
    assert torch.equal(b, y_model[0].lora_B.detach())
    fresh = nn.Sequential(nn.Linear(8, 8))
    lora.load_peft_adapter(fresh, out)  # (a torn pair is refused here, naming lora_alpha)
    assert fresh[0].scaling == y_model[0].scaling


_SIGNAL_SAVE = r"""
import faulthandler, os, signal, sys
from lora_ext.serving import files
d = sys.argv[1]
paths = [os.path.join(d, "adapter_model.safetensors"), os.path.join(d, "adapter_config.json")]
def save(tag):
    with files.atomic_files(paths) as tmps:
        for t in tmps:
            with open(t, "w") as f:
                f.write(tag)
def on_term(sig, frame):
    save("handler")
signal.signal(signal.SIGTERM, on_term)
real_replace, sent = os.replace, []
def replace(a, b):
    if not sent:  # a preemption's SIGTERM lands during the renames (held back until they are done)
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return real_replace(a, b)
os.replace = replace
faulthandler.dump_traceback_later(20, exit=True)
save("first")
print("saved", [open(p).read() for p in paths])
"""


def test_a_signal_handler_saving_into_the_directory_during_the_renames_does_not_wait_on_its_own_lock(tmp_path):
    # R6: the signals held over the renames were delivered while the directory's flock was still held: a SIGTERM
    # handler saving a checkpoint into the same directory waited for good on its own process's lock
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _SIGNAL_SAVE, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "saved ['handler', 'handler']" in r.stdout, r.stdout  # (the handler ran after the first save, whole)


def test_a_child_forked_during_a_save_does_not_keep_the_directory_locked(tmp_path, monkeypatch):
    # R6: a flock belongs to the open file, which a child forked while another thread renamed (a DataLoader worker)
    # shared: the parent's next save into that directory waited until the child exited
    import os
    import signal

    import torch.nn as nn

    from lora_ext.serving import files
    model = nn.Sequential(nn.Linear(8, 8))
    lora.inject(model, ["0"], r=2)
    out = str(tmp_path / "adapter")
    lora.save_peft_adapter(model, out)
    between, forked = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if threading.current_thread().name == "saver" and str(dst).endswith(".safetensors"):
            between.set()
            forked.wait(10)

    monkeypatch.setattr(files.os, "replace", replace)
    saver = threading.Thread(target=lora.save_peft_adapter, args=(model, out), name="saver")
    saver.start()
    assert between.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: lives on, as a worker would
        time.sleep(30)
        os._exit(0)
    try:
        forked.set()
        saver.join(10)
        assert not saver.is_alive()
        again = threading.Thread(target=lora.save_peft_adapter, args=(model, out))
        start = time.monotonic()
        again.start()
        again.join(10)
        assert not again.is_alive() and time.monotonic() - start < 5, "the next save waits for the child"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("call", ["delete_adapter", "unmerge_adapter", "set_adapter"])
def test_a_model_holding_an_unloaded_layer_under_another_name_is_refused_before_any_layer_is_written(call):
    # R6: model-level calls reached the held unloaded layer after the live layers before it were written:
    # delete_adapter removed "c" from them, unmerge_adapter unmerged them (11.2 off), set_adapter rolled back inexactly
    import torch.nn as nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    other = nn.Sequential(nn.Linear(8, 8))
    for m in (model, other):
        lora.inject(m, ["0"] if m is other else ["0", "1"], r=2)
    for m in (model[0], model[1], other[0]):
        for name in ("b", "c"):
            m.add_adapter(name, *[torch.randn(s) for s in m.factor_shapes(2)], 1.0)
        with torch.no_grad():
            m.lora_B.normal_()
    held = other[0]
    other.eval()
    lora.unload(other, merge=True)
    model.eval()
    model.alias = held  # after the live layers
    before = {n: t.clone() for n, t in nn.Sequential(model[0], model[1]).state_dict().items()}
    weights = [m.weight.detach().clone() for m in (model[0], model[1])]
    state = [(m.active_adapter, m.merged, list(m.adapter_names)) for m in (model[0], model[1])]
    with pytest.raises(RuntimeError, match="'alias'.*taken out of its model by lora_ext.unload"):
        {"delete_adapter": lambda: lora.delete_adapter(model, "c"), "unmerge_adapter": lambda: lora.unmerge_adapter(
            model), "set_adapter": lambda: lora.set_adapter(model, "b")}[call]()
    assert [(m.active_adapter, m.merged, list(m.adapter_names)) for m in (model[0], model[1])] == state
    assert all(torch.equal(m.weight, w) for m, w in zip((model[0], model[1]), weights))
    del model.alias
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_a_child_forked_by_another_thread_during_a_signal_hold_gets_its_handlers_back():
    # R7: a child forked by another thread (a DataLoader worker) while the main thread held signals back kept the
    # hold's catcher as its SIGINT handler for good (Ctrl-C ignored, its SIGTERM handler never ran), every hold in it
    # doing nothing
    import os
    import signal

    from lora_ext.named_adapters import deferred_interrupt
    assert threading.current_thread() is threading.main_thread()
    assert deferred_interrupt._open is None, "a hold left open by an earlier test"
    before = signal.getsignal(signal.SIGINT)
    r, w = os.pipe()
    pids = []

    def fork():
        pid = os.fork()
        if pid == 0:
            handler = signal.getsignal(signal.SIGINT)
            ok = deferred_interrupt._open is None and handler is before
            os.write(w, (f"{'ok' if ok else 'no'} open={deferred_interrupt._open!r} handler={handler!r}"
                         f" before={before!r}").encode()[:900])
            os._exit(0)
        pids.append(pid)

    with deferred_interrupt():
        assert deferred_interrupt._open is not None
        t = threading.Thread(target=fork)
        t.start()
        t.join(10)
    os.waitpid(pids[0], 0)
    said = os.read(r, 1000).decode()
    os.close(r)
    os.close(w)
    assert said.startswith("ok "), said
    assert deferred_interrupt._open is None and signal.getsignal(signal.SIGINT) is before


def test_a_fork_between_the_directory_open_and_its_note_waits_for_the_note(tmp_path, monkeypatch):
    # R7: a fork by another thread between _renaming's os.open of the directory and its note in _HELD (a thread
    # switch) left the child a copy the parent then locked: the parent's next save waited until the child exited
    import os
    import signal

    from lora_ext.serving import files
    paths = [str(tmp_path / "adapter_model.safetensors"), str(tmp_path / "adapter_config.json")]

    def save(tag):
        with files.atomic_files(paths) as tmps:
            for t in tmps:
                with open(t, "w") as f:
                    f.write(tag)

    real_open, go, forked, child = os.open, threading.Event(), threading.Event(), []

    def opener(path, flags, *args):
        fd = real_open(path, flags, *args)
        if str(path) == str(tmp_path) and not child:  # the other thread runs right after the open returned
            go.set()
            forked.wait(1.0)  # (with the fix the fork waits for this open's note: waited out)
        return fd

    def worker():
        go.wait(10)
        pid = os.fork()
        if pid == 0:
            time.sleep(30)  # a worker that lives on
            os._exit(0)
        child.append(pid)
        forked.set()

    monkeypatch.setattr(files.os, "open", opener)
    t = threading.Thread(target=worker)
    t.start()
    try:
        save("first")
        t.join(10)
        monkeypatch.setattr(files.os, "open", real_open)
        done = []
        again = threading.Thread(target=lambda: (save("second"), done.append(1)), daemon=True)
        start = time.monotonic()
        again.start()
        again.join(5)
        assert done and time.monotonic() - start < 3, "the next save waits for the child"
    finally:
        for pid in child:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _trainable_live(model):  # (the live factors that train)
    return [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]


def test_an_inactive_trainable_load_trains_that_adapter_only_as_peft(tmp_path):
    # G6: load_peft_adapter(..., is_trainable=True, activate=False) unfroze the layers' live factors, which serve the
    # active adapter (loaded frozen): a training loop before set_adapter trained that adapter (0.26 off in the logits
    # after 3 steps), with no word (then a warning). peft trains the adapter loaded only: the load now marks it to
    # train at the switch (its own Parameter pair), and the live factors stay as they were
    import warnings

    from peft import PeftModel
    from test_peft import _trainable_adapters, llama, tokens
    paths = _trainable_adapters(tmp_path)
    x = tokens()
    model = llama().double()
    lora.load_peft_adapter(model, paths["p"], "p")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lora.load_peft_adapter(model, paths["c"], "c", is_trainable=True, activate=False)
    assert not _trainable_live(model)  # (p serves, frozen: a loop before the switch trains nothing of p)
    # nothing of c is a trainable Parameter of the model before the switch: its saved lm_head copy alone reached an
    # optimizer built then, which trained it and not c's factors (0.36 off peft, S1); now such an optimizer is refused
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    ref = PeftModel.from_pretrained(llama().double(), paths["p"], adapter_name="p")
    ref.load_adapter(paths["c"], "c", is_trainable=True)
    lora.set_adapter(model, "c")
    ref.set_adapter("c")
    assert len(_trainable_live(model)) == 12  # (q, v, down_proj in 2 layers: c's own pairs)
    for m in (model, ref):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            m(x).logits.square().mean().backward()
            opt.step()
        m.eval()
    with torch.no_grad():
        assert (model(x).logits - ref(x).logits).abs().max() < 1e-12  # c trained as peft trains it
        lora.set_adapter(model, "p")
        ref.set_adapter("p")
        assert (model(x).logits - ref(x).logits).abs().max() < 1e-12  # p untouched


def test_a_trainable_activated_load_leaves_the_adapter_set_aside_frozen(tmp_path):
    # G6's knock-on: load_peft_adapter(is_trainable=True) unfroze the live factors before its switch, so the adapter it
    # set aside kept them as its own trainable Parameters, and a later hotswap of it was refused as training it
    from test_peft import _trainable_adapters, llama
    paths = _trainable_adapters(tmp_path)
    model = llama()
    lora.load_peft_adapter(model, paths["p"], "p")
    lora.load_peft_adapter(model, paths["c"], "c", is_trainable=True)
    assert len(_trainable_live(model)) == 12
    lora.hotswap_adapter(model, paths["p"], "p")  # (refused before: "trains it")
    assert not any(m.get_adapter("p")[0].requires_grad for _, m in lora_layers(model) if m.has_adapter("p"))


def test_an_adapter_marked_to_train_is_held_alike_in_new_and_old_layers(tmp_path):
    # S1: in the layers the load created (down_proj) the marked adapter was set aside as trainable Parameters, in the
    # others as frozen copies: reserve_rank refused it there as "set aside by a switch" with factors that require grad
    from test_peft import _trainable_adapters, llama
    paths = _trainable_adapters(tmp_path)
    model = llama()
    lora.load_peft_adapter(model, paths["p"], "p")
    lora.load_peft_adapter(model, paths["c"], "c", is_trainable=True, activate=False)
    assert all(not t.requires_grad for _, m in lora_layers(model) for t in m.get_adapter("c")[:2])
    lora.reserve_rank(model, 8)
    lora.set_adapter(model, "c")
    assert len(_trainable_live(model)) == 12 and all(m.r == 8 for _, m in lora_layers(model))


def test_a_refused_trainable_load_leaves_the_adapter_frozen(tmp_path, monkeypatch):
    # the mark a trainable load gives an inactive adapter goes with the load when it fails part way
    from lora_ext.serving import peft_io
    from test_peft import _trainable_adapters, llama
    paths = _trainable_adapters(tmp_path)
    model = llama()
    lora.load_peft_adapter(model, paths["p"], "p")
    lora.load_peft_adapter(model, paths["c"], "c", activate=False)

    def fail(*args, **kwargs):
        raise RuntimeError("injected after the marks")

    monkeypatch.setattr(peft_io._tokens, "install", fail)
    with pytest.raises(RuntimeError, match="injected after the marks"):
        lora.load_peft_adapter(model, paths["c"], "c", is_trainable=True, activate=False)
    monkeypatch.undo()
    assert not any(m.marked_to_train("c") for _, m in lora_layers(model))
    lora.set_adapter(model, "c")
    assert not _trainable_live(model)
    lora.set_adapter(model, "p")
    lora.load_peft_adapter(model, paths["c"], "c", is_trainable=True, activate=False)  # (and without the failure)
    assert sum(m.marked_to_train("c") for _, m in lora_layers(model)) == 6
    # a hotswap is a serving operation: an adapter marked to train is refused, as one whose factors require grad
    lora.load_peft_adapter(model, paths["p"], "q", is_trainable=True, activate=False)
    with pytest.raises(ValueError, match=r"trains it .*mark_trainable\('q', False\)"):
        lora.hotswap_adapter(model, paths["p"], "q")
    for _, m in lora_layers(model):
        if m.has_adapter("q"):
            m.mark_trainable("q", False)
    lora.hotswap_adapter(model, paths["p"], "q")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_file_carrying_the_embedding_base_loads_into_a_half_model_merged_without_lossless(tmp_path, dtype):
    # G6: peft saves embed_tokens' base weight with an adapter that targets it; into a bfloat16/float16 model merged
    # with lossless=False, a hotswap or a second load compared that base with the one taken out of the merged weight
    # (1.2e-4 off in bfloat16) at float32's tolerance (7.8e-7) and refused it as another model's
    import os

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from tiny_models import llama, randomize_lora, tokens
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        pm = randomize_lora(get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])))
        pm.save_pretrained(str(tmp_path / str(seed)))
        paths.append(str(tmp_path / str(seed)))
    assert any(k.endswith("embed_tokens.base_layer.weight") or "embed_tokens.weight" in k
               for k in load_file(os.path.join(paths[0], "adapter_model.safetensors")))  # (the base it carries)
    model = llama().to(dtype)
    lora.load_peft_adapter(model, paths[0], lossless=False)
    lora.merge_adapter(model)
    lora.hotswap_adapter(model, paths[1])  # (refused before)
    lora.load_peft_adapter(model, paths[0], "again", activate=False)  # (refused before)
    ref = llama().double()  # the second adapter alone, in float64
    lora.load_peft_adapter(ref, paths[1])
    t = tokens()
    with torch.no_grad():
        got, want = model(t).logits.double(), ref(t).logits
    assert (got - want).abs().max().item() < 2e-2  # (half precision: 2.6e-3 measured in bfloat16)
    other = llama().to(dtype)  # a merged model whose embedding is not the file's: still refused, naming it
    lora.load_peft_adapter(other, paths[0], lossless=False)
    lora.merge_adapter(other)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(0.5)
    with pytest.raises(ValueError, match="embed_tokens.*differs from the model's"):
        lora.load_peft_adapter(other, paths[1], "x", activate=False)


def _frozen_then_marked(net):
    from test_fsdp import layers
    for p in net.parameters():
        p.requires_grad_(False)
    for m in layers(net):
        m.mark_trainable("b")
    lora.set_adapter(net, "b")
    return net


def _train_marked(net):
    from test_fsdp import LR, STEPS, data
    ids, ys = data()
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=LR)
    for i in range(STEPS):
        opt.zero_grad()
        (net(ids[i]) - ys[i]).pow(2).mean().backward()
        opt.step()
    return len(trainable), lora.lora_state_dict(net)


def _fsdp_marked_case(rank, world):
    from test_fsdp import build, shard
    return _train_marked(_frozen_then_marked(shard(build())))


def test_an_adapter_marked_to_train_trains_after_a_sharded_switch():
    # the mark (load_peft_adapter(is_trainable=True, activate=False)) on FSDP2's sharded live factors: the switch
    # writes the local shards and makes them train, as the one-process switch registers the adapter's own pair
    from dist import run_ranks
    from test_fsdp import build
    n, want = _train_marked(_frozen_then_marked(build()))
    untrained = lora.lora_state_dict(_frozen_then_marked(build()))
    assert n == 12 and max((untrained[k] - want[k]).abs().max() for k in want) > 1e-3  # (it trained)
    for got_n, got in run_ranks(_fsdp_marked_case):
        assert got_n == n
        assert max((got[k].double() - want[k].double()).abs().max() for k in want) < 1e-6


def test_a_compiled_wrappers_first_call_waits_for_a_forward_already_running_through_it():
    # G6: the model's lock existed (made by an earlier call on the model); a torch.compile wrapper's forward, which
    # runs no lora_ext hook, was under way when the wrapper's first lora_ext call (a switch) hooked it: the lock counted
    # forwards already running only when it was made, so the switch wrote between the forward's two layers (4 of 10
    # trials tore one forward); now the wrapper's first call counts them too
    m, x, want, started, go = _blocking_model()
    cm = torch.compile(m, backend="eager")
    with torch.no_grad():
        cm(x)
    waited, out = _switch_during_a_forward(cm, cm, "b", started, go, x)
    assert waited, "the switch wrote while a forward ran through the wrapper"
    assert (out - want["default"]).abs().max() < 1e-6 < (want["b"] - want["default"]).abs().max()


def _blocking_model():
    """Two layers with adapters 'default' and 'b', and between them a module whose first forward after `started` is
    cleared waits for `go` (a graph break where a forward waits); the model's lock made; the outputs of each."""
    import torch.nn as nn
    started, go = threading.Event(), threading.Event()

    class Block(nn.Module):
        def forward(self, x):
            if not started.is_set():
                started.set()
                go.wait(10)
            return x

    torch.manual_seed(0)
    m = nn.Sequential(lora.Linear(8, 8, r=2), Block(), lora.Linear(8, 8, r=2))
    for layer in (m[0], m[2]):
        layer.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
        nn.init.normal_(layer.lora_B)
        layer.requires_grad_(False)
    x = torch.randn(3, 8)
    want = {}
    with torch.no_grad():
        for name in ("b", "default"):  # (the model's lock made here)
            lora.set_adapter(m, name)
            want[name] = m(x).double()
    started.set()
    return m, x, want, started, go


def _switch_during_a_forward(forward_through, switch_through, name, started, go, x):
    """Runs a forward through `forward_through` that waits in the middle, switches `switch_through` to `name` on
    another thread meanwhile; returns (whether the switch waited for the forward, the forward's output)."""
    started.clear()
    go.clear()
    out, done = [], threading.Event()
    forward = threading.Thread(target=lambda: out.append(forward_through(x).detach().double()))
    forward.start()
    try:
        assert started.wait(10)
        switch = threading.Thread(target=lambda: (lora.set_adapter(switch_through, name), done.set()))
        switch.start()
        waited = not done.wait(0.5)
    finally:
        go.set()
        forward.join(10)
    switch.join(10)
    assert done.is_set() and lora.active_adapter(switch_through) == name
    return waited, out[0]


@pytest.mark.parametrize("how", ["wrapper", "in_place"])
def test_a_switch_through_the_model_waits_for_forwards_of_a_compiled_model_lora_ext_never_saw(how):
    # G6: a torch.compile wrapper no lora_ext function was given (or the model compiled in place, model.compile())
    # runs the model's hooks inside the compiled code, where lora_ext's lock hooks do nothing: a switch through the
    # plain model wrote between a forward's two layers (G6: 1,675 of 4,213 forwards torn while hotswapping; here
    # every time). Wrappers are noted as torch makes them, and model_lock hooks them (and puts a lock around a
    # compiled call in place)
    import copy
    import pickle
    m, x, want, started, go = _blocking_model()
    if how == "wrapper":
        compiled = torch.compile(m, backend="eager")
    else:
        m.compile(backend="eager")
        compiled = m
    with torch.no_grad():
        compiled(x)
    for name, served in (("b", "default"), ("default", "b"), ("b", "default")):
        waited, out = _switch_during_a_forward(compiled, m, name, started, go, x)
        assert waited, f"the switch to {name!r} wrote while a forward ran through the compiled model"
        assert (out - want[served]).abs().max() < 1e-6 < (want["b"] - want["default"]).abs().max()
    if how == "in_place":  # (the lock around the compiled call goes with it, as torch drops the compiled call)
        plain = torch.nn.Sequential(lora.Linear(8, 8, r=2))
        torch.nn.init.normal_(plain[0].lora_B)
        plain.compile(backend="eager")
        with lora.hold(plain):
            pass
        assert isinstance(plain.__dict__["_compiled_call_impl"], type(m.__dict__["_compiled_call_impl"]))
        for again in (copy.deepcopy(plain), pickle.loads(pickle.dumps(plain))):
            assert "_compiled_call_impl" not in again.__dict__
            with torch.no_grad():
                assert torch.equal(again(x), plain(x))


def _one_layer_model():
    import torch.nn as nn
    m = nn.Sequential(lora.Linear(8, 8, r=2))
    m[0].add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    m.requires_grad_(False)
    return m


def _until(condition, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_hooking_a_wrapper_does_not_count_a_forward_waiting_for_its_read():
    # S1: a wrapper's first model_lock call (a torch.compile wrapper noted, or given) counts the forwards already
    # running as reads; it counted a forward waiting in its read hook behind a queued switch too, and the switch then
    # waited for that read, the forward for the switch: both hung for good (3 of 3 runs of S1's stress)
    m, x, _, started, go = _blocking_model()
    lock = model_lock(m)
    started.clear()
    go.clear()
    threads = [threading.Thread(target=lambda: m(x), daemon=True)]  # a forward holding its read, waiting inside
    threads[0].start()
    try:
        assert started.wait(10)
        threads.append(threading.Thread(target=lambda: lora.set_adapter(m, "b"), daemon=True))
        threads[-1].start()
        _until(lambda: lock._queue, "the switch to queue behind the forward")
        threads.append(threading.Thread(target=lambda: m(x), daemon=True))
        threads[-1].start()
        _until(lambda: threads[-1].ident in lock._waiting, "the second forward to wait behind the switch")
        wrapper = torch.compile(m, backend="eager")  # (noted: the next model_lock call hooks it)
        assert model_lock(m) is lock and model_lock(wrapper) is lock
        assert threads[-1].ident not in lock._reads  # (it takes its own read once the switch is done)
    finally:
        go.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a thread hung: the switch behind a read it waited for"
    assert lora.active_adapter(m) == "b" and not lock._reads


def test_a_child_forked_while_a_thread_makes_a_models_lock_makes_its_own():
    # S1: model_lock holds a process-wide lock (_MAKING) while it makes a model's lock or hooks a wrapper; a child
    # forked meanwhile kept it held for good, and its first model-level call of any new model hung
    import os
    import signal
    from lora_ext.serving import adapters
    taken, release = threading.Event(), threading.Event()

    def maker():
        with adapters._MAKING:
            taken.set()
            release.wait(10)

    t = threading.Thread(target=maker, daemon=True)
    t.start()
    try:
        assert taken.wait(10)
        pid = os.fork()
        if pid == 0:
            try:
                lora.set_adapter(_one_layer_model(), "b")
                os._exit(0)
            except BaseException:
                os._exit(3)
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the child hung in its first set_adapter")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        t.join(10)


_REENTERED = r"""
import sys, torch, torch.nn as nn
import lora_ext as lora
from lora_ext.serving import adapters
m = nn.Sequential(lora.Linear(8, 8, r=2))
m[0].add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
wrapper = torch.compile(m, backend="eager")  # (noted; the model has no lock yet)
# what a garbage collection starting under these locks may run on the same thread: the end of an abandoned
# generator's lora_ext block, which takes a model's lock (its making reads the wrappers noted)
with adapters._COMPILED_LOCK, adapters._MAKING:
    lora.set_adapter(m, "b")
    with lora.disable_adapter(m):
        pass
print("ok", wrapper.__dict__.get("_lora_ext_model_lock") is adapters.model_lock(m))
"""


def test_a_models_lock_is_made_under_the_locks_a_collection_may_interrupt():
    # S2: a garbage collection starting while a thread held the lock over the noted wrappers (any allocation under it)
    # closed an abandoned generator inside a lora_ext block, whose end took a model's lock and so that lock again on
    # the same thread: a plain Lock, the thread hung, and every model-level call and torch.compile after it
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(lora.__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-c", _REENTERED], capture_output=True, text=True, timeout=120,
                              env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError("a model's lock taken under the locks a collection may interrupt hung") from None
    assert done.returncode == 0 and done.stdout.split()[-2:] == ["ok", "True"], done.stderr[-2000:]


def test_a_wrapper_made_while_a_switch_waits_is_hooked_as_torch_makes_it():
    # S2: a switch had taken the model's lock (and looked for wrappers) and waited behind a hold when a torch.compile
    # wrapper was made; its forwards took no read, and the switch wrote in the middle of one (9.5 off one adapter,
    # 49 off the other). A wrapper of a model with a lock is hooked as torch makes it
    m, x, want, started, go = _blocking_model()
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with lora.hold(m):
            holding.set()
            release.wait(20)

    threads = [threading.Thread(target=holder, daemon=True)]
    threads[0].start()
    out = []
    try:
        assert holding.wait(10)
        threads.append(threading.Thread(target=lambda: (lora.set_adapter(m, "b"), done.set()), daemon=True))
        threads[-1].start()
        _until(lambda: model_lock(m)._queue, "the switch to queue behind the hold")
        wrapper = torch.compile(m, backend="eager")
        started.clear()
        go.clear()
        threads.append(threading.Thread(target=lambda: out.append(wrapper(x).detach().double()), daemon=True))
        threads[-1].start()
        assert started.wait(60)
        release.set()
        assert not done.wait(1.0), "the switch wrote while the new wrapper's forward ran"
    finally:
        release.set()
        go.set()
    for t in threads:
        t.join(20)
    assert done.is_set() and (out[0] - want["default"]).abs().max() < 1e-6


def test_a_hold_inside_a_forward_through_a_compiled_wrapper_runs():
    # S2: lora.hold(model) inside a forward through a compiled wrapper failed with a dynamo internal error (model_lock
    # traced: "UnspecializedNNModuleVariable ... already tracked for mutation"); it runs eagerly there now
    import torch.nn as nn
    m, x, _, _, _ = _blocking_model()
    seen = []

    class Inside(nn.Module):
        def forward(self, h):
            with lora.hold(m):
                seen.append(lora.active_adapter(m))
            return h

    m[1] = Inside()
    compiled = torch.compile(m, backend="eager")
    with torch.no_grad():
        compiled(x)
    assert seen and seen[-1] == "default"
    with pytest.raises(RuntimeError, match="from inside a forward of the same model"):
        m[1] = type("Switching", (nn.Module,), {"forward": lambda self, h: (lora.set_adapter(m, "b"), h)[1]})()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(m, backend="eager")(x)
    assert lora.active_adapter(m) == "default"


def _compiled_ddp_case(rank, world):
    from torch.nn.parallel import DistributedDataParallel
    m, x, want, started, go = _blocking_model()
    m[0].bias.requires_grad_(True)  # (DDP needs a parameter that trains)
    compiled = torch.compile(DistributedDataParallel(m), backend="eager")
    with torch.no_grad():
        compiled(x)
    waited, out = _switch_during_a_forward(compiled, m, "b", started, go, x)
    return waited, float((out - want["default"]).abs().max())


def test_a_switch_through_the_model_waits_for_forwards_of_a_compiled_ddp():
    # S2: torch.compile(DistributedDataParallel(model)) was noted under the DDP, which the model does not know: a switch
    # through the model tore its forwards (9.5 off one adapter, 49 off the other). DDP wrappers are noted too, and the
    # wrappers noted of those found from the model
    from dist import run_ranks
    for waited, off in run_ranks(_compiled_ddp_case, world=1):
        assert waited and off < 1e-6
