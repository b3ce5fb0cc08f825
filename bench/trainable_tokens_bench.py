"""Cost of serving an adapter's rows of tokens (peft's trainable_token_indices) at lookup, side by side in one
process: the plain embedding, lora_ext's TokenRows (the lookup, then the listed tokens' rows put in its output) and
peft's TrainableTokensLayer (a copy of the whole weight with the rows written, every call), median of repeats.

    .venv/bin/python bench/trainable_tokens_bench.py [--vocab 32000] [--dim 4096] [--tokens 4096] [--rows 16]
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn


def _time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from lora_ext.serving.tokens import TokenRows

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    emb = nn.Embedding(args.vocab, args.dim).to(dtype)
    indices = torch.randperm(args.vocab)[:args.rows].tolist()
    values = torch.randn(args.rows, args.dim, dtype=dtype)
    ours = TokenRows(emb, indices, values.clone())
    theirs = TrainableTokensLayer(emb, "a")
    theirs.update_layer("a", token_indices=indices)
    with torch.no_grad():
        theirs.trainable_tokens_delta["a"].copy_(values)
    ids = torch.randint(0, args.vocab, (1, args.tokens))
    ids[0, ::7] = torch.tensor(indices).repeat(args.tokens // 7 // args.rows + 1)[:ids[0, ::7].numel()]
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids))
        results = {}
        for _ in range(2):  # two rounds, alternated
            for name, fn in (("plain", lambda: emb(ids)), ("lora_ext", lambda: ours(ids)),
                             ("peft", lambda: theirs(ids))):
                results.setdefault(name, []).append(_time(fn, args.repeats))
    plain = min(results["plain"])
    print(f"vocab {args.vocab}, dim {args.dim}, {args.tokens} tokens, {args.rows} rows, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    for name, times in results.items():
        best = min(times)
        print(f"  {name:9s} {best * 1e3:8.3f} ms   {best / plain:6.2f}x plain")


if __name__ == "__main__":
    main()
