"""What every benchmark shares: a model + optimiser at given shapes, the library's own train step,
synthetic scene files and their feature cache, and turning timings into table rows.

The step is the training loop's (``qvlm.train.loop.train_step``) without the data stream: named
losses from ``qvlm.train.steps.step_losses`` under the same autocast, backward, gradient clipping,
AdamW from ``qvlm.train.optim.build_optimizer``, ``zero_grad``, temperature clamp.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qvlm.bench.shapes import Shapes
from qvlm.bench.timing import Timing, synchronizer, time_interleaved
from qvlm.config import Config


@dataclass
class Bench:
    """Run-wide settings: device, precision ("auto" | "bf16" | "fp32"), repeats, scratch folder."""

    device: torch.device
    precision: str
    repeats: int
    warmup: int
    work: Path
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bf16(self) -> bool:
        from qvlm.train.loop import bf16_available

        return self.precision == "bf16" or (self.precision == "auto" and bf16_available(self.device))

    @property
    def precision_label(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @contextlib.contextmanager
    def rounds(self, repeats: int):
        """Time with ``repeats`` timed rounds inside the block."""
        saved, self.repeats = self.repeats, repeats
        try:
            yield
        finally:
            self.repeats = saved

    def time(self, variants: dict[str, Callable[[], object]], memory: bool = True) -> dict[str, Timing]:
        """Interleaved timing of the variants (and, with ``memory``, the peak memory of one more call of each)."""
        return time_interleaved(variants, self.repeats, self.warmup, sync=synchronizer(self.device),
                                track_memory=self.device if memory else None)


@dataclass
class Trainer:
    """A model at some shapes with its optimiser; ``step(batch)`` is one training step."""

    model: object  # VLM
    cfg: Config
    opt: torch.optim.Optimizer
    params: list
    dec_token_id: int
    bench: Bench
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def step(self, batch: dict) -> None:
        from qvlm.train.steps import step_losses

        with self.bench.autocast():
            terms = step_losses(self.model, batch, self.cfg, generator=self.generator, dec_token_id=self.dec_token_id)
        terms["loss"].backward()
        if self.cfg.train.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.heads.clamp_temperature()


def build_trainer(shapes: Shapes, bench: Bench, stage: int, batch_size: int, compile: bool = False, seed: int = 0,
                  overrides: tuple[str, ...] = ()) -> Trainer:
    """A fresh model (random weights) of ``shapes`` on the bench device, set to train ``stage``."""
    from qvlm.models.vlm import VLM
    from qvlm.model_sources import load_tokenizer
    from qvlm.train.batches import decoder_start_id
    from qvlm.train.optim import build_optimizer
    from qvlm.train.speed import apply_speed_options

    cfg = shapes.config(stage=stage, precision=bench.precision, batch_size=batch_size, overrides=overrides,
                        compile=compile)
    torch.manual_seed(seed)
    model = VLM.from_config(cfg, with_llm=stage == 2, seed=seed).to(bench.device)
    model.train()
    apply_speed_options(model, cfg.train)
    opt, _ = build_optimizer(model.parameter_groups(), cfg.train)
    params = [p for g in opt.param_groups for p in g["params"]]
    dec = decoder_start_id(load_tokenizer(cfg.model.qformer.tokenizer))
    return Trainer(model, cfg, opt, params, dec, bench)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---- data ---------------------------------------------------------------------------------------

class SceneFiles:
    """``n`` synthetic scenes written as PNG files + JSONL at ``image_size`` px (what a real dataset
    on disk looks like to the loader), read back in a cycle, batch by batch."""

    def __init__(self, work: Path, image_size: int, n: int):
        from qvlm.data.synth import write_split

        self.folder = work / f"scenes-{image_size}px-{n}"
        self.jsonl = self.folder / "train.jsonl"
        if not self.jsonl.is_file():
            write_split(self.folder, "train", n, seed=0, image_size=image_size)
        self.n = n

    def dataset(self, decode: bool):
        from qvlm.data.sources import open_dataset

        return open_dataset(str(self.jsonl), decode_images=decode)

    def batches(self, dataset, collate: Callable[[list[dict]], dict], batch_size: int) -> Callable[[], dict]:
        """A function returning the next batch: reads (and decodes, if the dataset does) every time."""
        order = itertools.cycle(range(len(dataset)))
        return lambda: collate([dataset[next(order)] for _ in range(batch_size)])

    def build_cache(self, encoder, bench: Bench, batch_size: int) -> tuple[object, float]:
        """The frozen-feature cache of these files for ``encoder`` and the seconds the build took."""
        from qvlm.data.cache import CachedFeatures, run_cache_features

        root = self.folder / f"cache-{encoder.fingerprint()}"
        report = run_cache_features(str(self.jsonl), encoder, root, batch_size=batch_size)
        return CachedFeatures.open(root, encoder), float(report.get("seconds", 0.0))


def stage1_collator(trainer: Trainer, features=None, pixels: bool = False):
    from qvlm.data.collate import Stage1Collator
    from qvlm.model_sources import load_tokenizer

    tok = load_tokenizer(trainer.cfg.model.qformer.tokenizer)
    processor = trainer.model.vision.processor if pixels else None
    return Stage1Collator(processor, tok, max_text_len=trainer.cfg.model.qformer.max_text_len,
                          features=None if pixels else features)


def fixed_batch(trainer: Trainer, files: SceneFiles, batch_size: int) -> dict:
    """One collated batch for the trainer's stage with the frozen features already computed (a
    cached-feature batch without the cache lookup), on the bench device."""
    cfg, model, device = trainer.cfg, trainer.model, trainer.bench.device
    if cfg.train.stage == 1:
        collate = stage1_collator(trainer, pixels=True)
    else:
        from qvlm.data.collate_stage2 import Stage2Collator
        from qvlm.train.batches import STAGE2_PROMPT_BUDGET

        q = cfg.model.qformer.num_queries
        collate = Stage2Collator(model.vision.processor, model.llm.tokenizer, q, cfg.model.llm,
                                 max_len=cfg.data.max_caption_tokens + STAGE2_PROMPT_BUDGET + q, seed=0)
    dataset = files.dataset(decode=True)
    batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
    with torch.no_grad(), trainer.bench.autocast():
        feats = model.vision(batch.pop("pixel_values").to(device))
    batch["image_embeds"] = feats.float().half().float()  # the cache stores fp16
    return to_device(batch, device)


# ---- rows ---------------------------------------------------------------------------------------

def row(bench: Bench, group: str, name: str, shapes: str, batch: int, seq: str, timing: Timing,
        flops: float | None = None, peak_flops: float | None = None, item: str = "samples", note: str = "") -> dict:
    """One table row: median ms, throughput (``batch`` ``item``s per call), memory (when tracked
    during the timed calls), FLOPs."""
    from qvlm.bench.flops import mfu

    seconds, mem = timing.median, timing.memory
    out = {"group": group, "name": name, "shapes": shapes, "batch": batch, "seq": seq,
           "precision": bench.precision_label, "ms": round(1000 * seconds, 1),
           "ms_runs": [round(1000 * s, 1) for s in timing.seconds], "spread": round(timing.spread, 2),
           f"{item}_per_s": round(batch / seconds, 3), "note": note}
    if mem is not None:
        out.update(peak_mem_mb=round(mem.peak_mb, 1), mem_growth_mb=round(mem.growth_mb, 1), mem_kind=mem.kind)
    if flops:
        out["model_tflop_per_step"] = round(flops / 1e12, 4)
        out["achieved_tflop_s"] = round(flops / seconds / 1e12, 3)
        value = mfu(flops, seconds, peak_flops)
        out["mfu"] = None if value is None else round(value, 4)
    bench.rows.append(out)
    return out
