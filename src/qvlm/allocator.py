"""Keep the memory a training step frees for the next step (glibc's malloc), instead of giving it
back to the operating system and faulting it in again.

PyTorch allocates CPU tensors with ``malloc``. glibc serves every block above its mmap threshold
(128 KiB at first, adapting up to 32 MiB) with fresh pages from ``mmap`` and unmaps them on
``free``, and it trims the free top of its heap back to the system. A training step allocates the
same blocks every time (the bf16 casts of the weights under autocast, the gradients, the
activations), so every step the kernel maps, zeroes and faults in each of their pages again. On the
development CPU (2 cores, bf16) that made ``aten::copy_`` about 20% and ``aten::fill_`` (the word
embeddings' dense gradient, 94 MB, zeroed three times a stage-1 step) about 9% of a stage-1 step at
the real shapes; most of that time was page faults, not copying.

:func:`keep_freed_memory` sets ``M_MMAP_MAX`` to 0 (every block from the heap) and
``M_TRIM_THRESHOLD`` to 2 GiB (the heap is not trimmed below that), so the second step reuses the
first step's pages. The cost is a resident size that stays at its peak instead of shrinking between
steps (measured +2-4%). ``benchmarks/bench_cpu_allocator.py`` times steps with and without it in
alternating processes. The CLI applies it to every command but ``serve`` (a long-lived server with
requests of every size), unless ``QVLM_MALLOC=system``. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os

ENV = "QVLM_MALLOC"  # "keep" (default) or "system"
MODES = ("keep", "system")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest, 2 GiB
_kept = False  # whether keep_freed_memory took in this process


def libc() -> ctypes.CDLL | None:
    """The process's C library, if it is glibc (the only one whose ``mallopt`` this sets)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    lib = ctypes.CDLL(None)
    return lib if hasattr(lib, "mallopt") else None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; returns whether both settings took."""
    global _kept
    lib = libc()
    if lib is None:
        return False
    _kept = lib.mallopt(M_MMAP_MAX, 0) == 1 and lib.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _kept


def in_effect() -> str:
    """For reports: "keeps freed memory" once :func:`keep_freed_memory` took, else "system default"."""
    return "keeps freed memory" if _kept else "system default"


def mode_from_env(environ=os.environ) -> str:
    """``QVLM_MALLOC``: "keep" when unset; ValueError for anything but "keep" or "system"."""
    mode = environ.get(ENV, "keep").strip().lower() or "keep"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {environ[ENV]!r}")
    return mode


def apply_from_env(environ=os.environ) -> str:
    """What the CLI calls first: keep freed memory unless ``QVLM_MALLOC=system``. Returns the mode in
    effect: "keep", "system", or "system (not glibc)" where there is nothing to set."""
    if mode_from_env(environ) == "system":
        return "system"
    return "keep" if keep_freed_memory() else "system (not glibc)"
