"""Benchmarks of mixed batches (lora.batch_adapters), part of `lora-ext bench` (the target cases) and
`lora-ext bench --batched` (the whole grid): one lora_ext.Linear(dim, dim) holding `adapters` adapters of rank
r, a batch whose rows cycle through them, against

- the plain layer (nn.Linear's F.linear on the same weight): the floor;
- one adapter for the whole batch (the same layer, unmerged, its active adapter);
- peft's mixed batch (`adapter_names=`, a loop over the distinct adapters in the batch);
- lora_ext's mixed batch, the forward inside an open batch_adapters block (what each step of generate() pays),
  and the block opened and closed around each forward (a new batch every call).

The whole grid also times two convolutions in mixed batches (CONV_CASES: a ViT patch embedding, a Whisper
convolution) against the plain conv, one adapter unmerged and peft's adapter_names.

On CUDA also: the forward under CUDA graph replay (captured inside the block, replayed with the slots of the
batch open at replay), and slot paging (2 slots fewer than the batch's adapters' working set: each call opens a
batch whose adapters must be copied into slots from host memory)."""
import torch
import torch.nn.functional as F

import lora_ext
from lora_ext import bench_targets as targets

DECODE = ((32, 1), (64, 1))  # (rows, tokens per row)
PREFILL = ((8, 128),)


def grid(device, quick, dim=None):
    """(dim, rows, tokens, adapters, r) of the cases: the whole grid, or (quick) the targets' cases."""
    dims = (dim,) if dim else (1024, 4096)
    if quick:
        cases = [(dims[0], 32, 1, 32, 16), (dims[-1], 32, 1, 8, 16)]
        if device == "cpu":  # prefill at rank 64 too: the C++ loops' tiles against the machine's registers (a tile
            cases.append((dims[0], 8, 128, 8, 64))  # too wide for AVX2 made it 5.8x plain: bench/NOTES-batched.md)
    else:
        cases = [(d, rows, tokens, n, r) for d in dims for rows, tokens in DECODE + PREFILL for n in (8, 32)
                 for r in (16, 64)]
    if device == "cuda":
        cases.append((dims[-1], 64, 1, 64, 16))  # GRAPH_CASE at the run's width
    return cases


def _layer(dim, r, n, dtype, device, gen):
    layer = lora_ext.Linear(dim, dim, r=r, merge_weights=False)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02, generator=gen)
        layer.bias.normal_(0, 0.02, generator=gen)
    layer.eval()
    for i in range(n):
        layer.add_adapter(f"a{i}", torch.randn(r, dim, generator=gen) * 0.02, torch.randn(dim, r, generator=gen) * 0.02,
                          2.0)
    layer.set_adapter("a0")
    layer.delete_adapter("default")
    return layer.to(device, dtype)


