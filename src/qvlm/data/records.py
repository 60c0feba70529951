"""The record format every data source yields, and the markers that travel alongside records.

A record is a plain dict::

    {"key": str,                  # unique within the source, e.g. "train.jsonl:17" or "00003/000000042"
     "image": PIL RGB | None,     # None when opened with decode_images=False, or for a text-only record
     "image_id": str | None,      # content hash: sha256 of the raw file bytes, or of the RGB pixels;
                                  # None: a text-only conversation (no image; stage 2 only)
     "caption": str,              # for chat-only records: the first assistant reply
     "messages": list | None,     # [{"role": "system"|"user"|"assistant", "content": str}, ...]
                                  # (LLaVA's ``conversations`` of {"from", "value"} are read as these)
     "attributes": dict | None,   # synthetic scenes: {position: None | {"color", "shape", "size"}}
     "notes": tuple[str, ...]}    # e.g. ("caption_truncated",); counted, never fatal

A bad record is not raised but *returned* as a skip marker ``{"key": k, "skip": reason}`` (plus
``image_id`` when the bytes were read but did not decode), and a streamed shard ends with
``{"key": k, "shard_done": path}``. Markers pass through DataLoader workers
like records, so skip counts and resume positions reach the main process, where the training stream
(``qvlm.train.batches``) counts them one by one; ``iter_records`` does the same for plain iteration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from qvlm.data.decode import (
    IMAGE_MARK,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_PIXELS,
    SkipCounter,
    SkipRecord,
    apply_orientation,
    clean_caption,
    clean_messages,
    decode_image,
    read_bytes,
    to_messages,
    to_rgb,
)


class DataSourceError(ValueError):
    """A ``data.source`` string that names nothing readable; the message says what was tried."""


IMAGE_COLUMNS = ("image", "img", "file_name", "filepath", "image_path", "path", "jpg", "png")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentences", "title", "txt")


def pick(row: dict, wanted: str | None, names: tuple[str, ...]):
    """``row[wanted]`` if a column was named, else the first non-empty of ``names``."""
    if wanted:
        return row.get(wanted)
    return next((row[n] for n in names if row.get(n) not in (None, "")), None)


@dataclass(frozen=True)
class Limits:
    """Per-source decoding limits (from ``DataConfig``)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_chars: int = DEFAULT_MAX_CHARS
    min_side: int = 1
    decode_images: bool = True  # False: skip pixel decoding (the feature cache needs only image_id)


DEFAULT_LIMITS = Limits()


def bytes_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def pixels_id(img: Image.Image) -> str:
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    digest = hashlib.sha256(f"rgb:{rgb.size[0]}x{rgb.size[1]}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:32]


def skip_marker(key: str, reason: str) -> dict:
    return {"key": key, "skip": reason}


def make_record(key: str, image: bytes | str | Path | Image.Image | None, caption: object = None,
                messages: object = None, attributes: dict | None = None, limits: Limits = DEFAULT_LIMITS) -> dict:
    """A record, or a skip marker if the text or the image is bad (text is checked first: it is cheaper).
    A conversation without an image is a text-only record (``image_id`` None)."""
    notes = SkipCounter()
    image_id = None
    try:
        text, chat = clean_text(caption, to_messages(messages), limits.max_chars, notes)
        if image is None and chat is not None:
            if any(IMAGE_MARK in t["content"] for t in chat):
                raise SkipRecord("missing_file", f"{IMAGE_MARK} in the conversation but no image")
            return {"key": key, "image": None, "image_id": None, "caption": text, "messages": chat,
                    "attributes": attributes, "notes": tuple(sorted(notes.notes))}
        if image is None:
            raise SkipRecord("missing_file", "no image")
        if isinstance(image, Image.Image):
            rgb = to_rgb(apply_orientation(image, notes))
            image_id = pixels_id(rgb)
            pixels = rgb if limits.decode_images else None
        else:
            data = read_bytes(image)
            image_id = bytes_id(data)
            pixels = decode_image(data, limits.max_pixels, limits.min_side, notes) if limits.decode_images else None
    except SkipRecord as exc:
        marker = skip_marker(key, exc.reason)
        if image_id is not None:  # bytes read but undecodable: lets the feature cache remember the failure
            marker["image_id"] = image_id
        return marker
    return {"key": key, "image": pixels, "image_id": image_id, "caption": text, "messages": chat,
            "attributes": attributes, "notes": tuple(sorted(notes.notes))}


def clean_text(caption: object, messages: object, max_chars: int, notes: SkipCounter) -> tuple[str, list | None]:
    """(caption, messages): a chat-only record takes its first assistant reply as the caption."""
    chat = None if messages is None else clean_messages(messages, max_chars, notes)
    if caption is None and chat is not None:
        return next(t["content"] for t in chat if t["role"] == "assistant"), chat
    return clean_caption(caption, max_chars, notes), chat


def count_item(item: dict, counter: SkipCounter) -> bool:
    """Count one stream item; True if it is a usable record."""
    if "shard_done" in item:
        return False
    if "skip" in item:
        counter.skip(item["skip"])
        return False
    counter.use()
    for name in item.get("notes", ()):
        counter.note(name)
    return True


def iter_items(dataset) -> Iterator[dict]:
    """Every item of a map-style (``__len__`` + ``__getitem__``) or iterable dataset, markers included."""
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        yield from dataset
    else:
        for i in range(len(dataset)):
            yield dataset[i]


def is_text_only(record: dict) -> bool:
    """A conversation without an image (stage 2 trains it without image slots)."""
    return record.get("image_id") is None and record.get("image") is None and "skip" not in record \
        and "shard_done" not in record


def iter_records(dataset: Iterable, counter: SkipCounter | None = None, limit: int | None = None,
                 failed: dict | None = None, images_only: bool = False) -> Iterator[dict]:
    """Usable records of a dataset (at most ``limit`` items looked at); markers are counted into
    ``counter`` and dropped; undecodable images are noted in ``failed`` (image_id -> reason).
    ``images_only``: text-only records are skipped too, counted as ``text_only``."""
    counter = counter if counter is not None else SkipCounter()
    for item in iter_items(dataset):
        if limit is not None and counter.records >= limit:
            return
        if images_only and is_text_only(item):
            item = skip_marker(item["key"], "text_only")
        if failed is not None and "image_id" in item and "skip" in item:
            failed[item["image_id"]] = item["skip"]
        if count_item(item, counter):
            yield item
