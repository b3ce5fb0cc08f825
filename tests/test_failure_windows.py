"""Failures after a kernel pass wrote the weight: between the lossless pass and its record (the counter read, the
sort of the exception list, the record itself), out of memory or Ctrl-C left W merged while the op raised and the
layer counted itself unmerged: its next merge added the adapter a second time. Now the op takes the pass back (a
merge leaves the base, a swap merges the old adapter back) before the error goes on.

The kernel backend is the simulator (lora_ext._sim) on the CPU. Exceptions are made certain without the code under
test: +-inf weights always need one. Expected weights are the inputs themselves or a fresh simulator merge.
"""
import functools

import pytest
import torch

import lora_ext
from helpers import FailingRecord, RecordingKernels, load_sim, requires_sim, same_bits, small_adapter, weight_with_infs
from lora_ext import lossless, ops

_sim = load_sim()
OUT, IN = 40, 148  # 5920 elements: the kernels' first room is 1024 exceptions, the limit 1480


_same = same_bits
_weight = functools.partial(weight_with_infs, OUT, IN)  # (infs, dtype=bfloat16, seed=0)
_adapter = functools.partial(small_adapter, OUT, IN)  # (seed, r=4, mag=0.05)


_FailingRecord = FailingRecord  # (ops.MergeRecord: the step after the sort)


def _failing_argsort(exc):
    real = torch.argsort
    state = {"n": 0}

    def argsort(*args, **kwargs):
        state["n"] += 1
        if state["n"] == 1:
            raise exc
        return real(*args, **kwargs)
    return argsort


ERRORS = [RuntimeError("CUDA out of memory"), KeyboardInterrupt()]


@requires_sim
@pytest.mark.parametrize("infs", [40, 1200], ids=["in_the_room", "past_the_room"])
@pytest.mark.parametrize("where", ["sort", "record"])
@pytest.mark.parametrize("exc", ERRORS, ids=type)
def test_a_merge_whose_record_fails_leaves_the_base(monkeypatch, exc, where, infs):
    w0 = _weight(infs)
    a, b = _adapter(1)
    w = w0.clone()
    if where == "sort":
        monkeypatch.setattr(torch, "argsort", _failing_argsort(exc))
    else:
        monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(exc))
    seen = RecordingKernels(weight=w)
    with ops.use_kernels(seen, "cpu"), pytest.raises(type(exc)):
        ops.merge_(w, a, b, 0.5, lossless=True)
    assert _same(w, w0)
    assert seen.calls[:2] == ["merge_lossless_", "unmerge_lossless_"]
    assert not _same(seen.after[0], w0)  # the pass had written W (the test's premise)
    monkeypatch.undo()
    with ops.use_kernels(_sim, "cpu"):  # and the op works again: a merge then unmerge round trip
        rec = ops.merge_(w, a, b, 0.5, lossless=True)
        assert rec.exceptions == infs
        ops.unmerge_(w, a, b, 0.5, record=rec)
    assert _same(w, w0)


@requires_sim
@pytest.mark.parametrize("infs", [40, 1200], ids=["in_the_room", "past_the_room"])
@pytest.mark.parametrize("exc", ERRORS, ids=type)
def test_a_swap_whose_record_fails_merges_the_old_adapter_back(monkeypatch, exc, infs):
    w0 = _weight(infs)
    old, new = _adapter(1) + (0.5,), _adapter(2) + (-0.75,)
    w = w0.clone()
    with ops.use_kernels(_sim, "cpu"):
        rec = ops.merge_(w, *old, lossless=True)
    before = w.clone()
    monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(exc))
    seen = RecordingKernels()
    with ops.use_kernels(seen, "cpu"), pytest.raises(type(exc)) as err:
        ops.swap_(w, *old, *new, record=rec)
    monkeypatch.undo()
    assert seen.calls[:3] == ["swap_lossless_", "unmerge_lossless_", "merge_lossless_"]
    assert _same(w, before)  # the old merge, bit for bit (made on this backend)
    assert not getattr(err.value, "weight_is_base", False)
    with ops.use_kernels(_sim, "cpu"):
        ops.unmerge_(w, *old, record=err.value.record)
    assert _same(w, w0)


