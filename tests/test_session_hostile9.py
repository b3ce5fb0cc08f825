"""A hostile pass (a helper's) over this session's changes: peft's layer filter (layers_to_transform /
layers_pattern) and the Ctrl-C hold (named_adapters.deferred_interrupt). Each test failed before its fix:
1-2 a real SIGINT during a layer's merge or unmerge was delivered after the weight was written but before
`merged` said so (older than this session); 3 a SIGINT handler that switches adapters ran between two layers of a
model-level switch, leaving a mix; 4 layers_pattern "" is peft's default rule; 5 an alternation in layers_pattern
raised TypeError; 6 fused modules skipped the layer filter."""
import contextlib
import json
import os
import signal

import pytest
import torch
import torch.nn as nn

import lora_ext
import lora_ext as lora
import tiny_models
from lora_ext.serving import injection


# ---------------------------------------------------------------------------------------------------
# 1
@contextlib.contextmanager
def _sigint_in(layer, method):
    """A real SIGINT sent as the layer's `method` starts (the instance's method replaced while open): a Ctrl-C while
    the weight is being written."""
    real = getattr(layer, method)

    def hooked(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    setattr(layer, method, hooked)
    try:
        yield
    finally:
        layer.__dict__.pop(method, None)


def _still_right(layer, x, ref, *steps, tol=1e-5):
    """Whatever the interrupt left: `merged` says what the weight holds, and the outputs are the adapter's, once,
    now and after each of `steps` (layer methods: "train", "eval", "unmerge")."""
    assert layer.merged == (layer._merged_A is not None), "merged does not say what the weight holds"
    for step in (None, *steps):
        if step is not None:
            getattr(layer, step)()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref, atol=tol, rtol=tol)


def _layer():
    torch.manual_seed(0)
    layer = lora.Linear(8, 8, r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("how", ["eval", "merge"])
def test_sigint_during_layer_merge_keeps_outputs(python_sigint, how):
    layer = _layer()
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = layer(x).clone()
    with _sigint_in(layer, "_merge_into"), pytest.raises(KeyboardInterrupt):
        layer.eval() if how == "eval" else layer.merge()
    _still_right(layer, x, ref, "train", "unmerge")


def test_sigint_during_merge_adapter_all_or_none(python_sigint):
    torch.manual_seed(0)
    model = nn.Sequential(*[lora.Linear(8, 8, r=2, lora_alpha=4) for _ in range(3)])
    for m in model:
        nn.init.normal_(m.lora_B)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x).clone()
    with _sigint_in(model[1], "_merge_into"), pytest.raises(KeyboardInterrupt):
        lora.merge_adapter(model)
    states = [(m.merged, m._merged_A is not None) for m in model]
    assert all(s == states[0] for s in states) and all(a == b for a, b in states), states
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_sigint_during_lossless_bf16_merge_gives_the_base_back(python_sigint):
    """bf16 (lossless by default): after the interrupted eval(), train() must give the exact base weight back."""
    torch.manual_seed(0)
    layer = lora.Linear(16, 16, r=2, lora_alpha=4).bfloat16()
    nn.init.normal_(layer.lora_B)
    base = layer.weight.detach().clone()
    with _sigint_in(layer, "_merge_into"), pytest.raises(KeyboardInterrupt):
        layer.eval()
    layer.train()
    assert torch.equal(layer.weight, base)  # now: the adapter stays in the weight for good


