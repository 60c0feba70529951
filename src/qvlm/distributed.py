"""Everything that talks to torch.distributed lives here; models and losses receive plain callables.

The process group comes from Accelerate (``setup``), so the same command runs alone, under
``torchrun --nproc_per_node N`` and under ``accelerate launch --num_processes N`` (gloo on CPU,
NCCL on GPUs). ``all_gather_with_grad`` concatenates a tensor from every rank along dim 0 and sends
each rank's loss gradient back to the rank that owns the slice, which is what ITC over the global
batch needs. The rest are small collectives for logging, evaluation and checkpoints.
"""

from __future__ import annotations

import gc
import os
import sys
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor


def setup(timeout_s: int = 600):
    """The run's ``accelerate.Accelerator`` (initialises the process group when launched with N > 1).

    DDP is told that some parameters may get no gradient (a loss term with weight 0 leaves its head
    unused); ``timeout_s`` bounds every collective, so a dead peer fails the job instead of hanging it.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
                DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)


def teardown() -> bool:
    """Destroy the process group, if one was set up, while the interpreter is still fully alive.

    Garbage is collected first: the accelerator and its wrappers sit in reference cycles, and what
    they hold of the group would otherwise be freed during the interpreter's own teardown. Returns
    whether this process was one rank of several (then end it with :func:`exit_rank`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    several = dist.get_world_size() > 1
    gc.collect()
    dist.destroy_process_group()
    return several


def exit_rank(code: int) -> NoReturn:
    """End one rank of a finished multi-process run without the interpreter's teardown.

    Even after :func:`teardown`, the gloo backend's threads sometimes abort a rank there ("terminate
    called without an active exception", SIGABRT, exit code -6), after every file was written: a
    finished run reported as failed (rarely, and only seen inside full test runs). Nothing is pending
    by then but the standard streams, which are flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss touched every slice: sum them
        size = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * size : (dist.get_rank() + 1) * size]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """(B, ...) on each of W ranks -> (W*B, ...) everywhere, differentiable w.r.t. the local part.

    Tensors without gradients may differ in their dim 1 (token ids padded per rank): they are
    right-padded with 0 to the longest first (0 = [PAD] for ids, "masked" for attention masks)."""
    if not is_distributed():
        return tensor
    if not tensor.requires_grad:
        return all_gather_no_grad(tensor)
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor) -> Tensor:
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    if tensor.dim() >= 2:  # ragged dim 1: pad to the longest across ranks
        lengths = torch.tensor([tensor.shape[1]], device=tensor.device)
        every = [torch.empty_like(lengths) for _ in range(dist.get_world_size())]
        dist.all_gather(every, lengths)
        longest = int(max(int(x) for x in every))
        if longest > tensor.shape[1]:
            pad = [0, 0] * (tensor.dim() - 2) + [0, longest - tensor.shape[1]]
            tensor = torch.nn.functional.pad(tensor, pad)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def gather_fn():
    """The gather callable the stage-1 step takes (None when running in one process)."""
    return all_gather_with_grad if is_distributed() else None


def sum_fn():
    """The all-ranks sum the losses take to normalise by global token counts (None alone)."""
    return all_reduce_sum if is_distributed() else None


@torch.no_grad()
def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; no gradient)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


def mean_over_ranks(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Per-rank scalars -> their mean over ranks (one collective), same keys on every rank."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return {k: float(v) / world_size() for k, v in zip(keys, stacked.tolist())}


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (within the job's own processes only)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items) -> list[tuple[int, Any]]:
    """This rank's share of ``items`` as (index, item): every world_size-th, from its rank."""
    return [(i, item) for i, item in enumerate(items) if i % world_size() == rank()]


def gather_ordered(pairs: list[tuple[int, Any]]) -> list[Any]:
    """(index, value) pairs from every rank -> the values in index order, on every rank."""
    merged = [pair for part in all_gather_object(pairs) for pair in part]
    return [value for _, value in sorted(merged, key=lambda p: p[0])]