@requires_sim
@pytest.mark.parametrize("op", ["merge", "swap"])
def test_a_rerun_whose_record_fails_is_taken_back_too(monkeypatch, op):
    """Past the room: the first pass is undone and rerun; the rerun's record (the second one made) fails."""
    w0 = _weight(1200)
    old, new = _adapter(1) + (0.5,), _adapter(2) + (-0.75,)
    w = w0.clone()
    rec = None
    if op == "swap":
        with ops.use_kernels(_sim, "cpu"):
            rec = ops.merge_(w, *old, lossless=True)
    before = w.clone()
    failing = _FailingRecord(RuntimeError("CUDA out of memory"), fail_at=2)
    monkeypatch.setattr(ops, "MergeRecord", failing)
    seen = RecordingKernels()
    with ops.use_kernels(seen, "cpu"), pytest.raises(RuntimeError, match="out of memory") as err:
        if op == "swap":
            ops.swap_(w, *old, *new, record=rec)
        else:
            ops.merge_(w, *new, lossless=True)
    monkeypatch.undo()
    first = "swap_lossless_" if op == "swap" else "merge_lossless_"
    assert seen.calls[:4] == [first, "unmerge_lossless_", "merge_lossless_", "unmerge_lossless_"]
    assert failing.made >= 2
    assert _same(w, before)
    if op == "swap":
        with ops.use_kernels(_sim, "cpu"):
            ops.unmerge_(w, *old, record=err.value.record)
        assert _same(w, w0)


@requires_sim
def test_a_take_back_that_fails_too_says_so_on_the_error(monkeypatch):
    """The record fails, then the unmerge that would take the pass back: the error carries a note saying the weight
    holds the new merge without a record, and a swap does not merge the old adapter on top of it."""
    w0 = _weight(40)
    old, new = _adapter(1) + (0.5,), _adapter(2) + (-0.75,)
    w = w0.clone()
    with ops.use_kernels(_sim, "cpu"):
        rec = ops.merge_(w, *old, lossless=True)
    monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(RuntimeError("CUDA out of memory")))
    seen = RecordingKernels(fail_at=2, exc=RuntimeError("CUDA error: an illegal memory access"))
    with ops.use_kernels(seen, "cpu"), pytest.raises(RuntimeError, match="out of memory") as err:
        ops.swap_(w, *old, *new, record=rec)
    assert seen.calls == ["swap_lossless_", "unmerge_lossless_"]
    notes = getattr(err.value, "__notes__", [])
    assert len(notes) == 1 and "swap_" in notes[0] and "without a lossless record" in notes[0]
    assert "illegal memory access" in notes[0]


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["merge", "swap"])
def test_cuda_a_pass_whose_record_fails_is_taken_back(cuda, monkeypatch, op):
    """On the device: the take-back sorts the pass's exception list on the host and copies it back in place (no
    device memory); the weight, bit for bit as before (a swap: the old merge, made on this backend)."""
    w0 = _weight(1200).to(cuda.device)
    (a1, b1), (a2, b2) = _adapter(1), _adapter(2)
    old = (a1.to(cuda.device), b1.to(cuda.device), 0.5)
    new = (a2.to(cuda.device), b2.to(cuda.device), -0.75)
    w = w0.clone()
    rec = ops.merge_(w, *old, lossless=True) if op == "swap" else None
    before = w.clone()
    monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(RuntimeError("CUDA out of memory (injected)")))
    with pytest.raises(RuntimeError, match="injected"):
        if op == "swap":
            ops.swap_(w, *old, *new, record=rec)
        else:
            ops.merge_(w, *new, lossless=True)
    monkeypatch.undo()
    cuda.synchronize()
    assert _same(w.cpu(), before.cpu())


def _layer(w0, adapters):
    layer = lora_ext.Linear(IN, OUT, r=4, lora_alpha=4, lossless=True).to(w0.dtype).requires_grad_(False)
    (a, b, s), rest = adapters[0], adapters[1:]
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    layer.scaling = s
    for i, (a, b, s) in enumerate(rest):
        layer.add_adapter(f"a{i + 1}", a.to(w0.dtype), b.to(w0.dtype), s)
    return layer


@requires_sim
@pytest.mark.parametrize("exc", ERRORS, ids=type)
def test_a_layer_merge_whose_record_fails_stays_unmerged_on_the_base(monkeypatch, exc):
    """Before: eval() raised, the layer unmerged, W merged; the next eval() merged the adapter a second time."""
    w0 = _weight(40)
    layer = _layer(w0, [_adapter(1) + (1.0,)])
    x = torch.randn(3, IN).to(w0.dtype)
    monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(exc))
    with ops.use_kernels(_sim, "cpu"), pytest.raises(type(exc)):
        layer.eval()
    monkeypatch.undo()
    assert not layer.merged and _same(layer.weight.detach(), w0)
    with ops.use_kernels(_sim, "cpu"):
        unmerged = layer(x)
        layer.eval()  # merges once
        assert layer.merged
        torch.testing.assert_close(layer(x).float(), unmerged.float(), atol=0.06, rtol=0.02, equal_nan=True)
        layer.train()
    assert _same(layer.weight.detach(), w0)


