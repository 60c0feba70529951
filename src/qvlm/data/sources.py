"""Data sources: one ``data.source`` string -> a dataset of records (see ``qvlm.data.records``).

Grammar of ``open_dataset(spec, split)`` (first match wins):

- ``synth`` or ``synth:n=N,seed=S,image_size=P,n_test=N,n_heldout=N`` - synthetic scenes made on the
  fly (map-style); ``split`` is train, test or heldout;
- ``hf:NAME`` - a Hugging Face ``datasets`` hub id (or any path ``load_dataset`` takes), split ``split``;
- WebDataset tar shards: ``x.tar``, ``a.tar,b.tar``, ``shards/{00000..00009}.tar``, or a directory
  holding ``*.tar`` (streamed, iterable; ``split`` is ignored);
- ``file.jsonl`` / ``file.csv`` / ``file.json`` - one record per line/row (``.json``: a list of
  records, as LLaVA-Instruct ships): ``image`` (path relative to the file's folder; absent: a
  text-only conversation) and ``caption`` and/or ``messages`` or LLaVA ``conversations`` (CSV: a
  JSON string); also ``attributes``, ``key``, ``id``;
- a directory with ``{split}.jsonl`` (what ``qvlm data synth`` writes) or ``{split}.csv``;
- a directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict: ``split`` picks);
- a directory with ``metadata.jsonl``/``metadata.csv`` and images: a ``datasets`` imagefolder;
- ``org/name`` that is not a local path: a hub id, as ``hf:org/name``.

``datasets`` is imported only for the HF forms. Bad records become skip markers, never exceptions.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from torch.utils.data import Dataset

from qvlm.data.hf import HFDataset, load_hf, load_hf_disk
from qvlm.data.records import (
    CAPTION_COLUMNS,
    DEFAULT_LIMITS,
    IMAGE_COLUMNS,
    DataSourceError,
    Limits,
    make_record,
    pick,
    skip_marker,
)
from qvlm.data.webdataset import ShardStream, expand_shards, looks_like_shards

SYNTH_KEYS = {"n": 5000, "seed": 0, "image_size": 64, "n_test": None, "n_heldout": None}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
__all__ = ["DataSourceError", "FileDataset", "HFDataset", "ShardStream", "open_data", "open_dataset"]


def open_dataset(spec: str, split: str = "train", *, max_pixels: int | None = None, max_chars: int | None = None,
                 min_side: int = 1, decode_images: bool = True, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = False, **options):
    """The dataset named by ``spec`` (module doc). ``options``: synth defaults (n, image_size...),
    HF ``image_column`` / ``caption_column``. ``rank``/``world_size``/``seed``/``shuffle`` apply to
    streamed shards (map-style datasets are split by the loop's sampler)."""
    limits = Limits(**{k: v for k, v in (("max_pixels", max_pixels), ("max_chars", max_chars)) if v is not None},
                    min_side=min_side, decode_images=decode_images)
    text = str(spec or "").strip()
    if text == "synth" or text.startswith("synth:"):
        return open_synth(text, split, limits, options)
    if text.startswith("hf:"):
        return HFDataset(load_hf(text[3:], split), limits, **options)
    if looks_like_shards(text):
        return open_shards(text, limits, rank, world_size, seed, shuffle)
    path = Path(text).expanduser()
    if path.suffix in (".jsonl", ".csv", ".json"):
        return FileDataset(path, limits, **options)
    if path.is_dir():
        return open_directory(path, split, limits, rank, world_size, seed, shuffle, options)
    if HUB_ID.match(text) and not path.exists():
        try:
            return HFDataset(load_hf(text, split), limits, **options)
        except DataSourceError as exc:
            raise DataSourceError(f"data.source {text!r} is not a local path, so it was read as a Hugging Face "
                                  f"hub id: {exc}") from exc
    raise DataSourceError(
        f"data.source {spec!r}: not understood. Use synth[:n=N,seed=S,image_size=P], a .jsonl/.csv file, "
        "a directory (split.jsonl files, tar shards, save_to_disk or imagefolder), tar shards "
        "(a.tar,b.tar or dir/{00000..00009}.tar), or hf:<hub id>."
    )


def open_directory(path: Path, split: str, limits: Limits, rank, world_size, seed, shuffle, options):
    for name in (f"{split}.jsonl", f"{split}.csv"):
        if (path / name).is_file():
            return FileDataset(path / name, limits, **options)
    if any(path.glob("*.tar")):
        return open_shards(str(path), limits, rank, world_size, seed, shuffle)
    if any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return HFDataset(load_hf_disk(path, split), limits, **options)
    if any((path / f).is_file() for f in ("metadata.jsonl", "metadata.csv")):
        return HFDataset(load_hf("imagefolder", split, data_dir=str(path)), limits, **options)
    raise DataSourceError(
        f"data.source {str(path)!r}: directory has no {split}.jsonl/{split}.csv, no *.tar shards, "
        "no save_to_disk files and no metadata.jsonl/metadata.csv (imagefolder)"
    )


def open_shards(text: str, limits: Limits, rank: int, world_size: int, seed: int, shuffle: bool) -> ShardStream:
    """Tar shards; an error if none exists (a typo), a ``bad_shard`` skip per missing one otherwise."""
    shards = expand_shards(text)
    if not any(Path(s).is_file() for s in shards):
        raise DataSourceError(f"data.source {text!r}: none of its {len(shards)} tar shards exists "
                              f"(first: {shards[0] if shards else '-'})")
    return ShardStream(shards, limits, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)


def open_synth(text: str, split: str, limits: Limits, options: dict):
    from qvlm.data.synth import DEFAULT_HELDOUT, SynthScenes, split_sizes

    values = {k: options.get(k, v) for k, v in SYNTH_KEYS.items()}
    body = text.partition(":")[2]
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, eq, raw = item.partition("=")
        if key not in SYNTH_KEYS or not eq:
            raise DataSourceError(
                f"data.source {text!r}: {item!r} is not key=value with key in {', '.join(SYNTH_KEYS)}")
        try:
            values[key] = int(raw)
        except ValueError as exc:
            raise DataSourceError(f"data.source {text!r}: {key} must be an integer, got {raw!r}") from exc
    sizes = split_sizes(values["n"], values["n_test"], values["n_heldout"])
    if split not in sizes:
        raise DataSourceError(f"data.source {text!r}: split must be one of {', '.join(sizes)}, got {split!r}")
    return SynthScenes(sizes[split], seed=values["seed"], split=split, image_size=values["image_size"],
                       heldout=options.get("heldout", DEFAULT_HELDOUT), limits=limits)


class FileDataset(Dataset):
    """A JSONL or CSV file of records; image paths relative to the file's folder. Parsed once, up front."""

    def __init__(self, path: str | Path, limits: Limits = DEFAULT_LIMITS, image_column: str | None = None,
                 caption_column: str | None = None, **_ignored):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataSourceError(f"data.source {str(path)!r}: file not found")
        self.root = self.path.parent
        self.limits = limits
        self.image_column, self.caption_column = image_column, caption_column
        # Undecodable bytes survive as lone surrogates, so one bad caption skips one record, not the file.
        text = self.path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        readers = {".csv": read_csv, ".json": read_json_list}
        self.rows = readers.get(self.path.suffix, read_jsonl)(text)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        if not isinstance(row, dict):
            return skip_marker(f"{self.path.name}:{index}", "bad_line")
        key = str(row.get("key") or row.get("id") or f"{self.path.name}:{index}")
        image = pick(row, self.image_column, IMAGE_COLUMNS)
        image = self.root / image if isinstance(image, str) and image else None
        messages = row.get("messages") or row.get("conversations")
        if isinstance(messages, str):  # CSV cell
            try:
                messages = json.loads(messages)
            except ValueError:
                return skip_marker(key, "bad_messages")
        caption = pick(row, self.caption_column, CAPTION_COLUMNS)
        return make_record(key, image, caption, messages or None, row.get("attributes"), self.limits)

    def caption_lengths(self) -> list[int]:
        return [len(str(pick(r, self.caption_column, CAPTION_COLUMNS) or "")) if isinstance(r, dict) else 0
                for r in self.rows]


def read_jsonl(text: str) -> list:
    rows: list = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        rows.append(row if isinstance(row, dict) else None)
    return rows


def read_json_list(text: str) -> list:
    """A ``.json`` file holding a list of records; a file that is not one reads as one bad line."""
    try:
        rows = json.loads(text)
    except ValueError:
        return [None]
    if not isinstance(rows, list):
        return [None]
    return [row if isinstance(row, dict) else None for row in rows]


def read_csv(text: str) -> list:
    rows: list = []
    try:
        for row in csv.DictReader(io.StringIO(text)):
            rows.append({k: (v if v != "" else None) for k, v in row.items() if k is not None})
    except csv.Error:
        rows.append(None)  # the rest of the file is unreadable: one bad_line
    return rows


def open_data(cfg, source: str, split: str, **kwargs):
    """``open_dataset`` with the ``data.*`` limits and column names of a ``Config``."""
    options = {k: v for k, v in (("image_column", cfg.data.image_column),
                                 ("caption_column", cfg.data.caption_column)) if v}
    return open_dataset(source, split=split, max_pixels=cfg.data.max_image_pixels,
                        max_chars=cfg.data.max_caption_chars, min_side=cfg.data.min_image_side,
                        **kwargs, **options)
