"""One training loop for both stages, shaped like nanoGPT's: setup, build, then for each step:
lr, micro-steps, clip, step, log, periodic eval and checkpoint.

Accelerate sets up the processes and wraps the step in DDP, so the same call runs alone, under
``torchrun`` and under ``accelerate launch``: each of W ranks reads its block of every global batch,
ITC/ITM see the gathered batch, and W ranks x batch B make the update of one process with batch W*B.
Only rank 0 writes files and logs.

Writes ``OUT/config.yaml``, ``OUT/metrics.jsonl``, ``OUT/checkpoints/step-N/`` and the final
``OUT/model/`` (loadable by ``VLM.from_pretrained``). ``resume=True`` continues exactly from the
newest complete checkpoint: the same weights as an uninterrupted run, on CPU.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from qvlm.config import Config, save_config
from qvlm.models.vlm import VLM, check_text_side, read_blocks, read_model_config
from qvlm.model_sources import UnreadableFile
from qvlm.train import checkpoint as ckpt
from qvlm import distributed as D
from qvlm.train.batches import BatchStream, build_stream
from qvlm.train.metrics_log import MetricsLog
from qvlm.train.optim import build_optimizer, set_lr
from qvlm.train.speed import apply_speed_options
from qvlm.train.steps import step_losses


class NonFiniteLoss(RuntimeError):
    pass


class RunExists(ValueError):
    """``--out`` already holds a run and neither resuming nor overwriting it was asked for."""


RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "model", "tensorboard")  # what a run writes


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunExists("give --resume or --overwrite, not both")
    if not resume and not overwrite and any((out / name).exists() for name in RUN_ENTRIES):
        raise RunExists(f"{out} already holds a run: add --resume to continue it or --overwrite to start over")


def start_run_folder(cfg: Config, out: Path, overwrite: bool) -> None:
    """Rank 0 deletes what an earlier run wrote (``overwrite``) and writes the config; all wait."""
    if D.rank() == 0:
        for path in (out / name for name in RUN_ENTRIES if overwrite):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    D.barrier()


@dataclass
class RunState:
    step: int = 0
    best: dict = field(default_factory=dict)
    log: MetricsLog | None = None
    train_s: float = 0.0  # seconds spent in train steps so far (evals and checkpoints left out)


def log(msg: str) -> None:
    if D.rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast where the hardware has it (GPUs; CPUs with bf16 instructions), else off."""
    use = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and bf16_available(device))
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use), use


def bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class TrainStep(nn.Module):
    """The model as one module whose forward is a micro-step's named losses, so DDP can wrap it."""

    def __init__(self, model: VLM, cfg: Config, dec_token_id: int | None):
        super().__init__()
        self.model, self.cfg, self.dec_token_id = model, cfg, dec_token_id

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return step_losses(self.model, batch, self.cfg, generator=generator, dec_token_id=self.dec_token_id)


def run_config(cfg: Config) -> Config:
    """The config a run trains with: ``train.init_from``'s blocks adopted, then checked."""
    cfg = adopt_init_from(cfg)
    if cfg.train.stage == 1:
        check_text_side(cfg, "stage-1 training")
    return cfg


def adopt_init_from(cfg: Config) -> Config:
    """With ``train.init_from``: the run's vision tower and Q-Former are that folder's (its
    ``model.vision`` and ``model.qformer``, the run keeping its own Q-Former dropout), so the run
    loads the weights into the blocks they were trained in, whatever the run's config says of them."""
    if not cfg.train.init_from:
        return cfg
    try:
        saved = read_model_config(cfg.train.init_from)
    except UnreadableFile as exc:
        raise UnreadableFile(f"train.init_from: {exc}") from exc
    cfg = copy.deepcopy(cfg)
    saved.model.qformer.dropout = cfg.model.qformer.dropout
    changed = [f"model.{block}.{key}" for block in ("vision", "qformer")
               for key, value in vars(getattr(saved.model, block)).items()
               if getattr(getattr(cfg.model, block), key) != value]
    cfg.model.vision, cfg.model.qformer = saved.model.vision, saved.model.qformer
    if changed:
        log(f"train.init_from: {', '.join(changed)} as in {cfg.train.init_from}")
    return cfg


def build_model(cfg: Config) -> VLM:
    model = VLM.from_config(cfg, with_llm=cfg.train.stage == 2)
    if cfg.train.init_from:
        try:
            blocks = read_blocks(Path(cfg.train.init_from), ("qformer", "heads"), required=True)
        except UnreadableFile as exc:
            raise UnreadableFile(f"train.init_from: {exc}") from exc
        model.load_trainable_state(blocks, strict=False)
        log(f"initialised Q-Former and heads from {cfg.train.init_from}")
    elif cfg.train.stage == 2:
        log("warning: stage 2 without train.init_from starts from an untrained Q-Former")
    return model  # from_config already set what this stage trains


