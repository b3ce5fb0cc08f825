"""peft LoRA adapter directories: adapter_config.json + adapter_model.safetensors.

Tensor keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (linear layers, transformers
Conv1D, convolutions) and `.lora_embedding_A` / `.lora_embedding_B` (embeddings), <module> being the module's
name in the model given to peft. peft's factors are loralib's: A is (r, in), B is (out, r) whatever the
weight layout (fan_in_fan_out only says how the base weight is stored); embeddings: A (r, num), B (dim, r).
Only safetensors files (or, for adapter_model.bin, torch.load with weights_only=True) are read; peft
itself is not needed to read or write these files.
"""
import contextlib
import functools
import json
import math
import os
import re
import warnings
from typing import List, Optional, Union

import torch
import torch.nn as nn

from .. import ddp_guard, layers, ops, sharded
from ..layers import LoRALayer
from ..named_adapters import at_layer, check_adapter_name, deferred_interrupt, held_warnings
from ..utils import _ddp_of, _is_bias, _layer_bias, plain_name, trained_bias, unwrap
from . import checkpoint_names as _ckpt_names
from . import injection as _inject
from . import saved_modules as _saved
from . import tokens as _tokens
from . import hub
from .adapters import THROUGH_DDP, _check_ddp_switch, hold, lora_layers, model_lock, reserved_rank, set_adapter
from .files import atomic_files, remove_stale_temporaries, torn_set

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# Options lora_ext applies.
HONOURED = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
            "use_rslora", "fan_in_fan_out", "lora_dropout", "bias", "layers_to_transform", "layers_pattern",
            "modules_to_save", "trainable_token_indices"}
# Descriptive fields that do not change what the adapter computes.
# (eva_config: how EVA chose the initial factors and ranks, which rank_pattern / alpha_pattern record; peft reads it
# only to initialise)
DESCRIPTIVE = {"base_model_name_or_path", "revision", "task_type", "peft_version", "auto_mapping", "inference_mode",
               "megatron_core", "qalora_group_size", "eva_config"}
# Variants and features lora_ext does not implement: accepted only when off (None, False, empty).
UNSUPPORTED = {"use_dora", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "corda_config",
               "kasa_config", "lora_ga_config", "monteclora_config", "velora_config",
               "layer_replication", "lora_bias", "megatron_config",
               "target_parameters", "loftq_config",
               "ensure_weight_tying"}
# Initialisations that leave the base weights as they were (others, e.g. PiSSA or LoftQ, change them), and serve as
# plain LoRA: MiCA's variant only freezes lora_B in training (see load_peft_adapter). peft matches "gaussian" and
# "mica" in any case, the others exactly.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")
_ANY_CASE_INITS = ("gaussian", "mica")


def _plain_init(value) -> bool:
    if isinstance(value, str) and value.lower() in _ANY_CASE_INITS:
        return True
    return any(value is v or value == v for v in PLAIN_INITS if type(v) is type(value))

BASE_SUFFIX = ".base_layer.weight"
BASE_BIAS_SUFFIX = ".base_layer.bias"  # saved beside an output head's (GPT-J's lm_head) with save_embedding_layers
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA's magnitude of a module (peft's key; `lora-ext merge` reads it)
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


def conv_refusal(conv) -> Optional[str]:
    """Why peft's adapter of convolution `conv` serves other outputs than lora_ext's layer there (the update merged
    into the convolution), or None."""
    if conv.groups != 1:
        return (f"groups={conv.groups}: peft's conv adapters map onto lora_ext's layout for groups == 1 only (peft "
                f"cannot merge them either)")
    if conv.padding_mode != "zeros":
        return (f"padding_mode={conv.padding_mode!r}: peft pads its lora_A convolution with zeros, lora_ext merges the "
                f"adapter into the layer's own padding, so the outputs would differ")
    if any(d != 1 and k != 1 for d, k in zip(conv.dilation, conv.kernel_size)):
        return (f"dilation={tuple(conv.dilation)}: peft's lora_A convolution leaves the dilation out (its merge puts "
                f"it in), lora_ext merges the adapter under the layer's dilation, so the outputs would differ from "
                f"peft's unmerged ones")
    return None


def _is_off(value):
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and not value)


def _config_file(path):
    return os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path


# lora_ext's saves bind their two files: the weights' safetensors metadata holds the config's options that decide
# the numbers served (SAVED_OPTIONS, as JSON), which a load compares with the config beside them
SAVED_CONFIG = "lora_ext_config"
SAVED_OPTIONS = {  # (each with peft's default for a config that leaves it out)
    "r": 8, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "target_modules": None,
    "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "fan_in_fan_out": False,
    "modules_to_save": None, "trainable_token_indices": None, "bias": "none", "use_dora": False,
}


def saved_options(cfg) -> dict:
    """The options of config `cfg` that decide the numbers served, as a save binds them (SAVED_CONFIG): peft's
    defaults for those it leaves out, lora_alpha a float, target/exclude lists sorted (peft writes its sets in any
    order), no patterns as {}."""
    out = {}
    for key, default in SAVED_OPTIONS.items():
        value = cfg.get(key, default)
        if key in ("rank_pattern", "alpha_pattern") and value is None:
            value = {}
        elif key == "lora_alpha" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif key in ("target_modules", "exclude_modules") and isinstance(value, list):
            value = sorted(value, key=str)
        out[key] = value
    return out


def read_config(path, dora=False):
    """The adapter_config.json of a peft LoRA adapter directory, checked: anything lora_ext cannot honour (or
    cannot read) raises ValueError naming the file and the option. dora: use_dora may be true (`lora-ext merge`
    merges DoRA adapters; the layers do not serve them). read_tensors checks it against the options a lora_ext
    save bound to the weights (SAVED_CONFIG)."""
    file = _config_file(path)
    if os.path.isdir(path):  # (a save killed between its renames: weights and config of two saves)
        torn = torn_set([os.path.join(path, WEIGHTS_NAME), file])
        if torn is not None:
            raise ValueError(torn)
    if os.path.lexists(file) and not os.path.isfile(file):  # (h9: a FIFO there was reported as missing)
        raise ValueError(f"{file}: not a regular file (a directory, a device, a FIFO or a dangling link: an incomplete "
                         f"download?)")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"adapter: no {CONFIG_NAME} in {path!r}")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: not UTF-8 text ({e})") from e
    except RecursionError as e:
        raise ValueError(f"{file}: invalid JSON: nested too deeply") from e
    except OSError as e:
        raise ValueError(f"{file}: cannot be read ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: does not hold a JSON object")
    where = file
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    for key, value in cfg.items():
        if key in HONOURED or key in DESCRIPTIVE:
            continue
        if key == "init_lora_weights":
            if not _plain_init(value):
                raise ValueError(f"{where}: init_lora_weights={value!r} changes the base weights; lora_ext "
                                 f"supports adapters made with init_lora_weights in {PLAIN_INITS}")
        elif key == "use_dora" and dora:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: use_dora must be true or false, got {value!r}")
        elif key in UNSUPPORTED:
            if not _is_off(value):
                if key == "use_dora":
                    raise ValueError(f"{where}: use_dora={value!r} (DoRA) is not supported by lora_ext's layers; "
                                     f"`lora-ext merge` merges a DoRA adapter into a checkpoint")
                raise ValueError(f"{where}: {key}={value!r} ({key}) is not supported by lora_ext")
        elif not _is_off(value):
            raise ValueError(f"{where}: unknown option {key}={value!r}; lora_ext does not know how to honour it")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={cfg['bias']!r} is not supported (only 'none': the adapter holds no biases)")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    dropout = cfg.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{where}: {key} must be true or false, got {cfg[key]!r}")
    _inject.check_patterns(f"{where}: rank_pattern", cfg.get("rank_pattern"), rank=True)
    _inject.check_patterns(f"{where}: alpha_pattern", cfg.get("alpha_pattern"), rank=False)
    _inject.check_name_spec(f"{where}: target_modules", cfg.get("target_modules"))
    _inject.check_name_spec(f"{where}: exclude_modules", cfg.get("exclude_modules"))
    _inject.check_layers(where, cfg.get("target_modules"), cfg.get("layers_to_transform"), cfg.get("layers_pattern"))
    _saved.check_entries(where, cfg.get("modules_to_save"))
    _tokens.check_spec(where, cfg.get("trainable_token_indices"))
    return cfg


def _write_bytes(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _check_saved_options(st, saved, config, path):
    try:
        saved = json.loads(saved)
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"{st}: its metadata {SAVED_CONFIG!r} (the options lora_ext saved it with) is not a JSON "
                         f"object")
    now = saved_options(config)
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        raise ValueError(f"{st} was saved with other options than {os.path.join(path, CONFIG_NAME)} holds ("
                         + "; ".join(f"{k}: {saved[k]!r} saved, {now[k]!r} now" for k in differ)
                         + "): a save killed between its two renames, a save by another process while this load "
                         "read the adapter, or an edit of the config since; served, the weights would give other "
                         "numbers than they were saved with. Save the adapter again (or load it again once that "
                         f"save is done); to load them as the config says, remove {SAVED_CONFIG!r} from the "
                         "weights' metadata")


