"""Side-by-side benchmarks: lora_ext against loralib and against the plain torch floor, same process, same
shapes, interleaved repetitions, ratios to the floor. Run through `lora-ext bench`.

Peak extra memory of a merge is measured in a fresh process per implementation: on the CPU the peak
resident set (VmHWM, reset through /proc/self/clear_refs), on CUDA torch's peak allocated bytes.

Every target (the floor each case is measured against, the bound, why) is in lora_ext/bench_targets.py.

A rehearsal (`lora-ext bench --rehearse`, `run(device="cuda", rehearse=True)`) runs the CUDA run's code on
the CPU, every row function and branch of it, with tiny shapes and one repeat: lora_ext._sim stands in for
lora_ext._C (lora_ext.ops routes CPU tensors to it) and `CudaShim` does the CPU's equivalent of each
CUDA-only torch call. It finds on any machine what would otherwise break only on a GPU (a NameError, a
shape mistake, a row left out of the table); its numbers mean nothing, and it says so.
"""
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import lora_ext
from lora_ext import bench_batched, bench_lossless, lossless
from lora_ext import bench_targets as targets

try:
    import loralib
except ImportError:
    loralib = None

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------------
# every CUDA-only torch call of the bench, and its stand-in on a rehearsal


class CudaShim:
    """The bench's CUDA-only torch calls, in one place. On a GPU each is the torch.cuda call. On a rehearsal of
    the CUDA run on the CPU each does the CPU's equivalent, or nothing where the CPU has nothing to do, so
    that the rest of the CUDA-only code really runs:

    - `place`: tensors the run puts on "cuda" go to the CPU (where lora_ext.ops sends them to lora_ext._sim);
    - `synchronize`: nothing (CPU ops have finished when they return; the timing is perf_counter either way);
    - `on_side_stream`, `capture`: the function is called on the CPU's one stream; a CUDA graph's capture is
      one eager call and its replay another (under no_grad, as captured);
    - `reset_peak_memory_stats`, `memory_allocated`, `max_memory_allocated`: the process's resident set
      (VmRSS, VmHWM reset through /proc/self/clear_refs), as the CPU run measures its peak;
    - `l2_cache_size`: 0, so that rotations keep their minimum of two copies;
    - `is_available`, `device_name`: True, and a name that says it is a rehearsal.
    """

    def __init__(self, rehearsal=False):
        self.rehearsal = rehearsal
        self.peak_child_ran = False  # (a rehearsal starts one peak-memory child: see peak_extra_memory)

    def place(self, device):
        return "cpu" if self.rehearsal and device == "cuda" else device

    def is_available(self):
        return self.rehearsal or torch.cuda.is_available()

    def device_name(self):
        if self.rehearsal:
            return f"REHEARSAL on the CPU ({_machine('cpu')}), lora_ext._sim for lora_ext._C"
        return torch.cuda.get_device_name()

    def synchronize(self):
        if not self.rehearsal:
            torch.cuda.synchronize()

    def l2_cache_size(self):
        if self.rehearsal:
            return 0
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 * MiB)

    def on_side_stream(self, fn):
        """fn() on a side stream that waits for the current one, which then waits for it."""
        if self.rehearsal:
            fn()
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn):
        """fn() captured into a CUDA graph under no_grad; returns the graph's replay."""
        if self.rehearsal:
            with torch.no_grad():
                fn()
            return torch.no_grad()(fn)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            fn()
        return graph.replay

    def reset_peak_memory_stats(self):
        if self.rehearsal:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (VmHWM) to the current size
            return
        torch.cuda.reset_peak_memory_stats()

    def memory_allocated(self):
        return _rss_bytes("VmRSS") if self.rehearsal else torch.cuda.memory_allocated()

    def max_memory_allocated(self):
        return _rss_bytes("VmHWM") if self.rehearsal else torch.cuda.max_memory_allocated()


_cuda = CudaShim()

REHEARSAL_NOTE = ("REHEARSAL: not a measurement. The CUDA run's code on the CPU, lora_ext._sim standing in for "
                  "lora_ext._C, tiny shapes, one repeat: the numbers mean nothing and no target is checked.")


@contextlib.contextmanager
def rehearsing():
    """While open, the bench's CUDA run runs on the CPU (see CudaShim). Not thread-safe."""
    global _cuda
    from lora_ext import _sim

    saved, _cuda = _cuda, CudaShim(rehearsal=True)
    try:
        with lora_ext.ops.use_kernels(_sim, "cpu"):
            yield _cuda
    finally:
        _cuda = saved


