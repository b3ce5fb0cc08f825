"""peft's modules_to_save (every SEQ_CLS adapter saves its `score` / `classifier` head whole), against the real peft:
loads, switches, deletes, saves, unloads and `lora-ext merge` give what peft gives; the original module is never
written; whatever lora_ext cannot honour is refused before anything changes."""
import copy
import json
import os
import signal
import threading

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

import lora_ext
from helpers import edit_adapter_config
from lora_ext.serving.merge_cli import MergeError, merge_checkpoint
from tiny_models import snapshot, unchanged

KEY = "base_model.model."


class Net(nn.Module):
    """A body LoRA adapts and a head an adapter replaces whole."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.proj(self.body(x))))


def llama_cls(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def roberta_cls(seed=0):
    """Its `classifier` is a RobertaClassificationHead: a module with modules inside, saved whole."""
    torch.manual_seed(seed)
    cfg = RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100, num_labels=3, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return RobertaForSequenceClassification(cfg).eval()


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.5)
    return model


def _peft_file(tmp_path, build, name, seed, **kwargs):
    peft_model = _randomize(get_peft_model(build(), LoraConfig(**kwargs)), seed).eval()
    path = str(tmp_path / name)
    peft_model.save_pretrained(path)
    return path


def _net_adapter(tmp_path, name="a", seed=1, **kwargs):
    options = dict(r=2, lora_alpha=4, target_modules=["proj", "body.0"], modules_to_save=["head"])
    return _peft_file(tmp_path, Net, name, seed, **{**options, **kwargs})


def _x():
    return torch.randn(4, 16)


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids():
    return torch.randint(1, 100, (2, 9))


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("build,targets", [(llama_cls, ["q_proj", "v_proj"]), (roberta_cls, ["query", "value"])],
                         ids=["llama-score", "roberta-classifier"])
def test_seq_cls_adapters_serve_as_in_peft(tmp_path, build, targets):
    path = _peft_file(tmp_path, build, "cls", 3, task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=targets)
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["modules_to_save"]  # peft adds its classifier names for SEQ_CLS
    ids = _ids()
    ref = _logits(PeftModel.from_pretrained(build(), path).eval(), ids)
    model = build()
    head_name = "score" if build is llama_cls else "classifier"
    head = model.get_submodule(head_name)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    names = lora_ext.load_peft_adapter(model, path)
    assert head_name in names
    wrapper = model.get_submodule(head_name)
    assert isinstance(wrapper, lora_ext.ModulesToSave) and wrapper.original_module is head
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-6)
    # the copy holds the file's values exactly; the model's own head is untouched, bit for bit
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    for k, v in wrapper.modules_to_save["default"].state_dict().items():
        assert torch.equal(v, saved[KEY + head_name + "." + k])
    assert all(torch.equal(head.state_dict()[k], v) for k, v in head_before.items())
    # nothing inside the head is a LoRA layer (peft keeps LoRA off the modules it saves)
    assert not any(isinstance(m, lora_ext.LoRALayer) for m in wrapper.modules())
    model.eval()  # merged
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-6)


def test_switching_and_deleting_follow_peft_with_an_adapter_that_saves_no_module(tmp_path):
    a = _net_adapter(tmp_path, "a", seed=1)
    b = _net_adapter(tmp_path, "b", seed=2)
    c = _net_adapter(tmp_path, "c", seed=3, modules_to_save=None)  # serves the model's own head
    peft_model = PeftModel.from_pretrained(Net(), a, adapter_name="a")
    peft_model.load_adapter(b, adapter_name="b")
    peft_model.load_adapter(c, adapter_name="c")
    peft_model.eval()
    model = Net()
    for name, path in (("a", a), ("b", b), ("c", c)):
        lora_ext.load_peft_adapter(model, path, adapter_name=name, activate=False)
    x = _x()
    for name in ("b", "c", "a", "c", "b"):
        peft_model.set_adapter(name)
        lora_ext.set_adapter(model, name)
        assert model.head.active_adapter == (None if name == "c" else name)
        torch.testing.assert_close(_out(model, x), _out(peft_model, x), rtol=1e-5, atol=1e-6)
    assert sorted(model.head.adapter_names) == ["a", "b"]
    lora_ext.delete_adapter(model, "a")
    assert model.head.adapter_names == ["b"]
    with pytest.raises(KeyError):
        lora_ext.set_adapter(model, "a")
    assert model.head.active_adapter == "b"


def test_loading_under_the_active_name_replaces_the_copy_and_serves_it(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1))
    second = _net_adapter(tmp_path, "a2", seed=5)
    lora_ext.load_peft_adapter(model, second)  # "default" again
    x = _x()
    torch.testing.assert_close(_out(model, x), _out(PeftModel.from_pretrained(Net(), second).eval(), x),
                               rtol=1e-5, atol=1e-6)


def test_round_trip_through_save_peft_adapter(tmp_path):
    path = _net_adapter(tmp_path)
    model = Net()
    lora_ext.load_peft_adapter(model, path, adapter_name="mine")
    x = _x()
    expected = _out(model, x)
    out = str(tmp_path / "saved")
    lora_ext.save_peft_adapter(model, out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["modules_to_save"] == ["head"]
    assert set(load_file(os.path.join(out, "adapter_model.safetensors"))) >= {KEY + "head.weight", KEY + "head.bias"}
    torch.testing.assert_close(_out(PeftModel.from_pretrained(Net(), out).eval(), x), expected, rtol=1e-5, atol=1e-6)
    again = Net()
    lora_ext.load_peft_adapter(again, out)
    torch.testing.assert_close(_out(again, x), expected, rtol=1e-5, atol=1e-6)


def test_a_saved_adapter_reaches_no_module_inside_another_adapters_saved_module(tmp_path):
    """save_peft_adapter lists the plain model's names inside a module another adapter saves whole (`classifier.dense`
    beside the top-level `dense`): the written target_modules must not reach it (a hostile pass found one that did)."""
    import collections

    class Cls(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.dense = nn.Linear(16, 16)
            self.classifier = nn.Sequential(collections.OrderedDict(dense=nn.Linear(16, 16), out=nn.Linear(16, 3)))

        def forward(self, x):
            return self.classifier(torch.relu(self.dense(x)))

    a = _peft_file(tmp_path, Cls, "a", 1, r=2, target_modules="dense", modules_to_save=["classifier"])
    b = _peft_file(tmp_path, Cls, "b", 2, r=2, target_modules="dense")
    model = Cls()
    lora_ext.load_peft_adapter(model, a, "a")
    lora_ext.load_peft_adapter(model, b, "b")
    x = torch.randn(3, 16)
    lora_ext.set_adapter(model, "b")
    expected = _out(model, x)
    out = str(tmp_path / "out")
    lora_ext.save_peft_adapter(model, out, "b")
    peft_model = PeftModel.from_pretrained(Cls(), out).eval()
    assert not any(n.endswith("classifier.dense") and hasattr(m, "lora_A") for n, m in peft_model.named_modules())
    torch.testing.assert_close(_out(peft_model, x), expected, rtol=1e-5, atol=1e-6)
    again = Cls()
    lora_ext.load_peft_adapter(again, out)
    torch.testing.assert_close(_out(again, x), expected, rtol=1e-5, atol=1e-6)


def test_save_refuses_a_module_name_peft_would_match_elsewhere(tmp_path):
    class Two(Net):
        def __init__(self):
            super().__init__()
            self.subhead = nn.Linear(5, 5)  # ends with "head" too

        def forward(self, x):
            return self.subhead(super().forward(x))

    path = _peft_file(tmp_path, Two, "two", 1, r=2, target_modules=["proj"], modules_to_save=["head"])
    model = Two()
    lora_ext.load_peft_adapter(model, path)  # peft's rule saves both: loaded as such
    assert isinstance(model.head, lora_ext.ModulesToSave) and isinstance(model.subhead, lora_ext.ModulesToSave)
    x = _x()
    torch.testing.assert_close(_out(model, x), _out(PeftModel.from_pretrained(Two(), path).eval(), x),
                               rtol=1e-5, atol=1e-6)
    out = str(tmp_path / "out")
    lora_ext.save_peft_adapter(model, out)  # both saved: peft's rule over ["head", "subhead"] chooses the same two
    torch.testing.assert_close(_out(PeftModel.from_pretrained(Two(), out).eval(), x), _out(model, x),
                               rtol=1e-5, atol=1e-6)
    model.subhead = model.subhead.original_module  # now the adapter saves head alone: peft's "head" would take both
    with pytest.raises(ValueError, match="would also save 'subhead'"):
        lora_ext.save_peft_adapter(model, str(tmp_path / "out2"))


@pytest.mark.parametrize("merge", [True, False])
def test_unload_puts_back_the_active_copy_as_peft_does(tmp_path, merge):
    """peft's merge_and_unload and unload both keep the active adapter's copy of a module saved whole (a hostile
    pass found unload(merge=False) putting back the original)."""
    path = _net_adapter(tmp_path)
    x = _x()
    peft_model = PeftModel.from_pretrained(Net(), path).eval()
    ref = _out(peft_model.merge_and_unload() if merge else peft_model.unload(), x)
    model = Net()
    head = model.head
    lora_ext.load_peft_adapter(model, path)
    names = lora_ext.unload(model, merge=merge)
    assert "head" in names and type(model.head) is nn.Linear and model.head is not head
    torch.testing.assert_close(_out(model, x), ref, rtol=1e-5, atol=1e-6)
    # an adapter without a copy active: the model's own module goes back
    other = Net()
    lora_ext.load_peft_adapter(other, path, adapter_name="a")
    lora_ext.load_peft_adapter(other, _net_adapter(tmp_path, "c", seed=3, modules_to_save=None), adapter_name="c")
    own = other.head.original_module
    lora_ext.unload(other, merge=merge)
    assert other.head is own


def test_unload_merged_unties_the_config_when_a_copy_took_an_embeddings_place(tmp_path):
    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                            tie_word_embeddings=True)).eval()

    path = _peft_file(tmp_path, llama, "emb", 2, r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    ref = PeftModel.from_pretrained(llama(), path).merge_and_unload()
    model = llama()
    lora_ext.load_peft_adapter(model, path)
    lora_ext.unload(model, merge=True)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False and ref.config.tie_word_embeddings is False
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    plain = llama()  # no copy: the flag stays
    lora_ext.load_peft_adapter(plain, _peft_file(tmp_path, llama, "q", 2, r=2, target_modules=["q_proj"]))
    lora_ext.unload(plain, merge=True)
    assert plain.config.tie_word_embeddings is True


# ------------------------------------------------------------------------------------------- refusals


def _damaged(path, change):
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("damage,match", [
    (lambda t: t.pop(KEY + "head.bias"), "incomplete module"),
    (lambda t: t.update({KEY + "head.extra": torch.zeros(3)}), "unexpected key 'base_model.model.head.extra'"),
    (lambda t: t.update({KEY + "head.weight": torch.zeros(6, 32)}), "has shape"),
    (lambda t: t[KEY + "head.weight"].__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda t: t.update({KEY + "head.bias": torch.zeros(5, dtype=torch.int64)}), "is torch.int64"),
], ids=["missing", "extra", "shape", "nan", "dtype"])
def test_a_bad_saved_module_is_refused_before_anything_changes(tmp_path, damage, match):
    path = _damaged(_net_adapter(tmp_path), damage)
    model = Net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora_ext.load_peft_adapter(model, path)
    assert unchanged(model, snap) and type(model.head) is nn.Linear
    assert not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())


@pytest.mark.parametrize("entries,match", [
    ("head", "must be a list of module names"),
    (["head", "body"], "unexpected key 'base_model.model.body.0.lora_A.weight'"),  # LoRA inside a saved module
    (["proj"], "lora_ext layer"),
    (["(head"], "breaks peft's regex"),
])
def test_modules_to_save_lora_ext_cannot_honour_are_refused(tmp_path, entries, match):
    path = _net_adapter(tmp_path)
    model = Net()
    if entries == ["proj"]:  # a LoRA target already injected by another adapter
        lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "other", modules_to_save=None), adapter_name="o")
    edit_adapter_config(path, modules_to_save=entries)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora_ext.load_peft_adapter(model, path, adapter_name="x")
    assert unchanged(model, snap) and type(model.head) is nn.Linear


def test_nested_modules_to_save_are_refused(tmp_path):
    path = _peft_file(tmp_path, roberta_cls, "cls", 3, task_type="SEQ_CLS", r=2, target_modules=["query"])
    edit_adapter_config(path, modules_to_save=["classifier", "dense"])
    model = roberta_cls()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="inside"):
        lora_ext.load_peft_adapter(model, path)
    assert unchanged(model, snap)


def test_an_adapter_name_moduledict_cannot_hold_is_refused(tmp_path):
    model = Net()
    with pytest.raises(ValueError, match="attribute of torch's ModuleDict"):
        lora_ext.load_peft_adapter(model, _net_adapter(tmp_path), adapter_name="keys")
    assert type(model.head) is nn.Linear


def test_a_copy_that_cannot_be_made_is_refused_before_anything_changes(tmp_path):
    class Head(nn.Linear):
        def __init__(self):
            super().__init__(32, 5)
            self.lock = threading.Lock()  # deepcopy cannot copy it (an out-of-memory copy fails at the same point)

    def net():
        model = Net()
        model.head = Head()
        return model

    path = _net_adapter(tmp_path)
    model = net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="module 'head' .* cannot be copied"):
        lora_ext.load_peft_adapter(model, path)
    assert unchanged(model, snap) and type(model.head) is Head
    assert not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())


def test_a_file_that_leaves_a_held_copy_half_replaced_is_refused(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a"), adapter_name="x")
    with pytest.raises(ValueError, match="half replaced"):
        lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "c", modules_to_save=None), adapter_name="x")
    assert model.head.adapter_names == ["x"]


# --------------------------------------------------------------------------------- switches under stress


def test_a_ctrl_c_during_a_switch_takes_the_saved_modules_back_too(tmp_path, python_sigint):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    x = _x()
    before = _out(model, x)
    layer = model.proj
    real = layer.set_adapter

    def interrupted(name):
        real(name)
        os.kill(os.getpid(), signal.SIGINT)  # lands when the whole switch is done: every part goes back

    layer.set_adapter = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            lora_ext.set_adapter(model, "b")
    finally:
        del layer.__dict__["set_adapter"]
    assert model.head.active_adapter == "a" and lora_ext.active_adapter(model) == "a"
    assert torch.equal(_out(model, x), before)


def test_forwards_on_threads_see_one_adapter_with_its_own_head(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    x = _x()
    refs = {}
    for name in ("a", "b"):
        lora_ext.set_adapter(model, name)
        refs[name] = _out(model, x)
    assert not torch.allclose(refs["a"], refs["b"])
    bad, stop = [], threading.Event()

    def forwards():
        while not stop.is_set():
            out = _out(model, x)
            if not any(torch.allclose(out, r, rtol=1e-6, atol=1e-7) for r in refs.values()):
                bad.append(out)

    threads = [threading.Thread(target=forwards) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(200):
        lora_ext.set_adapter(model, "ab"[i % 2])
    stop.set()
    for t in threads:
        t.join()
    assert not bad, f"{len(bad)} forwards mixed the adapters' heads and bodies"


@pytest.mark.parametrize("build,targets,rows", [
    (Net, None, ["a", "b", None, "b"]),
    (llama_cls, ["q_proj", "v_proj"], ["b", None, "a"]),
    (roberta_cls, ["query", "value"], ["a", "b", "b"]),
], ids=["net", "llama-score", "roberta-classifier"])
def test_mixed_batches_serve_each_row_with_its_adapters_module_as_peft(tmp_path, build, targets, rows):
    if build is Net:
        paths = {n: _net_adapter(tmp_path, n, seed=i + 1) for i, n in enumerate("ab")}
        x = _x()
    else:
        paths = {n: _peft_file(tmp_path, build, n, i + 1, task_type="SEQ_CLS", r=2, lora_alpha=4,
                               target_modules=targets) for i, n in enumerate("ab")}
        x = torch.randint(1, 100, (len(rows), 9))
    peft_model = PeftModel.from_pretrained(build(), paths["a"], adapter_name="a")
    peft_model.load_adapter(paths["b"], adapter_name="b")
    peft_model.eval()
    model = build()
    lora_ext.load_peft_adapter(model, paths["a"], adapter_name="a")
    lora_ext.load_peft_adapter(model, paths["b"], adapter_name="b", activate=False)
    model.eval()  # merged with "a": the rows are served relative to it
    with torch.no_grad(), lora_ext.batch_adapters(model, rows):
        out = model(x)
    out = out if build is Net else out.logits
    if build is not roberta_cls:  # peft's mixed batches take Linear, Embedding and Conv heads only
        with torch.no_grad():
            ref = peft_model(x, adapter_names=[n or "__base__" for n in rows])
        torch.testing.assert_close(out, ref if build is Net else ref.logits, rtol=1e-5, atol=1e-5)
    # each row is its adapter's (or the base model's) alone
    for i, name in enumerate(rows):
        lora_ext.set_adapter(model, name or "a")
        single = _out(build() if name is None else model, x[i:i + 1])  # the base model: built afresh
        single = single if build is Net else single.logits
        torch.testing.assert_close(out[i:i + 1], single, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_refuses_a_saved_module_whose_input_is_not_by_row(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    model.eval()
    with torch.no_grad(), lora_ext.batch_adapters(model, ["a", "b"]):
        with pytest.raises(ValueError, match="module 'head' is saved whole .* 2 rows"):
            model.head(torch.randn(3, 32))


def test_torch_compile_follows_a_switch_of_the_saved_module(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    compiled = torch.compile(model, backend="eager")
    x = _x()
    for name in ("a", "b", "a"):
        lora_ext.set_adapter(model, name)
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=0, atol=0)


def test_copies_pickle_and_train_as_peft_trains_them(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    x = _x()
    twin = copy.deepcopy(model)
    assert torch.equal(_out(twin, x), _out(model, x)) and twin.head.active_adapter == "a"
    lora_ext.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.modules_to_save.a.weight", "head.modules_to_save.a.bias"} <= trainable
    assert not trainable & {"head.original_module.weight", "head.modules_to_save.b.weight"}
    state = {k: v.clone() for k, v in lora_ext.lora_state_dict(model).items()}
    assert set(state) >= {"head.modules_to_save.a.weight", "head.modules_to_save.a.bias"}
    original = model.head.original_module.weight.detach().clone()
    model.train()
    model(x).square().sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert not torch.equal(model.head.modules_to_save.a.weight, state["head.modules_to_save.a.weight"])
    assert torch.equal(model.head.original_module.weight, original)


# --------------------------------------------------------------------------------------------- lora-ext merge


def test_lora_ext_merge_writes_the_saved_module_as_peft_merges_it(tmp_path):
    path = _peft_file(tmp_path, llama_cls, "cls", 3, task_type="SEQ_CLS", r=2, lora_alpha=4,
                      target_modules=["q_proj", "v_proj"])
    base = str(tmp_path / "base")
    llama_cls().save_pretrained(base)
    out = str(tmp_path / "merged")
    assert merge_checkpoint(base, path, out, progress=False) == 4
    ids = _ids()
    ref = _logits(PeftModel.from_pretrained(llama_cls(), path).eval().merge_and_unload(), ids)
    merged = LlamaForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, ids), ref, rtol=1e-5, atol=1e-6)
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert torch.equal(load_file(os.path.join(out, "model.safetensors"))["score.weight"], saved[KEY + "score.weight"])


@pytest.mark.parametrize("damage,match", [
    (lambda t: t.pop(KEY + "head.bias"), "holds no 'base_model.model.head.bias'"),
    (lambda t: t.update({KEY + "head.extra": torch.zeros(3)}), "has no tensor 'head.extra'"),
    (lambda t: t.update({KEY + "head.weight": torch.zeros(6, 32)}), "has shape"),
    (lambda t: t[KEY + "head.weight"].__setitem__((0, 0), float("inf")), "non-finite"),
], ids=["missing", "extra", "shape", "inf"])
def test_lora_ext_merge_refuses_a_bad_saved_module(tmp_path, damage, match):
    path = _damaged(_net_adapter(tmp_path), damage)
    base = str(tmp_path / "base.safetensors")
    save_file(Net().state_dict(), base)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(MergeError, match=match):
        merge_checkpoint(base, path, out, progress=False)
    assert not os.path.exists(out)


@pytest.mark.parametrize("targets", [["proj"], ["proj", "head"]])
def test_lora_ext_merge_refuses_a_saved_module_the_file_lacks(tmp_path, targets):
    """modules_to_save names a module of the base, but the file holds none of its tensors (peft and load_peft_adapter
    refuse the file); with LoRA factors on that module too, which peft keeps LoRA off (a hostile pass found both
    written with exit 0)."""
    path = _peft_file(tmp_path, Net, "a", 1, r=2, target_modules=targets)
    edit_adapter_config(path, modules_to_save=["head"])
    with pytest.raises(Exception):
        PeftModel.from_pretrained(Net(), path)
    with pytest.raises(ValueError):
        lora_ext.load_peft_adapter(Net(), path)
    base = str(tmp_path / "base.safetensors")
    save_file(Net().state_dict(), base)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(MergeError, match="holds none of its tensors" if targets == ["proj"] else "keeps LoRA off"):
        merge_checkpoint(base, path, out, progress=False)
    assert not os.path.exists(out)


def test_lora_ext_merge_refuses_a_saved_module_tied_to_the_other_end(tmp_path):
    path = _net_adapter(tmp_path)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(Net().state_dict(), str(folder / "model.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump({"vocab_size": 5, "tie_word_embeddings": True}, f)  # head.weight has 5 rows
    with pytest.raises(MergeError, match="saved whole .* ties"):
        merge_checkpoint(str(folder), path, str(tmp_path / "out"), progress=False)


def test_a_module_under_two_names_is_saved_at_both_as_in_peft(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)
            self.head2 = self.head  # one module, two names: peft wraps (and saves) each name

        def forward(self, x):
            h = self.proj(x)
            return self.head(h) + 2 * self.head2(h)

    path = _peft_file(tmp_path, Shared, "shared", 4, r=2, target_modules=["proj"], modules_to_save=["head", "head2"])
    x = torch.randn(3, 8)
    ref = _out(PeftModel.from_pretrained(Shared(), path).eval(), x)
    model = Shared()
    assert lora_ext.load_peft_adapter(model, path) == ["head", "head2", "proj"]
    assert model.head is not model.head2  # two wrappers, each with its own copy
    torch.testing.assert_close(_out(model, x), ref, rtol=1e-5, atol=1e-5)
    out = str(tmp_path / "again")
    lora_ext.save_peft_adapter(model, out)
    torch.testing.assert_close(_out(PeftModel.from_pretrained(Shared(), out).eval(), x), ref, rtol=1e-5, atol=1e-5)


def test_training_moves_with_a_switch_as_in_peft(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "c", seed=3, modules_to_save=None), adapter_name="c",
                               activate=False)
    lora_ext.mark_only_lora_as_trainable(model)

    def trained():
        return {n for n, p in model.head.named_parameters() if p.requires_grad}

    assert trained() == {"modules_to_save.a.weight", "modules_to_save.a.bias"}
    lora_ext.set_adapter(model, "b")  # peft: b's copy trains, a's is frozen
    assert trained() == {"modules_to_save.b.weight", "modules_to_save.b.bias"}
    assert model.proj.lora_A.requires_grad
    lora_ext.set_adapter(model, "c")  # no copy: the model's own head, frozen by mark_only_lora_as_trainable
    assert trained() == set()


def _ddp_switch_case(rank, world, a, b):
    from torch.nn.parallel import DistributedDataParallel
    model = Net()
    lora_ext.load_peft_adapter(model, a, adapter_name="a")
    lora_ext.load_peft_adapter(model, b, adapter_name="b", activate=False)
    model.requires_grad_(False)
    model.head.modules_to_save.a.requires_grad_(True)  # only the head's copy trains
    ddp = DistributedDataParallel(model)
    try:
        lora_ext.set_adapter(ddp, "b")
    except ValueError as e:
        return str(e), model.head.active_adapter, lora_ext.active_adapter(model)
    return None, model.head.active_adapter, lora_ext.active_adapter(model)


def test_a_switch_of_trainable_copies_under_ddp_is_refused(tmp_path):
    from dist import run_ranks
    a, b = _net_adapter(tmp_path, "a", seed=1), _net_adapter(tmp_path, "b", seed=2)
    for message, head, active in run_ranks(_ddp_switch_case, a, b):
        assert message is not None and "module 'module.head' (saved whole" in message, message
        assert (head, active) == ("a", "a")


def _sharded_load_case(rank, world, path):
    from torch.distributed.fsdp import fully_shard
    model = Net()
    fully_shard(model.head)
    snap = {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone() for k, v in model.state_dict().items()}
    try:
        lora_ext.load_peft_adapter(model, path)
    except ValueError as e:
        message = str(e)
    else:
        message = None
    same = all(torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v, snap[k])
               for k, v in model.state_dict().items())
    return message, same, type(model.head).__name__


def test_a_sharded_module_to_save_is_refused(tmp_path):
    from dist import run_ranks
    path = _net_adapter(tmp_path)
    for message, same, kind in run_ranks(_sharded_load_case, path):
        assert message is not None and "is sharded" in message and "load the adapter before sharding" in message
        assert same and kind != "ModulesToSave"


# ------------------------------------------------------------------- a second hostile pass's findings, each fixed


def test_lora_ext_merge_refuses_a_saved_tensor_that_overflows_the_base_dtype(tmp_path):
    """The adapter's float32 copy holds 1e5; the base is float16: inf in the output, refused (it was written)."""
    path = _net_adapter(tmp_path)
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    tensors[KEY + "head.weight"][0, 0] = 1e5
    save_file(tensors, file, metadata={"format": "pt"})
    base = str(tmp_path / "base.safetensors")
    save_file({k: v.half() for k, v in Net().state_dict().items()}, base)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(MergeError, match="head.weight.*inf/NaN in torch.float16 \\(the adapter's tensor"):
        merge_checkpoint(base, path, out, progress=False)
    assert not os.path.exists(out)
    merge_checkpoint(base, path, out, progress=False, allow_inf=True)
    assert torch.isinf(load_file(out)["head.weight"][0, 0])


