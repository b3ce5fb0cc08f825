"""`lora-ext merge` against hostile inputs and environments: outputs that are (or lie in) the base, existing
outputs, subdirectory shards, overflow to inf, damaged safetensors files, failing disks, SIGTERM and kill -9.
Every failure must be one line on stderr naming the file and the cause, with a nonzero exit code."""
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lora_ext.cli import main
from lora_ext.serving import files as files_mod
from lora_ext.serving import merge_cli
from tiny_models import gpt2, randomize_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QKV = "transformer.h.0.attn.c_attn.weight"
FC = "transformer.h.0.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A sharded tiny GPT-2 checkpoint, the same in one file, and a peft adapter on c_attn (built once)."""
    root = tmp_path_factory.mktemp("built")
    model = gpt2()
    model.save_pretrained(str(root / "sharded"), max_shard_size="60KB")
    model.save_pretrained(str(root / "single"), max_shard_size="50MB")
    peft_model = randomize_lora(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])))
    peft_model.save_pretrained(str(root / "adapter"))
    return root


@pytest.fixture
def ws(built, tmp_path):
    """Fresh copies in tmp_path: base (sharded dir), single (dir with model.safetensors), adapter."""
    for name, dst in (("sharded", "base"), ("single", "single"), ("adapter", "adapter")):
        shutil.copytree(built / name, tmp_path / dst)
    return tmp_path


def _run(capsys, *argv):
    """(rc, stderr) of `lora-ext merge ARGV --quiet`; asserts a failure is exactly one line, no traceback."""
    rc = main(["merge", *map(str, argv), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lora-ext merge: "), err
    return rc, err


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _temporaries(parent, name):
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.tmp-")]


# ------------------------------------------------------------------------------------------ output location

def test_out_equal_to_a_file_base_is_refused_even_with_force(ws, capsys):
    src = ws / "single" / "model.safetensors"
    before = _bytes(src)
    for extra in ([], ["--force"]):
        rc, err = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", src, *extra)
        assert rc == 2 and "is --base" in err and str(src) in err
        assert _bytes(src) == before  # never overwritten, so a second run cannot double the delta
    os.link(src, ws / "hardlink.safetensors")  # the same file under another name
    rc, err = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", ws / "hardlink.safetensors", "--force")
    assert rc == 2 and "is --base" in err and _bytes(src) == before


def test_out_inside_or_holding_the_base_directory_is_refused_even_with_force(ws, capsys):
    base = ws / "base"
    snapshot = {f: _bytes(base / f) for f in os.listdir(base)}
    for out, why in ((base, "is --base"), (base / "merged", "inside the --base directory"),
                     (ws, "holds --base"), (ws / "adapter", "--adapter")):
        for extra in ([], ["--force"]):
            rc, err = _run(capsys, "--base", base, "--adapter", ws / "adapter", "--out", out, *extra)
            assert rc == 2 and why in err, err
    assert {f: _bytes(base / f) for f in os.listdir(base)} == snapshot
    assert os.path.isdir(ws / "adapter") and not os.path.exists(base / "merged")


def test_an_existing_output_is_refused_unless_force(ws, capsys):
    out_file = ws / "merged.safetensors"
    out_file.write_bytes(b"somebody's notes")
    src = ws / "single" / "model.safetensors"
    rc, err = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out_file)
    assert rc == 2 and "exists" in err and "--force" in err and _bytes(out_file) == b"somebody's notes"
    rc, _ = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out_file, "--force")
    assert rc == 0 and set(load_file(str(out_file))) == set(load_file(str(src)))
    first = _bytes(out_file)
    assert _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out_file, "--force")[0] == 0
    assert _bytes(out_file) == first  # a rerun gives the same output: the delta is added once

    out_dir = ws / "merged"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", out_dir)
    assert rc == 2 and "not an empty directory" in err and os.listdir(out_dir) == ["old.txt"]
    assert _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", out_dir, "--force")[0] == 0
    assert "old.txt" not in os.listdir(out_dir) and merge_cli.INDEX_NAME in os.listdir(out_dir)
    assert not _temporaries(ws, "merged")
    # a file over an existing directory, and a directory over an existing file
    rc, err = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out_dir)
    assert rc == 2 and "is a directory" in err
    assert _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out_dir, "--force")[0] == 0
    assert os.path.isfile(out_dir)
    assert _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", out_file, "--force")[0] == 0
    assert os.path.isdir(out_file)


