"""The bodies of ``qvlm data synth`` and ``qvlm data inspect`` (cli.py parses flags and prints).

Both return one JSON-serialisable dict; progress goes to stderr only when asked for.
"""

from __future__ import annotations

import time
from pathlib import Path

from qvlm.data.synth import DEFAULT_HELDOUT, SPLITS, split_sizes, write_split


def run_synth(out: str | Path, n: int, seed: int = 0, image_size: int = 64, n_test: int | None = None,
              n_heldout: int | None = None, heldout=DEFAULT_HELDOUT) -> dict:
    """Write ``out/{train,test,heldout}.jsonl`` + ``out/images/*.png``; returns paths and sizes.

    Train has ``n`` images; test and heldout default to max(200, n // 10) each."""
    if n < 1 or image_size < 8:
        raise ValueError(f"need n >= 1 and image_size >= 8, got n={n}, image_size={image_size}")
    start = time.perf_counter()
    sizes = split_sizes(n, n_test, n_heldout)
    files = {split: str(write_split(out, split, sizes[split], seed, image_size, heldout)) for split in SPLITS}
    return {"out": str(out), "files": files, "sizes": sizes, "seed": seed, "image_size": image_size,
            "heldout_pairs": [" ".join(p) for p in heldout], "seconds": round(time.perf_counter() - start, 3)}


def run_inspect(source: str, grid: str | Path | None = None, split: str = "train",
                max_records: int | None = None, max_pixels: int | None = None) -> dict:
    """Counts, skip reasons by reason, caption-length stats; a PNG grid of samples at ``grid`` if given."""
    from qvlm.data.inspect import inspect_source

    return inspect_source(source, grid_path=grid, max_records=max_records, split=split, max_pixels=max_pixels)