# ---------------------------------------------------------------------------------------------------
# timing


def _sync(device):
    if device == "cuda":
        _cuda.synchronize()


def compare(candidates, device, repeats, inner=1, warmup=1):
    """Median seconds per call of each candidate, the candidates interleaved in rotating order so that
    drift on a shared machine hits them alike."""
    names = list(candidates)
    for _ in range(warmup):
        for n in names:
            candidates[n]()
    _sync(device)
    times = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                candidates[n]()
            _sync(device)
            times[n].append((time.perf_counter() - t0) / inner)
    return {n: statistics.median(ts) for n, ts in times.items()}


# ---------------------------------------------------------------------------------------------------
# cases


def _randomized(module, dtype, device):
    module = module.to(device=_cuda.place(device), dtype=dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return module


def _layer(lib, kind, dim, r, dtype, device, **kwargs):
    if kind == "linear":
        return _randomized(lib.Linear(dim, dim, r=r, lora_alpha=2 * r, **kwargs), dtype, device)
    return _randomized(lib.MergedLinear(dim, 3 * dim, r=r, lora_alpha=2 * r, enable_lora=[True, False, True],
                                        **kwargs), dtype, device)


def _cycle(layer):
    def run():
        layer.eval()
        layer.train()
    return run


def _addmm_cycle(layer, signs=(1.0, -1.0)):
    """The floor for a merge+unmerge cycle: in-place rank-r addmm_ on the enabled row blocks, +s then -s
    (signs=(1.0,): one merge's passes)."""
    w, A, B, s = layer.weight_2d().detach(), layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    blocks = layer.block_ids
    r, nb = layer.rank_of(A), w.shape[0] // layer.layout()["num_blocks"]

    def run():
        for sign in signs:
            for j, e in enumerate(blocks):
                w[e * nb:(e + 1) * nb].addmm_(B[j * nb:(j + 1) * nb], A[j * r:(j + 1) * r], alpha=sign * s)
    return run


# lora_ext with lossy merges (lossless=False): beside the default (lossless for float16/bfloat16 weights), what
# the record costs in time and memory
LOSSY = "lora_ext lossy"


def merge_case(kind, dim, r, dtype, device, repeats):
    """A merge+unmerge cycle (eval() then train()) against two in-place rank-r addmm_ passes, and loralib's."""
    ours = _layer(lora_ext, kind, dim, r, dtype, device)
    candidates = {"addmm_": _addmm_cycle(ours), "lora_ext": _cycle(ours)}
    if lossless.default_lossless(dtype):
        candidates[LOSSY] = _cycle(_layer(lora_ext, kind, dim, r, dtype, device, lossless=False))
    if loralib is not None:
        candidates["loralib"] = _cycle(_layer(loralib, kind, dim, r, dtype, device))
    times = compare(candidates, device, repeats)
    weight_bytes = ours.weight.numel() * ours.weight.element_size()
    if kind == "merged":
        weight_bytes = weight_bytes * 2 // 3  # two of three blocks are touched
    return times, weight_bytes


def forward_case(kind, dim, r, tokens, dtype, device, repeats):
    ours = _layer(lora_ext, kind, dim, r, dtype, device)
    x = torch.randn(tokens, dim, dtype=dtype, device=_cuda.place(device))
    w, b = ours.weight.detach(), ours.bias.detach()
    candidates = {"plain": lambda: F.linear(x, w, b), "lora_ext": lambda: ours(x)}
    if loralib is not None:
        theirs = _layer(loralib, kind, dim, r, dtype, device)
        candidates["loralib"] = lambda: theirs(x)
    # several calls per sample where one call is too short to time on its own
    inner = 1 if device == "cpu" and tokens > 1 else 5
    with torch.no_grad():
        return compare(candidates, device, repeats, inner=inner)


# ---------------------------------------------------------------------------------------------------
# peak memory, each measurement in a fresh process


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(impl, kind, dim, r, dtype_name, device):
    dtype = getattr(torch, dtype_name)
    lib = {"lora_ext": lora_ext, "loralib": loralib}.get(impl, lora_ext)
    kwargs = {"lossless": False} if impl == LOSSY else {}
    layer = _layer(lib, kind, dim, r, dtype, device, **kwargs)
    warm = _layer(lib, kind, 64, 2, dtype, device, **kwargs)  # library start-up (BLAS buffers) outside the window
    (_addmm_cycle(warm) if impl == "addmm_" else _cycle(warm))()
    # the floor of one merge (eval()) is one in-place pass: addmm_ with +s only
    run = _addmm_cycle(layer, signs=(1.0,)) if impl == "addmm_" else (lambda: layer.eval())
    if device == "cuda":
        _cuda.synchronize()
        _cuda.reset_peak_memory_stats()
        before = _cuda.memory_allocated()
        run()
        _cuda.synchronize()
        return _cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current size
    before = _rss_bytes("VmRSS")
    run()
    return _rss_bytes("VmHWM") - before


def peak_extra_memory(impl, kind, dim, r, dtype, device):
    args = [impl, kind, str(dim), str(r), str(dtype).replace("torch.", ""), device]
    if _cuda.rehearsal:
        # a rehearsal measures nothing: its first case goes the GPU run's way, through a child (which rehearses
        # too), and the others run here (each child is mostly torch's import: seconds a case, in CI twice over)
        if _cuda.peak_child_ran:
            return _peak_child(impl, kind, dim, r, args[4], device)
        _cuda.peak_child_ran = True
        args.append("--rehearse")
    out = subprocess.run([sys.executable, "-m", "lora_ext.bench", "peak", *args], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"peak memory child {' '.join(args)} failed:\n{out.stderr}")
    return int(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# merge kernels against the copy bandwidth (what the GPU check reports)


def _rotation(nbytes, device):
    """How many weight copies to cycle through so that the last-level cache does not serve them."""
    if device != "cuda":
        return 2
    l2 = _cuda.l2_cache_size()
    return max(2, -(-4 * l2 // nbytes))


def merge_kernel_case(kind, dim, r, dtype, device, repeats):
    """One merge (not a cycle) of a dim x dim Linear or a MergedLinear(dim, 3*dim, [T,F,T]), over
    rotating weights; plus the device-to-device copy of the same bytes, for the bandwidth ceiling."""
    ours = _layer(lora_ext, kind, dim, r, dtype, device)
    theirs = _layer(loralib, kind, dim, r, dtype, device) if loralib is not None else None
    w0 = ours.weight_2d().detach()
    nrot = _rotation(w0.numel() * w0.element_size(), device)
    weights = [w0.clone() for _ in range(nrot)]
    copies = [w0.clone() for _ in range(nrot)]
    A, B, s = ours.lora_A.detach(), ours.lora_B.detach(), ours.scaling
    layout = ours.layout()
    A_low, B_low = A.to(dtype), B.to(dtype)
    blocks = ours.block_ids
    groups = layout["num_blocks"]
    n, nb = len(blocks), w0.shape[0] // groups
    step = {"i": 0}

    def nxt(seq):
        step["i"] += 1
        return seq[step["i"] % len(seq)]

    def addmm():
        w = nxt(weights)
        for j, e in enumerate(blocks):
            w[e * nb:(e + 1) * nb].addmm_(B_low[j * nb:(j + 1) * nb], A_low[j * r:(j + 1) * r], alpha=s)

    def ours_merge():
        lora_ext.ops.merge_(nxt(weights), A, B, s, **layout)

    def copy():
        i = step["i"] = step["i"] + 1
        copies[i % nrot].copy_(weights[i % nrot])

    candidates = {"copy": copy, "addmm_": addmm, "lora_ext": ours_merge}
    if theirs is not None:
        def loralib_merge():
            theirs.merged = False  # merge again each time: we time one merge, not a cycle
            theirs.train(False)
        candidates["loralib"] = loralib_merge
    with torch.no_grad():
        times = compare(candidates, device, repeats, inner=5 if device == "cuda" else 1)
    touched = w0.numel() * w0.element_size() * n // groups
    return times, touched, w0.numel() * w0.element_size()


def merge_kernel_rows(device, dtype, repeats, shapes):
    rows = []
    for kind, dim, r in shapes:
        times, touched, full = merge_kernel_case(kind, dim, r, dtype, device, repeats)
        copy_gbps = 2 * full / times["copy"] / 1e9
        for impl, t in times.items():
            nbytes = full if impl == "copy" else touched
            gbps = 2 * nbytes / t / 1e9
            row = dict(case=f"merge {kind} {dim} r={r}", impl=impl, ms=t * 1e3, ratio=t / times["lora_ext"],
                       **{"GB/s": gbps, "of copy": gbps / copy_gbps})
            if impl == "lora_ext" and kind == "linear":
                row.update(targets.fields("merge_kernel.of_copy", gbps / copy_gbps))
            rows.append(row)
        speedup = {k: times[k] / times["lora_ext"] for k in times}
        want = {"loralib": f"merge_kernel.vs_loralib.{kind}", "addmm_": "merge_kernel.vs_addmm"}
        for impl, key in want.items():
            if impl in speedup and (kind == "linear" or impl == "loralib"):
                rows.append(dict(case=f"merge {kind} {dim} r={r}: lora_ext speed-up over {impl}",
                                 impl="lora_ext", ratio=speedup[impl], **targets.fields(key, speedup[impl])))
    return rows


GPU_KERNEL_DIM = 4096  # the width of the CUDA-only kernel rows on a GPU, whatever --dim is


def gpu_merge_shapes(dim=GPU_KERNEL_DIM):
    """The merge kernel rows' shapes: Linear dim and 2*dim at ranks 8, 16, 64, and MergedLinear(dim, 3*dim)."""
    return [("linear", d, r) for d in (dim, 2 * dim) for r in (8, 16, 64)] + [("merged", dim, 8)]


GPU_MERGE_SHAPES = gpu_merge_shapes()


# ---------------------------------------------------------------------------------------------------
# forward kernels: unmerged LoRA layers against the merged plain layer, loralib and peft


def _unmerged(lib, kind, dim, r, dtype, device):
    layer = _layer(lib, kind, dim, r, dtype, device, merge_weights=False)
    layer.eval()  # loralib's train() returns None: no chaining
    return layer


def _peft():
    """peft, or None where it is not installed (the rows comparing with it are left out); imported on first
    use: it imports transformers, which takes seconds."""
    try:
        import peft
    except ImportError:
        return None
    return peft


def _peft_linear(dim, r, dtype, device):
    peft = _peft()
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(dim, dim)),
                                peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    return _randomized(model.base_model.model[0], dtype, device).eval()


def _floor_linear(layer):
    """The plain layer with the LoRA update merged in: what an unmerged forward is measured against."""
    plain = torch.nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device,
                            dtype=layer.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
        plain.weight.requires_grad_(False)
        plain.bias.requires_grad_(False)
    return plain


def _rotating(make, nrot):
    """One callable per candidate that steps through nrot copies, so the weights come from memory, not L2."""
    copies = [make() for _ in range(nrot)]
    state = {"i": 0}

    def step(*args):
        state["i"] = (state["i"] + 1) % nrot
        return copies[state["i"]](*args)
    return step, copies


def _graph_replay(modules, x):
    """A CUDA graph running every module once on x (no grad); returns its replay."""
    def run_all():
        for m in modules:
            m(x)
    with torch.no_grad():
        _cuda.on_side_stream(run_all)  # warm up outside the capture
    return _cuda.capture(run_all)


def forward_kernel_rows(device, dtype, repeats, dim=4096, r=16, merged_r=8, tokens=(1, 16, 256, 4096)):
    """Forward (no grad) and forward+backward of an unmerged lora_ext.Linear(dim, dim, r) against the plain
    layer with merged weights (the floor), loralib and peft; the same for MergedLinear(dim, 3*dim,
    merged_r, [T, F, T]) against plain; at M=1 also under CUDA graph replay. Targets: forward_kernel.* in
    bench_targets."""
    rows = []
    for kind, rank in (("linear", r), ("merged", merged_r)):
        probe = _unmerged(lora_ext, kind, dim, rank, dtype, device)
        nrot = _rotation(probe.weight.numel() * probe.weight.element_size(), device)
        del probe
        makers = {"lora_ext": lambda: _unmerged(lora_ext, kind, dim, rank, dtype, device)}
        if loralib is not None:
            makers["loralib"] = lambda: _unmerged(loralib, kind, dim, rank, dtype, device)
        if kind == "linear" and _peft() is not None:
            makers["peft"] = lambda: _peft_linear(dim, rank, dtype, device)
        layers = {name: _rotating(make, nrot) for name, make in makers.items()}
        layers = {"plain": _rotating(lambda: _floor_linear(_unmerged(lora_ext, kind, dim, rank, dtype, device)),
                                     nrot), **layers}
        name = (f"Linear({dim}, {dim}) r={rank}" if kind == "linear"
                else f"MergedLinear({dim}, {3 * dim}) r={rank} [T,F,T]")
        for m in tokens:
            x = torch.randn(m, dim, dtype=dtype, device=_cuda.place(device))
            with torch.no_grad():
                times = compare({k: (lambda f=f: f(x)) for k, (f, _) in layers.items()}, device, repeats,
                                inner=5 if m < 256 else 1)
            target = f"forward_kernel.{kind}.eager" + (".M1" if kind == "linear" and m == 1 else "")
            rows.extend(_forward_rows(f"forward {name} M={m}", times, target))
            if m == 1 and device == "cuda":
                graphs = {}
                for k, (_, mods) in layers.items():
                    try:
                        graphs[k] = _graph_replay(mods, x)
                    except RuntimeError as e:  # a comparison that cannot be captured is a row, not the run's end
                        if k in ("lora_ext", "plain"):
                            raise
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                        rows.append(dict(case=f"forward {name} M={m}, CUDA graph replay",
                                         impl=f"{k}: not capturable ({first})"))
                times = compare(graphs, device, repeats, inner=5)
                times = {k: t / nrot for k, t in times.items()}
                rows.extend(_forward_rows(f"forward {name} M={m}, CUDA graph replay", times,
                                          f"forward_kernel.{kind}.graph.M1"))
            if kind == "linear":
                xg = x.clone().requires_grad_()
                grad = torch.randn(m, dim, dtype=dtype, device=_cuda.place(device))
                times = compare({k: (lambda f=f: f(xg).backward(grad)) for k, (f, _) in layers.items()}, device,
                                repeats, inner=5 if m < 256 else 1)
                rows.extend(_forward_rows(f"forward+backward {name} M={m}", times, None))
    return rows


def _train_rows(device, dtype, repeats, dim=256, r=8, tokens=(1, 64)):
    """Forward+backward of an unmerged Linear(dim, dim, r) inside a model (its factors and its input need
    gradients) against the plain layer, loralib and peft: on the CPU at a small width, where a training step's
    host time shows (bench/NOTES-host-time.md). No target: the speed-ups over loralib and peft are reported. (The
    CPU run's only: not a public row function, each of which the rehearsed CUDA run must call.)"""
    makers = {"plain": lambda: _floor_linear(_unmerged(lora_ext, "linear", dim, r, dtype, device)),
              "lora_ext": lambda: _unmerged(lora_ext, "linear", dim, r, dtype, device)}
    if loralib is not None:
        makers["loralib"] = lambda: _unmerged(loralib, "linear", dim, r, dtype, device)
    if _peft() is not None:
        makers["peft"] = lambda: _peft_linear(dim, r, dtype, device)
    layers = {name: make() for name, make in makers.items()}
    rows = []
    for m in tokens:
        x = torch.randn(m, dim, dtype=dtype, device=_cuda.place(device), requires_grad=True)
        grad = torch.randn(m, dim, dtype=dtype, device=_cuda.place(device))
        times = compare({k: (lambda f=f: f(x).backward(grad)) for k, f in layers.items()}, device, repeats,
                        inner=20)
        case = f"forward+backward Linear({dim}, {dim}) r={r} tokens={m}"
        rows.extend(_ratio_rows(case, times, "plain"))
        for other in ("loralib", "peft"):
            if other in times:
                rows.append(dict(case=f"{case}: lora_ext speed-up over {other}", impl="lora_ext",
                                 ratio=times[other] / times["lora_ext"]))
    return rows


def _ratio_rows(case, times, floor, target=None, ours="lora_ext"):
    """One row per candidate: its time and its ratio to the floor's; our candidates' rows (ours: one name or
    a tuple of names) carry the target (a key of bench_targets.TARGETS)."""
    ours = (ours,) if isinstance(ours, str) else ours
    rows = []
    for impl, t in times.items():
        row = dict(case=case, impl=impl, ms=t * 1e3, ratio=t / times[floor])
        if impl in ours and target is not None:
            row.update(targets.fields(target, row["ratio"]))
        rows.append(row)
    return rows


def _forward_rows(case, times, target):
    rows = _ratio_rows(case, times, "plain", target)
    for other in ("loralib", "peft"):
        if other in times:
            speedup = times[other] / times["lora_ext"]
            rows.append(dict(case=f"{case}: lora_ext speed-up over {other}", impl="lora_ext", ratio=speedup,
                             **targets.fields("forward_kernel.vs_others", speedup)))
    return rows


# ---------------------------------------------------------------------------------------------------
# the run


REHEARSAL_DIM = 32  # a rehearsal's default width (the merge kernel rows go to twice it, at rank 64)


def run(device="cpu", quick=False, dim=4096, rehearse=False, batched=False, sink=None):
    """The benchmark rows of `device`, as a dict (format_table prints it). rehearse=True rehearses the CUDA run
    on the CPU (see CudaShim): every row function and branch of it at width `dim` (use a tiny one, e.g.
    REHEARSAL_DIM), one repeat, marked as a rehearsal, no target checked. batched=True: only the mixed-batch
    rows, the whole grid (widths 1024 and 4096, or `dim` when given). sink: a list the rows are appended to as
    they are measured (what a run stopped part way has: see `partial`)."""
    if rehearse:
        if device != "cuda":
            raise ValueError("a rehearsal rehearses the CUDA run: device must be 'cuda'")
        with rehearsing():
            result = run(device, quick, dim, batched=batched, sink=sink)
        return _as_rehearsal(result)
    if device == "cuda" and not _cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    dtype = _dtype(device)
    repeats = 1 if _cuda.rehearsal else 5 if quick else 15
    kernel_dim = dim if _cuda.rehearsal else GPU_KERNEL_DIM
    rows = [] if sink is None else sink  # (extended in place from here on)
    if batched:
        rows += bench_batched.rows(device, quick=False, repeats=repeats, compare=compare, shim=_cuda,
                                   dim=_batched_dim(dim), dtype=dtype)
        return _result(device, dtype, dim, quick, rows)

    def add(case, times, floor, target=None):
        rows.extend(_ratio_rows(case, times, floor, target))

    if device == "cuda":
        # the kernels against the copy bandwidth and the plain GEMM first: a GPU run stopped by its time limit
        # (the second device run kept 27 layer-level rows, none of these) still says where the time goes
        rows.extend(merge_kernel_rows(device, dtype, repeats, gpu_merge_shapes(kernel_dim)))
        rows.extend(forward_kernel_rows(device, dtype, repeats, dim=kernel_dim))
        # the lossless merge against the lossy one at the op level: what the layers' default costs
        rows += bench_lossless.timing_rows(dim, device, repeats, compare, _cuda.place)

    for kind, r in (("linear", 16), ("merged", 8)):
        times, nbytes = merge_case(kind, dim, r, dtype, device, repeats)
        name = f"merge+unmerge {kind} {dim} r={r}"
        add(name, times, "addmm_", f"merge_cycle.{kind}")
        for row in rows[-len(times):]:
            row["GB/s"] = 2 * 2 * nbytes / (row["ms"] * 1e-3) / 1e9  # read + write, twice
        for impl in times:
            if impl == "loralib" and loralib is None:
                continue
            extra = peak_extra_memory(impl, kind, dim, r, dtype, device)
            rows.append(dict(case=f"peak extra MiB, merge {kind} {dim} r={r}", impl=impl, MiB=extra / MiB,
                             **(targets.fields("merge_peak", extra / MiB) if impl == "lora_ext" else {})))

    forward = [("merged", 8, 1, "forward.merged.tokens1"), ("merged", 8, 64, "forward.merged.tokens64"),
               ("linear", 16, 1, None), ("linear", 16, 64, None), ("linear", 16, 2048, "forward.linear.tokens2048")]
    for kind, r, tokens, target in forward:
        times = forward_case(kind, dim, r, tokens, dtype, device, repeats)
        add(f"forward {kind} {dim} r={r} tokens={tokens}", times, "plain", target)

    if device == "cpu":  # (on CUDA forward_kernel_rows has forward+backward rows at the kernels' width)
        rows += _train_rows(device, dtype, repeats)
    rows += serving_rows(dim, dtype, device, repeats)
    if device == "cuda":  # at 4096 a 16 us pass may leave the layer call host-bound; 8192 shows the kernel
        rows += switch_rows(2 * dim, dtype, device, repeats)
    else:  # (on CUDA these come after the kernel rows, above)
        rows += bench_lossless.timing_rows(dim, device, repeats, compare, _cuda.place)
    # the mixed-batch targets' cases (`lora-ext bench --batched`: the whole grid)
    rows += bench_batched.rows(device, quick=True, repeats=repeats, compare=compare, shim=_cuda,
                               dim=_batched_dim(dim), dtype=dtype)
    return _result(device, dtype, dim, quick, rows)


def _batched_dim(dim):
    """The width of the mixed-batch rows: the targets' widths (1024 and 4096) at the default width, else `dim`
    (a rehearsal's tiny one, or --dim)."""
    return dim if _cuda.rehearsal or dim != 4096 else None


def partial(device, quick, dim, rows, why, rehearse=False):
    """The result of a run stopped part way (`why`), with the rows its sink holds."""
    with rehearsing() if rehearse else contextlib.nullcontext():  # (the machine's description: the rehearsal's)
        result = dict(_result(device, _dtype(device), dim, quick, list(rows)),
                      incomplete=f"{why}, after {len(rows)} rows")
    return _as_rehearsal(result) if rehearse else result


def _dtype(device):
    """The dtype a run measures on `device`."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def _as_rehearsal(result):
    """A rehearsal's result: marked so, and its numbers meet no target and miss none."""
    for row in result["rows"]:
        if "met" in row:
            row["met"] = None
    return dict(rehearsal=True, note=REHEARSAL_NOTE, **result)


def _result(device, dtype, dim, quick, rows):
    return dict(
        device=device, dtype=str(dtype).replace("torch.", ""), dim=dim, quick=quick,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=_machine(device), torch=torch.__version__, rows=rows,
    )


def serving_rows(dim, dtype, device, repeats, r=16):
    """The adapter switch (switch_rows) and injection into a stack of Linears vs peft."""
    return switch_rows(dim, dtype, device, repeats, r) + inject_rows(dim, dtype, device, repeats, r)


def switch_rows(dim, dtype, device, repeats, r=16):
    """Adapter switch on a merged Linear, r=16 out, r=16 in: the op alone (ops.swap_ on its own copy of the
    weight, values known finite) and the layer's set_adapter (lock, bookkeeping, the merged copy), beside
    peft's unmerge + merge of the same adapters. A switch is one update of rank r1 + r2, so its floor is one
    in-place addmm_ of rank r1 + r2 (the factors stacked once, outside the timing); the rows against one
    rank-r merge (ops.merge_, half the flops) are reported too, without a target."""
    layer = _layer(lora_ext, "linear", dim, r, dtype, device)
    layer.add_adapter("b", torch.randn_like(layer.lora_A) * 0.02, torch.randn_like(layer.lora_B) * 0.02, 2.0)
    layer.eval()
    w, A, B = layer.weight_2d().detach(), layer.lora_A.detach(), layer.lora_B.detach()
    w_op, w_floor = w.clone(), w.clone()
    A_b, B_b = layer.get_adapter("b")[:2]
    pairs = [(A, B, layer.scaling), (A_b, B_b, 2.0)]
    r_sum = layer.rank_of(A) + layer.rank_of(A_b)
    # the switch default -> b as one rank-(r1 + r2) update; applied with alpha -1 it is the switch back
    A_cat = torch.cat((A_b.detach(), A)).to(w.dtype)
    B_cat = torch.cat((B_b.detach() * 2.0, B * -layer.scaling), dim=1).to(w.dtype)
    calls = 4 * repeats + 8
    names = iter(["b", "default"] * calls)
    signs = iter([1.0, -1.0] * calls)  # merge and take it out again: the weight stays as it was
    floor_signs = iter([1.0, -1.0] * calls)
    flips = iter([0, 1] * calls)

    def op_swap():
        i = next(flips)
        lora_ext.ops.swap_(w_op, *pairs[i], *pairs[1 - i], check_values=False)

    floor = f"addmm_ rank {r_sum}"
    candidates = {floor: lambda: w_floor.addmm_(B_cat, A_cat, alpha=next(floor_signs)),
                  "one merge pass": lambda: lora_ext.ops.merge_(w, A, B, next(signs) * layer.scaling),
                  "lora_ext ops.swap_": op_swap,
                  "lora_ext set_adapter": lambda: layer.set_adapter(next(names))}
    peft = _peft()
    if peft is not None:
        base = torch.nn.Sequential(torch.nn.Linear(dim, dim)).to(device=_cuda.place(device), dtype=dtype)
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
        model.add_adapter("b", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
        theirs = model.base_model.model[0]
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.02)
        theirs.merge(adapter_names=["default"])
        state = {"active": "default"}

        def peft_switch():
            other = "b" if state["active"] == "default" else "default"
            theirs.unmerge()
            theirs.merge(adapter_names=[other])
            state["active"] = other
        candidates["peft unmerge+merge"] = peft_switch
    times = compare(candidates, device, repeats)
    case = f"adapter switch, merged linear {dim} r={r}"
    ours = ("lora_ext ops.swap_", "lora_ext set_adapter")
    return (_ratio_rows(f"{case}, against one rank-{r_sum} addmm_ (floor)", times, floor, "switch", ours=ours)
            + _ratio_rows(f"{case}, against one rank-{r} merge", times, "one merge pass", ours=ours))


def inject_rows(dim, dtype, device, repeats, r=16):
    """Injection into a stack of 12 Linears (model construction included) against building it, and peft."""
    def stack():
        return torch.nn.Sequential(*[torch.nn.Linear(dim // 4, dim // 4) for _ in range(12)]).to(
            _cuda.place(device), dtype)
    inject = {"lora_ext inject": lambda: lora_ext.inject(stack(), r".*", r=r)}
    peft = _peft()
    if peft is not None:
        inject["peft get_peft_model"] = lambda: peft.get_peft_model(stack(), peft.LoraConfig(r=r, target_modules=r".*"))
    plain = {"build the model only": stack}
    times = compare({**plain, **inject}, device, max(3, repeats // 3))
    return _ratio_rows(f"inject 12 x Linear {dim // 4} r={r} (incl. building the model)", times,
                       "build the model only")


def _machine(device):
    if device == "cuda":
        return _cuda.device_name()
    return (f"{platform.processor() or platform.machine()}{_cpu_features()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")


def _cpu_features() -> str:
    """' (model, torch's vector level, the batched loops' lanes)': ratios on the CPU depend on them (the batched
    loops' tiles are sized for AVX-512 or AVX2: bench/NOTES-batched.md)."""
    parts = []
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        if model:
            parts.append(model)
    except OSError:
        pass
    try:
        parts.append(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        pass
    try:
        from lora_ext import _cpu
        parts.append(f"batched tiles of {_cpu.batched_lanes()} lanes")
    except (ImportError, AttributeError):  # (not built, or built before the lanes)
        pass
    return f" ({', '.join(parts)})" if parts else ""


def format_table(result):
    rehearsal = result.get("rehearsal", False)
    lines = [REHEARSAL_NOTE, ""] if rehearsal else []
    lines += [f"lora_ext bench: {result['device']} ({result['machine']}), {result['dtype']}, torch {result['torch']}, "
              f"{result['date']}", "",
              *([f"INCOMPLETE: {result['incomplete']}", ""] if result.get("incomplete") else []),
              "| case | impl | time ms | ratio to floor | extra | target | met |",
              "|---|---|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        ms = f"{row['ms']:.3f}" if "ms" in row else ""
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else ""
        extra = f"{row['MiB']:.1f} MiB" if "MiB" in row else (f"{row['GB/s']:.1f} GB/s" if row.get("GB/s") else "")
        if "of copy" in row:
            extra += f" ({row['of copy']:.0%} of copy)"
        target = row["target"] if isinstance(row.get("target"), str) else (
            f"<= {row['target']}" if "target" in row else "")
        met = "" if "met" not in row else "-" if rehearsal or row["met"] is None else "yes" if row["met"] else "NO"
        lines.append(f"| {row['case']} | {row['impl']} | {ms} | {ratio} | {extra} | {target} | {met} |")
    return "\n".join(lines)


def _main(argv):
    if argv and argv[0] == "peak" and len(argv) in (7, 8) and argv[7:] in ([], ["--rehearse"]):
        impl, kind, dim, r, dtype, device = argv[1:7]
        with rehearsing() if argv[7:] else contextlib.nullcontext():
            print(_peak_child(impl, kind, int(dim), int(r), dtype, device))
        return 0
    raise SystemExit("usage: python -m lora_ext.bench peak IMPL KIND DIM R DTYPE DEVICE [--rehearse]")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
