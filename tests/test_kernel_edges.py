"""Edges of the kernels' host code and launches, through the SIMT simulator (lora_ext._sim), which runs the same
host code as lora_ext._C: a scale read at run time (scale_tensor, for captured CUDA graphs), embedding ids out of
range (a device-side assert), zero-size outputs and over-limit grids (invalid launch configurations on CUDA),
misaligned operands (small ones copied, large ones read element by element, the 16-byte variant kept), and the build's refusal of GPU
architectures below sm_80 (setup.py)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import TOL, embedding64, linear64, load_sim, rel_err, requires_sim

_sim = load_sim()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _linear_case(dtype, m, k=64, nb=24, r=4, num_blocks=3, ids=(0, 2), fan=False, bias=True):
    n_out = num_blocks * nb
    w = torch.randn((k, n_out) if fan else (n_out, k)).to(dtype)
    b = torch.randn(n_out).to(dtype) if bias else None
    A = torch.randn(len(ids) * r, k).to(dtype)
    B = torch.randn(len(ids) * nb, r).to(dtype)
    x = torch.randn(m, k).to(dtype)
    return x, w, b, A, B, num_blocks, list(ids), fan


def _misaligned(t):
    """A copy of t whose data pointer is one element past a 16-byte boundary (a view at an odd offset)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    assert flat.data_ptr() % 16 != 0
    return flat.view(t.shape).copy_(t)


# ---------------------------------------------------------------------------------------------------
# scale_tensor: the scale read by the kernels at run time


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [3, 20])  # the fused decode kernel; the shrink + expand
@pytest.mark.parametrize("shape", [(), (1,)])
def test_linear_scale_tensor_is_read_at_run_time(dtype, m, shape):
    x, w, b, A, B, g, ids, fan = _linear_case(dtype, m)
    s = torch.full(shape, 0.3)
    first = s.item()  # 0.3 as float32
    y = _sim.linear(x, x, w, b, A, B, 123.0, g, ids, fan, scale_tensor=s)  # `scale` is then unused
    assert torch.equal(y, _sim.linear(x, x, w, b, A, B, first, g, ids, fan))
    assert rel_err(y, linear64(x, x, w, b, A, B, first, g, ids, fan)) < TOL[dtype]
    s.fill_(-1.7)  # in place: what an adapter switch does to a captured graph's scale
    y2 = _sim.linear(x, x, w, b, A, B, 123.0, g, ids, fan, scale_tensor=s)
    assert torch.equal(y2, _sim.linear(x, x, w, b, A, B, s.item(), g, ids, fan))
    assert not torch.equal(y2, y)
    assert rel_err(y2, linear64(x, x, w, b, A, B, s.item(), g, ids, fan)) < TOL[dtype]


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_embedding_scale_tensor_is_read_at_run_time(dtype):
    num, dim, r = 30, 40, 3
    w, A, B = torch.randn(num, dim).to(dtype), torch.randn(r, num).to(dtype), torch.randn(dim, r).to(dtype)
    ids = torch.randint(0, num, (2, 19))
    s = torch.tensor([0.3])
    y = _sim.embedding(ids, w, A, B, 123.0, None, scale_tensor=s)
    assert torch.equal(y, _sim.embedding(ids, w, A, B, s.item(), None))
    s.fill_(2.5)
    y2 = _sim.embedding(ids, w, A, B, 123.0, None, s)
    assert torch.equal(y2, _sim.embedding(ids, w, A, B, 2.5, None))
    assert not torch.equal(y2, y)
    assert rel_err(y2, embedding64(ids, w, A, B, 2.5)) < TOL[dtype]


@requires_sim
@pytest.mark.parametrize("bad,why", [
    (torch.tensor([0.5], dtype=torch.float64), "float32"),
    (torch.tensor([0.5], dtype=torch.float16), "float32"),
    (torch.tensor([0.5, 0.5]), "exactly one element"),
    (torch.empty(0), "exactly one element"),
    (torch.ones(1, device="meta"), "device"),
], ids=["float64", "float16", "two", "empty", "meta"])
def test_scale_tensor_refused(bad, why):
    x, w, b, A, B, g, ids, fan = _linear_case(torch.float32, 2)
    with pytest.raises(ValueError, match=f"scale_tensor.*{why}"):
        _sim.linear(x, x, w, b, A, B, 1.0, g, ids, fan, scale_tensor=bad)
    # checked even where no kernel runs (no rows)
    with pytest.raises(ValueError, match="scale_tensor"):
        _sim.linear(x[:0], x[:0], w, b, A, B, 1.0, g, ids, fan, scale_tensor=bad)
    ew, eA, eB = torch.randn(5, 8), torch.randn(2, 5), torch.randn(8, 2)
    with pytest.raises(ValueError, match=f"scale_tensor.*{why}"):
        _sim.embedding(torch.tensor([1]), ew, eA, eB, 1.0, None, scale_tensor=bad)