def _replaced(path, opened: os.stat_result) -> bool:
    """Whether `path` names another file now than `opened` (an os.fstat of it), or none."""
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def read_tensors(path, config=None):
    """{key: tensor} of the adapter's weights file (safetensors, or adapter_model.bin with weights_only);
    a file that cannot be read raises ValueError naming it. Signals with Python handlers are held back while it is
    read (deferred_interrupt), so that what a handler raises (a timeout, Ctrl-C) comes out as it was raised, after
    the read, never rewrapped as the file's fault. `config` (read_config's): weights a lora_ext save bound to
    other options than the config read has (SAVED_CONFIG: a save killed between its renames while its process id
    lives on, pid 1 in a container; a save by another process between the two reads; an edit of r, lora_alpha,
    the patterns or the targets since) are refused, naming the options."""
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.lexists(st) and not os.path.isfile(st):  # (h9: a directory, a device, a FIFO or a dangling link there
        # fell back to an older adapter_model.bin beside it without a word, 11705 off)
        raise ValueError(f"{st}: not a regular file (a directory, a device, a FIFO or a dangling link: an incomplete "
                         f"download?); the adapter's weights are read from it, never from {LEGACY_WEIGHTS_NAME} "
                         f"beside it")
    if os.path.isfile(st):
        from safetensors import safe_open
        with deferred_interrupt():
            for _ in range(3):
                before = None  # (the file opened, once it is)
                try:
                    # safetensors' safe_open opens the name twice (the header, with the options a lora_ext save
                    # binds the weights to, then the data): another process's save renamed in between paired one
                    # save's options with another's factors, which the check below then passed (h9: 19 of 2365 loads
                    # during two processes' saves served A's factors at B's lora_alpha, 2338 off). The name's file is
                    # taken before and after the read: the same one throughout, or read again (not into memory
                    # whole: r11, twice the file's size)
                    with open(st, "rb") as f:
                        before = os.fstat(f.fileno())
                        with safe_open(st, framework="pt") as g:
                            saved = (g.metadata() or {}).get(SAVED_CONFIG)
                            tensors = {k: g.get_tensor(k) for k in g.keys()}
                        replaced = _replaced(st, before)  # (while it is open: its inode number not yet free)
                except Exception as e:  # safetensors' SafetensorError, OSError, ...
                    if before is not None and _replaced(st, before):  # (its data read from another save's file)
                        continue
                    raise ValueError(f"{st}: not a readable safetensors file ({type(e).__name__}: {e})") from e
                if not replaced:
                    break
            else:
                raise ValueError(f"{st}: replaced while it was read, three times (another process saving there?); "
                                 f"load it when the saves are done")
        if saved is not None and config is not None:
            _check_saved_options(st, saved, config, path)
        file = st
    else:
        legacy = os.path.join(path, LEGACY_WEIGHTS_NAME)
        if not os.path.isfile(legacy):
            raise FileNotFoundError(f"adapter: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} in {path!r}")
        with deferred_interrupt():
            try:
                tensors = torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle errors, the weights_only refusal, truncation
                raise ValueError(f"{legacy}: cannot be read with torch.load(weights_only=True) "
                                 f"({type(e).__name__}: {e})") from e
        file = legacy
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{file}: does not hold a mapping of names to tensors")
    return _without_adapter_name(tensors, file)


# a factor key that carries an adapter's name, as a peft model's own state_dict() names it
# (`<module>.lora_A.default.weight`; peft's save_pretrained leaves the name out)
_NAMED_FACTOR = re.compile(r"^(.*\.lora_(?:A|B))\.([^.]+)\.weight$|^(.*\.lora_embedding_(?:A|B))\.([^.]+)$")


