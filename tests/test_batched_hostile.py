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

    def interrupted(self, slot, layer_, name):
        calls["n"] += 1
        if calls["n"] == 2:
            real(self, slot, layer_, name)
            raise KeyboardInterrupt
        return real(self, slot, layer_, name)

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
