"""Merge of a sharded weight on 2 gloo ranks (127.0.0.1) against the unsharded merge in one process: a
lora_ext.Linear(dim, dim, r=16) merged and unmerged (eval() then train()), its weight column-parallel
(lora_ext.parallel.ColwiseLoRA: each rank holds half the rows) or FSDP2-sharded (fully_shard), and the bytes
each rank sends during the merge (gloo's all-reduce/all-gather traffic is not counted by torch: the factors'
sizes are reported instead, from what the merge gathers).

    python bench/sharded_merge.py [dim] [repeats]        # prints a Markdown table
"""
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_ext as lora  # noqa: E402


def layer(dim, dtype):
    torch.manual_seed(0)
    m = lora.Linear(dim, dim, r=16, lora_alpha=32).to(dtype)
    torch.nn.init.normal_(m.lora_B, std=0.01)
    m.requires_grad_(False)
    return m


def cycle_ms(m, repeats):
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        m.eval()
        m.train()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _rank(rank, world, port, dim, repeats, dtype_name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseLoRA
    dtype = getattr(torch, dtype_name)
    mesh = init_device_mesh("cpu", (world,))
    res = {}
    m = layer(dim, dtype)
    parallelize_module(m, mesh, ColwiseLoRA())
    res["local"] = tuple(m.weight.to_local().shape)
    res["tp"] = cycle_ms(m, repeats)
    m = layer(dim, dtype)
    fully_shard(m)
    res["fsdp"] = cycle_ms(m, repeats)
    torch.save(res, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def main(dim=4096, repeats=5, dtype_name="bfloat16"):
    torch.set_num_threads(1)
    single = cycle_ms(layer(dim, getattr(torch, dtype_name)), repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(2, port, dim, repeats, dtype_name, out), nprocs=2, start_method="spawn")
        ranks = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(2)]
    factors = 16 * 2 * dim * 4  # the fp32 factors a merge gathers (FSDP2) or already holds (tensor parallel)
    print(f"merge + unmerge cycle of a {dtype_name} Linear({dim}, {dim}) r=16, lossless (the default), 1 thread "
          f"per process, median of {repeats}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| setup | weight rows per rank | ms per cycle (rank 0, rank 1) | ratio to one process | moved per rank |")
    print("|---|---:|---:|---:|---|")
    print(f"| one process, whole weight | {dim} | {single:.1f} | 1.00 | nothing |")
    print(f"| 2 ranks, ColwiseLoRA | {ranks[0]['local'][0]} | {ranks[0]['tp']:.1f}, {ranks[1]['tp']:.1f} | "
          f"{max(r['tp'] for r in ranks) / single:.2f} | nothing (factors replicated) |")
    print(f"| 2 ranks, fully_shard | {dim // 2} | {ranks[0]['fsdp']:.1f}, {ranks[1]['fsdp']:.1f} | "
          f"{max(r['fsdp'] for r in ranks) / single:.2f} | the factors, gathered: {factors / 2**20:.2f} MiB "
          f"({factors / (dim * dim * 2):.1%} of the weight) |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