@requires_sim
def test_a_layer_switch_whose_record_fails_keeps_the_old_adapter_merged(monkeypatch):
    w0 = _weight(40)
    layer = _layer(w0, [_adapter(1) + (1.0,), _adapter(2) + (2.0,)])
    with ops.use_kernels(_sim, "cpu"):
        layer.eval()
    merged = layer.weight.detach().clone()
    monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(RuntimeError("CUDA out of memory")))
    with ops.use_kernels(_sim, "cpu"), pytest.raises(RuntimeError, match="out of memory"):
        layer.set_adapter("a1")
    monkeypatch.undo()
    assert layer.active_adapter == "default" and layer.merged
    assert _same(layer.weight.detach(), merged)
    with ops.use_kernels(_sim, "cpu"):
        layer.set_adapter("a1")  # works now
        layer.train()
    assert _same(layer.weight.detach(), w0)


# ---------------------------------------------------------------------------------------------------------------
# sharded weights on 2 gloo ranks: an error (not a refusal) in one part on one rank. Before: that rank raised
# without reaching the agreement the other ranks waited in (they hung until the process group's timeout, or paired
# it with the failed rank's next collective), and the parts it had written stayed written while its layer counted
# itself unmerged. Now every rank puts its parts back and raises; its own error, or one naming the other rank.


def _sharded_layer(style):
    """A lossless float32 MergedLinear whose local shard holds several parts (FSDP2: rows 0:12 and 12:24 each meet
    two of the 8-row blocks), or one strided part (ColwiseLoRA(blocks=3)); an adapter "b" beside the live one."""
    torch.manual_seed(0)
    layer = lora_ext.MergedLinear(16, 24, r=2, lora_alpha=2, enable_lora=[True, True, True], lossless=True)
    torch.nn.init.normal_(layer.lora_B, std=0.2)
    g = torch.Generator().manual_seed(3)
    (ra, ca), (rb, cb) = layer.factor_shapes(2)
    layer.add_adapter("b", torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 1.5)
    if style == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(layer)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from lora_ext.parallel import ColwiseLoRA
        layer = parallelize_module(layer, init_device_mesh("cpu", (2,)), ColwiseLoRA(blocks=3))
    return layer


def _local_bits(layer):
    return layer.weight.detach().to_local().clone().view(torch.int32)


def sharded_failure_case(rank, world, style, op, fail_rank, mode):
    layer = _sharded_layer(style)
    base = _local_bits(layer)
    if op in ("switch", "unmerge"):
        layer.eval()
    before = _local_bits(layer)
    name = {"switch": "swap_", "merge": "merge_", "unmerge": "unmerge_"}[op]
    real = getattr(ops, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if rank == fail_rank and len(calls) == (2 if style == "fsdp" else 1):
            err = RuntimeError("CUDA out of memory (injected)")
            if mode == "base":  # ops.swap_ whose merge-back failed too: this part holds the base
                w, oA, oB, os_ = args[:4]
                layout = {k: v for k, v in kwargs.items() if k in ("num_blocks", "block_ids", "transposed")}
                ops.unmerge_(w, oA, oB, os_, record=kwargs["record"], **layout)
                err.weight_is_base = True
            raise err
        return real(*args, **kwargs)

    setattr(ops, name, failing)
    out = {}
    try:
        if op == "switch":
            layer.set_adapter("b")
        elif op == "unmerge":
            layer.train()
        else:
            layer.eval()
        out["error"] = None
    except BaseException as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        out["weight_is_base"] = getattr(e, "weight_is_base", False)
    finally:
        setattr(ops, name, real)
    out.update(calls=len(calls), merged=layer.merged, active=layer.active_adapter,
               is_before=torch.equal(_local_bits(layer), before), is_base=torch.equal(_local_bits(layer), base))
    layer.train()  # and the layer goes on: unmerged, the base bit for bit; a merge and a switch work
    out["train_base"] = torch.equal(_local_bits(layer), base)
    layer.eval()
    layer.set_adapter("b")
    layer.train()
    out["cycle_base"] = torch.equal(_local_bits(layer), base)
    return out


@pytest.mark.parametrize("style,op,mode", [("fsdp", "merge", "back"), ("fsdp", "switch", "back"),
                                           ("fsdp", "switch", "base"), ("fsdp", "unmerge", "back"),
                                           ("tp", "merge", "back"), ("tp", "switch", "back"),
                                           ("tp", "switch", "base"), ("tp", "unmerge", "back")])
def test_an_error_in_one_part_on_one_rank_puts_every_rank_back(style, op, mode):
    from dist import run_ranks
    results = run_ranks(sharded_failure_case, style, op, 1, mode, timeout=150)
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank}: no error"
        if rank == 1:
            assert r["error"].startswith("RuntimeError: CUDA out of memory (injected)"), r["error"]
        else:
            assert r["error"].startswith("RuntimeError:") and "failed on another rank" in r["error"], r["error"]
        assert r["active"] == "default", (rank, r)
        if op == "merge" or mode == "base":
            assert not r["merged"] and r["is_base"], (rank, r)
        else:  # a switch put back, or an unmerge merged again: still merged, bit for bit as before
            assert r["merged"] and r["is_before"], (rank, r)
        assert r["weight_is_base"] == (mode == "base"), (rank, r)
        assert r["train_base"] and r["cycle_base"], (rank, r)


