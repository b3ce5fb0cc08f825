"""Sixteenth session's findings. A weight set back after `layer.weight = None` is recognised as the merged one by
the memory it lies in; that memory may have been freed and handed to a new tensor in between (the flaky CI failure
of test_weight_replaced.test_no_weight_then_a_new_one: 1 run in ~500 took a new base for the merged weight, and the
unmerge then subtracted the adapter from a weight that never held it). Copies of a layer note their own weight."""
import copy
import gc
import pickle
import sys
import threading
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from lora_ext.serving import adapters
from helpers import rel_err, same_bits
from test_weight_replaced import build, check_forward


def _landing_at(address, shape=(6, 8)):
    """(a new tensor of `shape` allocated at `address`, or None; the tensors allocated on the way, to be kept)."""
    held = []
    for _ in range(64):
        t = torch.empty(shape)
        if t.untyped_storage().data_ptr() == address:
            return t, held
        held.append(t)
    return None, held


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_recognises_its_own_merged_weight_put_back(how):
    layer, x, key = build("linear", torch.float32)
    layer.eval()
    merged_w = layer.weight.detach().clone()
    replica = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert replica.merged
    w = replica.weight
    replica.weight = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own merged weight, put back: no "replaced" warning
        replica.weight = w
    assert replica.merged
    replica.train()
    layer.train()
    assert same_bits(replica.weight.detach(), layer.weight.detach())  # the adapter taken out once, as the original
    assert not same_bits(replica.weight.detach(), merged_w)


def _tiny_two_adapter_model():
    model = nn.Sequential(lora.Linear(4, 4, r=2), lora.Linear(4, 4, r=2))
    for m in model:
        m.add_adapter("b", torch.randn(2, 4), torch.randn(4, 2), 1.0)
    return model


@pytest.mark.parametrize("where", ["enter", "exit"])
@pytest.mark.parametrize("op", ["forward", "set_adapter", "hold"])
def test_a_ctrl_c_at_the_model_lock_s_edges_does_not_leave_it_held(op, where):
    """A KeyboardInterrupt that lands where Python code runs between taking the model lock's mutex and its block
    (Condition.__enter__ returning) or between the block and letting it go (Condition.__exit__ starting) left the
    mutex held: every other thread's forward or switch then waited for ever. A trace function stands in for the
    signal, raising at the first such point; the lock's blocks take the mutex itself now (C-level enter and exit)."""
    model = _tiny_two_adapter_model()
    lock = adapters.model_lock(model)
    x = torch.randn(2, 4)
    fired = []

    def tracer(frame, event, arg):
        code = frame.f_code
        if not fired and code.co_filename == threading.__file__ and frame.f_locals.get("self") is lock._cond and (
                (where == "enter" and code.co_name == "__enter__" and event == "return")
                or (where == "exit" and code.co_name == "__exit__" and event == "call")):
            fired.append(event)
            raise KeyboardInterrupt
        return tracer

    def run():
        if op == "forward":
            with torch.no_grad():
                model(x)
        elif op == "set_adapter":
            lora.set_adapter(model, "b")
        else:
            with lora.hold(model):
                pass

    sys.settrace(tracer)
    try:
        run()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    for m in model:  # (a switch cut short may have left either adapter active: both are fine here)
        assert m.active_adapter in ("default", "b")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (lora.set_adapter(model, "default"), done.set()), daemon=True)
    worker.start()
    assert done.wait(30), "a switch on another thread waits for ever: the model lock was left held"
    with torch.no_grad():
        model(x)


# the hostile audit of the record (what a layer's last write left): a region of a live storage, a storage whose
# memory was released or moved, a subclass's own __getstate__

def _put_back(layer, param):
    """Sets `param` after `weight = None`; the warnings given."""
    layer.weight = None
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        layer.weight = param
    return [str(w.message) for w in given]


