"""Sharded streaming: every record exactly once per epoch across DataLoader workers and ranks; resume."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DataLoader

from data_fixtures import write_shards
from qvlm.data.sources import open_dataset


def keep_items(items):
    """A collate_fn that returns the items themselves (records and markers)."""
    return items


def split_items(items: list[dict]) -> tuple[list[dict], list[str]]:
    """(records, finished shards) of a list of records and markers."""
    records = [i for i in items if "skip" not in i and "shard_done" not in i]
    return records, [i["shard_done"] for i in items if "shard_done" in i]


def read_epoch(ds, workers: int, batch_size: int = 3) -> tuple[list[str], list[str]]:
    keys, done = [], []
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=keep_items)
    for items in loader:
        records, shards = split_items(items)
        keys += [r["key"] for r in records]
        done += shards
    return keys, done


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wds"), shards=5, per_shard=4, image_size=16)


def test_two_workers_read_each_record_exactly_once(shards):
    ds = open_dataset(",".join(shards["shards"]))
    for epoch in range(2):
        ds.set_epoch(epoch)
        keys, done = read_epoch(ds, workers=2)
        assert Counter(keys) == Counter(shards["keys"])  # same multiset: each exactly once
        assert sorted(done) == sorted(shards["shards"])


def test_two_ranks_by_two_workers(shards):
    seen = []
    per_rank = []
    for rank in range(2):
        ds = open_dataset(",".join(shards["shards"]), rank=rank, world_size=2, shuffle=True, seed=3)
        keys, _ = read_epoch(ds, workers=2)
        per_rank.append(set(keys))
        seen += keys
    assert Counter(seen) == Counter(shards["keys"])
    assert not per_rank[0] & per_rank[1] and all(per_rank)


def test_shuffle_is_seeded_per_epoch(shards):
    ds = open_dataset(",".join(shards["shards"]), shuffle=True, seed=1)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        orders.append(ds.epoch_order())
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[1]) == sorted(shards["shards"])


def test_resume_skips_finished_shards(shards):
    spec = ",".join(shards["shards"])
    first = open_dataset(spec)
    consumed = []
    loader = DataLoader(first, batch_size=5, num_workers=0, collate_fn=keep_items)
    for step, items in enumerate(loader):
        records, done = split_items(items)
        consumed += [r["key"] for r in records]
        first.mark_done(done)
        if step == 1:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and len(state["shards_done"]) >= 1
    resumed = open_dataset(spec)
    resumed.load_state_dict(state)
    rest, _ = read_epoch(resumed, workers=2)
    finished = {k for k in shards["keys"] if any(k.startswith(s.rsplit("/", 1)[1][:-4] + "/")
                                                  for s in state["shards_done"])}
    assert set(rest) == set(shards["keys"]) - finished and len(rest) == len(set(rest))
    assert finished <= set(consumed)
    resumed.set_epoch(1)  # a new epoch starts from scratch
    assert len(read_epoch(resumed, workers=0)[0]) == len(shards["keys"])
