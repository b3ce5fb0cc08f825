"""Serving many adapters through one torch.compile'd model: the scaling as a float (each distinct value guarded and
baked in, as lora_ext did before) against the scaling read from the layer's scale tensor when the graph runs (now).

A stack of lora_ext.Linear layers holds N adapters of N distinct scalings (frozen, same rank: every switch writes
the live factors in place). Each mode compiles the model afresh (inductor), then serves the adapters in turn, twice:
the first pass pays the traces, the second is the steady state. Both modes run in this one process; the float mode
is the layers' eager choice forced under compile (LoRALayer._scales), which is what lora_ext traced before.

    .venv/bin/python bench/compiled_scaling_bench.py [--dim 1024] [--layers 4] [--rank 16] [--tokens 64]
                                                     [--adapters 12] [--backend inductor]
"""
import argparse
import statistics
import time

import torch
from torch._dynamo.testing import CompileCounterWithBackend


def build(args):
    import lora_ext as lora
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layer = lora.Linear(args.dim, args.dim, r=args.rank, lora_alpha=args.rank)
        for i in range(args.adapters):
            A, B, _ = layer.get_adapter("default")
            layer.add_adapter(f"a{i}", torch.randn_like(A) * 0.05, torch.randn_like(B) * 0.05, 0.5 + 0.25 * i)
        layers += [layer, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).requires_grad_(False)


def switch(model, name):
    for m in model:
        if hasattr(m, "set_adapter"):
            m.set_adapter(name)


def serve(model, x, names, backend):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    passes = []
    with torch.no_grad():
        for _ in range(3):
            times = []
            start = time.perf_counter()
            for name in names:
                t0 = time.perf_counter()
                switch(model, name)
                compiled(x)
                times.append(time.perf_counter() - t0)
            passes.append((time.perf_counter() - start, statistics.median(times), max(times)))
    return counter.frame_count, passes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()

    from lora_ext.layers import LoRALayer
    model = build(args)
    x = torch.randn(args.tokens, args.dim)
    names = [f"a{i}" for i in range(args.adapters)]
    tensor_scales = LoRALayer._scales

    def float_scales(self, x, *operands):
        return self.scaling, self._scale_tensor_for(x)

    rows = {}
    for mode in ("float", "tensor", "float", "tensor"):  # alternated: a noisy machine's drift reaches both
        LoRALayer._scales = float_scales if mode == "float" else tensor_scales
        try:
            traces, passes = serve(model, x, names, args.backend)
        finally:
            LoRALayer._scales = tensor_scales
        rows.setdefault(mode, []).append((traces, passes))

    print(f"\n{args.layers} x lora_ext.Linear({args.dim}, {args.dim}) r={args.rank}, {args.tokens} tokens, float32, CPU, "
          f"torch.compile(backend={args.backend!r}); {args.adapters} adapters of distinct scalings served in turn "
          f"(switch + forward), three passes; two runs per mode, alternated")
    print("| scaling | traces | first pass (s) | steady pass (ms) | median switch+forward (ms) | slowest (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, runs in rows.items():
        for traces, passes in runs:
            first, steady = passes[0], passes[2]
            print(f"| {mode} | {traces} | {first[0]:.2f} | {steady[0] * 1e3:.1f} | {steady[1] * 1e3:.2f} | "
                  f"{steady[2] * 1e3:.2f} |")
    f_steady = statistics.median(p[2][0] for _, p in rows["float"])
    t_steady = statistics.median(p[2][0] for _, p in rows["tensor"])
    f_first = statistics.median(p[0][0] for _, p in rows["float"])
    t_first = statistics.median(p[0][0] for _, p in rows["tensor"])
    print(f"\nfirst pass float/tensor: {f_first / t_first:.2f}x; steady pass float/tensor: {f_steady / t_steady:.2f}x")


if __name__ == "__main__":
    main()
