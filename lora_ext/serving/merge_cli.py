"""`lora-ext merge`: a peft LoRA adapter merged into a safetensors checkpoint, streamed tensor by tensor.

The output is written in safetensors format directly: its header is known before any data (names, dtypes,
shapes come from the input's headers), so each tensor is read, merged in place (ops.merge_, on the GPU when
asked) and written before the next is read. Peak memory is about one tensor plus the adapter. Sharded
inputs give sharded outputs with the same relative file names (subdirectories too) and index; other files
of a model directory (config.json, tokenizer files) are copied. The output appears under its final name
only when complete; temporaries left by killed runs are removed by the next run into the same place.

Safety: the output may never be the base, lie inside the base directory or hold the base or the adapter;
an existing output is replaced only with force=True (--force). Every failure is a MergeError, one line
naming the file and the cause. Values that become inf/NaN in the output dtype (an overflowing merge or
--dtype float16) are refused unless allow_inf=True (--allow-inf).
"""
import errno
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import time

import torch
from tqdm import tqdm

from .. import ops
from ..named_adapters import deferred_interrupt
from .files import atomic_path, remove_stale_temporaries, restore_kept_aside
from . import checkpoint_names as _names
from . import hub as _hub
from . import injection as _inject
from . import saved_modules as _saved
from . import tokens as _tokens
from .peft_io import (CONFIG_NAME, MAGNITUDE_SUFFIX, PREFIX, base_weights_elsewhere, check_base_weight, is_lora_key,
                      factor_modules, module_factors, module_rank_scaling, pattern_clash_warning, read_config,
                      read_tensors)
from .peft_io import _names as _name_list

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100_000_000  # the safetensors library's own limit on a header's length

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("complex64", "C64"),
                   ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
                   ("float8_e8m0fnu", "F8_E8M0")):  # (copied as they are; F8_E8M0: MX formats' scales, s2)
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# tests only: seconds to sleep after each written tensor, so that a run can be killed mid-way
DELAY_ENV = "LORA_EXT_MERGE_TEST_DELAY"


class MergeError(ValueError):
    """A refusal or failure of `lora-ext merge`: one line naming the file (or option) and the cause."""


def _os_error(what, e):
    """MergeError for an OSError met while `what` (e.g. "writing /out/x.safetensors")."""
    cause = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        cause += " (the disk is full)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        cause += " (no permission)"
    name = f" {e.filename}" if e.filename and str(e.filename) not in what else ""
    return MergeError(f"{what}{name}: {cause}")


# ----------------------------------------------------------------------------------------------- reading

