"""load_peft_adapter against hostile inputs: a refused load leaves the model exactly as it was and raises a
ValueError / KeyError / FileNotFoundError naming the file and the option; an accepted one matches the real
peft (PeftModel.from_pretrained) on the same model and adapter."""
import json
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings, strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lora_ext
from helpers import rel_err
from tiny_models import gpt2, llama, randomize_lora, tokens

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
NAMED_ERRORS = (ValueError, KeyError, FileNotFoundError)
RAW_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)


def _save_peft(model, path, **kwargs):
    peft_model = randomize_lora(get_peft_model(model, LoraConfig(**kwargs)), names=("lora_",))
    peft_model.eval().save_pretrained(path)
    return peft_model


def _peft_outputs(build, path, x):
    """peft's outputs for the adapter at `path`. peft crashes (AttributeError) on a null rank_pattern or
    alpha_pattern, which lora_ext reads as empty: peft is given {} there."""
    with open(os.path.join(path, CONFIG)) as f:
        cfg = json.load(f)
    if any(k in cfg and cfg[k] is None for k in ("rank_pattern", "alpha_pattern")):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(path, os.path.join(tmp, "a"))
            _edit_config(os.path.join(tmp, "a"), **{k: cfg.get(k) or {} for k in ("rank_pattern", "alpha_pattern")})
            return _peft_outputs(build, os.path.join(tmp, "a"), x)
    return PeftModel.from_pretrained(build(), path).eval()(x).logits


def _served(build=gpt2):
    """A model already serving an adapter (merged), so a refused load has something to spoil."""
    model = build()
    lora_ext.inject(model, ["c_attn", "c_proj"] if build is gpt2 else ["q_proj", "v_proj"], r=2, lora_alpha=4)
    randomize_lora(model)
    return model.eval()


def _state(model):
    """Everything a refused load must leave alone: the state dict bit for bit, module types, adapter names."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    names = {n: (m.active_adapter, tuple(m.adapter_names)) for n, m in model.named_modules()
             if isinstance(m, lora_ext.LoRALayer)}
    merged = {n: m.merged for n, m in model.named_modules() if isinstance(m, lora_ext.LoRALayer)}
    return sd, types, names, merged


def _assert_unchanged(model, before):
    sd, types, names, merged = _state(model)
    assert types == before[1], "module types changed"
    assert names == before[2], "adapter names changed"
    assert merged == before[3], "merge state changed"
    assert set(sd) == set(before[0])
    for k in sd:
        assert sd[k].dtype == before[0][k].dtype and torch.equal(sd[k], before[0][k]), f"{k} changed"


def _refused(model, path, match=None, **kwargs):
    """Loads, expecting a named refusal; checks the model is unchanged; returns the error."""
    before = _state(model)
    with pytest.raises(NAMED_ERRORS) as info:
        lora_ext.load_peft_adapter(model, path, "new", **kwargs)
    assert not isinstance(info.value, RAW_ERRORS), f"raw {type(info.value).__name__} escaped"
    if match is not None:
        assert match in str(info.value), str(info.value)
    _assert_unchanged(model, before)
    return info.value


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A peft adapter of GPT-2's c_attn and c_proj (fan_in_fan_out Conv1D), written by peft."""
    path = str(tmp_path_factory.mktemp("peft") / "adapter")
    _save_peft(gpt2(), path, r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    return path


def _copy(adapter_dir, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(adapter_dir, path)
    return path


def _edit_config(path, **changes):
    file = os.path.join(path, CONFIG)
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)


# -- the device ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,match", [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"),
                                          ("nonsense", "device: 'nonsense'"), ("meta", "device: 'meta'")])
