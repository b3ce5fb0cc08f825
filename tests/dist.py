"""Runs a function on 2 gloo ranks on 127.0.0.1 (real torch.distributed, spawned processes), bounded in time.

    results = run_ranks(fn, *args)   # fn(rank, world, *args) -> anything torch.save can write, one per rank

fn must be a module-level function of an importable module (the tests' directory is on the children's path).
A rank that raises fails the caller with the rank's traceback; a run past `timeout` seconds is killed and fails.
One death is tolerated, with a warning: a rank killed by a signal after every rank saved its result and passed
the final barrier (torch's own teardown of the gloo process group has been seen to abort there, "terminate
called without an active exception", on the 2-core CI machine); whatever fn did is complete and saved by then.
"""
import datetime
import os
import socket
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synced(outdir, rank):
    return os.path.join(outdir, f"{rank}.synced")


def _entry(rank, world, port, fn, args, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
        dist.barrier()  # every rank's collectives done before any tears its process group down
        open(_synced(outdir, rank), "w").close()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world=2, timeout=240):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args, outdir), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"{fn.__name__} on {world} ranks ran past {timeout} s")
        except mp.ProcessExitedException as e:
            if e.exit_code >= 0 or not all(os.path.exists(_synced(outdir, r)) for r in range(world)):
                raise
            warnings.warn(f"{fn.__name__}: rank {e.error_index} died of {e.signal_name} in the process group's "
                          f"teardown, after every rank had saved its result and passed the final barrier")
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(world)]
