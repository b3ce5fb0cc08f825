"""Benchmarks of lossless merges (docs/LOSSLESS.md), part of `lora-ext bench`:

- `timing_rows`: a lossless merge (and its unmerge) and a lossless switch against the lossy merge pass and
  switch, and the in-place addmm_ floor, on float32 and bfloat16 weights;
- `record_rows`: the record's bytes per weight element and its exception rate, on random adapters at the scale
  of the drift table and on the demo's trained adapters (`lora-ext bench --lossless`);
- `drift_rows`: how far the base weight walks under in-place adapter switches: lora_ext lossless and lossy,
  peft (unmerge + merge) and loralib (train() + new factors + eval()) (`lora-ext bench --lossless`).
"""
import copy
import random
import tempfile

import torch

import lora_ext
from lora_ext import bench_targets as targets
from lora_ext import lossless, ops

_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _adapter(shape_a, shape_b, device, gen, std=0.01):
    return (torch.randn(shape_a, generator=gen).mul_(std).to(device),
            torch.randn(shape_b, generator=gen).mul_(std).to(device))


def timing_rows(dim, device, repeats, compare, place, r=16):
    """Lossless merge and switch against the lossy ones, float32 and bfloat16 weights (dim x dim, r)."""
    rows = []
    suffix = ".cuda" if device == "cuda" else ""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        dev = place(device)
        w = (torch.randn(dim, dim, generator=gen) * 0.02).to(dev, dtype)
        (A1, B1), (A2, B2) = (_adapter((r, dim), (dim, r), dev, gen) for _ in range(2))
        s = 2.0
        w_lossy, w_floor, w_exact, w_swap = w.clone(), w.clone(), w.clone(), w.clone()
        rec = {"merge": None, "swap": ops.merge_(w_swap, A1, B1, s, lossless=True), "on": 1}
        signs = iter([1.0, -1.0] * (4 * repeats + 8))
        floor_signs = iter([1.0, -1.0] * (4 * repeats + 8))
        flips = iter([0, 1] * (4 * repeats + 8))
        pairs = [(A1, B1, s), (A2, B2, s)]
        Bf, Af = (B1 * s).to(dtype), A1.to(dtype)

        def exact_merge():  # a lossless merge, then (next call) its unmerge: each call is one pass
            if rec["merge"] is None:
                rec["merge"] = ops.merge_(w_exact, A1, B1, s, lossless=True)
            else:
                ops.unmerge_(w_exact, A1, B1, s, record=rec["merge"])
                rec["merge"] = None

        def lossy_swap():
            i = next(flips)
            ops.swap_(w_lossy, *pairs[i], *pairs[1 - i], check_values=False)

        def exact_swap():
            i = rec["on"]
            rec["swap"] = ops.swap_(w_swap, *pairs[1 - i], *pairs[i], record=rec["swap"], check_values=False)
            rec["on"] = 1 - i

        floor = f"addmm_ rank {r}"
        times = compare({floor: lambda: w_floor.addmm_(Bf, Af, alpha=next(floor_signs)),
                         "lossy ops.merge_": lambda: ops.merge_(w_lossy, A1, B1, next(signs) * s),
                         "lossless ops.merge_/unmerge_": exact_merge,
                         "lossy ops.swap_": lossy_swap,
                         "lossless ops.swap_": exact_swap}, device, repeats)
        name = str(dtype).replace("torch.", "")
        case = f"lossless merge, {name} weight {dim} r={r}"
        for impl in ("lossy ops.merge_", "lossless ops.merge_/unmerge_", floor):
            row = dict(case=case, impl=impl, ms=times[impl] * 1e3, ratio=times[impl] / times["lossy ops.merge_"])
            if impl.startswith("lossless"):
                row.update(targets.fields("lossless.merge" + suffix, row["ratio"]))
            rows.append(row)
        case = f"lossless switch, {name} weight {dim} r={r}"
        for impl in ("lossy ops.swap_", "lossless ops.swap_"):
            row = dict(case=case, impl=impl, ms=times[impl] * 1e3, ratio=times[impl] / times["lossy ops.swap_"])
            if impl.startswith("lossless"):
                row.update(targets.fields("lossless.switch" + suffix, row["ratio"]))
            rows.append(row)
    return rows