def train(cfg: Config, out: str | Path, resume: bool = False,
          eval_fn: Callable[[VLM, Config], dict] | None = None, progress: bool = True,
          stop_at_step: int | None = None, return_model: bool = False, overwrite: bool = False) -> dict:
    """Run ``cfg.train.max_steps`` optimiser steps; returns the final metrics.

    ``stop_at_step`` ends the run early with a checkpoint (as if interrupted there), keeping the
    schedule of the full run; ``resume=True`` then continues it. ``return_model`` adds the trained
    model (the weights just saved to ``OUT/model``) as ``"model"``, so a caller that evaluates next
    need not load the base models again. A folder that already holds a run is refused (``RunExists``)
    unless ``resume`` continues it or ``overwrite`` deletes what it holds first."""
    out = Path(out)
    check_run_folder(out, resume, overwrite)
    cfg = run_config(cfg)
    accelerator = D.setup(cfg.train.dist_timeout_s)
    device = accelerator.device
    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    start_run_folder(cfg, out, overwrite)
    model = build_model(cfg).to(device)
    model.train()
    apply_speed_options(model, cfg.train)  # gradient checkpointing, torch.compile
    opt, counts = build_optimizer(model.parameter_groups(), cfg.train)
    log(f"trainable parameters by group: {json.dumps(counts)}; all: {json.dumps(model.parameter_counts())}")
    stream = build_stream(cfg, model, split="train", progress=progress)
    step_module = accelerator.prepare_model(TrainStep(model, cfg, stream.dec_token_id))
    gen = torch.Generator().manual_seed(cfg.train.seed)  # hard negatives: the same draws on every rank
    if D.rank() > 0:
        torch.manual_seed(cfg.train.seed * 1_000_003 + D.rank())  # dropout differs between ranks
    state = RunState()
    if resume:
        state = restore(cfg, out, model, opt, stream, gen)
    state.log = MetricsLog(out, cfg.train.tensorboard)
    autocast, bf16 = autocast_for(cfg, device)
    log(f"stage {cfg.train.stage}: {cfg.train.max_steps} steps, batch {cfg.train.batch_size} x "
        f"accum {cfg.train.grad_accum} x {D.world_size()} processes, bf16 autocast {'on' if bf16 else 'off'}, "
        f"device {device}")
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not progress or D.rank() != 0,
               desc=f"stage {cfg.train.stage}", file=sys.stderr, dynamic_ncols=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    while state.step < cfg.train.max_steps:
        t0 = time.perf_counter()
        lr = set_lr(opt, state.step, cfg.train)
        terms = train_step(step_module, accelerator, model, opt, stream, cfg, autocast, gen, params, device)
        state.step += 1
        seconds = time.perf_counter() - t0
        state.train_s += seconds
        record = {"step": state.step, "lr": lr, **terms, "samples_per_s": global_batch(cfg) / seconds,
                  "train_s": round(state.train_s, 2)}
        state.log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.3f}")
        periodic(cfg, out, model, opt, stream, gen, state, eval_fn)
        if stop_at_step is not None and state.step >= stop_at_step and state.step < cfg.train.max_steps:
            save(cfg, out, model, opt, stream, gen, state)
            bar.close()
            state.log.close()
            return {"step": state.step, "stopped": True}
    bar.close()
    result = finish(cfg, out, model, opt, stream, gen, state, eval_fn)
    return {**result, "model": model} if return_model else result


def train_step(step_module: nn.Module, accelerator, model: VLM, opt, stream: BatchStream, cfg: Config,
               autocast, gen, params, device) -> dict:
    """One optimiser step over ``grad_accum`` micro-batches; returns the mean of each named term
    (over micro-batches and ranks) and the gradient norm. Gradients are averaged over ranks on the last
    micro-batch. The terms stay on the device and are read together once per step: one host-device
    sync per step on a GPU instead of one per term and micro-batch."""
    sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.train.grad_accum):
        batch = stream.next_batch(device)
        sync = micro == cfg.train.grad_accum - 1
        with (nullcontext() if sync else accelerator.no_sync(step_module)):
            with autocast:
                terms = step_module(batch, gen)
            (terms["loss"] / cfg.train.grad_accum).backward()
        for key, value in terms.items():
            part = torch.as_tensor(value, device=device).detach().float() / cfg.train.grad_accum
            sums[key] = sums[key] + part if key in sums else part
    if cfg.train.clip_grad > 0:  # on non-finite gradients too: they are dropped below
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
    values = dict(zip(sums, torch.stack([v.reshape(()).float() for v in sums.values()]).tolist()))  # one sync
    values = D.mean_over_ranks(values, device)  # every rank sees the same numbers, so all stop together
    if not math.isfinite(values["loss"]):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss became {values['loss']} at this step ({values}); lower train.lr or check the data")
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.heads.clamp_temperature()
    return values


