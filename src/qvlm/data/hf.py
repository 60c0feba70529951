"""Hugging Face ``datasets`` sources: ``save_to_disk`` folders, imagefolders and hub ids.

``datasets`` is optional and imported only here, only when such a source is opened. Image columns of
type ``datasets.Image`` are read undecoded (``{"bytes", "path"}``) so our own robust decoder handles
them and the feature cache can key them by their bytes. Captions come from the first of ``caption``,
``text``, ``captions`` (a list: its first entry), ... or the named ``caption_column``; LLaVA-style
``conversations`` ({"from": "human"|"gpt", "value"}) are read as ``messages``.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from qvlm.data.records import (CAPTION_COLUMNS, DEFAULT_LIMITS, IMAGE_COLUMNS, DataSourceError, Limits,
                               make_record, pick)

MESSAGE_COLUMNS = ("messages", "conversations")


def import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise DataSourceError(
            "this data.source is a Hugging Face dataset, which needs the optional package `datasets`: "
            "run `pip install datasets` (or convert the data to JSONL/CSV or tar shards)"
        ) from exc
    return datasets


def load_hf_disk(path: str | Path, split: str):
    """A ``save_to_disk`` folder: a Dataset, or one split of a DatasetDict."""
    datasets = import_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; name the folder and the cause
        raise DataSourceError(f"data.source {str(path)!r}: load_from_disk failed: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"data.source {str(path)!r}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    return ds


def load_hf(name: str, split: str, **kwargs):
    """``datasets.load_dataset(name, split=split)``: a hub id, or a builder such as ``imagefolder``."""
    datasets = import_datasets()
    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise DataSourceError(
            f"data.source {name!r} (split {split!r}): datasets.load_dataset failed: "
            f"{type(exc).__name__}: {exc}. Offline? Save it with save_to_disk where you have internet."
        ) from exc


class HFDataset(Dataset):
    """Map-style records from a ``datasets.Dataset``."""

    def __init__(self, ds, limits: Limits = DEFAULT_LIMITS, image_column: str | None = None,
                 caption_column: str | None = None, **_ignored):
        datasets = import_datasets()
        columns = ds.column_names
        self.image_column = image_column or find_image_column(ds, datasets)
        if self.image_column is None or self.image_column not in columns:
            raise DataSourceError(f"HF dataset has no image column (columns: {', '.join(columns)}); "
                                  "name it with image_column=")
        if isinstance(ds.features.get(self.image_column), datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.caption_column = caption_column
        self.messages_column = next((c for c in MESSAGE_COLUMNS if c in columns), None)
        self.ds = ds
        self.limits = limits

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        row = self.ds[index]
        key = str(row.get("key") or row.get("id") or f"hf:{index}")
        caption = pick(row, self.caption_column, CAPTION_COLUMNS)
        if isinstance(caption, list):
            caption = next((c for c in caption if isinstance(c, str) and c.strip()), None)
        messages = row.get(self.messages_column) if self.messages_column else None
        return make_record(key, image_of(row.get(self.image_column)), caption, messages,
                           row.get("attributes"), self.limits)

    def caption_lengths(self) -> list[int]:
        column = self.caption_column or next((c for c in CAPTION_COLUMNS if c in self.ds.column_names), None)
        if column is None:
            return [0] * len(self.ds)
        return [len(c) if isinstance(c, str) else len(str(c or "")) for c in self.ds[column]]


def find_image_column(ds, datasets) -> str | None:
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    return next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)


def image_of(value):
    """An HF cell -> what ``make_record`` takes: bytes, a path, or a PIL image (None if absent)."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value
