"""argparse types the benchmark scripts share (no torch import: ``bench_cpu_allocator.py`` sets up
malloc in its child processes before torch loads)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def stage_list(text: str) -> list[int]:
    """Comma-separated training stages, e.g. "1,2"."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages or any(s not in ("1", "2") for s in stages):
        raise argparse.ArgumentTypeError(f"expected stages from 1,2, got {text!r}")
    return [int(s) for s in stages]
