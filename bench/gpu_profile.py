"""Where the time of the GPU run's largest misses goes: torch.profiler over a few calls of each, on the host (CPU
time per op, runtime calls: launches, synchronizations, copies) and on the device (kernel time). What the third
device run left open (bench/NOTES-gpu.md, "After the third run"): the unmerged forward at M = 1 (2.9x plain, under
graph replay too), forward+backward (0.45-0.6x peft's speed), set_adapter on a merged layer (26.8x one addmm_
where ops.swap_ is 1.37x), the merge kernel (32-37% of copy bandwidth).

    python bench/gpu_profile.py                 # on a GPU: every case at width 4096, bfloat16
    python bench/gpu_profile.py --rehearse      # on the CPU: the same code, lora_ext._sim for _C, width 64

Prints, per case: the wall time per call, the host's runtime calls per call (cudaLaunchKernel,
cudaStreamSynchronize, cudaMemcpyAsync, ...), and the top ops by self host time and by device time. bench/gpu_check.sh
runs it last, where time is left, into $OUT/gpu.txt.
"""
import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_ext  # noqa: E402
from lora_ext import bench, ops  # noqa: E402

CALLS = 20
RUNTIME = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaStreamSynchronize",
           "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaMemsetAsync",
           "cudaStreamWaitEvent", "cudaEventRecord", "cudaFuncSetAttribute", "cudaGraphLaunch")


def _layer(dim, r, dtype, device, **kwargs):
    layer = lora_ext.Linear(dim, dim, r=r, lora_alpha=2 * r, **kwargs).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return layer


def cases(dim, r, dtype, device):
    """{name: a call}, each made ready (warm) by its caller."""
    out = {}
    x1 = torch.randn(1, dim, device=device, dtype=dtype)
    unmerged = _layer(dim, r, dtype, device, merge_weights=False).eval()
    plain = torch.nn.Linear(dim, dim, device=device, dtype=dtype).requires_grad_(False)

    def forward():
        with torch.no_grad():
            unmerged(x1)

    def forward_plain():
        with torch.no_grad():
            plain(x1)

    out["unmerged forward M=1, no grad"] = forward
    out["plain nn.Linear forward M=1 (the floor)"] = forward_plain
    # the same under CUDA graph replay (the bench's capture: a rehearsal replays eagerly): kernel time alone
    out["unmerged forward M=1, CUDA graph replay"] = bench._graph_replay([unmerged], x1)
    out["plain nn.Linear forward M=1, CUDA graph replay"] = bench._graph_replay([plain], x1)
    train = _layer(dim, r, dtype, device)
    lora_ext.mark_only_lora_as_trainable(train)
    train.train()
    xg = x1.clone().requires_grad_()
    grad = torch.randn(1, dim, device=device, dtype=dtype)
    out["forward+backward M=1 (factors and x need grad)"] = lambda: train(xg).backward(grad)
    for lossless in (None, False):
        merged = _layer(dim, r, dtype, device, lossless=lossless).requires_grad_(False)
        merged.add_adapter("b", torch.randn_like(merged.lora_A) * 0.02, torch.randn_like(merged.lora_B) * 0.02, 2.0)
        merged.eval()
        names = iter(["b", "default"] * 10**6)
        kind = "lossless (the 16-bit default)" if lossless is None else "lossy"
        out[f"set_adapter, merged, {kind}"] = lambda m=merged, n=names: m.set_adapter(next(n))
    serving = _layer(dim, r, dtype, device, merge_weights=False).requires_grad_(False).eval()
    serving.add_adapter("b", torch.randn_like(serving.lora_A) * 0.02, torch.randn_like(serving.lora_B) * 0.02, 2.0)
    names_s = iter(["b", "default"] * 10**6)
    out["set_adapter, unmerged serving"] = lambda: serving.set_adapter(next(names_s))
    w = torch.randn(dim, dim, device=device, dtype=dtype)
    A, B = torch.randn(r, dim, device=device) * 0.02, torch.randn(dim, r, device=device) * 0.02
    signs = iter([1.0, -1.0] * 10**6)
    out["ops.merge_ alone (float32 factors)"] = lambda: ops.merge_(w, A, B, next(signs))
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _table(prof, sort_by, limit):
    try:
        return prof.key_averages().table(sort_by=sort_by, row_limit=limit, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):
        return None


def profile_case(name, call, device):
    for _ in range(5):
        call()
    _sync(device)
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    _sync(device)
    wall = (time.perf_counter() - start) / CALLS * 1e6
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(CALLS):
            call()
        _sync(device)
    print(f"\n## {name}: {wall:.1f} us per call (wall, {CALLS} calls, synchronized at the end)")
    counts = {e.key: e.count for e in prof.key_averages() if e.key in RUNTIME}
    print("runtime calls per call: " + (", ".join(f"{k} {v / CALLS:g}" for k, v in sorted(counts.items()))
                                         or "none recorded"))
    host = _table(prof, "self_cpu_time_total", 12)
    if host is not None:
        print("top ops by self host time (totals over the calls):\n" + host)
    if device == "cuda":
        dev = _table(prof, "self_cuda_time_total", 8) or _table(prof, "self_device_time_total", 8)
        if dev is not None:
            print("top ops by device time (totals over the calls):\n" + dev)
    # the Python side (the profiler above sees torch's ops and the runtime, not lora_ext's own functions)
    py = cProfile.Profile()
    py.enable()
    for _ in range(CALLS):
        call()
    py.disable()
    _sync(device)
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(12)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()][3:]
    print(f"top Python functions by own time (cProfile, {CALLS} calls):\n" + "\n".join(lines))
    return wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true", help="on the CPU, lora_ext._sim for _C, width 64")
    parser.add_argument("--dim", type=int, default=None)
    args = parser.parse_args(argv)
    device = "cpu" if args.rehearse else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (use --rehearse on the CPU)")
    dim = args.dim or (64 if args.rehearse else 4096)
    context = contextlib.nullcontext()
    if args.rehearse:  # the bench's CUDA shim on the CPU (captures replay eagerly), lora_ext._sim for _C
        context = bench.rehearsing()
        print("REHEARSAL: the GPU run's code on the CPU (lora_ext._sim for _C); the numbers mean nothing")
    torch.manual_seed(0)
    with context:
        made = cases(dim, 16, torch.bfloat16, device)
        walls = {name: profile_case(name, call, device) for name, call in made.items()}
    print("\n## summary (us per call)")
    for name, wall in walls.items():
        print(f"{wall:10.1f}  {name}")
    print("gpu_profile: done")


if __name__ == "__main__":
    main()
