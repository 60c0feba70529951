"""The CPU train step with glibc's malloc keeping freed memory (``qvlm.allocator``, what every qvlm
command but ``serve`` does) against glibc's own defaults. The setting is process-wide and cannot be
undone in place, so each variant runs in a process of its own: rounds alternate the two (which one
goes first alternates too), each process builds ``qvlm bench``'s trainer (random weights), runs
``--warmup`` steps, then times ``--steps`` steps and reports their median and its peak resident
size. Prints per variant the median ms per step over the rounds, samples/s and peak RSS, and
system / keep (> 1: keeping freed memory is faster) with its confidence interval from the rounds
taken pairwise. Usage:

    python benchmarks/bench_cpu_allocator.py [--stages 1,2] [--shapes demo] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("system", "keep")


def child(args: argparse.Namespace) -> None:
    """One process, one variant: build, warm up, time; one JSON line on stdout."""
    if args.child == "keep":
        from qvlm.allocator import keep_freed_memory

        if not keep_freed_memory():
            sys.exit("this C library is not glibc: nothing to compare")
    import torch

    from qvlm.bench.harness import Bench, SceneFiles, build_trainer, fixed_batch
    from qvlm.bench.shapes import SHAPES

    shapes = SHAPES[args.shapes]
    with tempfile.TemporaryDirectory() as work:
        bench = Bench(torch.device("cpu"), args.precision, 1, 1, Path(work))
        trainer = build_trainer(shapes, bench, stage=args.stage, batch_size=args.batch)
        files = SceneFiles(bench.work, shapes.file_size, args.batch)
        batch = fixed_batch(trainer, files, args.batch)
        for _ in range(args.warmup):
            trainer.step(batch)
        seconds = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.step(batch)
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(seconds), "precision": bench.precision_label,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(args: argparse.Namespace, variant: str, stage: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--stage", str(stage), "--shapes", args.shapes,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {variant} process failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace, stage: int) -> None:
    from qvlm.bench.timing import Ratio, Timing

    timings = {v: Timing() for v in VARIANTS}
    peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    precision = "?"
    for r in range(args.rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            out = run_child(args, variant, stage)
            timings[variant].seconds.append(out["seconds"])
            peaks[variant].append(out["peak_rss_mib"])
            precision = out["precision"]
    ratio = Ratio.of(timings["system"], timings["keep"])
    print(f"stage {stage}, {args.shapes} shapes, batch {args.batch}, {precision}; median of {args.steps} steps "
          f"after {args.warmup} per process, {args.rounds} rounds")
    for variant in VARIANTS:
        ms = 1000 * timings[variant].median
        print(f"  {variant:>6}: {ms:8.1f} ms per step ({timings[variant].spread:.0%} spread), "
              f"{args.batch / timings[variant].median:6.2f} samples/s, peak RSS {max(peaks[variant]):.0f} MiB")
    print(f"  system / keep: {ratio:.2f} ({ratio.low:.2f}-{ratio.high:.2f}, {ratio.coverage:.0%}, n={ratio.rounds})")


def main() -> None:
    from qvlm.bench.args import positive_int, stage_list
    from qvlm.bench.shapes import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=stage_list, default=[1, 2], help="comma-separated, default 1,2")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--rounds", type=positive_int, default=3, help="processes per variant")
    ap.add_argument("--steps", type=positive_int, default=5, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per process first")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, choices=(1, 2), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.child:
        child(args)
        return
    for stage in args.stages:
        compare(args, stage)


if __name__ == "__main__":
    main()
