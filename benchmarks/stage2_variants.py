"""Stage-2 train-step variants side by side on one model, for finding what lifts the GPU's MFU:
``python benchmarks/stage2_variants.py [--batch 512] [--shapes real] [--only NAME ...] [--json-out F]``.

Each variant changes one or two things against the step ``qvlm bench`` times (random weights, bf16
autocast, cached features): the padding mask kept (as before rows were marked right-padded) or
left out, the image slots and supervised positions found on the device (as before the collator
found them on the CPU), LoRA dropout off, rows padded to a multiple of 16, one SDPA backend, and,
with LoRA from the image on, the shared prompt prefix. Eager variants run first, then each compiled
variant compiles every Q-Former and LLM layer afresh (``torch._dynamo.reset()``). Prints per
variant: ms per step (median), samples/s, MFU over the real tokens and over the padded positions
(the basis of earlier runs), peak memory, the GPU's kernel time per step, and the loss after the
variant's steps (a no-grad forward; the model trains on through the variants, so it is a sanity
value only: the exactness of the mask-free rows, the collator's positions and the shared prefix is
tested in tests/test_stage2.py). The JSON report is rewritten after every variant. For experiments; the claims themselves come from ``qvlm bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from qvlm import losses as L
from qvlm.allocator import apply_from_env
from qvlm.bench import flops as FL
from qvlm.bench.harness import Bench, SceneFiles, build_trainer
from qvlm.bench.shapes import SHAPES
from qvlm.bench.stage2 import flops_of, stage2_batch
from qvlm.bench.timing import device_time, synchronizer, time_one
from qvlm.train.loop import frozen_weights
from qvlm.train.speed import compile_layers
from qvlm.train.steps import step_losses

from profile_step import attention_backend, bf16_residual  # benchmarks/profile_step.py, beside this script


@dataclass(frozen=True)
class Variant:
    name: str
    compiled: bool
    mask: bool = False  # keep the padding mask (the step before right-padded rows went mask-free)
    dropout0: bool = False  # LoRA dropout off
    pad: int = 1  # rows padded to a multiple of this
    sdpa: str = "default"  # one SDPA backend only
    positions: str = "all"  # model.llm.lora.positions
    share: bool = False  # train.share_prompt_prefix (from_image only)
    bf16_residual: bool = False  # profile_step.bf16_residual: changes the model for good (run it last)
    on_device: bool = False  # no image/label positions from the collator: found on the device (syncs)


VARIANTS = [  # in the order they run; the compiled ones by priority (a time budget may cut the tail)
    Variant("eager, padding mask", False, mask=True),
    Variant("eager, causal", False),
    Variant("eager, causal, LoRA dropout 0", False, dropout0=True),
    Variant("compiled, padding mask", True, mask=True),
    Variant("compiled, causal", True),
    Variant("compiled, causal, LoRA dropout 0", True, dropout0=True),
    Variant("compiled, causal, LoRA dropout 0, positions found on the device", True, dropout0=True,
            on_device=True),
    Variant("compiled, causal, LoRA dropout 0, pad 16", True, dropout0=True, pad=16),
    Variant("compiled, causal, LoRA dropout 0, SDPA cudnn", True, dropout0=True, sdpa="cudnn"),
    Variant("compiled, from_image, whole rows, dropout 0", True, dropout0=True, positions="from_image"),
    Variant("compiled, from_image, shared prefix, dropout 0", True, dropout0=True, positions="from_image",
            share=True),
    Variant("compiled, causal, LoRA dropout 0, SDPA efficient", True, dropout0=True, sdpa="efficient"),
    Variant("compiled, causal, LoRA dropout 0, bf16 residual", True, dropout0=True, bf16_residual=True),
]

def set_lora_dropout(model, off: bool, p: float) -> None:
    """peft keeps each adapter's dropout in ``lora_dropout[adapter]``; dropout 0 is an Identity there."""
    for module in model.llm.model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key in drops:
                drops[key] = nn.Identity() if off else nn.Dropout(p)


def uncompile(model) -> None:
    for layer in list(model.qformer.layers) + list(model.llm.decoder_layers()):
        layer._compiled_call_impl = None


