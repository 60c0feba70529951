"""Stage-1 train-step benchmarks (ITC + ITM + ITG, forward + backward + clip + AdamW).

- from cached features vs from image files: the cached step reads each record (hashes the file,
  no decode) and looks its fp16 features up in the cache; the pixel step reads and decodes the PNG,
  preprocesses it and runs the frozen tower every step, as the article's repository does. Both
  alternate on the same records, model and batch;
- the library's step (``qvlm.models.stage1``: one unimodal pass for ITC feeds ITG's query cache,
  the images' cross-attention keys/values projected once for ITC and ITM) vs each of the two
  switched off and vs both off, the passes of LAVIS's ``Blip2Qformer.forward`` (queries alone, text
  alone, ITM re-encoding its 3B images: ``train.itc_one_pass`` and ``train.itm_reuse_image_kv``);
- dynamic padding (to the batch's longest caption, what the collator does) vs padding to
  ``max_text_len``; length-grouped vs random batches (padding tokens per epoch);
- gradient checkpointing on/off (time and memory), ``torch.compile`` on/off, fused vs foreach vs
  per-tensor AdamW, DataLoader workers (pixel path).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from qvlm.bench import flops as FL
from qvlm.bench.harness import (Bench, SceneFiles, Trainer, build_trainer, fixed_stage1_batch, row,
                                stage1_collator, to_device)
from qvlm.bench.shapes import Shapes
from qvlm.bench.timing import Ratio, sync_fields, synchronizer

GROUP = "stage-1 train step"


def seq_label(trainer: Trainer, batch: dict) -> str:
    qf = trainer.model.qformer
    n = batch["image_embeds"].shape[1] if "image_embeds" in batch else "-"
    return f"Q={qf.num_queries} T={batch['input_ids'].shape[1]} N={n}"


def flops_of(trainer: Trainer, batch: dict, vision_tokens: int = 0) -> int:
    b, t = batch["input_ids"].shape
    n = batch["image_embeds"].shape[1] if "image_embeds" in batch else vision_tokens
    groups = FL.stage1_groups(trainer.model, b, t, n, trainer.cfg.train.losses, vision_tokens=vision_tokens)
    return FL.step_flops(groups)


# ---- cached features vs image files ------------------------------------------------------------

def cached_vs_pixels(bench: Bench, shapes: Shapes, batch_size: int, peak: float | None) -> float:
    """Rows for both paths at ``shapes``; returns pixels / cached median step time."""
    trainer = build_trainer(shapes, bench, stage=1, batch_size=batch_size)
    files = SceneFiles(bench.work, shapes.file_size, 2 * batch_size)
    features, build_s = files.build_cache(trainer.model.vision, bench, batch_size)
    makers = {"cached": files.batches(files.dataset(decode=False), stage1_collator(trainer, features=features),
                                      batch_size),
              "pixels": files.batches(files.dataset(decode=True), stage1_collator(trainer, pixels=True), batch_size)}
    last: dict[str, dict] = {}

    def step(name: str):
        def run():
            last[name] = batch = to_device(makers[name](), bench.device)
            trainer.step(batch)
        return run

    timings = bench.time({name: step(name) for name in makers})
    shown = last["cached"]  # the text and image-token shapes of both paths
    tokens = shown["image_embeds"].shape[1]
    for name, label in (("cached", "from cached features"), ("pixels", "from image files (decode + frozen ViT)")):
        fl = flops_of(trainer, shown, vision_tokens=tokens if name == "pixels" else 0)
        note = f"cache built once in {build_s:.1f} s ({files.n} images)" if name == "cached" else ""
        row(bench, GROUP, label, shapes.label, batch_size, seq_label(trainer, shown), timings[name], None, fl, peak,
            note=note)
    return Ratio.of(timings["pixels"], timings["cached"])


# ---- fused vs LAVIS-style passes ----------------------------------------------------------------

PASS_VARIANTS = {  # name -> (train.itc_one_pass, train.itm_reuse_image_kv); (True, True) is the default
    "one unimodal pass, ITM re-encodes its images": (True, False),
    "separate query / text passes, shared image K/V": (False, True),
    "LAVIS-style: separate passes, ITM re-encodes": (False, False),
}


def fused_vs_unfused(bench: Bench, trainer: Trainer, batch: dict, label: str, peak: float | None) -> dict:
    """The library's default step against each of its two pass choices switched off and both off (the
    passes of LAVIS's ``Blip2Qformer.forward``), through the same step with ``train.itc_one_pass`` /
    ``train.itm_reuse_image_kv``; returns the time ratios (variant / ours): "lavis", "shared_kv"
    (re-encoding / reusing), "fused_pass" (separate / one pass)."""
    cfg = trainer.cfg.train
    ours_flags = cfg.itc_one_pass, cfg.itm_reuse_image_kv

    def run(one_pass: bool, reuse: bool):
        def go():
            cfg.itc_one_pass, cfg.itm_reuse_image_kv = one_pass, reuse
            try:
                trainer.step(batch)
            finally:
                cfg.itc_one_pass, cfg.itm_reuse_image_kv = ours_flags
        return go

    variants = {"ours": lambda: trainer.step(batch)}
    variants.update({name: run(*flags) for name, flags in PASS_VARIANTS.items()})
    timings = bench.time(variants)
    b, seq = batch["input_ids"].shape[0], seq_label(trainer, batch)
    ours_row = row(bench, GROUP, "ours: one unimodal pass, shared image K/V", label, b, seq, timings["ours"],
                   flops=flops_of(trainer, batch), peak_flops=peak, note="features precomputed")
    ours_row.update(sync_fields(lambda: trainer.step(batch), bench.device))  # GPU only: host waits in the step
    for name in PASS_VARIANTS:
        row(bench, GROUP, name, label, b, seq, timings[name], note="same losses")
    names = list(PASS_VARIANTS)
    return {key: Ratio.of(timings[name], timings["ours"])
            for key, name in zip(("shared_kv", "fused_pass", "lavis"), names)}


# ---- padding ------------------------------------------------------------------------------------

def pad_to_max(batch: dict, length: int) -> dict:
    out = dict(batch)
    extra = length - batch["input_ids"].shape[1]
    out["input_ids"] = F.pad(batch["input_ids"], (0, extra))
    out["attention_mask"] = F.pad(batch["attention_mask"], (0, extra))
    return out


def dynamic_padding(bench: Bench, trainer: Trainer, batch: dict, label: str) -> float:
    full = pad_to_max(batch, trainer.cfg.model.qformer.max_text_len)
    timings = bench.time({"dynamic": lambda: trainer.step(batch), "max": lambda: trainer.step(full)}, memory=False)
    b = batch["input_ids"].shape[0]
    row(bench, GROUP, "dynamic padding (longest in batch)", label, b, seq_label(trainer, batch), timings["dynamic"])
    row(bench, GROUP, f"padded to max_text_len={full['input_ids'].shape[1]}", label, b, seq_label(trainer, full),
        timings["max"])
    return Ratio.of(timings["max"], timings["dynamic"])


def length_grouping(bench: Bench, batch_size: int, n: int = 2000) -> dict:
    """Text tokens per epoch (padding included) with random vs length-grouped batches of synthetic
    captions, tokenised like the stage-1 collator. A count, not a timing."""
    from qvlm.bench.shapes import BERT_TOKENIZER
    from qvlm.data.collate import LengthGroupedSampler
    from qvlm.data.synth import SynthScenes
    from qvlm.sources import load_tokenizer

    scenes = SynthScenes(n, seed=0)
    captions = [scenes.scene(i).caption() for i in range(n)]
    tokens = [len(ids) for ids in load_tokenizer(BERT_TOKENIZER)(captions)["input_ids"]]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen).tolist()
    random_batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    grouped = LengthGroupedSampler([len(c) for c in captions], batch_size, seed=0).batches()

    def padded(batches):
        return sum(len(b) * max(tokens[i] for i in b) for b in batches)

    real = sum(tokens)
    result = {"real_tokens": real, "random_padded": padded(random_batches), "grouped_padded": padded(grouped)}
    result["saving"] = round(1 - result["grouped_padded"] / result["random_padded"], 3)
    bench.notes.append(f"length grouping (data.group_by_length), {n} synthetic captions, batch {batch_size}: "
                       f"{result['random_padded']} text tokens per epoch with random batches, "
                       f"{result['grouped_padded']} grouped ({100 * result['saving']:.1f}% fewer; "
                       f"{real} without padding)")
    return result


# ---- options ------------------------------------------------------------------------------------

def checkpointing(bench: Bench, trainer: Trainer, batch: dict, label: str) -> dict:
    """Gradient checkpointing off vs on: median step time and peak memory of one step each."""
    qf = trainer.model.qformer

    def run(flag: bool):
        def go():
            qf.gradient_checkpointing = flag
            trainer.step(batch)
        return go

    timings = bench.time({"off": run(False), "on": run(True)})
    qf.gradient_checkpointing = False
    b, seq = batch["input_ids"].shape[0], seq_label(trainer, batch)
    for k in ("off", "on"):
        row(bench, GROUP, f"gradient checkpointing {k}", label, b, seq, timings[k])
    return {"time_ratio": timings["on"].median / timings["off"].median,
            "mem_saving_mb": timings["off"].memory.growth_mb - timings["on"].memory.growth_mb}


def compiled(bench: Bench, shapes: Shapes, batch_size: int, files: SceneFiles) -> dict:
    """``train.compile`` off vs on (separate models, same seed); the first compiled call's extra time
    is reported as compile time. A failure to compile is reported, not raised."""
    eager = build_trainer(shapes, bench, stage=1, batch_size=batch_size)
    batch = fixed_stage1_batch(eager, files, batch_size)
    fast = build_trainer(shapes, bench, stage=1, batch_size=batch_size, compile=True)
    start = time.perf_counter()
    try:
        fast.step(batch)
        synchronizer(bench.device)()  # the first call's kernels, queued on a GPU, belong to it
    except Exception as exc:  # noqa: BLE001 - an optional backend; say why and go on
        bench.notes.append(f"torch.compile failed on {bench.device.type}: {type(exc).__name__}: {exc}"[:300])
        return {"ok": False}
    first = time.perf_counter() - start
    timings = bench.time({"eager": lambda: eager.step(batch), "compiled": lambda: fast.step(batch)}, memory=False)
    compile_s = first - timings["compiled"].median
    b, seq = batch_size, seq_label(eager, batch)
    row(bench, GROUP, "eager (train.compile=false)", shapes.label, b, seq, timings["eager"])
    row(bench, GROUP, "torch.compile Q-Former (train.compile=true)", shapes.label, b, seq, timings["compiled"],
        note=f"compile {compile_s:.0f} s (first call, inductor cache as found)")
    return {"ok": True, "speedup": Ratio.of(timings["eager"], timings["compiled"]), "compile_s": compile_s}


def adamw(bench: Bench, trainer: Trainer, label: str) -> dict:
    """``optimizer.step()`` alone over the Q-Former + heads: fused vs foreach vs per-tensor AdamW."""
    from qvlm.train.optim import build_optimizer

    params = trainer.params
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    results = {}
    variants = (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("per-tensor", {"foreach": False}))
    for name, kwargs in variants:
        opt, _ = build_optimizer(trainer.model.parameter_groups(), trainer.cfg.train, fused=kwargs.get("fused", False))
        if "foreach" in kwargs:
            for group in opt.param_groups:
                group["foreach"] = kwargs["foreach"]
        timing = bench.time({name: opt.step}, memory=False)[name]
        results[name] = timing
        row(bench, "AdamW step", f"{name} AdamW", label, 0, f"{n / 1e6:.0f}M parameters", timing, items=n,
            item="params", precision="fp32")
        del opt
    for p in params:
        p.grad = None
    return {k: v.median for k, v in results.items()}


def workers(bench: Bench, trainer: Trainer, files: SceneFiles, batch_size: int, label: str) -> dict:
    """The pixel path through a DataLoader with 0 vs 2 worker processes (pinned memory on CUDA):
    median time per step, loading included."""
    from torch.utils.data import DataLoader

    dataset = files.dataset(decode=True)
    collate = stage1_collator(trainer, pixels=True)
    pin = bench.device.type == "cuda"
    results = {}
    for count in (0, 2):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=count,
                            pin_memory=pin and count > 0, persistent_workers=count > 0, drop_last=True)
        state = {"it": iter(loader)}

        def step():
            try:
                batch = next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                batch = next(state["it"])
            trainer.step(to_device(batch, bench.device))

        name = f"{count} workers" + (", pinned memory" if pin and count else "")
        timing = bench.time({name: step}, memory=False)[name]
        results[count] = timing.median
        row(bench, GROUP, f"from image files, DataLoader {name}", label, batch_size, "decode + ViT every step",
            timing)
        del state, loader
    return results
