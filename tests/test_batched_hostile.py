"""Mixed batches tried as a hostile user would: copies and pickles of a model with slots, an exception or a
Ctrl-C while a batch is opened or used, and a batch of the wrong length from generate-style beam expansion."""
import copy
import pickle

import pytest
import torch

import lora_ext as lora
from lora_ext import batched
from helpers import TOL, rel_err
from test_batched import base_of, make_input, make_layer, oracle


def test_copies_and_pickles_of_a_model_with_slots():
    layer = make_layer("linear").eval()
    x = make_input("linear", (3,))
    names = ["a", None, "c"]
    with torch.no_grad():
        with lora.batch_adapters(layer, names):
            want = layer(x)
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert lora.slot_config(other)["adapters"] == [None] * lora.slot_config(other)["slots"]
            with lora.batch_adapters(other, names):
                assert torch.equal(other(x), want)
            with lora.batch_adapters(layer, names):  # the original's slots are its own
                assert torch.equal(layer(x), want)


def test_an_error_inside_the_block_releases_the_slots():
    layer = make_layer("linear").eval()
    lora.configure_slots(layer, slots=4, max_rank=5)  # a, b, c and the merged "default"
    x = make_input("linear", (3,))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            with lora.batch_adapters(layer, ["a", "b", "c"]):
                layer(x)
                raise RuntimeError("boom")
        assert batched.ACTIVE.get() is None  # the block is closed
        assert not layer.__dict__["_lora_ext_slot_pool"].busy()
        # the slots are free again
        with lora.batch_adapters(layer, ["default", "b", "a"]):
            got = layer(x)
    assert rel_err(got, oracle(layer, x, ["default", "b", "a"], base_of(layer))) < TOL[torch.float32]


def test_ctrl_c_while_slots_are_loaded(monkeypatch):
    layer = make_layer("merged").eval()
    x = make_input("merged", (3,))
    real = batched.LayerSlots.load
    calls = {"n": 0}

    def interrupted(self, slot, layer_, name, *rest):
        calls["n"] += 1
        if calls["n"] == 2:
            real(self, slot, layer_, name, *rest)
            raise KeyboardInterrupt
        return real(self, slot, layer_, name, *rest)

    monkeypatch.setattr(batched.LayerSlots, "load", interrupted)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            with lora.batch_adapters(layer, ["a", "b", "c"]):
                pass
        monkeypatch.setattr(batched.LayerSlots, "load", real)
        assert not layer.__dict__["_lora_ext_slot_pool"].busy()
        with lora.batch_adapters(layer, ["c", "b", "a"]):
            got = layer(x)
    assert rel_err(got, oracle(layer, x, ["c", "b", "a"], base_of(layer))) < TOL[torch.float32]


def test_a_slot_half_written_is_written_again(monkeypatch):
    layer = make_layer("linear").eval()
    layer.unmerge()
    x = make_input("linear", (2,))
    real = batched.LayerSlots._write

    def torn(self, slot, at, bt, s):
        self.a[slot].copy_(at)  # A written, then the process is interrupted before B and the scaling
        raise KeyboardInterrupt

    monkeypatch.setattr(batched.LayerSlots, "_write", torn)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            with lora.batch_adapters(layer, ["a", "b"]):
                pass
        monkeypatch.setattr(batched.LayerSlots, "_write", real)
        with lora.batch_adapters(layer, ["a", "b"]):
            got = layer(x)
    assert rel_err(got, oracle(layer, x, ["a", "b"], base_of(layer))) < TOL[torch.float32]


def test_beam_expansion_is_refused_with_the_shapes():
    layer = make_layer("linear").eval()
    x = make_input("linear", (2, 5))
    with torch.no_grad(), lora.batch_adapters(layer, ["a", "b"]):
        with pytest.raises(ValueError, match=r"2 rows were given for an input of shape \(6, 5, 24\)"):
            layer(x.repeat(3, 1, 1))  # num_beams=3 expands every row


def test_unsupported_dtype_of_rows_and_names():
    layer = make_layer("linear").eval()
    with pytest.raises(ValueError, match="rows must be a 1-D int32/int64 tensor"):
        with lora.batch_adapters(layer, ["a"], rows=torch.zeros(2)):
            pass
    with pytest.raises(TypeError, match="list of adapter names"):
        with lora.batch_adapters(layer, "a"):
            pass
    with pytest.raises(ValueError, match="no rows"):
        with lora.batch_adapters(layer, []):
            pass