def measure(v: Variant, trainer, files: SceneFiles, bench: Bench, steps: int, peak: float | None) -> dict:
    model, cfg = trainer.model, trainer.cfg
    set_lora_dropout(model, v.dropout0, cfg.model.llm.lora.dropout)
    cfg.train.share_prompt_prefix = v.share
    batch = stage2_batch(trainer, files, files.n, v.pad)
    if v.bf16_residual:
        bf16_residual(model)
    if v.mask:
        batch.pop("padding_side")
    if v.on_device:  # as before the collator found the positions: each count is a host-device sync
        batch.pop("image_positions")
        batch.pop("label_positions")
    b, t = batch["input_ids"].shape
    supervised = int((batch["labels"][:, 1:] != L.IGNORE_INDEX).sum())
    real = int(batch["attention_mask"].sum())
    n_img = batch["image_embeds"].shape[1]
    flops_real = flops_of(trainer, batch)  # the basis qvlm bench uses: the LLM over the real tokens
    flops_padded = FL.step_flops(FL.stage2_groups(model, b, b * t, supervised, n_img))
    sync = synchronizer(bench.device)
    with attention_backend(v.sdpa):
        torch._dynamo.reset()
        uncompile(model)
        start = time.perf_counter()
        if v.compiled:
            compile_layers(model)
        for _ in range(2):
            trainer.step(batch)
        sync()
        first_s = time.perf_counter() - start
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        timing = time_one(lambda: trainer.step(batch), repeats=steps, warmup=0, sync=sync)
        peak_gb = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        busy = device_time(lambda: trainer.step(batch), bench.device)
        with torch.no_grad(), bench.autocast(), frozen_weights(model, bench.bf16):
            loss = float(step_losses(model, batch, cfg, generator=trainer.generator)["loss"])
    sec = statistics.median(timing.seconds)
    return {**asdict(v), "batch": b, "T": t, "real_tokens": real, "shared_prefix": batch.get("shared_prefix"),
            "ms": round(1000 * sec, 1), "ms_runs": [round(1000 * s, 1) for s in timing.seconds],
            "samples_per_s": round(b / sec, 1), "tokens_per_s": round(real / sec),
            "tflop_real": round(flops_real / 1e12, 2), "tflop_padded": round(flops_padded / 1e12, 2),
            "mfu_real": FL.mfu(flops_real, sec, peak), "mfu_padded": FL.mfu(flops_padded, sec, peak),
            "peak_gb": peak_gb, "first_two_steps_s": round(first_s, 1), "loss": round(loss, 5),
            "kernel_ms": busy and round(busy["kernel_ms"], 1), "launches": busy and busy.get("launches")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--shapes", default="real", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 untimed)")
    ap.add_argument("--only", nargs="*", help="run only the variants of these names")
    ap.add_argument("--budget-s", type=float, default=0, help="start no variant after this many seconds (0: none)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    apply_from_env()  # as the qvlm commands do (qvlm.allocator; QVLM_MALLOC=system: glibc's defaults)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = FL.peak_bf16_flops(name)
    unknown = set(args.only or ()) - {v.name for v in VARIANTS}
    if unknown:
        ap.error(f"no variant named {sorted(unknown)}; the variants: {[v.name for v in VARIANTS]}")
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    start, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as work:
        bench = Bench(device, "bf16", args.steps, 0, Path(work))
        files = SceneFiles(bench.work, SHAPES[args.shapes].file_size, args.batch)
        trainers: dict = {}
        for v in chosen:
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                print(f"-- out of budget before: {v.name}", flush=True)
                break
            if v.positions not in trainers:  # one model at a time on the device
                trainers.clear()
                torch.cuda.empty_cache() if device.type == "cuda" else None
                trainers[v.positions] = build_trainer(SHAPES[args.shapes], bench, stage=2, batch_size=args.batch,
                                                      overrides=(f"model.llm.lora.positions={v.positions}",))
            try:
                r = measure(v, trainers[v.positions], files, bench, args.steps, peak)
            except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
                r = {**asdict(v), "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            results.append(r)
            mfu = ("" if r.get("mfu_real") is None
                   else f" MFU {100 * r['mfu_real']:.1f}% ({100 * r['mfu_padded']:.1f}% padded)")
            print(f"{v.name:<52} " + (r["error"] if "error" in r else
                  f"B={r['batch']} T={r['T']} {r['ms']} ms {r['samples_per_s']} samples/s{mfu} "
                  f"kernels {r['kernel_ms']} ms peak {r['peak_gb'] and round(r['peak_gb'], 1)} GB "
                  f"loss {r['loss']} (first two steps {r['first_two_steps_s']} s)"), flush=True)
            if args.json_out:
                args.json_out.write_text(json.dumps({"device": name, "peak_bf16_flops": peak,
                                                     "shapes": args.shapes, "results": results}, indent=1))
    print(f"done in {time.perf_counter() - start:.0f} s on {name}")


if __name__ == "__main__":
    main()
