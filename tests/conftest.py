"""Shared test helpers: float64 oracles written independently of lora_ext, and error measures."""
import torch
import pytest

# ||out - ref|| / ||ref|| bounds by dtype (DESIGN.md, Numerics).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out, ref):
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert not torch.isnan(out).any(), "output holds NaN"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_rel(out, ref, dtype, factor=1.0):
    err = rel_err(out, ref)
    assert err < TOL[dtype] * factor, f"relative error {err:.3g} over {TOL[dtype] * factor:.3g} ({dtype})"


def dense_delta64(lora_A, lora_B, num_blocks, block_ids, out_features):
    """scale-free delta-W in the layer's logical (out, in) layout, float64, zero outside enabled blocks."""
    A = lora_A.detach().to(torch.float64)
    B = lora_B.detach().to(torch.float64)
    n = len(block_ids)
    r, nb = A.shape[0] // n, out_features // num_blocks
    delta = torch.zeros(out_features, A.shape[1], dtype=torch.float64)
    for j, e in enumerate(block_ids):
        delta[e * nb:(e + 1) * nb] = B[j * nb:(j + 1) * nb] @ A[j * r:(j + 1) * r]
    return delta


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
def sim_as_cuda(monkeypatch):
    """Routes lora_ext.ops' CUDA branch to the simulator (the same functions and C++ checks as lora_ext._C)
    for CPU tensors, so that CI runs the code a GPU runs between ops and the launchers."""
    from lora_ext import ops, reference
    sim = pytest.importorskip("lora_ext._sim")
    monkeypatch.setattr(ops, "_C", sim)
    monkeypatch.setattr(ops, "_backend_for", lambda t: sim if t.dtype is not torch.float64 else reference)
    return sim
