"""Frozen-feature cache: the frozen vision tower's outputs, computed once and read back lazily.

BLIP-2 keeps the image encoder frozen in both stages, so its outputs are a pure function of (weights,
layer, pixel preprocessing, image). The cache stores them as fp16 safetensors shards
(``features-NNNNN.safetensors``, one tensor ``features`` of shape (R, N, Dv)) plus ``index.json``:
a header (``encoder.fingerprint()``, source, layer, drop_cls, image-processor settings, version) and
``entries``: image_id -> [shard, row] (and ``failed``: image_id -> skip reason), where image_id is
the record's content hash (sha256 of the raw file bytes, or of the RGB pixels for in-memory images).
Reads go through ``safe_open`` slices: one row is read from the memory-mapped file, nothing else.

A cache whose header does not match the encoder is stale: ``build_cache`` deletes and rebuilds it
(or raises ``StaleCacheError`` with ``rebuild=False``); ``CachedFeatures.open`` always raises - a
stale cache is never silently used. Building is incremental: images already present are reused.

Augmentation and caching are mutually exclusive: a cache holds one fixed view per image, so random
crops/flips would be silently ignored (caching a fixed number of augmented views is not implemented).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

VERSION = 1
INDEX = "index.json"
CHECKED = ("version", "fingerprint", "layer", "drop_cls", "processor")  # what makes a cache stale
AUGMENT_AND_CACHE = ("data.augment and data.cache_dir are mutually exclusive: the feature cache holds one "
                     "fixed view per image, so augmentation would be silently ignored. Turn one off.")


class StaleCacheError(RuntimeError):
    """A cache built for another encoder, layer or image preprocessing."""


def cache_header(encoder) -> dict:
    """What the cached features depend on (JSON-normalised so it compares equal to a stored one)."""
    header = {"version": VERSION, "fingerprint": encoder.fingerprint(), "source": encoder.source,
              "layer": encoder.layer, "drop_cls": encoder.drop_cls, "processor": encoder.processor.settings(),
              "dtype": "float16"}
    return json.loads(json.dumps(header))


def stale_fields(stored: dict, current: dict) -> list[str]:
    return [k for k in CHECKED if stored.get(k) != current.get(k)]


def read_index(root: str | Path) -> dict | None:
    path = Path(root) / INDEX
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable index: treated as no cache (rebuilt)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def stale_message(root, fields: list[str], stored: dict, current: dict) -> str:
    diffs = "; ".join(f"{k}: cached {stored.get(k)!r} != now {current.get(k)!r}" for k in fields)
    return (f"feature cache {root} is stale ({diffs}). Rebuild it with `qvlm cache-features CONFIG` "
            "(or build_cache(..., rebuild=True)), or point data.cache_dir elsewhere.")


class CachedFeatures:
    """Read-only lookup image_id -> (N, Dv) features; shards are opened lazily (memory-mapped)."""

    def __init__(self, root: str | Path, index: dict):
        self.root = Path(root)
        self.header = index["header"]
        self.shape = tuple(index["shape"] or ())  # (N, Dv)
        self.shards = list(index["shards"])
        self.entries: dict[str, list[int]] = index["entries"]
        self._handles: dict[int, object] = {}

    @classmethod
    def open(cls, root: str | Path, encoder) -> "CachedFeatures":
        """Open a cache built for ``encoder``; ``StaleCacheError`` if it was built for anything else."""
        index = read_index(root)
        if index is None:
            raise FileNotFoundError(f"no feature cache at {root} (no readable {INDEX}); run `qvlm cache-features`")
        current = cache_header(encoder)
        fields = stale_fields(index["header"], current)
        if fields:
            raise StaleCacheError(stale_message(root, fields, index["header"], current))
        return cls(root, index)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.entries

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) get a copy without open file handles
        return {**self.__dict__, "_handles": {}}

    def handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.root / self.shards[shard]), framework="pt")
        return self._handles[shard]

    def get(self, image_ids: list[str], dtype: torch.dtype = torch.float32) -> Tensor:
        """Features of these images, (B, N, Dv) in ``dtype``; KeyError for an id not in the cache."""
        rows = []
        for image_id in image_ids:
            shard, row = self.entries[image_id]
            rows.append(self.handle(shard).get_slice("features")[row:row + 1])  # (1, N, Dv) fp16
        if not rows:
            return torch.zeros((0, *self.shape), dtype=dtype)
        return torch.cat(rows).to(dtype)  # (B, N, Dv)


class ShardWriter:
    """Buffers fp16 feature rows and writes a shard + the index (atomically) every ``shard_size`` rows."""

    def __init__(self, root: Path, index: dict, shard_size: int):
        self.root, self.index, self.shard_size = root, index, shard_size
        self.ids: list[str] = []
        self.rows: list[Tensor] = []

    def add(self, image_ids: list[str], feats: Tensor) -> None:
        self.ids += image_ids
        self.rows += list(feats.to(torch.float16).cpu().unbind(0))  # B x (N, Dv)
        if self.index["shape"] is None:
            self.index["shape"] = list(feats.shape[1:])
        if len(self.ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            self.write_index()
            return
        shard = len(self.index["shards"])
        name = f"features-{shard:05d}.safetensors"
        tmp = self.root / (name + ".tmp")
        save_file({"features": torch.stack(self.rows).contiguous()}, str(tmp))  # (R, N, Dv)
        os.replace(tmp, self.root / name)
        self.index["shards"].append(name)
        for row, image_id in enumerate(self.ids):
            self.index["entries"][image_id] = [shard, row]
        self.ids, self.rows = [], []
        self.write_index()

    def write_index(self) -> None:
        write_json_atomic(self.root / INDEX, self.index)


def clear_cache(root: Path) -> None:
    for path in list(root.glob("features-*.safetensors*")) + [root / INDEX]:
        path.unlink(missing_ok=True)


def prepare_index(root: Path, encoder, rebuild: bool) -> tuple[dict, bool]:
    """The index to extend: the existing one if current, else a fresh one. Returns (index, rebuilt)."""
    header = cache_header(encoder)
    index = read_index(root)
    rebuilt = False
    if index is not None and (fields := stale_fields(index.get("header", {}), header)):
        if not rebuild:
            raise StaleCacheError(stale_message(root, fields, index["header"], header))
        clear_cache(root)
        index, rebuilt = None, True
    if index is None:
        index = {"header": header, "shape": None, "shards": [], "entries": {}, "failed": {}}
    return index, rebuilt


@torch.no_grad()
def build_cache(records: Iterable[dict], encoder, root: str | Path, batch_size: int = 32,
                shard_size: int = 2048, rebuild: bool = True, failed: dict | None = None) -> dict:
    """Encode every record's image not yet cached; returns {"computed", "reused", "duplicates", ...}.

    ``failed`` (image_id -> skip reason, filled while ``records`` is consumed) is stored in the index,
    so a later up-to-date check knows those images without decoding them again.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    index, rebuilt = prepare_index(root, encoder, rebuild)
    writer = ShardWriter(root, index, shard_size)
    device = next(encoder.parameters()).device
    stats = {"computed": 0, "reused": 0, "duplicates": 0, "rebuilt": rebuilt}
    pending: list[dict] = []
    queued: set[str] = set()

    def encode() -> None:
        pixels = encoder.processor([r["image"] for r in pending]).to(device)  # (B, 3, H, W)
        writer.add([r["image_id"] for r in pending], encoder(pixels))  # (B, N, Dv)
        stats["computed"] += len(pending)
        pending.clear()

    for rec in records:
        image_id = rec["image_id"]
        if image_id in index["entries"]:
            stats["reused"] += 1
        elif image_id in queued:
            stats["duplicates"] += 1
        else:
            queued.add(image_id)
            pending.append(rec)
            if len(pending) >= batch_size:
                encode()
    if pending:
        encode()
    index["failed"] = {**index.get("failed", {}), **(failed or {})}
    writer.flush()
    return {**stats, "total": len(index["entries"]), "shards": len(index["shards"]),
            "fingerprint": index["header"]["fingerprint"]}


