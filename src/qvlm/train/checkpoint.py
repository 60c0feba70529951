"""Crash-safe training checkpoints: safetensors + JSON, never pickle.

A checkpoint is a folder ``checkpoints/step-N/`` holding ``model.safetensors`` (the trainable
tensors), ``optimizer.safetensors`` + the optimiser's JSON (param groups, scalars),
``rng.safetensors`` (torch CPU/CUDA generator states), ``trainer.json`` (step, data position,
Python/NumPy RNG, best metric) and ``config.yaml``. It is written under a temporary name and
renamed into place, then ``latest`` is replaced atomically; a crash at any moment leaves the
previous checkpoint intact and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qvlm.config import Config, dump_config

DONE = "trainer.json"  # written last: a folder without it is incomplete


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, cfg: Config, trainer: dict[str, Any],
                    generators: dict[str, torch.Generator] | None = None,
                    rank_rngs: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``root/step-N`` atomically and point ``root/latest`` at it. ``rank_rngs``: the global
    RNG states of ranks 1..W-1 of a multi-process run (rank 0's are this process's)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "optimizer.json", opt_meta)
    ranked = {f"rank{r}.{k}": v for r, states in enumerate(rank_rngs or [], start=1) for k, v in states.items()}
    save_file({**rng_tensors(generators or {}), **ranked}, tmp / "rng.safetensors")
    (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    state = {**trainer, "step": step, "python_rng": python_rng_state(), "numpy_rng": numpy_rng_state()}
    write_json(tmp / DONE, state)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    fsync_dir(root)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (``latest`` if valid, else the highest complete step)."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / DONE).is_file():
            return candidate
    steps = sorted((step_of(p), p) for p in root.glob("step-*") if (p / DONE).is_file())
    return steps[-1][1] if steps else None


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator] | None = None,
                    rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimiser and RNG states (``rank``'s own global RNG when the checkpoint has it);
    return (model tensors, trainer state)."""
    if not (path / DONE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {DONE})")
    model_state = load_file(path / "model.safetensors")
    meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
    optimizer.load_state_dict(unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta))
    trainer = json.loads((path / DONE).read_text(encoding="utf-8"))
    restore_rng(load_file(path / "rng.safetensors"), trainer, generators or {}, rank)
    return model_state, trainer


def prune_checkpoints(root: Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and those named in ``keep``)."""
    done = sorted((step_of(p), p) for p in root.glob("step-*") if (p / DONE).is_file())
    for _, path in done[: max(0, len(done) - keep_last)]:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # leftovers of a crashed write
        shutil.rmtree(stale, ignore_errors=True)


# ---- pieces -------------------------------------------------------------------------------


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def global_rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = global_rng_tensors()
    for name, gen in generators.items():
        out[f"gen.{name}"] = gen.get_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], trainer: dict, generators: dict[str, torch.Generator],
                rank: int = 0) -> None:
    prefix = f"rank{rank}." if rank else ""
    if prefix + "torch_cpu" in tensors:
        torch.set_rng_state(tensors[prefix + "torch_cpu"])
        if prefix + "torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[prefix + "torch_cuda"])
    else:  # a rank the saving run did not have: its own deterministic stream
        torch.manual_seed(int(trainer["step"]) * 1_000_003 + rank)
    for name, gen in generators.items():
        if f"gen.{name}" in tensors:
            gen.set_state(tensors[f"gen.{name}"])
    version, state, gauss = trainer["python_rng"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = trainer["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def python_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def numpy_rng_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
