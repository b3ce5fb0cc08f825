"""Found by the fortieth session (its hostile helpers and the last note's leftovers); each test failed on the commit
before its fix."""
import collections
import contextlib
import copy
import os
import sys
import time

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from lora_ext.cli import main
from tiny_models import llama, randomize_lora, snapshot, unchanged

# --- x1's leftover: an adapter trained on another class of the model, with modules saved whole or rows of tokens --
# (its LoRA factors are renamed, LlamaModel's `layers.0...` to LlamaForCausalLM's `model.layers.0...`, as peft does;
# its saved modules and rows of tokens are not, and the refusal blamed the file alone)

HINT = "another class of the model does: its 'layers.0.self_attn.q_proj' is this model's 'model.layers.0.self_attn.q_proj'"
EXTRAS = {"tokens": dict(trainable_token_indices={"embed_tokens": [1, 2]}), "saved": dict(modules_to_save=["norm"])}


def _adapter(tmp_path, kind, inner):
    model = llama(0)
    peft_model = randomize_lora(get_peft_model(model.model if inner else model,
                                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **EXTRAS[kind])))
    path = str(tmp_path / "adapter")
    peft_model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", sorted(EXTRAS))
def test_another_class_adapter_refusal_says_so(tmp_path, kind):
    path = _adapter(tmp_path, kind, inner=True)
    model = llama(0)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=HINT):
        lora.load_peft_adapter(model, path)
    assert unchanged(model, snap) and not any(isinstance(m, lora.LoRALayer) for m in model.modules())


@pytest.mark.parametrize("kind", sorted(EXTRAS))
def test_another_class_adapter_refusal_says_so_in_the_merge_cli(tmp_path, capsys, kind):
    path = _adapter(tmp_path, kind, inner=True)
    base = str(tmp_path / "base")
    llama(0).save_pretrained(base)
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", path, "--out", out]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert HINT in err and not os.path.exists(out)


def test_an_adapter_of_this_class_is_not_said_to_be_another_s(tmp_path):
    """The same refusal (the file lacks the rows of tokens) for an adapter of the model's own class: no such
    sentence."""
    path = _adapter(tmp_path, "tokens", inner=False)
    from safetensors.torch import load_file, save_file
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = {k: v for k, v in load_file(file).items() if "trainable_tokens" not in k}
    save_file(tensors, file)
    with pytest.raises(ValueError, match="holds no .*trainable_tokens_delta") as info:
        lora.load_peft_adapter(llama(0), path)
    assert "another class" not in str(info.value)


# --- h1: changes of modules while a mixed batch serves a model sharing one of them ---------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


class _Net(nn.Module):
    def __init__(self, block, head=None):
        super().__init__()
        self.block, self.head = block, head

    def forward(self, x):
        y = self.block(x)
        return y if self.head is None else self.head(y)


def _served_net(tmp_path, into):
    """(M1: a block and a LoRA head; M2 sharing M1's plain block; an adapter file for the block's fc, keyed as
    `into` names it ("M2", "M1.block" or "outer": ModuleDict({"m": M1})); x; the rows ["default", None] of M1 as each
    alone, float64)."""
    torch.manual_seed(0)
    block = _Block()
    m1 = _Net(block, nn.Linear(8, 4)).double()
    W0 = m1.head.weight.detach().clone()
    lora.inject(m1, ["head"], r=2)
    nn.init.normal_(m1.head.lora_B)
    m1.eval()
    m2 = _Net(block).eval()
    source = {"M2": lambda: copy.deepcopy(m2), "M1.block": lambda: copy.deepcopy(block),
              "outer": lambda: nn.ModuleDict({"m": copy.deepcopy(m1)})}[into]()
    lora.inject(source, [n for n, m in source.named_modules() if n.endswith("fc")], r=2)
    for m in source.modules():
        if isinstance(m, lora.Linear) and m.in_features == 8 and m.out_features == 8:
            nn.init.normal_(m.lora_A)
            nn.init.normal_(m.lora_B)
    lora.save_peft_adapter(source, str(tmp_path / "d"), "default")
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        h = torch.relu(x @ block.fc.weight.T + block.fc.bias)
        W = W0 + m1.head.scaling * m1.head.lora_B @ m1.head.lora_A
        want = torch.stack([(h[0] @ W.T + m1.head.bias), (h[1] @ W0.T + m1.head.bias)])
    return m1, m2, x, want