def read_header(path):
    """(metadata, [(key, st dtype, shape, start, end)] in storage order, data start) of a safetensors file.

    The 8-byte little-endian header length is checked against the file size before anything else is read,
    and every entry against the file (dtype, shape, offsets contiguous and inside the file). Raises
    MergeError and nothing else."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise MergeError(f"{path}: not a safetensors file, or truncated: its header length {n} exceeds "
                                 f"the file's {size} bytes")
            if n > MAX_HEADER:
                raise MergeError(f"{path}: header length {n} is over the {MAX_HEADER}-byte limit of safetensors")
            raw = f.read(n)
    except OSError as e:
        raise _os_error(f"reading {path}", e) from None
    if len(raw) < n:
        raise MergeError(f"{path}: truncated while reading its {n}-byte header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MergeError(f"{path}: not a safetensors file: its header is not valid JSON "
                         f"({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: not a safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise MergeError(f"{path}: __metadata__ is not a mapping of strings")
    entries = []
    for key, v in header.items():
        if not isinstance(v, dict):
            raise MergeError(f"{path}: tensor {key!r}: its header entry is not an object")
        dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _FROM_ST:
            raise MergeError(f"{path}: tensor {key!r}: unknown dtype {dtype!r} (known: {', '.join(_FROM_ST)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise MergeError(f"{path}: tensor {key!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise MergeError(f"{path}: tensor {key!r}: bad data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _FROM_ST[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise MergeError(f"{path}: tensor {key!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                             f"but a {dtype} tensor of shape {shape} needs {nbytes}")
        entries.append((key, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e[3], e[4]))
    end = 0
    for key, _, _, start, stop in entries:
        if start != end:
            raise MergeError(f"{path}: tensor {key!r}: data starts at {start}, expected {end} (overlapping or "
                             f"gapped offsets)")
        end = stop
    data = 8 + n
    if data + end != size:
        what = "truncated" if data + end > size else "longer than its header says"
        raise MergeError(f"{path}: {what}: the header describes {data + end} bytes, the file has {size}")
    return meta, entries, data


def _read_tensor(f, path, entry, data_start):
    key, dtype, shape, start, stop = entry
    dt = _FROM_ST[dtype]
    if stop == start:
        return torch.empty(shape, dtype=dt)
    try:
        f.seek(data_start + start)
        buf = bytearray(stop - start)
        got = f.readinto(buf)
    except OSError as e:
        raise _os_error(f"reading {path}", e) from None
    if got != len(buf):
        raise MergeError(f"{path}: truncated: tensor {key!r} needs {len(buf)} bytes, {got} are left")
    return torch.frombuffer(buf, dtype=dt).reshape(shape)


def _get_tensor(path, header, key):
    _, entries, data_start = header
    entry = next(e for e in entries if e[0] == key)
    try:
        with open(path, "rb") as f:
            return _read_tensor(f, path, entry, data_start)
    except OSError as e:
        raise _os_error(f"reading {path}", e) from None


def _input_files(base):
    """([(shard path, path relative to the base directory or None)], index or None, base directory or None)."""
    if os.path.isfile(base):
        if base.endswith(".json"):  # (model.safetensors.index.json: its header read as safetensors' says nothing)
            raise MergeError(f"--base: {base!r} is a JSON file (a sharded checkpoint's index?); give the directory "
                             f"holding the index and its shards, or one .safetensors file")
        return [(base, None)], None, None
    if not os.path.isdir(base):
        raise MergeError(f"--base: {base!r} is neither a directory nor a file")
    index_path = os.path.join(base, INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except OSError as e:
            raise _os_error(f"reading {index_path}", e) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise MergeError(f"{index_path}: not valid JSON ({type(e).__name__})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) and v for v in weight_map.values())):
            raise MergeError(f"{index_path}: no weight_map of tensor names to shard files")
        shards = []
        for rel in sorted(set(weight_map.values())):
            norm = os.path.normpath(rel)
            if os.path.isabs(rel) or norm == os.pardir or norm.startswith(os.pardir + os.sep) or norm == ".":
                raise MergeError(f"{index_path}: shard {rel!r} lies outside the model directory")
            path = os.path.join(base, norm)
            if not os.path.isfile(path):
                raise MergeError(f"{index_path}: names shard {rel!r}, which is not a file in {base!r}")
            shards.append((path, norm))
        return shards, index, base
    single = os.path.join(base, SINGLE_NAME)
    if os.path.isfile(single):
        return [(single, SINGLE_NAME)], None, base
    raise MergeError(f"--base: {base!r} holds neither {INDEX_NAME} nor {SINGLE_NAME}")


def _side_files(base_dir):
    """Every file under the base directory (subfolders too: tokenizer/, original/; not hidden ones: .git, .cache),
    symbolic links followed, but never into a directory the walk is already inside, nor one holding it (h9: a link
    back up, loop -> ., was walked into loop/loop/... until the system refused the path, and named or copied what it
    found at each depth; r12: up -> .. walked the parent). Two links to one directory elsewhere are both followed."""
    inside = {base_dir: frozenset([os.path.realpath(base_dir)])}  # {walked path: the real directories it lies in}
    for root, dirs, names in os.walk(base_dir, followlinks=True):
        above = inside.pop(root)
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, d))
            if not any(_inside(a, real) for a in above):
                inside[os.path.join(root, d)] = above | {real}
                kept.append(d)
        dirs[:] = kept
        for name in sorted(names):
            if os.path.isfile(os.path.join(root, name)):
                yield os.path.join(root, name)


# weights of other formats a loader could read beside the merged checkpoint: copied unmerged, they would serve the
# base (s2; a pickled peft adapter, adapter_model.bin, would be applied again over the merge, r45). Torch pickles are
# weights but for training state (transformers' Trainer's and accelerate's: optimizer.pt, scheduler.bin,
# rng_state.pth, ...), copied as they are (r44)
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".ggml", ".onnx", ".onnx_data", ".tflite", ".h5", ".msgpack", ".ot",
                    ".keras", ".pte")  # (.ot: rust-bert's; .pte: ExecuTorch's)
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")
_TRAINING_STATE = re.compile(r"^(training_args|optimizer|scheduler|sampler|rng_state|scaler|user_content|"
                             r"trainer_state|random_states|dl_state_dict|rank\d+-of-\d+-optimizer)")


def _is_weights(name):
    if name.endswith(_PICKLES):
        return not _TRAINING_STATE.match(name)
    return name.endswith(_WEIGHT_SUFFIXES) or (name.endswith(".npz") and name.startswith(("model", "weights")))


def _check_other_weights(base_dir, files):
    """Refuses a base directory holding weights besides the ones merged (a model.safetensors beside an index, a
    consolidated.safetensors, pytorch_model*.bin): they would be copied unmerged, and transformers reads
    model.safetensors before an index."""
    merged = {os.path.abspath(p) for p, _ in files}
    others = sorted(os.path.relpath(p, base_dir) for p in _side_files(base_dir)
                    if _is_weights(os.path.basename(p)) and os.path.abspath(p) not in merged)
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        reads = SINGLE_NAME if [rel for _, rel in files] == [SINGLE_NAME] else f"the {len(files)} shards of {INDEX_NAME}"
        raise MergeError(f"--base {base_dir!r} holds weights besides {reads}, which the merge reads: "
                         f"{', '.join(others[:5])}{more}; they would be copied unmerged (and a loader may read them "
                         f"instead). Move them out, or point --base at a directory with one set of weights")


def _headers(files, index, index_path):
    """{shard path: read_header(path)}; the index's weight_map checked against the shards' contents."""
    out = {path: read_header(path) for path, _ in files}
    if index is not None:
        rel_of = {rel: path for path, rel in files}
        keys = {path: {e[0] for e in entries} for path, (_, entries, _) in out.items()}
        for key, rel in index["weight_map"].items():
            if key not in keys[rel_of[os.path.normpath(rel)]]:
                raise MergeError(f"{index_path}: maps tensor {key!r} to {rel!r}, which does not hold it")
    return out


# ---------------------------------------------------------------------------------------------- the output

def _inside(path, parent):
    """Whether `path` is `parent` or lies under it (both already resolved)."""
    try:
        return os.path.commonpath([path, parent]) == parent
    except ValueError:
        return False


def check_output(base, adapter, out, force, base_is_file):
    """Refuses an output that is the base, lies inside the base directory, holds the base or the adapter,
    or already exists (unless force; never for the base). Reads nothing but directory entries and links."""
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if not isinstance(out, str) or not out.strip():  # ('' is the current directory to abspath: --force replaced it)
        raise MergeError(f"--out: {out!r} is not a path (an unset variable?); give the file or directory to write")
    if base_is_file and (out.endswith((os.sep, "/")) or os.path.basename(out) in (".", "..")):
        # (abspath drops the separator or the dot: a file named as the directory was written)
        raise MergeError(f"--out: {out!r} names a directory (a trailing separator or '.'); --base is a file, so "
                         f"give the output file's path (such as {os.path.join(out, os.path.basename(base))!r})")
    rb, ro, ra = os.path.realpath(base), os.path.realpath(out), os.path.realpath(adapter)
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # (a working directory removed meanwhile: nothing can hold it)
        cwd = None
    if cwd is not None and _inside(cwd, ro):
        raise MergeError(f"--out: {out!r} is or holds the current directory; choose a path outside it")
    if ro == rb or (os.path.exists(out) and os.path.exists(base) and os.path.samefile(out, base)):
        raise MergeError(f"--out: {out!r} is --base; the merge never overwrites its input (not even with --force)")
    if not base_is_file and _inside(ro, rb):
        raise MergeError(f"--out: {out!r} lies inside the --base directory {base!r}; choose a path outside it")
    if _inside(rb, ro):
        raise MergeError(f"--out: {out!r} holds --base {base!r}; writing there would delete the input")
    if ro == ra or _inside(ra, ro):
        raise MergeError(f"--out: {out!r} is or holds --adapter {adapter!r}; choose another path")
    if _inside(ro, ra):
        raise MergeError(f"--out: {out!r} lies inside the --adapter directory {adapter!r}; choose another path")
    for option, root in (("--base", base), ("--adapter", adapter)):  # files that are links (the hub cache's layout)
        for path in ([root] if os.path.isfile(root) else _side_files(root) if os.path.isdir(root) else []):
            real = os.path.realpath(path)
            if _inside(real, ro):
                raise MergeError(f"--out: {out!r} holds {real}, the file {option}'s {path} links to; writing there "
                                 f"would delete the input (not even with --force)")
    parent = os.path.dirname(ro)
    while not os.path.lexists(parent):  # the directories the merge makes
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise MergeError(f"--out: {out!r} lies under {parent!r}, which is a file, not a directory; choose another "
                         f"path")
    if not os.path.lexists(out):
        return
    if os.path.isdir(out) and not os.path.islink(out):
        try:
            empty = not os.listdir(out)
        except OSError as e:
            raise _os_error(f"--out: listing {out}", e) from None
        if base_is_file and not force:
            raise MergeError(f"--out: {out!r} is a directory; --base is a file, so give a file path "
                             f"(or --force to replace the directory)")
        if not empty and not force:
            raise MergeError(f"--out: {out!r} exists and is not an empty directory (--force replaces it)")
    elif not force:
        raise MergeError(f"--out: {out!r} exists (--force replaces it)")


def _write_path(root, rel):
    return root if rel is None else os.path.join(root, rel)


def merge_checkpoint(base, adapter, out, device="cpu", dtype=None, progress=True, force=False, allow_inf=False,
                     log=None, revision=None):
    """Writes base + adapter (merged) to `out`; returns the number of merged weights. `adapter` may be a Hugging
    Face Hub repo id where no such local path exists (fetched into the Hub cache, at `revision`).

    Raises MergeError (one line, naming the file and the cause) for every failure it foresees; with
    allow_inf, values that became inf/NaN in the output dtype are written and counted on `log` (stderr)."""
    log = log or sys.stderr
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is visible to torch")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES.get(dtype)
    if not os.path.exists(base):
        raise MergeError(f"--base: {base!r} is neither a directory nor a file" + (
            " (a Hub id is not fetched for --base: download the checkpoint first, `hf download "
            f"{base} --local-dir DIR`, and give DIR)" if _hub.looks_like_repo_id(base) else ""))
    try:
        adapter = _hub.resolve(adapter, revision, option="--adapter")
    except (OSError, ValueError) as e:
        raise MergeError(str(e) if str(e).startswith("--") else f"--{e}") from None
    put_back = restore_kept_aside(out)  # (before the output is checked: as it was before a killed run)
    if put_back is not None:
        print(f"lora-ext merge: put back {out} from {put_back}, where an interrupted --force run had moved it aside",
              file=log)
    check_output(base, adapter, out, force, base_is_file=os.path.isfile(base))
    files, index, base_dir = _input_files(base)
    if base_dir is not None:
        _check_other_weights(base_dir, files)

    # (signals held back over the reads: what a handler raises comes out as raised, after them, not rewrapped)
    with deferred_interrupt():
        try:
            cfg = read_config(adapter, dora=True)
            tensors = read_tensors(adapter, cfg)
        except MergeError:
            raise
        except ValueError as e:  # the readers' refusals, which name the file and the option
            raise MergeError(f"--adapter: {e}") from None
        except OSError as e:
            if e.errno is None:  # the readers' own refusals ("no adapter_config.json in ...")
                raise MergeError(f"--{e}") from None
            raise _os_error(f"--adapter: reading {adapter}", e) from None
        except Exception as e:  # a damaged weights file: the safetensors or pickle readers' own errors
            raise MergeError(f"--adapter {adapter!r}: cannot read its weights file: {type(e).__name__}: "
                             f"{' '.join(str(e).split())}") from None
    entries = _saved.config_entries(os.path.join(adapter, CONFIG_NAME), cfg)
    # rows of tokens (trainable_token_indices), set aside: written into their weights below
    rows = {k: tensors.pop(k) for k in list(tensors) if k.startswith(PREFIX) and k.endswith(_tokens.DELTA_SUFFIX)}
    states, tensors = _saved.split_state(tensors, _saved_names(tensors, entries), PREFIX)
    magnitudes = {}
    meta = _meta_model(base, base_dir)
    file_modules = factor_modules(tensors)  # the names the adapter gave its modules (before any renaming below)
    with _names.naming_another_class(meta, file_modules if entries else ()):  # (as load_peft_adapter)
        factors, base_weights = module_factors(tensors, where=f"--adapter {adapter!r}", magnitudes=magnitudes)
    trained = {}  # a renamed module's name as the adapter had it (rank_pattern / alpha_pattern match those)
    try:
        factors, base_weights, magnitudes = _names.rename_adapter(f"--adapter {adapter!r}", meta, factors, base_weights,
                                                                  magnitudes, trained=trained)
    except ValueError as e:
        raise MergeError(str(e)) from None
    if not factors and not rows and not states:
        raise MergeError(f"--adapter {adapter!r}: its weights file holds no LoRA factors (nothing to merge)")
    _check_targets(adapter, cfg, factors, meta, entries, rowed=[k[len(PREFIX):] for k in rows], trained=trained)
    _check_dora(adapter, cfg, factors, magnitudes)
    headers = _headers(files, index, os.path.join(base, INDEX_NAME))
    # the checkpoint's keys as the model names them (transformers renames some when it loads them: a VLM's
    # language_model.model.* is model.language_model.*); `stored` gives a model name's key in the checkpoint
    names, converted, twice = _names.model_names(meta, [e[0] for _, entries, _ in headers.values() for e in entries])
    stored = {v: k for k, v in names.items()}
    ck = lambda key: stored.get(key, key)  # noqa: E731
    where = {names.get(e[0], e[0]): path for path, (_, entries, _) in headers.items() for e in entries}
    shapes = {names.get(e[0], e[0]): e[2] for _, (_, entries, _) in headers.items() for e in entries}
    _check_class_shapes(base, meta, shapes, {names.get(e[0], e[0]): e[1] for _, (_, entries, _) in headers.items()
                                             for e in entries}, converted)
    _check_tied(base, base_dir, factors, shapes, meta=meta)
    if out_dtype is not None:
        _check_quantized_dtype(base, base_dir, headers, dtype)
    try:  # base tensors saved for modules this file has no factors of (another adapter's embedding or head)
        base_weights_elsewhere(f"--adapter {adapter!r}", base_weights, factors,
                               lambda n, what: _get_tensor(where[f"{n}.{what}"], headers[where[f"{n}.{what}"]],
                                                           ck(f"{n}.{what}")) if f"{n}.{what}" in where else None)
    except ValueError as e:
        raise MergeError(str(e)) from None
    with _names.naming_another_class(meta, file_modules):
        replace = _replacements(base, base_dir, adapter, entries, states, factors, shapes, headers, where, meta, ck,
                                twice)
        token_rows = _token_rows(base, adapter, cfg, rows, meta, factors, states, shapes, headers, where, ck, twice,
                                 out_dtype)
    replace.update(token_rows)
    plan = {}
    kinds = _module_kinds(meta)  # a Linear or Conv1D's layout is not in its shape
    lora_keys = {}  # module -> its LoRA keys in --base ("q.lora_A": a loralib / lora_ext model's own state dict)
    for k in where:
        for mark in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B"):
            if mark + "." in k or k.endswith(mark):
                lora_keys.setdefault(k[:k.index(mark)], []).append(k)
    pattern_clash_warning(cfg, [trained.get(n, n) for n in factors], os.path.join(adapter, CONFIG_NAME))
    for name, (A, B, embedding) in factors.items():
        key = name + ".weight"
        if name in lora_keys:
            found = sorted(lora_keys[name])
            raise MergeError(f"--base {base!r} holds LoRA factors of module {name!r} ({', '.join(map(repr, found[:4]))}"
                             f"): a LoRA model's own state dict (loralib's, lora_ext's), whose loader would add them "
                             f"on top of the merged weight, serving the adapter twice; give the base model's weights, "
                             f"without the factors")
        if key in twice:
            raise MergeError(f"--adapter: module {name!r}'s weight is stored more than once in --base {base!r}: as "
                             f"{', '.join(map(repr, twice[key]))}, which transformers all loads into that one weight, so "
                             f"the merge cannot tell which the model serves; keep one of them")
        if key not in where:
            if key in converted:
                raise MergeError(f"--adapter: module {name!r}'s weight is not stored as it is in --base {base!r}: "
                                 f"transformers makes it from {', '.join(map(repr, converted[key][:3]))} when it loads "
                                 f"the checkpoint (a conversion, not a renaming), which the merge cannot write into; "
                                 f"merge with peft (merge_and_unload) instead")
            raise MergeError(f"--adapter: module {name!r} has no weight {key!r} in --base {base!r}")
        st_dtype = next(e[1] for e in headers[where[key]][1] if e[0] == ck(key))
        if _FROM_ST[st_dtype] not in DTYPES.values() and _FROM_ST[st_dtype] is not torch.float64:
            raise MergeError(f"{where[key]}: tensor {ck(key)!r} is {st_dtype}, which the merge cannot write into "
                             f"(float16, bfloat16, float32 or float64 weights only; a quantized weight needs its "
                             f"scales)")
        for what, t in (("lora_A", A), ("lora_B", B)):
            if t.dim() < 2 or not t.is_floating_point():
                raise MergeError(f"--adapter: module {name!r}: {what} is a {t.dtype} tensor of shape {tuple(t.shape)}; "
                                 f"LoRA factors are floating-point matrices (or conv kernels)")
        if A.element_size() == 1 or B.element_size() == 1:  # float8 factors (peft serves them): exact in float32
            A, B = A.float(), B.float()
        r, scaling = module_rank_scaling(cfg, trained.get(name, name))
        shape = shapes[key]
        if len(shape) > 2 and A.dim() == len(shape) and tuple(A.shape[2:]) == tuple(shape[2:]) \
                and A.shape[1] != shape[1] and shape[1] and A.shape[1] % shape[1] == 0:
            raise MergeError(f"--adapter: module {name!r} is a grouped convolution (weight {tuple(shape)}, lora_A "
                             f"{tuple(A.shape)}: groups={A.shape[1] // shape[1]}); peft cannot merge LoRA into one "
                             f"either (merge_and_unload raises): serve it unmerged")
        if A.shape[0] != r or B.shape[1] != r:
            raise MergeError(f"--adapter: module {name!r} has factors {tuple(A.shape)} and {tuple(B.shape)}, of "
                             f"rank {A.shape[0]} and {B.shape[1]}, but the config says r={r}")
        if name in base_weights:
            check_base_weight("--adapter", name, base_weights[name],
                              _get_tensor(where[key], headers[where[key]], ck(key)))
        if (name, "bias") in base_weights:
            bias = name + ".bias"
            check_base_weight("--adapter", name, base_weights[name, "bias"],
                              _get_tensor(where[bias], headers[where[bias]], ck(bias)) if bias in where else None,
                              bias=True)
        # peft saves fan_in_fan_out as its last-created layer set it: a GPT-2 adapter of c_proj and lm_head says
        # false, though c_proj is a Conv1D; the model's own classes decide where they can be built
        kind = kinds.get(name) if kinds else None
        A2, B2, transposed = _layout(name, A, B, shapes[key], embedding, bool(cfg.get("fan_in_fan_out")), kind)
        ops.check_finite(f"--adapter module {name!r}", A2, B2, scaling)
        magnitude = _magnitude(name, magnitudes.get(name), shapes[key], B2.shape[0])
        plan[ck(key)] = (A2.to(device), B2.to(device), scaling, transposed, magnitude)

    for p in remove_stale_temporaries(out):
        print(f"lora-ext merge: removed {p}, the leftover temporary of an interrupted run", file=log)
    delay = float(os.environ.get(DELAY_ENV) or 0)
    total = sum(len(entries) for _, entries, _ in headers.values())
    # on stderr, nothing at all when progress is off; "merge [####....] n/total elapsed, tensor name"
    bar = tqdm(total=total, desc="merge", file=sys.stderr, disable=not progress, ascii=".#",
               bar_format="{desc} [{bar:28}] {n_fmt}/{total_fmt} {elapsed}{postfix}")
    nonfinite = {}
    try:
        with bar, atomic_path(out, directory=base_dir is not None, overwrite=force, exclusive=not force) as tmp:
            sizes = {}
            for path, rel in files:
                target = _write_path(tmp, rel)
                if rel is not None and os.path.dirname(rel):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                sizes[path] = _write_shard(path, target, headers[path], plan, device, out_dtype, bar,
                                           nonfinite, allow_inf, delay, replace)
            if base_dir is not None:
                _copy_side_files(base_dir, tmp, files, dtype, log)
                if index is not None:
                    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
                    new_index = dict(index, metadata=dict(meta, total_size=sum(sizes.values())))
                    with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                        json.dump(new_index, f, indent=2)
    except OSError as e:
        raise _os_error(f"--out {out!r}: writing", e) from None
    if token_rows:
        print(f"lora-ext merge: wrote the adapter's rows of tokens (trainable_token_indices) into "
              f"{', '.join(sorted(token_rows))}", file=log)
    if len(replace) > len(token_rows):
        modules = sorted(states)
        print(f"lora-ext merge: wrote the adapter's own {len(replace) - len(token_rows)} tensors of {len(modules)} "
              f"module(s) saved whole (modules_to_save): {', '.join(modules[:5])}{' ...' if len(modules) > 5 else ''}",
              file=log)
    if nonfinite:
        n = sum(nonfinite.values())
        names = ", ".join(f"{k} ({v})" for k, v in list(nonfinite.items())[:5])
        more = f" and {len(nonfinite) - 5} more tensors" if len(nonfinite) > 5 else ""
        print(f"lora-ext merge: warning: --allow-inf: wrote {n} inf/NaN values (made by the merge or the dtype "
              f"conversion) in {len(nonfinite)} tensors: {names}{more}", file=log)
    return len(plan)


def _saved_module(key, entries):
    """The module tensor `key` belongs to that peft's modules_to_save chooses (the shortest leading part, at a '.',
    whose name ends with an entry), or None."""
    parts = key.split(".")
    return next((".".join(parts[:i]) for i in range(1, len(parts)) if _saved.saved_match(entries, ".".join(parts[:i]))),
                None)


def _saved_names(tensors, entries):
    """The modules a peft file saves whole, from its keys that are not LoRA factors."""
    names = {_saved_module(key[len(PREFIX):], entries) for key in tensors
             if key.startswith(PREFIX) and not is_lora_key(key)}
    return sorted(n for n in names if n is not None)


def _replacements(base, base_dir, adapter, entries, states, factors, shapes, headers, where, meta=None,
                  ck=lambda key: key, twice=()):
    """{checkpoint key: tensor} that replace the base's tensors for the modules the adapter saves whole (peft's
    modules_to_save), each checked: the module's every tensor in the checkpoint, nothing else, the same shapes,
    finite values, no LoRA inside it, not one of tied embeddings. `shapes` and `where` are keyed by the model's
    names, `ck` gives a name's key in the checkpoint."""
    replace = {}
    lora = sorted(n for n in factors if _saved.keeps_lora_off(entries, n))
    if lora:
        raise MergeError(f"--adapter: module(s) {', '.join(map(repr, lora[:3]))} have LoRA factors, but "
                         f"modules_to_save {entries!r} keeps LoRA off them (peft ignores those factors)")
    lacking = sorted({m for m in (_saved_module(k, entries) for k in shapes) if m is not None} - set(states))
    if lacking:
        raise MergeError(f"--adapter: modules_to_save {entries!r} chooses module {lacking[0]!r} of --base {base!r}, "
                         f"but the adapter holds none of its tensors (peft refuses such an adapter too)")
    for name, state in sorted(states.items()):
        in_base = sorted(k for k in shapes if k.startswith(name + "."))
        if not in_base:
            tied = (_shared_weights(meta) or {}).get(name)
            why = (f"; the model ties its weight to {', '.join(map(repr, tied))} (tie_word_embeddings), so the "
                   f"checkpoint stores it once, under that name: the merged model would load the copy tied to both "
                   f"(untie them first: save the model with tie_word_embeddings=false)" if tied else "")
            raise MergeError(f"--adapter: module {name!r} is saved whole (modules_to_save) but --base {base!r} has no "
                             f"tensor under {name + '.'!r}{why}")
        missing = [k for k in in_base if k[len(name) + 1:] not in state]
        if missing:
            raise MergeError(f"--adapter: module {name!r} is saved whole (modules_to_save) but the adapter holds no "
                             f"{PREFIX + missing[0]!r}, which --base has; the merge refuses the incomplete module")
        for k, t in sorted(state.items()):
            key = name + "." + k
            if key not in shapes:
                raise MergeError(f"--adapter: unexpected key {PREFIX + key!r}: --base {base!r} has no tensor {key!r}")
            if key in twice:
                raise MergeError(f"--adapter: {PREFIX + key!r}: --base {base!r} stores that tensor more than once "
                                 f"({', '.join(map(repr, twice[key]))}); the merge cannot tell which the model serves")
            if tuple(t.shape) != tuple(shapes[key]):
                raise MergeError(f"--adapter: {PREFIX + key!r} has shape {tuple(t.shape)}, but --base's {key!r} has "
                                 f"{tuple(shapes[key])}")
            st_dtype = next(e[1] for e in headers[where[key]][1] if e[0] == ck(key))
            if t.is_floating_point() != _FROM_ST[st_dtype].is_floating_point:
                raise MergeError(f"--adapter: {PREFIX + key!r} is {t.dtype}, but --base's {ck(key)!r} is {st_dtype}")
            if t.is_floating_point() and _nonfinite(t):
                raise MergeError(f"--adapter: {PREFIX + key!r} holds non-finite values (inf/NaN)")
            replace[key] = t  # cast when written: the overflow check sees it
    _check_tied(base, base_dir, {n.rsplit(".", 1)[0]: (None, None, False) for n in replace
                                 if len(shapes[n]) == 2}, shapes, saved=True, meta=meta)
    return {ck(key): t for key, t in replace.items()}