def _without_adapter_name(tensors, file):
    """The tensors with the adapter name taken out of factor keys that carry one, when every factor key carries the
    same name (peft loads such a file under that adapter's name); a file whose keys name several adapters is
    refused."""
    named, plain = {}, []
    for key in (k for k in tensors if k.startswith(PREFIX)):
        if _factor_suffix(key) is not None:
            plain.append(key)
        elif (m := _NAMED_FACTOR.match(key)) is not None:
            named[key] = (m.group(1) + ".weight", m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not named:
        return tensors
    names = sorted({n for _, n in named.values()})
    if len(names) > 1:
        raise ValueError(f"{file}: its factor keys name {len(names)} adapters ({names}); lora_ext loads one adapter "
                         f"per file (save each with peft's save_pretrained)")
    if plain:
        raise ValueError(f"{file}: some factor keys carry an adapter's name ({next(iter(named))!r}) and some do not "
                         f"({plain[0]!r})")
    return {named[k][0] if k in named else k: t for k, t in tensors.items()}


def _factor_suffix(key):
    """The LoRA factor suffix `key` ends with (SUFFIXES), or None."""
    return next((s for s in SUFFIXES if key.endswith(s)), None)


def is_lora_key(key) -> bool:
    """Whether module_factors reads `key`: a LoRA factor, a DoRA magnitude, or the base weight peft saves beside
    an embedding's."""
    return key.startswith(PREFIX) and (key.endswith((BASE_SUFFIX, BASE_BIAS_SUFFIX, MAGNITUDE_SUFFIX))
                                       or _factor_suffix(key) is not None)


def factor_modules(tensors):
    """The names of the modules `tensors` (peft keys) hold LoRA factors of, sorted."""
    return sorted({key[len(PREFIX):-len(suffix)] for key in tensors
                   if key.startswith(PREFIX) and (suffix := _factor_suffix(key)) is not None})


def module_factors(tensors, where="adapter", magnitudes=None):
    """({module name: (lora_A, lora_B, is_embedding)}, {module name: base weight}) from peft keys; other
    keys raise ValueError. peft saves an embedding's (or output head's) whole base weight beside its factors
    (`<module>.base_layer.weight`, for resized vocabularies), and a head's bias (`.base_layer.bias`): callers check
    they equal the model's (the bias under (module name, "bias") in the second dict). It also saves them for an
    embedding or head another adapter of the same model adapted (save_embedding_layers="auto"), without factors
    in this file: those are checked against the model too (base_weights_elsewhere). DoRA's magnitudes
    (`<module>.lora_magnitude_vector`) go into the dict `magnitudes` by module name; without one they are
    refused."""
    found, base_weights = {}, {}
    for key, t in tensors.items():
        if key.startswith(PREFIX) and key.endswith(BASE_SUFFIX):
            base_weights[key[len(PREFIX):-len(BASE_SUFFIX)]] = t
            continue
        if key.startswith(PREFIX) and key.endswith(BASE_BIAS_SUFFIX):
            base_weights[key[len(PREFIX):-len(BASE_BIAS_SUFFIX)], "bias"] = t
            continue
        plain = _plain_embedding_layer(key)
        if plain is not None:  # save_embedding_layers of an embedding or head no adapter targets: as above
            base_weights[plain] = t
            continue
        if key.startswith(PREFIX) and key.endswith(MAGNITUDE_SUFFIX):
            if magnitudes is None:
                raise ValueError(f"{where}: unexpected key {key!r}: a DoRA magnitude (lora_ext's layers do not serve "
                                 f"DoRA; `lora-ext merge` merges a DoRA adapter whose config says use_dora)")
            magnitudes[key[len(PREFIX):-len(MAGNITUDE_SUFFIX)]] = t
            continue
        suffix = _factor_suffix(key)
        if suffix is None or not key.startswith(PREFIX):
            raise ValueError(f"{where}: unexpected key {key!r}: neither a LoRA factor "
                             f"({PREFIX}<module>{{{', '.join(SUFFIXES)}}}) nor a tensor of a module the config's "
                             f"modules_to_save (or its task_type) saves whole")
        name = key[len(PREFIX):-len(suffix)]
        entry = found.setdefault(name, {})
        embedding = "embedding" in suffix
        if entry.get("embedding", embedding) != embedding:
            raise ValueError(f"{where}: module {name!r} has both lora_A/lora_B.weight and lora_embedding_A/B keys")
        entry[SUFFIXES[suffix]] = t
        entry["embedding"] = embedding
    out = {}
    for name, entry in found.items():
        if "A" not in entry or "B" not in entry:
            raise ValueError(f"{where}: module {name!r} has lora_{'A' if 'A' in entry else 'B'} but not "
                             f"lora_{'B' if 'A' in entry else 'A'}")
        out[name] = (entry["A"], entry["B"], entry["embedding"])
    for name in magnitudes or ():
        if name not in out:
            raise ValueError(f"{where}: unexpected key {PREFIX + name + MAGNITUDE_SUFFIX!r} (a DoRA magnitude "
                             f"without factors)")
    return out, base_weights


# the modules whose plain weights (and a head's bias) peft's save_pretrained(save_embedding_layers=True) saves when
# no adapter targets them: `base_model.model.<...>.embed_tokens.weight` (peft's EMBEDDING_LAYER_NAMES)
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _plain_embedding_layer(key):
    """The base_weights entry (module name, or (module name, "bias")) of a plain save_embedding_layers key, or None."""
    if not key.startswith(PREFIX):
        return None
    name, _, what = key[len(PREFIX):].rpartition(".")
    if what not in ("weight", "bias") or name.rpartition(".")[2] not in _EMBEDDING_LAYER_NAMES:
        return None
    return name if what == "weight" else (name, "bias")


def base_weights_elsewhere(where, base_weights, factors, current):
    """Checks the base tensors saved for modules without factors in the file (peft saves an embedding's or head's
    whole base weight into every adapter of a model where another adapter targets it): each must be the model's
    own, read by `current(module name, "weight" or "bias")` (None: the model has no such tensor, refused)."""
    for key, saved in base_weights.items():
        name, what = (key[0], "bias") if isinstance(key, tuple) else (key, "weight")
        if name in factors:
            continue
        suffix = BASE_BIAS_SUFFIX if what == "bias" else BASE_SUFFIX
        tensor = current(name, what)
        if tensor is None:
            raise ValueError(f"{where}: unexpected key {PREFIX + name + suffix!r}: a base {what} of module {name!r}, "
                             f"which the model does not have")
        check_base_weight(where, name, saved, tensor, bias=what == "bias")


def check_base_weight(where, name, saved, current, bias=False, merged=None):
    """An adapter's saved base weight (or bias) must be the model's own: lora_ext does not replace base weights.
    Equal to float rounding (1e-5 of the largest element): a float32 base that went through merges is the original
    but for a few units in the last place; another model's, or a resized vocabulary's, differs by far more. A file
    saved in a narrower dtype than the model's (a bfloat16 adapter of a float32 model) is compared with the model's
    weight rounded to it (peft would load the rounded copy into the model; lora_ext keeps the model's). `merged`: the
    merged weight `current` was taken out of (a layer merged without a lossless record): a float16/bfloat16 base
    rebuilt so is the original to a few units of that dtype in the merged weight's last place (G6: 1.2e-4 off in
    bfloat16, refused as another model's at a tolerance of 7.8e-7)."""
    if saved is None:
        return
    key = PREFIX + name + (BASE_BIAS_SUFFIX if bias else BASE_SUFFIX)
    if current is not None and saved.shape == current.shape:
        ref = current.detach()
        if saved.is_floating_point() and ref.is_floating_point() \
                and torch.finfo(saved.dtype).eps > torch.finfo(ref.dtype).eps:
            ref = ref.to(saved.dtype)  # a file saved in a narrower dtype (bfloat16) holds the model's weight rounded
        a = saved.detach().to(ref.dtype).to("cpu", torch.float64)  # (as the model holds it)
        b = ref.to("cpu", torch.float64)
        tol = 1e-5 * b.abs().max()
        if merged is not None and merged.is_floating_point():
            tol = torch.maximum(tol, 4 * torch.finfo(merged.dtype).eps * merged.detach().abs().max().to("cpu",
                                                                                                     torch.float64))
        if torch.equal(a, b) or bool(((a - b).abs().max() <= tol).item()):
            return
    what = "bias" if bias else "weight"
    plain_key = f"{PREFIX}{name}.{what}"  # (the key save_embedding_layers saves the module's tensor under)
    plain = f", or {plain_key} as save_embedding_layers saves it" if _plain_embedding_layer(plain_key) else ""
    raise ValueError(f"{where}: module {name!r} carries a base {what} ({key}{plain}) that differs from the model's "
                     f"(e.g. a resized vocabulary, or a module saved whole that the config's modules_to_save does "
                     f"not name); lora_ext does not replace base weights")


def module_rank_scaling(cfg, name):
    """(r, scaling) of one module under the config's r, lora_alpha, rank/alpha patterns and use_rslora. `name`: the
    module's name in the model the adapter was trained on (peft matches the patterns against those; see
    checkpoint_names.rename_adapter's `trained`)."""
    r = _inject.pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", 8))
    alpha = _inject.pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
    return r, _inject.scaling_for(r, alpha, bool(cfg.get("use_rslora", False)))


def pattern_clash_warning(cfg, names, where) -> None:
    """Warns (once per option, naming `where`, the config file) when two keys of the config's rank_pattern or
    alpha_pattern match one of the modules `names` (as the adapter names them) with different values. peft takes the
    first key in the file, as module_rank_scaling does, but its save_pretrained writes the keys sorted: the first in
    the file may not be the one the adapter trained with (h6: a layer trained at scaling 0.5 served at 7.5 by peft
    and lora_ext alike, silently)."""
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(option) or {}
        if len(patterns) < 2:
            continue
        for name in names:
            hits = [(k, v) for k, v in patterns.items() if _inject.pattern_matches(k, name)]
            other = next((h for h in hits[1:] if h[1] != hits[0][1]), None)  # (16 and 16.0 agree, r6)
            if other is not None:
                warnings.warn(f"{where}: {option} keys {hits[0][0]!r} ({hits[0][1]}) and {other[0]!r} ({other[1]}) "
                              f"both match module {name!r}; the first in the file is taken, as peft takes it, but "
                              f"peft's save_pretrained writes the keys sorted, which may not be the order the adapter "
                              f"trained with: check the value", stacklevel=3)
                break  # (one warning per option)


def _to_layer_layout(layer, name, A, B, where="adapter"):
    """peft's factors in the layer's layout (2-D; convolutions with groups == 1)."""
    if isinstance(layer, layers.MergedLinear):
        # peft's one pair (A, B) over the whole fused projection is, group by group, A with B's rows of that
        # group's output block: exact where the blocks the layer leaves alone get no update from B.
        groups, ids = len(layer.enable_lora), layer.block_ids
        blocks = B.reshape(groups, layer.out_features // groups, B.shape[1])
        off = [e for e in range(groups) if e not in ids]
        if off and bool(blocks[off].any()):
            raise ValueError(f"{where}: module {name!r} is a MergedLinear adapting output blocks {ids} of {groups} "
                             f"(enable_lora={layer.enable_lora}), but the adapter also changes block(s) {off}; "
                             f"inject it with every block enabled, or as a plain Linear")
        own = blocks[ids]  # (enabled blocks, rows per block, r)
        n, r = len(ids), B.shape[1]
        if n > 1 and r % n == 0:
            # the layout save_peft_adapter writes a MergedLinear in (rank n*r0, each block's B in its own r0 columns):
            # the layer's own per-block pairs back, at rank r0, rather than rank n*r0 per block
            r0 = r // n
            used = own.ne(0).any(1)  # (block, column)
            inside = torch.zeros_like(used)
            for j in range(n):
                inside[j, j * r0:(j + 1) * r0] = True
            if bool((used & ~inside).any()) is False and bool(used.any(1).all()):
                A_own = torch.cat([A[j * r0:(j + 1) * r0] for j in range(n)])
                B_own = torch.cat([own[j][:, j * r0:(j + 1) * r0] for j in range(n)])
                return A_own, B_own
        return A.repeat(n, 1), own.reshape(-1, r)
    if isinstance(layer, layers.ConvLoRA):
        c = layer.conv
        if A.dim() != c.weight.dim() or c.groups != 1:
            raise ValueError(f"{where}: convolution {name!r} (groups={c.groups}, weight {c.weight.dim()}-D, adapter "
                             f"{A.dim()}-D): peft's conv adapters map onto lora_ext's layout for groups == 1 only")
        # lora_ext keeps loralib's conv layout: delta-W viewed as (out*k0, in*k1*...), whose row o*k0+q is the q-th
        # of k0 equal chunks of output channel o's flattened filter. peft's rank-r pair (A: r filters, B: 1x1)
        # is exactly the rank-r*k0 pair A' = A's filters cut into those chunks, B' = B (x) I_k0.
        k0, r = c.kernel_size[0], A.shape[0]
        eye = torch.eye(k0, dtype=B.dtype, device=B.device)
        return A.reshape(r * k0, -1), torch.kron(B.reshape(B.shape[0], r), eye)
    return A, B


def _peft_shapes(module, r):
    """(lora_A shape, lora_B shape, embedding keys?) of peft's rank-r adapter of `module` (a plain module or a
    lora_ext layer)."""
    if isinstance(module, layers.ConvLoRA):
        module = module.conv
    if isinstance(module, (nn.Embedding, layers.Embedding)):
        return (r, module.num_embeddings), (module.embedding_dim, r), True
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        ones = (1,) * len(module.kernel_size)
        return (r, module.in_channels, *module.kernel_size), (module.out_channels, r, *ones), False
    if _inject.is_conv1d(module):
        n_in, n_out = module.weight.shape
        return (r, n_in), (n_out, r), False
    return (r, module.in_features), (module.out_features, r), False


def check_device(device):
    """None, or the torch.device `device` names when it is usable here; ValueError naming the option otherwise."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r}, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "meta":
        raise ValueError("device: 'meta' holds no values; give the device an adapter waits on")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:
            raise ValueError(f"device: {device!r} is not available on this machine ({e})") from e
    return dev


def _check_arguments(model, path, adapter_name, merge_weights, activate, is_trainable=False):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: expected a directory path, got {path!r}")
    try:
        check_adapter_name(adapter_name)
    except ValueError as e:
        raise ValueError(f"adapter_name: {e}") from None
    if merge_weights is not None and not isinstance(merge_weights, bool):
        raise ValueError(f"merge_weights: expected True, False or None, got {merge_weights!r}")
    for option, value in (("activate", activate), ("is_trainable", is_trainable)):
        if not isinstance(value, bool):
            raise ValueError(f"{option}: expected True or False, got {value!r}")


def _names(names, most=6):
    names = sorted(names)
    return ", ".join(map(repr, names[:most])) + (f" and {len(names) - most} more" if len(names) > most else "")


def _into_plain_model(fn):
    """fn(model, ...) with the model inside DistributedDataParallel and torch.compile wrappers (a peft file names the
    plain model's modules, as save_peft_adapter writes them; through the wrapper they carry "module." or "_orig_mod."
    and the load was refused as selecting none of them)."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)  # (its own refusal)
        model_lock(model)  # (the wrapper gets the lock's hooks: its forwards wait for the load's writes)
        token = THROUGH_DDP.set(_ddp_of(model))
        try:
            return fn(unwrap(model), *args, **kwargs)
        finally:
            THROUGH_DDP.reset(token)
    return run


@_into_plain_model
@hub.fetched_first  # (outside the change: switches do not wait for a download)
@_inject.one_change
def load_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default", *,
                      device: Union[str, torch.device, None] = None, merge_weights: Optional[bool] = None,
                      activate: bool = True, lossless: Optional[bool] = None, revision: Optional[str] = None,
                      subfolder: Optional[str] = None, is_trainable: bool = False, _hotswap: bool = False) -> List[str]:
    """Loads a peft LoRA adapter directory into `model`, injecting lora_ext layers where the model still has
    plain modules; returns the names of the modules it covers. `path` may be a Hugging Face Hub repo id
    ("owner/name", at `revision`) where no such local path exists: its files are fetched into the Hub cache, as
    peft's from_pretrained does; `subfolder`: the adapter's folder inside the path or repo.

    The modules are the ones peft chooses from the config's target_modules / exclude_modules (a regex matching
    the whole name, or a list of names or name suffixes; 'all-linear'); the weights file must hold the factors
    of exactly those modules (peft would silently ignore others: lora_ext refuses them). Modules the config's
    modules_to_save names (peft's rule: the module's name ends with an entry) are saved whole: each becomes a
    ModulesToSave holding the model's module and this adapter's copy, and the file must hold its whole state.
    The names returned include them.
    is_trainable: as peft's from_pretrained, whether the adapter trains. False (peft's default): the layers this
    load creates get frozen factors (a serving switch between frozen factors of one shape writes into the storage a
    captured CUDA graph reads), and so do its copies of modules saved whole and its rows of tokens, unless the
    model's layers train already (a model in training: the new ones train too). True: they train, and so do the
    factors of the layers already there that hold the adapter. The model's first load freezes every other
    parameter of the model, as peft's from_pretrained freezes the base model; mark_only_lora_as_trainable
    sets the flags afterwards as it always does.
    adapter_name: the name it is held under; with activate=True it becomes the active adapter everywhere
    (one pass per weight when merged). device: where an inactive adapter waits (default: beside the
    weight; "cpu" keeps it in host memory). merge_weights: whether eval() merges, for the layers this load
    creates (None: True); a value that differs from a layer already there is refused (that layer keeps its
    own, set when it was injected). lossless: the lossless-merge switch of the layers (None: on for
    float16/bfloat16 weights; docs/LOSSLESS.md), set on the layers this load creates and, when given, on the
    layers already there (from their next merge on). In a model whose layers hold a reserved rank (reserve_rank),
    the adapter is held at that rank, padded with zeros, and so are the layers this load injects (a higher rank is
    refused). Every check (arguments, device, config, targets, keys, shapes,
    finite values) is made before the first weight or layer changes: a refused load (ValueError, KeyError,
    FileNotFoundError, naming the file and option) leaves the model as it was.
    """
    _check_arguments(model, path, adapter_name, merge_weights, activate, is_trainable)
    ddp = _ddp_of(model)  # (DDP holds the Parameters it was built with: those stay)
    if ddp is None:
        ddp = THROUGH_DDP.get()  # (given the DDP, _into_plain_model passes the model inside it)
    reserved = reserved_rank(model)
    _inject.check_lossless(lossless)
    refusal = (("hotswap_adapter", "the swap would land unseen until the block ends") if _hotswap
               else ("load_peft_adapter",))
    _inject.check_enabled(model, *refusal)
    _inject.refuse_fsdp1(model, refusal[0])  # (its names and flat pieces would mislead every check after)
    path = hub.resolve(path, revision, subfolder)
    home = check_device(device)
    cfg = read_config(path)
    cfg_file = _config_file(path)
    if "peft_type" not in cfg:
        raise ValueError(f"{cfg_file}: peft_type is missing (peft refuses such a config; a LoRA adapter's is 'LORA')")
    init = cfg.get("init_lora_weights")
    if is_trainable and isinstance(init, str) and init.lower() == "mica":
        raise ValueError(f"{cfg_file}: init_lora_weights={init!r} (MiCA): peft trains its lora_A only, lora_B frozen; "
                         f"lora_ext's layers would train both (load it with is_trainable=False to serve it)")
    weights_file = os.path.join(path, WEIGHTS_NAME if os.path.isfile(os.path.join(path, WEIGHTS_NAME))
                                else LEGACY_WEIGHTS_NAME)
    entries = _saved.config_entries(cfg_file, cfg)
    to_save = _saved.find(model, entries, cfg_file)
    tensors = read_tensors(path, cfg)
    token_spec = _tokens.check_spec(cfg_file, cfg.get("trainable_token_indices"))
    # (a refusal of the modules saved whole or of the rows of tokens says when the factors name another class's)
    file_modules = factor_modules(tensors)
    # (rows of tokens: taken out of `tensors`, checked against the model; nothing changes yet)
    with _ckpt_names.naming_another_class(model, file_modules):
        token_plan = _tokens.plan(model, token_spec, tensors, PREFIX, weights_file, cfg_file) if token_spec else []
    token_names = [n for names, _, _ in token_plan for n in names]
    for names, module, _ in token_plan:  # (the module whose output the rows replace: a wrapper's original)
        module = module._modules["original_module"] if isinstance(module, _tokens.TrainableTokens) else module
        hooked = [kind for kind in layers.users_hooks(module) if kind in layers.CALL_HOOKS[:2]]
        hooked += ["a forward set on the instance"] if layers.instance_forward(module) else []
        if hooked:
            raise ValueError(f"{cfg_file}: module {names[0]!r} (trainable_token_indices) has {', '.join(hooked)} of "
                             f"its own, whose output its adapter rows would replace at their tokens only (and "
                             f"unload would then apply them to every token); remove them, load the adapter, then "
                             f"register them on the module at {names[0]!r} (transformers' enable_input_require_grads, "
                             f"which gradient_checkpointing_enable calls, registers one: call it after loading)")
    clash = sorted(set(token_names) & {n for n, _ in to_save})
    if clash:
        tied = next((rows.__dict__["tied"] for names, _, rows in token_plan if clash[0] in names), False)
        raise ValueError(f"{cfg_file}: module {clash[0]!r} is saved whole (modules_to_save) and "
                         + ("shares the weight of the embedding trainable_token_indices gives rows of tokens (tied), "
                            "so it would serve them too; peft refuses that as well (untie them, or save the "
                            "embedding whole instead)" if tied else
                            "given rows of tokens (trainable_token_indices); peft refuses that, name it in one of them"))
    # (the file's keys have no wrapper names: a module under activation checkpointing is found by its plain name)
    states, rest = _saved.split_state(tensors, [plain_name(n) for n, _ in to_save], PREFIX)
    # (a key it refuses is one of a module saved whole only where the config saves some: r2, a damaged factor key)
    with _ckpt_names.naming_another_class(model, file_modules if entries else ()):
        factors, base_weights = module_factors(rest, where=weights_file)
    if not factors:
        raise ValueError(f"{weights_file}: holds no LoRA factors")
    # an adapter made with transformers 4 may name modules as the checkpoint does (peft renames them alike)
    trained = {}  # a renamed module's name as the adapter had it (rank_pattern / alpha_pattern match those)
    factors, base_weights, _ = _ckpt_names.rename_adapter(weights_file, model, factors, base_weights, trained=trained)
    factors, base_weights = _under_wrappers(model, factors, base_weights, trained)
    if cfg.get("target_modules") is None:
        raise ValueError(f"{cfg_file}: target_modules is missing (peft would pick per-architecture defaults); "
                         f"lora_ext needs the adapted modules named")
    targets = _inject.select_targets(model, cfg["target_modules"], cfg.get("exclude_modules"), option=cfg_file,
                                     task_type=cfg.get("task_type"), layers_to_transform=cfg.get("layers_to_transform"),
                                     layers_pattern=cfg.get("layers_pattern"), modules_to_save=entries)
    chosen = {name for name, _ in targets}
    clash = sorted(set(token_names) & chosen)
    if clash:
        tied = next((rows.__dict__["tied"] for names, _, rows in token_plan if clash[0] in names), False)
        raise ValueError(f"{cfg_file}: module {clash[0]!r} is both a LoRA target (target_modules) and " + (
            "tied to the embedding trainable_token_indices gives rows of tokens, so it would serve them too; "
            "lora_ext serves one or the other in a module (peft serves both there)" if tied else
            "given rows of tokens (trainable_token_indices); peft refuses that"))
    with _ckpt_names.naming_another_class(model, file_modules):
        saved_plan = [(name, module, _saved.check_state(weights_file, name, module, states.get(plain_name(name)),
                                                        PREFIX)) for name, module in to_save]
    if (to_save or token_plan) and hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(f"adapter_name: {adapter_name!r} is an attribute of torch's ModuleDict, which holds the "
                         f"copies of the modules this adapter saves whole or gives rows of tokens "
                         f"({_names([n for n, _ in to_save] + token_names)}); load it under another name")
    extra, missing = set(factors) - chosen, chosen - set(factors)
    rowed = [(n, w) for n, w in sorted((n, _saved.module_at(model, n)) for n in extra)
             if isinstance(w, _tokens.TrainableTokens)]
    if rowed:
        raise ValueError(f"{weights_file}: holds factors of module {rowed[0][0]!r}, which adapter(s) "
                         f"{rowed[0][1].adapter_names} give rows of tokens (trainable_token_indices); peft puts no "
                         f"LoRA on such a module")
    inside = [(n, path, w) for n in sorted(extra) for path, w in _saved.wrappers(model)
              if n == path or n.startswith(path + ".")]
    if inside:
        n, path, w = inside[0]
        where_ = "is" if n == path else f"lies inside {path!r},"
        raise ValueError(f"{weights_file}: holds factors of module {n!r}, which {where_} a module adapter(s) "
                         f"{w.adapter_names} save whole (modules_to_save); lora_ext puts no LoRA "
                         f"{'on' if n == path else 'inside'} a module saved whole (peft "
                         f"{'refuses such a target' if n == path else 'puts one into each of its copies'}): serve the "
                         f"two adapters from models of their own")
    if extra:
        raise ValueError(f"{weights_file}: holds factors of module(s) {_names(extra)} that the config's "
                         f"target_modules / exclude_modules / layers_to_transform do not select ({cfg_file}); peft "
                         f"would ignore them, lora_ext refuses the mismatch")
    if missing:
        raise ValueError(f"{weights_file}: holds no factors for module(s) {_names(missing)}, which the config's "
                         f"target_modules / exclude_modules / layers_to_transform select ({cfg_file})")
    base_weights_elsewhere(weights_file, base_weights, factors, lambda n, what: _base_tensor(model, n, what))
    plan = []
    pattern_clash_warning(cfg, [trained.get(name, name) for name, _ in targets], cfg_file)
    for name, module in targets:
        A, B, embedding = factors[name]
        label = f"{weights_file}: module {name!r}"
        r, scaling = module_rank_scaling(cfg, trained.get(name, name))
        for what, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise ValueError(f"{label}: {what} has dtype {t.dtype}; LoRA factors must be floating point")
        if A.dim() < 1 or A.shape[0] != r:
            raise ValueError(f"{label} has rank {A.shape[0] if A.dim() else None} (lora_A of shape "
                             f"{tuple(A.shape)}) but the config says r={r} (r / rank_pattern in {cfg_file})")
        # (before the shapes: a grouped convolution's factors fit no layout lora_ext has)
        conv = module.conv if isinstance(module, layers.ConvLoRA) else module
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            why = conv_refusal(conv)
            if why is not None:
                raise ValueError(f"{label} is a convolution with {why}; lora_ext refuses it")
        a_shape, b_shape, want_embedding = _peft_shapes(module, r)
        if embedding != want_embedding:
            keys = "lora_embedding_A/B" if want_embedding else "lora_A.weight/lora_B.weight"
            raise ValueError(f"{label} is a {type(module).__name__}: its factors must be saved as {keys}")
        if (tuple(A.shape), tuple(B.shape)) != (a_shape, b_shape):
            raise ValueError(f"{label}: factors of shape {tuple(A.shape)} and {tuple(B.shape)} do not fit its "
                             f"{type(module).__name__}; a rank-{r} peft adapter has {a_shape} and {b_shape}")
        fresh = not isinstance(module, LoRALayer)
        if not fresh and not module.has_lora:
            raise ValueError(f"{label}: the model's lora_ext layer there was built with r=0 (or, a MergedLinear, with "
                             f"no group in enable_lora) and holds no adapter; build it with r > 0, or leave the module "
                             f"out of the adapter")
        if fresh and reserved is not None and r > reserved:
            raise ValueError(f"{label} has rank {r}, over the rank {reserved} that reserve_rank fixed for the model's "
                             f"layers (every adapter is held at that rank, so that switches keep the storage a "
                             f"captured CUDA graph reads); reserve a rank of at least {r} first")
        if _hotswap and fresh:
            raise ValueError(f"hotswap_adapter: {label} is not a lora_ext layer yet: a hotswap writes into the layers "
                             f"the model has (a captured CUDA graph or a compiled model holds no other); "
                             f"load_peft_adapter injects it (then capture again)")
        if not fresh and merge_weights is not None and module.merge_weights != merge_weights:
            raise ValueError(f"merge_weights: {merge_weights} for {name!r}, a lora_ext layer already there with "
                             f"merge_weights={module.merge_weights} (set when it was injected); a load does not "
                             f"change it (leave merge_weights out, or inject with the value you want)")
        if embedding and getattr(module, "max_norm", None) is not None:
            raise ValueError(f"{label} is an Embedding with max_norm={module.max_norm}: peft renormalises the "
                             f"adapter's per-token vectors (columns of lora_embedding_A) too, lora_ext's Embedding "
                             f"(loralib's) does not, so the outputs would differ; lora_ext refuses it")
        _inject.check_replaceable(model, name, module, label)
        weight = module.conv.weight if isinstance(module, layers.ConvLoRA) else module.weight
        merged = None
        if name in base_weights and isinstance(module, LoRALayer) and module.merged:  # the base, not the merged weight
            weight, merged = module.state_dict()[module._weight_key], weight
        check_base_weight(weights_file, name, base_weights.get(name), weight, merged=merged)
        bias = module.conv.bias if isinstance(module, layers.ConvLoRA) else getattr(module, "bias", None)
        check_base_weight(weights_file, name, base_weights.get((name, "bias")), bias, bias=True)
        layer = _inject.replacement(module, name, r, scaling * r, cfg.get("lora_dropout", 0.0),
                                    merge_weights is not False, None, lossless) if fresh else module
        A2, B2 = _to_layer_layout(layer, name, A, B, where=weights_file)
        # the factors as the layer will hold them (device, dtype), so that the value checks see what is stored
        if fresh:
            to = (weight.device, _inject._lora_dtype(weight))
        elif adapter_name == layer.active_adapter:
            to = (layer.lora_A.device, layer.lora_A.dtype)
        else:
            to = (home if home is not None else layer.lora_A.device, layer.lora_A.dtype)
        if to[0].type == "meta":  # (an accelerate offload, or a model built on meta: the factors would hold nothing)
            raise ValueError(f"{label}: its {'weight is' if fresh else 'factors are'} on the "
                             f"meta device: {layers.meta_refusal(module)}")
        A2, B2 = A2.to(*to), B2.to(*to)
        layer.check_adapter(A2, B2, scaling, name=label)
        plan.append((name, module, layer, fresh, A2, B2, scaling))
    held = [(n, m) for n, m in lora_layers(model) if m.has_adapter(adapter_name) and not m.is_placeholder(adapter_name)]
    # (hotswap) the layers this swap gives the adapter's factors for the first time (absent, or a stand-in of zeros):
    # they take the file's lora_dropout, as a load gives it; the others keep theirs, which _check_hotswap compares
    first_factors = [layer for _, _, layer, *_ in plan if not isinstance(layer, layers.Embedding) and (
        not layer.has_adapter(adapter_name) or layer.is_placeholder(adapter_name))] if _hotswap else []
    zeroed = _check_hotswap(model, adapter_name, plan, held, chosen, to_save, token_plan, cfg_file,
                            cfg.get("lora_dropout", 0.0)) if _hotswap else []
    for _, m in lora_layers(model):  # the layers whose live factors this load writes (switches and the active adapter)
        if activate or m.active_adapter == adapter_name:
            m._check_plain_factors(f"{cfg_file}: adapter {adapter_name!r}")
    if activate and ddp is not None and not _hotswap:  # (its activation is a switch: trainable, DDP cannot follow it;
        # let through, the next forward refused, and the switch back was refused as giving other Parameters, h7)
        _check_ddp_switch(ddp, lora_layers(model), adapter_name, None, saved=False,
                          what=f"load_peft_adapter({adapter_name!r}, activate=True)")
    uncovered = [n for n, _ in held if n not in chosen and not _hotswap]
    uncovered += [n for n, w in _saved.wrappers(model) if adapter_name in w.adapter_names
                  and n not in {name for name, _ in to_save} and n not in token_names]
    if uncovered:
        raise ValueError(f"{cfg_file}: lora_ext layers or modules to save {uncovered} already hold an adapter "
                         f"{adapter_name!r} that this file does not cover; a load would leave it half replaced (load "
                         f"it under another name, or delete it first)")
    if not activate and not _hotswap and any(m.active_adapter == adapter_name for _, m in held):
        raise ValueError(f"adapter_name: {adapter_name!r} is the active adapter; replacing it would change what the "
                         f"model serves although activate=False (load it under another name, or with activate=True)")
    # activate=False: a layer injected now serves the model's active adapter as zeros (the base, as peft's layers do
    # for an adapter that does not target them), not the adapter loaded
    placeholder = None
    if not activate and any(fresh for _, _, _, fresh, *_ in plan):
        actives = {m.active_adapter for _, m in lora_layers(model)}
        if len(actives) > 1:
            raise ValueError(f"activate=False: the model's lora_ext layers disagree on the active adapter "
                             f"({sorted(actives)}), so the layers this load injects cannot follow it; set_adapter the "
                             f"model first")
        placeholder = actives.pop() if actives else None
    # the model's first adapter: its layers come up serving it whatever `activate` says, so its modules saved whole
    # and rows of tokens must too
    held_layers = lora_layers(model)
    first = not activate and not held_layers
    # the layers this load creates (and its copies and rows) train when asked (peft's is_trainable) or when the
    # model's layers train already (a model in training); the model's first load freezes the rest of the model,
    # as peft's from_pretrained does
    in_training = any(m._trainable() for _, m in held_layers)
    trains = is_trainable or in_training
    convs = [name for name, _, layer, *_ in plan if isinstance(layer, layers.ConvLoRA) and layer.conv.kernel_size[0] > 1]
    if trains and convs:
        warnings.warn(f"{cfg_file}: the convolutions {_names(convs)} train in loralib's ConvLoRA layout (B of r*k0 "
                      f"columns, which holds peft's B as B (x) I_k0 but is trained whole), so their steps differ from "
                      f"peft's rank-r conv LoRA, and save_peft_adapter writes them trained at rank r*k0*k0; the "
                      f"served update is the file's exactly", stacklevel=2)
    # the adapter's copies of the modules it saves whole, made before the model changes (a copy can fail: memory)
    saved_plan = [(name, module, _saved.make_copy(weights_file, name, module, state))
                  for name, module, state in saved_plan]
    # an adapter loaded trainable while another is served (activate=False) trains from its switch on, every part of it
    # alike: its LoRA factors become Parameters of the model at the switch (mark_trainable), and so its copies and rows
    # train from then on too (trainable now, they alone reached an optimizer built before the switch, which trained
    # them and not the factors: 0.36 off peft after 3 steps, S1; frozen, such an optimizer gets nothing, and says so)
    served = activate or first or in_training or any(m.active_adapter == adapter_name for _, m in held_layers)
    for _, _, copy in saved_plan:
        _saved._train(copy, trains and served)
    for _, _, rows in token_plan:
        rows.trainable_tokens_delta.requires_grad_(trains and served)
    # the model changes, atomically for forwards on other threads (Ctrl-C held back to the end: the adapter lands
    # whole, then the KeyboardInterrupt); what can still be refused (a switch of a merged weight, out of memory) is
    # put back below
    # (add_adapter's warnings of Parameters it replaced are given once the load stands: taken back, it gives them back)
    with model_lock(model).write("hotswap_adapter" if _hotswap else "load_peft_adapter", model), deferred_interrupt(), \
            held_warnings() as replaced, _inject.holders_of(model):
        _inject.check_enabled(model, *refusal)  # (again: a disable_adapter may have begun since)
        owners = _inject.parameter_owners(model)
        undo = _undoing(model, adapter_name, plan, saved_plan, token_plan)
        # the layers holding the adapter's name already first: replacing the active adapter's values writes a merged
        # weight (a switch), which can be refused (a lossless record's overflow, out of memory) at any layer; the
        # layers written before it then get their old values back, so the refusal leaves the model as it was
        written, unfrozen = [], []
        try:
            # (a layer is listed before its write: one whose add_adapter raised after storing the values, in its
            # bookkeeping after the write, is put back too; putting back one refused before writing changes nothing)
            # (a refusal names the layer's path: its own message names its constructor only, u6)
            for name, module, layer, fresh, A2, B2, scaling in plan:
                if not fresh:
                    written.append((layer, _held(layer, adapter_name)))
                    with at_layer(name):
                        layer.add_adapter(adapter_name, A2, B2, scaling)
            paths = {layer: n for n, layer in held}
            for layer in zeroed:  # (hotswap) layers the old adapter targets and the new one does not: zeros, in place
                written.append((layer, _held(layer, adapter_name)))
                A, B, _ = layer.get_adapter(adapter_name)
                with at_layer(paths.get(layer)):
                    layer.add_adapter(adapter_name, torch.zeros_like(A.detach()), torch.zeros_like(B.detach()), 1.0)
                layer.__dict__.setdefault("_placeholders", set()).add(adapter_name)
            for name, module, layer, fresh, A2, B2, scaling in plan:
                if fresh:
                    _inject.install(model, name, module, layer, scaling, owners, adapter_name, (A2, B2))
                    # peft's is_trainable: frozen factors serve (their switches keep the storage CUDA graphs read)
                    layer.lora_A.requires_grad_(trains)
                    layer.lora_B.requires_grad_(trains)
                    if reserved is not None:
                        layer._reserve(reserved)
                    if placeholder is not None:
                        layer.add_placeholder(placeholder)
                        layer.set_adapter(placeholder)  # (the adapter's own Parameters set aside)
                        if is_trainable and not in_training:  # the stand-in trains only as the model does; the adapter
                            layer.lora_A.requires_grad_(False)  # trains once a switch makes it active, as in the layers
                            layer.lora_B.requires_grad_(False)  # already there: held frozen, marked (reserve_rank
                            layer.mark_trainable(adapter_name)  # refused its set-aside trainable pair, S1)
                            for t in layer.get_adapter(adapter_name)[:2]:
                                t.requires_grad_(False)
                else:
                    if lossless is not None:
                        layer.lossless = lossless  # from the next merge on
                    if is_trainable and layer.active_adapter == adapter_name:  # (its live factors)
                        layer.lora_A.requires_grad_(True)
                        layer.lora_B.requires_grad_(True)
                        unfrozen.append(layer)
                    elif is_trainable:  # the adapter trains once a switch makes it active: the live factors, which
                        # serve another adapter, stay as they are (peft trains the adapter it loads only; unfrozen,
                        # they trained the active adapter until the switch, G6: 0.26 off in the logits after 3 steps)
                        layer.mark_trainable(adapter_name)
            for name, module, new in saved_plan:
                if not isinstance(module, _saved.ModulesToSave):
                    wrapper = _saved.ModulesToSave(module).train(module.training)
                    _inject._set_submodule(model, name, wrapper, names=False)  # (each name its own, as peft)
                    module = wrapper
                module.add(adapter_name, new)
            _tokens.install(model, token_plan, adapter_name,
                            lambda m, n, w: _inject._set_submodule(m, n, w, names=False))
            if not held_layers:  # the model's first adapter: the base model is frozen (peft's from_pretrained)
                own = {id(p) for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)}
                own |= {id(p) for _, _, new in saved_plan for p in new.parameters()}
                own |= {id(rows.trainable_tokens_delta) for _, _, rows in token_plan}
                for p in model.parameters():
                    if id(p) not in own:
                        p.requires_grad_(False)
                for _, m in lora_layers(model):  # (unload gives the base weights back frozen, as peft's unload does)
                    m.__dict__["_base_requires_grad"] = False
            if activate:
                set_adapter(model, adapter_name)  # (refused, it leaves every layer on the adapter it served)
        except BaseException as err:
            # refused (a lossless swap's overflow, the activation's) or out of memory at any step: the model as
            # it was before the load
            _take_back(adapter_name, written, undo, err)
            raise
        if ddp is None:  # the layers made trainable: the active adapter its own Parameters back (a serving switch lent
            for layer in unfrozen:  # them), once the load stands; DDP holds the Parameters it was built with
                layer.settle_parameters()
        else:
            ddp_guard.keep_parameters(unfrozen, ddp)
        if first:  # (its layers serve it already: its wrappers follow, a switch that writes nothing)
            for _, w in _saved.wrappers(model):
                if adapter_name in w.adapter_names:
                    w.set_adapter(adapter_name, trains)
        # each adapter trains with its own lora_dropout, as peft's (not embeddings); a hotswap changes the factors and
        # scalings only, where the layer held the adapter's own factors before
        for layer in (first_factors if _hotswap else [layer for _, _, layer, *_ in plan]):
            layers.set_trained_dropout(layer, adapter_name, cfg.get("lora_dropout", 0.0))
    for message, category in replaced:
        warnings.warn(message, category, stacklevel=layers._user_stacklevel())
    return sorted(chosen | {name for name, _ in to_save} | set(token_names))