def _record_row(case, records, elements):
    """The codes' bytes per weight element (the target) and, beside them, the exception rate and the bytes the
    exceptions add (12 per exception: index and original bits)."""
    nbytes = sum(rec.codes.numel() * rec.codes.element_size() for rec in records)
    exc = sum(rec.exceptions for rec in records)
    per = nbytes / elements
    return dict(case=case, impl="lora_ext lossless", value=per, exceptions=exc / elements,
                exception_bytes=12 * exc / elements, **targets.fields("lossless.record", per))


def record_rows(dim=1024, adapters=8, r=16, demo_steps=100):
    """Bytes per weight element (codes, plus 12 bytes per exception) and the exception rate."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        w0 = (torch.randn(dim, dim, generator=gen) * 0.02).to(dtype)
        records = []
        for _ in range(adapters):
            A, B = _adapter((r, dim), (dim, r), "cpu", gen)
            records.append(ops.merge_(w0.clone(), A, B, 2.0, lossless=True))
        name = str(dtype).replace("torch.", "")
        rows.append(_record_row(f"record, {name} Linear({dim}, {dim}), {adapters} random adapters r={r} "
                                f"(A, B ~ N(0, 0.01), alpha = 2r, W ~ N(0, 0.02))", records, dim * dim * adapters))
    rows.append(_demo_record_row(demo_steps))
    return rows


def _demo_record_row(steps):
    """The demo's two trained adapters (GPT-2 style, 2 layers, width 64, r=8), merged losslessly into the bfloat16
    weights of a fresh copy (on the reference, with no exception limit, so that the rate is measured whatever it
    is). Also reports the median ||s B A|| / ||W|| of its layers: these adapters are trained hard (a tiny model
    learns its task in `steps` steps), far above a fine-tune's usual few per cent."""
    import contextlib
    import io
    import math

    from lora_ext.serving import adapters, demo, peft_io
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        demo.run("cpu", steps=steps, out=out, quiet=True)
        torch.manual_seed(0)
        model = demo._model("cpu").to(torch.bfloat16)
        for name in ("plus1", "plus3"):
            peft_io.load_peft_adapter(model, f"{out}/{name}", name, activate=False, merge_weights=False)
    records, elements, ratios = [], 0, []
    for _, m in adapters.lora_layers(model):
        for name in ("plus1", "plus3"):
            A, B, s = m.get_adapter(name)
            w = m.weight_2d().detach().clone()
            layout = m.layout()
            records.append(lossless.merge_(w, A, B, s, layout.get("num_blocks", 1), layout.get("block_ids", [0]),
                                           layout.get("transposed", False), limit=math.inf))
            elements += w.numel()
            d = ops.delta_weight(A, B, s, out_features=m.out_features, **layout).double()
            ratios.append((d.norm() / m.weight_2d().double().norm()).item())
    ratios.sort()
    row = _record_row(f"record, the demo's trained adapters (2, r=8, {steps} steps; median ||sBA|| / ||W|| "
                      f"{ratios[len(ratios) // 2]:.2f}) merged into a bfloat16 GPT-2 (2 layers, width 64)",
                      records, elements)
    return row


def _changed(w, w0):
    changed = (w.view(_INT[w.dtype]) != w0.view(_INT[w0.dtype])).double().mean().item()
    rms = ((w.double() - w0.double()).pow(2).mean().sqrt() / w0.double().pow(2).mean().sqrt()).item()
    return changed, rms