def test_the_output_check_comes_before_reading_the_base(ws, capsys, monkeypatch):
    monkeypatch.setattr(merge_cli, "read_header", lambda path: pytest.fail("read a header before refusing"))
    monkeypatch.setattr(merge_cli, "read_tensors", lambda path: pytest.fail("read the adapter before refusing"))
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "base" / "x")
    assert rc == 2 and "inside the --base directory" in err


# ------------------------------------------------------------------------------------- subdirectory shards

def test_shards_in_subdirectories_are_mirrored(ws, capsys):
    base = ws / "base"
    index_path = base / merge_cli.INDEX_NAME
    index = json.loads(index_path.read_text())
    (base / "sub").mkdir()
    for shard in set(index["weight_map"].values()):
        os.replace(base / shard, base / "sub" / shard)
    index["weight_map"] = {k: "sub/" + v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    out = ws / "merged"
    assert _run(capsys, "--base", base, "--adapter", ws / "adapter", "--out", out)[0] == 0
    new_index = json.loads((out / merge_cli.INDEX_NAME).read_text())
    assert new_index["weight_map"] == index["weight_map"]
    for key, rel in new_index["weight_map"].items():
        assert os.path.isfile(out / rel) and key in load_file(str(out / rel))
    # the same tensors as a merge of the one-file checkpoint
    assert _run(capsys, "--base", ws / "single", "--adapter", ws / "adapter", "--out", ws / "ref")[0] == 0
    ref = load_file(str(ws / "ref" / "model.safetensors"))
    got = {k: v for rel in set(new_index["weight_map"].values()) for k, v in load_file(str(out / rel)).items()}
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_an_index_naming_a_file_outside_the_base_or_a_missing_one_is_refused(ws, capsys):
    index_path = ws / "base" / merge_cli.INDEX_NAME
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    for bad, why in (("../outside.safetensors", "outside the model directory"), ("gone.safetensors", "not a file")):
        index_path.write_text(json.dumps(dict(index, weight_map=dict(index["weight_map"], **{key: bad}))))
        rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
        assert rc == 2 and why in err and str(index_path) in err and not os.path.exists(ws / "merged")
    index_path.write_text("{not json")
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
    assert rc == 2 and "not valid JSON" in err and str(index_path) in err


# ------------------------------------------------------------------------------------------------- overflow

def test_float16_overflow_is_refused_or_counted_with_allow_inf(ws, capsys):
    src = ws / "single" / "model.safetensors"
    t = load_file(str(src))
    t[FC][0, :3] = 1e6  # finite in float32, inf in float16
    save_file(t, str(src), metadata={"format": "pt"})
    out = ws / "merged.safetensors"
    rc, err = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out, "--dtype", "float16")
    assert rc == 2 and FC in err and "3 values became inf/NaN" in err and "--allow-inf" in err
    assert not os.path.exists(out) and not _temporaries(ws, "merged.safetensors")
    rc, err = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out, "--dtype", "float16",
                   "--allow-inf")
    assert rc == 0 and "wrote 3 inf/NaN values" in err and FC in err
    assert int(torch.isinf(load_file(str(out))[FC]).sum()) == 3


def test_an_adapter_whose_update_overflows_is_refused(ws, capsys):
    weights = ws / "adapter" / "adapter_model.safetensors"
    t = load_file(str(weights))
    for k in t:
        if "h.1." in k:
            t[k] = torch.full_like(t[k], 1e20)  # each factor finite; B @ A is 4e40, inf in float32
    save_file(t, str(weights), metadata={"format": "pt"})
    out = ws / "merged"
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", out)
    assert rc == 2 and "transformer.h.1.attn.c_attn.weight" in err and "became inf/NaN" in err
    assert "the merge overflowed" in err and not os.path.exists(out) and not _temporaries(ws, "merged")
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", out, "--allow-inf")
    assert rc == 0 and "wrote 12288 inf/NaN values" in err  # the whole 64 x 192 weight


# -------------------------------------------------------------------------------------- damaged safetensors

