"""The lora-ext command."""
import argparse
import json
import sys


def _bench(args):
    from . import bench

    result = bench.run(device=args.device, quick=args.quick, dim=args.dim)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(bench.format_table(result))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="lora-ext", description="lora_ext: a drop-in, faster loralib")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="side-by-side benchmark: lora_ext vs loralib vs plain torch")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--dim", type=int, default=4096, help="layer width (default 4096)")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
