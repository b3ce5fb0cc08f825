"""Fixtures and hooks only; the shared helpers (oracles, tolerances, kernel cases, markers) are in helpers.py."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs on every run, reproducible from the printed test id and seed on failure.
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture(autouse=True)
def _default_sim_schedule():
    # A test may shuffle the simulator's thread order; the next one starts from the default order.
    yield
    try:
        from lora_ext import _sim
    except ImportError:
        return
    _sim.set_schedule(None)


@pytest.fixture
def sim_as_cuda():
    """Routes lora_ext.ops' kernel branch to the simulator (the same functions and C++ checks as lora_ext._C)
    for CPU tensors, so that CI runs the code a GPU runs between ops and the launchers."""
    from lora_ext import ops
    sim = pytest.importorskip("lora_ext._sim")
    with ops.use_kernels(sim, "cpu"):
        yield sim


def pytest_collection_modifyitems(config, items):
    # One place for the `gpu` marker (registered in pyproject.toml): where there is no CUDA device, every test
    # that needs one is skipped, and says why. bench/gpu_check.sh selects them with `-m gpu`.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