# ---------------------------------------------------------------------------------------------------
# 2
@pytest.mark.parametrize("how", ["train", "unmerge"])
def test_sigint_during_layer_unmerge_keeps_outputs(python_sigint, how):
    torch.manual_seed(0)
    layer = lora.Linear(8, 8, r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = layer(x).clone()
    layer.eval()
    with _sigint_in(layer, "_unmerge_from"), pytest.raises(KeyboardInterrupt):
        layer.train() if how == "train" else layer.unmerge()
    _still_right(layer, x, ref, "train", "eval")  # (train() raised TypeError before)


# ---------------------------------------------------------------------------------------------------
# 3
def test_sigint_handler_switching_adapters_leaves_one_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(*[lora.Linear(8, 8, r=2, lora_alpha=4) for _ in range(3)])
    for m in model:
        nn.init.normal_(m.lora_B)
        m.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 0.5)
        m.add_adapter("c", torch.randn(2, 8), torch.randn(8, 2), 0.7)
    model.eval()
    x = torch.randn(3, 8)
    outs = {}
    for n in ["default", "b", "c"]:
        lora.set_adapter(model, n)
        with torch.no_grad():
            outs[n] = model(x).clone()
    lora.set_adapter(model, "default")

    handled = []

    def handler(sig, frame):
        handled.append(sig)
        try:
            lora.set_adapter(model, "c")
        except Exception as err:  # a refusal of the re-entrant switch is an acceptable outcome
            handled.append(err)

    real = model[1]._swap_into
    sent = []

    def swap_into(*args, **kwargs):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        model[1]._swap_into = swap_into
        lora.set_adapter(model, "b")
    finally:
        signal.signal(signal.SIGINT, previous)
        model[1].__dict__.pop("_swap_into", None)
    assert handled, "the handler never ran"
    actives = [m.active_adapter for m in model]
    assert len(set(actives)) == 1, f"model left on a mix of adapters: {actives}"
    with torch.no_grad():
        torch.testing.assert_close(model(x), outs[actives[0]], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# 4
def _peft_choice(targets, **kw):
    """The modules the real peft adapts in a tiny Llama for these target_modules and options."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    model = get_peft_model(tiny_models.llama(), LoraConfig(r=2, target_modules=targets, **kw))
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))


def _base_and_adapter(tmp_path, **layers):
    """A tiny Llama saved as the base, and a peft adapter of its q_proj with `layers` (layers_to_transform,
    layers_pattern) saved by peft: (base dir, adapter dir, the peft model)."""
    from peft import LoraConfig, get_peft_model
    base = str(tmp_path / "base")
    tiny_models.llama().save_pretrained(base)
    peft_model = tiny_models.randomize_lora(get_peft_model(tiny_models.llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], **layers)))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    return base, adapter, peft_model.eval()


@pytest.mark.parametrize("targets", [["q_proj"], ["lm_head", "q_proj"]])
def test_empty_layers_pattern_chooses_what_peft_chooses(targets):
    want = _peft_choice(targets, layers_to_transform=0, layers_pattern="")
    assert "model.layers.0.self_attn.q_proj" in want
    ours = sorted(n for n, _ in injection.select_targets(tiny_models.llama(), targets, layers_to_transform=0,
                                                         layers_pattern=""))
    assert ours == want


def test_peft_adapter_with_empty_layers_pattern_loads(tmp_path):
    _, adapter, peft_model = _base_and_adapter(tmp_path, layers_to_transform=[0], layers_pattern="")
    x = tiny_models.tokens()
    with torch.no_grad():
        want = peft_model(x).logits
    model = tiny_models.llama()
    lora_ext.load_peft_adapter(model, adapter)  # ValueError before
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=1e-5)


def test_cli_merges_peft_adapter_with_empty_layers_pattern(tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_ext.cli import main
    base, adapter, peft_model = _base_and_adapter(tmp_path, layers_to_transform=[0], layers_pattern="")
    x = tiny_models.tokens()
    with torch.no_grad():
        ref = peft_model.merge_and_unload()(x).logits
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--quiet"]) == 0  # 2 now
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(x).logits, ref,
                                   atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# 5



def test_alternation_in_layers_pattern_chooses_what_peft_chooses():
    targets = ["lm_head", "q_proj"]
    want = _peft_choice(targets, layers_to_transform=[0], layers_pattern="layers|h")
    assert want == ["lm_head"]  # peft: the name listed whole; no q_proj lies in a layer by that pattern
    ours = sorted(n for n, _ in injection.select_targets(tiny_models.llama(), targets, layers_to_transform=[0],
                                                         layers_pattern="layers|h"))  # TypeError now
    assert ours == want


def test_alternation_in_layers_pattern_in_layers_does_not_raise_type_error():
    assert injection.in_layers("model.layers.0.mlp.up_proj", [0], "layers|h") is False


def test_cli_with_alternation_in_layers_pattern_fails_cleanly(tmp_path, capsys):
    from lora_ext.cli import main
    base, adapter, _ = _base_and_adapter(tmp_path, layers_to_transform=[0], layers_pattern="layers")
    cfg_file = os.path.join(adapter, "adapter_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["layers_pattern"] = "layers|h"  # peft: selects no q_proj (so ignores the file's factors)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "merged")
    rc = main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and not os.path.exists(out)
    assert "unexpected TypeError" not in err, err  # now: 'unexpected TypeError: int() argument must be ...'


# ---------------------------------------------------------------------------------------------------
# 6
@pytest.mark.parametrize("targets,pattern", [(["c_fc"], None), (None, "h")])
def test_layers_to_transform_applies_to_fused_modules(targets, pattern):
    model = tiny_models.gpt2()
    try:
        names = lora_ext.inject(model, targets, r=2, fused={"c_attn": [True, False, True]}, layers_to_transform=[0],
                                layers_pattern=pattern)
    except ValueError:
        return  # a refusal of the combination is fine
    assert all(".h.0." in n for n in names), names  # now: 'transformer.h.1.attn.c_attn' too


# ---------------------------------------------------------------------------------------------------
# 7 (found reading 1-2's fix): a dtype change of a merged layer unmerges, converts and merges again


def test_sigint_during_a_merged_layers_dtype_change_keeps_outputs(python_sigint):
    layer = _layer()
    x = torch.randn(3, 8, dtype=torch.float64)
    layer.eval()
    with _sigint_in(layer, "_unmerge_from"), pytest.raises(KeyboardInterrupt):
        layer.double()
    assert layer.weight.dtype == torch.float64 and layer.merged and layer._merged_A is not None
    with torch.no_grad():
        merged = layer(x)
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), merged, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("where", ["_unmerge_from", "_merge_into"], ids=["unmerge", "merge again"])
def test_sigint_during_a_merged_layers_load_keeps_outputs(python_sigint, where):
    layer = _layer()
    x = torch.randn(3, 8)
    layer.eval()
    with torch.no_grad():
        want = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # the base and the same factors
    with _sigint_in(layer, where), pytest.raises(KeyboardInterrupt):
        layer.load_state_dict(state)
    _still_right(layer, x, want, "train", "eval", tol=1e-6)
