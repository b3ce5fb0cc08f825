"""Fixtures and hooks only; the shared helpers (oracles, tolerances, kernel cases, markers) are in helpers.py.

Tests that need a CUDA device carry the `gpu` marker and reach the device through the `cuda` fixture. With
`--sim-as-cuda` (or LORA_EXT_SIM_AS_CUDA=1) they rehearse on the CPU: `cuda.device` is the CPU and the
simulator lora_ext._sim stands in for lora_ext._C, so their bodies run before a GPU is ever booked. Those
that need the hardware itself (streams, graphs, memory statistics, timing) also carry
`@pytest.mark.hardware("why")` and are skipped in a rehearsal, saying why, though still collected.
"""
import gc
import os
import signal
import sys

# the tests never reach the network: a Hub id (lora_ext/serving/hub.py) resolves from the cache or fails at once
# (huggingface_hub reads this when it is first imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread (here and in the processes the tests start), unless the caller chose: the tests' tensors are
# tiny, and two OpenMP threads on a machine whose other core is busy (CI builds the kernels beside the tests) waited
# for each other at every op: 10,000 switches of a 32 x 24 layer took 60 s instead of 7. Tests of threaded paths set
# their own count (torch.set_num_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# (torch and lora_ext are imported where a test needs them, not here: the crash-safe runner's tests start pytest over
# small projects with this conftest many times, and torch's import was most of each start)

SIM_AS_CUDA_ENV = "LORA_EXT_SIM_AS_CUDA"


def pytest_addoption(parser):
    parser.addoption(
        "--sim-as-cuda", action="store_true", default=False,
        help="run the tests marked gpu on the CPU, with the simulator lora_ext._sim standing in for lora_ext._C "
             f"(tests also marked hardware are skipped); the same as {SIM_AS_CUDA_ENV}=1",
    )
    parser.addoption(
        "--resume-after", metavar="NODEID", default=None,
        help="run only the tests collected after NODEID (a test's node id; a parametrized test's without its "
             "parameters: after every case): bench/crash_safe.sh resumes a run that a crash in that test ended",
    )


def sim_as_cuda_requested(config) -> bool:
    """--sim-as-cuda, or LORA_EXT_SIM_AS_CUDA=1 (0 or empty: off)."""
    value = os.environ.get(SIM_AS_CUDA_ENV, "")
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{SIM_AS_CUDA_ENV} must be 1 (on) or 0 (off), not {value!r}")
    return config.getoption("--sim-as-cuda") or value == "1"


def pytest_configure(config):
    config._lora_ext_sim_as_cuda = sim_as_cuda_requested(config)


def pytest_report_header(config):
    if config._lora_ext_sim_as_cuda:
        return "lora_ext: --sim-as-cuda: gpu tests run on the CPU through lora_ext._sim (hardware tests skipped)"
    return None


