"""swap_: replace one merged adapter by another in a single pass over the weight.

W += s2 * B2 @ A2 - s1 * B1 @ A1 is one update of rank r1 + r2, so it goes through ops.merge_ once with
the factors stacked along the rank, group by group for MergedLinear's layout (A: (n*r, K), B: (n*Nb, r)):
A_cat = [A2; A1], B_cat = [s2*B2 | -s1*B1], scale 1. Every backend (the CUDA merge kernel, the reference)
then reads and writes each weight element once, with one rounding, as for a merge.
"""
import math

import torch

from . import ops


def check_finite(name, lora_A, lora_B, scaling):
    """Raises ValueError naming `name` unless the scaling and every factor value are finite."""
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"{name}: scaling must be a finite number, got {scaling!r}")
    for what, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        # one reduction (NaN propagates through min and max, inf shows in one of them) and one sync
        if t.numel() and not all(math.isfinite(v) for v in torch.stack(torch.aminmax(t)).tolist()):
            raise ValueError(f"{name}: {what} holds non-finite values (inf or NaN)")


def stacked_factors(old_A, old_B, old_scale, new_A, new_B, new_scale, num_blocks=1, block_ids=(0,)):
    """(A_cat, B_cat) with B_cat @ A_cat = new_scale*B2@A2 - old_scale*B1@A1 group by group, in the
    compute precision (fp32, or fp64 for fp64 factors)."""
    n = len(block_ids)
    cd = torch.promote_types(torch.promote_types(old_A.dtype, new_A.dtype), torch.float32)
    k, r1, r2 = old_A.shape[1], old_A.shape[0] // n, new_A.shape[0] // n
    nb = old_B.shape[0] // n
    a_cat = torch.cat((new_A.to(cd).reshape(n, r2, k), old_A.to(cd).reshape(n, r1, k)), dim=1).reshape(-1, k)
    b_cat = torch.empty(n, nb, r1 + r2, dtype=cd, device=old_B.device)
    torch.mul(new_B.reshape(n, nb, r2), new_scale, out=b_cat[:, :, :r2])
    torch.mul(old_B.reshape(n, nb, r1), -old_scale, out=b_cat[:, :, r2:])
    return a_cat, b_cat.reshape(n * nb, r1 + r2)


def swap_(weight, old_A, old_B, old_scale, new_A, new_B, new_scale, *, num_blocks=1, block_ids=(0,),
          transposed=False):
    """weight += new_scale * delta(new_A, new_B) - old_scale * delta(old_A, old_B), in place, in one pass.

    Layout arguments as for ops.merge_. Non-finite factors or scales (or scaled factors that overflow)
    raise before anything is written: the check runs on the stacked factors, which hold every value.
    """
    for what, scale in (("new", new_scale), ("old", old_scale)):
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"swap_: the {what} adapter's scaling must be a finite number, got {scale!r}")
    a_cat, b_cat = stacked_factors(old_A, old_B, float(old_scale), new_A, new_B, float(new_scale),
                                   num_blocks, block_ids)
    check_finite("swap_", a_cat, b_cat, 1.0)
    ops.merge_(weight, a_cat, b_cat, 1.0, num_blocks=num_blocks, block_ids=block_ids, transposed=transposed)
