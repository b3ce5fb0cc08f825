"""lora.disable_adapter(model), as peft's `with model.disable_adapter():`: the base model inside the block (merged
layers unmerged on entry, merged again on exit; modules saved whole serve the model's own module), against the real
peft and the plain base model; nesting, eval()/train() and merge() inside, refusals, threads, torch.compile,
gradients."""
import threading
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lora_ext as lora
from helpers import lora_layers_of, rel_err
from tiny_models import VOCAB, llama, snapshot, unchanged


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pm = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                            modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # (small enough for a lossless bfloat16 merge of the embedding)
                p.normal_(0, 0.03)
            elif "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.3)
    root = tmp_path_factory.mktemp("disable")
    pm.save_pretrained(str(root))
    return str(root)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _model(saved, dtype=torch.float32):
    model = llama().to(dtype)
    lora.load_peft_adapter(model, saved, "a")
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16-lossless"])
def test_the_block_serves_the_base_as_peft_does_and_the_adapter_after(saved, dtype):
    x = torch.randint(0, VOCAB, (2, 6))
    base = _logits(llama().to(dtype).eval(), x)
    model = _model(saved, dtype)
    assert all(m.merged for m in lora_layers_of(model))
    adapted = _logits(model, x)
    pm = PeftModel.from_pretrained(llama().to(dtype), saved).eval()
    with pm.disable_adapter():
        peft_base = _logits(pm, x)
    with lora.disable_adapter(model):
        assert not any(m.merged for m in lora_layers_of(model))
        inside = _logits(model, x)
    if dtype == torch.bfloat16:  # a lossless merge gives the base back bit for bit
        assert torch.equal(inside, base)
    assert rel_err(inside, base) < 1e-6 and rel_err(inside, peft_base) < 1e-6
    assert rel_err(adapted, base) > 1e-2  # the adapter (and the saved head) matter
    assert all(m.merged for m in lora_layers_of(model))  # merged again on exit
    assert rel_err(_logits(model, x), adapted) < 1e-6


def test_nesting_eval_train_and_merge_inside(saved):
    x = torch.randint(0, VOCAB, (2, 6))
    model = _model(saved).train()  # unmerged
    base = _logits(llama().eval(), x)
    with lora.disable_adapter(model):
        with lora.disable_adapter(model):
            model.eval()  # its merge waits for the end of the outer block
            assert not any(m.merged for m in lora_layers_of(model))
            assert rel_err(_logits(model, x), base) < 1e-6
        assert not any(m.merged for m in lora_layers_of(model))  # the outer block is still open
        with pytest.raises(ValueError, match="its adapters are disabled"):
            lora.merge_adapter(model)
        assert rel_err(_logits(model, x), base) < 1e-6
    assert all(m.merged for m in lora_layers_of(model))  # eval() asked for it
    model.train()
    with lora.disable_adapter(model):
        pass
    assert not any(m.merged for m in lora_layers_of(model))  # train mode: unmerged as before


def test_refusals(saved, tmp_path):
    model = _model(saved)
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad(), lora.batch_adapters(model, ["a", None]):
        snap = snapshot(model)
        with pytest.raises(RuntimeError, match="would wait for itself"):  # the batch holds the model (lora.hold)
            with lora.disable_adapter(model):
                pass
        outer = torch.nn.ModuleDict({"m": model})  # another model holding the same layers: their batch counts
        with pytest.raises(ValueError, match=r"disable_adapter: a mixed batch .* serves layer 'm\.model\."):
            with lora.disable_adapter(outer):
                pass
        assert unchanged(model, snap) and all(m.merged for m in lora_layers_of(model))
    with lora.disable_adapter(model):
        with pytest.raises(ValueError, match="batch_adapters: the model's adapters are disabled"):
            with lora.batch_adapters(model, ["a", None]):
                pass
        with pytest.raises(ValueError, match="load_peft_adapter: the model's adapters are disabled"):
            lora.load_peft_adapter(model, saved, "b")
        with pytest.raises(ValueError, match="inject: the model's adapters are disabled"):
            lora.inject(model, ["o_proj"], r=2)
    assert lora.adapter_names(model) == ["a"]
    _logits(model, x)


def test_threads_see_the_base_or_the_adapter_never_a_mix(saved):
    model = _model(saved).train()  # unmerged: the block only flips the layers
    x = torch.randint(0, VOCAB, (2, 6))
    base, adapted = _logits(llama().eval(), x), _logits(model, x)
    stop, bad = threading.Event(), []

    def forwards():
        while not stop.is_set():
            out = _logits(model, x)
            if rel_err(out, base) > 1e-5 and rel_err(out, adapted) > 1e-5:
                bad.append(out)

    t = threading.Thread(target=forwards)
    t.start()
    try:
        for _ in range(30):
            with lora.disable_adapter(model):
                pass
    finally:
        stop.set()
        t.join(30)
    assert not bad


