"""Summarise `ptxas -v` output as one line per kernel: architecture, registers, stack frame, spills."""
import re
import subprocess
import sys

fn, rows = None, []
for line in sys.stdin:
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        fn = m.group(1)
        continue
    m = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
    if m:
        arch = m.group(2)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and fn:
        frame, st, ld = m.groups()
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and fn:
        rows.append((arch, fn, int(m.group(1)), frame, st, ld))
        fn = None
if not rows:
    sys.exit(0)
names = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True).stdout.split("\n")
print(f"{'arch':7} {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel")
for (arch, _, regs, frame, st, ld), name in zip(rows, names):
    name = re.sub(r"\(lora_ext.*", "", name)
    name = re.sub(r"lora_ext::kernels::(merge|forward|lossless)::", "", name)
    name = name.replace("lora_ext::kernels::batched::", "batched::")  # its kernel names repeat forward's
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "half")
    print(f"{arch:7} {regs:4d} {frame:>5} {st + '/' + ld:>11}  {name}")