def test_an_unusable_device_is_refused_before_any_layer_changes(adapter_dir, monkeypatch, device, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _served()
    _refused(model, adapter_dir, match, device=device, activate=True)
    _refused(model, adapter_dir, match, device=device, activate=False)
    # into a plain model too (every layer would be injected)
    _refused(gpt2(), adapter_dir, match, device=device)


def test_a_usable_device_still_loads(adapter_dir):
    model, x = _served(), tokens()
    lora_ext.load_peft_adapter(model, adapter_dir, "new", device="cpu", activate=False)
    lora_ext.set_adapter(model, "new")
    assert rel_err(model(x).logits, _peft_outputs(gpt2, adapter_dir, x)) < 1e-5


# -- target_modules / exclude_modules, as peft chooses -----------------------------------------------------


def test_tensors_of_modules_the_config_does_not_target_are_refused(adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    _edit_config(path, target_modules=["c_attn"])  # the file still holds c_proj's factors
    err = _refused(gpt2(), path, "transformer.h.0.attn.c_proj")
    assert "target_modules" in str(err) and WEIGHTS in str(err)
    _edit_config(path, target_modules=["c_attn", "c_proj"], exclude_modules=["h.1.attn.c_proj"])
    _refused(gpt2(), path, "'transformer.h.1.attn.c_proj'")
    _refused(_served(), path, "exclude_modules")


def test_targets_without_tensors_are_refused(adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    _edit_config(path, target_modules=["c_attn", "c_proj", "c_fc"])
    _refused(gpt2(), path, "no factors for module(s) 'transformer.h.0.mlp.c_fc'")


@pytest.mark.parametrize("targets", [["foo"], "foo", "transformer\\.h\\.0", []])
def test_targets_matching_no_module_are_refused_as_peft_does(adapter_dir, tmp_path, targets):
    path = _copy(adapter_dir, tmp_path)
    _edit_config(path, target_modules=targets)
    with pytest.raises(ValueError):  # peft refuses them too
        PeftModel.from_pretrained(gpt2(), path)
    err = _refused(gpt2(), path, "target_modules")
    assert CONFIG in str(err)


@pytest.mark.parametrize("build,kwargs", [
    (llama, dict(r=3, lora_alpha=5, target_modules="all-linear")),
    (llama, dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"],
                 exclude_modules=["layers.1.self_attn.q_proj"])),
    (llama, dict(r=2, lora_alpha=3, target_modules=r".*_proj", exclude_modules=r".*\.1\.mlp\..*")),
    (gpt2, dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["c_fc"], fan_in_fan_out=True)),
])
def test_peft_choice_of_modules_is_honoured(tmp_path, build, kwargs):
    path = str(tmp_path / "adapter")
    peft_model = _save_peft(build(), path, **kwargs)
    x = tokens()
    ref = _peft_outputs(build, path, x)
    assert rel_err(ref, peft_model(x).logits) < 1e-6
    wanted = sorted(n[len("base_model.model."):] for n, m in peft_model.named_modules()
                    if type(m).__module__.startswith("peft.") and hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    model = build()
    assert lora_ext.load_peft_adapter(model, path) == wanted
    assert rel_err(model(x).logits, ref) < 1e-5
    model.eval()
    assert rel_err(model(x).logits, ref) < 1e-5


def test_a_non_leaf_target_is_refused_naming_the_module(adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    _edit_config(path, target_modules=["h.0", "c_attn", "c_proj"])
    err = _refused(gpt2(), path, "'transformer.h.0' is a GPT2Block, not a Linear/Conv1D/Embedding/Conv layer")
    assert isinstance(err, ValueError)
    _edit_config(path, target_modules=r".*h\.0(\.attn)?")
    _refused(gpt2(), path, "'transformer.h.0' is a GPT2Block, not a Linear/Conv1D/Embedding/Conv layer")


# -- errors that name the file and the option ----------------------------------------------------------------


def _write_text(path, name, text, mode="w"):
    with open(os.path.join(path, name), mode) as f:
        f.write(text)


@pytest.mark.parametrize("text,match", [
    ('{"r": 2,', f"{CONFIG}: invalid JSON at line 1"),
    ('{\n"r": 2\n"lora_alpha": 4}', f"{CONFIG}: invalid JSON at line 3"),
    ("", f"{CONFIG}: invalid JSON at line 1"),
    (b"\xff\xfe{}", f"{CONFIG}: invalid JSON"),
    ("[1, 2]", f"{CONFIG}: does not hold a JSON object"),
    ("[" * 100000, f"{CONFIG}: invalid JSON"),
])
def test_malformed_config_files_name_the_file(adapter_dir, tmp_path, text, match):
    path = _copy(adapter_dir, tmp_path)
    _write_text(path, CONFIG, text, "wb" if isinstance(text, bytes) else "w")
    err = _refused(_served(), path, match)
    assert type(err) is ValueError


@pytest.mark.parametrize("changes,match", [
    (dict(target_modules="c_(attn"), "target_modules: invalid regular expression 'c_(attn'"),
    (dict(exclude_modules="(["), "exclude_modules: invalid regular expression"),
    (dict(rank_pattern={"c_(": 2}), "rank_pattern key 'c_(': invalid regular expression"),
    (dict(alpha_pattern={"c_attn": "big"}), "alpha_pattern: 'c_attn' must map to a finite number"),
    (dict(rank_pattern={"c_attn": 1.5}), "rank_pattern: 'c_attn' must map to a positive integer"),
    (dict(rank_pattern=[2]), "rank_pattern: expected a mapping"),
    (dict(target_modules=5), "target_modules: expected a regular expression"),
    (dict(target_modules=["c_attn", 3]), "target_modules: expected a regular expression"),
    (dict(target_modules=None), "target_modules is missing"),
    (dict(peft_type=None), "peft_type"),
    (dict(r="2"), "r must be a positive integer"),
    (dict(r=True), "r must be a positive integer"),
    (dict(lora_alpha=[4]), "lora_alpha must be a finite number"),
    (dict(lora_dropout="0.1"), "lora_dropout must be a number"),
    (dict(use_rslora="yes"), "use_rslora must be true or false"),
    (dict(fan_in_fan_out=1), "fan_in_fan_out must be true or false"),
])
def test_bad_options_name_the_file_and_option(adapter_dir, tmp_path, changes, match):
    path = _copy(adapter_dir, tmp_path)
    _edit_config(path, **changes)
    err = _refused(_served(), path, match)
    assert CONFIG in str(err) and type(err) is ValueError



def test_a_config_without_peft_type_is_refused_as_peft_does(adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    file = os.path.join(path, CONFIG)
    with open(file) as f:
        cfg = json.load(f)
    del cfg["peft_type"]
    with open(file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(KeyError):
        PeftModel.from_pretrained(gpt2(), path)
    _refused(_served(), path, f"{CONFIG}: peft_type is missing")

@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header"])
def test_unreadable_weights_name_the_file(adapter_dir, tmp_path, damage):
    path = _copy(adapter_dir, tmp_path)
    file = os.path.join(path, WEIGHTS)
    data = open(file, "rb").read()
    data = {"truncated": data[: len(data) // 2], "garbage": os.urandom(256), "empty": b"",
            "header": data[:8] + b"{not json" + data[17:]}[damage]
    with open(file, "wb") as f:
        f.write(data)
    err = _refused(_served(), path, f"{WEIGHTS}: ")
    assert type(err) is ValueError and err.__cause__ is not None


@pytest.mark.parametrize("damage,match", [
    ("int", "dtype torch.int32"),
    ("scalar", "rank None"),
    ("rank", "r=2"),
    ("conv-shape", "do not fit"),
    ("embedding-keys", "must be saved as lora_A.weight/lora_B.weight"),
    ("mixed-keys", "has both"),
    ("overflow", "overflows"),
    ("float64-overflow", "non-finite"),
])
def test_bad_tensors_are_refused_naming_the_file(adapter_dir, tmp_path, damage, match):
    path = _copy(adapter_dir, tmp_path)
    file = os.path.join(path, WEIGHTS)
    t = load_file(file)
    a = "base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"
    b = a.replace("lora_A", "lora_B")
    if damage == "int":
        t[a] = t[a].to(torch.int32)
    elif damage == "scalar":
        t[a] = torch.tensor(1.0)
    elif damage == "rank":
        t[a], t[b] = t[a][:1].clone(), t[b][:, :1].clone()
    elif damage == "conv-shape":
        t[a] = t[a][:, None, :, None].clone()
    elif damage == "embedding-keys":
        t[a.replace("lora_A.weight", "lora_embedding_A")] = t.pop(a)
        t[b.replace("lora_B.weight", "lora_embedding_B")] = t.pop(b)
    elif damage == "mixed-keys":
        t[a.replace("lora_A.weight", "lora_embedding_A")] = t.pop(a)
    elif damage == "overflow":
        t[b][0, 0] = 3e38  # finite, but scaling (2) times it is not
    else:
        t[b] = t[b].double()
        t[b][0, 0] = 1e300  # finite in float64, inf in the layer's float32
    save_file(t, file)
    err = _refused(_served(), path, match)
    assert WEIGHTS in str(err)
    _refused(gpt2(), path, match)


def test_bad_arguments_are_refused(adapter_dir):
    model = _served()
    before = _state(model)
    for kwargs, match in [(dict(adapter_name=""), "adapter_name"), (dict(adapter_name=3), "adapter_name"),
                          (dict(merge_weights="yes"), "merge_weights"), (dict(activate=None), "activate")]:
        with pytest.raises(ValueError, match=match):
            lora_ext.load_peft_adapter(model, adapter_dir, **kwargs)
    with pytest.raises(ValueError, match="path"):
        lora_ext.load_peft_adapter(model, 42)
    with pytest.raises(FileNotFoundError):
        lora_ext.load_peft_adapter(model, os.path.join(adapter_dir, "missing"))
    _assert_unchanged(model, before)


# -- fuzz ---------------------------------------------------------------------------------------------------

_NAMES = st.sampled_from(["c_attn", "c_proj", "c_fc", "attn", "h.0", "h.1.attn.c_proj", "transformer.h.0.attn.c_attn",
                          "foo", "lm_head", "wte", "", "mlp"])
_REGEXES = st.sampled_from([".*", r".*\.c_attn", r".*(c_attn|c_proj)", "c_attn", "(", "[a-", "*", r".*h\.0.*",
                            r"transformer\.h\.\d\.attn\.c_(attn|proj)", "all-linear", "ALL-LINEAR"])
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=True) | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=6)
_SPEC = _REGEXES | st.lists(_NAMES, max_size=4) | _JSON
_OPTIONS = {
    "r": st.integers(0, 4) | _JSON, "lora_alpha": st.floats(-8, 8) | _JSON, "target_modules": _SPEC,
    "exclude_modules": st.none() | _SPEC, "use_rslora": st.booleans() | _JSON, "lora_dropout": st.floats(0, 1) | _JSON,
    "rank_pattern": st.dictionaries(_NAMES | _REGEXES, st.integers(0, 3) | _JSON, max_size=2) | _JSON,
    "alpha_pattern": st.dictionaries(_NAMES | _REGEXES, st.floats(-4, 4) | _JSON, max_size=2) | _JSON,
    "bias": st.sampled_from(["none", "all"]) | _JSON, "peft_type": st.sampled_from(["LORA", "IA3"]) | _JSON,
    "fan_in_fan_out": st.booleans() | _JSON, "init_lora_weights": st.sampled_from([True, False, "pissa"]) | _JSON,
    "use_dora": st.booleans(), "task_type": st.sampled_from([None, "CAUSAL_LM", "SEQ_CLS"]),
}
_FUZZ = settings(max_examples=int(os.environ.get("LORA_EXT_FUZZ_EXAMPLES", "30")), deadline=None,
                 suppress_health_check=list(HealthCheck))


def _check_outcome(path, served):
    """The load either matches peft or is a named refusal leaving the model unchanged."""
    model = _served() if served else gpt2()
    before, x = _state(model), tokens()
    try:
        lora_ext.load_peft_adapter(model, path, "new")
    except NAMED_ERRORS as e:
        assert not isinstance(e, RAW_ERRORS), f"raw {type(e).__name__} escaped: {e}"
        msg = str(e)
        assert CONFIG in msg or WEIGHTS in msg, f"the message names no file: {msg}"
        _assert_unchanged(model, before)
        event(f"refused: {type(e).__name__}")
        return False
    event("loaded")
    with open(os.path.join(path, CONFIG)) as f:
        cfg = json.load(f)
    alphas = [cfg.get("lora_alpha", 8), *(cfg.get("alpha_pattern") or {}).values()]
    if any(abs(a) > 1e4 for a in alphas):  # a huge lora_alpha (from _JSON's floats) overflows float32, in peft too:
        event("overflows float32")  # its rows are then inf, NaN or 0 depending on the order of the ops
        return True
    assert rel_err(model(x).logits, _peft_outputs(gpt2, path, x)) < 1e-5
    return True


@_FUZZ
@given(changes=st.fixed_dictionaries({}, optional=_OPTIONS), drop=st.lists(st.sampled_from(sorted(_OPTIONS)), max_size=3),
       cut=st.none() | st.integers(0, 400), served=st.booleans())
def test_fuzz_adapter_config(adapter_dir, changes, drop, cut, served):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a")
        shutil.copytree(adapter_dir, path)
        with open(os.path.join(path, CONFIG)) as f:
            cfg = json.load(f)
        cfg.update(changes)
        for key in drop:
            cfg.pop(key, None)
        text = json.dumps(cfg)
        with open(os.path.join(path, CONFIG), "w") as f:
            f.write(text if cut is None else text[:cut])
        _check_outcome(path, served)


_MODULES = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0",
            "transformer.wte", "lm_head", "nothing", ""]
_SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".base_layer.weight", ".bias"]
_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool, torch.float8_e4m3fn]


@st.composite
def _damage(draw):
    return draw(st.lists(st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 7)),
        st.tuples(st.just("add"), st.sampled_from(_MODULES), st.sampled_from(_SUFFIXES),
                  st.lists(st.integers(0, 5), min_size=0, max_size=3)),
        st.tuples(st.just("shape"), st.integers(0, 7), st.integers(-1, 1), st.integers(0, 1)),
        st.tuples(st.just("dtype"), st.integers(0, 7), st.sampled_from(_DTYPES)),
        st.tuples(st.just("value"), st.integers(0, 7), st.sampled_from([float("nan"), float("inf"), -3e38, 0.0])),
        st.tuples(st.just("rename"), st.integers(0, 7), st.sampled_from(_MODULES)),
    ), max_size=3))