# ---------------------------------------------------------------------------------------------------
# embedding ids out of range: a device-side assert, raised by the simulator with the id and the bound


@requires_sim
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("pos,bad", [(1, 10), (0, -1), (40, 10), (44, -7), (3, 2**40)])
def test_embedding_id_out_of_range(ids_dtype, pos, bad):
    if ids_dtype == torch.int32 and bad == 2**40:
        bad = 2**31 - 1
    w, A, B = torch.randn(10, 8), torch.randn(2, 10), torch.randn(8, 2)
    ids = torch.randint(0, 10, (45,), dtype=ids_dtype)  # two 32-id tiles: position 40 is in the second
    ids[pos] = bad
    with pytest.raises(RuntimeError, match=rf"embedding id out of range: ids\[{pos}\] = {bad}, "
                                           rf"not in \[0, num_embeddings=10\)"):
        _sim.embedding(ids.view(5, 9), w, A, B, 1.0, None)
    ids[pos] = 9
    y = _sim.embedding(ids, w, A, B, 1.0, None)  # the simulator recovers; the last id is valid
    assert rel_err(y, embedding64(ids.long(), w, A, B, 1.0)) < TOL[torch.float32]


@requires_sim
def test_embedding_without_rows_refuses_ids():
    w, A, B = torch.randn(0, 8), torch.randn(2, 0), torch.randn(8, 2)
    with pytest.raises(ValueError, match="embedding id out of range"):
        _sim.embedding(torch.tensor([0]), w, A, B, 1.0, None)
    assert _sim.embedding(torch.tensor([], dtype=torch.long), w, A, B, 1.0, None).shape == (0, 8)


# ---------------------------------------------------------------------------------------------------
# zero-size outputs launch nothing (a zero-size grid is an invalid configuration, which the simulator refuses
# as CUDA does); an output too wide for gridDim.y is refused before anything runs


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("num_blocks,ids,fan", [(1, (0,), False), (1, (0,), True), (3, (0, 2), False)],
                         ids=["plain", "fan_in_fan_out", "merged"])
def test_linear_zero_out_features(dtype, m, num_blocks, ids, fan):
    x, w, b, A, B, g, ids, fan = _linear_case(dtype, m, k=16, nb=0, num_blocks=num_blocks, ids=ids, fan=fan)
    y = _sim.linear(x, x, w, b, A, B, 0.5, g, ids, fan)
    assert y.shape == (m, 0) and y.dtype == dtype
    assert _sim.last_variant() == ""


@requires_sim
@pytest.mark.parametrize("m", [1, 20])
def test_linear_zero_in_features(m):
    # K = 0: the kernels run (the low-rank term is 0) and the output is the bias
    x, w, b, A, B, g, ids, fan = _linear_case(torch.float32, m, k=0, nb=8)
    y = _sim.linear(x, x, w, b, A, B, 0.5, g, ids, fan)
    assert torch.equal(y, b.expand(m, -1))
    assert _sim.last_variant() != ""


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_embedding_zero_dim(dtype):
    w, A, B = torch.randn(10, 0).to(dtype), torch.randn(3, 10).to(dtype), torch.randn(0, 3).to(dtype)
    y = _sim.embedding(torch.tensor([[1, 2], [3, 4]]), w, A, B, 0.5, None)
    assert y.shape == (2, 2, 0) and y.dtype == dtype
    assert _sim.last_variant() == ""


# (W's shape, num_blocks, block_ids, transposed) with a zero dimension; r = 2
_EMPTY_WEIGHTS = {
    "no_rows": ((0, 12), 1, [0], False),
    "no_columns": ((12, 0), 1, [0], False),
    "transposed_no_columns": ((12, 0), 1, [0], True),
    "transposed_no_rows": ((0, 12), 1, [0], True),
    "merged_no_rows": ((0, 12), 3, [0, 2], False),
}