def test_another_region_of_the_merged_weight_s_storage_is_a_base():
    """Weights that are views of one flat buffer: another region of it is another tensor (it was taken for the
    merged weight: same storage address)."""
    layer, x, key = build("linear", torch.float32)
    flat = torch.empty(96)
    flat[:48] = layer.weight.detach().reshape(-1)
    other = torch.randn(48)
    flat[48:] = other
    layer.weight = nn.Parameter(flat[:48].view(6, 8))
    layer.eval()
    assert layer.merged
    given = _put_back(layer, nn.Parameter(flat[48:].view(6, 8)))
    assert any("weight was replaced" in g for g in given) and not layer.merged
    check_forward(layer, key, other.view(6, 8), x, torch.float32)
    layer.train()
    assert same_bits(layer.weight.detach(), other.view(6, 8))


def test_the_merged_weight_s_view_put_back_keeps_the_merge():
    layer, x, key = build("linear", torch.float32)
    layer.train()
    base = layer.weight.detach().clone()
    layer.eval()
    w = layer.weight
    assert _put_back(layer, nn.Parameter(w.data.view(48).view(6, 8))) == [] and layer.merged
    check_forward(layer, key, base, x, torch.float32)
    layer.train()
    assert rel_err(layer.weight.detach(), base) < 1e-6


@pytest.mark.parametrize("how", ["freed", "resize", "share_memory"])
def test_a_new_base_where_the_merged_weight_s_memory_was_is_a_base(how):
    """The merged weight's memory went: the weight freed (`weight = None`, nothing else holding it: the CI failure), or
    held (an optimizer, the caller) while storage.resize_(0) released its memory (FSDP1 frees flat parameters so) or
    share_memory_() moved it (torch.multiprocessing sending the model). A new base allocated at the old address was
    taken for the merged weight."""
    exercised = 0
    for _ in range(200):
        layer, x, key = build("linear", torch.float32)
        layer.eval()
        w = layer.weight
        address = w.untyped_storage().data_ptr()
        if how == "freed":
            layer.weight = None
            del w
        elif how == "resize":
            layer.weight = None
            w.untyped_storage().resize_(0)
        else:
            w.share_memory_()
        gc.collect()
        new, held = _landing_at(address)
        if new is None:
            continue
        exercised += 1
        base = torch.randn(6, 8)
        new.copy_(base)
        given = _put_back(layer, nn.Parameter(new))
        assert any("weight was replaced" in g for g in given) and not layer.merged
        check_forward(layer, key, base, x, torch.float32)
        layer.train()
        assert same_bits(layer.weight.detach(), base)
        if exercised == 3:
            break
    assert exercised, "no new tensor landed at the old address in 200 tries: the case was never exercised"


def test_the_merged_weight_put_back_after_share_memory_keeps_the_merge():
    """share_memory_() moves the memory under the same storage: the layer's own merged weight put back is still
    recognised (it was warned about and taken for a base: the adapter then served twice)."""
    layer, x, key = build("linear", torch.float32)
    layer.train()
    base = layer.weight.detach().clone()
    layer.eval()
    w = layer.weight
    w.share_memory_()
    assert _put_back(layer, w) == [] and layer.merged
    check_forward(layer, key, base, x, torch.float32)
    layer.train()
    assert rel_err(layer.weight.detach(), base) < 1e-6


class _OwnState(lora.Linear):
    """The usual __getstate__ of a subclass: its __dict__ copied whole, the lock left out."""

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_streams", None)
        return state