def run_cache_features(source: str, vision, cache_dir: str | Path, batch_size: int = 32, split: str = "train",
                       layer: str = "last", drop_cls: bool = False, rebuild: bool = True, augment: bool = False,
                       max_pixels: int | None = None, max_records: int | None = None, shard_size: int = 2048,
                       progress: bool = False) -> dict:
    """``qvlm cache-features``: cache ``vision`` (a VisionEncoder or a model source) over a data source.

    Returns a summary dict: records/used/skipped counts, computed/reused entries, the cache size and a
    one-line ``summary``. An up-to-date cache is confirmed by hashing the images, without decoding any.
    """
    from qvlm.data.decode import SkipCounter
    from qvlm.data.records import iter_records
    from qvlm.data.sources import open_dataset
    from qvlm.models.vision import VisionEncoder

    if augment:
        raise ValueError(AUGMENT_AND_CACHE)
    start = time.perf_counter()
    encoder = vision if isinstance(vision, VisionEncoder) else VisionEncoder.from_source(vision, layer, drop_cls)
    index = read_index(cache_dir)
    if index is not None and not stale_fields(index.get("header", {}), cache_header(encoder)):
        quick = open_dataset(source, split, max_pixels=max_pixels, decode_images=False)
        counter = up_to_date(index, quick, max_records)
        if counter is not None:
            stats = {"computed": 0, "reused": counter.used, "duplicates": 0, "rebuilt": False, "up_to_date": True,
                     "total": len(index["entries"]), "shards": len(index["shards"]),
                     "fingerprint": index["header"]["fingerprint"]}
            return summarize(counter, stats, cache_dir, start)
    counter, failed = SkipCounter(), {}
    records = iter_records(open_dataset(source, split, max_pixels=max_pixels), counter, max_records, failed,
                           images_only=True)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc="cache-features", unit="img", file=sys.stderr)
    stats = build_cache(records, encoder, cache_dir, batch_size, shard_size, rebuild, failed)
    return summarize(counter, {**stats, "up_to_date": False}, cache_dir, start)


def up_to_date(index: dict, dataset, max_records: int | None):
    """The skip counter of ``dataset`` (opened with decode_images=False) if every image in it is already
    cached or known to be undecodable (counted under its original reason), else None."""
    from qvlm.data.decode import SkipCounter
    from qvlm.data.records import iter_records

    counter, failed = SkipCounter(), index.get("failed", {})
    for rec in iter_records(dataset, counter, max_records, images_only=True):
        if rec["image_id"] in failed:
            counter.used -= 1
            counter.records -= 1
            counter.skip(failed[rec["image_id"]])
        elif rec["image_id"] not in index["entries"]:
            return None
    return counter


def summarize(counter, stats: dict, cache_dir, start: float) -> dict:
    return {"cache_dir": str(cache_dir), **counter.to_dict(), **stats,
            "seconds": round(time.perf_counter() - start, 3), "summary": counter.summary()}