# ---------------------------------------------------------------------------------------------------------------
# a second hostile pass (its findings, each fixed)


def test_a_slot_another_batch_serves_is_never_rewritten():
    import threading
    layer = make_layer("linear").eval()
    layer.unmerge()
    x = make_input("linear", (2,))
    opened, changed = threading.Event(), threading.Event()
    first = {}

    def serve():
        with torch.no_grad(), lora.batch_adapters(layer, ["a", None]):
            first["r1"] = layer(x)
            opened.set()
            changed.wait(30)
            first["r2"] = layer(x)

    t = threading.Thread(target=serve)
    t.start()
    opened.wait(30)
    A, B, s = layer.get_adapter("a")
    layer.add_adapter("a", A * 3, B, s)  # "a" changes while the other thread's batch serves it
    changed.set()
    with torch.no_grad(), lora.batch_adapters(layer, ["a", None]):  # waits for that batch to close
        got = layer(x)
    t.join(30)
    assert torch.equal(first["r1"], first["r2"]), "an open batch's slot was rewritten under it"
    assert rel_err(got, oracle(layer, x, ["a", None], base_of(layer))) < TOL[torch.float32]


def test_ctrl_c_while_the_block_is_set_up(monkeypatch):
    from lora_ext.serving import batches
    layer = make_layer("linear").eval()
    x = make_input("linear", (2,))
    with torch.no_grad():
        plain = layer(x)

    def interrupted(model):
        raise KeyboardInterrupt

    monkeypatch.setattr(batches, "_install_check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with lora.batch_adapters(layer, ["a", "b"]):
            pass
    monkeypatch.undo()
    assert not batched.ACTIVE.get() and not layer.__dict__["_lora_ext_slot_pool"].busy()
    with torch.no_grad():
        assert torch.equal(layer(x), plain)  # no batch left behind
        with lora.batch_adapters(layer, ["a", "b"]):  # and the model takes a new one
            layer(x)


def test_generators_whose_blocks_close_out_of_order():
    l1, l2 = make_layer("linear").eval(), make_layer("linear").eval()
    x = make_input("linear", (2,))

    def gen(layer, names):
        with lora.batch_adapters(layer, names):
            for _ in range(3):
                yield layer(x)

    with torch.no_grad():  # (grad mode is thread state: a generator's own no_grad would leak across them)
        g1, g2 = gen(l1, ["a", "b"]), gen(l2, ["c", "a"])
        next(g1), next(g2), next(g1)
        for _ in g1:
            pass
        got = next(g2)  # g1 closed first: g2's batch must still be there
    assert rel_err(got, oracle(l2, x, ["c", "a"], base_of(l2))) < TOL[torch.float32]


def test_batches_sharing_a_layer_are_refused():
    layer = make_layer("linear").eval()
    inner = torch.nn.Sequential(layer)
    outer = torch.nn.Sequential(inner, torch.nn.ReLU())
    with lora.batch_adapters(outer, ["a", "b"]):
        with pytest.raises(ValueError, match="already in an open batch"):
            with lora.batch_adapters(inner, ["c", None]):
                pass


def test_load_state_dict_while_a_batch_is_open_is_refused():
    layer = make_layer("linear").eval()
    state = {k: v.clone() * 2 for k, v in layer.state_dict().items()}
    before = layer.weight.detach().clone()
    with lora.batch_adapters(layer, ["a", "b"]):
        with pytest.raises(RuntimeError, match="load_state_dict while a mixed batch"):
            layer.load_state_dict(state)
    assert torch.equal(layer.weight, before)
    layer.load_state_dict(state)  # after the block: fine


def test_broadcast_position_ids_are_refused_when_the_batch_equals_the_length():
    # a LoRA embedding over GPT-2-style position ids (1, T) while the batch has B == T rows
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = make_layer("embedding")
            self.pos = make_layer("embedding")

        def forward(self, ids):
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            return self.tok(ids) + self.pos(pos)

    model = Model().eval()
    ids = torch.randint(0, 30, (4, 4))
    with torch.no_grad(), lora.batch_adapters(model, ["a", "b", "c", None]):
        with pytest.raises(ValueError, match=r"shape \(1, 4\).*broadcast"):
            model(ids)