def _damage(path, how):
    data = _bytes(path)
    (n,) = struct.unpack("<Q", data[:8])
    if how == "not safetensors":
        data = b"PK\x03\x04" + os.urandom(64)  # e.g. a zip (a pytorch_model.bin)
    elif how == "huge header length":
        data = struct.pack("<Q", 2 ** 40) + data[8:]
    elif how == "truncated":
        data = data[:-100]
    elif how == "bad json":
        data = data[:8] + b"{" * n
    elif how == "unknown dtype":
        header = data[8:8 + n].replace(b'"F32"', b'"Q32"', 1)
        data = data[:8] + header + data[8 + n:]
    elif how == "tiny":
        data = b"\x01\x02"
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how,why", [("not safetensors", "exceeds the file's"), ("huge header length", "2^40"),
                                     ("truncated", "truncated"), ("bad json", "not valid JSON"),
                                     ("unknown dtype", "unknown dtype 'Q32'"), ("tiny", "too short")])
def test_a_damaged_base_is_one_line_naming_the_file(ws, capsys, how, why):
    why = why.replace("2^40", str(2 ** 40))
    src = ws / "single" / "model.safetensors"
    _damage(src, how)
    out = ws / "merged.safetensors"
    rc, err = _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out)
    assert rc == 2 and str(src) in err and why in err, err
    assert not os.path.exists(out) and not _temporaries(ws, "merged.safetensors")
    # one damaged shard of a sharded checkpoint
    shard = sorted(f for f in os.listdir(ws / "base") if f.endswith(".safetensors"))[-1]
    _damage(ws / "base" / shard, how)
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
    assert rc == 2 and shard in err and why in err, err
    assert not os.path.exists(ws / "merged") and not _temporaries(ws, "merged")


def test_a_damaged_adapter_file_is_one_line(ws, capsys):
    weights = ws / "adapter" / "adapter_model.safetensors"
    _damage(weights, "truncated")
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
    assert rc == 2 and "--adapter" in err and str(ws / "adapter") in err


# ---------------------------------------------------------------------------------------------- bad disks