def _take_back(adapter_name, written, undo, err) -> None:
    """Puts the model back as it was before a load that failed part way (`err`, which gets a note when this fails
    too): the layers that held the name get their old values back, the others lose it (`written`: a layer whose own
    write was refused gave its weight back itself), and what the load added goes (`undo`, from _undoing). Every step
    runs even when one before it fails."""
    failed = []
    for layer, held in reversed(written):
        try:
            _put_back(layer, adapter_name, held)
        except Exception as again:
            failed.append(f"{layer._describe()} ({type(again).__name__}: {again})")
    try:
        undo()
    except Exception as again:
        failed.append(f"the layers, copies and flags the load added ({type(again).__name__}: {again})")
    if failed:
        err.add_note(f"lora_ext: load_peft_adapter: taking the load of adapter {adapter_name!r} back failed too, at "
                     f"{'; '.join(failed)}: those may still hold the file's values for it")


def _undoing(model, adapter_name, plan, saved_plan, token_plan):
    """What a load changes besides the adapter's factors in layers (_held/_put_back), noted before it changes it:
    the modules it replaces (by new layers, or by wrappers for modules saved whole and rows of tokens), the adapter's
    entries in wrappers already there, the lossless switch of the layers already there and the trainable flags of
    the model's parameters. Returns a function that puts them back (_take_back: a load that failed part way)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    switches = [(layer, layer.lossless) for _, _, layer, fresh, *_ in plan if not fresh]
    modules = [(name, module) for name, module, _, fresh, *_ in plan if fresh]
    entries = []
    for names, module in [([name], module) for name, module, _ in saved_plan] + [(n, m) for n, m, _ in token_plan]:
        if isinstance(module, _saved.ModulesToSave):  # (TrainableTokens too)
            entries.append((module, module._modules["modules_to_save"]._modules.get(adapter_name)))
        else:
            modules += [(name, module) for name in names]

    def undo():
        with layers.taking_out_layers():
            for name, module in modules:
                _inject._set_submodule(model, name, module)
        for _, _, layer, fresh, *_ in plan:
            if fresh:
                layers.let_go(layer)
        for wrapper, old in entries:
            if old is None:
                wrapper.delete(adapter_name)
            else:
                wrapper._modules["modules_to_save"][adapter_name] = old
        for layer, value in switches:
            layer.lossless = value
        for p, flag in flags:
            p.requires_grad_(flag)
    return undo


def _held(layer, name):
    """What `layer` holds under adapter `name` (copies of its factors, its scaling, whether a stand-in, its own rank
    under a reserve, and an inactive adapter's own Parameters, which a load of another rank replaces), or None."""
    if name not in layer.adapter_names:
        return None
    A, B, scaling = layer.get_adapter(name)
    own = layer.__dict__.get("_own_ranks", {}).get(name)
    # an inactive adapter's own Parameters (it trained), or the active adapter's live ones when they are its own (the
    # objects an optimizer holds; not another adapter's, lent to it by a serving switch): a load of another rank
    # replaces them
    pair = (A, B) if (isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter)
                      and (name != layer.active_adapter or layer.__dict__.get("_owner") is None)) else None
    return A.detach().clone(), B.detach().clone(), scaling, layer.is_placeholder(name), own, pair, \
        layer.marked_to_train(name)


