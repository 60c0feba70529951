"""Finding host-device syncs on a CPU: the operations that, on a GPU, make the host wait for every
queued kernel. Used by the stage-1 and stage-2 step tests."""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# read a value back (``.item()``, ``bool()``, ``int()``), or size an output by the data
SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique")


def _by_mask(args) -> bool:
    return any(isinstance(a, (list, tuple)) and any(torch.is_tensor(t) and t.dtype == torch.bool for t in a)
               for a in args)


def host_reads_in_qvlm(fn) -> list[str]:
    """Run ``fn`` and list the operations qvlm's own code made that read a value back from the device
    (``.item()``, ``bool()``, ``int()``: ``_local_scalar_dense``) or need a count from it (``nonzero``,
    ``unique``, indexing by a boolean mask)."""
    found: list[str] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(op in name for op in SYNC_OPS) or ("index" in name and _by_mask(args)):
                caller = [f for f in traceback.extract_stack() if "/torch/" not in f.filename][-2]
                if "/qvlm/" in caller.filename:
                    found.append(f"{name} at {caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}")
            return func(*args, **(kwargs or {}))

    with Reads():
        fn()
    return found