# ---------------------------------------------------------------------------------------------------------------
# a second fault: the pass wrote W, its record failed, and giving W back failed too. The weight then holds what no
# record describes. Before, the layer counted itself unmerged over it: it served, merged a second time and saved it
# as the base. Now it is broken (LoRALayer._writing): it refuses forwards, merges, switches, state_dict and unload,
# naming the error, until load_state_dict brings the weight again.


def _expect_broken(layer, x):
    for call in (lambda: layer(x), layer.eval, layer.merge, layer.state_dict):
        with pytest.raises(RuntimeError, match=r"Linear\(148, 40\): a failed .* left its weight unknown"):
            call()
    model = torch.nn.Sequential(layer)
    with pytest.raises(RuntimeError, match="left its weight unknown"):
        lora_ext.unload(model, merge=False)
    assert model[0] is layer and not layer.merged


def _load_base_and_check(layer, w0, x):
    """load_state_dict with the base weight: the layer works again; unmerged forward against float64, then an
    eval() / train() round trip gives the base back bit for bit."""
    layer.load_state_dict({"weight": w0.clone()}, strict=False)
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    fresh = _layer(w0, [(a.float(), b.float(), s)])  # never broken
    with torch.no_grad():
        fresh.bias.copy_(layer.bias)
    want = x.double() @ (w0.double() + s * b.double() @ a.double()).T + layer.bias.detach().double()
    with ops.use_kernels(_sim, "cpu"):
        got = layer(x)
        assert _same(got, fresh(x))
        # (bfloat16 outputs up to ~6: the forward rounds x A^T, the update and the sum to bfloat16)
        torch.testing.assert_close(got.double(), want, atol=0.05, rtol=0.02)
        layer.eval()
        assert layer.merged
        layer.train()
    assert _same(layer.weight.detach(), w0)