def _token_rows(base, adapter, cfg, rows, meta, factors, states, shapes, headers, where, ck, twice, out_dtype=None):
    """{checkpoint key: the base's tensor with the adapter's rows of tokens written in} for the config's
    trainable_token_indices (`rows`: the file's rows, by key), as peft's merge_and_unload writes them: each listed
    row replaced, in the weight's dtype (the output's, with --dtype: the rows as the file holds them, not rounded to
    the stored dtype first). A tied head with the embedding's tokens shares its rows (peft saves them
    once); where the checkpoint stores tied weights twice, both are written. Checked: the modules (in the
    checkpoint, no LoRA factors, not saved whole), the indices, shapes and values; nothing else is read."""
    cfg_file = os.path.join(adapter, CONFIG_NAME)
    spec = _tokens.check_spec(cfg_file, cfg.get("trainable_token_indices"))
    if not spec:
        if rows:
            raise MergeError(f"--adapter: unexpected key {sorted(rows)[0]!r}: rows of tokens, but {cfg_file} lists no "
                             f"trainable_token_indices")
        return {}
    # module names: the model's (a tied head's weight is not in the checkpoint), else the checkpoint's
    modules = (sorted(n for n, _ in meta.named_modules(remove_duplicate=False) if n) if meta is not None
               else sorted({k[:-len(".weight")] for k in shapes if k.endswith(".weight")}))
    targets = {}
    for key, indices in spec.items():
        if key is None:
            name = _tokens.input_embedding_name(meta) if meta is not None else None
            if name is None:
                raise MergeError(f"{cfg_file}: trainable_token_indices is a list, which names the model's input "
                                 f"embedding, but no model could be built from --base {base!r}'s config.json to find "
                                 f"it; name the module ({{'embed_tokens': [...]}})")
            matched = [name]
        else:
            matched = [m for m in modules if m.endswith(key)]
            if not matched:
                raise MergeError(f"{cfg_file}: trainable_token_indices names module {key!r}, which has no weight in "
                                 f"--base {base!r} (peft matches the end of a module's name)")
        for m in matched:
            if m in targets:
                raise MergeError(f"{cfg_file}: trainable_token_indices chooses module {m!r} twice")
            targets[m] = indices
    shared = _shared_weights(meta) or {}
    for name in targets:  # (the input embedding's rows reach every module tied to it, as served; others' do not)
        group = [name, *shared.get(name, [])]
        untargeted = [o for o in group if o not in targets]
        if untargeted and not any(_tokens.ties_rows(meta, meta.get_submodule(g)) for g in group if g in targets):
            raise MergeError(f"{cfg_file}: trainable_token_indices gives module {name!r} rows of tokens, but its weight "
                             f"is tied to {untargeted[0]!r}, which the adapter gives none (it serves the weight's own "
                             f"rows there); written into the weight, the rows would reach {untargeted[0]!r} too "
                             f"(peft's merge_and_unload writes them anyway): lora_ext refuses it (untie the weights: "
                             f"save the model with tie_word_embeddings=false)")
    out, used, writers = {}, set(), {}
    for name, indices in targets.items():
        file_key = PREFIX + name + _tokens.DELTA_SUFFIX
        if file_key not in rows:
            if any(targets.get(o) == indices and PREFIX + o + _tokens.DELTA_SUFFIX in rows
                   and _tokens.ties_rows(meta, meta.get_submodule(o)) for o in shared.get(name, [])):
                continue  # a head tied to an embedding with the same tokens: peft saves the rows once
            raise MergeError(f"--adapter: holds no {file_key!r}, the rows of the tokens trainable_token_indices lists "
                             f"for module {name!r} ({cfg_file})")
        used.add(file_key)
        t = rows[file_key]
        if not t.is_floating_point() or _nonfinite(t):
            raise MergeError(f"--adapter: {file_key!r} must hold finite floating-point values")
        if name in factors:
            raise MergeError(f"--adapter: module {name!r} has LoRA factors and rows of tokens "
                             f"(trainable_token_indices); peft refuses that")
        if name in states:
            raise MergeError(f"--adapter: module {name!r} is saved whole (modules_to_save) and has rows of tokens "
                             f"(trainable_token_indices); peft refuses that")
        keys = [n + ".weight" for n in [name, *shared.get(name, [])] if n + ".weight" in where]
        if not keys:
            raise MergeError(f"--adapter: module {name!r} has rows of tokens, but --base {base!r} has no weight "
                             f"{name + '.weight'!r}")
        for key in keys:
            if key in twice:
                raise MergeError(f"--adapter: {file_key!r}: --base {base!r} stores {key!r} more than once "
                                 f"({', '.join(map(repr, twice[key]))}); the merge cannot tell which the model serves")
            shape = tuple(shapes[key])
            if len(shape) != 2 or max(indices) >= shape[0]:
                raise MergeError(f"{cfg_file}: trainable_token_indices for module {name!r} lists token "
                                 f"{max(indices)}, but its weight {key!r} in --base has shape {shape}")
            if tuple(t.shape) != (len(indices), shape[1]):
                raise MergeError(f"--adapter: {file_key!r} has shape {tuple(t.shape)}; module {name!r} needs "
                                 f"({len(indices)}, {shape[1]}) (one row of its weight per listed token)")
            st_dtype = next(e[1] for e in headers[where[key]][1] if e[0] == ck(key))
            if not _FROM_ST[st_dtype].is_floating_point:
                raise MergeError(f"{where[key]}: tensor {ck(key)!r} is {st_dtype}, which rows of tokens cannot be "
                                 f"written into")
            w = out.get(ck(key))
            if w is None:
                w = _get_tensor(where[key], headers[where[key]], ck(key)).clone()
                if out_dtype is not None:
                    w = w.to(out_dtype)
            elif writers[ck(key)][1] != indices or writers[ck(key)][2].shape != t.shape \
                    or not torch.equal(writers[ck(key)][2], t):
                raise MergeError(f"--adapter: modules {writers[ck(key)][0]!r} and {name!r} share one weight "
                                 f"({ck(key)!r} in --base), but the adapter gives them other rows of tokens; the "
                                 f"merged weight can hold only one set")
            writers[ck(key)] = (name, indices, t)
            w[torch.tensor(indices)] = t.to(w.dtype)
            out[ck(key)] = w
    extra = sorted(set(rows) - used)
    if extra:
        raise MergeError(f"--adapter: unexpected key {extra[0]!r}: rows of a module {cfg_file}'s "
                         f"trainable_token_indices does not list")
    return out


