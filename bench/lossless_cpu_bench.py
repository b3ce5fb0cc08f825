"""Lossy ops.merge_ / ops.swap_ against the C++ lossless pass (lora_ext.lossless_cpu) on a CPU weight:
best of 5, side by side in one run. Usage: python bench/lossless_cpu_bench.py [size] [rank] [threads]"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora_ext import lossless_cpu, ops  # noqa: E402


def best(fn, reps=5):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    r = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    from lora_ext import _cpu as mod  # built by setup.py
    torch.manual_seed(0)
    print(f"{size}x{size}, r={r}, scale 2, threads {torch.get_num_threads()}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        W0 = (torch.randn(size, size) * 0.02).to(dtype)
        A1, B1 = torch.randn(r, size) * 0.01, torch.randn(size, r) * 0.01
        A2, B2 = torch.randn(r, size) * 0.01, torch.randn(size, r) * 0.01
        w = W0.clone()
        lossy_merge = best(lambda: ops.merge_(w, A1, B1, 2.0))
        lossy_swap = best(lambda: ops.swap_(w, A1, B1, 2.0, A2, B2, 2.0, check_values=False))
        recs = {}

        def merge():
            w.copy_(W0)
            recs["m"] = lossless_cpu.run_pass(mod, w, None, None, (A1, B1, 2.0), 1, [0], False, None, "merge_")
        # the copy is part of merge(); time it alone and take it off
        copy = best(lambda: w.copy_(W0))
        ll_merge = best(merge) - copy
        rec1 = recs["m"]

        def swap():
            # swap 1 -> 2 then 2 -> 1 (two passes) so that every rep starts from adapter 1's merge
            recs["s"] = lossless_cpu.run_pass(mod, w, (A1, B1, 2.0), rec1, (A2, B2, 2.0), 1, [0], False, None,
                                              "swap_")
            recs["b"] = lossless_cpu.run_pass(mod, w, (A2, B2, 2.0), recs["s"], (A1, B1, 2.0), 1, [0], False,
                                              None, "swap_")
        w.copy_(W0)
        lossless_cpu.run_pass(mod, w, None, None, (A1, B1, 2.0), 1, [0], False, None, "merge_")
        ll_swap = best(swap) / 2
        print(f"{str(dtype):15s} merge: lossy {lossy_merge * 1e3:7.2f} ms  lossless {ll_merge * 1e3:7.2f} ms  "
              f"ratio {ll_merge / lossy_merge:5.2f}  exceptions {rec1.exceptions}")
        print(f"{'':15s} swap:  lossy {lossy_swap * 1e3:7.2f} ms  lossless {ll_swap * 1e3:7.2f} ms  "
              f"ratio {ll_swap / lossy_swap:5.2f}  exceptions {recs['s'].exceptions}")


if __name__ == "__main__":
    main()