def test_copies_of_a_subclass_with_its_own_getstate_leave_the_weight_alone():
    """Its copies carried the record's storage reference: copied, then dropped, each released a reference it never
    took on the original weight's storage (two deepcopies freed the live merged weight's memory)."""
    layer = _OwnState(64, 64, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    before = layer.weight.detach().clone()
    replicas = []
    for _ in range(4):
        replica = copy.deepcopy(layer)
        assert replica.merged and same_bits(replica.weight.detach(), before)
        w = replica.weight
        assert _put_back(replica, w) == [] and replica.merged  # a copy recognises its own weight
        del replica, w
        gc.collect()
    replicas.append(pickle.loads(pickle.dumps(layer)))
    junk = [torch.randn(64, 64) for _ in range(32)]  # (what would land in freed memory)
    assert same_bits(layer.weight.detach(), before)
    assert len(junk) == 32 and replicas[0].merged


# a load whose activation is refused leaves the model as it was (the docstring's promise; it left the adapter in the
# layers, its new layers, copies of modules saved whole and rows of tokens, inactive)

def test_a_load_refused_at_activation_takes_back_everything_it_added(tmp_path):
    from peft import LoraConfig, get_peft_model
    from helpers import save_random_peft
    from test_session_hostile12 import _merged_bfloat16_llama
    from tiny_models import llama
    first = save_random_peft(get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
                             tmp_path / "a", seed=1, std=0.05)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], modules_to_save=["lm_head"],
                        trainable_token_indices=[3, 5])
    more = get_peft_model(llama(), config)
    save_random_peft(more, tmp_path / "c", seed=2, std=0.05, parts=("lora_", "modules_to_save", "trainable_tokens"))
    good = str(tmp_path / "c")
    with torch.no_grad():  # the last q_proj's lossless swap overflows: the activation is refused
        more.get_parameter("base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight").mul_(3e3)
    more.save_pretrained(str(tmp_path / "bad"))
    model, ids, before = _merged_bfloat16_llama(first)
    modules = list(model.named_modules())
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    with pytest.raises(ValueError):
        lora.load_peft_adapter(model, str(tmp_path / "bad"), "c", activate=True)
    assert lora.adapter_names(model) == ["a"]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in modules]
    assert all(model.get_submodule(n) is m for n, m in modules if n)  # no new layer, wrapper or copy stays
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # and the same name loads (the good file) as into a model that never saw the refused one
    lora.load_peft_adapter(model, good, "c", activate=True)
    fresh, _, _ = _merged_bfloat16_llama(first)
    lora.load_peft_adapter(fresh, good, "c", activate=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


# the hostile helper's findings on the take-back (2aa6e50): every step of the locked section is taken back, each
# take-back step runs when one before it fails, a trained inactive adapter keeps its own Parameters, and a layer taken
# back lets go of the module's weight

def _peft_files(tmp_path, **named_targets):
    from peft import LoraConfig, get_peft_model
    from helpers import save_random_peft
    from tiny_models import llama
    paths = {}
    for i, (name, (targets, r, extra)) in enumerate(sorted(named_targets.items())):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **extra)
        parts = ("lora_", "modules_to_save") if "modules_to_save" in extra else ("lora_",)
        paths[name] = save_random_peft(get_peft_model(llama(), config), tmp_path / name, seed=i + 1, std=0.05,
                                       parts=parts)
    return paths