def _put_back(layer, name, held) -> None:
    """Undoes a load's write of adapter `name` into `layer` (held: _held before it)."""
    if held is None:
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        return
    A, B, scaling, placeholder, own, pair, trains = held
    layer.add_adapter(name, A, B, scaling)
    if pair is not None and layer.get_adapter(name)[0] is not pair[0]:  # (the load gave it factors of another rank)
        if name == layer.active_adapter:
            layer.put_live_pair(name, pair)
        else:
            layer.put_own_pair(name, pair)
    if name != layer.active_adapter and layer.marked_to_train(name) != trains:  # (is_trainable marked it)
        layer.mark_trainable(name, trains)
    if placeholder:
        layer.__dict__.setdefault("_placeholders", set()).add(name)
    else:
        layer.__dict__.get("_placeholders", set()).discard(name)
    if own is not None:  # (add_adapter takes the padded factors' rank for the adapter's own)
        layer.__dict__.setdefault("_own_ranks", {})[name] = own


def hotswap_adapter(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default", *,
                    device: Union[str, torch.device, None] = None, revision: Optional[str] = None,
                    subfolder: Optional[str] = None) -> List[str]:
    """peft's hotswap_adapter: replaces the weights of adapter `adapter_name`, which the model holds, with the peft
    adapter at `path`, in place: the layers it targets take its factors and scalings, the layers the old adapter
    targets and the new one does not serve it as zeros (stand-ins), and nothing else changes (which adapter is
    active, merged or not). Where the adapter is active, the factors are written into the live storage (merged: the
    weight, in one pass), so a CUDA graph captured before the swap serves the new adapter on its next replay and a
    torch.compile'd model does not recompile for it (its traced forward reads the scaling from the layer's scale
    tensor, which the swap writes in place too). One exception: a layer that held the adapter as a stand-in of zeros
    (or not at all) takes the file's lora_dropout with its first factors, and where the adapter is active there with
    a dropout above 0 its dropout module changes, so a model compiled in train mode traces again. Returns the modules
    it covers.

    So it refuses, before anything changes, what would not be in place: a module without a lora_ext layer (peft
    refuses such keys too; load_peft_adapter injects it), another rank than the one the layer holds the adapter at
    (reserve_rank(model, r) pads every adapter to a common rank first, as peft's prepare_model_for_compiled_hotswap
    does), trainable factors of the adapter (load_peft_adapter replaces a trained adapter's values), another
    lora_dropout than the one the layers hold the adapter with (as peft's hotswap refuses it), and modules saved
    whole or rows of tokens (modules_to_save, trainable_token_indices), in the file or in the model's adapter. The
    file is checked as load_peft_adapter checks it. device: where an inactive adapter waits."""
    return load_peft_adapter(model, path, adapter_name, device=device, activate=False, revision=revision,
                             subfolder=subfolder, _hotswap=True)


