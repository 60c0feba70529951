"""Stage-2 train-step benchmarks: Q-Former query path -> projector -> LLM with LoRA, next-token loss
on the assistant tokens (``qvlm.train.steps.stage2_losses``), backward, clip, AdamW.

Batches are built by the stage-2 collator from synthetic scenes (system prompt, user prompt with
the Q image slots, caption, chat template); the frozen features are computed before timing (the
cached-feature path). Also: gradient checkpointing on/off, and the largest batch that fits
(``find_batch``, for GPUs).
"""

from __future__ import annotations

import time

import torch

from qvlm import losses as L
from qvlm.bench import flops as FL
from qvlm.bench.harness import Bench, SceneFiles, Trainer, build_trainer, row, to_device
from qvlm.bench.shapes import Shapes
from qvlm.bench.timing import Ratio, device_time, sync_fields, synchronizer

GROUP = "stage-2 train step"


def stage2_batch(trainer: Trainer, files: SceneFiles, batch_size: int, multiple: int = 1) -> dict:
    """A collated stage-2 batch with ``image_embeds`` (frozen features computed here), on the device;
    its rows padded to a multiple of ``multiple`` (``data.pad_to_multiple_of``)."""
    from qvlm.data.collate_stage2 import Stage2Collator
    from qvlm.train.batches import STAGE2_PROMPT_BUDGET

    cfg, model = trainer.cfg, trainer.model
    q = cfg.model.qformer.num_queries
    collate = Stage2Collator(model.vision.processor, model.llm.tokenizer, q, cfg.model.llm,
                             max_len=cfg.data.max_caption_tokens + STAGE2_PROMPT_BUDGET + q, seed=0,
                             pad_to_multiple_of=multiple)
    dataset = files.dataset(decode=True)
    batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
    with torch.no_grad(), trainer.bench.autocast():
        batch["image_embeds"] = model.vision(batch.pop("pixel_values").to(trainer.bench.device)).float()
    return to_device(batch, trainer.bench.device)


def seq_label(trainer: Trainer, batch: dict) -> str:
    supervised = int((batch["labels"][:, 1:] != L.IGNORE_INDEX).sum())
    return (f"T={batch['input_ids'].shape[1]} (Q={trainer.model.qformer.num_queries} image slots, "
            f"{supervised} supervised tokens) N={batch['image_embeds'].shape[1]}")


def flops_of(trainer: Trainer, batch: dict) -> int:
    """Model FLOPs of one step on ``batch``: the LLM counted over its real tokens, not the padding."""
    tokens = int(batch["attention_mask"].sum())
    supervised = int((batch["labels"][:, 1:] != L.IGNORE_INDEX).sum())
    return FL.step_flops(FL.stage2_groups(trainer.model, len(batch["input_ids"]), tokens, supervised,
                                          batch["image_embeds"].shape[1]))


def step_rows(bench: Bench, trainer: Trainer, batch: dict, label: str, peak: float | None,
              name: str = "from cached features", note: str = ""):
    timing = bench.time({name: lambda: trainer.step(batch)})[name]
    b = batch["input_ids"].shape[0]
    tokens = int(batch["attention_mask"].sum())
    out = row(bench, GROUP, name, label, b, seq_label(trainer, batch), timing, None, flops_of(trainer, batch), peak,
              note=note)
    out["tokens_per_s"] = round(tokens / timing.median, 1)
    busy = device_time(lambda: trainer.step(batch), bench.device)
    if busy:  # GPU only: how much of the step the kernels fill, and how often the host waited
        out.update(busy, device_busy=round(busy["kernel_ms"] / out["ms"], 3))
    out.update(sync_fields(lambda: trainer.step(batch), bench.device))
    return out


