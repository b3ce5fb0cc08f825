"""Forty-third session: what the hostile rounds and the left-alone list of this session gave, each with a test that
fails on the commit before its fix."""
import contextlib

import pytest
import torch

import lora_ext as lora
from helpers import load_sim


def _sim():
    sim = load_sim()
    if sim is None:
        pytest.skip("lora_ext._sim is not built")
    return sim


def _block_update(a, b, scale, out, num_blocks, block_ids):
    """scale * B @ A in float64, each enabled block's rows of it, zeros elsewhere: (out, in)."""
    full = torch.zeros(out, a.shape[1], dtype=torch.float64)
    r, rows = a.shape[0] // len(block_ids), out // num_blocks
    for k, blk in enumerate(block_ids):
        full[blk * rows:(blk + 1) * rows] = scale * (b[k * rows:(k + 1) * rows].double()
                                                     @ a[k * r:(k + 1) * r].double())
    return full


_LAYOUTS = {
    "column-major": lambda out, inn, dtype: torch.randn(inn, out, dtype=dtype).t(),
    "every other column": lambda out, inn, dtype: torch.randn(out, 2 * inn, dtype=dtype)[:, ::2],
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("transposed", [False, True], ids=["rows=out", "rows=in"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_merge_kernels_take_a_weight_in_any_layout(layout, transposed, dtype):
    """K1 (left alone last session): a weight whose rows are not contiguous (a transposed view, every other column)
    was refused by the CUDA merge and swap kernels ("W must have column stride 1"), where the CPU merged it. A
    column-major weight now goes to them as its transpose with the layout flag flipped, another layout as a
    contiguous copy written back; checked through the simulator standing in for the kernels, against float64,
    the disabled block bit for bit, the weight the same tensor with the same strides."""
    from lora_ext import ops
    sim = _sim()
    torch.manual_seed(3)
    out, inn, nb, ids, r = 24, 20, 3, [0, 2], 2
    shape = (inn, out) if transposed else (out, inn)
    w = _LAYOUTS[layout](*shape, dtype)
    strides, ptr, base = w.stride(), w.data_ptr(), w.clone()
    a1, b1 = torch.randn(r * 2, inn), torch.randn(out // nb * 2, r)
    a2, b2 = torch.randn(r * 2, inn), torch.randn(out // nb * 2, r)

    def as_rows(t):  # (out, in) view of a weight laid out as given
        return t.t() if transposed else t

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with ops.use_kernels(sim, "cpu"):
        ops.merge_(w, a1, b1, 0.5, num_blocks=nb, block_ids=ids, transposed=transposed)
        expect = as_rows(base).double() + _block_update(a1, b1, 0.5, out, nb, ids)
        assert sim.last_variant()  # (the simulated kernel ran)
        err = (as_rows(w).double() - expect).abs().max().item()
        assert err <= tol * expect.abs().max().item(), err
        ops.swap_(w, a1, b1, 0.5, a2, b2, -1.5, num_blocks=nb, block_ids=ids, transposed=transposed)
    expect = as_rows(base).double() + _block_update(a2, b2, -1.5, out, nb, ids)
    err = (as_rows(w).double() - expect).abs().max().item()
    assert err <= 2 * tol * expect.abs().max().item(), err
    rows = out // nb
    assert torch.equal(as_rows(w)[rows:2 * rows], as_rows(base)[rows:2 * rows])  # block 1 disabled: untouched
    assert w.stride() == strides and w.data_ptr() == ptr


def test_the_storage_registry_of_ties_forgets_where_a_live_layer_s_weight_lay_before():
    """M1 (left alone last session): ties._by_storage kept a live layer under every address its weight ever lay at
    (a weight assigned again per reload), pruned only when the layers were gone: 5,000 assignments left 5,000
    entries, each scanned at every note past 4,096. Entries whose layer's weight lies elsewhere now are dropped;
    a tie through shared storage is still seen after the pruning."""
    from lora_ext import ties
    layer = lora.Linear(4, 4, r=1)
    kept = []  # (the old weights stay alive: their addresses are not reused)
    for _ in range(5000):
        kept.append(torch.nn.Parameter(torch.randn(4, 4)))
        layer.weight = kept[-1]
    with ties._lock:
        where = [k for k, v in ties._by_storage.items() if layer in v]
    assert len(where) <= 1025, len(where)
    flat = torch.randn(32)
    a, b = lora.Linear(4, 4, r=1), lora.Linear(4, 4, r=1)
    a.weight = torch.nn.Parameter(flat[:16].view(4, 4))
    b.weight = torch.nn.Parameter(flat[:16].view(4, 4))  # another Parameter over the same bytes
    with ties._lock:
        ties._prune_storage()
        where = [k for k, v in ties._by_storage.items() if layer in v]
    assert where == [ties._span(layer.weight)[:2]]
    assert ties.others(a, a.weight) == [b]


def test_a_thread_per_request_server_does_not_keep_each_thread_s_index_buffers(monkeypatch):
    """M1 (left alone last session): the CUDA index buffers of mixed batches are kept per (thread, device, merged
    adapter, rows) for the next batch's graph replay, and were never dropped: a server opening batch_adapters on
    a thread per request kept a pair per request thread and size for the model's life (300 requests, 300 pairs).
    The buffers of threads that have ended are dropped when a new one is made. (The pooled branch is taken on the
    CPU here: it is CUDA's.)"""
    import random
    import threading

    from lora_ext.serving import batches
    monkeypatch.setattr(batches, "_pooled", lambda device: True)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    lora.inject(m, ["0", "2"], r=2)
    for mod in m.modules():
        if isinstance(mod, lora.LoRALayer):
            for n in ("a", "b"):
                mod.add_adapter(n, torch.randn(2, 16), torch.randn(16, 2), 1.0)
    m.eval()
    rng = random.Random(0)
    x = torch.randn(8, 16)
    names = [rng.choice(["a", "b", None]) for _ in range(8)]
    with torch.no_grad():
        expect = torch.cat([_served_alone(m, name, x[i:i + 1]) for i, name in enumerate(names)])
    outs = []
    together = threading.Barrier(5)

    def request(n, wait=True):
        with torch.no_grad(), lora.batch_adapters(m, names[:n]):
            outs.append((n, m(x[:n])))
            if wait:
                together.wait(timeout=60)  # (alive together: five threads of five idents made buffers)

    threads = [threading.Thread(target=request, args=(n,)) for n in (2, 3, 5, 7, 8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    pool = m.__dict__["_lora_ext_slot_pool"]
    assert len({k[0] for k in pool.buffers}) == 5  # (the pooled branch was taken)
    last = threading.Thread(target=request, args=(4, False))  # (a size no ended thread used: a new pair is made)
    last.start()
    last.join(timeout=120)
    # the ended threads' buffers are gone; the last thread's stay (its ident may be an ended one's, reused: what
    # that thread left is bounded by the sizes, and the last thread writes it before any use)
    assert len({k[0] for k in pool.buffers}) == 1, list(pool.buffers)
    assert len(outs) == 6
    for n, y in outs:
        assert (y.double() - expect[:n].double()).abs().max().item() < 1e-5


def _served_alone(m, name, x):
    if name is None:
        with lora.disable_adapter(m):
            return m(x)
    lora.set_adapter(m, name)
    return m(x)


def test_an_adapter_loads_into_a_checkpoint_wrapped_model_and_back(tmp_path):
    """r12 (left alone last session): load_peft_adapter into a model under torch's activation checkpointing was
    refused ("holds factors of module(s) ... that the config's target_modules ... do not select"), with or without
    modules_to_save: the file names the modules without the wrapper's `_checkpoint_wrapped_module`, as peft and
    state_dict() do, and as save_peft_adapter writes them from such a model. The load now finds them under the
    wrappers (target_modules, rank_pattern and modules_to_save by either name); a save and a load again give the
    same forward, and peft reads the save."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tiny_models import llama

    def wrapped():
        m = llama()
        apply_activation_checkpointing(m, check_fn=lambda mm: isinstance(mm, LlamaDecoderLayer))
        assert any("_checkpoint_wrapped_module" in n for n, _ in m.named_modules())
        return m

    torch.manual_seed(1)
    pm = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            rank_pattern={"model.layers.1.self_attn.q_proj": 4},
                                            modules_to_save=["post_attention_layernorm"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    x = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        ref = pm.eval()(x).logits.double()
    ours = wrapped()
    lora.load_peft_adapter(ours, str(tmp_path / "peft"), "x")
    q1 = ours.get_submodule("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj")
    assert q1.r == 4  # (rank_pattern matched the name without the wrapper)
    with torch.no_grad():
        assert (ours.eval()(x).logits.double() - ref).abs().max().item() < 1e-5
    lora.save_peft_adapter(ours, str(tmp_path / "ours"), adapter_name="x")
    for again in (wrapped(), llama()):
        lora.load_peft_adapter(again, str(tmp_path / "ours"), "y")
        with torch.no_grad():
            assert (again.eval()(x).logits.double() - ref).abs().max().item() < 1e-5
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(llama(), str(tmp_path / "ours")).eval()(x).logits.double()
    assert (theirs - ref).abs().max().item() < 1e-5


def test_a_refused_switch_names_the_adapter_switched_to():
    """Left alone last session: a switch refused for the new adapter's factors (their product B @ A past float32's
    range, or the sum past the weight's) named the adapter switched from, whose factors were fine."""
    layer = lora.Linear(2, 2, r=1, lora_alpha=1e-10, bias=False)
    with torch.no_grad():
        layer.weight.fill_(3e38)
    layer.add_adapter("big", torch.full((1, 2), 1e20), torch.full((2, 1), 1e20), 1e-10)
    layer.add_adapter("wide", torch.full((1, 2), 1e19), torch.full((2, 1), 1e19), 1.0)
    layer.eval()
    assert layer.merged and layer.active_adapter == "default"
    before = layer.weight.clone()
    with pytest.raises(ValueError, match=r"adapter 'big': the factors' product B @ A"):
        layer.set_adapter("big")
    with pytest.raises(ValueError, match=r"switching from adapter 'default' to 'wide': .* beyond torch.float32's range"):
        layer.set_adapter("wide")
    assert layer.active_adapter == "default" and layer.merged and torch.equal(layer.weight, before)


def test_dare_svd_with_a_clamp_and_no_rank_draws_the_masks_peft_draws(monkeypatch):
    """W1: dare_*_svd with svd_clamp and no svd_rank computes the updates in float64 (the cut of rounding noise), and
    drew its random masks on them: torch.bernoulli takes other random values for float64 than for float32, so under
    one seed the masks differed from peft's (drawn in the factors' float32) and from the same combination's with
    svd_rank. They are drawn in the factors' dtype now: the same masks either way."""
    drawn = []
    real = torch.bernoulli

    def spy(p, *args, **kwargs):
        out = real(p, *args, **kwargs)
        drawn[-1].append(out.clone())
        return out
    monkeypatch.setattr(torch, "bernoulli", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    lora.inject(model, ["0"], r=2, lora_alpha=4)
    layer = model[0]
    for name in ("a", "b"):
        layer.add_adapter(name, torch.randn(2, 12), torch.randn(10, 2), 2.0)
    for kwargs in ({"svd_clamp": 0.99}, {"svd_clamp": 0.99, "svd_rank": 4}):
        drawn.append([])
        torch.manual_seed(5)
        lora.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], f"w{len(drawn)}", combination_type="dare_linear_svd",
                                  density=0.5, **kwargs)
    assert len(drawn[0]) == len(drawn[1]) == 2
    assert all(m.dtype == torch.float32 for m in drawn[0] + drawn[1]), [m.dtype for m in drawn[0]]
    assert all(torch.equal(p, q) for p, q in zip(drawn[0], drawn[1]))


def _two_adapter_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    lora.inject(model, ["0", "1"], r=2)
    for layer in model:
        for name in ("a", "b"):
            layer.add_adapter(name, torch.randn(2, 8), torch.randn(8, 2), 1.0)
    lora.set_adapter(model, "a")
    return model


def test_a_forward_whose_earlier_pre_hook_raises_does_not_end_a_hold():
    """C1: lora_ext's forward hook runs for every call (always_call), and gave back "a read of this thread" even
    where its pre-hook never took one, because a user's pre-hook ahead of it raised: inside lora.hold(model), a
    forward whose input such a hook rejected gave back the hold's read, and a set_adapter on another thread then
    ran inside the hold (its next forward served the other adapter, 0.82 off on a tiny Llama). The same gave back
    the read of the forward around a nested one. A hook gives back only the read its own call's pre-hook took."""
    import threading

    from lora_ext.serving.adapters import hold, model_lock
    model = _two_adapter_model()

    def reject(module, args):
        if args[0].shape[0] > 3:
            raise ValueError("too many rows")
    model.register_forward_pre_hook(reject, prepend=True)
    x = torch.randn(2, 8)
    with torch.no_grad():
        served_a = model(x)
    lock = model_lock(model)
    with hold(model):
        with pytest.raises(ValueError, match="too many rows"):
            model(torch.randn(5, 8))
        assert lock.holds_read()
        switch = threading.Thread(target=lora.set_adapter, args=(model, "b"))
        switch.start()
        switch.join(1.0)
        assert switch.is_alive()  # it waits for the hold
        with torch.no_grad():
            assert torch.equal(model(x), served_a)
    switch.join(30)
    assert not switch.is_alive() and lora.active_adapter(model) == "b"
    assert not lock.holds_read()

    # a forward inside a forward of the model (a module of it calling the whole model), whose pre-hook raises
    lora.set_adapter(model, "a")
    seen = {}

    class Outer(torch.nn.Module):
        def forward(self, x):
            with pytest.raises(ValueError, match="too many rows"):
                model(torch.randn(5, 8))
            seen["held"] = lock.holds_read()
            return x
    outer = Outer()
    model.insert(0, outer)
    with torch.no_grad():
        model(x)
    assert seen["held"] and not lock.holds_read()


@pytest.mark.parametrize("shape", ["worker", "worker-in-a-hold", "outer-let-in-by-a-hold"])
def test_a_forward_that_waits_for_a_forward_on_a_worker_does_not_deadlock_a_queued_switch(shape, monkeypatch):
    """C1: a forward of the model that runs another forward of it on a worker thread and waits for it (a hook, a
    thread pool inside forward) hung for good once a model-level switch queued between the two: the worker's new
    read waited behind the switch, the switch for the outer forward's read, the outer forward for the worker. R1:
    the same with the worker's forward inside lora.hold(model), and where the outer forward got ahead of the switch
    (a hold was open as it came). A new read passes a waiting switch after HOLD_QUEUE_SECONDS while another thread
    that holds a read waits in a threading primitive (here: the join); threads computing are never passed so."""
    import threading
    import time

    from lora_ext.serving import adapters
    monkeypatch.setattr(adapters, "HOLD_QUEUE_SECONDS", 0.3)
    model = _two_adapter_model()
    x = torch.randn(2, 8)
    lock = adapters.model_lock(model)
    queued = threading.Event()
    results = {}

    def worker():
        with adapters.hold(model) if shape == "worker-in-a-hold" else contextlib.nullcontext():
            results["inner"] = model(x)

    def hook(module, args, output):
        if threading.current_thread().name != "outer":
            return None
        deadline = time.monotonic() + 10
        while not lock._queue and time.monotonic() < deadline:  # (the switch queues meanwhile)
            time.sleep(0.01)
        queued.set()
        if shape == "outer-let-in-by-a-hold":
            time.sleep(0.5)  # (the hold that let this forward in ends meanwhile)
        w = threading.Thread(target=worker, name="worker")
        w.start()
        w.join()
        return None
    handle = model[0].register_forward_hook(hook)

    def outer():
        with torch.no_grad():
            results["outer"] = model(x)
    switch = threading.Thread(target=lora.set_adapter, args=(model, "b"), daemon=True)
    first = threading.Thread(target=outer, name="outer", daemon=True)
    if shape == "outer-let-in-by-a-hold":
        opened = threading.Event()

        def holder():
            with adapters.hold(model):
                opened.set()
                time.sleep(0.2)
        threading.Thread(target=holder, daemon=True).start()
        opened.wait(10)
        switch.start()  # (waits for the hold)
        while not lock._queue:
            time.sleep(0.01)
        first.start()  # (a forward passes while a hold is open)
    else:
        first.start()
        time.sleep(0.2)
        switch.start()
    first.join(30)
    switch.join(30)
    assert queued.is_set()
    assert not first.is_alive() and not switch.is_alive()  # (it hung here)
    assert torch.equal(results["inner"], results["outer"])  # both served adapter a
    assert lora.active_adapter(model) == "b"
    handle.remove()
    if shape != "worker":
        return

    # the rule does not let forwards taken after the switch came keep it out: two threads forwarding in turn, each
    # forward three waits long and half a forward apart, while a switch waits (were every other thread's read
    # passed, each thread would pass the switch in turn for good)
    wait = 0.2
    monkeypatch.setattr(adapters, "HOLD_QUEUE_SECONDS", wait)
    lora.set_adapter(model, "a")
    slow = model[1].register_forward_hook(lambda m, a, o: time.sleep(3 * wait))
    stop = threading.Event()

    def loop():
        with torch.no_grad():
            while not stop.is_set():
                model(x)
    loops = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
    for t in loops:
        t.start()
        time.sleep(1.5 * wait)
    switch = threading.Thread(target=lora.set_adapter, args=(model, "a"), daemon=True)
    switch.start()
    switch.join(15 * wait)
    done = not switch.is_alive()
    stop.set()
    for t in loops + [switch]:
        t.join(30)
    slow.remove()
    assert done


def _colwise_without_rows_net(out_features, enable_lora):
    torch.manual_seed(0)
    last = (lora.MergedLinear(8, out_features, r=2, lora_alpha=4, enable_lora=enable_lora) if enable_lora
            else lora.Linear(8, out_features, r=2, lora_alpha=4))
    m = torch.nn.Sequential(lora.Linear(8, 8, r=2, lora_alpha=4), last)
    for layer in m:
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    lora.mark_only_lora_as_trainable(m)
    g = torch.Generator().manual_seed(1)
    return m, torch.randn(5, 8, generator=g), torch.randn(5, out_features, generator=g)


def _colwise_without_rows_case(rank, world, out_features, enable_lora):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_ext.parallel import ColwiseLoRA
    m, x, t = _colwise_without_rows_net(out_features, enable_lora)
    parallelize_module(m, init_device_mesh("cpu", (world,)), {"1": ColwiseLoRA()})
    y = m(x)
    lo = -(-out_features // world) * rank  # (torch's Shard(0): the first ranks take the ceiling)
    torch.nn.functional.mse_loss(y, t[:, lo:lo + y.shape[-1]], reduction="sum").backward()
    none = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    return none, m[1].lora_A.full_tensor().detach(), m[1].lora_B.full_tensor().detach()


@pytest.mark.parametrize("out_features, enable_lora", [(6, [True, False, False]), (1, None)],
                         ids=["merged-block-on-rank-0", "one-output"])
def test_a_colwise_rank_without_lora_rows_takes_part_in_the_step(out_features, enable_lora):
    """T1: under ColwiseLoRA, a rank whose rows hold no enabled block (a MergedLinear's disabled blocks, or fewer
    output features than ranks) never used the factors: their .grad stayed None there, the optimizer skipped them,
    and the other ranks hung for good in the step's collective over their Partial gradients. The factors enter the
    graph by an exact 0: zero gradients there, and the step matches one process."""
    from dist import run_ranks
    m, x, t = _colwise_without_rows_net(out_features, enable_lora)
    torch.nn.functional.mse_loss(m(x), t, reduction="sum").backward()
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    for none, A, B in run_ranks(_colwise_without_rows_case, out_features, enable_lora, timeout=120):
        assert none == []
        assert (A - m[1].lora_A.detach()).abs().max().item() < 1e-6
        assert (B - m[1].lora_B.detach()).abs().max().item() < 1e-6


def test_the_first_model_level_switch_of_a_hand_built_model_waits_for_the_forwards_running():
    """C1: a model built by hand gets its lock at its first model-level call; forwards already running then took no
    read, and that first set_adapter switched the layers under them: 29 of 30 tries served a mix of two adapters
    (the README said to switch once before serving). Each forward running when the lock is made counts as a read,
    dropped once it ends: the switch waits for it."""
    import threading
    import time
    mixes = 0
    for trial in range(8):
        torch.manual_seed(trial)
        layers = []
        for _ in range(12):
            layer = lora.Linear(64, 64, r=4, lora_alpha=4)
            with torch.no_grad():
                layer.lora_A.normal_()
                layer.lora_B.normal_(0, 0.05)
            layer.add_adapter("b", torch.randn(4, 64), torch.randn(64, 4) * 0.05, 1.0)
            layers.append(layer)
        model = torch.nn.Sequential(*layers).eval()
        # a slow layer in the middle: the switch lands while a forward is half way through
        layers[6].register_forward_hook(lambda m, a, o: time.sleep(0.05))
        x = torch.randn(4, 64)
        with torch.no_grad():
            served = {}
            for name in ("default", "b"):
                for layer in layers:
                    layer.set_adapter(name)
                served[name] = model(x).double()
            for layer in layers:
                layer.set_adapter("default")
        outs, stop, going = [], threading.Event(), threading.Event()

        def forwards():
            going.set()
            with torch.no_grad():
                while not stop.is_set():
                    outs.append(model(x).double())
        t = threading.Thread(target=forwards)
        t.start()
        going.wait(10)
        time.sleep(0.01)
        lora.set_adapter(model, "b")  # the first model-level call: it makes the lock
        time.sleep(0.02)
        stop.set()
        t.join(30)
        gap = (served["default"] - served["b"]).abs().max().item()
        assert gap > 1e-2
        for y in outs:
            if min((y - s).abs().max().item() for s in served.values()) > 1e-4 * gap:
                mixes += 1
    assert mixes == 0, mixes


def test_a_parametrized_module_s_tie_is_seen_after_the_registry_is_pruned():
    """R1 on this session's pruning: a plain module whose weight is parametrized holds no 'weight' Parameter, and the
    pruning of ties' registries dropped it (its weight looked moved): a layer given `parametrizations.weight.original`
    after 600 other modules were made no longer saw the tie, and its eval() merged into the embedding's weight (0.99
    off). The pruning looks at the module's weight sources."""
    import torch.nn.utils.parametrize as P

    class Same(torch.nn.Module):
        def forward(self, X):
            return X

    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 8)
    P.register_parametrization(emb, "weight", Same())
    keep = [torch.nn.Linear(2, 2) for _ in range(1200)]  # (past the registry's pruning size)
    head = lora.Linear(8, 10, r=2, lora_alpha=2)
    head.weight = emb.parametrizations.weight.original
    with torch.no_grad():
        head.lora_B.normal_()
    ids = torch.arange(10)
    before = emb(ids).detach().clone()
    with pytest.warns(UserWarning):
        head.eval()
    assert not head.merged
    assert torch.equal(emb(ids), before)
    assert len(keep) == 1200


def test_threads_making_a_model_s_first_calls_together_share_one_lock(monkeypatch):
    """hostile33's flake, found: a model's lock is made at its first lora_ext call; two threads making their first
    calls at once (lora_state_dict and set_adapter) each made a lock of their own, and the state read ran under one
    while the switch wrote under the other: 3 of 60 snapshots of an FSDP2 model mixed two adapters, under load. The
    lock is made once, under a process-wide lock."""
    import sys
    import threading
    import time

    from lora_ext.serving import adapters
    real = adapters.ModelLock.__init__

    def slow_init(self):  # (a thread switch inside the making, as load gives one)
        real(self)
        time.sleep(0.01)
    monkeypatch.setattr(adapters.ModelLock, "__init__", slow_init)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(5):
            model = torch.nn.Sequential(torch.nn.Linear(4, 4))
            start = threading.Barrier(4)
            got = []

            def first_call():
                start.wait(10)
                got.append(adapters.model_lock(model))
            threads = [threading.Thread(target=first_call) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(got) == 4 and all(lock is got[0] for lock in got)
            assert model.__dict__["_lora_ext_model_lock"] is got[0]
            assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    finally:
        sys.setswitchinterval(interval)


def test_a_lossless_merge_on_the_kernels_takes_a_column_major_weight():
    """R1 on K1: the lossy kernels took any layout, but the lossless ones (the default for bfloat16 and float16) still
    refused a column-major weight ("W must have column stride 1"), and that refusal, raised inside the layer's write,
    left the layer refusing every forward until a load. Such a weight takes the reference's lossless pass (the same
    record format): merge, switch and unmerge give the base back bit for bit. Through the simulator."""
    from lora_ext import ops
    sim = _sim()
    dt = torch.bfloat16
    torch.manual_seed(0)
    layer = lora.Linear(7, 12, r=2, lora_alpha=4).to(dt)
    layer.weight = torch.nn.Parameter(layer.weight.data.t().contiguous().t(), requires_grad=False)
    base = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    A_b, B_b = torch.randn(2, 7).to(dt), torch.randn(12, 2).to(dt)
    layer.add_adapter("b", A_b, B_b, 1.0)
    x = torch.randn(3, 7, dtype=dt)
    with ops.use_kernels(sim, "cpu"):
        layer.eval()
        assert layer.merged
        layer.set_adapter("b")
        assert layer.merged and layer.active_adapter == "b"
        ref = x.double() @ (base.double() + B_b.double() @ A_b.double()).t() + layer.bias.double()
        assert (layer(x).double() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
        layer.train()
    assert not layer.merged and torch.equal(layer.weight, base) and layer.weight.stride() == (1, 12)


def test_a_lossless_kernel_s_argument_refusal_leaves_the_layer_serving():
    """R1 on K1, the second half: a lossless kernel launcher's argument refusal (a ValueError, raised before anything
    is launched) was taken for a write that failed part way: the layer refused every forward until a load. It says
    the weight was not written, as the lossy launchers' refusals do: eval() leaves the layer unmerged, serving."""
    import types

    from lora_ext import ops
    sim = _sim()

    def refuse(*args):
        raise ValueError("merge_lossless_: W has too many 64 x 128 tiles (a stand-in launcher refusal)")
    proxy = types.SimpleNamespace(**{n: getattr(sim, n) for n in dir(sim) if not n.startswith("__")})
    proxy.merge_lossless_ = refuse
    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        unmerged = layer(x)
    with ops.use_kernels(proxy, "cpu"), pytest.raises(ValueError, match="too many 64 x 128 tiles"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, base)
    with torch.no_grad():
        assert torch.equal(layer(x), unmerged)  # (serving: not refused)
    layer.eval()  # (on the CPU pass: merges)
    assert layer.merged


def test_inject_into_a_checkpoint_wrapped_model_takes_options_by_plain_names():
    """R1: inject() into a model under torch's activation checkpointing matched rank_pattern, alpha_pattern and
    exclude_modules given by the modules' plain names (as peft, state_dict() and saved adapters name them) against
    the wrapped names only: the options were left out without a word (r 2 where 4 was asked, the excluded module
    adapted). They match either name now, as in a plain model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lora_ext.utils import plain_name
    from tiny_models import llama

    def adapted(wrap):
        m = llama()
        if wrap:
            apply_activation_checkpointing(m, check_fn=lambda mm: isinstance(mm, LlamaDecoderLayer))
        lora.inject(m, ["q_proj", "v_proj"], r=2, lora_alpha=4,
                    rank_pattern={"model.layers.1.self_attn.q_proj": 4},
                    alpha_pattern={"model.layers.1.self_attn.v_proj": 32},
                    exclude_modules=["model.layers.0.self_attn.q_proj"])
        return {plain_name(n): (l.r, l.scaling) for n, l in m.named_modules() if isinstance(l, lora.LoRALayer)}
    plain, wrapped = adapted(False), adapted(True)
    assert plain["model.layers.1.self_attn.q_proj"] == (4, 1.0)
    assert plain["model.layers.1.self_attn.v_proj"] == (2, 16.0)
    assert "model.layers.0.self_attn.q_proj" not in plain
    assert wrapped == plain


def test_a_shallow_copy_made_before_the_lock_shares_it():
    """R2: copy.copy of a model made before its first lora_ext call shares the model's layers and hook dicts, not
    its __dict__: once the model had its lock, a forward through the copy raised KeyError('_lora_ext_model_lock')
    (the shared hooks read it), and after a lora_ext call on the copy it had a lock of its own: a switch through the
    model during a forward through the copy mixed two adapters, 10 of 10. The copy takes the lock of the hooks it
    shares."""
    import copy
    import threading
    import time

    from lora_ext.serving.adapters import model_lock
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layer = lora.Linear(16, 16, r=2, lora_alpha=2)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)
        layer.add_adapter("b", torch.randn(2, 16), torch.randn(16, 2) * 0.2, 1.0)
        layers.append(layer)
    model = torch.nn.Sequential(*layers).eval()
    twin = copy.copy(model)
    x = torch.randn(4, 16)
    served = {}
    for name in ("b", "default"):
        lora.set_adapter(model, name)
        with torch.no_grad():
            served[name] = twin(x).double()  # (it raised KeyError here)
    assert model_lock(twin) is model_lock(model)
    layers[3].register_forward_hook(lambda m, a, o: time.sleep(0.05))
    for trial in range(4):
        out = {}

        def forward():
            with torch.no_grad():
                out["y"] = twin(x).double()
        t = threading.Thread(target=forward)
        t.start()
        time.sleep(0.02)
        lora.set_adapter(model, "b" if trial % 2 == 0 else "default")
        t.join(30)
        assert min((out["y"] - s).abs().max().item() for s in served.values()) < 1e-6


def test_an_exception_landing_in_a_hold_never_leaves_it_counted_or_lets_a_switch_in():
    """R2: an exception landing between two statements of hold()'s end left the hold counted for good (every later
    switch waited for ever), and one landing inside release_read as a forward inside a hold gave its read back lost
    the hold's read with it (popped, then written back): a switch on another thread then ran inside the hold. The
    hold puts its counts back in one hold of the mutex, run again once when an exception lands in it, and
    release_read writes the count once."""
    import threading

    from test_session_hostile27 import _landing_at, _lines_of, _two_layer_model, _within

    from lora_ext.serving.adapters import ModelLock, hold, model_lock
    function = hold.__wrapped__

    def held(model):
        with hold(model):
            model(torch.randn(2, 8))
    model, _, _ = _two_layer_model()
    lines = _lines_of(function, lambda: held(model))
    assert len(lines) >= 5
    for line in lines:
        model, _, _ = _two_layer_model()
        lock = model_lock(model)
        assert _landing_at(function, line, lambda: held(model)), line
        assert not lock._reads and not lock._holds, line
        assert _within(lambda: lora.set_adapter(model, "b"), 10), f"line {line}: a change waits for ever"

    release = ModelLock.release_read
    lines = _lines_of(release, lambda: held(model))
    for line in lines:
        model, _, _ = _two_layer_model()
        lock = model_lock(model)
        with hold(model):
            _landing_at(release, line, lambda: model(torch.randn(2, 8)))
            assert lock._holds and lock.holds_read(), line
            switch = threading.Thread(target=lora.set_adapter, args=(model, "b"), daemon=True)
            switch.start()
            switch.join(0.3)
            assert switch.is_alive(), f"line {line}: the switch ran inside the hold"
        switch.join(10)
        assert not switch.is_alive() and not lock._reads and not lock._holds, line
