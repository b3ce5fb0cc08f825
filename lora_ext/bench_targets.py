"""Every target of `lora-ext bench`, in one table: what is measured, the floor it is measured against, the
bound, and why. lora_ext/bench.py takes every bound from here; bench/TARGETS.md explains the floors.

A floor is the least work that does the same job with plain torch (or a plain copy), timed side by side in
the same process, so a bound is a ratio to it and holds on any machine. Kinds of bound:

  ratio<=    our time / the floor's time <= bound                   (the table prints "<= bound")
  speedup>=  the other implementation's time / ours >= bound        (">= bound x")
  speedup>   the other implementation's time / ours > bound         ("> bound x")
  share>=    our bandwidth / the floor's bandwidth >= bound          (">= bound% of copy")
  MiB<=      peak extra memory of one merge, MiB <= bound (absolute; the floor's is reported beside it)
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    case: str
    floor: str
    bound: float
    kind: str
    why: str
    devices: tuple = ("cpu", "cuda")  # where `lora-ext bench --device ...` reports the row

    def label(self):
        """The target as `lora-ext bench` prints it (a number where the bound is a ratio or MiB maximum)."""
        if self.kind in ("ratio<=", "MiB<="):
            return self.bound
        if self.kind == "speedup>=":
            return f">= {self.bound}x"
        if self.kind == "speedup>":
            return f"> {self.bound:g}x"
        if self.kind == "share>=":
            return f">= {self.bound:.0%} of copy"
        raise ValueError(f"unknown target kind {self.kind!r}")

    def met(self, value):
        return {"ratio<=": value <= self.bound, "MiB<=": value <= self.bound, "speedup>=": value >= self.bound,
                "speedup>": value > self.bound, "share>=": value >= self.bound}[self.kind]


# The table. Row names are the keys bench.py uses; `case` names the bench rows they apply to (d: --dim).
TARGETS = {
    # -- merge / unmerge -----------------------------------------------------------------------------
    "merge_cycle.linear": Target(
        case="merge+unmerge linear d r=16: Linear(d, d) eval() then train(), lora_ext",
        floor="addmm_: two in-place rank-16 addmm_ on the weight, +s then -s (the same two passes)",
        bound=1.2, kind="ratio<=",
        why="A cycle is two rank-r passes over W, as the floor; the 20% is for the layer's per-merge host "
            "work (lock, the copy of the merged factors, finite-value stamps) and a shared machine's noise."),
    "merge_cycle.merged": Target(
        case="merge+unmerge merged d r=8: MergedLinear(d, 3d) [T,F,T] eval() then train(), lora_ext",
        floor="addmm_: four in-place rank-8 addmm_ on the two enabled row blocks, +s then -s",
        bound=1.2, kind="ratio<=",
        why="As for Linear: only the enabled blocks are written, once per merge, like the floor."),
    "merge_peak": Target(
        case="peak extra MiB, merge {linear d r=16, merged d r=8}: one merge (eval()), lora_ext",
        floor="none (absolute); one in-place addmm_ pass per enabled block is measured beside it",
        bound=4.0, kind="MiB<=",
        why="No weight-sized temporary (loralib: +128 MiB for Linear(4096), +384 MiB for the MergedLinear); "
            "4 MiB holds the merged factors' copy (0.5 MiB at d=4096, r=16, fp32) and allocator/BLAS slack, "
            "and is far under one 64 MiB weight."),
    # -- unmerged forward, CPU rows (run()) -------------------------------------------------------------
    "forward.merged.tokens1": Target(
        case="forward merged d r=8 tokens=1: unmerged MergedLinear(d, 3d) [T,F,T] forward, no grad",
        floor="plain: F.linear with the same weight (what the layer costs merged)",
        bound=1.1, kind="ratio<=",
        why="At 1 token the GEMV reads 3d x d weights; the LoRA path reads 2 x (r x d) + (d x r) factors and "
            "writes one output: well under 10% of the bytes."),
    "forward.merged.tokens64": Target(
        case="forward merged d r=8 tokens=64", floor="plain: F.linear with the same weight",
        bound=1.1, kind="ratio<=",
        why="LoRA flops are 2r/(3d) of the GEMM's per enabled block; the extra launches fit in 10%."),
    "forward.linear.tokens2048": Target(
        case="forward linear d r=16 tokens=2048", floor="plain: F.linear with the same weight",
        bound=1.03, kind="ratio<=",
        why="Compute-bound: the LoRA path adds 2r/d = 0.8% of the GEMM's flops at d=4096, r=16."),
    # -- adapter switch ----------------------------------------------------------------------------------
    "switch": Target(
        case="adapter switch, merged linear d r=16 (floor: one rank-32 addmm_): ops.swap_ and set_adapter",
        floor="addmm_ rank 2r: one in-place addmm_ of rank r1+r2 = 32 (both adapters' factors stacked "
              "beforehand, outside the timing)",
        bound=1.1, kind="ratio<=",
        why="A switch is one rank-(r1+r2) update: W read and written once, 2(r1+r2) flops per element, which "
            "is exactly the floor's work. The 10% is for stacking the factors (CPU) and set_adapter's "
            "bookkeeping. The rank-16 merge (the old floor) is reported beside it without a target: it does "
            "half the flops, so a bound on it charged the switch for MKL's rank-32 cost."),
    # -- CUDA only: merge kernels (merge_kernel_rows) -------------------------------------------------
    "merge_kernel.of_copy": Target(
        case="merge linear {4096, 8192} r={8, 16, 64} (one merge over rotating weights), lora_ext",
        floor="copy: device-to-device copy_ of the same bytes (the bandwidth ceiling)",
        bound=0.85, kind="share>=", devices=("cuda",),
        why="A merge reads and writes W once, like a copy, and is memory-bound at every tested rank on tensor "
            "cores (bench/NOTES-merge.md); 15% is left for staging the factors."),
    "merge_kernel.vs_addmm": Target(
        case="merge linear {4096, 8192} r={8, 16, 64}: lora_ext speed-up over addmm_",
        floor="addmm_: one in-place rank-r addmm_ in the weight's dtype",
        bound=1.0, kind="speedup>=", devices=("cuda",),
        why="The floor does the same pass; the kernel must be no slower (it also accumulates in fp32 and "
            "rounds once)."),
    "merge_kernel.vs_loralib.linear": Target(
        case="merge linear {4096, 8192} r={8, 16, 64}: lora_ext speed-up over loralib",
        floor="loralib's merge (a comparison, not a floor)",
        bound=3.0, kind="speedup>=", devices=("cuda",),
        why="loralib materialises B@A, scales it into a second temporary and adds it: about three times "
            "the weight bytes of one in-place pass."),
    "merge_kernel.vs_loralib.merged": Target(
        case="merge merged 4096 r=8: lora_ext speed-up over loralib",
        floor="loralib's merge (a comparison, not a floor)",
        bound=5.0, kind="speedup>=", devices=("cuda",),
        why="loralib builds the dense delta of all three blocks (zero_pad) and adds it, disabled block "
            "included; lora_ext writes the two enabled blocks once."),
    # -- CUDA only: unmerged forward kernels (forward_kernel_rows; tests run it on tiny CPU layers) ------
    "forward_kernel.linear.eager.M1": Target(
        case="forward Linear(d, d) r=16 M=1, eager", floor="plain: nn.Linear with the merged weights",
        bound=1.5, kind="ratio<=", devices=("cuda",),
        why="About 9 us of GPU work at M=1: eager it is host-bound, and the op's one pybind call plus "
            "launches must stay within ~4 us of F.linear's own host cost (bench/NOTES-forward.md)."),
    "forward_kernel.linear.eager": Target(
        case="forward Linear(d, d) r=16 M in {16, 256, 4096}, eager",
        floor="plain: nn.Linear with the merged weights",
        bound=1.15, kind="ratio<=", devices=("cuda",),
        why="Predicted 1.09x at M=4096 (the LoRA kernels' own bytes beside a compute-bound GEMM) and less "
            "at M=16/256 (bench/NOTES-forward.md)."),
    "forward_kernel.merged.eager": Target(
        case="forward MergedLinear(d, 3d) r=8 [T,F,T], every M, eager",
        floor="plain: nn.Linear with the merged weights",
        bound=1.15, kind="ratio<=", devices=("cuda",),
        why="Predicted 1.05-1.06x: three times the plain work for the same LoRA work."),
    "forward_kernel.linear.graph.M1": Target(
        case="forward Linear(d, d) r=16 M=1, CUDA graph replay", floor="plain under the same graph replay",
        bound=1.1, kind="ratio<=", devices=("cuda",),
        why="No host cost left: the fused decode kernel must hide its A read behind the 7.8 us GEMV "
            "(predicted 1.15-1.25x, so probably missed; bench/NOTES-forward.md says what comes next)."),
    "forward_kernel.merged.graph.M1": Target(
        case="forward MergedLinear(d, 3d) r=8 [T,F,T] M=1, CUDA graph replay",
        floor="plain under the same graph replay",
        bound=1.15, kind="ratio<=", devices=("cuda",),
        why="As eager, without the host cost."),
    "forward_kernel.vs_others": Target(
        case="forward ...: lora_ext speed-up over loralib / peft (every forward_kernel_rows case)",
        floor="loralib's and peft's layers (a comparison, not a floor)",
        bound=1.0, kind="speedup>", devices=("cuda",),
        why="A drop-in replacement must not be slower than what it replaces."),
    # -- lossless merges (docs/LOSSLESS.md) --------------------------------------------------------------
    "lossless.merge": Target(
        case="lossless merge, {float32, bfloat16} weight d r=16: ops.merge_(lossless=True) and its unmerge_",
        floor="the lossy ops.merge_ pass (the in-place addmm_ floor is reported beside it)",
        bound=1.3, kind="ratio<=", devices=("cpu",),
        why="One pass over W as the lossy merge, plus the codes (1/8 of a 16-bit weight) and, per element, the "
            "ordinal, its residue and two trial restores (docs/LOSSLESS.md)."),
    "lossless.switch": Target(
        case="lossless switch, {float32, bfloat16} weight d r=16: ops.swap_(record=...)",
        floor="the lossy ops.swap_ (one pass, one rank-32 update)",
        bound=1.3, kind="ratio<=", devices=("cpu",),
        why="Still one pass over W: restore with the old adapter's record, merge the new one, write W and the "
            "new codes; the same bytes as the lossy switch plus the codes read and written."),
    "lossless.merge.cuda": Target(
        case="lossless merge, {float32, bfloat16} weight d r=16 on a GPU",
        floor="the lossy ops.merge_ kernel",
        bound=1.2, kind="ratio<=", devices=("cuda",),
        why="Memory-bound: the lossless pass moves W twice plus 1/8 of W (the codes), the lossy one W twice."),
    "lossless.switch.cuda": Target(
        case="lossless switch, {float32, bfloat16} weight d r=16 on a GPU",
        floor="the lossy ops.swap_ kernel",
        bound=1.2, kind="ratio<=", devices=("cuda",),
        why="As the merge: W twice plus the old and the new codes (1/4 of a 16-bit W)."),
    "lossless.record": Target(
        case="record: code bytes per weight element (the exceptions' 12 bytes each reported beside them)",
        floor="none (absolute)",
        bound=0.25, kind="ratio<=", devices=("cpu",),
        why="2-bit codes are 0.25 byte per element of a 16-bit weight; exceptions come on top (reported: their "
            "rate is the design's cost, high only where the update dwarfs the weight)."),
    "lossless.drift": Target(
        case="drift: share of base elements changed after n switches, lora_ext lossless",
        floor="none (absolute: the base must come back bit for bit)",
        bound=0.0, kind="ratio<=", devices=("cpu",),
        why="The issue's promise: 0 base bits changed after any sequence of merges, unmerges and switches."),
    # -- mixed batches (lora.batch_adapters) ------------------------------------------------------------
    "batched.decode.1024": Target(
        case="mixed batch decode 1024 rows=32x1 adapters=32 r=16: lora_ext mixed (forward)",
        floor="plain: F.linear on the layer's weight (no LoRA)",
        bound=1.3, kind="ratio<=", devices=("cpu",),
        why="One pass per stage over the rows reads each row's adapter (32 x 2 x 16 x 1024 values, as much as W "
            "itself) with no per-adapter launches or Python loop; peft's adapter_names loop measured 3.6x."),
    "batched.decode.4096": Target(
        case="mixed batch decode 4096 rows=32x1 adapters=8 r=16: lora_ext mixed (forward)",
        floor="plain: F.linear on the layer's weight (no LoRA)",
        bound=1.1, kind="ratio<=", devices=("cpu",),
        why="At 4096 the adapters' bytes are 1/16 of W's: the update should cost about that (peft: 1.16x)."),
    "batched.vs_one": Target(
        case="mixed batch ...: lora_ext mixed (forward) / one adapter (lora_ext) for the whole batch",
        floor="one adapter for the whole batch: the same layer unmerged, its active adapter",
        bound=1.1, kind="ratio<=", devices=("cpu",),
        why="Serving each row its own adapter must not cost more than 10% over one shared adapter."),
    "batched.decode.graph.cuda": Target(
        case="mixed batch decode 4096 rows=64x1 adapters=64 r=16 on a GPU under CUDA graph replay",
        floor="plain: F.linear on the layer's weight",
        bound=1.3, kind="ratio<=", devices=("cuda",),
        why="Two gather launches read 64 x 2 x 16 x 4096 x 2 B = 16 MiB against W's 32 MiB (bench/NOTES-batched.md)."),
    "batched.vs_one.cuda": Target(
        case="mixed batch ... on a GPU: lora_ext mixed (forward) / one adapter (lora_ext)",
        floor="one adapter for the whole batch",
        bound=1.1, kind="ratio<=", devices=("cuda",),
        why="As on the CPU."),
    "batched.vs_peft.cuda": Target(
        case="mixed batch ... on a GPU: peft adapter_names / lora_ext mixed (forward)",
        floor="peft's adapter_names (a comparison, not a floor)",
        bound=10.0, kind="speedup>=", devices=("cuda",),
        why="peft launches several kernels per distinct adapter; lora_ext two per layer whatever the mix."),
}


def get(key):
    return TARGETS[key]


def fields(key, value):
    """{"target": ..., "met": ...} for a bench row whose measured value (ratio, speed-up, share or MiB) is
    `value`."""
    t = TARGETS[key]
    return {"target": t.label(), "met": bool(t.met(value))}


def markdown():
    """The table as Markdown (bench/TARGETS.md quotes it)."""
    lines = ["| target | case | floor | bound | devices | why |", "|---|---|---|---|---|---|"]
    for key, t in TARGETS.items():
        bound = t.label() if isinstance(t.label(), str) else (
            f"<= {t.bound} MiB" if t.kind == "MiB<=" else f"<= {t.bound}x")
        lines.append(f"| {key} | {t.case} | {t.floor} | {bound} | {', '.join(t.devices)} | {t.why} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
