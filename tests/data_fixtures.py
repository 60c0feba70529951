"""Test fixtures made on the fly: every bad-input case of issue 3 as a JSONL + images, and tar shards.

``write_bad_inputs(folder)`` writes ``folder/records.jsonl`` (mixed good and bad records, some lines
raw bytes that are not UTF-8) and the files it points at, and returns what reading it must give:
``{"path", "records", "used", "skipped": {reason: n}, "notes": {name: n}}``. ``write_shards`` writes
img2dataset-style tar shards of synthetic scenes. Nothing binary is committed to the repository.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from qvlm.data.decode import DEFAULT_MAX_PIXELS


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def fake_png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb costs nothing to make)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: stored 40x20, shown 20x40
    return encode(Image.fromarray(noise(40, 20, 3)), "JPEG", exif=exif.tobytes())


def good_images() -> dict[str, bytes]:
    """File name -> bytes of images that must decode (and be used)."""
    rgb = Image.fromarray(noise(32, 24))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "good.png": encode(rgb, "PNG"),
        "good.jpg": encode(rgb, "JPEG"),
        "cmyk.jpg": encode(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "JPEG"),
        "rgba.png": encode(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "PNG"),
        "palette.png": encode(palette, "PNG"),
        "palette_transparent.png": encode(palette, "PNG", transparency=0),
        "gray16.png": encode(Image.fromarray((np.arange(256).reshape(16, 16) * 257).astype(np.uint16)), "PNG"),
        "int32.tif": encode(Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.int32)), "TIFF"),
        "float.tif": encode(Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)), "TIFF"),
        "gray.jpg": encode(Image.new("L", (16, 16), 128), "JPEG"),
        "gray_alpha.png": encode(Image.new("LA", (16, 16), (0, 0)), "PNG"),
        "bilevel.png": encode(Image.new("1", (16, 16), 1), "PNG"),
        "exif_rotated.jpg": exif_rotated(),
        "wide.png": encode(Image.new("RGB", (2000, 2), (0, 0, 255)), "PNG"),
        "tall.png": encode(Image.new("RGB", (2, 1000), (0, 255, 0)), "PNG"),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
    }


def bad_images(max_pixels: int) -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, the skip reason it must give)."""
    good = encode(Image.fromarray(noise(64, 64, 1)), "PNG")
    jpeg = encode(Image.fromarray(noise(64, 64, 2)), "JPEG")
    side = math.isqrt(max_pixels) + 1000
    return {
        "empty.jpg": (b"", "empty_file"),
        "text.jpg": (b"this is not an image, just text with a .jpg name\n", "not_an_image"),
        "page.png": (b"<html><body>404 not found</body></html>", "not_an_image"),
        "half.png": (good[: len(good) // 2], "truncated"),
        "half.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "broken_stream.png": (fake_png(16, 16, b"not zlib data" * 4), "corrupt"),
        "bomb_huge.png": (fake_png(100_000, 100_000, zlib.compress(b"\0" * 64)), "too_many_pixels"),
        "bomb_over_limit.png": (fake_png(side, side, zlib.compress(b"\0" * 64)), "too_many_pixels"),
    }


def write_bad_inputs(folder: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_chars: int = 2048) -> dict:
    """Write every bad-input case into ``folder``; returns the expected counts (module doc)."""
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines: list[bytes] = []
    expected = {"used": 0, "skipped": {}, "notes": {"caption_truncated": 1, "exif_rotated": 1}}

    def add(obj: dict | bytes, reason: str | None = None) -> None:
        lines.append(obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode("utf-8"))
        if reason is None:
            expected["used"] += 1
        else:
            expected["skipped"][reason] = expected["skipped"].get(reason, 0) + 1

    for name, data in good_images().items():
        (folder / "img" / name).write_bytes(data)
        add({"image": f"img/{name}", "caption": f"a picture stored as {name}"})
    for name, (data, reason) in bad_images(max_pixels).items():
        (folder / "img" / name).write_bytes(data)
        add({"image": f"img/{name}", "caption": f"a broken file {name}"}, reason)
    add({"image": "img/does_not_exist.jpg", "caption": "gone"}, "missing_file")
    add({"caption": "a record without an image"}, "missing_file")
    add_text_cases(add, max_chars)
    (folder / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    skipped = dict(sorted(expected["skipped"].items()))
    return {"path": str(folder / "records.jsonl"), "records": len(lines), "used": expected["used"],
            "skipped": skipped, "notes": expected["notes"]}


def add_text_cases(add, max_chars: int) -> None:
    """Caption and line cases, all pointing at a good image."""
    img = "img/good.png"
    add({"image": img, "caption": "word " * (10 * max_chars)})  # tens of thousands of chars: cut, used
    add({"image": img, "caption": "  spaced\n\tout   caption  "})
    add({"image": img, "caption": "un café ☕ et un chat 猫"})
    add({"image": img, "messages": [{"role": "user", "content": "what is it?"},
                                    {"role": "assistant", "content": "noise"}]})
    add({"image": img, "caption": ""}, "bad_caption_empty")
    add({"image": img, "caption": "  \n "}, "bad_caption_empty")
    add({"image": img, "caption": None}, "bad_caption_empty")
    add({"image": img}, "bad_caption_empty")
    add(b'{"image": "img/good.png", "caption": "caf\xe9 in latin-1"}', "bad_caption_encoding")
    add(b'{"image": "img/good.png", "caption": "\xff\xfe broken bytes"}', "bad_caption_encoding")
    add({"image": img, "messages": [{"role": "user", "content": "no answer?"}]}, "bad_messages")
    add({"image": img, "messages": "not a list"}, "bad_messages")
    add(b'{"image": "img/good.png", "caption": "unterminated', "bad_line")
    add(b"[1, 2, 3]", "bad_line")


def write_shards(folder: str | Path, shards: int = 4, per_shard: int = 5, image_size: int = 32, seed: int = 0,
                 bad_member: bool = False) -> dict:
    """img2dataset-style shards ``folder/NNNNN.tar`` of synthetic scenes (jpg + txt + json per key).

    With ``bad_member`` the first sample of shard 0 has a truncated JPEG (-> ``truncated``).
    Returns {"shards": [paths], "keys": [record keys of good samples]}."""
    from qvlm.data.synth import make_scene, render

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, keys = [], []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                scene = make_scene(seed, "train", s * per_shard + i)
                jpg = encode(render(scene, image_size), "JPEG", quality=90)
                if bad_member and s == 0 and i == 0:
                    jpg = jpg[: len(jpg) // 2]
                else:
                    keys.append(f"{s:05d}/{key}")
                meta = {"key": key, "status": "success", "attributes": scene.attributes()}
                for ext, data in (("jpg", jpg), ("txt", scene.caption().encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return {"shards": paths, "keys": keys}
