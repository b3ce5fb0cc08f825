"""tests/dist.py's run_ranks itself: what it tolerates and what it does not (real gloo ranks)."""
import multiprocessing.util
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist import run_ranks


def _abort():
    os.kill(os.getpid(), signal.SIGABRT)


def abort_at_exit_case(rank, world):
    if rank == 1:
        # runs as the rank's process exits, after run_ranks' final barrier and teardown: as gloo's abort did (a
        # multiprocessing finalizer, not atexit: a rank forked from the forkserver leaves by os._exit)
        multiprocessing.util.Finalize(None, _abort, exitpriority=0)
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
    with pytest.warns(UserWarning, match="died of SIGABRT before every rank had saved its result.*once more"):
        with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
            run_ranks(abort_before_the_barrier_case, timeout=120)


def test_retry_false_fails_on_the_first_signal(tmp_path):
    marker = str(tmp_path / "tried")
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_ranks(abort_on_the_first_try_case, marker, retry=False)
    assert os.path.exists(marker)


def abort_on_the_first_try_case(rank, world, marker):
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        _abort()
    dist.barrier()
    return rank


def test_a_signal_before_the_barrier_on_the_first_try_only_runs_it_once_more(tmp_path):
    marker = str(tmp_path / "tried")
    with pytest.warns(UserWarning, match="died of SIGABRT before every rank had saved its result.*once more"):
        assert run_ranks(abort_on_the_first_try_case, marker) == [0, 1]
    assert os.path.exists(marker)


def raise_case(rank, world, marker):
    with open(marker, "a") as f:
        f.write(f"{rank}\n")
    raise ValueError(f"rank {rank} raised")


def test_a_python_error_in_a_rank_is_not_run_again(tmp_path):
    marker = tmp_path / "runs"
    with pytest.raises(mp.ProcessRaisedException, match="ValueError: rank . raised"):
        run_ranks(raise_case, str(marker))
    assert len(marker.read_text().split()) <= 2  # one try: each rank at most once


def environment_case(rank, world):
    return os.environ.get("LORA_EXT_DIST_PROBE"), os.getcwd(), torch.get_num_threads()


def test_a_rank_sees_the_callers_environment_and_directory_of_each_call(monkeypatch, tmp_path):
    # The forkserver starts at the session's first run with the environment and directory of that moment; each
    # run's ranks must still see the caller's at the time of the call, as spawned ranks do.
    run_ranks(environment_case)  # the server runs from here on, whatever started it
    for value in ("first", "second"):
        where = tmp_path / value
        where.mkdir()
        monkeypatch.setenv("LORA_EXT_DIST_PROBE", value)
        monkeypatch.chdir(where)
        assert run_ranks(environment_case) == [(value, str(where), 1)] * 2
    monkeypatch.delenv("LORA_EXT_DIST_PROBE")
    assert [r[0] for r in run_ranks(environment_case)] == [None, None]