def _empty_factors(shape, num_blocks, block_ids, transposed, dtype, r=2):
    blocked, k = (shape[1], shape[0]) if transposed else shape
    nb = blocked // num_blocks
    n = len(block_ids)
    return torch.randn(n * r, k).to(dtype), torch.randn(n * nb, r).to(dtype)


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(_EMPTY_WEIGHTS))
def test_merge_ops_on_empty_weights(dtype, case):
    shape, g, ids, tr = _EMPTY_WEIGHTS[case]
    w = torch.empty(shape, dtype=dtype)
    A, B = _empty_factors(shape, g, ids, tr, dtype)
    A2, B2 = _empty_factors(shape, g, ids, tr, dtype, r=3)
    _sim.merge_(w, A, B, 0.5, g, ids, tr)
    assert _sim.last_variant() == ""
    _sim.delta_weight_(w, A, B, 0.5, g, ids, tr)
    assert _sim.last_variant() == ""
    _sim.swap_(w, A, B, 0.5, A2, B2, 0.25, g, ids, tr)
    assert _sim.last_variant() == ""
    assert w.shape == shape


@requires_sim
def test_linear_too_wide_for_the_grid_is_refused():
    # More than 65535 column tiles per block (128 float32 features each) would exceed gridDim.y in the expand;
    # the decode shape (fused kernel, tiles on gridDim.x) is not limited.
    n = 65535 * 128 + 1
    w, B = torch.zeros(n, 1), torch.zeros(n, 1)
    A = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="too many output features per block"):
        _sim.linear(torch.zeros(9, 1), torch.zeros(9, 1), w, None, A, B, 1.0, 1, [0], False)


@requires_sim
def test_embedding_too_wide_for_the_grid_is_refused():
    n = 65535 * 128 + 1
    w, A, B = torch.zeros(1, n), torch.zeros(1, 1), torch.zeros(n, 1)
    with pytest.raises(ValueError, match="too many embedding features"):
        _sim.embedding(torch.tensor([0]), w, A, B, 1.0, None)


# ---------------------------------------------------------------------------------------------------
# alignment: a misaligned small operand (A, bias) is copied, so the 16-byte variant stays selected; a
# misaligned x_lora or embedding table (the large operands) is read element by element within that variant


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [3, 20])
@pytest.mark.parametrize("which", ["none", "A", "bias", "A_and_bias", "B"])
def test_linear_misaligned_small_operand_keeps_vector_variant(dtype, m, which):
    x, w, b, A, B, g, ids, fan = _linear_case(dtype, m)
    if "A" in which:
        A = _misaligned(A)
    if "bias" in which:
        b = _misaligned(b)
    if which == "B":
        B = _misaligned(B)
    y = _sim.linear(x, x, w, b, A, B, 0.75, g, ids, fan)
    assert _sim.last_variant().endswith("vector=1>"), _sim.last_variant()
    assert rel_err(y, linear64(x, x, w, b, A, B, 0.75, g, ids, fan)) < TOL[dtype]


_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("factors", ["same", "float32"])
@pytest.mark.parametrize("m", [3, 20])  # the fused decode kernel; the shrink + expand
def test_linear_misaligned_x_keeps_vector_variant(dtype, factors, m):
    # x_lora's own pointer decides only its own reads (element by element: the simulator raises on a misaligned
    # 16-byte access); A, bias and out keep the 16-byte variant.
    x, w, b, A, B, g, ids, fan = _linear_case(dtype, m)
    if factors == "float32":
        A, B = A.float(), B.float()
    x = _misaligned(x)
    y = _sim.linear(x, x, w, b, A, B, 0.75, g, ids, fan)
    tc = int(dtype != torch.float32)
    fac = _NAMES[A.dtype]
    assert _sim.last_variant() == f"forward<{_NAMES[dtype]}, factors={fac}, tensor_core={tc}, vector=1>"
    assert rel_err(y, linear64(x, x, w, b, A, B, 0.75, g, ids, fan)) < TOL[dtype]


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_embedding_misaligned_table_keeps_vector_variant(dtype):
    # a table at an odd offset is read element by element; out (fresh) keeps its 16-byte stores
    w = _misaligned(torch.randn(50, 64).to(dtype))
    A, B = torch.randn(4, 50).to(dtype), torch.randn(64, 4).to(dtype)
    ids = torch.randint(0, 50, (5, 7))
    y = _sim.embedding(ids, w, A, B, 0.5, None)
    assert _sim.last_variant().endswith("vector=1>"), _sim.last_variant()
    assert rel_err(y, embedding64(ids, w, A, B, 0.5)) < TOL[dtype]