@_FUZZ
@given(damage=_damage(), cut=st.none() | st.integers(0, 20000), served=st.booleans())
# (CI's run found it: the damage itself raised, growing an empty dimension that an "add" step made)
@example(damage=[("add", "transformer.h.0.mlp.c_fc", ".lora_A.weight", [0]), ("shape", 4, 1, 0)], cut=None,
         served=False)
def test_fuzz_adapter_file(adapter_dir, damage, cut, served):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a")
        shutil.copytree(adapter_dir, path)
        file = os.path.join(path, WEIGHTS)
        t = load_file(file)
        for step in damage:
            keys = sorted(t)
            if not keys and step[0] != "add":
                continue
            what = step[0]
            if what == "add":
                t["base_model.model." + step[1] + step[2]] = torch.randn(tuple(step[3]))
                continue
            key = keys[step[1] % len(keys)]
            if what == "drop":
                del t[key]
            elif what == "shape":
                v = t[key]
                dim = step[3] % max(v.dim(), 1)
                # (growing repeats the first slice: none in an empty dimension, which an "add" step can make)
                if v.dim() and v.shape[dim] + step[2] >= 0 and (step[2] <= 0 or v.shape[dim] > 0):
                    t[key] = v.narrow(dim, 0, v.shape[dim] + step[2]).clone() if step[2] <= 0 else \
                        torch.cat([v, v.narrow(dim, 0, 1)], dim)
            elif what == "dtype":
                t[key] = t[key].to(step[2])
            elif what == "value":
                if t[key].numel() and t[key].is_floating_point():
                    t[key] = t[key].clone()
                    t[key].view(-1)[0] = step[2]
            else:  # rename the module
                suffix = next((s for s in _SUFFIXES if key.endswith(s)), "")
                t["base_model.model." + step[2] + suffix] = t.pop(key)
        save_file({k: v.contiguous() for k, v in t.items()}, file)
        if cut is not None:
            with open(file, "r+b") as f:
                f.truncate(min(cut, os.path.getsize(file)))
        _check_outcome(path, served)


@pytest.mark.parametrize("dropped,kept", [("lora_B", "lora_A"), ("lora_A", "lora_B")])
def test_a_missing_factor_is_named_the_right_way_round(tmp_path, dropped, kept):
    _save_peft(llama(), str(tmp_path), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    sd = load_file(str(tmp_path / WEIGHTS))
    del sd[f"base_model.model.model.layers.1.self_attn.q_proj.{dropped}.weight"]
    save_file(sd, str(tmp_path / WEIGHTS))
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"module 'model.layers.1.self_attn.q_proj' has {kept} but not {dropped}$"):
        lora_ext.load_peft_adapter(model, str(tmp_path))
    assert set(model.state_dict()) == set(before) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
