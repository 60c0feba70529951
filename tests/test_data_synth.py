"""Synthetic scenes: determinism, caption grammar and parse round-trip, held-out split, writing to disk."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from qvlm.data import scenes_metrics as sm
from qvlm.data.commands import run_synth
from qvlm.data.records import DataSourceError, iter_records
from qvlm.data.sources import open_dataset
from qvlm.data.synth import DEFAULT_HELDOUT, POSITIONS, SynthScenes, describe, make_scene, render, seen_pairs


def pairs(scene) -> set[tuple[str, str]]:
    return {(o.color, o.shape) for o in scene.objects}


def test_caption_grammar():
    assert describe([("large", "red", "circle", "left"), ("small", "blue", "square", "top")]) == \
        "a large red circle on the left and a small blue square at the top"
    assert describe([("small", "green", "triangle", "center")]) == "a small green triangle in the center"
    three = describe([("large", "red", "circle", "left"), ("small", "blue", "square", "right"),
                      ("small", "yellow", "triangle", "bottom")])
    assert three == ("a large red circle on the left, a small blue square on the right and "
                     "a small yellow triangle at the bottom")


def test_generation_is_deterministic():
    a, b = SynthScenes(4, seed=7, image_size=32), SynthScenes(4, seed=7, image_size=32)
    for i in range(4):
        ra, rb = a[i], b[i]
        assert ra["caption"] == rb["caption"] and ra["messages"] == rb["messages"]
        assert np.array_equal(np.asarray(ra["image"]), np.asarray(rb["image"]))
        assert ra["image_id"] == rb["image_id"]
    other = SynthScenes(4, seed=8, image_size=32)
    assert [other[i]["caption"] for i in range(4)] != [a[i]["caption"] for i in range(4)]
    assert make_scene(0, "train", 3) != make_scene(0, "test", 3)  # splits draw from different streams


def test_scene_structure_and_render():
    for i in range(100):
        scene = make_scene(1, "train", i)
        assert 1 <= len(scene.objects) <= 3
        positions = [o.position for o in scene.objects]
        assert len(set(positions)) == len(positions)
        assert positions == sorted(positions, key=POSITIONS.index)  # caption order
        attrs = scene.attributes()
        assert list(attrs) == list(POSITIONS)
        assert sum(v is not None for v in attrs.values()) == len(scene.objects)
    img = render(make_scene(1, "train", 0), 48)
    assert img.size == (48, 48) and img.mode == "RGB"
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 2  # objects drawn, not blank


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_parse_round_trip(split):
    for i in range(150):
        scene = make_scene(0, split, i)
        caption, attrs = scene.caption(), scene.attributes()
        assert sm.parse_caption(caption) == sm.truth_objects(attrs)
        assert sm.exact(caption, attrs) and sm.color_shape(caption, attrs) and sm.count(caption, attrs)


def test_caption_scores_detect_errors():
    attrs = {p: None for p in POSITIONS}
    attrs["left"] = {"color": "red", "shape": "circle", "size": "large"}
    attrs["top"] = {"color": "blue", "shape": "square", "size": "small"}
    wrong_colour = "a large green circle on the left and a small blue square at the top"
    wrong_place = "a large red circle on the right and a small blue square at the top"
    missing = "a large red circle on the left"
    assert not sm.color_shape(wrong_colour, attrs) and sm.count(wrong_colour, attrs)
    assert sm.color_shape(wrong_place, attrs) and not sm.exact(wrong_place, attrs)
    assert not sm.count(missing, attrs)
    loose = "Two objects: a big red circle (left) and a little blue square at the top."
    assert sm.exact(loose, attrs)
    scores = sm.score_captions([wrong_colour, wrong_place], [attrs, attrs])
    assert scores == {"color_shape": 0.5, "count": 1.0, "exact": 0.0, "n": 2}


def test_heldout_split():
    held = set(DEFAULT_HELDOUT)
    train_pairs = Counter()
    for i in range(600):
        scene = make_scene(0, "train", i)
        assert not pairs(scene) & held, f"train scene {i} has a held-out pair"
        assert not any(c + " " + s in scene.caption() + json.dumps(scene.messages()) for c, s in held)
        train_pairs.update(pairs(scene))
    assert set(train_pairs) == set(seen_pairs(DEFAULT_HELDOUT))  # every seen pair does occur
    for i in range(300):
        assert not pairs(make_scene(0, "test", i)) & held
        assert pairs(make_scene(0, "heldout", i)) & held, f"heldout scene {i} has no held-out pair"
    custom = (("red", "circle"),)
    assert all(("red", "circle") not in pairs(make_scene(0, "train", i, custom)) for i in range(200))


def test_messages_answer_the_scene():
    for i in range(100):
        scene = make_scene(2, "train", i)
        chat = scene.messages()
        assert [t["role"] for t in chat] == ["user", "assistant"] * (len(chat) // 2) and len(chat) == 6
        assert chat[0]["content"] == "how many objects are there?"
        assert chat[1]["content"] == ("one", "two", "three")[len(scene.objects) - 1]
        for q, a in zip(chat[2::2], chat[3::2], strict=True):
            text = q["content"]
            if text.startswith("what colour is the ") and "object" not in text:
                shape = text.removeprefix("what colour is the ").rstrip("?")
                assert a["content"] == next(o.color for o in scene.objects if o.shape == shape)


def test_run_synth_writes_readable_splits(tmp_path):
    summary = run_synth(tmp_path, n=12, seed=3, image_size=32, n_test=4, n_heldout=5)
    assert summary["sizes"] == {"train": 12, "test": 4, "heldout": 5}
    for split, n in summary["sizes"].items():
        lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        first = json.loads(lines[0])
        assert set(first) >= {"image", "caption", "messages", "attributes"}
        assert (tmp_path / first["image"]).is_file() and not first["image"].startswith("/")
    ds = open_dataset(str(tmp_path), split="heldout")
    records = list(iter_records(ds))
    assert len(records) == 5
    memory = SynthScenes(5, seed=3, split="heldout", image_size=32)
    assert [r["caption"] for r in records] == [memory[i]["caption"] for i in range(5)]
    assert np.array_equal(np.asarray(records[0]["image"]), np.asarray(memory[0]["image"]))  # PNG is lossless
    assert records[0]["attributes"] == memory[0]["attributes"]


def test_synth_spec():
    ds = open_dataset("synth:n=10,seed=3,image_size=32")
    assert len(ds) == 10 and ds[0]["image"].size == (32, 32)
    assert len(open_dataset("synth:n=10", split="test")) == 200
    assert len(open_dataset("synth:n=3000,n_heldout=7", split="heldout")) == 7
    assert len(open_dataset("synth:n=3000", split="test")) == 300
    with pytest.raises(DataSourceError, match="image_size"):
        open_dataset("synth:size=3")
    with pytest.raises(DataSourceError, match="split"):
        open_dataset("synth:n=3", split="validation")
