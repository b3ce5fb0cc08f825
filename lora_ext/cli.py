"""The lora-ext command."""
import argparse
import json
import os
import signal
import sys
import threading


def _bench_refusal(args):
    """The message refusing options that would be ignored or could not be honoured, or None; checked before
    anything runs (a bench takes minutes)."""
    if args.dim is not None and args.dim < 1:
        return f"--dim must be a positive width, got {args.dim}"
    if args.lossless:
        ignored = [o for o, on in (("--batched", args.batched), ("--rehearse", args.rehearse),
                                   ("--device cuda", args.device == "cuda"), ("--quick", args.quick)) if on]
        if ignored:
            return f"--lossless runs on the CPU only; it cannot honour {', '.join(ignored)}"
        if args.steps is not None and args.steps < 1:
            return f"--steps must be positive, got {args.steps}"
        if args.switches is not None and min(args.switches) < 1:
            return f"--switches must be positive counts, got {args.switches}"
    else:
        given = [o for o, v in (("--switches", args.switches), ("--steps", args.steps)) if v is not None]
        if given:
            return f"{' and '.join(given)} only apply with --lossless"
    if args.json is not None:
        if not args.json.strip():  # (an unset variable: the results would be written nowhere, silently)
            return f"--json: {args.json!r} is not a path; give the file to write"
        parent = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            return f"--json: {args.json!r} is a directory; give a file path"
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            return f"--json: cannot write {args.json!r} (its directory {parent!r} is missing or not writable)"
    return None


def _write_json(path, obj):
    from .serving.files import atomic_path

    if os.path.islink(path):  # (written where the link points, as open() would; the link stays)
        path = os.path.realpath(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


def _bench(args):
    from . import bench

    refusal = _bench_refusal(args)
    if refusal:
        print(f"lora-ext bench: error: {refusal}", file=sys.stderr)
        return 2
    if args.lossless:
        return _bench_lossless(args)
    if args.rehearse and args.device == "cpu":
        print("lora-ext bench: error: --rehearse rehearses the CUDA run (--device cuda), not --device cpu",
              file=sys.stderr)
        return 2
    device = "cuda" if args.rehearse else args.device or "cpu"
    dim = args.dim or (bench.REHEARSAL_DIM if args.rehearse else 4096)
    rows, status = [], 0
    # a run stopped by SIGTERM (`timeout`, as bench/gpu_check.sh stops a step) or Ctrl-C keeps what it measured
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        result = bench.run(device=device, quick=args.quick, dim=dim, rehearse=args.rehearse, batched=args.batched,
                           sink=rows)
    except (KeyboardInterrupt, _Terminated) as e:
        why = "stopped by SIGTERM" if isinstance(e, _Terminated) else "stopped by Ctrl-C"
        result, status = bench.partial(device, args.quick, dim, rows, why, rehearse=args.rehearse), 1
        print(f"lora-ext bench: {why} after {len(rows)} rows; the table and the JSON hold those", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.json is not None:
        _write_json(args.json, result)
    print(bench.format_table(result))
    return status


class _Terminated(Exception):
    pass


def _terminated(signum, frame):
    raise _Terminated()


def _bench_lossless(args):
    """The record's size and exception rate, and the drift table (CPU)."""
    from . import bench_lossless

    checkpoints = tuple(args.switches or (10, 100, 1000, 5000))
    record = bench_lossless.record_rows(dim=args.dim or 1024, demo_steps=args.steps or 100)
    drift = bench_lossless.drift_rows(dim=args.dim or 1024, checkpoints=checkpoints)
    if args.json is not None:
        _write_json(args.json, dict(record=record, drift=drift))
    print("| case | code bytes per element | target | met | exception rate | + exception bytes per element |\n"
          "|---|---:|---:|---|---:|---:|")
    for row in record:
        print(f"| {row['case']} | {row['value']:.4f} | <= {row['target']} | {'yes' if row['met'] else 'NO'} | "
              f"{row['exceptions']:.3%} | {row['exception_bytes']:.4f} |")
    print()
    print(bench_lossless.format_drift(drift))
    missed = [row for row in record + drift if row.get("met") is False]
    return 1 if missed else 0


def _merge(args):
    from .serving.merge_cli import run

    return run(args)


def _demo(args):
    from .serving import demo

    return demo.run(device=args.device, steps=args.steps, out=args.out, quiet=args.quiet)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="lora-ext", description="lora_ext: a drop-in, faster loralib")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="side-by-side benchmark: lora_ext vs loralib vs plain torch")
    b.add_argument("--device", choices=["cpu", "cuda"], help="where to run (default cpu)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--dim", type=int, help="layer width (default 4096; with --rehearse, a tiny one)")
    b.add_argument("--rehearse", action="store_true",
                   help="rehearse the CUDA run on the CPU: all its rows, lora_ext._sim standing in for the CUDA "
                        "kernels, tiny shapes, one repeat; checks the code, measures nothing")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    b.add_argument("--lossless", action="store_true",
                   help="lossless merges: the record's bytes and exception rate, and the drift of the base weight "
                        "under in-place switches (lora_ext lossless and lossy, peft, loralib); CPU")
    b.add_argument("--batched", action="store_true",
                   help="mixed batches only (lora.batch_adapters): decode 32/64 rows x 1 token and prefill 8 x 128, "
                        "8 and 32 adapters, r 16 and 64, widths 1024 and 4096 (or --dim), against the plain layer, "
                        "one adapter for the batch and peft's adapter_names")
    b.add_argument("--switches", type=int, nargs="+", metavar="N",
                   help="with --lossless: the switch counts of the drift table (default 10 100 1000 5000)")
    b.add_argument("--steps", type=int,
                   help="with --lossless: training steps of the demo's adapters (default 100)")
    b.set_defaults(func=_bench)
    m = sub.add_parser("merge", help="merge a peft LoRA adapter into a safetensors checkpoint, streaming")
    m.add_argument("--base", required=True, help="model directory (sharded or not) or a .safetensors file")
    m.add_argument("--adapter", required=True,
                   help="peft LoRA adapter directory, or a Hugging Face Hub repo id (owner/name) to fetch")
    m.add_argument("--revision", help="with a Hub repo id: the branch, tag or commit of the adapter")
    m.add_argument("--out", required=True, help="output directory (or file, when --base is a file)")
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to merge (default cpu)")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="floating-point dtype of the output (default: as the input)")
    m.add_argument("--force", action="store_true",
                   help="replace an existing --out (file or directory); never the base or anything inside it")
    m.add_argument("--allow-inf", action="store_true",
                   help="write values that became inf/NaN in the output dtype (counted on stderr) instead of failing")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_merge)
    d = sub.add_parser("demo", help="inject, train, save/load a peft adapter, merge and swap on a small GPT-2")
    d.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    d.add_argument("--steps", type=int, default=200, help="training steps per adapter (default 200)")
    d.add_argument("--out", metavar="DIR", help="keep the saved adapters in DIR (default: a temporary directory)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
