"""A CPU train step with qvlm's cheap dropout masks (``qvlm.models.dropout``: the Q-Former's hidden
dropouts and the LLM's LoRA dropouts) against PyTorch's own masks (``F.dropout``, one random double
per element). One process builds ``qvlm bench``'s trainer (random weights, the shapes' config and
any ``--set`` overrides), then times its step with each kind of mask, interleaved round by round on
the same batch. Prints the dropouts found, the median ms per step of each and torch / cheap (> 1:
the cheap masks are faster) with its confidence interval from the rounds taken pairwise. Usage:

    python benchmarks/bench_cheap_dropout.py [--stages 1,2] [--shapes real] [--batch 8] [--rounds 7]
        [--set model.llm.lora.dropout=0.05 ...]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path


def compare(args: argparse.Namespace, stage: int) -> None:
    import torch

    from qvlm.bench.harness import Bench, SceneFiles, build_trainer, fixed_batch
    from qvlm.bench.shapes import SHAPES
    from qvlm.bench.timing import Ratio, time_interleaved
    from qvlm.models.dropout import Dropout, set_cheap_masks

    shapes = SHAPES[args.shapes]
    with tempfile.TemporaryDirectory() as work:
        bench = Bench(torch.device("cpu"), args.precision, 1, 1, Path(work))
        trainer = build_trainer(shapes, bench, stage=stage, batch_size=args.batch, overrides=tuple(args.set))
        drops = [m for m in trainer.model.modules() if isinstance(m, Dropout) and m.p > 0]
        if not drops:
            print(f"stage {stage}, {args.shapes}: no dropout above 0 in this config (try --set)")
            return
        files = SceneFiles(bench.work, shapes.file_size, args.batch)
        batch = fixed_batch(trainer, files, args.batch)

        def step(cheap: bool):
            def call() -> None:
                set_cheap_masks(trainer.model, cheap)
                trainer.step(batch)
            return call

        timings = time_interleaved({"torch": step(False), "cheap": step(True)}, repeats=args.rounds,
                                   warmup=args.warmup)
    found = ", ".join(f"{n} x p={p}" for p, n in sorted(Counter(m.p for m in drops).items()))
    ratio = Ratio.of(timings["torch"], timings["cheap"])
    print(f"stage {stage}, {args.shapes} shapes, batch {args.batch}, {bench.precision_label}: dropouts {found}; "
          f"torch masks {timings['torch'].median * 1000:.0f} ms, cheap masks {timings['cheap'].median * 1000:.0f} ms, "
          f"torch / cheap {ratio:.3f} ({ratio.low:.3f}-{ratio.high:.3f}, {ratio.coverage:.0%}, n={ratio.rounds})",
          flush=True)


def main() -> None:
    from qvlm.allocator import apply_from_env
    from qvlm.bench.args import positive_int, stage_list
    from qvlm.bench.shapes import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=stage_list, default=[1, 2], help="comma-separated, default 1,2")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="real")
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = ap.parse_args()
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    apply_from_env()  # as the qvlm commands do (qvlm.allocator; QVLM_MALLOC=system: glibc's defaults)
    for stage in args.stages:
        compare(args, stage)


if __name__ == "__main__":
    main()