def test_torch_compile_follows_the_block(saved):
    x = torch.randint(0, VOCAB, (2, 6))
    model = _model(saved).train()
    base, adapted = _logits(llama().eval(), x), _logits(model, x)
    compiled = torch.compile(model, backend="aot_eager")
    assert rel_err(_logits(compiled, x), adapted) < 1e-5
    with lora.disable_adapter(model):
        assert rel_err(_logits(compiled, x), base) < 1e-5
    assert rel_err(_logits(compiled, x), adapted) < 1e-5


def test_no_gradient_reaches_the_adapter_inside(saved):
    model = _model(saved).train()
    lora.mark_only_lora_as_trainable(model)
    x = torch.randint(0, VOCAB, (2, 6))
    with lora.disable_adapter(model):
        assert not model(x).logits.requires_grad  # the base: nothing trainable computes (the saved head: its own)
    model(x).logits.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def _tp_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseLoRA
    torch.manual_seed(0)
    net = torch.nn.Sequential(lora.Linear(8, 6, r=2))
    parallelize_module(net, init_device_mesh("cpu", (world,)), {"0": ColwiseLoRA()})
    try:
        with lora.disable_adapter(net):
            return "not refused"
    except ValueError as e:
        return f"{str(e)} | flag {net[0]._adapter_off}"


def test_a_tensor_parallel_layer_is_refused():
    from dist import run_ranks
    for msg in run_ranks(_tp_case):
        assert msg.startswith("disable_adapter: layer '0' is sharded (tensor parallel or FSDP2)"), msg
        assert msg.endswith("| flag 0")


# ---------------------------------------------------------------------------------------------------
# found by a hostile pass: each of these was silently wrong


def test_unload_inside_the_block_is_refused(saved):
    # the block's end merged the unloaded layers again, into the weights the plain modules now hold
    model = _model(saved)
    with lora.disable_adapter(model):
        with pytest.raises(ValueError, match="unload: the model's adapters are disabled"):
            lora.unload(model, merge=False)
    lora.unload(model, merge=False)  # after it: the base weights (the saved head stays the adapter's copy)
    plain = dict(llama().named_parameters())
    for n, p in model.named_parameters():
        if "q_proj" in n or "v_proj" in n or "embed_tokens" in n:
            assert (p - plain[n]).abs().max() <= 1e-6 * plain[n].abs().max(), n


@pytest.mark.parametrize("start,inside,merged_after", [
    ("eval", "train", False),  # train() inside: unmerged, as train() leaves it (was left merged while training)
    ("eval-unmerged", None, False),  # eval, explicitly unmerged before: as it was (was merged)
    ("train", "eval", True),  # eval() inside: its merge, done at the end
    ("train-merged", None, True),  # merge_adapter in train mode: merged again
])
def test_the_merge_state_after_the_block_is_the_one_before_or_the_modes(saved, start, inside, merged_after):
    model = _model(saved)
    if start.startswith("train"):
        model.train()
    if start == "eval-unmerged":
        lora.unmerge_adapter(model)
    if start == "train-merged":
        lora.merge_adapter(model)
    with lora.disable_adapter(model):
        if inside:
            getattr(model, inside)()
    assert all(m.merged == merged_after for m in lora_layers_of(model))
    if model.training:  # training reaches the factors, merged or not (through the merge: test_train_through_merge)
        lora.mark_only_lora_as_trainable(model)
        model(torch.randint(0, VOCAB, (2, 6))).logits.sum().backward()
        grads = [p.grad is not None for n, p in model.named_parameters() if "lora_" in n]
        assert grads and all(grads)
        assert all(m.merged == merged_after for m in lora_layers_of(model))  # (nothing written)


def test_blocks_ending_out_of_order_restore_the_state_before_the_first(saved):
    import contextlib
    model = _model(saved).train()
    lora.merge_adapter(model)
    stack1, stack2 = contextlib.ExitStack(), contextlib.ExitStack()
    stack1.enter_context(lora.disable_adapter(model))
    stack2.enter_context(lora.disable_adapter(model))
    stack1.close()  # the first to begin ends first
    assert not any(m.merged for m in lora_layers_of(model))
    stack2.close()
    assert all(m.merged for m in lora_layers_of(model))


def test_a_copy_made_inside_the_block_is_not_in_it(saved):
    import copy
    x = torch.randint(0, VOCAB, (2, 6))
    model = _model(saved)
    adapted = _logits(model, x)
    with lora.disable_adapter(model):
        twin = copy.deepcopy(model)
    assert rel_err(_logits(twin, x), adapted) < 1e-6  # the adapter (unmerged: copied inside)
    lora.merge_adapter(twin)
    assert all(m.merged for m in lora_layers_of(twin))


