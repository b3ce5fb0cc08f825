"""lora_ext.ops' backend choice: every public op reaches the kernels through the one stand-in name
(ops.use_kernels), float64 and other devices go to the reference, and a launcher's refusal is worded in this
API's argument names. The simulator stands in for lora_ext._C on CPU tensors."""
import pytest
import torch

from lora_ext import ops

sim = pytest.importorskip("lora_ext._sim")


class Recording:
    """The simulator, recording which of its functions were called."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        fn = getattr(sim, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return call


@pytest.fixture
def kernels():
    rec = Recording()
    with ops.use_kernels(rec, "cpu"):
        yield rec


def _factors(out, k, r, dtype=torch.float32):
    return torch.randn(out, k, dtype=dtype), torch.randn(r, k, dtype=dtype), torch.randn(out, r, dtype=dtype)


def _close(out, ref, tol=1e-5):
    out, ref = out.double(), ref.double()
    assert ((out - ref).norm() / ref.norm()).item() < tol


def test_every_op_reaches_the_stand_in(kernels):
    w, A, B = _factors(24, 20, 4)
    w0 = w.double().clone()
    ops.merge_(w, A, B, 0.5)
    _close(w, w0 + 0.5 * B.double() @ A.double())
    A2, B2 = torch.randn(6, 20), torch.randn(24, 6)
    ops.swap_(w, A, B, 0.5, A2, B2, 2.0)
    _close(w, w0 + 2.0 * B2.double() @ A2.double())
    d = ops.delta_weight(A, B, 0.25, out_features=24)
    _close(d, 0.25 * B.double() @ A.double())
    x = torch.randn(3, 20)
    y = ops.linear(x, x, w0.float(), None, A, B, 0.5)
    _close(y, x.double() @ (w0 + 0.5 * B.double() @ A.double()).t())
    emb, Ae, Be = torch.randn(10, 8), torch.randn(4, 10), torch.randn(8, 4)
    ids = torch.tensor([[1, 9], [0, 3]])
    e = ops.embedding(ids, emb, Ae, Be, 0.5)
    _close(e, (emb.double() + 0.5 * (Be.double() @ Ae.double()).t())[ids])
    assert kernels.calls == ["merge_", "swap_", "delta_weight_", "linear", "embedding"]


def test_autograd_and_compile_paths_use_the_same_implementation(kernels):
    w, A, B = _factors(12, 8, 2)
    A.requires_grad_()
    x = torch.randn(5, 8)
    y = ops.linear(x, x, w, None, A, B, 0.5)  # autograd records the custom op, which calls the stand-in
    y.sum().backward()
    assert kernels.calls == ["linear"]
    assert A.grad is not None and torch.isfinite(A.grad).all()
    B.requires_grad_()
    d = ops.delta_weight(A, B, 1.0, out_features=12)
    d.sum().backward()
    assert kernels.calls == ["linear", "delta_weight_"]


def test_float64_goes_to_the_reference(kernels):
    w, A, B = _factors(12, 8, 2, torch.float64)
    ops.merge_(w, A, B, 0.5)
    x = torch.randn(2, 8, dtype=torch.float64)
    ops.linear(x, x, w, None, A, B, 0.5)
    ops.delta_weight(A, B, 1.0, out_features=12)
    assert kernels.calls == []


def test_no_kernels_means_reference():
    w, A, B = _factors(12, 8, 2)
    with ops.use_kernels(None, "cpu") as k:
        assert not k.takes(w)
        w0 = w.double().clone()
        ops.merge_(w, A, B, 1.0)
    _close(w, w0 + B.double() @ A.double())


def test_use_kernels_restores_the_previous_backend():
    before = ops._kernels
    with pytest.raises(RuntimeError):
        with ops.use_kernels(sim, "cpu"):
            assert ops._kernels.takes(torch.zeros(1))
            raise RuntimeError("leave the context")
    assert ops._kernels is before


@pytest.mark.parametrize("op", ["merge_", "swap_", "linear", "embedding"])
def test_a_launcher_refusal_names_the_argument(kernels, op):
    """On the fast path the launcher checks first; its refusal is reworded by the Python checks, and nothing
    is written."""
    w, A, B = _factors(12, 8, 2)
    bad_B = torch.randn(12, 3)  # rank 3 against A's rank 2
    w0 = w.clone()
    with pytest.raises(ValueError, match="lora_B|new_B"):
        if op == "merge_":
            ops.merge_(w, A, bad_B, 1.0)
        elif op == "swap_":
            ops.swap_(w, A, B, 1.0, A, bad_B, 1.0)
        elif op == "linear":
            x = torch.randn(2, 8)
            ops.linear(x, x, w, None, A, bad_B, 1.0)
        else:
            ops.embedding(torch.tensor([1]), torch.randn(10, 12), torch.randn(2, 10), bad_B, 1.0)
    assert torch.equal(w, w0)
    assert kernels.calls == [op]


def test_integer_factors_are_refused_not_converted(kernels):
    w, A, B = _factors(12, 8, 2)
    w0 = w.clone()
    with pytest.raises(ValueError, match="lora_A must be float16, bfloat16, float32 or float64"):
        ops.merge_(w, A.to(torch.int32), B, 1.0)
    assert torch.equal(w, w0)


def test_swap_with_a_missing_factor_names_it(kernels):
    w, A, B = _factors(12, 8, 2)
    with pytest.raises(TypeError, match="new_B must be a torch.Tensor"):
        ops.swap_(w, A, B, 1.0, A, None, 1.0)
    assert kernels.calls == []
