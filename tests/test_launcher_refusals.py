"""Every C++ launcher's refusals, called directly (no Python checks first), each in one child process.

The second device run segfaulted in lora_ext._C's merge_ on the first bad argument a test gave it (tests.log of
bench/results/gpu-2026-11-30-H200-run2: a B of the wrong rank), where the simulator, running the same host
checks, raised ValueError; and the batched launcher's refusal, earlier in the same run, did raise. The cause is
not known (the same checks compiled here, against torch 2.11 too, raise: a CUDA device was stood in for).
Here each refusal of each launcher runs in a child that prints the call's name before it and the error after:
a crash fails this test naming the call, instead of ending the whole pytest run, and the calls that did
raise show which refusals work; where cuda-gdb is (the GPU machine), the crash's C++ backtrace is added. In a rehearsal (--sim-as-cuda) the child calls lora_ext._sim with CPU tensors:
the same host checks, so the messages are checked there before a GPU is booked."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import importlib, sys, torch
    mod = importlib.import_module(sys.argv[1])
    dev, other = torch.device(sys.argv[2]), torch.device(sys.argv[3])
    f32 = dict(device=dev)
    w, a, b = torch.randn(64, 32, **f32), torch.randn(4, 32, **f32), torch.randn(64, 4, **f32)
    b5 = torch.randn(64, 5, **f32)
    ln, rn = torch.ones(1, 64, **f32), torch.ones(1, 32, **f32)
    codes = torch.zeros(1, 64, 32, dtype=torch.int16, device=dev)  # float32 W: int16 codes, 32 a row
    bad_codes = torch.zeros(1, 63, 32, dtype=torch.int16, device=dev)
    idx, bits = torch.empty(8, dtype=torch.int64, device=dev), torch.empty(8, dtype=torch.int32, device=dev)
    counter = torch.zeros(1, dtype=torch.int64, device=dev)
    x = torch.randn(3, 32, **f32)
    ids = torch.tensor([0, 1], device=dev)
    emb, ea, eb = torch.randn(10, 16, **f32), torch.randn(4, 10, **f32), torch.randn(16, 4, **f32)
    slots_a, slots_b = torch.randn(2, 4, 32, **f32), torch.randn(2, 64, 4, **f32)
    scales = torch.ones(2, **f32)
    index = torch.zeros(3, dtype=torch.int32, device=dev)
    cases = [
        ("merge_ B rank", "B must have shape", lambda: mod.merge_(w, a, b5, 1.0, 1, [0], False)),
        ("merge_ A columns", "A must have 32 columns",
         lambda: mod.merge_(w, torch.randn(4, 33, **f32), b, 1.0, 1, [0], False)),
        ("merge_ A dtype", "A must be float32",
         lambda: mod.merge_(w, a.half(), b.half(), 1.0, 1, [0], False)),
        ("merge_ num_blocks", "num_blocks must be in", lambda: mod.merge_(w, a, b, 1.0, 0, [], False)),
        ("merge_ A device", "A must be on W's device",
         lambda: mod.merge_(w, a.to(other), b, 1.0, 1, [0], False)),
        ("delta_weight_ B rank", "B must have shape", lambda: mod.delta_weight_(w, a, b5, 1.0, 1, [0], False)),
        ("swap_ new_B rank", "new_B must have shape", lambda: mod.swap_(w, a, b, 1.0, a, b5, 1.0, 1, [0], False)),
        ("merge_lossless_ codes", "codes",
         lambda: mod.merge_lossless_(w, a, b, 1.0, 1, [0], False, ln, rn, 1e-6, bad_codes, idx, bits, counter)),
        ("unmerge_lossless_ codes", "codes",
         lambda: mod.unmerge_lossless_(w, a, b, 1.0, 1, [0], False, bad_codes, idx[:0], bits[:0])),
        ("swap_lossless_ B rank", "B must have shape",
         lambda: mod.swap_lossless_(w, a, b, 1.0, codes, idx[:0], bits[:0], a, b5, 1.0, 1, [0], False, ln, rn,
                                    1e-6, codes, idx, bits, counter)),
        ("linear B rank", "B must have shape", lambda: mod.linear(x, x, w, None, a, b5, 1.0, 1, [0], False, None)),
        ("linear x_lora device", "x_lora must be on x's device",
         lambda: mod.linear(x, x.to(other), w, None, a, b, 1.0, 1, [0], False, None)),
        ("embedding B rank", "B must have shape",
         lambda: mod.embedding(ids, emb, ea, torch.randn(16, 5, **f32), 1.0, None, None)),
        ("batched_linear_ index dtype", "index",
         lambda: mod.batched_linear_(torch.zeros(3, 64, **f32), x, slots_a, slots_b, scales, index.long(), 1)),
        ("batched_embedding_ B slots", "b_slots",
         lambda: mod.batched_embedding_(torch.zeros(2, 16, **f32), ids, torch.randn(2, 4, 10, **f32),
                                        torch.randn(2, 15, 4, **f32), scales, index[:2], 1)),
    ]
    for name, words, call in cases:
        print("CALL", name, flush=True)
        try:
            call()
        except ValueError as err:
            print("REFUSED", name, "|", str(err).splitlines()[0], flush=True)
            if words not in str(err):
                print("WRONG MESSAGE", name, "| wants", repr(words), flush=True)
        else:
            print("NOT REFUSED", name, flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("DONE", flush=True)
''')


def _backtrace(args):
    """The C++ backtrace of a child that crashed, from cuda-gdb (the GPU machine has it), else ''."""
    gdb = shutil.which("cuda-gdb") or "/usr/local/cuda/bin/cuda-gdb"
    if not os.path.exists(gdb):
        return ""
    try:
        done = subprocess.run([gdb, "-q", "-batch", "-ex", "run", "-ex", "bt", "--args", *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return "(cuda-gdb: timed out)"
    return "\n".join(ln for ln in done.stdout.splitlines() if ln.startswith(("#", "Thread", "Program")))[:6000]  # the innermost frames


@pytest.mark.gpu
def test_each_launcher_refuses_bad_arguments_with_a_value_error(cuda):
    args = [sys.executable, "-c", CHILD, cuda.kernels.__name__, str(cuda.device), str(cuda.other)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stdout.splitlines()
    calls = [ln[5:] for ln in lines if ln.startswith("CALL ")]
    refused = [ln.split(" | ")[0][8:] for ln in lines if ln.startswith("REFUSED ")]
    assert done.returncode == 0 and lines[-1:] == ["DONE"], (
        f"the child ended with {done.returncode} in {calls[-1] if calls else 'its set-up'!r} "
        f"(refused before it: {refused})\n{done.stderr[-3000:]}\n"
        + (_backtrace(args) if done.returncode < 0 else ""))
    assert refused == calls, [ln for ln in lines if not ln.startswith(("CALL", "REFUSED"))]
    assert not [ln for ln in lines if ln.startswith("WRONG MESSAGE")], done.stdout