def _check_hotswap(model, name, plan, held, chosen, to_save, token_plan, cfg_file, dropout):
    """hotswap_adapter's refusals (see there); returns the layers to serve the adapter as zeros."""
    what = f"hotswap_adapter: adapter {name!r}"
    saved = [n for n, w in _saved.wrappers(model) if name in w.adapter_names]
    if not held and not saved:
        names = sorted({n for _, m in lora_layers(model) for n in m.adapter_names if not m.is_placeholder(n)})
        raise KeyError(f"{what}: the model holds no such adapter (it holds {names}); load it with load_peft_adapter")
    if to_save or token_plan:
        option = "modules_to_save" if to_save else "trainable_token_indices"
        raise ValueError(f"{what}: {cfg_file} names {option}: a hotswap writes LoRA factors in place, not modules "
                         f"saved whole or rows of tokens; load_peft_adapter replaces those")
    if saved:
        raise ValueError(f"{what}: the model holds it in module(s) {_names(saved)} saved whole or given rows of "
                         f"tokens, which a hotswap would leave serving the old adapter; delete the adapter and "
                         f"load_peft_adapter the new one")
    covered = {n for n, *_ in plan}
    for n, _, layer, _, A2, B2, _ in plan:
        if not layer.has_adapter(name):
            continue  # (a layer the old adapter did not reach: the new factors wait there, as a load adds them)
        A, B, _ = layer.get_adapter(name)
        # (the shapes add_adapter will hold the file's factors at: padded to the reserved rank, if any)
        new = layer.factor_shapes(layer.reserved_rank) if layer.reserved_rank is not None \
            else (tuple(A2.shape), tuple(B2.shape))
        if new != (tuple(A.shape), tuple(B.shape)):
            raise ValueError(f"{what}: layer {n!r} holds it at rank {layer.rank_of(A)}, the file's is rank "
                             f"{layer.rank_of(A2)}: the layer would get new storage, and a CUDA graph captured "
                             f"before would keep serving the old adapter. lora.reserve_rank(model, r) with r at least "
                             f"every adapter's rank pads them all to one rank (then capture); load_peft_adapter "
                             f"replaces it with new storage")
    # every layer holding the name that the file does not cover serves zeros, stand-ins given values since included
    zeroed = [(n, m) for n, m in lora_layers(model) if m.has_adapter(name) and n not in covered]
    # Every layer that holds the adapter itself (not a stand-in; covered by the file or to serve zeros) trains it with
    # one lora_dropout, which the swap keeps: the file's must be that one, as peft's hotswap compares the configs'
    # ("Configs are incompatible: for lora_dropout"). (Layers given the adapter for the first time take the file's.)
    for n, m in held:
        held_p = layers.trained_dropout(m, name)
        if held_p is not None and held_p != float(dropout):
            raise ValueError(f"{what}: {cfg_file} trains with lora_dropout {float(dropout)}, layer {n!r} holds it "
                             f"with {held_p}: a hotswap writes factors and scalings only, so the adapter would go on "
                             f"training, and be saved, with {held_p} (peft refuses such configs too); "
                             f"load_peft_adapter replaces the adapter with its own dropout")
    written = zeroed + [(n, layer) for n, _, layer, *_ in plan]
    for n, m in written:
        held_A = m.get_adapter(name)[0] if m.has_adapter(name) else None
        if (m.active_adapter == name and m._trainable()) or m.marked_to_train(name) or (
                isinstance(held_A, nn.Parameter) and held_A.requires_grad):
            # (a hotswap is a serving operation: the storage a capture reads, no recompilation; a trained adapter's
            # new values go into its own Parameters through load_peft_adapter, where the optimizer keeps them)
            raise ValueError(f"{what}: layer {n!r} trains it (its factors require grad), and a hotswap swaps "
                             f"serving adapters; freeze the factors (requires_grad_(False); an adapter set aside by a "
                             f"switch is not among the model's parameters: `for t in layer.get_adapter({name!r})[:2]: "
                             f"t.requires_grad_(False)`; one a load marked to train: `layer.mark_trainable("
                             f"{name!r}, False)`) to hotswap, or "
                             f"load_peft_adapter to replace it (its values go into the adapter's own Parameters, "
                             f"which an optimizer built before keeps training)")
    return [m for _, m in zeroed]


