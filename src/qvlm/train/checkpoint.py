"""Crash-safe training checkpoints: safetensors + JSON, never pickle.

A checkpoint is a folder ``checkpoints/step-N/`` holding ``model.safetensors`` (the trainable
tensors), ``optimizer.safetensors`` + the optimiser's JSON (param groups, scalars),
``rng.safetensors`` (torch CPU/CUDA generator states), ``trainer.json`` (step, data position,
Python/NumPy RNG, best metric) and ``config.yaml``. It is written under a temporary name and
renamed into place, then ``latest`` is replaced atomically; a crash at any moment leaves the
previous checkpoint intact and ``latest`` pointing at a complete one. ``files.json`` records the size
and SHA-256 of every other file, so a file cut short or changed later (a partial copy, a full disk)
is found by ``checkpoint_problems`` and resuming falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from qvlm.config import Config, dump_config
from qvlm.model_sources import UnreadableFile, read_safetensors

DONE = "trainer.json"  # the last state file written: a folder without it is incomplete
MANIFEST = "files.json"  # size and SHA-256 of every other file, written after them
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", DONE)


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
    write_json(tmp / MANIFEST, {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()})
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    fsync_dir(root)
    return final


def file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint folder, one line per file, naming it: missing, cut short or
    changed since it was written; [] = intact. A checkpoint from before ``files.json`` existed is
    checked for its files' presence only."""
    if not (path / DONE).is_file():
        return [f"{path / DONE}: missing (the checkpoint was never finished)"]
    if not (path / MANIFEST).is_file():
        return [f"{path / name}: missing" for name in STATE_FILES if not (path / name).is_file()]
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"{path / MANIFEST}: not valid JSON ({exc})"]
    problems = []
    for name, want in manifest.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, {want['size']} when written (cut short or grown)")
        elif file_record(file)["sha256"] != want["sha256"]:
            problems.append(f"{file}: changed since it was written (SHA-256 differs)")
    return problems


def checkpoint_states(root: Path) -> list[tuple[Path, list[str]]]:
    """Every checkpoint folder under ``root``, newest first, with its problems ([] = intact)."""
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True)
    return [(p, checkpoint_problems(p)) for p in steps]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under ``root``, or None."""
    return next((path for path, problems in checkpoint_states(root) if not problems), None)


def read_json(path: Path) -> Any:
    """A JSON state file, or ``UnreadableFile`` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UnreadableFile(f"{path}: missing") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnreadableFile(f"{path}: not valid JSON ({exc})") from exc


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator] | None = None,
                    rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimiser and RNG states (``rank``'s own global RNG when the checkpoint has it);
    return (model tensors, trainer state)."""
    if not (path / DONE).is_file():
        raise UnreadableFile(f"{path / DONE}: missing ({path} is not a complete checkpoint)")
    model_state = read_safetensors(path / "model.safetensors")
    meta = read_json(path / "optimizer.json")
    optimizer.load_state_dict(unflatten_optimizer(read_safetensors(path / "optimizer.safetensors"), meta))
    trainer = read_json(path / DONE)
    restore_rng(read_safetensors(path / "rng.safetensors"), trainer, generators or {}, rank)
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