def checkpointing(bench: Bench, trainer: Trainer, batch: dict, label: str) -> dict:
    """Gradient checkpointing of the Q-Former and the LLM off vs on (time and memory)."""
    from qvlm.train.speed import set_llm_checkpointing

    def set_flag(on: bool) -> None:
        trainer.model.qformer.gradient_checkpointing = on
        set_llm_checkpointing(trainer.model.llm, on)

    def run(on: bool):
        def go():
            set_flag(on)
            trainer.step(batch)
        return go

    timings = bench.time({"off": run(False), "on": run(True)})
    set_flag(False)
    b = batch["input_ids"].shape[0]
    for k in ("off", "on"):
        row(bench, GROUP, f"gradient checkpointing {k} (Q-Former + LLM)", label, b, seq_label(trainer, batch),
            timings[k])
    return {"time_ratio": timings["on"].median / timings["off"].median,
            "mem_saving_mb": timings["off"].memory.growth_mb - timings["on"].memory.growth_mb}


def padding(bench: Bench, trainer: Trainer, files: SceneFiles, batch: dict, label: str,
            multiple: int = 16) -> float:
    """The step on the batch as collated (rows padded to the longest) vs the same batch padded to a
    multiple of ``multiple`` (tensor-core friendly shapes on a GPU); returns padded-faster-by."""
    padded = stage2_batch(trainer, files, batch["input_ids"].shape[0], multiple)
    timings = bench.time({"longest": lambda: trainer.step(batch), "multiple": lambda: trainer.step(padded)})
    b = batch["input_ids"].shape[0]
    row(bench, GROUP, "rows padded to the longest", label, b, seq_label(trainer, batch), timings["longest"])
    row(bench, GROUP, f"rows padded to a multiple of {multiple}", label, b, seq_label(trainer, padded),
        timings["multiple"])
    return Ratio.of(timings["longest"], timings["multiple"])


def shared_prefix_rows(bench: Bench, shapes: Shapes, batch_size: int) -> float:
    """With LoRA from the image on (the demo's placement), the step with the prompt prefix all rows
    share run once without autograd (``train.share_prompt_prefix``) vs the whole rows through the
    LLM's autograd; returns shared-faster-by."""
    trainer = build_trainer(shapes, bench, stage=2, batch_size=batch_size,
                            overrides=("model.llm.lora.positions=from_image",))
    files = SceneFiles(bench.work, shapes.file_size, max(batch_size, 8))
    batch = stage2_batch(trainer, files, batch_size)

    def run(on: bool):
        def go():
            trainer.cfg.train.share_prompt_prefix = on
            trainer.step(batch)
        return go

    timings = bench.time({"full": run(False), "shared": run(True)})
    seq = f"{seq_label(trainer, batch)}, shared prefix {batch['shared_prefix']} tokens"
    row(bench, GROUP, "LoRA from the image on: whole rows", shapes.label, batch_size, seq, timings["full"])
    row(bench, GROUP, "LoRA from the image on: shared prompt prefix once", shapes.label, batch_size, seq,
        timings["shared"])
    trainer.model.llm.release_frozen_copies()
    return Ratio.of(timings["full"], timings["shared"])


def fits(trainer: Trainer, files: SceneFiles, batch_size: int) -> bool:
    """Whether two steps at ``batch_size`` run without running out of device memory."""
    try:
        batch = stage2_batch(trainer, files, batch_size)
        for _ in range(2):
            trainer.step(batch)
        return True
    except torch.OutOfMemoryError:
        trainer.opt.zero_grad(set_to_none=True)
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def find_batch(trainer: Trainer, files: SceneFiles, start: int, largest: int) -> int:
    """The largest power-of-two batch from ``start`` up to ``largest`` that fits (``start`` if none is
    tried successfully)."""
    best, size = start, start
    while size <= largest and fits(trainer, files, size):
        best, size = size, size * 2
    return best


