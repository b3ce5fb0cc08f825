"""`lora-ext merge`: a peft LoRA adapter merged into a safetensors checkpoint, streamed tensor by tensor.

The output is written in safetensors format directly: its header is known before any data (names, dtypes,
shapes come from the input's headers), so each tensor is read, merged in place (ops.merge_, on the GPU when
asked) and written before the next is read. Peak memory is about one tensor plus the adapter. Sharded
inputs give sharded outputs with the same file names and index; other files of a model directory
(config.json, tokenizer files) are copied. The output appears under its final name only when complete.
"""
import json
import os
import shutil
import struct
import sys

import torch
from tqdm import tqdm

from .. import ops
from .files import atomic_path
from .peft_io import check_base_weight, module_factors, module_rank_scaling, read_config, read_tensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _input_files(base):
    """(shard paths, index dict or None, directory or None) of a model directory or a .safetensors file."""
    if os.path.isfile(base):
        return [base], None, None
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--base: {base!r} is neither a directory nor a file")
    index_path = os.path.join(base, INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        return [os.path.join(base, s) for s in shards], index, base
    single = os.path.join(base, SINGLE_NAME)
    if os.path.isfile(single):
        return [single], None, base
    raise FileNotFoundError(f"--base: {base!r} holds neither {INDEX_NAME} nor {SINGLE_NAME}")


def _headers(files):
    """{file: (metadata, [(key, st dtype, shape)] in storage order)}."""
    out = {}
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        out[path] = (meta, [(k, v["dtype"], tuple(v["shape"])) for k, v in entries])
    return out


def _layout(name, A, B, shape, embedding, fan_in_fan_out):
    """(A2, B2, transposed) to merge peft factors into a weight of `shape` (N-D conv weights: as (out, -1))."""
    if embedding:
        want, transposed = (A.shape[1], B.shape[0]), True
    elif len(shape) > 2:
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        want, transposed = (B.shape[0], A.shape[1]), False
        shape = (shape[0], int(torch.Size(shape[1:]).numel()))
    else:
        out_in, in_out = (B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])
        transposed = shape == in_out and (shape != out_in or fan_in_fan_out)
        want = in_out if transposed else out_in
    if tuple(shape) != want:
        raise ValueError(f"--adapter: module {name!r} has factors {tuple(A.shape)} and {tuple(B.shape)}, which do "
                         f"not fit its weight of shape {tuple(shape)}")
    return A, B, transposed


def merge_checkpoint(base, adapter, out, device="cpu", dtype=None, progress=True):
    """Writes base + adapter (merged) to `out`; returns the number of merged weights."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES.get(dtype)
    cfg = read_config(adapter)
    factors, base_weights = module_factors(read_tensors(adapter), where=f"--adapter {adapter!r}")
    files, index, base_dir = _input_files(base)
    if base_dir is not None and os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"--out: {out!r} exists and is not an empty directory")
    if base_dir is None and os.path.isdir(out):
        raise ValueError(f"--out: {out!r} is a directory; --base is a file, so give a file path")
    headers = _headers(files)
    where = {key: path for path, (_, entries) in headers.items() for key, _, _ in entries}
    shapes = {key: shape for _, (_, entries) in headers.items() for key, _, shape in entries}
    plan = {}
    for name, (A, B, embedding) in factors.items():
        key = name + ".weight"
        if key not in where:
            raise ValueError(f"--adapter: module {name!r} has no weight {key!r} in --base {base!r}")
        r, scaling = module_rank_scaling(cfg, name)
        if A.shape[0] != r:
            raise ValueError(f"--adapter: module {name!r} has rank {A.shape[0]} but the config says r={r}")
        if name in base_weights:
            from safetensors import safe_open
            with safe_open(where[key], framework="pt") as h:
                check_base_weight("--adapter", name, base_weights[name], h.get_tensor(key))
        A2, B2, transposed = _layout(name, A, B, shapes[key], embedding, bool(cfg.get("fan_in_fan_out")))
        ops.check_finite(f"--adapter module {name!r}", A2, B2, scaling)
        plan[key] = (A2.to(device), B2.to(device), scaling, transposed)

    total = sum(len(entries) for _, entries in headers.values())
    # on stderr, nothing at all when progress is off; "merge [####....] n/total elapsed, tensor name"
    bar = tqdm(total=total, desc="merge", file=sys.stderr, disable=not progress, ascii=".#",
               bar_format="{desc} [{bar:28}] {n_fmt}/{total_fmt} {elapsed}{postfix}")
    with bar, atomic_path(out, directory=base_dir is not None) as tmp:
        sizes = {}
        for path, (meta, entries) in headers.items():
            target = os.path.join(tmp, os.path.basename(path)) if base_dir is not None else tmp
            sizes[path] = _write_shard(path, target, meta, entries, plan, device, out_dtype, bar)
        if base_dir is not None:
            _copy_side_files(base_dir, tmp, files)
            if index is not None:
                new_index = dict(index, metadata=dict(index.get("metadata") or {}, total_size=sum(sizes.values())))
                with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                    json.dump(new_index, f, indent=2)
    return len(plan)


def _copy_side_files(base_dir, tmp, files):
    skip = {os.path.abspath(f) for f in files} | {os.path.abspath(os.path.join(base_dir, INDEX_NAME))}
    for entry in os.listdir(base_dir):
        src = os.path.join(base_dir, entry)
        if os.path.isfile(src) and os.path.abspath(src) not in skip:
            shutil.copy2(src, os.path.join(tmp, entry))


def _write_shard(src, dst, meta, entries, plan, device, out_dtype, bar):
    """Streams one safetensors file to `dst`, merging the planned weights; returns its data size."""
    from safetensors import safe_open

    def stored(st_dtype):
        dt = _FROM_ST[st_dtype]
        return out_dtype if out_dtype is not None and dt.is_floating_point and dt.itemsize > 1 else dt

    header, offset = {}, 0
    for key, st_dtype, shape in entries:
        dt = stored(st_dtype)
        size = int(torch.Size(shape).numel()) * dt.itemsize
        header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with safe_open(src, framework="pt", device="cpu") as h, open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, st_dtype, shape in entries:
            t = h.get_tensor(key)
            dt = stored(st_dtype)
            if key in plan:
                A, B, scaling, transposed = plan[key]
                # merge in the wider of the input and output precisions, then round to the output's
                work = torch.promote_types(t.dtype, dt)
                t = t.to(device=device, dtype=work)
                ops.merge_(t.view(t.shape[0], -1), A, B, scaling, transposed=transposed)
            f.write(memoryview(t.to(dt).cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            bar.set_postfix_str(key if len(key) < 48 else "..." + key[-45:], refresh=False)
            bar.update()
    return offset