def _check_targets(adapter, cfg, factors, meta=None, entries=None, rowed=(), trained=None):
    """Refuses factors of modules the config's target_modules / exclude_modules (and layers_to_transform) do not
    select: peft ignores them (as load_peft_adapter refuses them), so merging them would not give the model peft
    serves. 'all-linear' is resolved against the model's classes (`meta`: its Linear / Conv1D modules but the output
    head; peft takes those names whole, in every layer); without them only exclude_modules is checked. With the
    model, also modules the config selects that the file holds no factors of (a truncated or partial export: those
    weights would be written unmerged), as load_peft_adapter refuses them; `rowed`: the keys of rows of tokens
    (trainable_token_indices), whose modules take no factors. A file of no factors at all (only modules saved whole
    or rows of tokens) is refused when the config targets modules. `trained`: a renamed module's name as the adapter
    had it (rename_adapter), which the config's names and patterns may be written against."""
    cfg_file = os.path.join(adapter, CONFIG_NAME)
    spec, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    if spec is None:
        raise MergeError(f"{cfg_file}: target_modules is missing (peft would pick per-architecture defaults); "
                         f"the merge needs the adapted modules named")
    layers = (cfg.get("layers_to_transform"), cfg.get("layers_pattern"))
    if isinstance(spec, str) and spec.lower() == _inject.ALL_LINEAR:
        if meta is not None:
            spec = _inject.resolve_targets(meta, spec, cfg.get("task_type"))
            spec = sorted(n for n in spec if not (entries and _saved.keeps_lora_off(entries, n)))
        else:
            spec = None  # the model's linear layers but its head: no model here to resolve it against
    names = {n: {n, (trained or {}).get(n, n)} for n in factors}  # (the model's name, the adapter's)
    ignored = sorted(n for n in factors
                     if (spec is not None and not any(_inject.target_matches(spec, m, *layers) for m in names[n]))
                     or (exclude and any(_inject.name_matches(exclude, m) for m in names[n])))
    if ignored:
        raise MergeError(f"{cfg_file}: the weights file holds factors of module(s) "
                         f"{_name_list(ignored, most=5)} that target_modules / exclude_modules do not "
                         f"select; peft ignores them, so the merge refuses the mismatch")
    none = (f"--adapter {adapter!r}: its weights file holds no LoRA factors, only modules saved whole or rows of "
            f"tokens, but the config's target_modules select")
    if meta is None:
        if not factors and cfg["target_modules"]:
            raise MergeError(f"{none} modules ({cfg_file}): a partial export would leave them unmerged")
        return
    try:
        chosen = _inject.select_targets(meta, cfg["target_modules"], exclude, option=cfg_file,
                                        task_type=cfg.get("task_type"), layers_to_transform=layers[0],
                                        layers_pattern=layers[1], modules_to_save=entries)
    except ValueError:  # (what it refuses, the merge judges by its own rules)
        return
    if not factors:
        targeted = [n for n, _ in chosen if not any(k.startswith(n + ".") for k in rowed)]
        if targeted:
            raise MergeError(f"{none} {_name_list(targeted, most=5)} ({cfg_file}): a partial export would leave them "
                             f"unmerged")
        return
    # only where the file holds the same module of another layer, or other modules of its layer (a partial or
    # truncated export): a module outside the layers the file covers may be one the class the adapter was trained on
    # does not have (LlamaModel's adapter of target_modules [..., "lm_head"] for a LlamaForCausalLM checkpoint, a
    # ViTModel's pooler), where peft's layer starts as zeros
    layered = {_by_layer(n) for n in factors}
    covered = {_layer_of(n) for n in factors} - {None}
    missing = sorted(n for n, _ in chosen if n not in factors
                     and (_by_layer(n) in layered or _layer_of(n) in covered)
                     and not any(k.startswith(n + ".") for k in rowed))
    if missing:
        raise MergeError(f"--adapter {adapter!r}: its weights file holds no factors for module(s) "
                         f"{_name_list(missing, most=5)}, which the config's target_modules / "
                         f"exclude_modules / layers_to_transform select ({cfg_file}): a partial export would leave "
                         f"them unmerged")