def periodic(cfg, out, model, opt, stream, gen, state: RunState, eval_fn) -> None:
    if state.step >= cfg.train.max_steps:
        return  # the final eval and checkpoint happen in finish()
    if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and eval_fn:
        run_eval(cfg, out, model, state, eval_fn)
    if cfg.train.save_every and state.step % cfg.train.save_every == 0:
        save(cfg, out, model, opt, stream, gen, state)


def run_eval(cfg, out, model: VLM, state: RunState, eval_fn) -> dict:
    model.eval()
    with torch.no_grad():
        metrics = eval_fn(model, cfg)
    model.train()
    state.log.write({"step": state.step, "train_s": round(state.train_s, 2), "eval": metrics})
    key = metrics.get("primary")
    if key is not None and (not state.best or metrics[key] > state.best["value"]):
        state.best = {"step": state.step, "metric": key, "value": metrics[key]}
    log(f"eval at step {state.step}: {json.dumps(metrics)}")
    return metrics


def save(cfg, out, model: VLM, opt, stream: BatchStream, gen, state: RunState) -> None:
    """A checkpoint of the whole job. Collective (every rank calls it); rank 0 writes."""
    data = stream.state_dict()
    rngs = D.all_gather_object(ckpt.global_rng_tensors())
    if D.rank() != 0:
        return
    root = out / "checkpoints"
    trainer = {"data": data, "best": state.best, "world_size": D.world_size(), "global_batch": global_batch(cfg),
               "train_s": state.train_s}
    ckpt.save_checkpoint(root, state.step, model.trainable_state(), opt, cfg, trainer, {"hard_negatives": gen},
                         rank_rngs=rngs[1:])
    keep = {f"step-{state.best['step']}"} if state.best else set()
    ckpt.prune_checkpoints(root, cfg.train.keep_last, keep)


def intact_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint, after saying which are intact and warning, file by file, about
    the damaged ones newer than it; ``UnreadableFile`` when there are checkpoints but none is intact."""
    states = ckpt.checkpoint_states(root)
    log("checkpoints: " + (", ".join(f"{p.name} {'damaged' if bad else 'intact'}" for p, bad in states) or "none"))
    for path, problems in states:
        if not problems:
            return path
        log(f"warning: {path.name} is damaged and is not used: {'; '.join(problems)}")
    if states:
        raise UnreadableFile(f"--resume: no intact checkpoint under {root} (`qvlm checkpoint verify {root}` "
                             "lists the damaged files); start again with --overwrite")
    return None


def restore(cfg: Config, out: Path, model: VLM, opt, stream: BatchStream, gen) -> RunState:
    path = intact_checkpoint(out / "checkpoints")
    if path is None:
        log(f"--resume: no checkpoint under {out / 'checkpoints'}, starting from step 0")
        return RunState()
    tensors, trainer = ckpt.load_checkpoint(path, opt, {"hard_negatives": gen}, rank=D.rank())
    model.load_trainable_state(tensors, strict=False)
    stream.load_state_dict(trainer["data"])
    trim_metrics(out / "metrics.jsonl", int(trainer["step"]))
    saved_world = int(trainer.get("world_size", 1))
    note = f", written by {saved_world} processes" if saved_world != D.world_size() else ""
    log(f"resumed from {path} (step {trainer['step']}{note})")
    saved_batch = trainer.get("global_batch")
    if saved_batch is not None and saved_batch != global_batch(cfg):
        log(f"warning: the global batch was {saved_batch} and is now {global_batch(cfg)} (train.batch_size x "
            "train.grad_accum x processes); set train.batch_size to keep the run's curve")
    return RunState(step=int(trainer["step"]), best=trainer.get("best") or {},
                    train_s=float(trainer.get("train_s") or 0.0))


def global_batch(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * D.world_size()


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be written again)."""
    if D.rank() != 0 or not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
    ckpt.write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def finish(cfg, out, model: VLM, opt, stream, gen, state: RunState, eval_fn) -> dict:
    metrics = run_eval(cfg, out, model, state, eval_fn) if eval_fn else {}
    save(cfg, out, model, opt, stream, gen, state)
    if D.rank() == 0:
        model.save_pretrained(out / "model")
        log(f"saved the final model to {out / 'model'}; data: {stream.summary()}")
    state.log.close()
    D.barrier()  # no rank returns before the model is on disk
    return {"step": state.step, "eval": metrics, "best": state.best}