def pytest_collection_finish(session):
    # Every test module is imported now, and with them torch, transformers and peft: hundreds of thousands of objects
    # that live to the end. Frozen, the cyclic collector no longer walks them at each full collection (0.2-0.3 s
    # each, and the tests trigger many) nor at each gc.collect() a test makes. Objects the tests make are collected
    # as ever. (lora_ext's one look for the modules made before its import runs first: frozen objects are out of
    # its sight, and it would say so.)
    ties = sys.modules.get("lora_ext.ties")
    if ties is not None:
        with ties._lock:
            ties._look()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs on every run, reproducible from the printed test id and seed on failure. (A test module
    # imports torch before its tests run; one that does not has nothing to seed.)
    torch = sys.modules.get("torch")
    if torch is not None:
        seed = torch.seed() % (2**31)
        torch.manual_seed(seed)
        request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture(autouse=True)
def _grad_mode_kept():
    # A test that leaves autograd off (an exception landing in torch.no_grad()'s exit, on purpose) would make every
    # later test's backward fail far from the cause: it fails itself, and the mode is put back.
    torch = sys.modules.get("torch")
    before = torch.is_grad_enabled() if torch is not None else None
    yield
    if torch is not None and before is not None and torch.is_grad_enabled() != before:
        torch.set_grad_enabled(before)
        pytest.fail(f"the test left autograd {'on' if before is False else 'off'} (it was "
                    f"{'on' if before else 'off'} before it)")


@pytest.fixture(autouse=True)
def _default_sim_schedule():
    # A test may shuffle the simulator's thread order; the next one starts from the default order.
    yield
    sim = sys.modules.get("lora_ext._sim")  # (a test that never imported it changed no schedule)
    if sim is not None:
        sim.set_schedule(None)


@pytest.fixture
def sim_as_cuda():
    """Routes lora_ext.ops' kernel branch to the simulator (the same functions and C++ checks as lora_ext._C)
    for CPU tensors, so that CI runs the code a GPU runs between ops and the launchers."""
    from lora_ext import ops
    sim = pytest.importorskip("lora_ext._sim")
    with ops.use_kernels(sim, "cpu"):
        yield sim


class CudaTarget:
    """Where a `gpu` test runs. On a GPU: `device` is cuda, `kernels` is lora_ext._C, `synchronize()` waits
    for the device. In a rehearsal (--sim-as-cuda): `device` is the CPU, `kernels` is lora_ext._sim (routed to
    by lora_ext.ops for CPU tensors while the test runs) and `synchronize()` does nothing. `other` is a device
    the kernels do not take (the CPU on a GPU, `meta` in a rehearsal), for tests of device mismatches."""

    def __init__(self, device, kernels, other, rehearsal):
        import torch
        self.device = torch.device(device)
        self.kernels = kernels
        self.other = torch.device(other)
        self.rehearsal = rehearsal

    def synchronize(self):
        if not self.rehearsal:
            import torch
            torch.cuda.synchronize()

    def __repr__(self):
        return f"CudaTarget({self.device}, {self.kernels.__name__}, rehearsal={self.rehearsal})"


@pytest.fixture(params=["reference", "kernels"])
def backend(request):
    """The reference backend, or the CUDA kernels' host code and kernels (the simulator standing in for _C, on the
    CPU). Modules that parametrize or define their own `backend` override it."""
    if request.param == "reference":
        yield None
        return
    from helpers import load_sim
    from lora_ext import ops
    sim = load_sim()
    if sim is None:
        pytest.skip("lora_ext._sim is not built")
    with ops.use_kernels(sim, "cpu"):
        yield sim


@pytest.fixture
def cuda(request):
    """The device of a `gpu` test (see CudaTarget); skips when the kernels it stands for were not built."""
    from lora_ext import ops
    if request.config._lora_ext_sim_as_cuda:
        sim = pytest.importorskip("lora_ext._sim", reason="--sim-as-cuda needs lora_ext._sim (not built)")
        with ops.use_kernels(sim, "cpu"):
            yield CudaTarget("cpu", sim, "meta", rehearsal=True)
        return
    if not ops.cuda_kernels_available():
        pytest.skip("needs lora_ext built with its CUDA kernels (lora_ext._C)")
    yield CudaTarget("cuda", ops._C, "cpu", rehearsal=False)


CURRENT_TEST_ENV = "LORA_EXT_CURRENT_TEST"


def pytest_runtest_logstart(nodeid, location):
    """With LORA_EXT_CURRENT_TEST set to a file: the node id of the test starting (set-up, call and teardown
    to come) written there, so that bench/crash_safe.sh can name a test that crashes pytest."""
    path = os.environ.get(CURRENT_TEST_ENV)
    if path:
        with open(path, "w") as f:
            f.write(nodeid)


def _resume_after(config, items):
    """--resume-after: drops every test up to the one named, or up to the last case of a parametrized test named
    without its parameters (collection order is the run's)."""
    name = config.getoption("--resume-after")
    if name is None:
        return
    hits = [i for i, item in enumerate(items) if item.nodeid == name or item.nodeid.startswith(name + "[")]
    if not hits:
        raise pytest.UsageError(f"--resume-after {name}: no such test was collected")
    config.hook.pytest_deselected(items=items[:hits[-1] + 1])
    del items[:hits[-1] + 1]


def pytest_collection_modifyitems(config, items):
    _resume_after(config, items)
    # One place for the `gpu` and `hardware` markers (registered in pyproject.toml). bench/gpu_check.sh selects
    # the gpu tests with `-m gpu`, and its dry run rehearses them with `-m gpu --sim-as-cuda`.
    for item in items:
        if item.get_closest_marker("hardware") is not None and item.get_closest_marker("gpu") is None:
            raise pytest.UsageError(f"{item.nodeid}: the hardware marker goes with the gpu marker")
    if config._lora_ext_sim_as_cuda:
        for item in items:
            hardware = item.get_closest_marker("hardware")
            if hardware is not None:
                why = hardware.args[0] if hardware.args else "needs a real CUDA device"
                item.add_marker(pytest.mark.skip(reason=f"hardware: {why}; not rehearsed by --sim-as-cuda"))
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False); "
                                   "--sim-as-cuda rehearses it on the CPU")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test (a KeyboardInterrupt), whatever the runner installed (a background
    job ignores SIGINT); the runner's handler back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
