"""A reduced kernel suite for compute-sanitizer (memcheck, racecheck): every kernel family once per dtype path,
at small shapes with ragged edges, so that a run under the sanitizer takes seconds, not minutes.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cases.py
    python bench/sanitize_cases.py --rehearse      (the CPU, lora_ext._sim standing in for lora_ext._C)

Each case also checks its result against float64, so a run that the sanitizer passes is also right.
"""
import argparse
import contextlib
import sys

import torch

from lora_ext import ops


def _close(out, ref, dtype):
    err = ((out.double() - ref).norm() / ref.norm()).item()
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    if not err < bound:
        raise AssertionError(f"relative error {err:.3g} over {bound} ({dtype})")


def cases(device):
    """(name, function) for each case; each function raises on a wrong result."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for r in (4, 32):  # r = 32 takes the tensor-core paths for 16-bit factors
            def merge(dtype=dtype, r=r):
                A = torch.randn(2 * r, 136, device=device).to(dtype)
                B = torch.randn(2 * 67, r, device=device).to(dtype)
                w = torch.randn(201, 136, device=device).to(dtype)  # 3 blocks of 67 rows
                w0 = w.double().clone()
                ops.merge_(w, A, B, 0.5, num_blocks=3, block_ids=[0, 2])
                ref = w0.clone()
                ref[:67] += 0.5 * B[:67].double() @ A[:r].double()
                ref[134:] += 0.5 * B[67:].double() @ A[r:].double()
                _close(w, ref, dtype)

            def swap(dtype=dtype, r=r):
                w = torch.randn(130, 72, device=device).to(dtype)
                A1, B1 = torch.randn(r, 72, device=device), torch.randn(130, r, device=device)
                A2 = torch.randn(r + 3, 72, device=device).to(dtype)
                B2 = torch.randn(130, r + 3, device=device).to(dtype)
                w0 = w.double().clone()
                ops.swap_(w, A1, B1, 0.5, A2, B2, 2.0, transposed=False)
                _close(w, w0 + 2.0 * B2.double() @ A2.double() - 0.5 * B1.double() @ A1.double(), dtype)

            def delta(dtype=dtype, r=r):
                A = torch.randn(r, 40, device=device).to(dtype)
                B = torch.randn(36, r, device=device).to(dtype)
                d = ops.delta_weight(A, B, 0.25, out_features=36, transposed=True)
                _close(d, 0.25 * (B.double() @ A.double()).t(), dtype)

            out += [(f"merge_ {dtype} r={r}", merge), (f"swap_ {dtype} r={r}", swap),
                    (f"delta_weight {dtype} r={r}", delta)]

        def merge_many_tiles(dtype=dtype):
            # more 64 x 128 tiles (65 x 9 = 585) than an H200 holds blocks at once (2 per SM): each persistent
            # block walks two or more and prefetches its next tile's W by cp.async (kernels/merge.cuh); float32
            # factors at r = 40 (16-bit W: tensor cores on bf16 hi/lo pairs), ragged last row and column tiles.
            # The simulator holds 3 blocks, so 5 x 3 tiles walk there.
            rows, cols = (4160, 1032) if device == "cuda" else (260, 264)
            A, B = torch.randn(40, cols, device=device), torch.randn(rows, 40, device=device)
            w = torch.randn(rows, cols, device=device).to(dtype)
            w0 = w.double()
            ops.merge_(w, A, B, 0.25)
            _close(w, w0 + 0.25 * B.double() @ A.double(), dtype)
            ops.swap_(w, A, B, 0.25, A[:20], B[:, :20], -0.5)
            _close(w, w0 - 0.5 * B[:, :20].double() @ A[:20].double(), dtype)
        out.append((f"merge_ and swap_ {dtype} many tiles, float32 factors", merge_many_tiles))
        for m in (1, 3, 97):  # decode (fused) and prefill (shrink + expand)
            def linear(dtype=dtype, m=m):
                x = torch.randn(m, 72, device=device).to(dtype)
                w = torch.randn(99, 72, device=device).to(dtype)
                b = torch.randn(99, device=device).to(dtype)
                A = torch.randn(6, 72, device=device).to(dtype)
                B = torch.randn(66, 3, device=device).to(dtype)
                y = ops.linear(x, x, w, b, A, B, 0.5, num_blocks=3, block_ids=[0, 2])
                delta = torch.zeros(99, 72, dtype=torch.float64, device=device)
                delta[:33] = B[:33].double() @ A[:3].double()
                delta[66:] = B[33:].double() @ A[3:].double()
                _close(y, x.double() @ (w.double() + 0.5 * delta).t() + b.double(), dtype)
            out.append((f"linear {dtype} M={m}", linear))
            if dtype != torch.float32:  # float32 factors on a 16-bit model: the kernels read them as stored
                def linear_fp32_factors(dtype=dtype, m=m):
                    x = torch.randn(m, 72, device=device).to(dtype)
                    w = torch.randn(99, 72, device=device).to(dtype)
                    A = torch.randn(6, 72, device=device)
                    B = torch.randn(66, 3, device=device)
                    y = ops.linear(x, x, w, None, A, B, 0.5, num_blocks=3, block_ids=[0, 2])
                    delta = torch.zeros(99, 72, dtype=torch.float64, device=device)
                    delta[:33] = B[:33].double() @ A[:3].double()
                    delta[66:] = B[33:].double() @ A[3:].double()
                    _close(y, x.double() @ (w.double() + 0.5 * delta).t(), dtype)
                out.append((f"linear {dtype} float32 factors M={m}", linear_fp32_factors))

        def embedding(dtype=dtype):
            ids = torch.randint(0, 50, (5, 9), device=device)
            w = torch.randn(50, 40, device=device).to(dtype)
            A = torch.randn(4, 50, device=device).to(dtype)
            B = torch.randn(40, 4, device=device).to(dtype)
            y = ops.embedding(ids, w, A, B, 0.5)
            _close(y, (w.double() + 0.5 * (B.double() @ A.double()).t())[ids], dtype)
        out.append((f"embedding {dtype}", embedding))
        if dtype != torch.float32:
            def embedding_fp32_factors(dtype=dtype):
                ids = torch.randint(0, 50, (5, 9), device=device)
                w = torch.randn(50, 40, device=device).to(dtype)
                A, B = torch.randn(4, 50, device=device), torch.randn(40, 4, device=device)
                y = ops.embedding(ids, w, A, B, 0.5)
                _close(y, (w.double() + 0.5 * (B.double() @ A.double()).t())[ids], dtype)
            out.append((f"embedding {dtype} float32 factors", embedding_fp32_factors))
        for tokens in (1, 16):  # mixed batches: decode and segment variants
            def batched(dtype=dtype, tokens=tokens):
                groups, slots, k, d, rank = 5, 3, 72, 66, 5
                x = torch.randn(groups * tokens, k, device=device).to(dtype)
                y = torch.randn(groups * tokens, d, device=device).to(dtype)
                a = torch.randn(slots, k, rank, device=device).to(dtype)
                b = torch.randn(slots, rank, d, device=device).to(dtype)
                scales = torch.randn(slots, device=device)
                index = torch.tensor([2, -1, 0, 1, 2], dtype=torch.int32, device=device)
                ref = y.double().clone()
                rows = index.tolist()  # (one copy to the host, not one per row: the sanitizer slows each)
                for m in range(groups * tokens):
                    i = rows[m // tokens]
                    if i >= 0:
                        ref[m] += scales[i].double() * (x[m].double() @ a[i].double()) @ b[i].double()
                with torch.no_grad():
                    ops.batched_linear_(y, x, a, b, scales, index, tokens)
                _close(y, ref, dtype)
            out.append((f"batched_linear_ {dtype} tokens={tokens}", batched))
        if dtype != torch.float32:
            def lossless(dtype=dtype):
                # the lossless merge / swap / unmerge kernels: merged values as a plain merge's, the base back bit
                # for bit (fan_in_fan_out layout, two of three blocks)
                w = torch.randn(72, 201, device=device).to(dtype)
                base = w.clone()
                # factors of LoRA's usual size next to W (a large update needs more exceptions than the limit)
                A1, B1 = (0.1 * torch.randn(shape, device=device).to(dtype) for shape in ((8, 72), (134, 4)))
                A2, B2 = (0.1 * torch.randn(shape, device=device).to(dtype) for shape in ((6, 72), (134, 3)))
                layout = {"num_blocks": 3, "block_ids": [0, 2], "transposed": True}
                record = ops.merge_(w, A1, B1, 0.5, lossless=True, **layout)
                ref = base.double().clone()
                ref[:, :67] += 0.5 * (B1[:67].double() @ A1[:4].double()).t()
                ref[:, 134:] += 0.5 * (B1[67:].double() @ A1[4:].double()).t()
                _close(w, ref, dtype)
                record = ops.swap_(w, A1, B1, 0.5, A2, B2, -1.5, record=record, **layout)
                ops.unmerge_(w, A2, B2, -1.5, record=record, **layout)
                if not torch.equal(w, base):
                    raise AssertionError(f"lossless merge, swap, unmerge: the base is not back bit for bit ({dtype})")
            out.append((f"lossless merge_/swap_/unmerge_ {dtype}", lossless))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rehearse", action="store_true", help="run on the CPU through lora_ext._sim")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.rehearse:
        from lora_ext import _sim
        context, device = ops.use_kernels(_sim, "cpu"), "cpu"
    else:
        if not ops.cuda_kernels_available() or not torch.cuda.is_available():
            print("sanitize_cases: needs a GPU and lora_ext._C (or --rehearse)", file=sys.stderr)
            return 2
        context, device = contextlib.nullcontext(), "cuda"
    failed = 0
    with context:
        for name, fn in cases(device):
            try:
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                print(f"ok   {name}")
            except Exception as e:  # report every case, then fail
                failed += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}")
    print(f"sanitize_cases: {failed} failed" if failed else "sanitize_cases: all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
