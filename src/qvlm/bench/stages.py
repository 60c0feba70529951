"""Train-step benchmarks (forward + backward + clip + AdamW) of both stages.

- stage 1 (ITC + ITM + ITG) from cached features vs from image files: the cached step reads each
  record (hashes the file, no decode) and looks its fp16 features up in the cache; the pixel step
  reads and decodes the PNG, preprocesses it and runs the frozen tower every step, as the article's
  repository does. Both alternate on the same records, model and batch;
- stage 2 (Q-Former query path -> projector -> LLM with LoRA, next-token loss on the assistant
  tokens) from precomputed features, with its model FLOPs and MFU (``flops``);
- in the full run, both stages with gradient checkpointing off vs on (time and memory) and
  ``train.compile`` off vs on (stage 2 on GPUs only: on CPU it compiles for minutes), each a ratio
  in the report's ``ratios`` (``checkpointing_stage1``, ``compile_stage2``, ...).
"""

from __future__ import annotations

import time

import torch

from qvlm import losses as L
from qvlm.bench import SHAPES, Plan, attempt
from qvlm.bench import flops as FL
from qvlm.bench.harness import Bench, SceneFiles, Trainer, build_trainer, fixed_batch, row, stage1_collator, to_device
from qvlm.bench.timing import Ratio, synchronizer


def group(trainer: Trainer) -> str:
    return f"stage-{trainer.cfg.train.stage} train step"


def seq_label(trainer: Trainer, batch: dict) -> str:
    text = f"T={batch['input_ids'].shape[1]}"
    if "labels" in batch:
        text += f" ({int((batch['labels'][:, 1:] != L.IGNORE_INDEX).sum())} supervised tokens)"
    return f"Q={trainer.model.qformer.num_queries} {text} N={batch['image_embeds'].shape[1]}"


def cached_vs_pixels(bench: Bench, trainer: Trainer, files: SceneFiles, batch_size: int, label: str) -> Ratio:
    """Rows for the stage-1 step from cached features and from image files; returns pixels / cached."""
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
    seq = seq_label(trainer, last["cached"])
    row(bench, group(trainer), "from cached features", label, batch_size, seq, timings["cached"],
        note=f"cache built once in {build_s:.1f} s ({files.n} images)")
    row(bench, group(trainer), "from image files (decode + frozen ViT)", label, batch_size, seq, timings["pixels"])
    return Ratio.of(timings["pixels"], timings["cached"])


def step_row(bench: Bench, trainer: Trainer, batch: dict, label: str, peak: float | None) -> None:
    """The stage-2 step's row with its model FLOPs and MFU (the LLM counted over its real tokens, not
    the padding) and tokens/s."""
    name = "from cached features"
    timing = bench.time({name: lambda: trainer.step(batch)})[name]
    tokens = int(batch["attention_mask"].sum())
    supervised = int((batch["labels"][:, 1:] != L.IGNORE_INDEX).sum())
    groups = FL.stage2_groups(trainer.model, len(batch["input_ids"]), tokens, supervised,
                              batch["image_embeds"].shape[1])
    out = row(bench, group(trainer), name, label, len(batch["input_ids"]), seq_label(trainer, batch), timing,
              sum(g.flops for g in groups), peak)
    out["tokens_per_s"] = round(tokens / timing.median, 1)


def set_checkpointing(trainer: Trainer, on: bool) -> None:
    from qvlm.train.speed import set_llm_checkpointing

    trainer.model.qformer.gradient_checkpointing = on
    if trainer.model.llm is not None:
        set_llm_checkpointing(trainer.model.llm, on)


def checkpointing(bench: Bench, trainer: Trainer, batch: dict, label: str) -> Ratio:
    """Gradient checkpointing of the Q-Former (and the LLM) off vs on: time and peak memory; returns
    the step time off / on (below 1: the time checkpointing costs)."""
    def run(on: bool):
        def go():
            set_checkpointing(trainer, on)
            trainer.step(batch)
        return go

    timings = bench.time({"off": run(False), "on": run(True)})
    set_checkpointing(trainer, False)
    for k in ("off", "on"):
        row(bench, group(trainer), f"gradient checkpointing {k}", label, len(batch["input_ids"]),
            seq_label(trainer, batch), timings[k])
    return Ratio.of(timings["off"], timings["on"])