def _by_layer(name):
    """A module name with its layer indices left out: the same module of every layer."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "#", name)


def _layer_of(name):
    """The layer a module lies in (its name up to its first index: `model.layers.0`), or None."""
    m = re.match(r"(.*?\.\d+)(?=\.|$)", name)
    return m.group(1) if m else None


def _check_dora(adapter, cfg, factors, magnitudes):
    """A DoRA adapter (use_dora) holds a magnitude for each module with factors, and only then: peft would
    ignore magnitudes without use_dora, and give a module without one a magnitude made from the base weight."""
    cfg_file = os.path.join(adapter, CONFIG_NAME)
    if cfg.get("use_dora") is not True:
        if magnitudes:
            raise MergeError(f"{cfg_file}: use_dora is off, but the weights file holds DoRA magnitudes "
                             f"({PREFIX + min(magnitudes) + MAGNITUDE_SUFFIX!r}); peft would ignore them")
        return
    lacking = sorted(set(factors) - set(magnitudes))
    if lacking:
        raise MergeError(f"{cfg_file}: use_dora is on, but the weights file holds no DoRA magnitude for module "
                         f"{lacking[0]!r} ({PREFIX + lacking[0] + MAGNITUDE_SUFFIX!r})")


def _magnitude(name, m, shape, rows):
    """A DoRA magnitude checked against its module's weight (peft's shapes: one value per output feature, (d,) for
    a Linear or an embedding's dimensions, (1, d, 1, ...) for a convolution), flattened to (d,) as stored (the merge
    casts it to its working dtype and device); None without."""
    if m is None:
        return None
    want = (1, rows) + (1,) * (len(shape) - 2) if len(shape) > 2 else (rows,)
    key = PREFIX + name + MAGNITUDE_SUFFIX
    if tuple(m.shape) != want:
        raise MergeError(f"--adapter: {key!r} has shape {tuple(m.shape)}, but module {name!r} (weight "
                         f"{tuple(shape)}) needs {want}")
    if not m.is_floating_point() or _nonfinite(m):
        raise MergeError(f"--adapter: {key!r} must hold finite floating-point values")
    return m.reshape(-1)


def _dora_scale(w2, transposed, magnitude):
    """W' = m / ||W + dW|| (W + dW), in place on the merged 2-D weight `w2`: the norm of each output feature's
    weights (a row; a column of a transposed weight: fan_in_fan_out, or an embedding's dimension, as peft takes
    them)."""
    dim = 0 if transposed else 1
    factor = magnitude.to(device=w2.device, dtype=w2.dtype) / torch.linalg.vector_norm(w2, dim=dim)
    w2.mul_(factor.view(1, -1) if transposed else factor.view(-1, 1))


def _shared_weights(meta):
    """{module name: the other module names whose weight is the same Parameter} in the meta-built model (tied
    weights as transformers ties them: tie_word_embeddings, in the config or a sub-config's); None without a model."""
    if meta is None:
        return None
    holders = {}
    for n, m in meta.named_modules(remove_duplicate=False):
        w = m.__dict__.get("_parameters", {}).get("weight")
        if w is not None:
            holders.setdefault(id(w), []).append(n)
    return {n: sorted(set(names) - {n}) for names in holders.values() if len(set(names)) > 1 for n in names}


def _roles(meta):
    """{module name: "the input embeddings" / "the output head"} of the meta-built model (empty without one)."""
    try:
        pairs = [(meta.get_input_embeddings(), "the input embeddings"), (meta.get_output_embeddings(), "the output head")]
    except Exception:
        return {}
    return {n: role for n, m in meta.named_modules(remove_duplicate=False) for t, role in pairs if m is t}


def _check_tied(base, base_dir, factors, shapes, saved=False, meta=None):
    """Refuses an adapter of a weight the model ties to another module's (the input embeddings and the output head):
    one tensor serves both, so the merge would change the other too, which peft (and lora_ext) serve unchanged. The
    ties are the meta-built model's own (transformers ties by the config and its sub-configs); without one, those of
    config.json (tie_word_embeddings, true unless it says otherwise) between the weights of vocab_size rows (any
    embedding where config.json does not say vocab_size). saved: `factors` are modules saved whole
    (modules_to_save), which peft copies untied."""
    folder = base_dir or os.path.dirname(os.path.abspath(base))
    cfg_file = os.path.join(folder, "config.json")
    shared = _shared_weights(meta)
    if shared is None:
        try:
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return
        if not isinstance(config, dict) or config.get("tie_word_embeddings", True) is not True:
            return
        vocab = config.get("vocab_size")
    for name, (A, B, embedding) in sorted(factors.items()):
        shape = shapes.get(name + ".weight")
        if shared is not None:
            others = shared.get(name, [])
            both = bool(others) and all(n + ".weight" in shapes for n in [name, *others])
        else:
            tied = (embedding and type(vocab) is not int) or (type(vocab) is int and shape is not None
                                                              and len(shape) == 2 and shape[0] == vocab)
            others = ["the input embeddings" if not embedding else "the output head"] if tied else []
            both = tied and sum(1 for t in shapes.values() if t == shape) > 1
        if not others:
            continue
        what = (("the input embeddings" if embedding else "the output head") if shared is None
                else _roles(meta).get(name, "a weight"))
        fix = ("the checkpoint stores both tensors: set tie_word_embeddings to false in config.json (or the "
               "sub-config that ties them)" if both
               else "untie them first (save the model with tie_word_embeddings=false and the head's own weight)")
        if saved:
            raise MergeError(f"--adapter: {name!r} is saved whole (modules_to_save) with a weight that {cfg_file} ties "
                             f"to {', '.join(others)} (tie_word_embeddings): the merged model would load with both tied "
                             f"to it, unlike the adapter (peft's copy is not tied); {fix}")
        raise MergeError(f"--adapter: module {name!r} adapts {what}, which {cfg_file} ties to {', '.join(others)} "
                         f"(tie_word_embeddings): the merged model would load with {others[0]} tied to it, unlike the "
                         f"adapter; {fix}")


# (the end of a config's architectures name, the transformers Auto class that builds that head from its model_type)
_AUTO_HEADS = (("ForCausalLM", "AutoModelForCausalLM"), ("ForConditionalGeneration", "AutoModelForImageTextToText"),
               ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
               ("ForSequenceClassification", "AutoModelForSequenceClassification"),
               ("ForTokenClassification", "AutoModelForTokenClassification"), ("ForMaskedLM", "AutoModelForMaskedLM"))


def _meta_model(base, base_dir):
    """The checkpoint's model built on the meta device (no memory, nothing read but config.json) from the
    config.json beside it with transformers' own class; None where that cannot be done (no config.json, no
    `architectures`, remote code, an error)."""
    folder = base_dir or os.path.dirname(os.path.abspath(base))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    try:
        import transformers
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            arch = (getattr(config, "architectures", None) or [""])[0]
            cls = getattr(transformers, arch, None)
            with torch.device("meta"):
                if cls is not None:
                    return cls(config)
                # a class of remote code (EXAONE's checkpoints name ExaoneForCausalLM) that transformers now has
                # under the config's model_type: the Auto class for the head the name says, as from_pretrained of it
                for suffix, auto in _AUTO_HEADS:
                    if arch.endswith(suffix):
                        try:
                            return getattr(transformers, auto).from_config(config)
                        except Exception:
                            continue
                return None
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception:
        return None


_WIDE_FLOATS = ("F16", "BF16", "F32", "F64")  # (safetensors dtype names)


def _check_class_shapes(base, model, shapes, st_dtypes, converted):
    """The class config.json names against the checkpoint: the merge takes a square weight's layout (Linear, or a
    Conv1D stored transposed) from that class, so every Linear and Conv1D weight the checkpoint stores in floating
    point (16 bits or more) as the class names it must have the shape the class gives it (as transformers'
    from_pretrained requires too). A config.json naming another model's class (a GPT-2 checkpoint's saying
    GPTBigCode: Linear modules of the same names) merged square weights transposed, exit 0; the non-square ones show
    the contradiction. Not looked at, as their stored shapes are not the class's: a quantized checkpoint's weights
    (a quantization_config; packed integers: bitsandbytes, BitNet), and keys transformers converts as it loads them
    (`converted`: a vocabulary unpadded under the same name)."""
    if model is None or _quantization_config(getattr(getattr(model, "config", None), "to_dict", dict)()):
        return
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) or _inject.is_conv1d(module)):
            continue
        weight, key = module._parameters.get("weight"), name + ".weight"
        if (weight is None or key not in shapes or key in converted or st_dtypes.get(key) not in _WIDE_FLOATS
                or tuple(shapes[key]) == tuple(weight.shape)):
            continue
        kind = "a Conv1D (stored in x out)" if _inject.is_conv1d(module) else "a Linear (stored out x in)"
        raise MergeError(f"--base {base!r}: config.json's class {type(model).__name__} has {key!r} as {kind} of shape "
                         f"{tuple(weight.shape)}, but the checkpoint stores it as {tuple(shapes[key])}: config.json "
                         f"does not describe these weights (the merge takes square weights' layout from its class); "
                         f"give the checkpoint its own config.json")