def test_ctrl_c_while_the_end_waits_for_the_lock_still_ends_the_block(saved, python_sigint):
    # a forward (a hold) on another thread makes the end wait; a Ctrl-C then left the model disabled for good
    import _thread
    import time
    x = torch.randint(0, VOCAB, (2, 6))
    model = _model(saved)
    adapted = _logits(model, x)
    started = threading.Event()

    def reader():
        with lora.hold(model):
            started.set()
            time.sleep(1.0)

    t = threading.Thread(target=reader)
    with pytest.raises(KeyboardInterrupt):
        with lora.disable_adapter(model):
            t.start()
            started.wait()
            threading.Timer(0.3, _thread.interrupt_main).start()  # lands while the end waits
    t.join()
    assert all(m.merged and not m._adapter_off for m in lora_layers_of(model))
    assert rel_err(_logits(model, x), adapted) < 1e-6


@pytest.mark.parametrize("mode", ["eval-merged", "eval-then-train"])
def test_a_second_adapter_carrying_the_base_embedding_loads_into_a_merged_or_cycled_layer(saved, mode):
    # (found beside the block) peft saves the base embedding beside an embedding adapter's factors; the check that it
    # is the model's compared it with the merged weight, and with a float32 base a few ulps off after a merge cycle
    model = _model(saved)  # eval: merged
    if mode == "eval-then-train":
        model.train()
    lora.load_peft_adapter(model, saved, "again", activate=False)
    assert "again" in lora.adapter_names(model)
    with torch.no_grad():  # a base that is not the model's is still refused
        model.model.embed_tokens.weight.add_(0.01)
    with pytest.raises(ValueError, match="carries a base weight .* that differs from the model's"):
        lora.load_peft_adapter(model, saved, "other", activate=False)


@pytest.mark.parametrize("op", ["forward", "set_adapter", "disable_adapter"])
def test_a_thread_switching_in_a_loop_does_not_starve_the_others(saved, op):
    # the switching thread took the model's lock straight back after each switch: a forward, a switch or a
    # disable_adapter on another thread waited for minutes (writers now queue in order; readers that waited
    # through a write go before the next one). A liveness check: the operation must finish at all (30 s bound).
    model, x = _two_adapters(saved)
    stop = threading.Event()

    def switcher():
        i = 0
        while not stop.is_set():
            lora.set_adapter(model, ("a", "b")[i % 2])
            i += 1

    def operation():
        for _ in range(3):
            if op == "forward":
                _logits(model, x)
            elif op == "set_adapter":
                lora.set_adapter(model, "a")
            else:
                with lora.disable_adapter(model):
                    pass
        done.set()

    done = threading.Event()
    t = threading.Thread(target=switcher)
    t.start()
    try:
        worker = threading.Thread(target=operation)
        worker.start()
        worker.join(30)
        assert done.is_set(), f"{op} did not get the model's lock in 30 s while another thread switched"
    finally:
        stop.set()
        t.join(30)
    worker.join(30)


def test_a_block_end_that_cannot_merge_leaves_every_layer_unmerged_and_says_so(saved):
    # an adapter set inside the block whose lossless merge overflows (the embedding's update 300 times the
    # adapter's): the end merged the layers it could and raised, leaving a mix; now none, with the block named
    from lora_ext.lossless import ExceptionOverflow
    model = _model(saved, torch.bfloat16)
    lora.load_peft_adapter(model, saved, "big", activate=False)
    emb = model.model.embed_tokens
    with torch.no_grad():
        emb.get_adapter("big")[0].mul_(300)
    emb.check_values("big")
    with pytest.raises(ExceptionOverflow, match="disable_adapter: at the block's end the layers could not all be "
                                                "merged again, so none is"):
        with lora.disable_adapter(model):
            lora.set_adapter(model, "big")
    assert not any(m.merged for m in lora_layers_of(model)) and lora.active_adapter(model) == "big"
    assert not any(m._adapter_off for m in lora_layers_of(model))
    with pytest.raises(ExceptionOverflow):  # outside a block, as before: refused up front, nothing changed
        lora.merge_adapter(model)
    assert not any(m.merged for m in lora_layers_of(model))


def test_a_refused_switch_or_merge_names_the_layer_by_its_path(saved):
    # a model's switch or merge refused by one layer (a lossless merge's exception overflow) named it by its
    # constructor only ("Embedding(50, 16)"), which several layers of a model share (the twentieth session's helper)
    from lora_ext.lossless import ExceptionOverflow
    model = _model(saved, torch.bfloat16)
    lora.load_peft_adapter(model, saved, "big", activate=False)
    with torch.no_grad():
        model.model.embed_tokens.get_adapter("big")[0].mul_(300)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ExceptionOverflow, match=r"^layer 'model\.embed_tokens': Embedding\("):
        lora.set_adapter(model, "big")
    assert lora.active_adapter(model) == "a"
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    lora.unmerge_adapter(model)
    lora.set_adapter(model, "big")
    with pytest.raises(ExceptionOverflow, match=r"^layer 'model\.embed_tokens': Embedding\("):
        lora.merge_adapter(model)
    assert not any(m.merged for m in lora_layers_of(model))