def _peft_layer(layer, n, r):
    """peft's LoraModel over a plain Linear with the same weight and adapters, or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    base = torch.nn.Sequential(torch.nn.Linear(layer.in_features, layer.out_features))
    with torch.no_grad():
        base[0].weight.copy_(layer.weight)
        base[0].bias.copy_(layer.bias)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    inner = model.base_model.model[0]
    with torch.no_grad():
        for i in range(n):
            A, B, _ = layer.get_adapter(f"a{i}")
            inner.lora_A[f"a{i}"].weight.copy_(A)
            inner.lora_B[f"a{i}"].weight.copy_(B)
    return model.to(layer.weight.device, layer.weight.dtype).eval()


def case_rows(dim, rows, tokens, n, r, dtype, device, repeats, compare, shim):
    gen = torch.Generator().manual_seed(0)
    place = shim.place(device)
    layer = _layer(dim, r, n, dtype, place, gen)
    names = [f"a{i % n}" for i in range(rows)]
    x = torch.randn(rows, tokens, dim, generator=gen).to(place, dtype)
    peft_model = _peft_layer(layer, n, r)
    lora_ext.configure_slots(layer, slots=max(n, 8), max_rank=r)
    open_batch = lora_ext.batch_adapters(layer, names)
    candidates = {
        "plain": lambda: F.linear(x, layer.weight, layer.bias),
        "one adapter (lora_ext)": lambda: layer(x),
        "lora_ext mixed (forward)": lambda: layer(x),  # inside the open block, below
        "lora_ext mixed (open+forward)": None,
    }

    def open_and_forward():
        with lora_ext.batch_adapters(layer, names):
            return layer(x)

    candidates["lora_ext mixed (open+forward)"] = open_and_forward
    if peft_model is not None:
        candidates["peft adapter_names"] = lambda: peft_model(x, adapter_names=names)
    with torch.no_grad():
        # the block is opened for the "forward" candidate only: a context variable, so the others run outside it
        import contextvars
        ctx = contextvars.copy_context()
        ctx.run(open_batch.__enter__)
        inside = candidates["lora_ext mixed (forward)"]
        candidates["lora_ext mixed (forward)"] = lambda: ctx.run(inside)
        try:
            times = compare(candidates, device, repeats)
        finally:
            ctx.run(open_batch.__exit__, None, None, None)
        if device == "cuda":
            times.update(_cuda_only(layer, names, x, n, r, device, repeats, compare, shim))
    what = "decode" if tokens == 1 else "prefill"
    case = f"mixed batch {what} {dim} rows={rows}x{tokens} adapters={n} r={r}"
    out = []
    suffix = ".cuda" if device == "cuda" else ""
    for impl, t in times.items():
        row = dict(case=case, impl=impl, ms=t * 1e3, ratio=t / times["plain"])
        key = _target_key(dim, rows, tokens, n, r, impl, device)
        if key:
            row.update(targets.fields(key, row["ratio"]))
        out.append(row)
    # never slower than one adapter for the whole batch by more than 10%
    one, mixed = times["one adapter (lora_ext)"], times["lora_ext mixed (forward)"]
    out.append(dict(case=case, impl="mixed / one adapter", ratio=mixed / one,
                    **targets.fields("batched.vs_one" + suffix, mixed / one)))
    if "peft adapter_names" in times:
        out.append(dict(case=case, impl="peft / lora_ext mixed", ratio=times["peft adapter_names"] / mixed,
                        **({} if device != "cuda" else targets.fields("batched.vs_peft.cuda",
                                                                      times["peft adapter_names"] / mixed))))
    return out


def _target_key(dim, rows, tokens, n, r, impl, device):
    """The target of a row, if any."""
    shape = (dim, rows, tokens, n, r)
    if device == "cpu" and impl == "lora_ext mixed (forward)":
        return {(1024, 32, 1, 32, 16): "batched.decode.1024", (4096, 32, 1, 8, 16): "batched.decode.4096"}.get(shape)
    if device == "cuda" and impl == "lora_ext mixed (graph replay)" and shape[1:] == GRAPH_CASE[1:]:
        return "batched.decode.graph.cuda"
    return None


GRAPH_CASE = (4096, 64, 1, 64, 16)  # the H200 target's case: 64 rows of distinct adapters (at the run's width)


def _cuda_only(layer, names, x, n, r, device, repeats, compare, shim):
    """Graph replay of the mixed forward, and a forward with slot paging."""
    times = {}
    with lora_ext.batch_adapters(layer, names):
        replay = shim.capture(lambda: layer(x))
        times["lora_ext mixed (graph replay)"] = compare({"g": replay}, device, repeats)["g"]
    other = names[1:] + names[:1]  # another batch: the same slots, other rows

    def graph_step():
        with lora_ext.batch_adapters(layer, other):
            replay()
    times["lora_ext mixed (graph replay, open+replay)"] = compare({"g": graph_step}, device, repeats)["g"]
    # paging: adapters in host memory, fewer slots than the adapters in use across calls
    paged = layer
    lora_ext.configure_slots(paged, slots=max(n // 2, n - n // 2), max_rank=r)
    half = max(1, n // 2)  # two batches on disjoint halves of the adapters, each filling the slots
    halves = [[f"a{i % half}" for i in range(len(names))], [f"a{half + i % (n - half)}" for i in range(len(names))]]
    state = {"i": 0}

    def paging_step():
        state["i"] ^= 1
        with lora_ext.batch_adapters(paged, halves[state["i"]]):
            return paged(x)
    times["lora_ext mixed (paging, open+forward)"] = compare({"p": paging_step}, device, repeats)["p"]
    lora_ext.configure_slots(layer, slots=max(n, 8), max_rank=r)
    return times


# convolutions in mixed batches (the whole grid only): (name, conv class, in, out, kernel, conv kwargs, input's
# spatial shape, rows, adapters, r)
CONV_CASES = (
    ("ViT-B/16 patch embedding", torch.nn.Conv2d, 3, 768, 16, dict(stride=16), (224, 224), 16, 4, 16),
    ("Whisper-tiny conv2", torch.nn.Conv1d, 384, 384, 3, dict(stride=2, padding=1), (1500,), 8, 4, 8),
)


def _peft_conv(conv, n, r):
    """peft's LoraModel over a copy of `conv` holding n adapters of rank r (random: for timing only), or None."""
    try:
        import peft
    except ImportError:
        return None
    import copy
    model = peft.get_peft_model(torch.nn.Sequential(copy.deepcopy(conv)),
                                peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    return model.eval()


def conv_case_rows(case, dtype, device, repeats, compare, shim):
    """A convolution's mixed batch (rows cycling through the adapters) against the plain conv, one adapter for the
    whole batch (unmerged) and peft's adapter_names."""
    name, cls, c_in, c_out, k, kwargs, spatial, n_rows, n, r = case
    gen = torch.Generator().manual_seed(0)
    place = shim.place(device)
    layer = lora_ext.ConvLoRA(cls, c_in, c_out, k, r=r, merge_weights=False, **kwargs)
    for i in range(n):
        a_shape, b_shape = layer.factor_shapes(r)
        layer.add_adapter(f"a{i}", torch.randn(a_shape, generator=gen) * 0.02,
                          torch.randn(b_shape, generator=gen) * 0.02, 2.0)
    layer.set_adapter("a0")
    layer.delete_adapter("default")
    layer = layer.to(place, dtype).eval()
    model = torch.nn.Sequential(layer)
    peft_model = _peft_conv(layer.conv, n, r)
    names = [f"a{i % n}" for i in range(n_rows)]
    x = torch.randn(n_rows, c_in, *spatial, generator=gen).to(place, dtype)
    lora_ext.configure_slots(model, slots=max(n, 8), max_rank=r)
    candidates = {"plain": lambda: layer.conv(x), "one adapter (lora_ext)": lambda: model(x)}

    def mixed():
        with lora_ext.batch_adapters(model, names):
            return model(x)
    candidates["lora_ext mixed (open+forward)"] = mixed
    based = [None if i % 4 == 3 else name for i, name in enumerate(names)]  # (a quarter of the rows the base)

    def mixed_based():
        with lora_ext.batch_adapters(model, based):
            return model(x)
    candidates["lora_ext mixed, 1/4 base rows (open+forward)"] = mixed_based
    if peft_model is not None:
        peft_model = peft_model.to(place, dtype)
        candidates["peft adapter_names"] = lambda: peft_model(x, adapter_names=names)
        candidates["peft adapter_names, 1/4 base rows"] = lambda: peft_model(
            x, adapter_names=[n or "__base__" for n in based])
    with torch.no_grad():
        times = compare(candidates, device, repeats)
    case_name = f"mixed batch conv {name} rows={n_rows} adapters={n} r={r}"
    out = [dict(case=case_name, impl=impl, ms=t * 1e3, ratio=t / times["plain"]) for impl, t in times.items()]
    mixed_t = times["lora_ext mixed (open+forward)"]
    out.append(dict(case=case_name, impl="mixed / one adapter", ratio=mixed_t / times["one adapter (lora_ext)"]))
    if "peft adapter_names" in times:
        out.append(dict(case=case_name, impl="peft / lora_ext mixed", ratio=times["peft adapter_names"] / mixed_t))
    return out


def rows(device, quick, repeats, compare, shim, dim=None, dtype=None):
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    out = []
    for case in grid(device, quick, dim):
        out += case_rows(*case, dtype, device, repeats, compare, shim)
    if not quick and not getattr(shim, "rehearsal", False):
        for case in CONV_CASES:
            out += conv_case_rows(case, dtype, device, repeats, compare, shim)
    return out
