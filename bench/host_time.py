"""Host time of small CPU layers (where Python and dispatch dominate), this tree against another checkout.

    python bench/host_time.py --against /tmp/base          # /tmp/base: a clone at the commit to compare with
    python bench/host_time.py                              # this tree alone

Each tree is measured in its own subprocess (PYTHONPATH), alternately, `--runs` times; each number is the best of
5 timed loops in a run, and the table gives the medians over the runs and their ratio. The machine is shared and
noisy: compare only numbers from one invocation (bench/NOTES-host-time.md).
"""
import argparse
import ast
import os
import statistics
import subprocess
import sys
import time


def measure() -> dict:
    import torch
    import lora_ext as lora
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def best(f, n):
        for _ in range(200):
            f()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                f()
            times.append((time.perf_counter() - start) / n * 1e6)
        return min(times)

    lin = lora.Linear(16, 16, r=4)
    torch.nn.init.normal_(lin.lora_B)
    emb = lora.Embedding(32, 16, r=4)
    torch.nn.init.normal_(emb.lora_A)
    x2, x3, ids = torch.randn(4, 16), torch.randn(2, 4, 16), torch.randint(0, 32, (2, 4))
    out = {}
    with torch.no_grad():
        out["Linear 2-D no-grad forward"] = best(lambda: lin(x2), 3000)
        out["Linear 3-D no-grad forward"] = best(lambda: lin(x3), 3000)
        out["Embedding no-grad forward"] = best(lambda: emb(ids), 3000)
    lin_merged = lora.Linear(16, 16, r=4)
    torch.nn.init.normal_(lin_merged.lora_B)
    lin_merged.eval()  # (each merged forward looks at the weight's storage: new memory under the Parameter)
    with torch.no_grad():
        out["Linear merged no-grad forward"] = best(lambda: lin_merged(x2), 3000)
    xg = torch.randn(4, 16, requires_grad=True)
    out["Linear forward+backward"] = best(lambda: lin(xg).sum().backward(), 1000)
    out["Embedding forward+backward"] = best(lambda: emb(ids).sum().backward(), 1000)
    mlin = lora.MergedLinear(16, 48, r=2, enable_lora=[True, False, True])
    torch.nn.init.normal_(mlin.lora_B)
    out["MergedLinear [T,F,T] forward+backward"] = best(lambda: mlin(xg).sum().backward(), 1000)
    serving = lora.Linear(16, 16, r=4)
    serving.lora_A.requires_grad_(False)
    serving.lora_B.requires_grad_(False)
    serving.add_adapter("b", torch.randn(4, 16), torch.randn(16, 4), 0.5)
    names = iter(["b", "default"] * 10**6)
    out["serving switch (set_adapter)"] = best(lambda: serving.set_adapter(next(names)), 1000)
    # merged bfloat16 (lossless: a record with listed elements, the zero rows under the update)
    merged = lora.Linear(64, 64, r=8, lora_alpha=16).bfloat16().requires_grad_(False)
    torch.nn.init.normal_(merged.lora_B, std=0.02)
    with torch.no_grad():
        merged.weight[:8] = 0
    merged.add_adapter("b", (torch.randn(8, 64) * 0.1).bfloat16(), (torch.randn(64, 8) * 0.02).bfloat16(), 0.5)
    merged.eval()
    names = iter(["b", "default"] * 10**6)
    out["merged bf16 switch (lossless)"] = best(lambda: merged.set_adapter(next(names)), 300)
    out["merged bf16 train()/eval()"] = best(lambda: (merged.train(), merged.eval()), 300)
    from lora_ext import ddp_guard  # (each forward asks it, outside DDP too)
    out["ddp_guard.running() outside DDP"] = best(ddp_guard.running, 20000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="another checkout (built, or with this tree's .so files copied in)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(repr(measure()))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here} if not args.against else {"against": os.path.abspath(args.against), "this tree": here}
    runs = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure"], capture_output=True,
                                  text=True, check=True, env={**os.environ, "PYTHONPATH": tree})
            runs[name].append(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    names = list(trees)
    print("| case | " + " | ".join(names) + (" | ratio |" if len(names) == 2 else " |"))
    print("|---|" + "---:|" * (len(names) + (len(names) == 2)))
    for case in runs[names[-1]][0]:
        medians = [statistics.median(r[case] for r in runs[name]) for name in names]
        ratio = f" | {medians[1] / medians[0]:.3f}" if len(names) == 2 else ""
        print(f"| {case} | " + " | ".join(f"{m:.1f} us" for m in medians) + ratio + " |")


if __name__ == "__main__":
    main()
