"""Runs a function on 2 gloo ranks on 127.0.0.1 (real torch.distributed, fresh processes), bounded in time.

    results = run_ranks(fn, *args)   # fn(rank, world, *args) -> anything torch.save can write, one per rank

fn must be a module-level function of an importable module (the tests' directory is on the children's path).
A rank that raises fails the caller with the rank's traceback; a run past `timeout` seconds is killed and fails.
A rank killed by a signal before every rank saved its result makes the whole run start once more, with a warning;
a second such death fails (retry=False: the first does). One death is tolerated, with a warning: a rank killed by
a signal after every rank saved its result and passed the final barrier (torch's own teardown of the gloo process
group has been seen to abort there, "terminate called without an active exception", on the 2-core CI machine);
whatever fn did is complete and saved by then.

The ranks start from a forkserver (multiprocessing's "forkserver" start method) that imported torch, lora_ext,
peft, transformers and the tests' helpers once per test session: a rank is a fork of that server, not a fresh
interpreter, which takes about 0.1 s where a spawned one took about 3.5 s on the 2-core CI machine (the files that
use run_ranks took 569 s spawned, 164 s forked). The server imports those modules and nothing else: no process
group, no thread, no CUDA context exists in it, so every rank still starts clean. Each rank gets the caller's
working directory and sys.path from multiprocessing, and its environment variables from the call (_entry), as a
spawned rank would; LORA_EXT_DIST_START=spawn brings the spawned processes back.
"""
import datetime
import multiprocessing
import os
import socket
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# What the forkserver imports once (an import that fails is skipped by multiprocessing, not fatal); the ranks'
# test modules themselves are imported in each rank, by unpickling fn.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor",
            "torch.distributed.checkpoint.state_dict", "torch.nn.parallel", "pytest", "safetensors.torch",
            "lora_ext", "loralib", "peft", "transformers", "helpers", "tiny_models", "dist"]
_START = os.environ.get("LORA_EXT_DIST_START", "forkserver")
if _START not in ("forkserver", "spawn"):
    raise ValueError(f"LORA_EXT_DIST_START must be forkserver or spawn, got {_START!r}")
if _START == "forkserver":
    multiprocessing.set_forkserver_preload(_PRELOAD)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synced(outdir, rank):
    return os.path.join(outdir, f"{rank}.synced")


def _entry(rank, world, port, fn, args, outdir, environ):
    os.environ.clear()  # the caller's environment now, not the forkserver's from the session's first run
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
        dist.barrier()  # every rank's collectives done before any tears its process group down
        open(_synced(outdir, rank), "w").close()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world=2, timeout=240, retry=True):
    """retry=False: a test that expects a rank to die (gloo aborts a rank whose collective the other never joins)."""
    try:
        return _run_once(fn, args, world, timeout)
    except mp.ProcessExitedException as e:
        if e.exit_code >= 0 or not retry:
            raise  # a Python error in a rank (its traceback is in the exception), or an exit status: never retried
        # A signal before every rank had saved its result. gloo's threads have been seen to abort a rank on the
        # 2-core machine ("malloc(): unaligned tcache chunk detected", once in a suite of about 200 runs, never
        # twice in a row, in code that ran clean in 500 other runs); a crash that fn's own code causes comes back.
        warnings.warn(f"{fn.__name__}: rank {e.error_index} died of {e.signal_name} before every rank had saved its "
                      f"result (its stderr is in the test's captured output); running it once more, and failing if "
                      f"a rank dies again")
    return _run_once(fn, args, world, timeout)


def _run_once(fn, args, world, timeout):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args, outdir, dict(os.environ)),
                                 nprocs=world, join=False, start_method=_START)
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
