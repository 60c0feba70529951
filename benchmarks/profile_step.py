"""Where one train step's device time goes: ``python benchmarks/profile_step.py [--stage 2] [--batch 256]
[--compile] [--shapes real] [--precision fp32] [--set KEY=VALUE ...]`` prints the kernels (GPU) or
operators (CPU) that take the most time in one step of ``qvlm bench``'s trainer (random weights, bf16
autocast unless ``--precision`` says otherwise), and the operators that launched them. On a GPU it
also counts the step's host-device syncs (PyTorch's sync debug mode: every operation that made the
host wait for the GPU). For finding what to optimise; the speed claims themselves come from
``qvlm bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from qvlm.bench.harness import Bench, SceneFiles, build_trainer, fixed_batch
from qvlm.bench.shapes import SHAPES
from qvlm.bench.timing import synchronizer, time_interleaved
from qvlm.train.speed import compile_layers
from qvlm.train.steps import step_losses


def host_syncs(fn, device: torch.device) -> Counter | None:
    """One call of ``fn`` under ``torch.cuda.set_sync_debug_mode("warn")`` on a GPU: how many times
    each synchronising operation made the host wait for the GPU (``.item()``, ``nonzero``, a blocking
    copy, ...), keyed by where Python called it and the warning's first line. None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{os.path.basename(w.filename)}:{w.lineno}: {str(w.message).splitlines()[0][:90]}"
                   for w in caught if "synchroniz" in str(w.message))


def kernel_ms(averages) -> float:
    """From a profile's ``key_averages()``: the summed time of what ran on the GPU (kernels, copies,
    memsets) in ms."""
    return sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1000


def top(averages, on_device: bool, key: str, n: int) -> str:
    chosen = [e for e in averages if (e.device_type == DeviceType.CUDA) == on_device]
    chosen.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in chosen) or 1
    lines = [f"  {'ms':>8} {'share':>6} {'calls':>6}  name"]
    for e in chosen[:n]:
        value = getattr(e, key)
        lines.append(f"  {value / 1000:8.2f} {100 * value / total:5.1f}% {e.count:6d}  {e.key[:110]}")
    return "\n".join(lines)


def attention_backend(name: str):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return nullcontext() if name == "default" else sdpa_kernel([backends[name]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shapes", default="real", choices=sorted(SHAPES))
    ap.add_argument("--compile", action="store_true", help="compile each Q-Former and LLM layer first")
    ap.add_argument("--sdpa", choices=("default", "efficient", "flash", "cudnn", "math"), default="default",
                    help="experiment: restrict scaled_dot_product_attention to one backend")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the model and step, e.g. model.llm.lora.dropout=0 (repeatable)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--precision", choices=("bf16", "fp32", "auto"), default="bf16",
                    help="bf16 autocast (default), fp32, or auto: bf16 where the device runs it natively")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as work, attention_backend(args.sdpa):
        bench = Bench(device, args.precision, 1, 1, Path(work))
        trainer = build_trainer(SHAPES[args.shapes], bench, stage=args.stage, batch_size=args.batch,
                                overrides=tuple(args.set))
        files = SceneFiles(bench.work, SHAPES[args.shapes].file_size, args.batch)
        batch = fixed_batch(trainer, files, args.batch)
        if args.compile:
            compile_layers(trainer.model)
        sync = synchronizer(device)
        timing = time_interleaved({"step": lambda: trainer.step(batch)}, repeats=3, warmup=3, sync=sync)["step"]
        step_ms = 1000 * statistics.mean(timing.seconds)
        with torch.no_grad(), bench.autocast():
            loss = float(step_losses(trainer.model, batch, trainer.cfg, generator=trainer.generator,
                                     dec_token_id=trainer.dec_token_id)["loss"])
        syncs = host_syncs(lambda: trainer.step(batch), device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            trainer.step(batch)
            sync()
    averages = prof.key_averages()
    flags = (("compiled layers", args.compile), (f"SDPA {args.sdpa}", args.sdpa != "default"),
             (", ".join(args.set), bool(args.set)))
    extras = [name for name, on in flags if on]
    title = ", ".join([f"stage {args.stage}, {args.shapes} shapes, batch {args.batch}, {bench.precision_label}",
                       *extras])
    print(f"== {title}: {step_ms:.1f} ms per step (unprofiled, mean of 3); loss after 6 steps {loss:.4f}")
    if syncs is not None:
        print(f"host-device syncs in one step: {sum(syncs.values())}")
        for message, count in syncs.most_common(8):
            print(f"  {count:4d}  {message}")
    if device.type == "cuda":
        print(f"kernel time {kernel_ms(averages):.1f} ms in the profiled step; top kernels:")
        print(top(averages, True, "self_device_time_total", args.rows))
        print("operators by the device time of the kernels they launched (children included):")
        print(top(averages, False, "device_time_total", args.rows))
    else:
        print("top operators by own CPU time:")
        print(top(averages, False, "self_cpu_time_total", args.rows))


if __name__ == "__main__":
    main()
