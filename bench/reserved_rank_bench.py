"""What a reserved rank (lora.reserve_rank) costs and what hotswap_adapter saves, side by side in one process,
median of repeats:

1. an unmerged Linear forward of a rank-r adapter, as it is and padded to larger ranks (the price of one storage
   for every adapter);
2. on a small Llama (transformers, random weights) holding two peft adapters of other ranks and targets: a
   model-level switch between them, reserved and not; and replacing one adapter's weights from a peft directory:
   lora.hotswap_adapter, lora.load_peft_adapter into the same name, and peft's hotswap_adapter.

    .venv/bin/python bench/reserved_rank_bench.py [--dim 4096] [--rank 8] [--pad 16 64] [--tokens 16 512]
"""
import argparse
import statistics
import tempfile

import torch
from trainable_tokens_bench import _time  # (bench/ is the script's folder: the median of repeats, one warm-up)


def forward_costs(args):
    import lora_ext as lora
    rows, made = [], {}
    for rank in (args.rank, *args.pad):
        layer = lora.Linear(args.dim, args.dim, r=args.rank, lora_alpha=2 * args.rank).requires_grad_(False)
        with torch.no_grad():
            layer.lora_B.normal_()
        if rank != args.rank:
            layer.reserve_rank(rank)
        made[rank] = layer
    for tokens in args.tokens:
        x = torch.randn(tokens, args.dim)
        samples = {rank: [] for rank in made}
        for _ in range(3):  # rounds, the ranks alternated: a noisy machine's drift reaches each alike
            for rank, layer in made.items():
                with torch.no_grad():
                    samples[rank].append(_time(lambda: layer(x), args.repeats))
        rows.append((tokens, {rank: statistics.median(t) for rank, t in samples.items()}))
    print(f"\nunmerged Linear {args.dim}x{args.dim} float32 forward, a rank-{args.rank} adapter held at rank R (ms)")
    print("| tokens | " + " | ".join(f"R={r}" for r in (args.rank, *args.pad)) + " |")
    print("|---:|" + "---:|" * (1 + len(args.pad)))
    for tokens, times in rows:
        base = times[args.rank]
        print(f"| {tokens} | " + " | ".join(f"{t * 1e3:.3f}" + ("" if r == args.rank else f" ({t / base:.2f}x)")
                                           for r, t in times.items()) + " |")


def model_costs(args):
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_ext as lora
    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=1000)

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()

    specs = {"a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "b": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
             "a2": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    with tempfile.TemporaryDirectory() as root:
        for name, kwargs in specs.items():
            pm = get_peft_model(base(), LoraConfig(**kwargs))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.normal_(0, 0.05)
            pm.save_pretrained(f"{root}/{name}")
        results = {}
        for reserved in (False, True):
            model = base()
            lora.load_peft_adapter(model, f"{root}/a", "a")
            lora.load_peft_adapter(model, f"{root}/b", "b", activate=False)
            if reserved:
                lora.reserve_rank(model, 16)
            state = {"next": "b"}

            def switch():
                lora.set_adapter(model, state["next"])
                state["next"] = "a" if state["next"] == "b" else "b"
            results[f"set_adapter a <-> b ({'reserve_rank 16' if reserved else 'not reserved'})"] = \
                _time(switch, args.repeats)
        model = base()
        lora.load_peft_adapter(model, f"{root}/a")
        state = {"next": "a2"}

        def swap(load):
            def run():
                load(model, f"{root}/{state['next']}")
                state["next"] = "a" if state["next"] == "a2" else "a2"
            return run
        results["lora.hotswap_adapter a <-> a2"] = _time(swap(lora.hotswap_adapter), args.repeats)
        results["lora.load_peft_adapter into the same name"] = _time(swap(lora.load_peft_adapter), args.repeats)
        pm = PeftModel.from_pretrained(base(), f"{root}/a")
        state["next"] = "a2"

        def peft_swap():
            peft_hotswap(pm, f"{root}/{state['next']}", adapter_name="default")
            state["next"] = "a" if state["next"] == "a2" else "a2"
        results["peft hotswap_adapter a <-> a2"] = _time(peft_swap, args.repeats)
    print("\nLlama (hidden 512, 4 layers, float32, CPU): adapters a (r=8: q, v) and b (r=16: q, k, v, o) (ms)")
    print("| step | ms |\n|---|---:|")
    for what, t in results.items():
        print(f"| {what} | {t * 1e3:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--pad", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 512])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    forward_costs(args)
    model_costs(args)


if __name__ == "__main__":
    main()