@pytest.mark.parametrize("into", ["M2", "M1.block"])
def test_a_load_into_a_model_sharing_a_module_with_an_open_batch_s_model_is_refused(tmp_path, into):
    # the refusal looked for the batch's marks on layers and modules saved whole only: a load into another model
    # sharing a plain part of the batch's model, or into a part of it, made a layer the batch had not opened over,
    # which served the new adapter to every row (10.32 off, h1), silently
    m1, m2, x, want = _served_net(tmp_path, into)
    target = {"M2": m2, "M1.block": m1.block}[into]
    with torch.no_grad(), lora.batch_adapters(m1, ["default", None]):
        with pytest.raises(RuntimeError, match=r"^load_peft_adapter: module '(block|\(the model\))' is served by an "
                                               r"open mixed batch"):
            lora.load_peft_adapter(target, str(tmp_path / "d"), "d", activate=True)
        got = m1(x)
    assert type(m1.block.fc) is nn.Linear and float((got - want).abs().max()) < 1e-12


def batch_during_a_slow_outer_load(tmp_path, monkeypatch):
    """(the max abs difference of a mixed batch of M1 ("default", None) opened while a load into an outer model
    holding M1 runs on another thread, held in its install, from the rows as each alone after the load; whatever
    the load raised)."""
    import threading
    from lora_ext.serving import injection
    m1, _, x, want = _served_net(tmp_path, "outer")
    outer = nn.ModuleDict({"m": m1})
    checked = threading.Event()
    install = injection.install

    def slow_install(*args, **kwargs):
        checked.set()
        time.sleep(0.5)  # (the batch below opens meanwhile)
        return install(*args, **kwargs)
    monkeypatch.setattr(injection, "install", slow_install)
    errors = []

    def load():
        try:
            lora.load_peft_adapter(outer, str(tmp_path / "d"), "d", activate=True)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert checked.wait(60)
        with torch.no_grad(), lora.batch_adapters(m1, ["default", None]):
            assert isinstance(m1.block.fc, lora.Linear)  # (opened after the load)
            got = m1(x)
    finally:
        loader.join(60)
    assert m1.block.fc.active_adapter == "d"
    return float((got - want).abs().max()), errors


def test_a_batch_opening_while_a_change_through_an_outer_model_runs_waits_for_it(tmp_path, monkeypatch):
    # the load's refusal was checked once, before the batch opened on another thread; the batch then read the layers
    # before the load installed its own, which it served with the new adapter for every row (10.32 off, h1)
    off, errors = batch_during_a_slow_outer_load(tmp_path, monkeypatch)
    assert not errors
    assert off < 1e-12  # (the fc holds no 'default': the base for both rows)


def test_a_batch_opened_from_inside_a_change_of_a_model_holding_it_is_refused(tmp_path, monkeypatch):
    from lora_ext.serving import injection
    m1, _, x, _ = _served_net(tmp_path, "outer")
    outer = nn.ModuleDict({"m": m1})
    install = injection.install
    seen = []

    def install_opening_a_batch(*args, **kwargs):
        with pytest.raises(RuntimeError, match=r"^batch_adapters: opened on this thread from inside "
                                               r"load_peft_adapter, whose model shares module 'm' with the batch's"):
            with torch.no_grad(), lora.batch_adapters(m1, ["default", None]):
                pass
        seen.append(True)
        return install(*args, **kwargs)
    monkeypatch.setattr(injection, "install", install_opening_a_batch)
    lora.load_peft_adapter(outer, str(tmp_path / "d"), "d")
    assert seen and isinstance(m1.block.fc, lora.Linear)


# --- h1: lora_state_dict of an FSDP2 model during switches, and in a child forked part way through a switch -------

def _fsdp2_snapshots(rank, world):
    """FSDP2 over 6 layers with adapters 'default' and 'b'; 60 lora_state_dict reads while another thread switches
    the model: how many mixed the two (by the factors' values or the names saved with them)."""
    import threading
    net = nn.Sequential(*[lora.Linear(16, 16, r=2, lora_alpha=4) for _ in range(6)])
    g = torch.Generator().manual_seed(1)
    for m in net:
        with torch.no_grad():
            m.lora_A.normal_(generator=g)
            m.lora_B.normal_(generator=g)
        m.add_adapter("b", torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0)
        m.requires_grad_(False)
    own = {n: [m.get_adapter(n)[0].detach().clone() for m in net] for n in ("default", "b")}
    from torch.distributed.fsdp import fully_shard
    for m in net:
        fully_shard(m)
    fully_shard(net)
    stop = threading.Event()

    def switch():
        while not stop.is_set():
            lora.set_adapter(net, "b")
            lora.set_adapter(net, "default")
    switcher = threading.Thread(target=switch)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    switcher.start()
    mixed = 0
    try:
        for _ in range(60):
            state = lora.lora_state_dict(net)
            names = {next(iter(state._metadata[str(i)].values())) for i in range(6)}
            values = {n for i in range(6) for n in own if torch.equal(state[f"{i}.lora_A"], own[n][i])}
            mixed += len(names) != 1 or names != values
    finally:
        stop.set()
        switcher.join(60)
        sys.setswitchinterval(interval)
    return mixed