class _FullDisk:
    """A file object that fails with ENOSPC once `room` bytes were written."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_is_one_line_and_leaves_nothing(ws, capsys, monkeypatch):
    def opener(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _FullDisk(f, 50_000) if "w" in mode else f

    monkeypatch.setattr(merge_cli, "open", opener, raising=False)
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
    assert rc == 2 and "No space left on device" in err and "disk is full" in err and "merged" in err
    assert not os.path.exists(ws / "merged") and not _temporaries(ws, "merged")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_location_is_one_line(ws, capsys, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(ws))

    monkeypatch.setattr(files_mod.tempfile, "mkdtemp", refuse)
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
    assert rc == 2 and os.strerror(code) in err and str(ws) in err
    monkeypatch.undo()

    def no_rename(src, dst):
        raise OSError(code, os.strerror(code), src, dst)

    monkeypatch.setattr(files_mod.os, "replace", no_rename)  # fails at the very end, when renaming (or linking:
    monkeypatch.setattr(files_mod.os, "link", no_rename)     # without --force the file is put in place by a link)
    rc, err = _run(capsys, "--base", ws / "single" / "model.safetensors", "--adapter", ws / "adapter",
                   "--out", ws / "m.safetensors")
    monkeypatch.undo()
    assert rc == 2 and os.strerror(code) in err
    assert not os.path.exists(ws / "m.safetensors") and not _temporaries(ws, "m.safetensors")


def test_a_read_only_directory(ws, capsys):
    ro = ws / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing; the monkeypatched tests cover it")
        rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ro / "merged")
        assert rc == 2 and "Permission denied" in err and str(ro) in err
    finally:
        os.chmod(ro, 0o755)


# ------------------------------------------------------------------------------------ kill and leftovers

def _start(ws, out, delay="0.2"):
    env = dict(os.environ, **{merge_cli.DELAY_ENV: delay})
    cmd = [sys.executable, "-m", "lora_ext.cli", "merge", "--base", str(ws / "base"), "--adapter",
           str(ws / "adapter"), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _temporaries(ws, out.name):  # the run is writing
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.05)
    time.sleep(0.3)  # a tensor or two in
    return proc


def test_sigterm_removes_the_temporary(ws):
    out = ws / "merged"
    proc = _start(ws, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "terminated" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out) and not _temporaries(ws, "merged")


def test_a_killed_runs_temporary_is_removed_by_the_next_run(ws, capsys):
    out = ws / "merged"
    proc = _start(ws, out)
    proc.kill()
    proc.communicate(timeout=60)
    leftovers = _temporaries(ws, "merged")
    assert len(leftovers) == 1 and not os.path.exists(out)
    live = ws / f".merged.tmp-{os.getpid()}-busy"  # a run still in progress (this process): left alone
    live.mkdir()
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", out)
    assert rc == 0 and str(ws / leftovers[0]) in err and "leftover temporary" in err
    assert _temporaries(ws, "merged") == [live.name] and os.path.isdir(out)


# ------------------------------------------------------------------------------------- the header reader

def _framed(data):
    return struct.pack("<Q", len(data)) + data


_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 70) | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=20)
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL", "X"]) | _json,
                                "shape": st.lists(st.integers(-1, 5), max_size=3) | _json,
                                "data_offsets": st.lists(st.integers(-1, 200), min_size=2, max_size=2) | _json})
_headers = st.dictionaries(st.text(max_size=6), _entry | _json, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=64),
    st.tuples(st.integers(0, 2 ** 64 - 1), st.binary(max_size=64)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    st.tuples(_headers, st.binary(max_size=200)).map(lambda t: _framed(json.dumps(t[0]).encode()) + t[1]),
    st.tuples(_json, st.binary(max_size=16)).map(lambda t: _framed(json.dumps(t[0]).encode()) + t[1]),
))
def test_the_header_reader_parses_or_raises_merge_error(data):
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        f.write(data)
    try:
        try:
            meta, entries, start = merge_cli.read_header(f.name)
        except merge_cli.MergeError as e:
            assert f.name in str(e) and "\n" not in str(e)
            return
        assert start + sum(e[4] - e[3] for e in entries) == len(data)
    finally:
        os.remove(f.name)


def test_the_header_reader_agrees_with_safetensors(ws):
    src = ws / "single" / "model.safetensors"
    meta, entries, _ = merge_cli.read_header(str(src))
    t = load_file(str(src))
    assert meta == {"format": "pt"} and {e[0] for e in entries} == set(t)
    assert all(tuple(t[k].shape) == shape for k, _, shape, _, _ in entries)


# float checkpoints --dtype converts: no quantization_config (null, false, empty), integer or bool tensors that are
# no packed weights
_NOT_QUANTIZED = ("null_config", "false_config", "empty_config", "int64_weight", "bool_weight", "int32_index")


@pytest.mark.parametrize("how", ["config", "text_config", "compression_config", "fp8", "int8", "gptq", "nf4",
                                 "packed", "hqq", "torchao", "quanto", "config_file_base", *_NOT_QUANTIZED])
def test_dtype_over_a_quantized_checkpoint_is_refused_before_writing(ws, capsys, how):
    """--dtype converted a quantized checkpoint's float32 scales with the rest (a 2e-8 scale flushed to 0 in float16:
    its block dequantizes to zeros), exit 0, the quantized weights and quantization_config kept; torchao's and
    optimum-quanto's names, and config.json beside a --base file, were missed. A null, false or empty
    quantization_config is not one, nor an int64 or bool tensor whose name ends in weight."""
    src = ws / "single" / "model.safetensors"
    t = load_file(str(src))
    quant = {"quant_method": "fp8", "weight_block_size": [64, 64]}
    packed = {"fp8": ("extra.weight", torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fn)),
              "int8": ("extra.weight", torch.tensor([[1, -2]], dtype=torch.int8)),
              "gptq": ("extra.qweight", torch.tensor([[7]], dtype=torch.int32)),
              "nf4": ("extra.weight", torch.tensor([[7]], dtype=torch.uint8)),
              "packed": ("extra.weight_packed", torch.tensor([[7]], dtype=torch.int32)),
              "hqq": ("extra.W_q", torch.tensor([[7]], dtype=torch.uint8)),
              "torchao": ("extra.weight_qdata", torch.tensor([[1, -2]], dtype=torch.int8)),
              "quanto": ("extra.weight._data", torch.tensor([[1, -2]], dtype=torch.int8)),
              "int64_weight": ("extra.class_weight", torch.tensor([1, 2])),
              "bool_weight": ("extra.mask_weight", torch.tensor([[True, False]])),
              "int32_index": ("extra.relative_position_index", torch.tensor([[0, 1]], dtype=torch.int32))}
    scale = {"torchao": "extra.weight_scale", "quanto": "extra.weight._scale",
             "int32_index": "extra.logit_scale"}.get(how, "extra.scales")
    if how in packed:
        key, value = packed[how]
        t[key] = value
        t[scale] = torch.tensor([[2e-8]])
    else:
        with open(ws / "single" / "config.json") as f:
            cfg = json.load(f)
        if how == "text_config":
            cfg["text_config"] = {"quantization_config": quant}
        elif how == "compression_config":
            cfg["compression_config"] = {"format": "pack-quantized"}
        else:
            unset = {"null_config": None, "false_config": False, "empty_config": {}}
            cfg["quantization_config"] = unset.get(how, quant)
        with open(ws / "single" / "config.json", "w") as f:
            json.dump(cfg, f)
    save_file(t, str(src), metadata={"format": "pt"})
    base = src if how == "config_file_base" else ws / "single"
    out = ws / ("merged.safetensors" if how == "config_file_base" else "merged")
    rc, err = _run(capsys, "--base", base, "--adapter", ws / "adapter", "--out", out, "--dtype", "float16")
    if how in _NOT_QUANTIZED:
        assert rc == 0, err
        converted = load_file(str(out / "model.safetensors"))
        assert all(converted[k].dtype == (torch.float16 if v.dtype == torch.float32 else v.dtype) for k, v in t.items())
        return
    assert rc != 0 and "is quantized" in err and not os.path.exists(out)
    assert _run(capsys, "--base", base, "--adapter", ws / "adapter", "--out", out)[0] == 0  # (no --dtype)


def test_float8_and_integer_tensors_are_copied_as_they_are(ws, capsys):
    src = ws / "single" / "model.safetensors"
    t = load_file(str(src))
    t["extra.f8"] = torch.tensor([1.0, float("nan"), -2.0]).to(torch.float8_e4m3fn)
    t["extra.i64"] = torch.arange(5)
    save_file(t, str(src), metadata={"format": "pt"})
    out = ws / "merged.safetensors"
    assert _run(capsys, "--base", src, "--adapter", ws / "adapter", "--out", out, "--dtype", "bfloat16")[0] == 0
    got = load_file(str(out))
    assert got["extra.f8"].dtype == torch.float8_e4m3fn and torch.equal(got["extra.i64"], t["extra.i64"])
    assert got["extra.f8"].view(torch.uint8).tolist() == t["extra.f8"].view(torch.uint8).tolist()


def test_a_missing_adapter_is_one_line_naming_the_option(ws, capsys):
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "nowhere", "--out", ws / "merged")
    assert rc == 2 and err.startswith("lora-ext merge: error: --adapter: ") and "nowhere' does not exist" in err
    (ws / "empty").mkdir()  # a folder without the config
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "empty", "--out", ws / "merged")
    assert rc == 2 and err.startswith("lora-ext merge: error: --adapter: no adapter_config.json") and "empty" in err
    os.remove(ws / "adapter" / "adapter_model.safetensors")
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
    assert rc == 2 and "--adapter: neither adapter_model.safetensors" in err


def test_an_index_mapping_a_tensor_to_the_wrong_shard_is_refused(ws, capsys):
    index_path = ws / "base" / merge_cli.INDEX_NAME
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    index_path.write_text(json.dumps(index))
    rc, err = _run(capsys, "--base", ws / "base", "--adapter", ws / "adapter", "--out", ws / "merged")
    assert rc == 2 and key in err and shards[1] in err and "does not hold it" in err


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    names = [f".out.tmp-{dead}-abc_1x9z", f".out.tmp-{dead}-old-abc_1x9y",  # a dead writer's
             ".out.tmp-k2j_x9ab",  # no pid (as older releases named them, or a user's): left
             f".out.tmp-{os.getpid()}-live1234", ".other.tmp-1-x", "out.tmp-1-x"]  # alive; other outputs
    for n in names:
        (tmp_path / n).mkdir()
    assert files_mod.stale_temporaries(out) == sorted(str(tmp_path / n) for n in names[:2])
    assert files_mod.remove_stale_temporaries(out) == sorted(str(tmp_path / n) for n in names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_an_index_file_as_base_is_refused_naming_the_directory(ws, capsys):
    index = next(p for p in (ws / "base").iterdir() if p.name.endswith(".index.json"))
    rc, err = _run(capsys, "--base", index, "--adapter", ws / "adapter", "--out", ws / "merged.safetensors")
    assert rc == 2 and "is a JSON file" in err and "give the directory" in err
    assert not (ws / "merged.safetensors").exists()
