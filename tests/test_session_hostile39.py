"""Forty-eighth session: what this session's hostile rounds and its own reading gave, each with a test that fails on
the commit before its fix."""
import threading

import pytest
import torch

import lora_ext as lora
from helpers import hf_model
from lora_ext.serving.adapters import model_lock

transformers = pytest.importorskip("transformers")


def _static_generate(model, compile_config, tokens=5):
    ids = torch.tensor([[1, 2, 3, 4]])
    return model.generate(ids, max_new_tokens=tokens, do_sample=False, cache_implementation="static",
                          compile_config=compile_config)


def _compile_config(on_call):
    """transformers' CompileConfig whose backend runs the traced graph eagerly, calling on_call() before each run
    (a decode step), and compiles on a CPU too (as on a GPU by default)."""
    def backend(gm, example_inputs):
        def run(*args):
            on_call()
            return gm.forward(*args)
        return run
    config = transformers.CompileConfig(backend=backend, fullgraph=False, mode=None)
    config._compile_all_devices = True
    return config


def test_static_cache_generate_decode_steps_take_the_models_read():
    # S2: generate() compiles the model's __call__ itself for its decode steps (get_compiled_call): they took no read,
    # and a switch through the model meanwhile wrote in the middle of them (one read for six tokens, the prefill's)
    model = hf_model("llama").eval()
    lora.set_adapter(model, "b")
    lock = model_lock(model)
    held = []
    config = _compile_config(lambda: held.append(lock.holds_read()))
    expected = _static_generate(model, None)  # (eager: no compile on a CPU without _compile_all_devices)
    for _ in range(2):  # (the first generate compiles; the second takes the compiled call transformers kept)
        held.clear()
        assert torch.equal(_static_generate(model, config), expected)
        assert len(held) >= 4 and all(held), held
    # a model of the same class lora_ext never locked: its generate compiles as before, and takes no lock
    plain = transformers.LlamaForCausalLM(model.config)
    calls = []
    _static_generate(plain, _compile_config(lambda: calls.append(1)))
    assert calls and "_lora_ext_model_lock" not in plain.__dict__


def test_a_switch_during_a_compiled_decode_step_waits_for_it():
    model = hf_model("llama").eval()
    lora.set_adapter(model, "b")
    switch, steps = [], []

    def on_call():
        steps.append(model.model.layers[0].self_attn.q_proj.active_adapter)
        if len(steps) == 2:  # inside the second decode step: a switch from another thread
            t = threading.Thread(target=lambda: lora.set_adapter(model, "default"), daemon=True)
            t.start()
            t.join(0.5)
            switch.append((t, t.is_alive()))
    _static_generate(model, _compile_config(on_call), tokens=6)
    t, waited = switch[0]
    t.join(10)
    assert waited, "the switch wrote in the middle of a compiled decode step"
    assert not t.is_alive() and model.model.layers[0].self_attn.q_proj.active_adapter == "default"
    assert steps[:2] == ["b", "b"] and steps[-1] == "default"  # it landed between two steps
