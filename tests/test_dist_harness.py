"""tests/dist.py's run_ranks itself: what it tolerates and what it does not (real spawned gloo ranks)."""
import atexit
import os
import signal

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dist import run_ranks


def _abort():
    os.kill(os.getpid(), signal.SIGABRT)


def abort_at_exit_case(rank, world):
    if rank == 1:
        atexit.register(_abort)  # runs after run_ranks' final barrier and teardown: as gloo's abort did
    return rank * 10


def abort_before_the_barrier_case(rank, world):
    if rank == 1:
        _abort()
    dist.barrier()
    return rank


def test_a_signal_after_the_final_barrier_keeps_the_results_and_warns():
    with pytest.warns(UserWarning, match="died of SIGABRT in the process group's teardown"):
        assert run_ranks(abort_at_exit_case) == [0, 10]


def test_a_signal_before_the_barrier_fails():
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_ranks(abort_before_the_barrier_case, timeout=120)
