"""``qvlm data inspect``: read a data source once, count used and skipped records, and draw a grid.

``inspect_source`` returns ``{"source", "split", "records", "used", "skipped": {reason: n},
"notes": {name: n}, "caption_chars": {"min", "mean", "max"}, "conversations": {"records", "turns",
"text_only"}, "summary", "grid"}`` (turns: assistant turns) and, with
``grid_path``, writes a PNG of the first used images with their captions underneath.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from qvlm.data.decode import SkipCounter
from qvlm.data.records import iter_records

CELL = 160  # pixels per grid cell side (image area)
TEXT_LINES = 4
LINE_HEIGHT = 12


def inspect_source(spec: str, grid_path: str | Path | None = None, max_records: int | None = None,
                   split: str = "train", grid_size: int = 16, **open_options) -> dict:
    """Counts, skip reasons and caption-length stats of a data source (see module doc)."""
    from qvlm.data.sources import open_dataset

    dataset = open_dataset(spec, split, **open_options)
    counter = SkipCounter()
    lengths: list[int] = []
    samples: list[tuple[Image.Image, str]] = []
    chats = {"records": 0, "turns": 0, "text_only": 0}
    for rec in iter_records(dataset, counter, max_records):
        lengths.append(len(rec["caption"]))
        if rec.get("messages"):
            chats["records"] += 1
            chats["turns"] += sum(t["role"] == "assistant" for t in rec["messages"])
            chats["text_only"] += rec.get("image_id") is None
        if len(samples) < grid_size and rec["image"] is not None:
            samples.append((rec["image"], rec["caption"]))
    stats = {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 2), "max": max(lengths)} \
        if lengths else {"min": 0, "mean": 0.0, "max": 0}
    grid = None
    if grid_path is not None:
        grid = str(write_grid(samples, grid_path))
    return {"source": spec, "split": split, **counter.to_dict(), "caption_chars": stats, "conversations": chats,
            "summary": counter.summary(), "grid": grid}


def write_grid(samples: list[tuple[Image.Image, str]], path: str | Path, columns: int = 4) -> Path:
    """Images (fit into CELL x CELL) with up to TEXT_LINES wrapped caption lines under each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(1, -(-len(samples) // columns))
    cell_h = CELL + TEXT_LINES * LINE_HEIGHT + 6
    sheet = Image.new("RGB", (columns * CELL, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if not samples:
        draw.text((4, 4), "no usable records", fill=(200, 0, 0), font=font)
    for i, (img, caption) in enumerate(samples):
        x, y = (i % columns) * CELL, (i // columns) * cell_h
        sheet.paste(fit(img, CELL - 8), (x + 4, y + 4))
        for j, line in enumerate(textwrap.wrap(caption, width=CELL // 6)[:TEXT_LINES]):
            try:
                draw.text((x + 4, y + CELL + j * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
            except UnicodeEncodeError:  # a bitmap default font knows latin-1 only
                safe = line.encode("latin-1", errors="replace").decode("latin-1")
                draw.text((x + 4, y + CELL + j * LINE_HEIGHT), safe, fill=(0, 0, 0), font=font)
    sheet.save(path, format="PNG")
    return path


def fit(img: Image.Image, side: int) -> Image.Image:
    """Scale to fit in side x side (up or down, aspect kept), centred on a white square."""
    w, h = img.size
    scale = min(side / w, side / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img.resize(size, resample), ((side - size[0]) // 2, (side - size[1]) // 2))
    return square