def _base_tensor(model, name, what):
    """The model's own `what` ("weight" or "bias") of module `name` as peft names it (inside a lora_ext layer: its
    base, unmerged; inside a module saved whole or given rows of tokens: the original's), or None."""
    module = _saved.module_at(model, name)
    if module is None:
        return None
    module = _saved.original(module)
    if isinstance(module, LoRALayer):
        key = module._weight_key if what == "weight" else module._weight_key.rsplit("weight", 1)[0] + "bias"
        return module.state_dict().get(key)
    return module._parameters.get(what)


def _peft_factors(layer, name, A, B, r):
    """(key suffix A, key suffix B, A, B, rank) in peft's layout for one layer's adapter."""
    A, B = A.detach(), B.detach()
    if isinstance(layer, layers.Embedding):
        return ".lora_embedding_A", ".lora_embedding_B", A, B, r
    if isinstance(layer, layers.MergedLinear):
        # A fused layer's update is exactly a plain rank n*r one: B padded with zeros outside each group's
        # output block.
        n, nb = len(layer.block_ids), layer.out_features // len(layer.enable_lora)
        full = B.new_zeros(layer.out_features, n * r)
        for j, e in enumerate(layer.block_ids):
            full[e * nb:(e + 1) * nb, j * r:(j + 1) * r] = B[j * nb:(j + 1) * nb]
        return ".lora_A.weight", ".lora_B.weight", A, full, n * r
    if isinstance(layer, layers.ConvLoRA):
        return (".lora_A.weight", ".lora_B.weight", *_peft_conv_factors(layer, name, A, B, r))
    return ".lora_A.weight", ".lora_B.weight", A, B, r


def _peft_conv_factors(layer, name, A, B, r):
    """(A, B, rank) of a conv adapter in peft's layout (see _to_layer_layout). B = X (x) I_k0, as a loaded peft
    adapter is, saves as X at rank r; any other B as the exact rank-r*k0*k0 pair whose filter (j, q) holds A's row j
    in chunk q and zeros elsewhere."""
    c = layer.conv  # (groups == 1: save refused others first, conv_refusal)
    k0, out = c.kernel_size[0], c.out_channels
    ones = (1,) * (c.weight.dim() - 2)
    blocks = B.reshape(out, k0, r, k0)  # [o, q, t, q']
    diagonal = blocks.diagonal(dim1=1, dim2=3)  # [o, t, q]
    off_diagonal = blocks.masked_fill(torch.eye(k0, dtype=torch.bool, device=B.device)[None, :, None, :], 0)
    if not off_diagonal.any() and bool((diagonal == diagonal[..., :1]).all()):
        return A.reshape(r, c.in_channels, *c.kernel_size), diagonal[..., 0].reshape(out, r, *ones), r
    rank = r * k0 * k0
    spread = A.new_zeros(r * k0, k0, k0, A.shape[1])  # [j, q, chunk, :]
    for q in range(k0):
        spread[:, q, q] = A
    return (spread.reshape(rank, c.in_channels, *c.kernel_size),
            B.reshape(out, k0, r * k0).transpose(1, 2).reshape(out, rank, *ones), rank)


def _under_wrappers(model, factors: dict, base_weights: dict, trained: dict):
    """(factors, base weights) with each module the file names as peft does, without wrapper names, renamed to its
    name in the model where wrappers hold it (activation checkpointing's, FSDP1's: utils.plain_name); `trained`
    given the file's name of each (the patterns match those). A load into a checkpoint-wrapped model was refused
    ("factors ... that the config's target_modules ... do not select", r12), where save_peft_adapter writes such a
    model's adapter without the wrapper names."""
    wrapped = {}
    for name, _ in model.named_modules():
        if plain_name(name) != name:
            wrapped.setdefault(plain_name(name), name)
    if not wrapped:
        return factors, base_weights
    new = lambda n: wrapped.get(n, n)  # noqa: E731
    trained.update({new(n): trained.get(n, n) for n in factors if new(n) != n})
    return ({new(n): v for n, v in factors.items()},
            {(new(k[0]), k[1]) if isinstance(k, tuple) else new(k): v for k, v in base_weights.items()})


def _plain_names(model):
    """The model's module names as a model without lora_ext layers has them (the insides of its layers left out;
    a module saved whole (ModulesToSave) has its original module's insides), without torch's wrapper names
    (utils.plain_name), sorted."""
    inner = tuple(n + "." for n, m in model.named_modules() if n and isinstance(m, (LoRALayer, _saved.ModulesToSave)))
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    for n, wrapper in _saved.wrappers(model):
        names += [f"{n}.{c}" for c, _ in wrapper.original_module.named_modules() if c]
    return sorted(set(map(plain_name, names)))


def _saved_copies(model, found, adapter, tensors, every):
    """Puts adapter `adapter`'s copies of modules saved whole into `tensors` (peft's keys: the module's state
    under its name); returns their names, the modules_to_save peft needs to choose exactly those modules (by its
    string-suffix rule) among `every` (the plain model's names) and keep LoRA off them, refusing where no such
    list exists."""
    saved = [(plain_name(n), w) for n, w in _saved.wrappers(model) if adapter in w.adapter_names
             and not isinstance(w, _tokens.TrainableTokens)]
    names = [n for n, _ in saved]
    for name, wrapper in saved:
        # (a module the adapter saves whole too is one peft would save anyway: DistilBERT's pre_classifier)
        others = [o for o in every if o not in names and _saved.saved_match([name], o)]
        if others:
            raise ValueError(f"save: module {name!r} is saved whole by adapter {adapter!r}, but peft's modules_to_save "
                             f"{name!r} would also save {_names(others)} (its names end with it)")
        for key, t in wrapper.modules_to_save[adapter].state_dict().items():
            tensors[PREFIX + name + "." + key] = _tokens.file_copy(t)
    off = [n for n, _ in found if _saved.keeps_lora_off(names, n)]
    if off:
        raise ValueError(f"save: peft would keep LoRA off layer(s) {_names(off)}, whose names contain a module that "
                         f"adapter {adapter!r} saves whole ({_names(names)})")
    return names