def _module_kinds(model):
    """{module name: whether it is a transformers Conv1D (stored transposed)} for the Linear and Conv1D modules of
    the meta-built model; None without one."""
    if model is None:
        return None
    return {n: _inject.is_conv1d(m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or _inject.is_conv1d(m)}


_CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}  # transformers' Conv1D modules (GPT-2 and its kin)


def _layout(name, A, B, shape, embedding, fan_in_fan_out, kind=None):
    """(A2, B2, transposed) to merge peft factors into a weight of `shape` (N-D conv weights: as (out, -1)). A 2-D
    weight is stored transposed when the model's class says it is a Conv1D (`kind`), else when the adapter's
    fan_in_fan_out says so; factors that fit only the other way are refused (an adapter of another model size, or
    a fan_in_fan_out that peft saved from another layer), never merged transposed on a guess."""
    if (embedding or len(shape) == 2) and (A.dim() != 2 or B.dim() != 2):
        raise MergeError(f"--adapter: module {name!r} has factors {tuple(A.shape)} and {tuple(B.shape)} for its "
                         f"weight of shape {tuple(shape)}: a {'embedding' if embedding else 'linear'} layer's are "
                         f"matrices")
    if embedding:
        want, transposed = (A.shape[1], B.shape[0]), True
    elif len(shape) > 2:
        # peft's conv factors: lora_A a conv of the layer's kernel into r channels, lora_B a 1x1 conv out of them;
        # factors of the same size but another kernel or layout would merge scrambled
        kernel_B = (shape[0], A.shape[0]) + (1,) * (len(shape) - 2)
        if A.dim() != len(shape) or tuple(A.shape[1:]) != tuple(shape[1:]) or tuple(B.shape) != kernel_B:
            raise MergeError(f"--adapter: module {name!r} has factors {tuple(A.shape)} and {tuple(B.shape)}, which "
                             f"do not fit its conv weight of shape {tuple(shape)} (peft's are "
                             f"{(A.shape[0],) + tuple(shape[1:])} and {kernel_B} at rank {A.shape[0]})")
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        want, transposed = (B.shape[0], A.shape[1]), False
        shape = (shape[0], int(torch.Size(shape[1:]).numel()))
    else:
        out_in, in_out = (B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])
        conv_named = name.rpartition(".")[2] in _CONV1D_NAMES
        if kind is None and out_in == in_out and conv_named != bool(fan_in_fan_out):
            raise MergeError(f"--adapter: module {name!r} is square and {'' if conv_named else 'not '}named as "
                             f"transformers' Conv1D layers are (stored transposed), but the adapter's fan_in_fan_out "
                             f"is {str(bool(fan_in_fan_out)).lower()} (peft saves the flag of the last layer it made, "
                             f"which may be of the other kind) and the model's classes cannot be built to tell (a "
                             f"config.json with `architectures` beside the checkpoint): refused rather than merged on "
                             f"a guess")
        transposed = kind if kind is not None else fan_in_fan_out
        want = in_out if transposed else out_in
        if tuple(shape) != want and tuple(shape) == (out_in if transposed else in_out):
            told = (f"the model's class has it as a {'Conv1D (stored transposed)' if kind else 'Linear'}"
                    if kind is not None else f"the adapter's fan_in_fan_out is {str(fan_in_fan_out).lower()} and "
                    f"the model's classes cannot be built to tell (a config.json with `architectures` beside "
                    f"the checkpoint)")
            raise MergeError(f"--adapter: module {name!r} has factors {tuple(A.shape)} and {tuple(B.shape)}, which "
                             f"fit its weight of shape {tuple(shape)} only {'un' if transposed else ''}transposed, "
                             f"but {told}: an adapter made for another model?")
    if tuple(shape) != want:
        raise MergeError(f"--adapter: module {name!r} has factors {tuple(A.shape)} and {tuple(B.shape)}, which do "
                         f"not fit its weight of shape {tuple(shape)}")
    return A, B, transposed