def _two_adapters(saved):
    """(a model holding adapters a (active, merged) and b, a one-row input) for the lock's liveness tests."""
    model = _model(saved)
    lora.load_peft_adapter(model, saved, "b", activate=False)
    return model, torch.zeros(1, 3, dtype=torch.long)


def _finishes(fn, seconds=30):
    """Runs fn on a thread; whether it finished within `seconds` (a liveness bound, not a timing)."""
    done = threading.Event()

    def run():
        fn()
        done.set()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join(seconds)
    return done.is_set()


def test_a_thread_whose_forward_was_interrupted_queues_behind_waiting_writers(saved):
    # a KeyboardInterrupt inside a forward skips torch's forward hooks, leaving the thread's read; its later
    # forwards then passed every waiting writer as re-entrant reads: a switch waited as long as it kept forwarding
    model, x = _two_adapters(saved)
    stop = threading.Event()

    def forwarder():
        state = {"raise": True}

        def interrupt(module, args):
            if state.pop("raise", False):
                raise KeyboardInterrupt
        handle = model.model.layers[0].register_forward_pre_hook(interrupt)
        try:
            _logits(model, x)
        except KeyboardInterrupt:
            pass
        handle.remove()
        assert model_lock_reads(model)  # the read was left behind
        while not stop.is_set():
            _logits(model, x)

    t = threading.Thread(target=forwarder)
    t.start()
    try:
        time.sleep(0.5)
        assert _finishes(lambda: [lora.set_adapter(model, n) for n in ("b", "a", "b")])
    finally:
        stop.set()
        t.join(30)


def model_lock_reads(model):
    from lora_ext.serving.adapters import model_lock
    return dict(model_lock(model)._reads)


def test_holds_one_after_another_on_other_threads_do_not_starve_a_switch(saved):
    # a new hold() passed waiting writers while any hold was open: two threads holding in turn kept it open for ever
    model, x = _two_adapters(saved)
    stop = threading.Event()

    def holder():
        while not stop.is_set():
            with lora.hold(model):
                _logits(model, x)

    threads = [threading.Thread(target=holder) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        assert _finishes(lambda: [lora.set_adapter(model, n) for n in ("b", "a", "b")])
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_a_hold_on_the_worker_of_an_open_hold_is_not_kept_waiting_for_ever(saved):
    # a hold whose block waits for a worker thread that opens a hold of its own (a library wrapping generate() in
    # hold() on its worker), while a switch waits: the worker's hold queues behind the switch only for
    # HOLD_QUEUE_SECONDS (the switch waits for the outer hold, which waits for the worker: no deadlock)
    model, x = _two_adapters(saved)
    switching = threading.Event()

    def serve():
        with lora.hold(model):
            switcher = threading.Thread(target=lambda: (switching.set(), lora.set_adapter(model, "b")))
            switcher.start()
            switching.wait()
            time.sleep(0.2)  # the switch now waits for this hold

            def worker():
                with lora.hold(model):
                    _logits(model, x)
            w = threading.Thread(target=worker)
            w.start()
            w.join(30)
            assert not w.is_alive()
        switcher.join(30)
        assert not switcher.is_alive() and lora.active_adapter(model) == "b"

    assert _finishes(serve)


def test_ctrl_c_during_the_entry_is_undone_by_the_blocks_end(saved, python_sigint, monkeypatch):
    # (found in the read-through) a Ctrl-C while the entry unmerged was delivered after the flags were set and
    # before the block's try: the end never ran and the model stayed disabled
    import os
    import signal
    x = torch.randint(0, VOCAB, (2, 6))
    model = _model(saved)
    adapted = _logits(model, x)
    real = lora.LoRALayer.unmerge
    calls = []

    def unmerge(self):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # held back until the entry is whole
        calls.append(self)
        return real(self)

    monkeypatch.setattr(lora.LoRALayer, "unmerge", unmerge)
    with pytest.raises(KeyboardInterrupt):
        with lora.disable_adapter(model):
            raise AssertionError("the block's body must not run")
    monkeypatch.undo()
    assert len(calls) == len(lora_layers_of(model))  # the entry ran whole before the Ctrl-C landed
    assert all(m.merged and not m._adapter_off for m in lora_layers_of(model))
    from lora_ext.serving.injection import DISABLED
    assert model not in DISABLED
    assert rel_err(_logits(model, x), adapted) < 1e-6
    lora.load_peft_adapter(model, saved, "b", activate=False)  # not refused as inside a block