def test_lora_state_dict_of_an_fsdp2_model_during_switches_holds_one_adapter():
    # read once without the hold (the retries were taken out for sharded models, whose reads are collectives): 49 of
    # 100 snapshots mixed two adapters, as the w2 bug did (h1)
    from dist import run_ranks
    assert run_ranks(_fsdp2_snapshots, world=1) == [0]


def _state_dict_in_a_child(model) -> str:
    """What lora_state_dict(model) does in a child forked now: 'returned', or its RuntimeError's message."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child: os._exit, never pytest's teardown)
        message = b"returned"
        try:
            lora.lora_state_dict(model)
        except RuntimeError as err:
            message = str(err).encode()[:300]
        finally:
            os.write(write, message)
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    message = os.read(read, 400).decode()
    os.close(read)
    return message


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_lora_state_dict_in_a_child_forked_part_way_through_a_switch_is_refused():
    # the child's lock starts its write count again, so the optimistic read looked clean and returned layers 0-1 on
    # 'b' and 2-3 on 'default' under their names, where forwards and save_peft_adapter are refused (h1)
    import threading
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]).eval()
    lora.inject(model, [str(i) for i in range(4)], r=2)
    for m in model:
        m.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    half, go = threading.Event(), threading.Event()
    switch = type(model[2]).set_adapter

    def slow(self, name):
        if self is model[2]:
            half.set()
            go.wait(30)
        return switch(self, name)
    type(model[2]).set_adapter = slow
    switcher = threading.Thread(target=lora.set_adapter, args=(model, "b"))
    switcher.start()
    try:
        assert half.wait(30)
        message = _state_dict_in_a_child(model)
    finally:
        go.set()
        switcher.join(30)
        type(model[2]).set_adapter = switch
    assert message.startswith("this process was forked (os.fork) while another thread of its parent was changing"), \
        message
    assert [m.active_adapter for m in model] == ["b"] * 4


# --- h1: a child forked while a batch of another context of the same thread is open ---------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_child_forked_with_a_batch_open_in_another_context_of_its_thread_counts_it():
    # after_fork counted the forking context's batches only: in the child, a batch open in a generator run in
    # another context (asyncio's tasks run so) counted 0 (a change of its model through an outer one let through
    # inside it), and its close took the count to -1, which refused every later change and disable_adapter, for good
    import contextvars
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    lora.inject(model, ["0"], r=2)
    nn.init.normal_(model[0].lora_B)
    outer = nn.ModuleDict({"inner": model, "extra": nn.Linear(4, 4)})
    x = torch.randn(2, 8)

    def serve():
        with torch.no_grad(), lora.batch_adapters(model, ["default", None]):
            yield model(x)
            yield model(x)
    context, rows = contextvars.copy_context(), serve()
    first = context.run(next, rows)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = []
        try:
            try:
                lora.inject(outer, ["extra"], r=2)
                out.append("inside: let through")
            except RuntimeError as err:
                out.append("inside: refused" if "is served by an open mixed batch" in str(err) else repr(err))
            out.append(f"same: {torch.equal(context.run(next, rows), first)}")
            context.run(lambda: list(rows))
            out.append(f"count: {model[0].__dict__.get('_open_batches')}")
            out.append(f"inject: {lora.inject(outer, ['extra'], r=2)}")
            with lora.disable_adapter(model):
                out.append("disabled")
        except BaseException as err:  # noqa: BLE001
            out.append(repr(err)[:300])
        finally:
            os.write(write, "; ".join(out).encode())
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    message = os.read(read, 2000).decode()
    os.close(read)
    context.run(lambda: list(rows))
    assert message == "inside: refused; same: True; count: None; inject: ['extra']; disabled", message
    assert type(outer["extra"]) is nn.Linear


# --- h1: ranks given as numpy integers (loralib takes them; lora_ext refused them in layers and inject) ----------

def test_numpy_integer_ranks_build_layers_as_loralib_does():
    import loralib
    import numpy as np
    torch.manual_seed(0)
    for r, alpha in [(np.int64(4), np.int64(8)), (np.int32(2), np.float32(3.0))]:
        ref = loralib.Linear(8, 6, r=r, lora_alpha=alpha).double()
        got = lora.Linear(8, 6, r=r, lora_alpha=alpha).double()
        assert type(got.r) is int and got.r == int(r) and type(got.scaling) is float
        nn.init.normal_(ref.lora_B)
        got.load_state_dict(ref.state_dict())
        x = torch.randn(3, 8, dtype=torch.float64)
        want = x @ (ref.weight + float(alpha) / int(r) * ref.lora_B @ ref.lora_A).T + ref.bias
        with torch.no_grad():
            assert float((got(x) - want).abs().max()) < 1e-12 and float((ref(x) - want).abs().max()) < 1e-12
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    lora.inject(model, ["0", "1"], r=np.int64(2), lora_alpha=np.int64(4), rank_pattern={"1": np.int64(3)})
    assert [(type(m.r), m.r, type(m.scaling), m.scaling) for m in model] == [(int, 2, float, 2.0), (int, 3, float, 4 / 3)]
    for bad in (True, np.True_, 2.0, np.float64(2.0), torch.tensor(2)):
        with pytest.raises(ValueError, match="r must be a (non-negative|positive) integer"):
            lora.Linear(8, 8, r=bad)
        with pytest.raises(ValueError, match="r must be a positive integer"):
            lora.inject(nn.Sequential(nn.Linear(8, 8)), ["0"], r=bad)


# --- h3: a weight written inside one autocast block, after a merged forward --------------------------------------

def _two_adapter(kind):
    """A merged layer (eval) with adapters 'default' and 'b' whose float32 weight requires grad, its input, and
    {adapter: the float64 output}."""
    torch.manual_seed(0)
    layer = {"linear": lambda: lora.Linear(32, 24, r=4, lora_alpha=8),
             "fan_in_fan_out": lambda: lora.Linear(32, 24, r=4, lora_alpha=8, fan_in_fan_out=True),
             "merged": lambda: lora.MergedLinear(32, 24, r=4, lora_alpha=8, enable_lora=[True, False, True]),
             "conv": lambda: lora.Conv2d(3, 6, 3, r=2, lora_alpha=4)}[kind]()
    nn.init.normal_(layer.lora_A, std=0.3)
    nn.init.normal_(layer.lora_B, std=0.3)
    (ra, ca), (rb, cb) = layer.factor_shapes(layer.r)
    layer.add_adapter("b", torch.randn(ra, ca) * 0.3, torch.randn(rb, cb) * 0.3, 2.0)
    x = torch.randn(4, 3, 8, 8) if kind == "conv" else torch.randn(6, 32)
    refs = {}
    for name in ("default", "b", None):
        layer.set_adapter(name or "default")
        layer.train()
        with torch.no_grad():
            if name is None:
                with lora.disable_adapter(layer):
                    refs[name] = layer.double()(x.double()).detach()
            else:
                refs[name] = layer.double()(x.double()).detach()
        layer.float()
    layer.set_adapter("default")
    layer.requires_grad_(True)  # (full fine-tuning: the weight a leaf that requires grad, which autocast caches)
    return layer.eval(), x, refs


def _off(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("kind", ["linear", "fan_in_fan_out", "merged", "conv"])
@pytest.mark.parametrize("change", ["set_adapter", "disable_adapter", "set_adapter on another thread"])
def test_a_merged_forward_after_a_weight_write_inside_one_autocast_block_serves_the_write(kind, change):
    # autocast caches its cast of a leaf that requires grad for the whole block and never checks the tensor's
    # version: a merged forward after a switch wrote the weight in the block served the old adapter (15.9 off a
    # Linear, 193 off a Conv2d, h3), silently; now the merged forward casts the weight itself there
    import threading
    layer, x, refs = _two_adapter(kind)
    assert layer.merged and _off(refs["b"], refs["default"]) > 0.1 and _off(refs[None], refs["default"]) > 0.1
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        first = layer(x)
        if change == "disable_adapter":
            with lora.disable_adapter(layer):
                second, want = layer(x), refs[None]
        else:
            if change == "set_adapter":
                layer.set_adapter("b")
            else:
                switcher = threading.Thread(target=layer.set_adapter, args=("b",))
                switcher.start()
                switcher.join(60)
            assert layer.merged and layer.active_adapter == "b"
            second, want = layer(x), refs["b"]
    assert first.dtype == second.dtype == torch.bfloat16
    assert _off(first, refs["default"]) < 2e-2 and _off(second, want) < 2e-2, (_off(second, want),
                                                                                _off(second, refs["default"]))


def test_a_rows_entry_beyond_int64_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    lora.inject(model, ["0"], r=2)
    for entry in (2 ** 64, -2 ** 70):
        with pytest.raises(ValueError, match=rf"^batch_adapters: rows entry {entry} indexes no adapter"):
            with torch.no_grad(), lora.batch_adapters(model, ["default"], rows=[entry, 0]):
                pass


# --- r2: the convolutions' other paths to autocast's cached cast (mixed batches, the dropout path) -------------------

def test_a_mixed_conv_batch_after_a_merged_switch_inside_one_autocast_block_serves_the_switch():
    # reference.batched_conv handed torch conv.weight itself: a batch after a merged switch in the same autocast
    # block served the rows of the weight from the cast made before it (11.15 off, r2), silently
    layer, x, refs = _two_adapter("conv")
    rows = ["default", "b", None, "default"]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        with lora.batch_adapters(layer, rows):
            first = layer(x)
        layer.set_adapter("b")
        assert layer.merged
        with lora.batch_adapters(layer, rows):
            second = layer(x)
    want = torch.stack([refs[r][i] for i, r in enumerate(rows)])
    assert _off(first, want) < 2e-2 and _off(second, want) < 2e-2, (_off(first, want), _off(second, want))


def test_a_conv_with_dropout_trained_then_merged_inside_one_autocast_block_serves_the_merge():
    # ops.conv's dropout path cast conv.weight through autocast's cache: after eval() merged it in the same block, a
    # mixed batch's adapter rows took the base (9.41 off, r2); the other way, a forward after train() unmerged took
    # the merged weight and added the adapter again
    torch.manual_seed(0)
    layer = lora.Conv2d(3, 6, 3, r=2, lora_alpha=4, lora_dropout=0.5)
    nn.init.normal_(layer.lora_A, std=0.3)
    nn.init.normal_(layer.lora_B, std=0.3)
    x = torch.randn(4, 3, 8, 8)
    layer.double().eval()
    with torch.no_grad():
        adapted = layer(x.double())
        with lora.disable_adapter(layer):
            base = layer(x.double())
    layer.float().train()
    layer.requires_grad_(True)
    rows = ["default", None, "default", None]
    want = torch.stack([(adapted if r else base)[i] for i, r in enumerate(rows)])
    with torch.autocast("cpu", torch.bfloat16):
        layer(x).float().sum().backward()  # (the dropout path: the weight and the adapter's term apart)
        layer.eval()
        assert layer.merged
        with torch.no_grad(), lora.batch_adapters(layer, rows):
            got = layer(x)
        layer.train()
        with torch.no_grad():
            layer.lora_dropout.eval()  # (dropout off, to compare with the float64 output)
            trained = layer(x)
    assert _off(got, want) < 2e-2 and _off(trained, adapted) < 2e-2, (_off(got, want), _off(trained, adapted))


def test_a_damaged_factor_key_of_another_class_s_adapter_is_not_said_to_be_a_naming_matter(tmp_path):
    # the sentence was added to every refusal of the factors' keys (r2: a damaged `lora_C` key), where loading into
    # the class it was trained on is refused the same
    from safetensors.torch import load_file, save_file
    model = llama(0)
    get_peft_model(model.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(tmp_path / "a"))
    file = str(tmp_path / "a" / "adapter_model.safetensors")
    tensors = load_file(file)
    tensors["base_model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(4, 64)
    save_file(tensors, file)
    with pytest.raises(ValueError, match="unexpected key .*lora_C") as info:
        lora.load_peft_adapter(llama(0), str(tmp_path / "a"))
    assert "another class" not in str(info.value)


# --- r1: review of the open-batch registry ----------------------------------------------------------------------

def test_a_batch_whose_opening_thread_ended_still_refuses_changes(tmp_path):
    # the registry dropped batches whose thread had ended, which are the ones still open in a suspended generator: a
    # load through an outer model then made a layer the batch had not opened over (20.96 off, r1), silently
    import contextvars
    import threading
    m1, _, x, want = _served_net(tmp_path, "outer")
    outer = nn.ModuleDict({"m": m1})

    def serve():
        with torch.no_grad(), lora.batch_adapters(m1, ["default", None]):
            yield m1(x)
            yield m1(x)
    context, rows, out = contextvars.copy_context(), serve(), []
    opener = threading.Thread(target=lambda: out.append(context.run(next, rows)))
    opener.start()
    opener.join(60)
    with pytest.raises(RuntimeError, match=r"^load_peft_adapter: module 'm' is served by an open mixed batch"):
        lora.load_peft_adapter(outer, str(tmp_path / "d"), "d", activate=True)
    with torch.no_grad():  # (grad mode is the thread's: the generator's no_grad was its first thread's)
        second = context.run(next, rows)
    context.run(lambda: list(rows))
    assert float((out[0] - want).abs().max()) < 1e-12 and float((second - want).abs().max()) < 1e-12
    assert lora.inject(outer, ["m.block.fc"], r=2) == ["m.block.fc"]  # (after the block)


def test_a_change_of_a_model_sharing_only_an_activation_with_a_batch_s_model_goes_through():
    # any module two models shared was a clash: an inject into B's own Linear was refused while A's batch was open,
    # A and B sharing one ReLU instance (r1)
    act = nn.ReLU()
    a = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4)).eval()
    b = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4)).eval()
    lora.inject(a, ["0"], r=2)
    with torch.no_grad(), lora.batch_adapters(a, ["default", None]):
        assert lora.inject(b, ["2"], r=2) == ["2"]
        with pytest.raises(RuntimeError, match="is served by an open mixed batch"):
            lora.inject(nn.Sequential(a[0], nn.Linear(4, 4)), ["1"], r=2)  # (a module with a weight: still a clash)


@contextlib.contextmanager
def _a_load_held_at_install(tmp_path, monkeypatch, outer):
    """Inside: a load of tmp_path/d into `outer` on another thread (yielded), held where it installs its layers (its
    checks made, the change registered); it goes on as the block ends."""
    import threading
    from lora_ext.serving import injection
    checked, go = threading.Event(), threading.Event()
    install = injection.install

    def slow_install(*args, **kwargs):
        checked.set()
        go.wait(60)
        return install(*args, **kwargs)
    monkeypatch.setattr(injection, "install", slow_install)
    loader = threading.Thread(target=lambda: lora.load_peft_adapter(outer, str(tmp_path / "d"), "d"))
    loader.start()
    try:
        assert checked.wait(60)
        yield loader
    finally:
        go.set()
        loader.join(60)


def test_ctrl_c_while_a_batch_waits_for_a_change_lands_and_registers_nothing(tmp_path, monkeypatch, python_sigint):
    # Ctrl-C was held back for the whole wait (14 s measured behind a slow change, r1)
    import signal
    import threading
    from lora_ext import batched
    m1, _, x, want = _served_net(tmp_path, "outer")
    with _a_load_held_at_install(tmp_path, monkeypatch, nn.ModuleDict({"m": m1})) as loader:
        timer = threading.Timer(0.5, signal.raise_signal, (signal.SIGINT,))
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            with torch.no_grad(), lora.batch_adapters(m1, ["default", None]):
                pass
        assert time.monotonic() - start < 10 and loader.is_alive()
        assert not any(e.model is m1 for e in batched._OPEN)
    with torch.no_grad(), lora.batch_adapters(m1, ["default", None]):
        assert float((m1(x) - want).abs().max()) < 1e-12


def test_an_exception_landing_as_a_batch_s_registration_ends_still_ends_it(tmp_path, monkeypatch):
    # Ctrl-C landing as the registration was taken off left it there: every change of a model sharing a module with
    # the batch's was refused for good, and the model was kept alive (r1)
    from lora_ext import batched
    m1, _, x, _ = _served_net(tmp_path, "outer")
    close, calls = batched.close_serving, []

    def landing(entry):
        calls.append(entry)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return close(entry)
    monkeypatch.setattr(batched, "close_serving", landing)
    with pytest.raises(KeyboardInterrupt):
        with torch.no_grad(), lora.batch_adapters(m1, ["default", None]):
            m1(x)
    assert len(calls) == 2 and not any(e.model is m1 for e in batched._OPEN)
    assert lora.inject(nn.ModuleDict({"m": m1}), ["m.block.fc"], r=2) == ["m.block.fc"]


def _state_read_under_a_waiting_switch(rank, world):
    """FSDP2 over two layers: a forward whose hook waits for a worker reading lora_state_dict while another thread's
    set_adapter queues for that forward: the keys read, or 'deadlock'."""
    import concurrent.futures
    import threading
    from torch.distributed.fsdp import fully_shard
    net = nn.Sequential(*[lora.Linear(8, 8, r=2, lora_alpha=4) for _ in range(2)])
    for m in net:
        m.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 2.0)
        m.requires_grad_(False)
    net.eval()
    lora.set_adapter(net, "default")
    for m in net:
        fully_shard(m)
    fully_shard(net)
    pool, started, result = concurrent.futures.ThreadPoolExecutor(1), threading.Event(), {}

    def hook(module, args, out):
        started.set()
        time.sleep(0.3)  # (the switch queues meanwhile)
        try:
            result["keys"] = sorted(pool.submit(lora.lora_state_dict, net).result(timeout=20))
        except concurrent.futures.TimeoutError:
            result["keys"] = "deadlock"
        return out
    net[0].register_forward_hook(hook)
    switch = threading.Thread(target=lambda: (started.wait(), lora.set_adapter(net, "b")), daemon=True)
    switch.start()
    with torch.no_grad():
        net(torch.randn(2, 8))
    switch.join(60)
    return result["keys"], not switch.is_alive(), [m.active_adapter for m in net]


def test_lora_state_dict_of_an_fsdp2_model_read_for_a_forward_a_switch_waits_on_does_not_deadlock():
    # under hold, the worker's read queued behind the switch waiting for the forward that waited for the worker (r54's
    # deadlock, back for sharded models: r1)
    from dist import run_ranks
    keys, switched, active = run_ranks(_state_read_under_a_waiting_switch, world=1)[0]
    assert keys == ["0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"] and switched and active == ["b", "b"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_lora_state_dict_in_a_child_forked_part_way_through_a_load_is_refused(tmp_path, monkeypatch):
    # the child holds part of the load (some layers injected): its state is refused as its forwards are, where a
    # child forked inside another thread's batch block reads (the factors are whole there)
    m1, _, _, _ = _served_net(tmp_path, "outer")
    outer = nn.ModuleDict({"m": m1})
    with _a_load_held_at_install(tmp_path, monkeypatch, outer):
        message = _state_dict_in_a_child(outer)
    assert message.startswith("this process was forked (os.fork) while another thread of its parent was inside "
                              "load_peft_adapter"), message


# --- r3: review of r1's fixes --------------------------------------------------------------------------------------

def test_a_batch_that_waited_for_a_change_refuses_changes_of_the_modules_that_change_made(tmp_path, monkeypatch):
    # the batch took its modules' ids part way through the load it waited for (a copy of a block saved whole was
    # missing), so a load through the copies' ModuleDict injected into the copy the batch served (23.43 off, r3)
    import threading
    from peft import LoraConfig as Config, get_peft_model as peft_model
    from lora_ext import batched
    m1, _, x, _ = _served_net(tmp_path, "outer")
    outer = nn.ModuleDict({"m": m1})
    source = peft_model(copy.deepcopy(outer).float(), Config(r=2, target_modules=["head"], modules_to_save=["block"]))
    source.save_pretrained(str(tmp_path / "s"))
    begin, slow = batched.begin_reshaping, threading.Event()

    def slowly(model, lock, what):
        change = begin(model, lock, what)
        if threading.current_thread().name == "changer":
            slow.set()
            time.sleep(0.5)  # (the batch below opens meanwhile, and waits)
        return change
    monkeypatch.setattr(batched, "begin_reshaping", slowly)
    changer = threading.Thread(name="changer", target=lambda: lora.load_peft_adapter(outer, str(tmp_path / "s"), "s"))
    changer.start()
    assert slow.wait(60)
    m1.requires_grad_(False)
    with torch.no_grad(), lora.batch_adapters(m1, ["s", None]):
        changer.join(60)
        copies = m1.block.modules_to_save
        before = m1(x)
        with pytest.raises(RuntimeError, match="is served by an open mixed batch"):
            lora.inject(copies, ["s.fc"], r=2)
        assert float((m1(x) - before).abs().max()) == 0
    assert type(copies["s"].fc) is nn.Linear


def test_a_shared_module_of_another_class_without_parameters_is_a_clash():
    # a module with no parameters, buffers or children of its own may hold modules in plain attributes, which a load
    # rewrites: a load into B through such a module shared with A let B's adapter into A's batch on every row (58.47
    # off, r3); torch's own stateless modules, and containers of only them, are no clash
    class Router(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.fns = [lin]

        def forward(self, x):
            return x + self.fns[0](x)
    lin = nn.Linear(8, 8)
    router, quiet = Router(lin), nn.Sequential(nn.ReLU(), nn.Dropout(0.0))
    a = nn.Sequential(collections.OrderedDict(first=nn.Linear(8, 8), mid=router, act=quiet)).eval()
    b = nn.Sequential(collections.OrderedDict(own=lin, mid=router)).eval()
    c = nn.Sequential(collections.OrderedDict(own=nn.Linear(8, 8), act=quiet)).eval()
    lora.inject(a, ["first"], r=2)
    with torch.no_grad(), lora.batch_adapters(a, ["default", None]):
        with pytest.raises(RuntimeError, match=r"^inject: module 'mid' is served by an open mixed batch"):
            lora.inject(b, ["own"], r=2)
        assert lora.inject(c, ["own"], r=2) == ["own"]
    assert type(router.fns[0]) is nn.Linear


def test_state_reads_on_several_threads_do_not_keep_a_switch_out():
    # reading() went ahead of waiting writers whatever else was held: six threads reading the state in a loop kept a
    # set_adapter waiting for good (15 s and more, r3)
    import threading
    from lora_ext.serving.adapters import model_lock
    model = nn.Sequential(lora.Linear(8, 8, r=2), lora.Linear(8, 8, r=2))
    for m in model:
        m.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    lock, stop = model_lock(model), threading.Event()

    def read():
        while not stop.is_set():
            with lock.reading():
                time.sleep(0.001)
    readers = [threading.Thread(target=read) for _ in range(6)]
    for t in readers:
        t.start()
    try:
        switch = threading.Thread(target=lora.set_adapter, args=(model, "b"))
        start = time.monotonic()
        switch.start()
        switch.join(30)
        took = time.monotonic() - start
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not switch.is_alive() and took < 5 and [m.active_adapter for m in model] == ["b", "b"], took


def test_an_exception_landing_in_a_state_read_never_leaves_the_lock_taken():
    # landing at 5 of reading()'s lines left a read (a hold) behind, which every later writer waited on for good (r3)
    from test_session_hostile27 import _landing_at, _lines_of, _two_layer_model, _within
    from lora_ext.serving.adapters import ModelLock, model_lock
    function = ModelLock.reading.__wrapped__

    def read(model):
        with model_lock(model).reading():
            pass
    model, _, _ = _two_layer_model()
    lines = _lines_of(function, lambda: read(model))
    assert len(lines) >= 10
    for line in lines:
        model, _, _ = _two_layer_model()
        lock = model_lock(model)
        assert _landing_at(function, line, lambda: read(model)), line
        assert not lock._reads and not lock._readings and not lock._holds, line
        assert _within(lambda: lora.set_adapter(model, "b"), 10), f"line {line}: a change waits for ever"


# --- h4: a stale state of a deleted adapter loaded into another ----------------------------------------------------

def test_a_state_saved_as_an_adapter_the_layers_no_longer_hold_warns_as_it_loads_into_another():
    # refused while the layers held X (its values would overwrite X's); once X was deleted the same load went into
    # Y's factors without a word (h4). As loralib, it loads (into the live factors), and says so
    import warnings
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 8, r=2), lora.Linear(8, 4, r=2))
    for m in model:
        nn.init.normal_(m.lora_B)
        m.add_adapter("Y", torch.randn(2, 8), torch.randn(m.out_features, 2), 1.0)
    state = lora.lora_state_dict(model)  # (adapter 'default''s)
    lora.set_adapter(model, "Y")
    with pytest.raises(RuntimeError, match="the state's lora_A / lora_B are adapter 'default''s"):
        model.load_state_dict(state, strict=False)
    for m in model:
        m.add_adapter("keep", *m.get_adapter("Y")[:2], 1.0)
    lora.delete_adapter(model, "default")
    with pytest.warns(UserWarning, match=r"saved as adapter 'default''s load into adapter 'Y' of layers that hold no "
                                         r"'default'") as record:
        model.load_state_dict(state, strict=False)
    assert len([w for w in record if "saved as adapter" in str(w.message)]) >= 1
    assert all(torch.equal(m.lora_B, state[f"{i}.lora_B"]) for i, m in enumerate(model))  # (loaded, as loralib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.set_adapter(model, "Y")
        model.load_state_dict(lora.lora_state_dict(model), strict=False)  # (its own: quiet)


# --- r4: review of r3's fixes ---------------------------------------------------------------------------------------

def test_lora_state_dict_is_not_kept_out_by_a_thread_switching_in_a_loop():
    # every optimistic read saw a switch, and the state read that follows never took the turn a reader that waited
    # through a write gets: lora_state_dict waited for good (10 s and more, r4) while the loop switched
    import threading
    from lora_ext.layers import ADAPTER_METADATA
    torch.manual_seed(0)
    net = nn.Sequential(*[lora.Linear(32, 32, r=2) for _ in range(4)]).eval()
    for m in net:
        m.add_adapter("b", torch.randn(2, 32), torch.randn(32, 2), 1.0)
    lora.set_adapter(net, "default")
    stop, took = threading.Event(), []

    def switch():
        names = ["b", "default"]
        while not stop.is_set():
            lora.set_adapter(net, names[0])
            names.reverse()

    def read():
        for _ in range(20):
            start = time.monotonic()
            state = lora.lora_state_dict(net)
            took.append(time.monotonic() - start)
            assert len({entry[ADAPTER_METADATA] for entry in state._metadata.values()}) == 1  # (one adapter)
    switcher = threading.Thread(target=switch, daemon=True)
    switcher.start()
    reader = threading.Thread(target=read, daemon=True)
    try:
        time.sleep(0.1)
        reader.start()
        reader.join(60)
    finally:
        stop.set()
        switcher.join(30)
    assert not reader.is_alive() and len(took) == 20 and max(took) < 10, took


@pytest.mark.parametrize("kind", ["bare module", "identity in a nested list", "identity in a deque",
                                  "identity in a dict of tuples"])
def test_a_shared_bare_module_holding_a_module_is_a_clash(kind):
    # a bare nn.Module (torch's own class) given a forward and a module in a plain attribute passed for stateless: a
    # load into B through it let B's adapter into A's batch (29.81 off, r4); torch's own stateless module holding it
    # two containers deep, which inject rewrites too, passed after that (3.97 off, r5)
    lin = nn.Linear(8, 8)
    mid = nn.Module() if kind == "bare module" else nn.Identity()
    held = {"bare module": [lin], "identity in a nested list": [[lin]],
            "identity in a deque": collections.deque([lin]), "identity in a dict of tuples": {"f": (lin,)}}[kind]
    object.__setattr__(mid, "fns", held)
    get = {"bare module": lambda: mid.fns[0], "identity in a nested list": lambda: mid.fns[0][0],
           "identity in a deque": lambda: mid.fns[0], "identity in a dict of tuples": lambda: mid.fns["f"][0]}[kind]
    mid.forward = lambda x: x + get()(x)
    a = nn.Sequential(collections.OrderedDict(first=nn.Linear(8, 8), mid=mid)).eval()
    b = nn.Sequential(collections.OrderedDict(own=lin, mid=mid)).eval()
    lora.inject(a, ["first"], r=2)
    with torch.no_grad(), lora.batch_adapters(a, ["default", None]):
        with pytest.raises(RuntimeError, match=r"^inject: module 'mid' is served by an open mixed batch"):
            lora.inject(b, ["own"], r=2)
    assert type(get()) is nn.Linear