def drift_rows(dim=1024, r=16, adapters=8, checkpoints=(10, 100, 1000, 5000), dtype=torch.bfloat16, seed=0):
    """The base weight after n in-place switches in random order among `adapters` adapters (then unmerged):
    the share of elements whose bits changed and rms(W - W0) / rms(W0), per implementation."""
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(dim, dim, generator=gen) * 0.02).to(dtype)
    ads = [_adapter((r, dim), (dim, r), "cpu", gen) for _ in range(adapters)]
    rows = []
    for impl, run in _drift_impls(w0, ads, r, dtype).items():
        if run is None:
            continue
        for n, w in run(checkpoints, random.Random(seed)):
            changed, rms = _changed(w, w0)
            row = dict(case=f"drift, {str(dtype).replace('torch.', '')} Linear({dim}, {dim}) r={r}, {adapters} "
                            f"adapters, {n} switches", impl=impl, changed=changed, rms=rms)
            if impl == "lora_ext lossless":
                row.update(targets.fields("lossless.drift", changed))
            rows.append(row)
    return rows


def _drift_impls(w0, ads, r, dtype):
    dim = w0.shape[0]

    def lora_ext_walk(exact):
        def walk(checkpoints, rng):
            layer = lora_ext.Linear(dim, dim, r=r, lora_alpha=2 * r, lossless=exact).to(dtype)
            layer.requires_grad_(False)
            layer.weight.copy_(w0)
            for i, (A, B) in enumerate(ads):
                layer.add_adapter(f"a{i}", A, B, 2.0)
            layer.set_adapter("a0")
            layer.eval()
            for n in range(1, max(checkpoints) + 1):
                layer.set_adapter(f"a{rng.randrange(len(ads))}")
                if n in checkpoints:
                    yield n, layer.state_dict()["weight"]  # the base, as train() would give it back
        return walk

    def peft_walk(checkpoints, rng):
        import peft
        base = torch.nn.Sequential(torch.nn.Linear(dim, dim)).to(dtype)
        base[0].weight.data.copy_(w0)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
        model = peft.get_peft_model(base, cfg, adapter_name="a0")
        for i in range(1, len(ads)):
            model.add_adapter(f"a{i}", cfg)
        layer = model.base_model.model[0]
        with torch.no_grad():
            for i, (A, B) in enumerate(ads):
                layer.lora_A[f"a{i}"].weight.copy_(A)
                layer.lora_B[f"a{i}"].weight.copy_(B)
        layer.merge(adapter_names=["a0"])
        for n in range(1, max(checkpoints) + 1):
            layer.unmerge()
            layer.merge(adapter_names=[f"a{rng.randrange(len(ads))}"])
            if n in checkpoints:
                reader = copy.deepcopy(layer)  # unmerged apart: the walk goes on undisturbed
                reader.unmerge()
                yield n, reader.base_layer.weight.detach()

    def loralib_walk(checkpoints, rng):
        import loralib
        layer = loralib.Linear(dim, dim, r=r, lora_alpha=2 * r).to(dtype)
        layer.requires_grad_(False)
        layer.weight.copy_(w0)
        for n in range(0, max(checkpoints) + 1):
            layer.train()  # unmerge
            A, B = ads[rng.randrange(len(ads))] if n else ads[0]
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            layer.eval()  # merge
            if n in checkpoints:
                reader = copy.deepcopy(layer)
                reader.train()
                yield n, reader.weight.detach()

    impls = {"lora_ext lossless": lora_ext_walk(True), "lora_ext lossy": lora_ext_walk(False)}
    try:
        import peft  # noqa: F401
        impls["peft unmerge+merge"] = peft_walk
    except ImportError:
        impls["peft unmerge+merge"] = None
    try:
        import loralib  # noqa: F401
        impls["loralib train()/eval()"] = loralib_walk
    except ImportError:
        impls["loralib train()/eval()"] = None
    return impls


def format_drift(rows):
    lines = ["| switches | impl | base elements changed | rms(W - W0) / rms(W0) |", "|---:|---|---:|---:|"]
    for row in rows:
        n = row["case"].rsplit(", ", 1)[1].split()[0]
        lines.append(f"| {n} | {row['impl']} | {row['changed']:.1%} | {row['rms']:.2g} |")
    return "\n".join(lines)
