"""Robust decoding: every bad-input case of issue 3 is used correctly or skipped with an exact count."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvlm.data.decode import SkipCounter, SkipRecord, clean_caption, clean_messages, decode_image
from data_fixtures import encode, good_images, write_bad_inputs
from qvlm.data.records import iter_records
from qvlm.data.sources import open_dataset


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def used(bad_inputs):
    counter = SkipCounter()
    records = list(iter_records(open_dataset(bad_inputs["path"]), counter))
    return counter, {r["key"]: r for r in records}, records


def test_exact_skip_counts_by_reason(bad_inputs, used):
    counter, _, records = used
    assert counter.to_dict() == {"records": bad_inputs["records"], "used": bad_inputs["used"],
                                 "skipped": bad_inputs["skipped"], "notes": bad_inputs["notes"]}
    assert bad_inputs["skipped"] == {
        "bad_caption_empty": 4, "bad_caption_encoding": 2, "bad_line": 2, "bad_messages": 2, "corrupt": 1,
        "empty_file": 1, "missing_file": 2, "not_an_image": 2, "too_many_pixels": 2, "truncated": 2}
    assert bad_inputs["used"] == len(records) == 20
    assert all(r["image"].mode == "RGB" for r in records)


def by_image(records, name):
    return next(r for r in records if r["caption"] == f"a picture stored as {name}")


def pixel(records, name, xy=(0, 0)):
    return by_image(records, name)["image"].getpixel(xy)


def test_modes_convert_to_rgb_correctly(used):
    _, _, records = used
    assert pixel(records, "cmyk.jpg") == pytest.approx((255, 0, 255), abs=3)  # C=0 M=255 -> magenta
    assert pixel(records, "rgba.png") == (255, 255, 255)  # fully transparent -> white, not red
    assert pixel(records, "gray_alpha.png") == (255, 255, 255)
    assert pixel(records, "gray16.png", (15, 15)) == (255, 255, 255)  # 65535 -> 255, not clipped garbage
    assert pixel(records, "gray16.png", (0, 8)) == (128, 128, 128)  # 128*257 -> 128
    assert pixel(records, "int32.tif", (7, 7)) == (245, 245, 245)  # 63000 / 257
    assert pixel(records, "float.tif", (7, 7)) == (255, 255, 255)  # 1.0 -> 255
    assert pixel(records, "bilevel.png") == (255, 255, 255)
    palette = by_image(records, "palette_transparent.png")["image"]
    plain = by_image(records, "palette.png")["image"]
    src = Image.open(io.BytesIO(good_images()["palette.png"]))
    first = next(xy for xy in ((x, y) for y in range(24) for x in range(32)) if src.getpixel(xy) == 0)
    assert palette.getpixel(first) == (255, 255, 255) and plain.getpixel(first) != (255, 255, 255)


def test_geometry_cases_are_used(used):
    _, _, records = used
    assert by_image(records, "exif_rotated.jpg")["image"].size == (20, 40)  # stored 40x20, orientation 6
    assert by_image(records, "wide.png")["image"].size == (2000, 2)
    assert by_image(records, "tall.png")["image"].size == (2, 1000)
    assert by_image(records, "one_pixel.png")["image"].size == (1, 1)


def test_caption_cases(used):
    _, _, records = used
    captions = [r["caption"] for r in records]
    long = next(c for c in captions if c.startswith("word word"))
    assert 1024 < len(long) <= 2048 and not long.endswith(" ")
    assert "spaced out caption" in captions
    assert "un café ☕ et un chat 猫" in captions
    chat = next(r for r in records if r["messages"])
    assert chat["caption"] == "noise" and chat["messages"][1] == {"role": "assistant", "content": "noise"}


def test_decode_limits_are_per_call():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(SkipRecord) as err:
        decode_image(data, max_pixels=5_000)
    assert err.value.reason == "too_many_pixels"
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == before  # no global state touched
    with pytest.raises(SkipRecord) as err:
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), min_side=2)
    assert err.value.reason == "too_small"


def test_decode_from_path_and_missing(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(np.zeros((4, 5, 3), np.uint8)), "PNG"))
    assert decode_image(tmp_path / "a.png").size == (5, 4)
    for name, reason in (("nope.png", "missing_file"), (".", "missing_file")):
        with pytest.raises(SkipRecord) as err:
            decode_image(tmp_path / name)
        assert err.value.reason == reason


def test_clean_caption_rules():
    assert clean_caption("caf\u00e9".encode("utf-8-sig")) == "caf\u00e9"
    for raw, reason in ((b"caf\xe9", "bad_caption_encoding"), ("x\udcff", "bad_caption_encoding"),
                        (None, "bad_caption_empty"), (" \n", "bad_caption_empty"), (3, "bad_caption_empty")):
        with pytest.raises(SkipRecord) as err:
            clean_caption(raw)
        assert err.value.reason == reason
    counter = SkipCounter()
    assert clean_caption("aaaa bbbb cccc", max_chars=10, counter=counter) == "aaaa bbbb"
    assert counter.notes == {"caption_truncated": 1}
    with pytest.raises(SkipRecord, match="bad_messages"):
        clean_messages([{"role": "robot", "content": "hi"}])


def test_skip_counter_summary():
    c = SkipCounter()
    c.use(3)
    c.skip("truncated", 2)
    c.skip("not_an_image")
    c.use()
    c.skip("truncated")
    c.note("exif_rotated")
    assert c.summary() == ("records 8, used 4, skipped 4 (not_an_image 1, truncated 3); notes: exif_rotated 1")
    assert "\n" not in c.summary()