def compiled(bench: Bench, eager: Trainer, shapes: str, batch: dict, label: str) -> Ratio:
    """``train.compile`` off vs on: ``eager`` against a model of the same seed with every Q-Former and
    LLM layer compiled; the first two steps (compiling) are timed apart. Returns the speed-up."""
    b = len(batch["input_ids"])
    fast = build_trainer(SHAPES[shapes], bench, stage=eager.cfg.train.stage, batch_size=b, compile=True)
    start = time.perf_counter()
    for _ in range(2):
        fast.step(batch)
    synchronizer(bench.device)()
    compile_s = time.perf_counter() - start
    timings = bench.time({"eager": lambda: eager.step(batch), "compiled": lambda: fast.step(batch)}, memory=False)
    seq = seq_label(eager, batch)
    row(bench, group(eager), "eager (train.compile=false)", label, b, seq, timings["eager"])
    row(bench, group(eager), "torch.compile of each layer (train.compile=true)", label, b, seq,
        timings["compiled"], note=f"first two steps (compiling) took {compile_s:.0f} s")
    return Ratio.of(timings["eager"], timings["compiled"])


def find_batch(bench: Bench, trainer: Trainer, files: SceneFiles, start: int, largest: int) -> int:
    """The largest power-of-two batch from ``start`` up to ``largest`` whose steps fit in memory."""
    best, size = start, start
    while size <= largest:
        try:
            batch = fixed_batch(trainer, files, size)
            for _ in range(2):
                trainer.step(batch)
        except torch.OutOfMemoryError:
            break
        finally:
            trainer.opt.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        best, size = size, size * 2
    bench.notes.append(f"stage-{trainer.cfg.train.stage} batch {best}: the largest power of two that fits "
                       f"(tried up to {largest})")
    return best


def options(bench: Bench, p: Plan, trainer: Trainer, batch: dict, report: dict, with_compile: bool) -> None:
    """Gradient checkpointing and ``torch.compile`` on/off, as the plan asks."""
    stage, label = trainer.cfg.train.stage, SHAPES[p.shapes].label
    with bench.rounds(p.option_repeats):
        if p.options:
            report["ratios"][f"checkpointing_stage{stage}"] = attempt(
                bench, f"stage-{stage} gradient checkpointing", lambda: checkpointing(bench, trainer, batch, label))
        if with_compile:
            report["ratios"][f"compile_stage{stage}"] = attempt(
                bench, f"stage-{stage} torch.compile", lambda: compiled(bench, trainer, p.shapes, batch, label))


def section_stage1(bench: Bench, p: Plan, report: dict, batch_search: int) -> None:
    shapes = SHAPES[p.shapes]
    trainer = build_trainer(shapes, bench, stage=1, batch_size=p.stage1_batch)
    batch = p.stage1_batch
    if batch_search:
        batch = find_batch(bench, trainer, SceneFiles(bench.work, shapes.file_size, 2 * batch), batch, batch_search)
    files = SceneFiles(bench.work, shapes.file_size, 2 * batch)
    report["ratios"]["cached_vs_pixels_stage1"] = cached_vs_pixels(bench, trainer, files, batch, shapes.label)
    if p.options or p.compile:
        options(bench, p, trainer, fixed_batch(trainer, files, batch), report, p.compile)


def section_stage2(bench: Bench, p: Plan, report: dict, peak: float | None, batch_search: int) -> None:
    shapes = SHAPES[p.shapes]
    trainer = build_trainer(shapes, bench, stage=2, batch_size=p.stage2_batch)
    files = SceneFiles(bench.work, shapes.file_size, 8)
    batch_size = p.stage2_batch
    if batch_search:
        batch_size = find_batch(bench, trainer, files, batch_size, batch_search)
    batch = fixed_batch(trainer, files, batch_size)
    step_row(bench, trainer, batch, shapes.label, peak)
    options(bench, p, trainer, batch, report, p.compile and bench.device.type == "cuda")