def save_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> None:
    """Writes one adapter of the model's lora_ext layers (default: the active one) as a peft LoRA adapter
    directory that peft's PeftModel.from_pretrained loads into the plain model (DistributedDataParallel and
    torch.compile wrappers are looked through). Both files are written under temporary names and
    renamed when both are complete; model-level changes on other threads wait while the factors are read. A model
    sharded by FSDP2 or tensor parallel: every rank calls it (its sharded tensors are gathered, a collective, as
    lora_state_dict's), and the first rank of each group they were gathered over writes the files (one replica of
    HSDP may save alone); with one such group dimension, a write that fails there raises on every rank."""
    inner = unwrap(model)  # names as the plain model has them (no "module." / "_orig_mod." prefix)
    _inject.refuse_fsdp1(inner, "save_peft_adapter",  # (it wrote FSDP1's 1-D shard pieces under its wrapper names)
                         "; lora.lora_state_dict(model) gives the factors whole under the model's keys (every rank "
                         "calls it), to save from the unwrapped model")
    # one adapter throughout: model-level switches on other threads (through the wrapper or the model) wait
    with hold(model), (hold(inner) if inner is not model else contextlib.nullcontext()):
        found = [(plain_name(n), m) for n, m in lora_layers(inner)]  # (peft's keys: no wrapper names, F1)
        if not found:
            raise ValueError("save: model holds no lora_ext layer with an adapter")
        sharded.reshard_fsdp(inner)  # (FSDP2: gathered under a MixedPrecisionPolicy, factors are bfloat16 copies)
        if adapter_name is None:
            actives = {m.active_adapter for _, m in found}
            if len(actives) != 1:
                raise ValueError(f"save: the lora_ext layers disagree on the active adapter ({sorted(actives)}); "
                                 f"name the adapter to save (adapter_name=) or set_adapter the model first")
        tensors, ranks, alphas, dropouts = {}, {}, {}, {}
        gathers = sharded.gathers()  # (any sharded tensor gathered, a collective: every rank is in this call)
        # the layers the adapter targets: those that hold it, and not as a stand-in of zeros (peft saves an adapter
        # of other target modules than the active one's alike)
        def wanted(layer):  # the adapter saved from `layer` (the one active in every layer as the save began)
            return adapter_name if adapter_name is not None else next(iter(actives))
        every_adapter = sorted({a for _, m in found for a in m.adapter_names})
        held, kept = [], []
        for n, m in found:
            with m._lock:  # (a switch of the layer alone on another thread lacks the adapter in neither place only
                # while it holds its lock: read unlocked, the file left that layer out, h38)
                if wanted(m) in m.adapter_names:
                    held.append((n, m))
                    if not m.is_stand_in(wanted(m)):
                        kept.append((n, m))
        found = kept
        if not found:
            raise ValueError(f"save: no lora_ext layer holds adapter {adapter_name!r} " + (
                "(only stand-ins of zeros, where the model serves the base for it)" if held else
                f"(they hold {every_adapter})"))
        for name, layer in found:
            adapter = wanted(layer)
            if isinstance(layer, layers.Embedding) and layer.max_norm is not None:
                raise ValueError(f"save: layer {name!r} is an Embedding with max_norm={layer.max_norm}: peft would "
                                 f"renormalise the adapter's per-token vectors (columns of lora_embedding_A) too, and "
                                 f"serve other outputs")
            read = _inject.read_without_call_text(inner, name)
            if read is not None:
                raise ValueError(f"save: layer {name!r}: {read[0]}: peft would serve the model without the adapter"
                                 f"{read[1]}")
            why = conv_refusal(layer.conv) if isinstance(layer, layers.ConvLoRA) else None
            if why is not None:
                raise ValueError(f"save: layer {name!r} is a convolution with {why}")
            # read and copied under the layer's lock: a switch of the layer alone on another thread (layer.set_adapter,
            # add_adapter: no model lock) rewrites the live factors (h38: 'default' saved with b's factors, or A of
            # one adapter beside B of another, in 4-37% of saves racing them)
            with layer._lock:
                A, B, scaling = layer.get_adapter(adapter)
                if sharded.is_dtensor(A) or sharded.is_dtensor(B):  # FSDP2, tensor parallel: whole (every rank calls)
                    A, B = sharded.full(A.detach()), sharded.full(B.detach())
                if A.is_meta or B.is_meta:  # (an accelerate offload keeps the live factors' values in its hook)
                    raise ValueError(f"save: layer {name!r}: adapter {adapter!r}'s factors are on the meta device: "
                                     f"{layers.meta_refusal(layer)}")
                ops.check_finite(f"save: layer {name!r}, adapter {adapter!r}", A.detach(), B.detach(), scaling)
                if layer.reserved_rank is not None:  # the adapter's own rank, without reserve_rank's padding
                    A, B = layer.own_factors(adapter, (A, B))
                ka, kb, A, B, rank = _peft_factors(layer, name, A, B, layer.rank_of(A))
                tensors[PREFIX + name + ka], tensors[PREFIX + name + kb] = _tokens.file_copy(A), _tokens.file_copy(B)
            ranks[name], alphas[name] = rank, scaling * rank
            p = layers.trained_dropout(layer, adapter)
            if p is not None:
                dropouts[name] = p
        every = _plain_names(inner)
        adapter = adapter_name if adapter_name is not None else wanted(found[0][1])
        saved = _saved_copies(inner, found, adapter, tensors, every)
        token_indices = _tokens.saved_rows(inner, adapter, PREFIX, tensors, every)
    first = found[0][0]
    r, alpha = ranks[first], alphas[first]
    # peft holds one lora_dropout per adapter: layers that train this one with others are named
    dropout = dropouts[min(dropouts)] if dropouts else 0.0
    # biases trained beside the factors are the layer's own, not the adapter's; a peft file of lora_ext holds none
    # (bias: "none"), so a save left them out without a word, and the reload served 8.9e-4 off (h5): named where
    # mark_only_lora_as_trainable's bias= trains them or their values changed since inject (utils.trained_bias); with
    # bias='all' the other modules' trainable biases too (r7: layers without biases of their own named none, 0.245 off)
    trained_biases = [f"{n}.{_layer_bias(m)[0]}" for n, m in found if trained_bias(m)]
    if any(m.__dict__.get("_bias_mode") == "all" for _, m in found):
        own = {id(_layer_bias(m)[1]) for _, m in found if _layer_bias(m) is not None}
        trained_biases += [plain_name(n) for n, p in inner.named_parameters()
                           if p.requires_grad and _is_bias(n) and id(p) not in own]
    if trained_biases:
        warnings.warn(f"save: the biases {_names(trained_biases)} are trained (mark_only_lora_as_trainable's bias=, or "
                      f"their values changed since inject) and are not saved: a peft adapter file of "
                      f"lora_ext holds the factors only (bias: 'none'); keep them with lora.lora_state_dict(model, "
                      f"bias=...) and load that after the adapter, or freeze them (mark_only_lora_as_trainable(model) "
                      f"does)", stacklevel=2)
    if len(set(dropouts.values())) > 1:
        warnings.warn(f"save: the layers of adapter {adapter!r} train with different lora_dropout "
                      f"({', '.join(f'{n}: {p}' for n, p in sorted(dropouts.items()))}); peft's config holds one: "
                      f"{dropout} is written", stacklevel=2)
    # peft matches a pattern key, and a target_modules entry, at the end of a module name at a '.' boundary
    # (`out` also matches `blocks.0.out`): keys that would reach another module are anchored with '^', and
    # target_modules is a regex of the exact names (peft matches a string whole) when a list would reach
    # a module the adapter leaves alone
    keys = {n: ("^" if any(o.endswith("." + n) for o in every) else "") + re.escape(n) for n in ranks}
    targets = sorted(ranks)
    if any(o not in ranks and _inject.name_matches(targets, o) for o in every):
        targets = "(" + "|".join(map(re.escape, targets)) + ")"
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True,
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for _, m in found),
        "target_modules": targets,
        "rank_pattern": {keys[n]: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {keys[n]: v for n, v in alphas.items() if v != alpha},
        "modules_to_save": saved or None,
        "trainable_token_indices": token_indices,
    }
    # Who writes: sharded tensors were gathered over groups of ranks (a mesh, or one replica's sub-mesh: HSDP, data
    # parallel x FSDP2); the first rank of each such group writes (sharded.writer_of), and with one group dimension
    # it tells the group whether it wrote, so that none returns as if saved over a failed write. A save that
    # gathered nothing (an inactive adapter held whole; replicated factors) made no collective: every rank writes
    dist = torch.distributed
    entries = sharded.gathered_since(gathers) if dist.is_initialized() else []
    writes, group, src = sharded.writer_of(entries) if entries else (True, None, None)
    if not writes:
        if group is not None:
            told = [None]
            dist.broadcast_object_list(told, src=src, group=group)
            if told[0] is not None:
                raise RuntimeError(f"save: rank {src}, which writes the adapter, could not write it to "
                                   f"{os.fspath(path)!r}: {told[0]}")
        return sorted(ranks)
    try:
        _write_adapter(path, tensors, cfg)
    except BaseException as e:
        if group is not None:
            dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=src, group=group)
        raise
    if group is not None:
        dist.broadcast_object_list([None], src=src, group=group)
    return sorted(ranks)


def _write_adapter(path, tensors, cfg) -> None:
    """Writes adapter_model.safetensors and adapter_config.json into directory `path`, both or neither."""
    from safetensors.torch import save as safetensors_bytes

    os.makedirs(path, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # left by a killed save
        remove_stale_temporaries(os.path.join(path, name))
    # both files complete before either is renamed: a failure leaves the directory's old pair as it was
    with atomic_files([os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)]) as (tmp_weights,
                                                                                              tmp_config):
        # (bytes written into lora_ext's own temporary: safetensors' save_file writes a .tmpXXXXXX of its own beside
        # it, which a killed save left for good, adapter-sized, where stale_temporaries does not know its name)
        _write_bytes(tmp_weights, safetensors_bytes(tensors, metadata={"format": "pt",
                                                                       SAVED_CONFIG: json.dumps(saved_options(cfg))}))
        _write_bytes(tmp_config, json.dumps(cfg, indent=2).encode("utf-8"))
