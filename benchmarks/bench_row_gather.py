"""ITM's image keys/values gathered by row: an advanced index (``kv[rows]``) against ``index_select``,
forward + backward. The stage-1 step shares the ITC pass's cross-attention keys/values with ITM
(``ImageKV.select``): 6 cross-attention layers x (keys, values), each (B, H, N, Dh), gathered to the
3B rows of ITM's pairs [i, i, neg(i)]. Both ways copy the same rows; their backward differs: the
advanced index adds the rows' gradients back with ``index_put_(accumulate=True)``, ``index_select``
with ``index_add_``. The two run interleaved round by round on the same tensors; each row prints the
median ms per call (all 12 tensors), rows gathered per second (3B from each of the 12), and advanced /
index_select (> 1: index_select is faster) with its confidence interval from the rounds. Usage:

    python benchmarks/bench_row_gather.py [--rounds 7] [--device cpu|cuda] [--batches 8,32]
"""

from __future__ import annotations

import argparse

import torch

from qvlm.bench.timing import Ratio, synchronizer, time_interleaved

LAYERS, HEADS, TOKENS, HEAD_DIM = 6, 12, 197, 64  # BERT-base Q-Former, cross-attention every 2 layers, ViT-B/16


def batch_sizes(text: str) -> list[int]:
    """"8,32" -> [8, 32]; an argparse error for anything but positive integers."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batches", type=batch_sizes, default=[8, 32],
                    help="comma-separated batch sizes B (3B rows gathered), default 8,32")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {args.dtype}; "
          f"{LAYERS} layers x (keys, values) of (B, {HEADS}, {TOKENS}, {HEAD_DIM}); median of {args.rounds} rounds")
    print(f"{'B':>4} {'rows':>5} {'advanced ms':>12} {'index_select ms':>16} {'rows/s (index_select)':>22} "
          f"{'advanced / index_select':>24}")
    for b in args.batches:
        gen = torch.Generator().manual_seed(0)
        kv = [torch.randn(b, HEADS, TOKENS, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_()
              for _ in range(2 * LAYERS)]
        rows = torch.cat([torch.arange(b), torch.arange(b), torch.randint(0, b, (b,), generator=gen)]).to(device)
        grads = [torch.randn(3 * b, HEADS, TOKENS, HEAD_DIM, generator=gen).to(device, dtype) for _ in kv]

        def run(gather):
            def go():
                torch.autograd.backward([gather(x) for x in kv], grads)
                for x in kv:
                    x.grad = None
            return go

        timings = time_interleaved({"advanced": run(lambda x: x[rows]),
                                    "index_select": run(lambda x: x.index_select(0, rows))},
                                   repeats=args.rounds, warmup=1, sync=synchronizer(device))
        adv, sel = timings["advanced"].median * 1000, timings["index_select"].median * 1000
        r = Ratio.of(timings["advanced"], timings["index_select"])
        print(f"{b:>4} {3 * b:>5} {adv:>12.1f} {sel:>16.1f} {3 * b * LAYERS * 2 / sel * 1000:>22.0f} "
              f"{float(r):>10.2f} ({r.low:.2f}-{r.high:.2f}, {100 * r.coverage:.0f}%)")


if __name__ == "__main__":
    main()
