"""WebDataset tar shards as img2dataset writes them (``key.jpg`` + ``key.txt`` + ``key.json``), streamed.

Shards are given as a directory (every ``*.tar`` in it, sorted), a comma list, or a brace pattern
(``cc3m/{00000..00009}.tar``, ``{a,b}.tar``). Each shard is read front to back with stdlib
``tarfile`` in streaming mode; consecutive members with the same key (path up to the first dot of
the file name) form one sample. The caption comes from ``.txt``, else from ``"caption"`` in the
``.json`` (which may also carry ``messages`` and ``attributes``).

Splitting: shard ``i`` of the epoch's order goes to rank ``i % world_size``, then within that rank to
DataLoader worker ``j % num_workers`` (j its index among the rank's shards). Every shard therefore
has exactly one reader, so every record is read exactly once per epoch; use at least
``world_size * num_workers`` shards or some readers get none. The order is the sorted list, or a
shuffle seeded by (seed, epoch). Each shard ends with a ``shard_done`` marker; the training stream
hands each marker's shard to ``mark_done`` and saves ``state_dict()``; after
``load_state_dict`` the epoch resumes without the finished shards (shard granularity: records of a
half-read shard are read again). ``set_epoch`` takes effect when workers are (re)started, i.e. with
``persistent_workers=False``.
"""

from __future__ import annotations

import json
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from qvlm.data.records import DEFAULT_LIMITS, Limits, make_record, skip_marker

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> list[str]:
    """``a/{00..02}.tar`` -> a/00.tar, a/01.tar, a/02.tar; ``{x,y}`` alternatives; nested and repeated."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced braces in {pattern!r}")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    match = RANGE.match(body)
    if match:
        a, b = match.group(1), match.group(2)
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        options = [o for alt in split_top_level(body) for o in expand_braces(alt)]
    tails = expand_braces(tail)
    return [head + o + t for o in options for t in tails]


def expand_shards(spec: str) -> list[str]:
    """A directory, comma list or brace pattern -> the list of shard paths (order kept, dirs sorted)."""
    shards: list[str] = []
    for part in split_top_level(spec):
        for item in expand_braces(part):
            path = Path(item).expanduser()
            if path.is_dir():
                shards += sorted(str(p) for p in path.glob("*.tar"))
            else:
                shards.append(str(path))
    return shards


def looks_like_shards(spec: str) -> bool:
    parts = split_top_level(spec)
    return bool(parts) and all(p.endswith(".tar") or ("{" in p and ".tar" in p) for p in parts)


class ShardStream(IterableDataset):
    """Records streamed from tar shards, split over ranks and DataLoader workers (see module doc)."""

    def __init__(self, shards: list[str], limits: Limits = DEFAULT_LIMITS, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = False):
        if not shards:
            raise ValueError("no tar shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.shards = list(shards)
        self.limits = limits
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.done: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.done = set()
        self.epoch = epoch

    def mark_done(self, shards) -> None:
        self.done.update(shards)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shards_done": sorted(self.done)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.done = set(state.get("shards_done", ()))

    def epoch_order(self) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards this rank's ``worker`` reads this epoch, finished ones left out."""
        mine = self.epoch_order()[self.rank::self.world_size][worker::num_workers]
        return [s for s in mine if s not in self.done]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards_for(worker, num_workers):
            yield from read_shard(shard, self.limits)
            yield {"key": f"{shard}#end", "shard_done": shard}


def read_shard(shard: str, limits: Limits = DEFAULT_LIMITS) -> Iterator[dict]:
    """Records (or skip markers) of one tar shard; an unreadable or cut-off shard ends with ``bad_shard``."""
    stem = Path(shard).name.rsplit(".tar", 1)[0]
    group: dict[str, bytes] = {}
    prefix = None
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                base, _, ext = name.partition(".")
                key = f"{folder}/{base}" if folder else base
                if key != prefix and group:
                    yield sample_record(f"{stem}/{prefix}", group, limits)
                    group = {}
                prefix = key
                group[ext.lower()] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError):  # missing, not a tar, or cut off mid-member
        yield skip_marker(f"{stem}/{prefix or ''}", "bad_shard")
        return
    if group:
        yield sample_record(f"{stem}/{prefix}", group, limits)


def sample_record(key: str, group: dict[str, bytes], limits: Limits) -> dict:
    """One sample's files (extension -> bytes) -> a record or a skip marker."""
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    meta: dict = {}
    if "json" in group:
        try:
            loaded = json.loads(group["json"].decode("utf-8", errors="surrogateescape"))
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}
    caption = group.get("txt", meta.get("caption"))
    return make_record(key, image, caption, meta.get("messages"), meta.get("attributes"), limits)