@requires_sim
def test_last_variant_names_the_merge_variant():
    w = torch.randn(64, 40).to(torch.float16)
    A, B = torch.randn(32, 40).to(torch.float16), torch.randn(64, 32).to(torch.float16)
    _sim.merge_(w, A, B, 0.5, 1, [0], False)
    assert _sim.last_variant() == "merge<W=Half, factors=Half, tensor_core=1, vector=1>"
    _sim.merge_(w[:, 1:], A[:, 1:], B, 0.5, 1, [0], False)  # W's data pointer off by one element
    assert _sim.last_variant() == "merge<W=Half, factors=Half, tensor_core=1, vector=0>"


# ---------------------------------------------------------------------------------------------------
# GPU architectures: setup.py refuses a TORCH_CUDA_ARCH_LIST below sm_80, saying which entry and what to set


def _load_setup():
    spec = importlib.util.spec_from_file_location("lora_ext_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the functions, builds nothing
    return module


@pytest.mark.parametrize("value", ["8.0;9.0", "8.0 8.6+PTX 9.0a", "Ampere;Hopper", "9.0", "8.9,10.0", " 8.0 ;; 9.0 ",
                                   "12.0f"])
def test_arch_list_accepted(value):
    assert _load_setup().cuda_arch_list_error(value) is None


@pytest.mark.parametrize("value,named,suggested", [
    ("7.0;8.0", "7.0, sm_70", "8.0"),
    ("7.5+PTX", "7.5+PTX, sm_75", "8.0;9.0"),
    ("6.1 7.5 8.6 9.0", "6.1, sm_61; 7.5, sm_75", "8.6;9.0"),
    ("Turing;Hopper", "Turing (7.5), sm_75", "9.0+PTX"),
    ("Volta", "Volta (7.0), sm_70", "8.0;9.0"),
])
def test_arch_list_below_sm80_refused(value, named, suggested):
    msg = _load_setup().cuda_arch_list_error(value)
    assert msg is not None
    assert f"TORCH_CUDA_ARCH_LIST={value!r} names {named}, below compute capability 8.0" in msg
    assert f'TORCH_CUDA_ARCH_LIST="{suggested}"' in msg
    assert "LORA_EXT_CUDA=0" in msg


def _cuda_build_possible():
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return torch.version.cuda is not None and (os.path.exists(nvcc) or shutil.which("nvcc") is not None)


@pytest.mark.skipif(not _cuda_build_possible(), reason="needs torch with CUDA and nvcc (a CUDA build)")
def test_setup_refuses_old_arch_before_building():
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="7.5;8.0", LORA_EXT_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "names 7.5, sm_75, below compute capability 8.0" in proc.stderr
    assert 'TORCH_CUDA_ARCH_LIST="8.0"' in proc.stderr


@pytest.mark.parametrize("sim,built", [(None, True), ("1", True), ("0", False), ("only", True)])
def test_setup_builds_the_simulator_unless_told_not_to(monkeypatch, sim, built):
    # bench/gpu_check.sh builds with LORA_EXT_SIM=0 on the GPU machine (the simulator is its longest compile)
    from torch.utils import cpp_extension
    monkeypatch.setenv("LORA_EXT_CUDA", "0")
    if sim is None:
        monkeypatch.delenv("LORA_EXT_SIM", raising=False)
    else:
        monkeypatch.setenv("LORA_EXT_SIM", sim)
    names = [e.name for e in _load_setup().extensions(torch, cpp_extension)]
    assert ("lora_ext._sim" in names) == built
    # `only`: scripts/setup.sh builds the simulator alone, beside the others
    assert names == ["lora_ext._sim"] if sim == "only" else "lora_ext._cpu" in names


def test_setup_refuses_a_bad_sim_switch(monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setenv("LORA_EXT_CUDA", "0")
    monkeypatch.setenv("LORA_EXT_SIM", "no")
    with pytest.raises(SystemExit, match="LORA_EXT_SIM must be 1, 0 or only, got 'no'"):
        _load_setup().extensions(torch, cpp_extension)


@pytest.mark.gpu
@pytest.mark.hardware
def test_cuda_embedding_id_out_of_range_is_a_device_assert():
    """On hardware an out-of-range id stops the kernel with a device-side assert that names the condition
    (the CUDA context is then unusable, hence a subprocess)."""
    import subprocess
    import sys
    code = ("import torch, lora_ext\n"
            "m = lora_ext.Embedding(10, 16, r=4).cuda()\n"
            "m(torch.tensor([[1, 10]], device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "device-side assert" in run.stderr or "Assertion" in run.stderr, run.stderr[-2000:]