@requires_sim
@pytest.mark.parametrize("op", ["merge", "switch"])
def test_a_layer_whose_take_back_fails_refuses_until_its_weight_is_loaded(monkeypatch, op):
    w0 = _weight(0)
    layer = _layer(w0, [_adapter(1) + (1.0,), _adapter(2) + (2.0,)])
    x = torch.randn(3, IN).to(w0.dtype)
    if op == "switch":
        with ops.use_kernels(_sim, "cpu"):
            layer.eval()
    monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(RuntimeError("CUDA out of memory")))
    seen = RecordingKernels(fail_at=2, exc=RuntimeError("CUDA error: an illegal memory access"))
    with ops.use_kernels(seen, "cpu"), pytest.raises(RuntimeError, match="out of memory") as err:
        layer.eval() if op == "merge" else layer.set_adapter("a1")
    monkeypatch.undo()
    assert seen.calls == ["merge_lossless_" if op == "merge" else "swap_lossless_", "unmerge_lossless_"]
    notes = err.value.__notes__
    assert any("without a lossless record" in n for n in notes), notes
    assert any("left its weight unknown" in n and "Linear(148, 40)" in n for n in notes), notes
    assert not layer.merged
    written = layer.weight.detach().clone()
    with ops.use_kernels(_sim, "cpu"):
        _expect_broken(layer, x)
    assert _same(layer.weight.detach(), written)  # the refusals wrote nothing
    _load_base_and_check(layer, w0, x)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_a_cpu_pass_whose_give_back_fails_says_the_weight_is_written(monkeypatch, backend):
    """The CPU backends: the C++ pass's take-back (lossless_cpu._unmerge_pass) raised its own error in place of the
    first one, with no mark on it; the reference's _undo likewise. Now both keep the first error and mark it."""
    if backend == "cpp" and lossless._cpu is None:
        pytest.skip("lora_ext._cpu not built")
    from lora_ext import lossless_cpu
    w0 = _weight(0)
    layer = _layer(w0, [_adapter(1) + (1.0,)])
    x = torch.randn(3, IN).to(w0.dtype)

    def fails(*args, **kwargs):
        raise RuntimeError("give-back failed (injected)")
    if backend == "reference":
        monkeypatch.setattr(lossless, "_cpu", None)
        monkeypatch.setattr(lossless, "_undo", fails)
    else:
        monkeypatch.setattr(lossless_cpu, "_unmerge_pass", fails)
    monkeypatch.setattr(lossless, "MergeRecord", _FailingRecord(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as err:
        layer.eval()
    monkeypatch.undo()
    assert getattr(err.value, "weight_written", False)
    assert any("give-back failed (injected)" in n for n in err.value.__notes__)
    assert not _same(layer.weight.detach(), w0)  # (the premise: the pass had written W)
    _expect_broken(layer, x)
    _load_base_and_check(layer, w0, x)


@requires_sim
def test_a_compiled_forward_of_a_broken_layer_refuses_too(monkeypatch):
    w0 = _weight(0)
    layer = _layer(w0, [_adapter(1) + (1.0,)])
    x = torch.randn(3, IN).to(w0.dtype)
    compiled = torch.compile(layer, backend="eager")
    with ops.use_kernels(_sim, "cpu"):
        compiled(x)  # traced while sound
        monkeypatch.setattr(ops, "MergeRecord", _FailingRecord(RuntimeError("CUDA out of memory")))
        seen = RecordingKernels(fail_at=2, exc=RuntimeError("CUDA error: an illegal memory access"))
        with ops.use_kernels(seen, "cpu"), pytest.raises(RuntimeError, match="out of memory"):
            layer.eval()
        monkeypatch.undo()
        layer.train()  # (unmerged in its bookkeeping: train() has nothing to undo)
        with pytest.raises(RuntimeError, match="left its weight unknown"):
            compiled(x)
    _load_base_and_check(layer, w0, x)
    with ops.use_kernels(_sim, "cpu"):
        torch.testing.assert_close(compiled(x), layer(x))


def test_a_dtype_change_whose_merge_and_give_back_fail_leaves_the_layer_refusing(monkeypatch):
    """.float() of a merged bfloat16 layer unmerges, converts and merges again (lossless, as it was): that merge's
    record fails and so does its take-back. Before, the layer was left unmerged over the merged float32 weight."""
    if lossless._cpu is None:
        pytest.skip("lora_ext._cpu not built")
    from lora_ext import lossless_cpu
    w0 = _weight(0)
    layer = _layer(w0, [_adapter(1) + (1.0,)])
    x = torch.randn(3, IN)
    layer.eval()
    assert layer.merged

    def fails(*args, **kwargs):
        raise RuntimeError("give-back failed (injected)")
    monkeypatch.setattr(lossless_cpu, "_unmerge_pass", fails)
    monkeypatch.setattr(lossless, "MergeRecord", _FailingRecord(RuntimeError("out of memory (injected)")))
    with pytest.raises(RuntimeError, match="out of memory") as err:
        layer.float()
    monkeypatch.undo()
    assert any("a failed move or dtype change left its weight unknown" in n for n in err.value.__notes__)
    assert layer.weight.dtype == torch.float32 and not layer.merged
    with pytest.raises(RuntimeError, match="left its weight unknown"):
        layer(x)
    with pytest.raises(RuntimeError, match="left its weight unknown"):
        layer.state_dict()
    layer.load_state_dict({"weight": w0.float()}, strict=False)
    a, b, s = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.scaling
    want = x.double() @ (w0.double() + s * b @ a).T + layer.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), want, atol=1e-5, rtol=1e-5)