def test_a_copy_trains_again_after_a_round_trip_through_an_adapter_without_one(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "c", seed=3, modules_to_save=None), adapter_name="c",
                               activate=False)
    lora_ext.mark_only_lora_as_trainable(model)
    for name in ("c", "a"):
        lora_ext.set_adapter(model, name)
    assert all(p.requires_grad for p in model.head.modules_to_save.a.parameters())  # peft: trainable again
    assert not any(p.requires_grad for p in model.head.original_module.parameters())


def test_a_saved_module_shared_by_two_models_cannot_join_two_open_batches(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    other = Net()
    lora_ext.load_peft_adapter(other, _net_adapter(tmp_path, "b2", seed=2, modules_to_save=None), adapter_name="b")
    other.head = model.head
    model.eval()
    other.eval()
    x = _x()
    with torch.no_grad(), lora_ext.batch_adapters(model, ["a", "b", "a", "b"]):
        expected = model(x)
        with pytest.raises(ValueError, match="module 'head' is already in an open batch"):
            with lora_ext.batch_adapters(other, ["b"] * 4):
                pass
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_token_layout_batch_splits_a_saved_linear_by_token(tmp_path):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    model.eval()
    x = torch.randn(1, 4, 16)  # one sequence, a row per token (a serving engine's flattened layout)
    rows = ["a", "b", None, "b"]
    with torch.no_grad(), lora_ext.batch_adapters(model, rows):
        out = model(x)
    assert out.shape == (1, 4, 5)
    for t, name in enumerate(rows):
        if name is not None:
            lora_ext.set_adapter(model, name)
        single = _out(model if name is not None else Net(), x[:, t])
        torch.testing.assert_close(out[:, t], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", [True, False])
def test_a_replaced_active_copy_trains_as_the_one_it_replaces(tmp_path, trained):
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1))
    lora_ext.mark_only_lora_as_trainable(model)
    model.head.modules_to_save.default.requires_grad_(trained)
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a2", seed=5))  # "default" again: a new copy
    assert all(p.requires_grad == trained for p in model.head.modules_to_save.default.parameters())
    assert not any(p.requires_grad for p in model.head.original_module.parameters())


@pytest.mark.parametrize("program", ["jit", "export"])
def test_a_program_of_a_saved_module_inside_a_mixed_batch_is_refused(tmp_path, program):
    # the head saved whole took its rows' modules in the program (jit.trace and export alike) with no refusal: the
    # program served the block's rows after it closed
    model = Net()
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "a", seed=1), adapter_name="a")
    lora_ext.load_peft_adapter(model, _net_adapter(tmp_path, "b", seed=2), adapter_name="b", activate=False)
    model.eval()
    h = torch.randn(2, 32)
    with torch.no_grad(), lora_ext.batch_adapters(model, ["a", "b"]):
        with pytest.raises(RuntimeError, match=f"ModulesToSave\\(Linear\\): torch.{program}.* inside a "
                                               f"lora.batch_adapters block"):
            if program == "jit":
                torch.jit.trace(model.head, (h,), check_trace=False)
            else:
                torch.export.export(model.head, (h,))
    with torch.no_grad():  # outside the block: exported, it serves the active adapter's module
        want = model.head(h)
        if program == "export":
            assert torch.equal(torch.export.export(model.head, (h,)).module()(h), want)