def compiled(bench: Bench, trainer: Trainer, batch: dict, label: str, peak: float | None,
             files: SceneFiles | None = None, batch_search: int = 0) -> dict:
    """The same step with every Q-Former and LLM layer compiled in place (``train.compile``,
    ``qvlm.train.speed.compile_layers``); the first calls, which compile, are timed apart. With
    ``batch_search``: also the compiled step at the largest power-of-two batch above this one that
    fits (compiled layers keep fewer activations than eager ones), recompiled for that shape alone."""
    from qvlm.train.speed import compile_layers

    start = time.perf_counter()
    compile_layers(trainer.model)
    for _ in range(2):
        trainer.step(batch)
    synchronizer(bench.device)()
    compile_s = time.perf_counter() - start
    out = {"row": step_rows(bench, trainer, batch, label, peak, name="torch.compile of each Q-Former and LLM layer",
                            note=f"first two steps (compiling) took {compile_s:.0f} s"),
           "compile_s": compile_s}
    if files is not None and 2 * len(batch["input_ids"]) <= batch_search:
        try:
            out["largest"] = compiled_largest(bench, trainer, files, len(batch["input_ids"]), label, peak, batch_search)
        except Exception as exc:  # noqa: BLE001 - the same-batch row above stands
            bench.notes.append(f"stage-2 compiled batch search failed: {type(exc).__name__}: {str(exc)[:200]}")
    return out


def compiled_largest(bench: Bench, trainer: Trainer, files: SceneFiles, batch_size: int, label: str,
                     peak: float | None, batch_search: int) -> dict | None:
    """The compiled step's row at the largest power-of-two batch above ``batch_size`` that fits, up to
    ``batch_search`` (None when none does), compiled afresh for that shape."""
    size = find_batch(trainer, files, batch_size, batch_search)  # from the size that runs already
    if size == batch_size:
        return None
    torch._dynamo.reset()  # the search compiled for several sizes (dynamic shapes); time this one alone
    big = stage2_batch(trainer, files, size)
    for _ in range(2):
        trainer.step(big)
    return step_rows(bench, trainer, big, label, peak, name="torch.compile of each layer, largest batch that fits",
                     note=f"largest power-of-two batch that fits compiled (tried up to {batch_search})")


def bench_stage2(bench: Bench, shapes: Shapes, batch_size: int, peak: float | None,
                 with_checkpointing: bool = False, batch_search: int = 0, option_repeats: int | None = None,
                 with_compile: bool = False) -> dict:
    trainer = build_trainer(shapes, bench, stage=2, batch_size=batch_size)
    note = ""
    if batch_search:
        files = SceneFiles(bench.work, shapes.file_size, batch_search)
        batch_size = find_batch(trainer, files, batch_size, batch_search)
        note = f"largest power-of-two batch that fits (tried up to {batch_search})"
    files = SceneFiles(bench.work, shapes.file_size, max(batch_size, 8))
    batch = stage2_batch(trainer, files, batch_size)
    out = {"step": step_rows(bench, trainer, batch, shapes.label, peak, note=note)}
    if with_checkpointing:
        with bench.rounds(option_repeats or bench.repeats):
            out["pad16_vs_longest"] = padding(bench, trainer, files, batch, shapes.label)
            try:
                out["checkpointing"] = checkpointing(bench, trainer, batch, shapes.label)
            except torch.OutOfMemoryError as exc:
                bench.notes.append(f"stage-2 gradient checkpointing at batch {batch_size}: out of memory ({exc})"[:300])
    if with_compile:  # last: it changes the model in place
        try:
            out["compile"] = compiled(bench, trainer, batch, shapes.label, peak,
                                      files if batch_search else None, batch_search)
        except Exception as exc:  # noqa: BLE001 - compilation fails in many ways; the eager rows stand
            bench.notes.append(f"stage-2 torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")
    trainer.opt.zero_grad(set_to_none=True)
    trainer.model.llm.release_frozen_copies()
    # generation reuses the eager model; a compiled one would recompile at every new sequence length
    out["model"] = None if "compile" in out else trainer.model
    return out
