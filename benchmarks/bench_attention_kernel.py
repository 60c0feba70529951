"""SDPA on CPU: the math kernel against the flash kernel, forward + backward, at the sequence lengths
qvlm trains on. What ``qvlm.models.attention_kernel`` decides from (math up to 128 tokens when a
gradient flows, else PyTorch's choice). The two kernels run interleaved round by round on the same
inputs; each row prints the median milliseconds, tokens/s, the ratio flash / math (> 1: math is
faster) and the memory the math kernel adds: its (B, H, Lq, Lk) score matrix, kept for the backward
as scores and probabilities (counted, not sampled: the flash kernel keeps only (B, H, Lq)). In bf16
there is a third column: the math kernel in the inputs' precision (``attention_kernel``'s choice for
training), against PyTorch's default math kernel, which computes bf16 attention in fp32. Usage:

    python benchmarks/bench_attention_kernel.py [--rounds 7] [--dtype bf16|fp32] [--forward-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qvlm.models.attention_kernel import math_in_input_precision

# (name, batch, heads, query length, key length, head width, mask)
SHAPES = [
    ("demo Q-Former self-attn, queries + text", 32, 12, 41, 41, 32, "padding"),
    ("demo Q-Former cross-attn, 16 queries x 64 image tokens", 32, 12, 16, 64, 32, None),
    ("demo stage 2, SmolLM2 at batch 8", 8, 9, 70, 70, 64, "causal"),
    ("stage 2, 128 tokens", 8, 9, 128, 128, 64, "causal"),
    ("stage 2, 256 tokens", 8, 9, 256, 256, 64, "causal"),
    ("real Q-Former cross-attn, 32 queries x 197 ViT-B/16 tokens", 32, 12, 32, 197, 64, None),
]


def inputs(b, h, lq, lk, d, mask, dtype, grad):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=dtype).requires_grad_(grad) for n in (lq, lk, lk))
    if mask == "causal":
        m = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).expand(b, 1, lq, lk)
    elif mask == "padding":
        m = (torch.rand(b, 1, 1, lk, generator=gen) > 0.1).expand(b, 1, lq, lk)
    else:
        m = None
    return q, k, v, m


def run_once(backend, q, k, v, m, grad: bool, input_precision: bool = False) -> float:
    with sdpa_kernel(backend), math_in_input_precision(input_precision):
        t = time.perf_counter()
        if grad:
            F.scaled_dot_product_attention(q, k, v, attn_mask=m).float().sum().backward()
        else:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--forward-only", action="store_true", help="inference: no backward")
    args = ap.parse_args()
    dtype, grad = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype], not args.forward_only
    kernels = {"flash": (SDPBackend.FLASH_ATTENTION, False), "math": (SDPBackend.MATH, False)}
    if dtype == torch.bfloat16:
        kernels["math_bf16"] = (SDPBackend.MATH, True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{'forward + backward' if grad else 'forward only'}, median of {args.rounds} rounds")
    print(f"{'shape':<60} {'B':>3} {'H':>3} {'Lq':>4} {'Lk':>4} {'flash ms':>9} {'math ms':>8} "
          f"{'math tok/s':>11} {'flash/math':>10} {'math +MiB':>9}"
          + (f" {'math bf16 ms':>12} {'flash/bf16':>10} {'math/bf16':>9}" if "math_bf16" in kernels else ""))
    for name, b, h, lq, lk, d, mask in SHAPES:
        q, k, v, m = inputs(b, h, lq, lk, d, mask, dtype, grad)
        for backend, precise in kernels.values():  # warm-up
            run_once(backend, q, k, v, m, grad, precise)
        times = {key: [] for key in kernels}
        for _ in range(args.rounds):  # interleaved, so noise hits every kernel alike
            for key, (backend, precise) in kernels.items():
                times[key].append(run_once(backend, q, k, v, m, grad, precise))
        ms = {key: statistics.median(t) * 1000 for key, t in times.items()}
        flash, math_ = ms["flash"], ms["math"]
        extra_mib = 2 * b * h * lq * lk * q.element_size() / 2**20  # scores + probabilities
        line = (f"{name:<60} {b:>3} {h:>3} {lq:>4} {lk:>4} {flash:>9.2f} {math_:>8.2f} "
                f"{b * lq / math_ * 1000:>11.0f} {flash / math_:>10.2f} {extra_mib:>9.1f}")
        if "math_bf16" in ms:
            low = ms["math_bf16"]
            line += f" {low:>12.2f} {flash / low:>10.2f} {math_ / low:>9.2f}"
        print(line)


if __name__ == "__main__":
    main()