def _copy_side_files(base_dir, tmp, files, dtype=None, log=None):
    """Copies the base directory's other files; with --dtype, config.json's dtype fields (`dtype`, `torch_dtype`,
    in sub-configs too) say the new dtype, so that from_pretrained loads the output in it."""
    skip = {os.path.abspath(f) for f, _ in files} | {os.path.abspath(os.path.join(base_dir, INDEX_NAME))}
    for src in _side_files(base_dir):
        if os.path.abspath(src) in skip:
            continue
        rel = os.path.relpath(src, base_dir)
        dst = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel == "config.json" and dtype is not None and _config_with_dtype(src, dst, dtype):
            print(f"lora-ext merge: config.json's dtype set to {dtype} (--dtype)", file=log or sys.stderr)
            continue
        shutil.copy2(src, dst)


def _config_with_dtype(src, dst, dtype):
    """Writes config.json with its dtype fields set to `dtype`; False (nothing written) when it is not a JSON
    object or names no dtype."""
    try:
        with open(src, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    changed = []

    def visit(node):
        if isinstance(node, dict):
            for key in ("dtype", "torch_dtype"):
                if isinstance(node.get(key), str) and node[key] != dtype:
                    node[key] = dtype
                    changed.append(key)
                elif node.get(key) == dtype:
                    changed.append(key)
            for value in node.values():
                visit(value)

    visit(config)
    if not isinstance(config, dict) or not changed:
        return False
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copystat(src, dst)
    return True


def _nonfinite(t):
    if not t.is_floating_point():
        return 0
    if t.element_size() == 1:  # float8: isfinite is not implemented for every format
        t = t.float()
    return int(t.numel() - torch.isfinite(t).sum())


# the last name component quantized weights are stored under (peft/transformers' weight, GPTQ/AWQ qweight,
# compressed-tensors' weight_packed, HQQ's W_q, torchao's weight_qdata, optimum-quanto's weight._data), in integers
# of at most 32 bits (not bool; an int64 or bool tensor named so is no packed weight) or 8-bit floats; any such tensor
# named *weight* with a floating `*scale*` tensor in the same module counts too (an int32 position index beside a
# logit_scale does not)
_PACKED_NAMES = ("weight", "qweight", "weight_packed", "W_q", "weight_qdata", "_data")


def _quantization_config(cfg) -> bool:
    """Whether a config (or a sub-config: a multimodal model's text_config) has a quantization_config (or an older
    compressed-tensors checkpoint's compression_config): set to anything but null, false or an empty object."""
    if isinstance(cfg, dict):
        return (bool(cfg.get("quantization_config")) or bool(cfg.get("compression_config"))
                or any(_quantization_config(v) for v in cfg.values()))
    return False


def _packed(dtype: torch.dtype) -> bool:
    """Whether a tensor of this dtype can hold quantized values: integers of at most 32 bits, 8-bit floats."""
    if dtype.is_floating_point:
        return dtype.itemsize == 1
    return dtype != torch.bool and not dtype.is_complex and dtype.itemsize <= 4


def _check_quantized_dtype(base, base_dir, headers, dtype):
    """--dtype converts every floating tensor wider than a byte: in a quantized checkpoint (config.json's
    quantization_config, its own or a sub-config's, or weights stored in integers or 8-bit floats: GPTQ's qweight,
    bitsandbytes' packed weight, int8/fp8/fp4 weights) that is its scales too (rounded; a small float32 scale
    flushed to zero in float16 zeroes its block), under weights left as they are: refused before anything is
    written. config.json is read beside a --base file too."""
    config = os.path.join(base_dir or os.path.dirname(os.path.abspath(base)), "config.json")
    quantized = None
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                if _quantization_config(json.load(f)):
                    quantized = "its config.json has a quantization_config"
        except (OSError, ValueError, RecursionError):
            pass  # (read again where the files are copied, which names the failure)
    if quantized is None:
        # (key, its module (the key itself when it has no dot), its last component, dtype)
        tensors = [(key, key.rsplit(".", 1)[0], key.rsplit(".", 1)[-1], _FROM_ST[st_dtype])
                   for _, entries, _ in headers.values() for key, st_dtype, *_ in entries]
        modules_scaled = {module for _, module, leaf, dt in tensors if dt.is_floating_point and dt.itemsize > 1
                          and "scale" in leaf.lower()}
        packed = sorted((key, dt) for key, module, leaf, dt in tensors if _packed(dt) and (
            leaf in _PACKED_NAMES or leaf.endswith("qweight")
            or ("weight" in leaf.lower() and module in modules_scaled)))
        if packed:
            quantized = f"weights stored in {packed[0][1]}: {packed[0][0]!r}"
    if quantized is not None:
        raise MergeError(f"--dtype {dtype}: --base {base!r} is quantized ({quantized}): --dtype would convert its "
                         f"scales and other tensors kept in their own dtype while the quantized weights stay as they "
                         f"are; merge without --dtype")


def _write_shard(src, dst, header, plan, device, out_dtype, bar, nonfinite, allow_inf, delay=0.0, replace=None):
    """Streams one safetensors file to `dst`, merging the planned weights and writing the tensors of `replace`
    (modules saved whole) instead of the base's; returns its data size. Values that become non-finite in the output
    (finite in the input) raise MergeError unless allow_inf (then counted in `nonfinite`)."""
    replace = replace or {}
    meta, entries, data_start = header

    def stored(st_dtype):
        dt = _FROM_ST[st_dtype]
        return out_dtype if out_dtype is not None and dt.is_floating_point and dt.itemsize > 1 else dt

    out_header, offset = {}, 0
    for key, st_dtype, shape, _, _ in entries:
        dt = stored(st_dtype)
        size = math.prod(shape) * dt.itemsize
        out_header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if meta is not None:
        out_header["__metadata__"] = meta
    raw = json.dumps(out_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    try:
        fin = open(src, "rb")
    except OSError as e:
        raise _os_error(f"reading {src}", e) from None
    with fin, open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for entry in entries:
            key, st_dtype = entry[0], entry[1]
            t = _read_tensor(fin, src, entry, data_start)
            dt = stored(st_dtype)
            if key in replace:
                t = replace[key]
            changes = key in plan or key in replace or t.dtype != dt  # a copy as it is makes no new inf/NaN
            bad_in = _nonfinite(t) if changes else 0
            if key in plan:
                A, B, scaling, transposed, magnitude = plan[key]
                # merge in the wider of the input and output precisions (DoRA: at least float32, for the norms and
                # the scale), then round to the output's
                work = torch.promote_types(t.dtype, dt)
                if magnitude is not None:
                    work = torch.promote_types(work, torch.float32)
                t = t.to(device=device, dtype=work)
                ops.merge_(t.view(t.shape[0], -1), A, B, scaling, transposed=transposed)
                if magnitude is not None:
                    _dora_scale(t.view(t.shape[0], -1), transposed, magnitude)
            t = t.to(dt)
            made = _nonfinite(t) - bad_in if changes else 0
            if made > 0:
                if not allow_inf:
                    why = ("the DoRA merge (magnitude / norm) overflowed" if key in plan and plan[key][4] is not None
                           else "the merge overflowed" if key in plan else "the adapter's tensor (modules_to_save, or rows of "
                           "tokens) overflowed" if key in replace else "the conversion overflowed")
                    raise MergeError(f"{src}: tensor {key!r}: {made} values became inf/NaN in {dt} ({why} its range); "
                                     f"nothing was written (--allow-inf writes them anyway)")
                nonfinite[key] = made
            try:
                f.write(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            except OSError as e:
                raise _os_error(f"writing {dst}", e) from None
            bar.set_postfix_str(key if len(key) < 48 else "..." + key[-45:], refresh=False)
            bar.update()
            if delay:
                time.sleep(delay)
    return offset


# ------------------------------------------------------------------------------------------------- the CLI

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that the same cleanup runs."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def run(args, err=None):
    """`lora-ext merge` from parsed arguments: the exit code; every failure is one line on stderr."""
    err = err or sys.stderr
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    before = _stat(args.out)
    try:
        n = merge_checkpoint(args.base, args.adapter, args.out, device=args.device, dtype=args.dtype,
                             progress=not args.quiet, force=getattr(args, "force", False),
                             allow_inf=getattr(args, "allow_inf", False), log=err,
                             revision=getattr(args, "revision", None))
    except KeyboardInterrupt as e:  # (Terminated too)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        # (the new one in place, another file at --out than before the run: a signal landing as the rename ended
        # or while the old output was removed)
        if _stat(args.out) not in (None, before):
            print(f"lora-ext merge: {what} after {args.out} was written in full; what is left of the output it "
                  f"replaced is removed by the next run", file=err)
        else:
            print(f"lora-ext merge: {what}; nothing was written to {args.out}", file=err)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except (ValueError, KeyError) as e:  # MergeError and the adapter readers' refusals
        print(f"lora-ext merge: error: {_one_line(e)}", file=err)
        return 2
    except OSError as e:
        text = _one_line(e if e.errno is None else _os_error("", e)).lstrip(": ")
        print(f"lora-ext merge: error: {text}", file=err)
        return 2 if e.errno is None else 1
    except MemoryError:
        print("lora-ext merge: error: out of memory", file=err)
        return 1
    except Exception as e:  # a bug: still one line, with its type
        print(f"lora-ext merge: error: unexpected {type(e).__name__}: {_one_line(e)}", file=err)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"merged {n} weights into {args.out}")
    return 0


def _stat(path):
    """What tells the file or directory at `path` from another put there (device and inode: the merge puts its
    output in place by a rename or a link of a new file, and a rollback puts the old one back), or None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError, TypeError):
        return None
    return st.st_dev, st.st_ino


def _one_line(e):
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    return " ".join(str(text).splitlines())