def _state(model):
    """Everything a take-back must give back: the state dict's bits, the module and Parameter objects at every name,
    the flags, each layer's adapters (values and objects) and the adapter names."""
    from lora_ext.serving import lora_layers
    return dict(
        sd={k: v.detach().clone() for k, v in model.state_dict().items()},
        modules=[(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        params=[(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        layers={n: (m.active_adapter, {a: tuple(t.detach().clone() if torch.is_tensor(t) else t
                                                for t in m.get_adapter(a)) for a in m.adapter_names},
                    {a: tuple(id(t) for t in m.get_adapter(a)[:2]) for a in m.adapter_names
                     if isinstance(m.get_adapter(a)[0], nn.Parameter)})  # (objects an optimizer may hold)
                for n, m in lora_layers(model)},
        names=lora.adapter_names(model))


def _failing_at(monkeypatch, target, attr, call, exc):
    """Makes target.attr raise a fresh `exc` (a type and message) at its call-th call (from 1), else run."""
    real, calls = getattr(target, attr), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise exc[0](exc[1])
        return real(*args, **kwargs)
    monkeypatch.setattr(target, attr, failing)


def _same_state(a, b):
    assert a["modules"] == b["modules"] and a["params"] == b["params"] and a["names"] == b["names"]
    assert a["sd"].keys() == b["sd"].keys() and all(same_bits(a["sd"][k], b["sd"][k]) for k in a["sd"])
    assert a["layers"].keys() == b["layers"].keys()
    for n in a["layers"]:
        (act_a, vals_a, ids_a), (act_b, vals_b, ids_b) = a["layers"][n], b["layers"][n]
        assert act_a == act_b and ids_a == ids_b and vals_a.keys() == vals_b.keys(), n
        for name in vals_a:
            assert same_bits(vals_a[name][0], vals_b[name][0]) and same_bits(vals_a[name][1], vals_b[name][1])
            assert vals_a[name][2] == vals_b[name][2]


@pytest.mark.parametrize("where", ["install", "reserve", "activation"])
def test_a_load_failing_at_any_step_of_its_writes_is_taken_back(tmp_path, monkeypatch, where):
    """Out of memory allocating a new layer's factors (install) or padding it to a reserved rank, not only at the
    activation: before, the load neither finished nor took anything back (new layers serving the reloaded adapter
    beside layers serving another; the reloaded adapter's old values lost)."""
    from lora_ext.serving import adapters as serving_adapters
    from lora_ext.serving import injection
    from tiny_models import llama, tokens
    paths = _peft_files(tmp_path, a=(["q_proj", "v_proj"], 4, {}), b=(["q_proj", "v_proj"], 4, {}),
                        c=(["q_proj", "v_proj", "o_proj"], 4, {"modules_to_save": ["lm_head"]}))
    model = llama()
    lora.load_peft_adapter(model, paths["a"], "a")
    lora.load_peft_adapter(model, paths["b"], "b", activate=False)
    if where == "reserve":
        lora.reserve_rank(model, 8)
    model.eval()
    ids = tokens()
    before = _state(model)
    with torch.no_grad():
        out = model(ids).logits
    target, attr = {"install": (injection, "install"), "reserve": (lora.LoRALayer, "_reserve"),
                    "activation": (serving_adapters, "_set_adapter")}[where]
    _failing_at(monkeypatch, target, attr, 1 if where == "activation" else 2,
                (torch.OutOfMemoryError, "out of memory (injected)"))
    with pytest.raises(torch.OutOfMemoryError):
        lora.load_peft_adapter(model, paths["c"], "b", activate=True)  # a reload of inactive b, new o_proj and lm_head
    monkeypatch.undo()
    _same_state(before, _state(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)


def test_a_take_back_that_fails_at_one_layer_still_takes_the_rest_back(tmp_path, monkeypatch):
    """One layer's put-back failing skipped the rest: the new layers stayed, serving the refused adapter (active,
    beside layers serving another), and the note said 'inactive' and pointed at a delete_adapter that was refused."""
    from lora_ext.serving import adapters as serving_adapters
    from lora_ext.serving import peft_io
    from tiny_models import llama, tokens
    paths = _peft_files(tmp_path, a=(["q_proj", "v_proj"], 4, {}), c=(["q_proj", "v_proj", "o_proj"], 4, {}))
    model = llama()
    lora.load_peft_adapter(model, paths["a"], "a")
    lora.load_peft_adapter(model, paths["a"], "c", activate=False)  # c already in q/v: the load writes there first
    model.eval()
    ids = tokens()
    with torch.no_grad():
        out = model(ids).logits
    _failing_at(monkeypatch, peft_io, "_put_back", 2, (torch.OutOfMemoryError, "out of memory putting a layer back"))
    _failing_at(monkeypatch, serving_adapters, "_set_adapter", 1, (ValueError, "activation refused (injected)"))
    with pytest.raises(ValueError) as caught:
        lora.load_peft_adapter(model, paths["c"], "c", activate=True)
    monkeypatch.undo()
    assert any("taking the load of adapter 'c' back failed too" in n for n in caught.value.__notes__)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("o_proj"))  # new layers gone
    assert lora.active_adapter(model) == "a"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)
    lora.delete_adapter(model, "c")  # (what the note's layer may still hold goes so)
    assert lora.adapter_names(model) == ["a"]


def test_a_trained_inactive_adapter_keeps_its_own_parameters_when_a_rank_changing_reload_is_taken_back(tmp_path,
                                                                                                     monkeypatch):
    from lora_ext.serving import adapters as serving_adapters
    from tiny_models import llama
    paths = _peft_files(tmp_path, a=(["q_proj"], 4, {}), b=(["q_proj", "o_proj"], 4, {}),
                        b8=(["q_proj", "o_proj"], 8, {}))
    model = llama().train()
    lora.load_peft_adapter(model, paths["a"], "a", is_trainable=True)
    lora.load_peft_adapter(model, paths["b"], "b", activate=False, is_trainable=True)
    layer = model.model.layers[0].self_attn.o_proj
    A, B, _ = layer.get_adapter("b")
    values = A.detach().clone(), B.detach().clone()
    assert isinstance(A, nn.Parameter)

    _failing_at(monkeypatch, serving_adapters, "_set_adapter", 1, (RuntimeError, "activation refused (injected)"))
    with pytest.raises(RuntimeError):
        lora.load_peft_adapter(model, paths["b8"], "b", activate=True, is_trainable=True)
    monkeypatch.undo()
    A2, B2, _ = layer.get_adapter("b")
    assert A2 is A and B2 is B and A.requires_grad  # an optimizer built over them trains b on
    assert same_bits(A.detach(), values[0]) and same_bits(B.detach(), values[1])
    lora.set_adapter(model, "b")
    assert layer.lora_A is A


def test_a_layer_taken_back_lets_go_of_the_module_s_weight(tmp_path):
    """Kept alive by the error's traceback (a caller keeping the error), the layer the load injected and took back
    still held the module's weight: the layer the next load put there counted it as sharing that weight and would
    not merge."""
    from peft import LoraConfig, get_peft_model
    from helpers import save_random_peft
    from test_session_hostile12 import _merged_bfloat16_llama
    from tiny_models import llama
    first = save_random_peft(get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
                             tmp_path / "a", seed=1, std=0.05)
    more = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    good = save_random_peft(more, tmp_path / "c", seed=2, std=0.05)
    with torch.no_grad():  # the last q_proj's lossless swap overflows: the activation is refused
        more.get_parameter("base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight").mul_(3e3)
    more.save_pretrained(str(tmp_path / "bad"))
    model, ids, _ = _merged_bfloat16_llama(first)
    with pytest.raises(ValueError) as kept:  # (kept: its traceback holds the load's frames)
        lora.load_peft_adapter(model, str(tmp_path / "bad"), "c", activate=True)
    lora.load_peft_adapter(model, good, "c", activate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "its weight is shared with ..." warning
        model.train()
        model.eval()
    assert all(m.merged for n, m in lora.serving.lora_layers(model))
    assert kept.value is not None


def test_a_mixed_batch_refuses_a_relative_position_bias_saved_whole(tmp_path):
    """The zoo helper's T5 finding: an adapter saving relative_attention_bias whole (modules_to_save) was served in a
    mixed batch, its (query, key) bucket matrix split as rows when the query length equals the rows: every row wrong
    (0.28 off alone); refused as for a LoRA layer on it."""
    from test_session_hostile11 import _saved_adapters, _t5
    model = _saved_adapters(tmp_path, _t5, target_modules=["q"], modules_to_save=["relative_attention_bias"])
    with torch.no_grad(), pytest.raises(ValueError, match=r"module 'encoder.block.0.layer.0.SelfAttention."
                                                          r"relative_attention_bias' \(a relative position bias\).*"
                                                          r"adapter 'a' saves it whole"):
        with lora.batch_adapters(model, ["a", "b", None]):
            pass
    with torch.no_grad(), lora.batch_adapters(model, [None, None]):  # (no row's adapter has a copy of it: served)
        x = torch.randint(2, 60, (2, 2))
        model(input_ids=x, decoder_input_ids=x)


def test_a_mixed_batch_serves_a_model_that_flattens_its_rows_tokens(tmp_path):
    """OPT's MLP takes (rows * tokens, d): a mixed batch refused it (with a hint about num_beams); the rows' tokens
    flattened row after row, as the model's input gave them, are served now (prefill and kv-cache decode)."""
    from test_session_hostile17 import opt_with_adapters
    model = opt_with_adapters(tmp_path, std=0.1)
    model.eval()  # (a merged: the other rows take it out)
    rows = ["a", "b", None, "a"]
    ids = torch.randint(3, 100, (4, 6))
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            lora.set_adapter(model, name)
            alone[name] = (model(ids).logits, model.generate(ids, max_new_tokens=4, do_sample=False))
        with lora.disable_adapter(model):
            alone[None] = (model(ids).logits, model.generate(ids, max_new_tokens=4, do_sample=False))
        lora.set_adapter(model, "a")
        with lora.batch_adapters(model, rows):
            mixed = model(ids).logits
            generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(rows):
        assert rel_err(mixed[i], alone[name][0][i]) < 1e-5, (i, name)
        assert torch.equal(generated[i], alone[name][1][i]), (i, name)


def test_a_layer_given_the_rows_tokens_in_another_order_is_refused():
    """Only modules known to flatten row after row (batches._FLATTENS_ROWS, OPT's decoder layer) are served a 1-D
    input of rows * tokens: a module flattening token-major gave every row another's adapter (2.5 off) once any
    such input was served (the batch-flatten helper)."""

    class TokenMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.fc = lora.Linear(8, 8, r=2)

        def forward(self, ids):
            h = self.embed(ids)
            return self.fc(h.transpose(0, 1).reshape(-1, 8))  # tokens first, then rows

    model = TokenMajor().eval()
    model.fc.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    nn.init.normal_(model.fc.lora_B)
    with torch.no_grad(), lora.batch_adapters(model, ["default", "b"]):
        with pytest.raises(ValueError, match=r"layer 'fc' \(Linear\) got an input of shape \(6, 8\)"):
            model(torch.randint(0, 20, (2, 3)))


def test_a_mixed_batch_refuses_adapters_of_a_packed_patch_vision_tower(tmp_path):
    """Qwen2-VL's vision tower takes every image's patches packed, (patches, d), whatever row holds the image: rows
    got other rows' adapters (0.06 off) when the patches happened to number rows * tokens or rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from helpers import save_random_peft

    def vl():
        torch.manual_seed(0)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(
            text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                               temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
            image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)).eval()
    for i, (name, targets) in enumerate({"a": ["qkv", "q_proj"], "b": ["q_proj"]}.items()):
        save_random_peft(get_peft_model(vl(), LoraConfig(r=2, lora_alpha=4, target_modules=targets)),
                         tmp_path / name, seed=i + 1, std=0.05)
    model = vl()
    lora.load_peft_adapter(model, str(tmp_path / "a"), "a")
    lora.load_peft_adapter(model, str(tmp_path / "b"), "b", activate=False)
    with pytest.raises(ValueError, match=r"layer 'model.visual.blocks.0.attn.qkv' is inside a "
                                         r"Qwen2VisionTransformerPretrainedModel.*adapter 'a' targets it"):
        with lora.batch_adapters(model, ["a", "b"]):
            pass
    with lora.batch_adapters(model, ["b", None]):  # (adapters of the language model alone: served)
        pass


def test_a_mixed_batch_refuses_longformer_s_time_major_attention():
    """LongformerSelfAttention runs its query/key/value time-major, (T, B, d): with T equal to the rows every row was
    served another's adapter (0.01 off); refused by name, as XLNet and FSMT are."""
    from transformers import LongformerConfig, LongformerModel
    model = LongformerModel(LongformerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=64, attention_window=4, max_position_embeddings=64,
                                             pad_token_id=1)).eval()
    lora.inject(model, ["query", "value"], r=2)
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self' is a LongformerSelfAttention, whose "
                                         r"layers take time-major inputs"):
        with lora.batch_adapters(model, ["default", None]):
            pass
